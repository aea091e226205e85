//! The tokenizer directory: reading and writing it, and tiktoken's ranks format.
//!
//! A tokenizer directory holds
//! - `tokenizer.tiktoken`: the mergeable tokens, one `base64(bytes) rank` line each, ranks 0, 1, 2, ... in
//!   order (the format of tiktoken's `load_tiktoken_bpe`, so the file is also an export to tiktoken);
//! - `tokenizer.json`: `{"format": "nc-tokenizer", "version": 1, "pattern": ..., "special_tokens": [[text, id], ...]}`;
//! - `token_bytes.json`: the byte length of every token id (0 for special tokens), for bits per byte;
//!   checked against the ranks on load.
//!
//! A directory holding only nanochat's `tokenizer.pkl` is read through the pickle importer.

use std::fs;
use std::path::Path;

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::pickle::load_tiktoken_pickle;
use super::pretokenize::SplitPattern;
use super::tokenizer::Tokenizer;
use crate::bail;
use crate::error::{NcError, Result};

pub const RANKS_FILE: &str = "tokenizer.tiktoken";
pub const META_FILE: &str = "tokenizer.json";
pub const TOKEN_BYTES_FILE: &str = "token_bytes.json";
pub const PICKLE_FILE: &str = "tokenizer.pkl";

#[derive(Serialize, Deserialize)]
struct TokenizerMeta {
    format: String,
    version: u32,
    pattern: String,
    special_tokens: Vec<(String, u32)>,
}

/// Parse tiktoken's ranks text: one `base64 rank` per line; ranks must be exactly 0..n in order.
pub fn parse_tiktoken_ranks(text: &str) -> Result<Vec<Vec<u8>>> {
    let mut ranks = Vec::new();
    for (lineno, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split(' ');
        let (Some(b64), Some(rank), None) = (fields.next(), fields.next(), fields.next()) else {
            bail!(
                "line {}: expected `base64 rank`, found {:?}",
                lineno + 1,
                truncate(line)
            );
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| NcError::new(format!("line {}: bad base64 {:?}: {e}", lineno + 1, truncate(b64))))?;
        let rank: usize = rank
            .parse()
            .map_err(|_| NcError::new(format!("line {}: bad rank {:?}", lineno + 1, truncate(rank))))?;
        if rank != ranks.len() {
            bail!(
                "line {}: rank {rank} out of order; ranks must be 0, 1, 2, ... in order (expected {})",
                lineno + 1,
                ranks.len()
            );
        }
        ranks.push(bytes);
    }
    Ok(ranks)
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// tiktoken's ranks text for the mergeable tokens of `tok`.
pub fn format_tiktoken_ranks(tok: &Tokenizer) -> String {
    let mut out = String::new();
    for (rank, bytes) in tok.ranks().iter().enumerate() {
        out.push_str(&base64::engine::general_purpose::STANDARD.encode(bytes));
        out.push(' ');
        out.push_str(&rank.to_string());
        out.push('\n');
    }
    out
}

/// Write a file under a temporary name in the same directory, then rename it into place.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| NcError::new(format!("{} is not a file path", path.display())))?;
    let tmp = path.with_file_name(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    fs::write(&tmp, contents).map_err(|e| NcError::from(e).context(tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| NcError::from(e).context(path.display()))
}

/// Save `tok` as a tokenizer directory (created if missing).
pub fn save_tokenizer(tok: &Tokenizer, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| NcError::from(e).context(dir.display()))?;
    write_atomic(&dir.join(RANKS_FILE), format_tiktoken_ranks(tok).as_bytes())?;
    let meta = TokenizerMeta {
        format: "nc-tokenizer".into(),
        version: 1,
        pattern: tok.pattern().as_str().into(),
        special_tokens: tok.specials().to_vec(),
    };
    let json = serde_json::to_string_pretty(&meta).expect("plain data serializes");
    write_atomic(&dir.join(META_FILE), json.as_bytes())?;
    let bytes = serde_json::to_string(tok.token_bytes()).expect("plain data serializes");
    write_atomic(&dir.join(TOKEN_BYTES_FILE), bytes.as_bytes())
}

/// Load a tokenizer directory written by `save_tokenizer`, or one with nanochat's `tokenizer.pkl`.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let meta_path = dir.join(META_FILE);
    if !meta_path.exists() {
        let pkl = dir.join(PICKLE_FILE);
        if pkl.exists() {
            let data = fs::read(&pkl).map_err(|e| NcError::from(e).context(pkl.display()))?;
            return load_tiktoken_pickle(&data).map_err(|e| e.context(pkl.display()));
        }
        bail!(
            "{}: no {META_FILE} (nor nanochat's {PICKLE_FILE}); make a tokenizer with `nc-data train-tokenizer` \
             or `nc-data synth`",
            dir.display()
        );
    }
    let read = |name: &str| -> Result<String> {
        let p = dir.join(name);
        fs::read_to_string(&p).map_err(|e| NcError::from(e).context(p.display()))
    };
    let meta = read(META_FILE)?;
    let ranks = read(RANKS_FILE)?;
    let token_bytes = if dir.join(TOKEN_BYTES_FILE).exists() {
        Some(read(TOKEN_BYTES_FILE)?)
    } else {
        None
    };
    tokenizer_from_texts(&meta, &ranks, token_bytes.as_deref()).map_err(|e| e.context(dir.display()))
}

/// Build a tokenizer from the contents of a directory's three files (`token_bytes` is optional).
pub fn tokenizer_from_texts(meta: &str, ranks: &str, token_bytes: Option<&str>) -> Result<Tokenizer> {
    let meta: TokenizerMeta = serde_json::from_str(meta)
        .map_err(|e| NcError::new(format!("{META_FILE}: not a tokenizer description: {e}")))?;
    if meta.format != "nc-tokenizer" || meta.version != 1 {
        bail!(
            "{META_FILE}: format {:?} version {} is not nc-tokenizer version 1",
            meta.format,
            meta.version
        );
    }
    let pattern = SplitPattern::from_pattern(&meta.pattern).map_err(|e| e.context(META_FILE))?;
    let ranks = parse_tiktoken_ranks(ranks).map_err(|e| e.context(RANKS_FILE))?;
    let tok = Tokenizer::from_ranks(ranks, meta.special_tokens, pattern)?;
    if let Some(text) = token_bytes {
        let stored: Vec<u32> = serde_json::from_str(text)
            .map_err(|e| NcError::new(format!("{TOKEN_BYTES_FILE}: not a list of byte lengths: {e}")))?;
        if stored != tok.token_bytes() {
            bail!(
                "{TOKEN_BYTES_FILE}: the byte lengths do not match {RANKS_FILE} and the special tokens; the \
                 directory is inconsistent, rewrite it with `nc-data`"
            );
        }
    }
    Ok(tok)
}
