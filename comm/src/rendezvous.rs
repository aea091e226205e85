//! TCP rendezvous: how the ranks of a run find each other, agree they run the same job, and swap the
//! small things a transport needs (an NCCL unique id, a shared-memory segment's name, CUDA IPC handles).
//!
//! Rank 0 listens on MASTER_ADDR:MASTER_PORT; every other rank connects (retrying until the timeout, since
//! launchers start ranks in any order) and sends a Hello with its rank, world size and fingerprint. Once
//! all have arrived rank 0 checks them and answers Welcome, or Refuse with the reason, to every rank, so a
//! mismatch fails every rank with the same message. Later exchanges go through rank 0 (a star): fine for
//! the few small messages of a run.
//!
//! Rank 0 keeps its connection to every rank open for the whole run. A connection that ends without a
//! Bye means that process died: a reader thread per connection notices at once and records it in a
//! `PeerWatch`, and rank 0 tells the other ranks, so any rank can learn "rank r is gone" without a
//! collective having to time out first.

use crate::wire::{read_frame, write_frame, Decoder, Encoder, Frame, Kind, PROTOCOL_VERSION};
use crate::CommError;
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Where and how long to meet.
#[derive(Debug, Clone)]
pub struct RendezvousConfig {
    pub rank: usize,
    pub world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// How long to wait for every rank to arrive (and for any later exchange).
    pub timeout: Duration,
}

/// Extra time a rank waits for rank 0's verdict beyond its own timeout: rank 0 may wait its whole timeout
/// for a missing rank before it can answer "refused, rank k never came".
const VERDICT_GRACE: Duration = Duration::from_secs(3);

/// How often a rank retries connecting while rank 0 is not listening yet.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// Records the first peer found gone; cloneable, cheap to poll from any thread (a training loop, a ring
/// waiting on a flag).
#[derive(Clone, Default)]
pub struct PeerWatch {
    gone: Arc<AtomicBool>,
    first: Arc<Mutex<Option<CommError>>>,
}

impl PeerWatch {
    /// Err naming the first rank found gone, Ok while all are present.
    pub fn check(&self) -> Result<(), CommError> {
        if !self.gone.load(Ordering::Acquire) {
            return Ok(());
        }
        let first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        Err(first.clone().unwrap_or_else(|| CommError::unranked("a peer is gone")))
    }

    fn mark(&self, message: String) {
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(CommError::unranked(message));
        }
        self.gone.store(true, Ordering::Release);
    }
}

/// One connection: rank 0 has one per other rank, every other rank one to rank 0.
struct Link {
    peer: usize,
    writer: Arc<Mutex<TcpStream>>,
    /// Frames the reader thread received, in order; disconnected once the connection ended.
    inbox: Receiver<Frame>,
}

/// A joined run: every rank is present and agreed on the fingerprint.
pub struct Rendezvous {
    rank: usize,
    world_size: usize,
    /// "MASTER_ADDR:MASTER_PORT", for messages.
    address: String,
    timeout: Duration,
    links: Vec<Link>,
    watch: PeerWatch,
    /// Set by Drop before saying Bye, so the reader threads take the end of the connection as expected.
    closing: Arc<AtomicBool>,
}

impl Rendezvous {
    /// Every rank calls it. `fingerprint`: (flag name, value) pairs that must agree across ranks (flags,
    /// data identity); a mismatch fails on every rank with an error naming the flag and both values. A
    /// rank that does not arrive within the timeout fails every rank with an error naming the missing
    /// rank(s) and MASTER_ADDR:MASTER_PORT.
    pub fn join(cfg: &RendezvousConfig, fingerprint: &[(String, String)]) -> Result<Rendezvous, CommError> {
        let address = format!("{}:{}", cfg.master_addr, cfg.master_port);
        if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
            return Err(CommError::unranked(format!(
                "rank {} of world size {} is not a valid rank (RANK must be below WORLD_SIZE)",
                cfg.rank, cfg.world_size
            )));
        }
        let mut rdv = Rendezvous {
            rank: cfg.rank,
            world_size: cfg.world_size,
            address,
            timeout: cfg.timeout,
            links: Vec::new(),
            watch: PeerWatch::default(),
            closing: Arc::new(AtomicBool::new(false)),
        };
        if cfg.world_size == 1 {
            return Ok(rdv);
        }
        let streams = if cfg.rank == 0 {
            rdv.gather_hellos(fingerprint)?
        } else {
            vec![(0, rdv.say_hello(fingerprint)?)]
        };
        rdv.start_readers(streams)?;
        Ok(rdv)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// A handle that reports the first rank found gone; poll it from anywhere.
    pub fn watch(&self) -> PeerWatch {
        self.watch.clone()
    }

