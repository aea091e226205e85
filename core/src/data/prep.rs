//! Data preparation: reading documents from files, and turning them into token shards.
//!
//! Inputs: `.parquet` (nanochat's FineWeb-Edu shards: a string column `text`), `.jsonl` (one JSON object
//! per line with a string field `text`), `.txt` (documents split as `TxtDocs` says: at blank lines by default).
//! Folders given as inputs are expanded by `inputs::expand_inputs`. Token shards are written as a whole set
//! (`shard_set`): into a temporary folder, swapped in when complete. The binary `nc-data` drives these with
//! progress bars; everything here reports progress through a callback instead.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::column::reader::ColumnReader;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use super::shard::write_shard;
use super::shard_set::{tokenizer_fingerprint, NewShardSet, SetIdentity, ShardManifest};
use super::tokenizer::Tokenizer;
use super::txt_docs::{split_text, TxtDocs};
use crate::bail;
use crate::error::{NcError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    Parquet,
    Jsonl,
    Txt,
}

impl InputKind {
    pub fn of(path: &Path) -> Result<InputKind> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("parquet") => Ok(InputKind::Parquet),
            Some("jsonl") => Ok(InputKind::Jsonl),
            Some("txt") => Ok(InputKind::Txt),
            _ => bail!(
                "{}: unknown input type; use .parquet (a `text` column), .jsonl (a `text` field) or .txt",
                path.display()
            ),
        }
    }
}

/// All documents of one input file, in order (`txt` says how a `.txt` file is cut into documents). A file
/// with no text in it (no document holds a character) is an error: it is a mistake, not a dataset.
pub fn read_documents(path: &Path, txt: TxtDocs) -> Result<Vec<String>> {
    let kind = InputKind::of(path)?;
    let r = match kind {
        InputKind::Parquet => read_parquet_texts(path),
        InputKind::Jsonl => read_jsonl_texts(path),
        InputKind::Txt => read_txt(path, txt),
    };
    let docs = r.map_err(|e| e.context(path.display()))?;
    if docs.iter().all(|d| d.is_empty()) {
        bail!(
            "{}: no text in it ({} documents, 0 characters); remove it from --input",
            path.display(),
            docs.len()
        );
    }
    Ok(docs)
}

fn read_txt(path: &Path, txt: TxtDocs) -> Result<Vec<String>> {
    let bytes = std::fs::read(path)?;
    match String::from_utf8(bytes) {
        Ok(s) => Ok(split_text(&s, txt)),
        Err(e) => bail!(
            "not UTF-8 text (first bad byte at offset {})",
            e.utf8_error().valid_up_to()
        ),
    }
}

fn read_jsonl_texts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| NcError::new(format!("cannot read as UTF-8 text: {e}")))?;
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| NcError::new(format!("line {}: not JSON: {e}", i + 1)))?;
        match v.get("text").and_then(|t| t.as_str()) {
            Some(t) => docs.push(t.to_string()),
            None => bail!("line {}: no string field \"text\"", i + 1),
        }
    }
    Ok(docs)
}

fn pq(e: parquet::errors::ParquetError) -> NcError {
    NcError::new(format!("parquet: {e}"))
}

/// The `text` column of a parquet file, all row groups in order (null entries are skipped).
pub fn read_parquet_texts(path: &Path) -> Result<Vec<String>> {
    let file = File::open(path)?;
    let reader = SerializedFileReader::new(file).map_err(pq)?;
    let schema = reader.metadata().file_metadata().schema_descr();
    let Some(col) = (0..schema.num_columns()).find(|&i| schema.column(i).path().string() == "text") else {
        bail!("no column named `text`; nanochat's shards have one string column `text`");
    };
    let mut docs = Vec::new();
    for rg in 0..reader.num_row_groups() {
        let group = reader.get_row_group(rg).map_err(pq)?;
        let ColumnReader::ByteArrayColumnReader(mut column) = group.get_column_reader(col).map_err(pq)? else {
            bail!("column `text` is not a string (byte array) column");
        };
        let mut values: Vec<ByteArray> = Vec::new();
        let mut defs: Vec<i16> = Vec::new();
        loop {
            values.clear();
            defs.clear();
            let (records, _, _) = column
                .read_records(1024, Some(&mut defs), None, &mut values)
                .map_err(pq)?;
            if records == 0 {
                break;
            }
            for v in &values {
                match std::str::from_utf8(v.data()) {
                    Ok(s) => docs.push(s.to_string()),
                    Err(_) => bail!("row group {rg}: a `text` value is not UTF-8"),
                }
            }
        }
    }
    Ok(docs)
}

