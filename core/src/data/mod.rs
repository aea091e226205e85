//! Data: tokenizer, token shards, the loader, data preparation, the embedded corpus (issue 3).
//!
//! - `pretokenize`: the split pattern, matched by hand.
//! - `bpe_train`: learning merges (rustbpe's semantics).
//! - `tokenizer`: encode/decode (tiktoken's semantics), special tokens, byte lengths for bits per byte.
//! - `tokenizer_files`: the tokenizer directory and tiktoken's ranks format; `pickle`: nanochat's tokenizer.pkl.
//! - `shard`: llm.c token shards (mmap reader, atomic writer).
//! - `loader`: the distributed, resumable, prefetching batch loader.
//! - `prep`: reading parquet/jsonl/txt documents and writing token shards (used by `nc-data`); `inputs`: folders
//!   as inputs; `txt_docs`: where a plain-text document ends; `shard_set`: a shard folder written as a whole
//!   (temporary folder, swap, `tokenize.json` record).
//! - `fuzz_targets`: the bodies of the fuzz targets in `fuzz/`, also run by stable tests.
//! - `synth`: the embedded corpus and a ready in-memory dataset.
//! - `download`: fetching nanochat's FineWeb-Edu parquet shards (`nc-data download`); `download_retry`: when to try
//!   again; `download_file`: temporary name, fsync, parquet check, rename (also used by `eval::bundle_download`).
//! - `run_data`: the data of a training run (tokenizer, train and validation loaders, sample prompts) from a
//!   data directory or the embedded corpus; the training loop, `nc-eval` and the tests load it here.

pub mod bpe_train;
pub mod download;
pub mod download_file;
pub mod download_retry;
pub mod fuzz_targets;
pub mod inputs;
pub mod loader;
pub mod pickle;
pub mod prep;
pub mod pretokenize;
pub mod run_data;
pub mod shard;
pub mod shard_set;
pub mod synth;
pub mod tokenizer;
pub mod tokenizer_files;
pub mod txt_docs;

pub use loader::{Batch, DataLoader, LoaderState};
pub use shard::{list_shards, write_shard, Shard};
pub use synth::{synth_dataset, write_data_dir, SynthConfig, SynthData};
pub use tokenizer::{Tokenizer, BOS, SPECIAL_TOKENS};
pub use tokenizer_files::{load_tokenizer, save_tokenizer};