    /// Err naming a rank whose process is gone (its connection closed without a goodbye), Ok otherwise.
    /// Never blocks.
    pub fn check_peers(&self) -> Result<(), CommError> {
        self.watch.check()
    }

    /// Every rank gets every rank's bytes, in rank order (NCCL unique id, CUDA IPC handles, shm names).
    pub fn all_gather_bytes(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CommError> {
        if self.world_size == 1 {
            return Ok(vec![mine.to_vec()]);
        }
        let deadline = Instant::now() + self.timeout;
        if self.rank == 0 {
            let mut all = vec![mine.to_vec()];
            for i in 0..self.links.len() {
                all.push(self.receive(i, Kind::Gather, deadline, "all_gather_bytes")?);
            }
            let mut e = Encoder::default();
            e.u32(all.len() as u32);
            for part in &all {
                e.bytes(part);
            }
            for i in 0..self.links.len() {
                self.send(i, Kind::Gathered, &e.0)?;
            }
            Ok(all)
        } else {
            self.send(0, Kind::Gather, mine)?;
            let payload = self.receive(0, Kind::Gathered, deadline, "all_gather_bytes")?;
            let mut d = Decoder(&payload);
            let parsed = (|| -> io::Result<Vec<Vec<u8>>> {
                let count = d.u32()? as usize;
                (0..count.min(self.world_size + 1))
                    .map(|_| Ok(d.bytes()?.to_vec()))
                    .collect()
            })();
            match parsed {
                Ok(all) if all.len() == self.world_size && d.finished() => Ok(all),
                _ => Err(self.error(format!(
                    "rank 0 sent a malformed all-gather reply over {} (different nc versions?)",
                    self.address
                ))),
            }
        }
    }

    /// Rank 0's bytes to everyone (other ranks' `mine` is ignored).
    pub fn broadcast_bytes(&mut self, mine: &[u8]) -> Result<Vec<u8>, CommError> {
        if self.world_size == 1 {
            return Ok(mine.to_vec());
        }
        if self.rank == 0 {
            for i in 0..self.links.len() {
                self.send(i, Kind::Broadcast, mine)?;
            }
            Ok(mine.to_vec())
        } else {
            let deadline = Instant::now() + self.timeout;
            self.receive(0, Kind::Broadcast, deadline, "broadcast_bytes")
        }
    }

    /// Returns once every rank has called it.
    pub fn barrier(&mut self) -> Result<(), CommError> {
        self.all_gather_bytes(&[]).map(|_| ())
    }

    fn error(&self, what: String) -> CommError {
        CommError::at(self.rank, what)
    }

    /// Rank 0: accepts connections until every rank said Hello or the time is up, then answers all.
    fn gather_hellos(&self, fingerprint: &[(String, String)]) -> Result<Vec<(usize, TcpStream)>, CommError> {
        let deadline = Instant::now() + self.timeout;
        let listener = self.bind(deadline)?;
        listener
            .set_nonblocking(true)
            .map_err(|e| self.error(format!("cannot poll the listener on {}: {e}", self.address)))?;
        let mut arrived: Vec<Option<Arrival>> = (0..self.world_size).map(|_| None).collect();
        // A fatal problem found while ranks were arriving (a duplicate rank, a different world size);
        // every rank still present gets it as the refusal.
        let mut fatal: Option<String> = None;
        while fatal.is_none() && arrived[1..].iter().any(|a| a.is_none()) && Instant::now() < deadline {
            let (mut stream, from) = match listener.accept() {
                Ok(conn) => conn,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                    thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(self.error(format!("accepting a connection on {} failed: {e}", self.address))),
            };
            // A real rank says Hello right after connecting; a silent client must not stall the others long.
            let remaining = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(100), Duration::from_secs(5));
            let hello = stream
                .set_nonblocking(false)
                .and_then(|_| stream.set_read_timeout(Some(remaining)))
                .and_then(|_| stream.set_nodelay(true))
                .and_then(|_| read_frame(&mut stream));
            let hello = match hello {
                Ok(Frame {
                    kind: Kind::Hello,
                    payload,
                }) => payload,
                // Not an nc rank (a scanner, a health check): ignore it and keep waiting.
                _ => continue,
            };
            match parse_hello(&hello) {
                Err(e) => {
                    let _ = write_frame(&mut stream, Kind::Refuse, format!("malformed Hello: {e}").as_bytes());
                }
                Ok((version, _, _, _)) if version != PROTOCOL_VERSION => {
                    fatal = Some(format!(
                        "a rank from {from} speaks rendezvous protocol {version}, rank 0 speaks {PROTOCOL_VERSION}: \
                         every rank must run the same nc build"
                    ));
                }
                Ok((_, rank, world, _)) if world != self.world_size => {
                    fatal = Some(format!(
                        "WORLD_SIZE differs between ranks: rank 0 has {}, rank {rank} (from {from}) has {world}",
                        self.world_size
                    ));
                }
                Ok((_, rank, _, _)) if rank == 0 || rank >= self.world_size => {
                    fatal = Some(format!(
                        "a process from {from} joined as rank {rank}, which is not in 1..{} (every rank needs a \
                         distinct RANK below WORLD_SIZE, and only one rank 0)",
                        self.world_size
                    ));
                }
                Ok((_, rank, _, _)) if arrived[rank].is_some() => {
                    fatal = Some(format!("two processes joined as rank {rank} (the second from {from})"));
                }
                Ok((_, rank, _, their_print)) => arrived[rank] = Some((stream, their_print)),
            }
        }
        let missing: Vec<usize> = (1..self.world_size).filter(|&r| arrived[r].is_none()).collect();
        let verdict = if let Some(f) = fatal {
            Some(f)
        } else if !missing.is_empty() {
            Some(format!(
                "rank(s) {missing:?} did not arrive at the rendezvous on {} within {:?} (check that every rank \
                 runs with MASTER_ADDR/MASTER_PORT pointing at rank 0 and the same WORLD_SIZE)",
                self.address, self.timeout
            ))
        } else {
            (1..self.world_size).find_map(|r| {
                let theirs = &arrived[r].as_ref().expect("every rank arrived").1;
                fingerprint_mismatch(fingerprint, theirs, r)
            })
        };
        let mut streams = Vec::new();
        for (rank, slot) in arrived.into_iter().enumerate() {
            let Some((mut stream, _)) = slot else { continue };
            let reply = match &verdict {
                Some(reason) => write_frame(&mut stream, Kind::Refuse, reason.as_bytes()),
                None => write_frame(&mut stream, Kind::Welcome, &[]),
            };
            if let Err(e) = reply {
                if verdict.is_none() {
                    return Err(self.error(format!(
                        "rank {rank} left during the rendezvous on {}: {e}",
                        self.address
                    )));
                }
            }
            streams.push((rank, stream));
        }
        match verdict {
            Some(reason) => Err(self.error(reason)),
            None => Ok(streams),
        }
    }

