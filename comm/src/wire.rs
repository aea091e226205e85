//! The rendezvous's message format: length-prefixed frames over TCP.
//!
//! A frame is a little-endian u32 byte count (of what follows), a one-byte kind, and the payload. Strings
//! and byte strings inside a payload are a u32 length and the bytes. Frames are bounded so a stray client
//! (a port scanner, a wrong program on the port) cannot make a rank allocate without limit.

use std::io::{self, Read, Write};

/// Largest frame accepted: generous for NCCL ids, IPC handles and shm names, far below memory limits.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// Protocol version carried in Hello so mismatched nc builds refuse each other plainly.
pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Rank -> rank 0 at join: version, rank, world size, fingerprint.
    Hello = 1,
    /// Rank 0 -> rank: everyone arrived and agrees.
    Welcome = 2,
    /// Rank 0 -> rank: the run cannot start; payload is the reason.
    Refuse = 3,
    /// Rank -> rank 0: this rank's part of an all-gather.
    Gather = 4,
    /// Rank 0 -> rank: every rank's part, in rank order.
    Gathered = 5,
    /// Rank 0 -> rank: rank 0's bytes of a broadcast.
    Broadcast = 6,
    /// Either way: this side is closing on purpose; the end of the connection that follows is not a death.
    Bye = 7,
    /// Rank 0 -> rank: another rank is gone; payload is its rank (u32) and the reason.
    PeerGone = 8,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Refuse,
            4 => Kind::Gather,
            5 => Kind::Gathered,
            6 => Kind::Broadcast,
            7 => Kind::Bye,
            8 => Kind::PeerGone,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

pub fn write_frame(out: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    if payload.len() + 1 > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a rendezvous message of {} bytes exceeds the {MAX_FRAME_BYTES}-byte limit",
                payload.len()
            ),
        ));
    }
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.extend_from_slice(&((payload.len() + 1) as u32).to_le_bytes());
    frame.push(kind as u8);
    frame.extend_from_slice(payload);
    out.write_all(&frame)?;
    out.flush()
}

/// Reads one frame. A clean end of stream before the first byte is `UnexpectedEof`.
pub fn read_frame(input: &mut impl Read) -> io::Result<Frame> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes is not an nc rendezvous message (is another program on this port?)"),
        ));
    }
    let mut body = vec![0u8; len];
    input.read_exact(&mut body)?;
    let kind = Kind::from_byte(body[0]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown rendezvous message kind {}", body[0]),
        )
    })?;
    body.remove(0);
    Ok(Frame { kind, payload: body })
}

/// Appends payload fields.
#[derive(Default)]
pub struct Encoder(pub Vec<u8>);

impl Encoder {
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }
}

/// Reads payload fields; every read checks the remaining length.
pub struct Decoder<'a>(pub &'a [u8]);

impl<'a> Decoder<'a> {
    fn malformed() -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "a truncated or malformed rendezvous message",
        )
    }
    pub fn u32(&mut self) -> io::Result<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>().ok_or_else(Self::malformed)?;
        self.0 = rest;
        Ok(u32::from_le_bytes(*head))
    }
    pub fn bytes(&mut self) -> io::Result<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > self.0.len() {
            return Err(Self::malformed());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    pub fn string(&mut self) -> io::Result<String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| Self::malformed())
    }
    pub fn finished(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Gather, b"abc").unwrap();
        write_frame(&mut buf, Kind::Bye, b"").unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Frame {
                kind: Kind::Gather,
                payload: b"abc".to_vec()
            }
        );
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Frame {
                kind: Kind::Bye,
                payload: vec![]
            }
        );
        assert_eq!(read_frame(&mut r).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let http = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(
            read_frame(&mut &http[..]).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn fields_round_trip_and_truncation_is_an_error() {
        let mut e = Encoder::default();
        e.u32(7).str("flag").bytes(&[1, 2, 3]);
        let mut d = Decoder(&e.0);
        assert_eq!(d.u32().unwrap(), 7);
        assert_eq!(d.string().unwrap(), "flag");
        assert_eq!(d.bytes().unwrap(), &[1, 2, 3]);
        assert!(d.finished());
        let mut cut = Decoder(&e.0[..e.0.len() - 1]);
        cut.u32().unwrap();
        cut.string().unwrap();
        assert!(cut.bytes().is_err());
    }
}