/// Write documents as nanochat's shards are laid out: one optional string column `text`, row groups of
/// `row_group_docs` documents, zstd compression. Used by the tests and to make sample inputs.
pub fn write_parquet_texts(path: &Path, docs: &[String], row_group_docs: usize) -> Result<()> {
    let schema = Arc::new(parse_message_type("message schema { OPTIONAL BYTE_ARRAY text (STRING); }").map_err(pq)?);
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::ZSTD(Default::default()))
            .build(),
    );
    let file = File::create(path)?;
    let mut writer = SerializedFileWriter::new(file, schema, props).map_err(pq)?;
    for group in docs.chunks(row_group_docs.max(1)) {
        let mut rg = writer.next_row_group().map_err(pq)?;
        while let Some(mut col) = rg.next_column().map_err(pq)? {
            let values: Vec<ByteArray> = group.iter().map(|d| ByteArray::from(d.as_str())).collect();
            let defs = vec![1i16; group.len()];
            col.typed::<ByteArrayType>()
                .write_batch(&values, Some(&defs), None)
                .map_err(pq)?;
            col.close().map_err(pq)?;
        }
        rg.close().map_err(pq)?;
    }
    writer.close().map_err(pq)?;
    Ok(())
}

/// Cut a document to its first `cap` characters (Python's `doc[:cap]`, as nanochat's tokenizer training).
pub fn cap_chars(doc: &str, cap: usize) -> &str {
    match doc.char_indices().nth(cap) {
        Some((i, _)) => &doc[..i],
        None => doc,
    }
}

/// The tokenizer's training text and what reading it left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrainingText {
    /// The documents read, each cut to the cap.
    pub docs: Vec<String>,
    /// Characters kept (after the cap).
    pub chars: usize,
    /// Documents longer than the cap, and the characters the cap cut from them.
    pub docs_cut: usize,
    pub chars_cut: usize,
    /// Whether reading stopped at `max_chars` before the end of the inputs.
    pub stopped_at_max_chars: bool,
}

/// Training text for the tokenizer, as nanochat's tok_train reads it: documents from `inputs` in order,
/// each cut to `doc_cap` characters, stopping after the document that takes the total past `max_chars`.
/// `progress` gets the number of input files done. Inputs with no characters at all are an error.
pub fn tokenizer_training_docs(
    inputs: &[PathBuf],
    txt: TxtDocs,
    max_chars: usize,
    doc_cap: usize,
    progress: &dyn Fn(usize),
) -> Result<TrainingText> {
    let mut t = TrainingText::default();
    'files: for (i, path) in inputs.iter().enumerate() {
        for doc in read_documents(path, txt)? {
            let kept = cap_chars(&doc, doc_cap);
            let kept_chars = kept.chars().count();
            if kept.len() < doc.len() {
                t.docs_cut += 1;
                t.chars_cut += doc[kept.len()..].chars().count();
            }
            t.chars += kept_chars;
            t.docs.push(kept.to_string());
            if t.chars > max_chars {
                t.stopped_at_max_chars = true;
                break 'files;
            }
        }
        progress(i + 1);
    }
    if t.chars == 0 {
        bail!("the inputs hold no text (0 characters): nothing to train a tokenizer on");
    }
    Ok(t)
}

/// Accumulates tokens and writes `{prefix}_000000.bin`, `{prefix}_000001.bin`, ... of `shard_tokens` each.
pub struct ShardSink {
    dir: PathBuf,
    prefix: String,
    shard_tokens: usize,
    vocab_size: usize,
    buf: Vec<u32>,
    pub shards_written: usize,
    pub tokens_written: usize,
}

impl ShardSink {
    pub fn new(dir: &Path, prefix: &str, shard_tokens: usize, vocab_size: usize) -> Result<ShardSink> {
        if shard_tokens == 0 {
            bail!("shard size must be at least one token");
        }
        std::fs::create_dir_all(dir).map_err(|e| NcError::from(e).context(dir.display()))?;
        Ok(ShardSink {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            shard_tokens,
            vocab_size,
            buf: Vec::new(),
            shards_written: 0,
            tokens_written: 0,
        })
    }