    /// Binds MASTER_ADDR:MASTER_PORT, retrying while the port is still held (a previous run's socket in
    /// TIME_WAIT, or a previous run still exiting). std sets SO_REUSEADDR on Unix listeners.
    fn bind(&self, deadline: Instant) -> Result<TcpListener, CommError> {
        let retry_until = Instant::now() + Duration::from_secs(5).min(self.timeout);
        loop {
            let attempt = self.resolve().and_then(|addrs| TcpListener::bind(&addrs[..]));
            match attempt {
                Ok(l) => return Ok(l),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < retry_until.min(deadline) => {
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(self.error(format!(
                        "cannot listen on {} (MASTER_ADDR:MASTER_PORT): {e}{}",
                        self.address,
                        if e.kind() == io::ErrorKind::AddrInUse {
                            "; another program or run holds the port: choose another MASTER_PORT"
                        } else {
                            ""
                        }
                    )))
                }
            }
        }
    }

    fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = self.address.to_socket_addrs()?.collect();
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the name resolves to no address",
            ));
        }
        Ok(addrs)
    }

    /// Ranks 1..n: connects to rank 0 (retrying until the timeout), says Hello, waits for the verdict.
    fn say_hello(&self, fingerprint: &[(String, String)]) -> Result<TcpStream, CommError> {
        let deadline = Instant::now() + self.timeout;
        let mut stream = loop {
            let last_error = match self.resolve() {
                Ok(addrs) => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    let per_try = remaining.clamp(Duration::from_millis(10), Duration::from_secs(2));
                    match addrs
                        .iter()
                        .map(|a| TcpStream::connect_timeout(a, per_try))
                        .find_map(|r| r.ok())
                    {
                        Some(s) => break s,
                        None => format!("nothing accepted a connection on {}", self.address),
                    }
                }
                Err(e) => format!("cannot resolve {}: {e}", self.address),
            };
            if Instant::now() >= deadline {
                return Err(self.error(format!(
                    "rank 0 did not come up at {} (MASTER_ADDR:MASTER_PORT) within {:?}: {last_error}",
                    self.address, self.timeout
                )));
            }
            thread::sleep(CONNECT_RETRY);
        };
        let mut hello = Encoder::default();
        hello
            .u32(PROTOCOL_VERSION)
            .u32(self.rank as u32)
            .u32(self.world_size as u32);
        hello.u32(fingerprint.len() as u32);
        for (k, v) in fingerprint {
            hello.str(k).str(v);
        }
        let reply = stream
            .set_nodelay(true)
            .and_then(|_| stream.set_read_timeout(Some(self.timeout + VERDICT_GRACE)))
            .and_then(|_| write_frame(&mut stream, Kind::Hello, &hello.0))
            .and_then(|_| read_frame(&mut stream));
        match reply {
            Ok(Frame {
                kind: Kind::Welcome, ..
            }) => Ok(stream),
            Ok(Frame {
                kind: Kind::Refuse,
                payload,
            }) => Err(self.error(format!(
                "the rendezvous on {} refused to start: {}",
                self.address,
                String::from_utf8_lossy(&payload)
            ))),
            Ok(other) => Err(self.error(format!(
                "rank 0 at {} answered the Hello with {:?}: is another program on that port?",
                self.address, other.kind
            ))),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                Err(self.error(format!(
                    "rank 0 at {} gave no verdict within {:?}",
                    self.address,
                    self.timeout + VERDICT_GRACE
                )))
            }
            Err(e) => Err(self.error(format!(
                "the connection to rank 0 at {} failed during the Hello: {e}",
                self.address
            ))),
        }
    }

    /// One reader thread per connection: delivers frames to the inbox, and records an unannounced end of
    /// the connection as that rank's death (rank 0 also tells everyone else).
    fn start_readers(&mut self, streams: Vec<(usize, TcpStream)>) -> Result<(), CommError> {
        let mut writers = Vec::new();
        let mut readers = Vec::new();
        for (peer, stream) in streams {
            let reader = stream
                .set_read_timeout(None)
                .and_then(|_| stream.set_write_timeout(Some(self.timeout)))
                .and_then(|_| stream.try_clone())
                .map_err(|e| self.error(format!("cannot set up the connection to rank {peer}: {e}")))?;
            let writer = Arc::new(Mutex::new(stream));
            let (tx, rx) = unbounded();
            self.links.push(Link {
                peer,
                writer: writer.clone(),
                inbox: rx,
            });
            writers.push((peer, writer));
            readers.push((peer, reader, tx));
        }
        for (peer, reader, tx) in readers {
            // Rank 0 forwards a death to every other rank.
            let others: Vec<(usize, Arc<Mutex<TcpStream>>)> = writers
                .iter()
                .filter(|(p, _)| *p != peer)
                .map(|(p, w)| (*p, w.clone()))
                .collect();
            let ctx = ReaderContext {
                me: self.rank,
                peer,
                address: self.address.clone(),
                watch: self.watch.clone(),
                closing: self.closing.clone(),
                others,
            };
            thread::Builder::new()
                .name(format!("nc-rdv-{peer}"))
                .spawn(move || ctx.run(reader, tx))
                .map_err(|e| self.error(format!("cannot start the rendezvous reader thread: {e}")))?;
        }
        Ok(())
    }

    fn send(&self, link: usize, kind: Kind, payload: &[u8]) -> Result<(), CommError> {
        let l = &self.links[link];
        let mut w = l.writer.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *w, kind, payload).map_err(|e| {
            let why = self.watch.check().err().map(|g| format!(" ({g})")).unwrap_or_default();
            self.error(format!("cannot send to rank {}: {e}{why}", l.peer))
        })
    }

    fn receive(&self, link: usize, want: Kind, deadline: Instant, op: &str) -> Result<Vec<u8>, CommError> {
        let l = &self.links[link];
        let wait = deadline.saturating_duration_since(Instant::now());
        match l.inbox.recv_timeout(wait) {
            Ok(Frame { kind, payload }) if kind == want => Ok(payload),
            Ok(Frame {
                kind: Kind::Refuse,
                payload,
            }) => Err(self.error(String::from_utf8_lossy(&payload).into())),
            Ok(Frame { kind, .. }) => Err(self.error(format!(
                "{op}: rank {} sent {kind:?} where {want:?} was expected: the ranks called different rendezvous \
                 operations",
                l.peer
            ))),
            Err(RecvTimeoutError::Timeout) => Err(self.error(format!(
                "{op}: rank {} did not answer within {:?} (rendezvous on {})",
                l.peer, self.timeout, self.address
            ))),
            Err(RecvTimeoutError::Disconnected) => {
                let why = self
                    .watch
                    .check()
                    .err()
                    .map(|g| g.to_string())
                    .unwrap_or_else(|| "it closed".into());
                Err(self.error(format!("{op}: the connection to rank {} ended: {why}", l.peer)))
            }
        }
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Release);
        for l in &self.links {
            let mut w = l.writer.lock().unwrap_or_else(|e| e.into_inner());
            let _ = write_frame(&mut *w, Kind::Bye, &[]);
            let _ = w.shutdown(Shutdown::Write);
        }
    }
}

