//! nc-data: make the data nc-train reads. `nc-data synth --out DATA` writes the embedded corpus as a data
//! directory (`DATA/tokenizer/`, `DATA/shards/train_000000.bin`, `DATA/shards/val_000000.bin`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nc_core::data::{synth_dataset, write_data_dir, SynthConfig};
use nc_core::Result;

#[derive(Parser)]
#[command(name = "nc-data", about = "Make tokenizers and token shards for nc-train")]
struct Cli {
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
}

fn run(cli: Cli) -> Result<()> {
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
            println!(
                "wrote {}: vocab {}, train {} tokens, val {} tokens",
                out.display(),
                data.tokenizer.vocab_size(),
                data.train.len(),
                data.val.len()
            );
            Ok(())
        }
    }
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
