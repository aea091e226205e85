//! The data of a run: the tokenizer, the train and validation loaders, and the sample prompts; from a
//! data directory (nc-data's layout) or from the embedded corpus.

use crate::bail;
use crate::data::loader::DataLoader;
use crate::data::shard::list_shards;
use crate::data::synth::{synth_dataset, SynthConfig};
use crate::data::{load_tokenizer, Tokenizer};
use crate::error::Result;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DataSource {
    /// The embedded corpus, made in memory (no files).
    Embedded {
        vocab_size: usize,
        train_chars: usize,
        val_chars: usize,
        seed: u64,
    },
    /// A data directory: `tokenizer/` and `shards/{train,val}_NNNNNN.bin`.
    Dir(PathBuf),
}

impl DataSource {
    /// The embedded corpus at its default size.
    pub fn embedded() -> Self {
        let s = SynthConfig::default();
        DataSource::Embedded {
            vocab_size: s.vocab_size,
            train_chars: s.train_chars,
            val_chars: s.val_chars,
            seed: s.seed,
        }
    }
}

pub struct RunData {
    pub tokenizer: Tokenizer,
    pub train: DataLoader,
    pub val: DataLoader,
    pub prompts: Vec<String>,
}

/// Prompts the embedded corpus can complete (its facts and arithmetic).
const EMBEDDED_PROMPTS: &[&str] = &[
    "The fox is",
    "Q: What does the cat eat? A:",
    "2 + 3 =",
    "Counting: one, two,",
];
/// nanochat's sample prompts for web text.
const WEB_PROMPTS: &[&str] = &[
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
];

/// The data of rank `rank`: its share of each training step, and the whole validation set (rank 0 evaluates
/// alone, so its validation loader is a one-rank loader).
pub fn load(source: &DataSource, rank: usize, world_size: usize, batch: usize, seq_len: usize) -> Result<RunData> {
    match source {
        DataSource::Embedded {
            vocab_size,
            train_chars,
            val_chars,
            seed,
        } => {
            let cfg = SynthConfig {
                vocab_size: *vocab_size,
                train_chars: *train_chars,
                val_chars: *val_chars,
                seed: *seed,
            };
            let d = synth_dataset(&cfg)?;
            Ok(RunData {
                train: DataLoader::from_tokens(vec![d.train], rank, world_size, batch, seq_len)?,
                val: DataLoader::from_tokens(vec![d.val], 0, 1, batch, seq_len)?,
                tokenizer: d.tokenizer,
                prompts: EMBEDDED_PROMPTS.iter().map(|s| s.to_string()).collect(),
            })
        }
        DataSource::Dir(dir) => {
            if !dir.is_dir() {
                bail!(
                    "--data-dir {}: no such directory; prepare one with nc-data (see README), or leave out --data-dir \
                     to train on the embedded corpus",
                    dir.display()
                );
            }
            let tokenizer = load_tokenizer(&dir.join("tokenizer"))?;
            let shards = dir.join("shards");
            let train = list_shards(&shards, "train")?;
            let val = list_shards(&shards, "val")?;
            if train.is_empty() || val.is_empty() {
                bail!(
                    "--data-dir {}: shards/ needs train_*.bin and val_*.bin token shards (found {} and {}); make them \
                     with nc-data",
                    dir.display(),
                    train.len(),
                    val.len()
                );
            }
            let vocab = Some(tokenizer.vocab_size());
            Ok(RunData {
                train: DataLoader::open(&train, vocab, rank, world_size, batch, seq_len)?,
                val: DataLoader::open(&val, vocab, 0, 1, batch, seq_len)?,
                tokenizer,
                prompts: WEB_PROMPTS.iter().map(|s| s.to_string()).collect(),
            })
        }
    }
}