struct ReaderContext {
    me: usize,
    peer: usize,
    address: String,
    watch: PeerWatch,
    closing: Arc<AtomicBool>,
    others: Vec<(usize, Arc<Mutex<TcpStream>>)>,
}

impl ReaderContext {
    fn run(self, mut stream: TcpStream, inbox: Sender<Frame>) {
        let mut said_bye = false;
        let end = loop {
            match read_frame(&mut stream) {
                Ok(Frame { kind: Kind::Bye, .. }) => said_bye = true,
                Ok(Frame {
                    kind: Kind::PeerGone,
                    payload,
                }) => {
                    self.watch.mark(String::from_utf8_lossy(&payload).into_owned());
                }
                Ok(frame) => {
                    let _ = inbox.send(frame);
                }
                Err(e) => break e,
            }
        };
        if said_bye || self.closing.load(Ordering::Acquire) {
            return;
        }
        let message = if self.peer == 0 {
            format!(
                "rank 0 is gone: its rendezvous connection ({}) closed without a goodbye ({end}): the process died \
                 or was killed",
                self.address
            )
        } else {
            format!(
                "rank {} is gone: its connection to rank 0 closed without a goodbye ({end}): the process died or \
                 was killed",
                self.peer
            )
        };
        self.watch.mark(message.clone());
        if self.me == 0 {
            for (_, w) in &self.others {
                let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
                let _ = write_frame(&mut *w, Kind::PeerGone, message.as_bytes());
            }
        }
    }
}

