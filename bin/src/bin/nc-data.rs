//! nc-data: make the data nc-train reads (argument parsing and printing; the work is in nc_core::data).
//!
//! A data directory `DATA` holds `DATA/tokenizer/` and `DATA/shards/{train,val}_NNNNNN.bin`:
//! - `nc-data synth --out DATA`: the embedded generated corpus, tokenizer included.
//! - `nc-data train-tokenizer --input PATH... --vocab-size N --out DATA/tokenizer`
//! - `nc-data tokenize --input PATH... --tokenizer DATA/tokenizer --out DATA/shards`
//! - `nc-data export-tiktoken --tokenizer DIR --out FILE`: the ranks in tiktoken's format (also for
//!   nanochat's tokenizer.pkl).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use nc_core::data::prep::{tokenize_to_shards, tokenizer_training_docs, ValSplit};
use nc_core::data::tokenizer_files::{format_tiktoken_ranks, write_atomic};
use nc_core::data::{load_tokenizer, save_tokenizer, synth_dataset, write_data_dir, SynthConfig, Tokenizer};
use nc_core::{NcError, Result};

#[derive(Parser)]
#[command(name = "nc-data", about = "Make tokenizers and token shards for nc-train")]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the embedded generated corpus as a data directory (tokenizer + train/val shards).
    Synth {
        /// The data directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Vocabulary size, including the 256 bytes and the 9 special tokens.
        #[arg(long, default_value_t = SynthConfig::default().vocab_size)]
        vocab_size: usize,
        /// Characters of training text to generate.
        #[arg(long, default_value_t = SynthConfig::default().train_chars)]
        train_chars: usize,
        /// Characters of validation text to generate.
        #[arg(long, default_value_t = SynthConfig::default().val_chars)]
        val_chars: usize,
        #[arg(long, default_value_t = SynthConfig::default().seed)]
        seed: u64,
    },
    /// Train a BPE tokenizer (nanochat's: GPT-4 style split, 9 special tokens) on text files.
    TrainTokenizer {
        /// Input files: .parquet (column `text`), .jsonl (field `text`), .txt (one document each).
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        /// Vocabulary size, including the 256 bytes and the 9 special tokens.
        #[arg(long, default_value_t = 65536)]
        vocab_size: usize,
        /// Stop reading after this many characters of text.
        #[arg(long, default_value_t = 2_000_000_000)]
        max_chars: usize,
        /// Cut each document to this many characters.
        #[arg(long, default_value_t = 10_000)]
        doc_cap: usize,
        /// The tokenizer directory to write (e.g. DATA/tokenizer).
        #[arg(long)]
        out: PathBuf,
    },
    /// Tokenize documents into token shards (each document starts with <|bos|>).
    Tokenize {
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        /// The tokenizer directory (ours, or one holding nanochat's tokenizer.pkl).
        #[arg(long)]
        tokenizer: PathBuf,
        /// The shard directory to write (e.g. DATA/shards).
        #[arg(long)]
        out: PathBuf,
        /// Tokens per shard.
        #[arg(long, default_value_t = 100_000_000)]
        shard_tokens: usize,
        /// Use the last N documents as validation data. Default: the last input file when there are
        /// several (nanochat's rule for parquet shards), else the last 1% of the documents.
        #[arg(long)]
        val_docs: Option<usize>,
    },
    /// Write a tokenizer's mergeable ranks in tiktoken's format (base64 token, rank).
    ExportTiktoken {
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

fn file_sizes(paths: &[PathBuf]) -> Result<Vec<u64>> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .map(|m| m.len())
                .map_err(|e| NcError::new(format!("{}: {e}", p.display())))
        })
        .collect()
}

fn print_tokenizer(tok: &Tokenizer, out: &Path) {
    println!(
        "tokenizer: {} tokens ({} mergeable + {} special), bos id {}, written to {}",
        tok.vocab_size(),
        tok.num_ranks(),
        tok.specials().len(),
        tok.bos_id(),
        out.display()
    );
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| NcError::new(format!("--threads {n}: {e}")))?;
    }
    let start = Instant::now();
    match cli.command {
        Command::Synth {
            out,
            vocab_size,
            train_chars,
            val_chars,
            seed,
        } => {
            let cfg = SynthConfig {
                vocab_size,
                train_chars,
                val_chars,
                seed,
            };
            let data = synth_dataset(&cfg)?;
            write_data_dir(&data, &out)?;
            print_tokenizer(&data.tokenizer, &out.join("tokenizer"));
            println!(
                "shards: train {} tokens, val {} tokens in {}",
                data.train.len(),
                data.val.len(),
                out.join("shards").display()
            );
        }
        Command::TrainTokenizer {
            input,
            vocab_size,
            max_chars,
            doc_cap,
            out,
        } => {
            let pb = bar(input.len() as u64, "reading {bar:40} {pos}/{len} files {elapsed}");
            let docs = tokenizer_training_docs(&input, max_chars, doc_cap, &|done| pb.set_position(done as u64))?;
            pb.finish_and_clear();
            let chars: usize = docs.iter().map(|d| d.chars().count()).sum();
            println!("training on {} documents, {chars} characters", docs.len());
            let spinner = bar(0, "{spinner} learning merges {elapsed}");
            let t = Instant::now();
            let tok = Tokenizer::train(&docs, vocab_size)?;
            spinner.finish_and_clear();
            let secs = t.elapsed().as_secs_f64();
            let bytes: usize = docs.iter().map(|d| d.len()).sum();
            println!("trained in {secs:.1} s ({:.1} MB/s)", bytes as f64 / 1e6 / secs);
            save_tokenizer(&tok, &out)?;
            print_tokenizer(&tok, &out);
        }
        Command::Tokenize {
            input,
            tokenizer,
            out,
            shard_tokens,
            val_docs,
        } => {
            let tok = load_tokenizer(&tokenizer)?;
            let split = match val_docs {
                Some(n) => ValSplit::LastDocs(n),
                None if input.len() > 1 => ValSplit::LastFile,
                None => {
                    let n = nc_core::data::prep::read_documents(&input[0])?.len();
                    ValSplit::LastDocs((n / 100).max(1))
                }
            };
            // Progress in input file bytes (compressed, for parquet), advanced as each file is done.
            let sizes = file_sizes(&input)?;
            let pb = bar(
                sizes.iter().sum(),
                "tokenizing {bar:40} {bytes}/{total_bytes} of input ({bytes_per_sec}) {elapsed} eta {eta}",
            );
            let s = tokenize_to_shards(&tok, &input, &out, shard_tokens, split, &|files_done| {
                pb.set_position(sizes[..files_done].iter().sum())
            })?;
            pb.finish_and_clear();
            let secs = start.elapsed().as_secs_f64();
            println!(
                "documents: {} train, {} val; tokens: {} train, {} val; text: {} bytes ({:.2} bytes/token); \
                 shards: {} train, {} val in {}; {secs:.1} s ({:.1} MB/s)",
                s.train_docs,
                s.val_docs,
                s.train_tokens,
                s.val_tokens,
                s.bytes,
                s.bytes as f64 / (s.train_tokens + s.val_tokens).max(1) as f64,
                s.train_shards,
                s.val_shards,
                out.display(),
                s.bytes as f64 / 1e6 / secs
            );
        }
        Command::ExportTiktoken { tokenizer, out } => {
            let tok = load_tokenizer(&tokenizer)?;
            write_atomic(&out, format_tiktoken_ranks(&tok).as_bytes())?;
            println!("wrote {} ranks to {}", tok.num_ranks(), out.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nc-data: {e}");
            ExitCode::FAILURE
        }
    }
}
