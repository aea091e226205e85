//! Checkpoint integrity: every file of a checkpoint is recorded with its length and an xxh64 checksum, so a
//! byte changed on disk is refused at load, naming the file, instead of being read as weights.
//!
//! Where each sum lives (a file cannot hold its own checksum):
//! - `model.safetensors` and every `optim_rank{r}.safetensors`: in meta.json's `files` table. Each rank hashes
//!   the file it wrote (reading it back, so what is checked is what the disk holds) into a small sidecar
//!   `<file>.xxh64`; rank 0 folds the sidecars into meta.json before the marker and removes them.
//! - `meta.json`: in the `COMPLETE` marker, written after it.
//! - `COMPLETE`: its last line is the xxh64 of the lines before it.
//!
//! xxh64 (the `twox-hash` crate, already a dependency of parquet): fast (several GB/s on one core, so a save
//! or a resume spends on it a fraction of what reading the files costs) and not cryptographic, which it need
//! not be: it guards against corruption, not against an attacker. Checkpoints written before the sums existed
//! (a `COMPLETE` holding only the step) load with a note.

use crate::bail;
use crate::error::{NcError, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::hash::Hasher;
use std::io::Read;
use std::path::Path;
use twox_hash::XxHash64;

/// Length and checksum of one file, as meta.json and `COMPLETE` record them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    pub len: u64,
    /// xxh64 (seed 0) of the file's bytes, 16 lowercase hex digits.
    pub xxh64: String,
}

impl FileSum {
    pub fn of_bytes(bytes: &[u8]) -> FileSum {
        FileSum {
            len: bytes.len() as u64,
            xxh64: format!("{:016x}", XxHash64::oneshot(0, bytes)),
        }
    }

    /// Hash a file in pieces (a model's file may be larger than the memory left).
    pub fn of_file(path: &Path) -> Result<FileSum> {
        let io = |e: std::io::Error| NcError::new(format!("{}: {e}", path.display()));
        let mut f = fs::File::open(path).map_err(io)?;
        let mut hasher = XxHash64::with_seed(0);
        let mut buf = vec![0u8; 1 << 22];
        let mut len = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.write(&buf[..n]);
            len += n as u64;
        }
        Ok(FileSum {
            len,
            xxh64: format!("{:016x}", hasher.finish()),
        })
    }

    /// Err naming `path` when `found` is not what was recorded.
    pub fn check(&self, path: &Path, found: &FileSum) -> Result<()> {
        if found == self {
            return Ok(());
        }
        bail!(
            "{}: {} bytes with checksum xxh64 {}, but the checkpoint recorded {} bytes with xxh64 {}; the file is \
             corrupt: resume from another checkpoint (--resume alone takes the newest that verifies, --resume \
             PATH a given one) or delete this one",
            path.display(),
            found.len,
            found.xxh64,
            self.len,
            self.xxh64
        )
    }
}

/// The sidecar a rank writes next to a file it saved: its sum, for rank 0 to fold into meta.json.
pub fn sidecar_name(file: &str) -> String {
    format!("{file}.xxh64")
}

/// Hash `dir/file` as it lies on disk and write the sidecar (synced). Returns the sum.
pub fn write_sidecar(dir: &Path, file: &str) -> Result<FileSum> {
    let sum = FileSum::of_file(&dir.join(file))?;
    let path = dir.join(sidecar_name(file));
    let text = format!("{} {}\n", sum.len, sum.xxh64);
    write_synced(&path, text.as_bytes())?;
    Ok(sum)
}

/// Read the sidecar of `dir/file`.
pub fn read_sidecar(dir: &Path, file: &str) -> Result<FileSum> {
    let path = dir.join(sidecar_name(file));
    let text = fs::read_to_string(&path).map_err(|e| NcError::new(format!("{}: {e}", path.display())))?;
    let bad = || NcError::new(format!("{}: not '<length> <xxh64>'", path.display()));
    let (len, hex) = text.trim_end_matches('\n').split_once(' ').ok_or_else(bad)?;
    let sum = FileSum {
        len: len.parse().map_err(|_| bad())?,
        xxh64: hex.to_string(),
    };
    if !is_hex16(&sum.xxh64) {
        return Err(bad());
    }
    Ok(sum)
}