    pub fn push(&mut self, tokens: &[u32]) -> Result<()> {
        self.buf.extend_from_slice(tokens);
        while self.buf.len() >= self.shard_tokens {
            let rest = self.buf.split_off(self.shard_tokens);
            self.write_buf()?;
            self.buf = rest;
        }
        Ok(())
    }

    fn write_buf(&mut self) -> Result<()> {
        let path = self.dir.join(format!("{}_{:06}.bin", self.prefix, self.shards_written));
        write_shard(&path, &self.buf, self.vocab_size)?;
        self.shards_written += 1;
        self.tokens_written += self.buf.len();
        self.buf.clear();
        Ok(())
    }

    /// Write what is left as a last, shorter shard.
    pub fn finish(mut self) -> Result<(usize, usize)> {
        if !self.buf.is_empty() {
            self.write_buf()?;
        }
        Ok((self.shards_written, self.tokens_written))
    }
}

/// Which documents are validation data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValSplit {
    /// The last input file (nanochat: the last parquet shard).
    LastFile,
    /// The last N documents of the input.
    LastDocs(usize),
}

impl ValSplit {
    /// The default: the last file when there are several (nanochat's rule for parquet shards), else the last
    /// 1% of the one file's documents (at least one). `val_docs` overrides it.
    pub fn choose(inputs: &[PathBuf], txt: TxtDocs, val_docs: Option<usize>) -> Result<ValSplit> {
        Ok(match val_docs {
            Some(n) => ValSplit::LastDocs(n),
            None if inputs.len() > 1 => ValSplit::LastFile,
            None => {
                let Some(first) = inputs.first() else {
                    bail!("no input files")
                };
                ValSplit::LastDocs((read_documents(first, txt)?.len() / 100).max(1))
            }
        })
    }

    /// How a shard set's record names the split (two sets with the same text split alike).
    pub fn describe(self, inputs: &[PathBuf]) -> String {
        match self {
            ValSplit::LastFile => {
                let last = inputs
                    .last()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned());
                format!("the last input file ({})", last.unwrap_or_default())
            }
            ValSplit::LastDocs(n) => format!("the last {n} documents"),
        }
    }
}

/// How `tokenize_to_shards` splits and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenizeOptions {
    pub shard_tokens: usize,
    pub split: ValSplit,
    pub txt: TxtDocs,
    /// Replace a target holding another tokenizer's or split's shards (or shards with no record).
    pub replace: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenizeSummary {
    pub train_docs: usize,
    pub val_docs: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub bytes: usize,
    pub train_shards: usize,
    pub val_shards: usize,
}

/// Tokenize `inputs` (each document with `<|bos|>` first, encoded across threads) into a new set of
/// `out/train_*.bin` and `out/val_*.bin`, swapped in for what `out` held only once complete (`shard_set`).
/// `progress(files done)` is called after each file. Returns the summary and, if `out` held a set, a line
/// saying what was replaced.
pub fn tokenize_to_shards(
    tok: &Tokenizer,
    inputs: &[PathBuf],
    out: &Path,
    opts: TokenizeOptions,
    progress: &dyn Fn(usize),
) -> Result<(TokenizeSummary, Option<String>)> {
    let split = opts.split;
    if inputs.is_empty() {
        bail!("no input files");
    }
    if split == ValSplit::LastFile && inputs.len() < 2 {
        bail!("the last input file is used for validation, so give at least two files (or set a number of validation documents)");
    }
    let identity = SetIdentity {
        tokenizer: tokenizer_fingerprint(tok),
        vocab_size: tok.vocab_size(),
        split: split.describe(inputs),
    };
    let set = NewShardSet::begin(out, &identity, opts.replace)?;
    let s = write_shards(tok, inputs, set.dir(), opts, progress)?;
    let mut manifest = ShardManifest::new(identity);
    manifest.txt_docs = opts.txt.name().into();
    manifest.shard_tokens = opts.shard_tokens;
    manifest.inputs = inputs.iter().map(|p| p.display().to_string()).collect();
    (manifest.train_shards, manifest.val_shards) = (s.train_shards, s.val_shards);
    (manifest.train_tokens, manifest.val_tokens) = (s.train_tokens, s.val_tokens);
    let replacing = set.replacing.clone();
    set.commit(&manifest)?;
    Ok((s, replacing))
}

