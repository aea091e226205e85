//! nc-data: make the data nc-train reads (argument parsing and printing; the work is in nc_core::data).
//!
//! - `nc-data download -n N [--out DIR]`: nanochat's FineWeb-Edu parquet shards (resumable; see
//!   nc_core::data::download), the input of `train-tokenizer` and `tokenize`.
//!
//! A data directory `DATA` holds `DATA/tokenizer/` and `DATA/shards/{train,val}_NNNNNN.bin`:
//! - `nc-data synth --out DATA`: the embedded generated corpus, tokenizer included.
//! - `nc-data train-tokenizer --input PATH... --vocab-size N --out DATA/tokenizer`
//! - `nc-data tokenize --input PATH... --tokenizer DATA/tokenizer --out DATA/shards` (a new set swapped in whole)
//!
//! An input PATH is a file (.parquet, .jsonl, .txt) or a folder of them; `--txt-docs` says where a .txt
//! document ends.
//! - `nc-data export-tiktoken --tokenizer DIR --out FILE`: the ranks in tiktoken's format (also for
//!   nanochat's tokenizer.pkl).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use nc_core::data::download::{
    default_out_dir, download_shards, resolve_base_url, shard_name, DownloadConfig, Outcome, Progress, BASE_URL_ENV,
    MAX_SHARD,
};
use nc_core::data::download_retry::RetryPolicy;
use nc_core::data::inputs::expand_inputs;
use nc_core::data::prep::{tokenize_to_shards, tokenizer_training_docs, TokenizeOptions, ValSplit};
use nc_core::data::tokenizer_files::{format_tiktoken_ranks, write_atomic, META_FILE, PICKLE_FILE};
use nc_core::data::txt_docs::TxtDocs;
use nc_core::data::{load_tokenizer, save_tokenizer, synth_dataset, write_data_dir, SynthConfig, Tokenizer};
use nc_core::eval::bundle_download::{download_eval_bundle, resolve_bundle_url, BundleOutcome};
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
    /// Download nanochat's pretraining data: FineWeb-Edu parquet shards shard_00000.parquet ..
    /// shard_{N-1}.parquet (~100 MB each, 1,823 in all). Files already complete are skipped, so re-running
    /// resumes; each file is renamed into place only once complete and readable as parquet. As in nanochat,
    /// the last file downloaded serves as validation (`tokenize` holds out the last input file), so -n is the
    /// training shards wanted + 1.
    #[command(after_help = DOWNLOAD_AFTER_HELP)]
    Download {
        /// Shards to download: shard_00000 .. shard_{N-1} (at most 1823).
        #[arg(short = 'n', long = "num-files", required_unless_present = "eval_bundle")]
        num_files: Option<usize>,
        /// Also (or only, without -n) fetch nanochat's CORE eval bundle (eval_bundle.zip, ~160 MB) and unpack it
        /// into $NANOCHAT_BASE_DIR/eval_bundle or ~/.cache/nanochat/eval_bundle; one already there is used as is.
        #[arg(long)]
        eval_bundle: bool,
        /// --eval-bundle: where to unpack it instead (the eval_bundle folder itself).
        #[arg(long)]
        eval_bundle_dir: Option<PathBuf>,
        /// --eval-bundle: the zip's URL (default: $NC_EVAL_BUNDLE_URL, else nanochat's).
        #[arg(long)]
        eval_bundle_url: Option<String>,
        /// Files downloaded at once.
        #[arg(short = 'w', long, default_value_t = 4)]
        workers: usize,
        /// Destination folder. Default: nanochat's, $NANOCHAT_BASE_DIR/base_data or ~/.cache/nanochat/base_data.
        #[arg(long)]
        out: Option<PathBuf>,
        /// URL of the folder holding the shards (default: $NC_DATA_BASE_URL, else nanochat's Hugging Face dataset).
        #[arg(long)]
        base_url: Option<String>,
        /// Attempts per file before it counts as failed (HTTP 5xx/429, resets, truncated bodies are retried;
        /// a 404 is not).
        #[arg(long, default_value_t = RetryPolicy::default().attempts)]
        retries: u32,
        /// Wait after the first failed attempt, doubling after each further one (capped at 60 s).
        #[arg(long, default_value_t = RetryPolicy::default().base_delay.as_millis() as u64)]
        retry_delay_ms: u64,
    },
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
        /// Replace shards of another tokenizer already in OUT/shards (without it they are refused).
        #[arg(long)]
        replace: bool,
    },
    /// Train a BPE tokenizer (nanochat's: GPT-4 style split, 9 special tokens) on text files.
    TrainTokenizer {
        /// Input files: .parquet (column `text`), .jsonl (field `text`), .txt (see --txt-docs); a folder means
        /// its files of those types, sorted by name (not its subfolders).
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        /// Where a .txt document ends: paragraph (at blank lines), line (every line) or file (the whole file).
        #[arg(long, default_value = "paragraph")]
        txt_docs: String,
        /// Vocabulary size, including the 256 bytes and the 9 special tokens.
        #[arg(long, default_value_t = 65536)]
        vocab_size: usize,
        /// Stop reading after this many characters of text.
        #[arg(long, default_value_t = 2_000_000_000)]
        max_chars: usize,
        /// Cut each document to this many characters (nanochat's tok_train does; the summary says what it cut).
        #[arg(long, default_value_t = 10_000)]
        doc_cap: usize,
        /// The tokenizer directory to write (e.g. DATA/tokenizer).
        #[arg(long)]
        out: PathBuf,
        /// Overwrite a tokenizer already in --out (shards made with it no longer decode right).
        #[arg(long)]
        replace: bool,
    },
    /// Tokenize documents into token shards (each document starts with <|bos|>).
    ///
    /// The shards are written into a temporary folder beside --out and swapped in only when complete, so --out
    /// holds the old set or the new one, never a mix. A set made with the same tokenizer and split is replaced;
    /// shards of another tokenizer or split (or without a tokenize.json record) need --replace.
    Tokenize {
        /// Input files or folders, as for train-tokenizer.
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        /// Where a .txt document ends: paragraph (at blank lines), line (every line) or file (the whole file).
        #[arg(long, default_value = "paragraph")]
        txt_docs: String,
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
        /// Replace shards of another tokenizer or split (or unrecorded ones) in --out.
        #[arg(long)]
        replace: bool,
    },
    /// Write a tokenizer's mergeable ranks in tiktoken's format (base64 token, rank).
    ExportTiktoken {
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

const DOWNLOAD_AFTER_HELP: &str = "\
The dataset is karpathy/fineweb-edu-100b-shuffle, as nanochat's nanochat/dataset.py downloads it. The base URL
can be replaced by --base-url or the NC_DATA_BASE_URL environment variable (a mirror, a local server).
Exit status: 0 when every requested shard is on disk and complete, 1 otherwise (the failed files are listed,
one line each; run the command again to fetch what is missing).";

/// The download progress bar: files done out of N, bytes received and the rate in its message.
struct DownloadBar {
    pb: ProgressBar,
    bytes: AtomicI64,
    start: Instant,
}

impl Progress for DownloadBar {
    fn bytes(&self, delta: i64) {
        let total = self.bytes.fetch_add(delta, Ordering::Relaxed) + delta;
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        self.pb.set_message(format!(
            "{:.1} MB received ({:.1} MB/s)",
            total as f64 / 1e6,
            total as f64 / 1e6 / secs
        ));
    }
    fn file_done(&self, _name: &str, _outcome: &Outcome) {
        self.pb.inc(1);
    }
    fn note(&self, line: &str) {
        // A hidden bar (output not a terminal: a script's log) drops println, and retries belong in logs.
        if self.pb.is_hidden() {
            eprintln!("{line}");
        } else {
            self.pb.println(line);
        }
    }
}

/// `download --eval-bundle`: nanochat's CORE eval bundle into its folder (nc_core::eval::bundle_download).
fn download_bundle(dir: Option<PathBuf>, url: Option<String>, retries: u32, retry_delay_ms: u64) -> Result<()> {
    let dest = match dir {
        Some(d) => d,
        None => nc_core::eval::default_bundle_dir()?,
    };
    let url = resolve_bundle_url(url.as_deref())?;
    let retry = RetryPolicy {
        attempts: retries.max(1),
        base_delay: Duration::from_millis(retry_delay_ms),
        ..RetryPolicy::default()
    };
    match download_eval_bundle(&url, &dest, retry, &mut |line| eprintln!("{line}"))? {
        BundleOutcome::AlreadyThere => println!("eval bundle: already in {} (used as is)", dest.display()),
        BundleOutcome::Fetched { bytes, files } => {
            println!(
                "eval bundle: {bytes} bytes from {url}, {files} files unpacked into {}",
                dest.display()
            )
        }
    }
    Ok(())
}

fn download(
    num_files: usize,
    workers: usize,
    out: Option<PathBuf>,
    base_url: Option<String>,
    retries: u32,
    retry_delay_ms: u64,
) -> Result<()> {
    let out = match out {
        Some(o) => o,
        None => default_out_dir()?,
    };
    let base_url = resolve_base_url(base_url.as_deref())?;
    let mut cfg = DownloadConfig::new(num_files, out, base_url);
    cfg.workers = workers;
    cfg.retry.attempts = retries;
    cfg.retry.base_delay = Duration::from_millis(retry_delay_ms);
    if (1..=MAX_SHARD + 1).contains(&num_files) {
        println!(
            "downloading {num_files} shards ({} .. {}) from {} into {} with {workers} workers; \
             the last, {}, is the validation shard",
            shard_name(0),
            shard_name(num_files - 1),
            cfg.base_url,
            cfg.out.display(),
            shard_name(num_files - 1)
        );
    }
    let progress = DownloadBar {
        pb: bar(num_files as u64, "{bar:40} {pos}/{len} files, {msg} {elapsed}"),
        bytes: AtomicI64::new(0),
        start: Instant::now(),
    };
    let summary = download_shards(&cfg, &progress)?;
    progress.pb.finish_and_clear();
    if summary.stale_temps_removed > 0 {
        println!(
            "removed {} unfinished .tmp files of an earlier run",
            summary.stale_temps_removed
        );
    }
    let failures = summary.failures();
    let mut line = format!(
        "fetched {} ({:.1} MB), skipped {} (already complete), failed {}",
        summary.fetched(),
        summary.fetched_bytes() as f64 / 1e6,
        summary.skipped(),
        failures.len()
    );
    if summary.not_started() > 0 {
        line += &format!(
            ", not started {} (stopped at the permanent failure)",
            summary.not_started()
        );
    }
    println!("{line}; {:.1} s", progress.start.elapsed().as_secs_f64());
    for f in &failures {
        eprintln!("failed: {f}");
    }
    if !summary.all_complete() {
        return Err(NcError::new(format!(
            "{} of {num_files} shards are not on disk; run the same command again to fetch them \
             (complete files are kept; {BASE_URL_ENV} or --base-url point at another server)",
            failures.len() + summary.not_started()
        )));
    }
    Ok(())
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

/// The input files behind `--input` (folders expanded), saying what each folder gave.
fn input_files(input: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let expanded = expand_inputs(input)?;
    for note in &expanded.notes {
        println!("input {note}");
    }
    Ok(expanded.files)
}

/// Refuse to overwrite a tokenizer unless told to: shards made with it would silently stop matching.
fn check_tokenizer_out(out: &Path, replace: bool) -> Result<()> {
    let holds = [META_FILE, PICKLE_FILE].iter().any(|f| out.join(f).exists());
    if holds && !replace {
        return Err(NcError::new(format!(
            "{} holds a tokenizer already (token shards made with it would no longer decode right); give --replace \
             to overwrite it, or another --out",
            out.display()
        )));
    }
    Ok(())
}

fn train_tokenizer(
    input: &[PathBuf],
    txt: TxtDocs,
    vocab_size: usize,
    max_chars: usize,
    doc_cap: usize,
    out: &Path,
) -> Result<()> {
    let input = input_files(input)?;
    let pb = bar(input.len() as u64, "reading {bar:40} {pos}/{len} files {elapsed}");
    let text = tokenizer_training_docs(&input, txt, max_chars, doc_cap, &|done| pb.set_position(done as u64))?;
    pb.finish_and_clear();
    println!(
        "read {} documents from {} files ({} for .txt): {} characters",
        text.docs.len(),
        input.len(),
        txt.name(),
        text.chars
    );
    println!(
        "--doc-cap {doc_cap} cut {} documents, leaving out {} characters{}",
        text.docs_cut,
        text.chars_cut,
        if text.chars_cut > 0 {
            " (raise --doc-cap to keep them)"
        } else {
            ""
        }
    );
    if text.stopped_at_max_chars {
        println!("stopped reading at --max-chars {max_chars}: later documents are not used");
    }
    let spinner = bar(0, "{spinner} learning merges {elapsed}");
    let t = Instant::now();
    let tok = Tokenizer::train(&text.docs, vocab_size)?;
    spinner.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    let bytes: usize = text.docs.iter().map(|d| d.len()).sum();
    println!("trained in {secs:.1} s ({:.1} MB/s)", bytes as f64 / 1e6 / secs);
    if tok.vocab_size() < vocab_size {
        println!(
            "note: the text has no pair left to merge after {} merges, so the vocabulary is {} rather than {vocab_size}",
            tok.num_ranks() - 256,
            tok.vocab_size()
        );
    }
    save_tokenizer(&tok, out)?;
    print_tokenizer(&tok, out);
    Ok(())
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
        Command::Download {
            num_files,
            eval_bundle,
            eval_bundle_dir,
            eval_bundle_url,
            workers,
            out,
            base_url,
            retries,
            retry_delay_ms,
        } => {
            if eval_bundle {
                download_bundle(eval_bundle_dir, eval_bundle_url, retries, retry_delay_ms)?;
            }
            if let Some(n) = num_files {
                download(n, workers, out, base_url, retries, retry_delay_ms)?;
            }
        }
        Command::Synth {
            out,
            vocab_size,
            train_chars,
            val_chars,
            seed,
            replace,
        } => {
            let cfg = SynthConfig {
                vocab_size,
                train_chars,
                val_chars,
                seed,
            };
            let data = synth_dataset(&cfg)?;
            write_data_dir(&data, &out, replace)?;
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
            txt_docs,
            vocab_size,
            max_chars,
            doc_cap,
            out,
            replace,
        } => {
            let txt = TxtDocs::parse(&txt_docs)?;
            check_tokenizer_out(&out, replace)?;
            train_tokenizer(&input, txt, vocab_size, max_chars, doc_cap, &out)?;
        }
        Command::Tokenize {
            input,
            txt_docs,
            tokenizer,
            out,
            shard_tokens,
            val_docs,
            replace,
        } => {
            let txt = TxtDocs::parse(&txt_docs)?;
            let tok = load_tokenizer(&tokenizer)?;
            let input = input_files(&input)?;
            let split = ValSplit::choose(&input, txt, val_docs)?;
            let opts = TokenizeOptions {
                shard_tokens,
                split,
                txt,
                replace,
            };
            // Progress in input file bytes (compressed, for parquet), advanced as each file is done.
            let sizes = file_sizes(&input)?;
            let pb = bar(
                sizes.iter().sum(),
                "tokenizing {bar:40} {bytes}/{total_bytes} of input ({bytes_per_sec}) {elapsed} eta {eta}",
            );
            let (s, replaced) = tokenize_to_shards(&tok, &input, &out, opts, &|files_done| {
                pb.set_position(sizes[..files_done].iter().sum())
            })?;
            pb.finish_and_clear();
            if let Some(line) = replaced {
                println!("{line}");
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "documents: {} train, {} val (validation: {}); tokens: {} train, {} val; text: {} bytes ({:.2} \
                 bytes/token); shards: {} train, {} val in {}; {secs:.1} s ({:.1} MB/s)",
                s.train_docs,
                s.val_docs,
                split.describe(&input),
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