fn is_hex16(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |e: std::io::Error| NcError::new(format!("{}: {e}", path.display()));
    let mut f = fs::File::create(path).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

/// What a `COMPLETE` marker says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// Written with sums: the step and meta.json's sum.
    Summed { step: u64, meta: FileSum },
    /// Written before the sums existed: the step only (or nothing readable beyond it).
    Unsummed,
}

/// The marker's text: `step N`, `meta.json <len> <xxh64>`, then `check <xxh64 of the lines before>`.
pub fn marker_text(step: u64, meta: &FileSum) -> String {
    let body = format!("step {step}\nmeta.json {} {}\n", meta.len, meta.xxh64);
    let check = FileSum::of_bytes(body.as_bytes()).xxh64;
    format!("{body}check {check}\n")
}

/// Parse a `COMPLETE` marker (its own path, for messages). A marker of the old form (a step number alone) is
/// `Unsummed`; anything else that is not exactly what `marker_text` writes is corrupt.
pub fn parse_marker(path: &Path, bytes: &[u8]) -> Result<Marker> {
    let corrupt = || {
        NcError::new(format!(
            "{}: the checkpoint's marker is corrupt (it does not check out against itself); resume from another \
             checkpoint (--resume alone takes the newest that verifies, --resume PATH a given one) or delete this \
             one",
            path.display()
        ))
    };
    let text = std::str::from_utf8(bytes).map_err(|_| corrupt())?;
    // the old marker: the step and a newline
    if text
        .strip_suffix('\n')
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    {
        return Ok(Marker::Unsummed);
    }
    let parse = || -> Option<(u64, FileSum)> {
        let mut lines = text.strip_suffix('\n')?.split('\n');
        let step = lines.next()?.strip_prefix("step ")?.parse().ok()?;
        let mut meta = lines.next()?.strip_prefix("meta.json ")?.split(' ');
        let len = meta.next()?.parse().ok()?;
        let xxh64 = meta.next()?.to_string();
        if meta.next().is_some() || !is_hex16(&xxh64) {
            return None;
        }
        Some((step, FileSum { len, xxh64 }))
    };
    let (step, meta) = parse().ok_or_else(corrupt)?;
    // byte for byte what was written, its check line included
    if marker_text(step, &meta).as_bytes() != bytes {
        return Err(corrupt());
    }
    Ok(Marker::Summed { step, meta })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_of_bytes_and_files_agree_and_see_one_bit() {
        let dir = tempfile::tempdir().unwrap();
        // larger than one read buffer, so the file is hashed in pieces
        let bytes: Vec<u8> = (0..(5u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let p = dir.path().join("f");
        fs::write(&p, &bytes).unwrap();
        let whole = FileSum::of_bytes(&bytes);
        assert_eq!(FileSum::of_file(&p).unwrap(), whole);
        // xxh64's published value of the empty input (seed 0)
        assert_eq!(FileSum::of_bytes(b"").xxh64, "ef46db3751d8e999");
        let mut flipped = bytes.clone();
        flipped[3 << 20] ^= 1;
        let e = whole.check(&p, &FileSum::of_bytes(&flipped)).unwrap_err();
        assert!(
            e.message.contains(&p.display().to_string()) && !e.message.contains('\n'),
            "{e}"
        );
    }

    #[test]
    fn a_marker_parses_back_and_any_changed_byte_is_refused() {
        let sum = FileSum::of_bytes(b"{\"step\": 7}");
        let text = marker_text(7, &sum);
        let p = Path::new("ck/COMPLETE");
        assert_eq!(
            parse_marker(p, text.as_bytes()).unwrap(),
            Marker::Summed { step: 7, meta: sum }
        );
        assert_eq!(parse_marker(p, b"7\n").unwrap(), Marker::Unsummed);
        for i in 0..text.len() {
            for bit in [0x01u8, 0x20, 0x80] {
                let mut b = text.clone().into_bytes();
                b[i] ^= bit;
                let got = parse_marker(p, &b);
                assert!(
                    got.is_err(),
                    "byte {i} bit {bit:#x}: a changed marker parsed as {got:?}"
                );
            }
        }
    }
}