/// A rank's connection and fingerprint, held by rank 0 until everyone arrived.
type Arrival = (TcpStream, Vec<(String, String)>);

type Hello = (u32, usize, usize, Vec<(String, String)>);

fn parse_hello(payload: &[u8]) -> io::Result<Hello> {
    let mut d = Decoder(payload);
    let version = d.u32()?;
    let rank = d.u32()? as usize;
    let world = d.u32()? as usize;
    let count = d.u32()? as usize;
    let mut print = Vec::new();
    for _ in 0..count {
        print.push((d.string()?, d.string()?));
    }
    Ok((version, rank, world, print))
}

/// The first flag whose value differs between rank 0 and `rank` (a flag one side lacks counts as absent).
fn fingerprint_mismatch(ours: &[(String, String)], theirs: &[(String, String)], rank: usize) -> Option<String> {
    let value = |list: &[(String, String)], key: &str| list.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let keys = ours.iter().chain(theirs).map(|(k, _)| k.as_str());
    for key in keys {
        let (a, b) = (value(ours, key), value(theirs, key));
        if a != b {
            let show = |v: Option<String>| v.map(|v| format!("{v:?}")).unwrap_or_else(|| "nothing (absent)".into());
            return Some(format!(
                "{key} differs between ranks: rank 0 has {}, rank {rank} has {}; every rank must run with the same \
                 flags and data",
                show(a),
                show(b)
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn config(rank: usize, world_size: usize, port: u16) -> RendezvousConfig {
        RendezvousConfig {
            rank,
            world_size,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            timeout: Duration::from_secs(10),
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// Runs `f` on every rank of a rendezvous of `n` threads, results in rank order.
    fn on_ranks<T: Send + 'static>(
        n: usize,
        f: impl Fn(Result<Rendezvous, CommError>) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let port = free_port();
        let handles: Vec<_> = (0..n)
            .map(|r| {
                let f = f.clone();
                thread::spawn(move || f(Rendezvous::join(&config(r, n, port), &pairs(&[("k", "v")]))))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_gather_broadcast_and_barrier_between_threads() {
        let results = on_ranks(3, |rdv| {
            let mut rdv = rdv.unwrap();
            let me = rdv.rank();
            let all = rdv.all_gather_bytes(&vec![me as u8; me + 1]).unwrap();
            let root = rdv.broadcast_bytes(format!("from {me}").as_bytes()).unwrap();
            rdv.barrier().unwrap();
            rdv.check_peers().unwrap();
            (all, root)
        });
        for (all, root) in results {
            assert_eq!(all, vec![vec![0u8], vec![1, 1], vec![2, 2, 2]]);
            assert_eq!(root, b"from 0");
        }
    }

    #[test]
    fn different_operations_on_different_ranks_are_an_error_not_a_hang() {
        let results = on_ranks(2, |rdv| {
            let mut rdv = rdv.unwrap();
            if rdv.rank() == 0 {
                rdv.broadcast_bytes(b"x").map(|_| ())
            } else {
                rdv.all_gather_bytes(b"y").map(|_| ())
            }
        });
        let e = results[1].clone().unwrap_err();
        assert!(
            e.reason.contains("Broadcast") && e.reason.contains("different rendezvous operations"),
            "{e}"
        );
    }

    #[test]
    fn a_rank_outside_the_world_is_refused_before_connecting() {
        let e = Rendezvous::join(&config(3, 3, free_port()), &[]).err().unwrap();
        assert!(e.reason.contains("RANK must be below WORLD_SIZE"), "{e}");
    }

    #[test]
    fn a_clean_exit_is_not_reported_as_a_death() {
        let results = on_ranks(2, |rdv| {
            let mut rdv = rdv.unwrap();
            rdv.barrier().unwrap();
            if rdv.rank() == 1 {
                drop(rdv); // says Bye
                return Ok(());
            }
            thread::sleep(Duration::from_millis(300));
            rdv.check_peers()
        });
        assert!(results[0].is_ok(), "{:?}", results[0]);
    }

    #[test]
    fn a_connection_closed_without_bye_is_reported_as_that_ranks_death() {
        let port = free_port();
        let rank0 = thread::spawn(move || {
            let rdv = Rendezvous::join(&config(0, 2, port), &[]).unwrap();
            let start = Instant::now();
            while rdv.check_peers().is_ok() && start.elapsed() < Duration::from_secs(5) {
                thread::sleep(Duration::from_millis(5));
            }
            rdv.check_peers()
        });
        // A rank 1 by hand, which vanishes without the goodbye a dropped Rendezvous sends.
        let mut s = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut hello = Encoder::default();
        hello.u32(PROTOCOL_VERSION).u32(1).u32(2).u32(0);
        write_frame(&mut s, Kind::Hello, &hello.0).unwrap();
        assert_eq!(read_frame(&mut s).unwrap().kind, Kind::Welcome);
        drop(s);
        let e = rank0.join().unwrap().unwrap_err();
        assert!(e.reason.contains("rank 1 is gone"), "{e}");
    }

    #[test]
    fn fingerprint_mismatch_names_the_flag_and_both_values() {
        let a = pairs(&[("--depth", "12"), ("data", "abc")]);
        assert_eq!(fingerprint_mismatch(&a, &a, 1), None);
        let b = pairs(&[("--depth", "16"), ("data", "abc")]);
        let msg = fingerprint_mismatch(&a, &b, 3).unwrap();
        assert!(msg.contains("--depth") && msg.contains("\"12\"") && msg.contains("\"16\"") && msg.contains("rank 3"));
        let c = pairs(&[("--depth", "12")]);
        let msg = fingerprint_mismatch(&a, &c, 2).unwrap();
        assert!(msg.contains("data") && msg.contains("absent"), "{msg}");
    }
}