/// The shards of `inputs` into the folder `dir`.
fn write_shards(
    tok: &Tokenizer,
    inputs: &[PathBuf],
    dir: &Path,
    opts: TokenizeOptions,
    progress: &dyn Fn(usize),
) -> Result<TokenizeSummary> {
    let (split, txt) = (opts.split, opts.txt);
    let vocab = tok.vocab_size();
    let mut train = ShardSink::new(dir, "train", opts.shard_tokens, vocab)?;
    let mut val = ShardSink::new(dir, "val", opts.shard_tokens, vocab)?;
    let mut s = TokenizeSummary::default();
    // With LastDocs, validation documents are the last N of the whole input: hold back that many.
    let mut held: std::collections::VecDeque<Vec<u32>> = Default::default();
    // A reader thread parses the next file (parquet decompression is single-threaded) while the current
    // one is encoded on all threads.
    let (tx, rx) = crossbeam_channel::bounded::<Result<Vec<String>>>(1);
    let reader = std::thread::spawn({
        let inputs = inputs.to_vec();
        move || {
            for path in &inputs {
                let docs = read_documents(path, txt);
                let failed = docs.is_err();
                if tx.send(docs).is_err() || failed {
                    return;
                }
            }
        }
    });
    for i in 0..inputs.len() {
        let docs = rx
            .recv()
            .map_err(|_| NcError::new("the input reader thread stopped unexpectedly"))??;
        s.bytes += docs.iter().map(|d| d.len()).sum::<usize>();
        let encoded = tok.encode_batch(&docs, true);
        let is_val_file = split == ValSplit::LastFile && i + 1 == inputs.len();
        for ids in encoded {
            if is_val_file {
                s.val_docs += 1;
                val.push(&ids)?;
                continue;
            }
            match split {
                ValSplit::LastDocs(n) => {
                    held.push_back(ids);
                    if held.len() > n {
                        let ids = held.pop_front().expect("non-empty");
                        s.train_docs += 1;
                        train.push(&ids)?;
                    }
                }
                ValSplit::LastFile => {
                    s.train_docs += 1;
                    train.push(&ids)?;
                }
            }
        }
        progress(i + 1);
    }
    drop(rx);
    let _ = reader.join();
    for ids in held {
        s.val_docs += 1;
        val.push(&ids)?;
    }
    (s.train_shards, s.train_tokens) = train.finish()?;
    (s.val_shards, s.val_tokens) = val.finish()?;
    if s.train_tokens == 0 {
        bail!(
            "no training documents: all {} documents went to validation; use fewer validation documents (--val-docs), \
             more text, or smaller documents (--txt-docs paragraph or line for .txt files)",
            s.val_docs
        );
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_docs_are_capped_and_stop_after_max_chars() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        let docs = ["ééééé", "abc", "xyz", "q"];
        std::fs::write(&p, docs.map(|d| format!("{{\"text\": \"{d}\"}}\n")).concat()).unwrap();
        let t = tokenizer_training_docs(std::slice::from_ref(&p), TxtDocs::File, 6, 4, &|_| {}).unwrap();
        // 4 (capped) + 3 = 7 > 6: stop after the second document, keeping it whole.
        assert_eq!(t.docs, vec!["éééé".to_string(), "abc".to_string()]);
        assert_eq!(
            (t.chars, t.docs_cut, t.chars_cut, t.stopped_at_max_chars),
            (7, 1, 1, true)
        );
        let t = tokenizer_training_docs(std::slice::from_ref(&p), TxtDocs::File, 100, 2, &|_| {}).unwrap();
        assert_eq!(t.docs.len(), 4);
        // ééééé -> 3 cut, abc -> 1, xyz -> 1, q -> none.
        assert_eq!(
            (t.chars, t.docs_cut, t.chars_cut, t.stopped_at_max_chars),
            (7, 3, 5, false)
        );
        let empty = dir.path().join("e.txt");
        std::fs::write(&empty, "\n \n").unwrap();
        let err = tokenizer_training_docs(&[empty], TxtDocs::Paragraph, 100, 100, &|_| {}).unwrap_err();
        assert!(err.to_string().contains("e.txt: no text in it"), "{err}");
    }
}
