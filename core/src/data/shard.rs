//! Token shards in llm.c's layout (SPEC.md section 6), read through mmap.
//!
//! Header: 256 little-endian int32: `[0]` magic, `[1]` version, `[2]` token count, the rest zero.
//! Body: the tokens, little-endian. Magic 20240520 / version 1 holds uint16 tokens (vocabularies up to
//! 65536); magic 20240801 / version 7 holds uint32 tokens.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::bail;
use crate::error::{NcError, Result};

pub const HEADER_INTS: usize = 256;
pub const HEADER_BYTES: usize = HEADER_INTS * 4;
pub const MAGIC_U16: i32 = 20240520;
pub const VERSION_U16: i32 = 1;
pub const MAGIC_U32: i32 = 20240801;
pub const VERSION_U32: i32 = 7;

/// The token width a vocabulary needs: 2 bytes up to 65536 ids, else 4.
pub fn token_width_for_vocab(vocab_size: usize) -> usize {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// Check a shard header; returns (token width in bytes, token count). `file_len` is the whole file's size.
pub fn parse_header(header: &[u8], file_len: u64) -> std::result::Result<(usize, usize), String> {
    if header.len() < HEADER_BYTES || file_len < HEADER_BYTES as u64 {
        return Err(format!(
            "the file has {file_len} bytes, less than the {HEADER_BYTES}-byte header: it is truncated or not a token shard"
        ));
    }
    let int = |i: usize| i32::from_le_bytes(header[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    let (magic, version, count) = (int(0), int(1), int(2));
    let width = match (magic, version) {
        (MAGIC_U16, VERSION_U16) => 2,
        (MAGIC_U32, VERSION_U32) => 4,
        (MAGIC_U16, v) | (MAGIC_U32, v) => {
            return Err(format!("version {v} does not go with magic {magic} (expected 20240520/1 or 20240801/7)"))
        }
        _ => {
            return Err(format!(
                "bad magic {magic}: not an llm.c token shard (expected {MAGIC_U16} for uint16 tokens or {MAGIC_U32} for uint32)"
            ))
        }
    };
    if count < 0 {
        return Err(format!("negative token count {count} in the header"));
    }
    let expected = HEADER_BYTES as u64 + count as u64 * width as u64;
    if file_len != expected {
        return Err(format!(
            "the header says {count} tokens of {width} bytes ({expected} bytes with the header) but the file has \
             {file_len} bytes: it is truncated or was not written completely"
        ));
    }
    if count == 0 {
        return Err("the shard holds no tokens".into());
    }
    Ok((width, count as usize))
}

/// A memory-mapped token shard.
pub struct Shard {
    path: PathBuf,
    map: Mmap,
    width: usize,
    len: usize,
}

impl Shard {
    /// Open and check a shard; with `vocab_size`, every token id is checked to be below it.
    pub fn open(path: &Path, vocab_size: Option<usize>) -> Result<Shard> {
        let fail = |what: String| NcError::new(format!("token shard {}: {what}", path.display()));
        let file = File::open(path).map_err(|e| fail(format!("cannot open: {e}")))?;
        let file_len = file.metadata().map_err(|e| fail(format!("cannot stat: {e}")))?.len();
        if file_len < HEADER_BYTES as u64 {
            return Err(fail(parse_header(&[], file_len).unwrap_err()));
        }
        // SAFETY: the file is opened read-only; shards are written once under a temporary name and renamed,
        // so a shard in use is never modified in place.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| fail(format!("cannot mmap: {e}")))?;
        let (width, len) = parse_header(&map[..HEADER_BYTES], file_len).map_err(fail)?;
        let shard = Shard {
            path: path.to_path_buf(),
            map,
            width,
            len,
        };
        if let Some(vocab) = vocab_size {
            if let Some((i, id)) = shard.find_token_at_least(vocab as u64) {
                return Err(fail(format!(
                    "token {i} is {id}, outside the tokenizer's vocabulary of {vocab}; the shard was made with \
                     another tokenizer"
                )));
            }
        }
        Ok(shard)
    }

    /// The first token >= `limit`, if any. Free when the token width cannot hold such a value (uint16
    /// tokens against nanochat's 65536 vocabulary); otherwise a vectorizable max over chunks, then a search
    /// inside the first chunk that fails.
    fn find_token_at_least(&self, limit: u64) -> Option<(usize, u64)> {
        let max_representable = if self.width == 2 {
            u16::MAX as u64
        } else {
            u32::MAX as u64
        };
        if limit > max_representable {
            return None;
        }
        const CHUNK: usize = 1 << 16;
        (0..self.len).step_by(CHUNK).find_map(|start| {
            let n = CHUNK.min(self.len - start);
            let body = &self.map[HEADER_BYTES + start * self.width..HEADER_BYTES + (start + n) * self.width];
            let max = if self.width == 2 {
                body.chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as u64)
                    .fold(0, u64::max)
            } else {
                body.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u64)
                    .fold(0, u64::max)
            };
            if max < limit {
                return None;
            }
            (start..start + n)
                .map(|i| (i, self.token(i) as u64))
                .find(|&(_, t)| t >= limit)
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes per token (2 or 4).
    pub fn token_width(&self) -> usize {
        self.width
    }

    pub fn token(&self, i: usize) -> u32 {
        let at = HEADER_BYTES + i * self.width;
        let b = &self.map[at..at + self.width];
        if self.width == 2 {
            u16::from_le_bytes([b[0], b[1]]) as u32
        } else {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
    }

    /// Append tokens `start..start + n` to `out`. Panics if the range is outside the shard (callers check).
    pub fn read_into(&self, start: usize, n: usize, out: &mut Vec<u32>) {
        assert!(
            start + n <= self.len,
            "read {start}..{} past the end of a {}-token shard",
            start + n,
            self.len
        );
        let body = &self.map[HEADER_BYTES + start * self.width..HEADER_BYTES + (start + n) * self.width];
        if self.width == 2 {
            out.extend(body.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32));
        } else {
            out.extend(
                body.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
    }
}

/// The bytes of a shard holding `tokens` with the given token width (2 or 4).
pub fn encode_shard(tokens: &[u32], width: usize) -> Result<Vec<u8>> {
    if tokens.is_empty() {
        bail!("refusing to write an empty shard");
    }
    if tokens.len() > i32::MAX as usize {
        bail!(
            "{} tokens do not fit in one shard (the header count is an int32)",
            tokens.len()
        );
    }
    let (magic, version) = match width {
        2 => (MAGIC_U16, VERSION_U16),
        4 => (MAGIC_U32, VERSION_U32),
        _ => bail!("token width {width} is not 2 or 4"),
    };
    let mut out = Vec::with_capacity(HEADER_BYTES + tokens.len() * width);
    let mut header = [0i32; HEADER_INTS];
    header[0] = magic;
    header[1] = version;
    header[2] = tokens.len() as i32;
    for h in header {
        out.extend_from_slice(&h.to_le_bytes());
    }
    if width == 2 {
        for (i, &t) in tokens.iter().enumerate() {
            let Ok(t) = u16::try_from(t) else {
                bail!("token {i} is {t}, too large for a uint16 shard")
            };
            out.extend_from_slice(&t.to_le_bytes());
        }
    } else {
        for &t in tokens {
            out.extend_from_slice(&t.to_le_bytes());
        }
    }
    Ok(out)
}

/// Write a shard: to a temporary name in the same directory, flushed to disk, then renamed into place, so
/// a killed writer never leaves a partial shard under the real name.
pub fn write_shard(path: &Path, tokens: &[u32], vocab_size: usize) -> Result<()> {
    let bytes = encode_shard(tokens, token_width_for_vocab(vocab_size)).map_err(|e| e.context(path.display()))?;
    let name = path
        .file_name()
        .ok_or_else(|| NcError::new(format!("{} is not a file path", path.display())))?;
    let tmp = path.with_file_name(format!(".{}.partial{}", name.to_string_lossy(), std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()
    };
    write().map_err(|e| NcError::new(format!("writing {}: {e}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(|e| NcError::new(format!("renaming {} to {}: {e}", tmp.display(), path.display())))
}

/// The shard files of one split in a directory: `{prefix}_*.bin`, sorted by name.
pub fn list_shards(dir: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    let entries =
        fs::read_dir(dir).map_err(|e| NcError::new(format!("cannot list shard directory {}: {e}", dir.display())))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with(&format!("{prefix}_")) && name.ends_with(".bin") {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}
