//! nc-eval: judge a checkpoint as nanochat does (argument parsing and printing; the work is in nc_core::eval).
//!
//! - `--core [--max-per-task N] [--eval-bundle DIR]`: the CORE metric (per-task table, CSV and JSON written
//!   beside the checkpoint; `--json` prints nanochat's keys on stdout).
//! - `--bpb [--split val|train] [--tokens N]`: loss and bits per byte on the run's data.
//! - `--sample "prompt" [--temperature T --top-k K --max-tokens N --seed S]`: a continuation, KV-cached.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use nc_core::backend::Backend;
use nc_core::data::tokenizer_files::write_atomic;
use nc_core::data::Tokenizer;
use nc_core::eval::bpb::loss_and_bpb;
use nc_core::eval::load::{data_source, load_weights, resolve_checkpoint, tokenizer_for};
use nc_core::eval::{default_bundle_dir, evaluate_core, CoreOptions, EvalBundle, GrowingModel, TaskResult};
use nc_core::model::{Gpt, Recompute};
use nc_core::sample::{Sampler, Sampling};
use nc_core::{ModelConfig, NcError, Result};

#[derive(Parser)]
#[command(
    name = "nc-eval",
    version,
    about = "Evaluate or sample from an nc checkpoint (CORE, bits per byte, samples)"
)]
struct Cli {
    /// A checkpoint folder (checkpoints/step_N), or a run's --out-dir (its latest complete checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The CORE metric over the eval bundle's tasks.
    #[arg(long)]
    core: bool,
    /// CORE: examples per task (after nanochat's shuffle); default all.
    #[arg(long)]
    max_per_task: Option<usize>,
    /// CORE: the eval bundle folder (default $NANOCHAT_BASE_DIR/eval_bundle or ~/.cache/nanochat/eval_bundle;
    /// get it with `nc-data download --eval-bundle`).
    #[arg(long)]
    eval_bundle: Option<PathBuf>,
    /// CORE: print one JSON object (nanochat's keys results, centered_results, core_metric) on stdout; the
    /// table goes to stderr.
    #[arg(long)]
    json: bool,
    /// CORE: rows per forward pass (each padded to the longest row of its group).
    #[arg(long, default_value_t = 4)]
    batch_rows: usize,
    /// Loss and bits per byte on the run's data.
    #[arg(long)]
    bpb: bool,
    /// --bpb: which split, val or train.
    #[arg(long, default_value = "val")]
    split: String,
    /// --bpb: tokens to evaluate (rounded up to whole batches of --batch-rows x sequence length).
    #[arg(long, default_value_t = 1 << 20)]
    tokens: usize,
    /// Generate a continuation of this prompt.
    #[arg(long)]
    sample: Option<String>,
    /// --sample: 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// --sample: keep the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// --sample: tokens to generate at most (stops early at <|bos|>).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// --sample: seed of the sampler.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The tokenizer folder (default: the run's, from the checkpoint's meta.json).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// cpu, or cuda (GPU 0; not yet verified on a GPU).
    #[arg(long, default_value = "cpu")]
    backend: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nc-eval: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    if !(cli.core || cli.bpb || cli.sample.is_some()) {
        return Err(NcError::new("nothing to do: pass --core, --bpb or --sample \"prompt\""));
    }
    if cli.batch_rows == 0 {
        return Err(NcError::new("--batch-rows must be at least 1"));
    }
    if cli.split != "val" && cli.split != "train" {
        return Err(NcError::new(format!("--split {}: use val or train", cli.split)));
    }
    match cli.backend.as_str() {
        "cpu" | "auto" => run_on(cli, || Ok(nc_core::backend::cpu::CpuBackend::new())),
        "cuda" => run_on(cli, || nc_core::backend::cuda::CudaBackend::new(0)),
        other => Err(NcError::new(format!("--backend {other}: use cpu or cuda"))),
    }
}

fn run_on<B: Backend>(cli: &Cli, backend: impl Fn() -> Result<B>) -> Result<()> {
    let dir = resolve_checkpoint(&cli.checkpoint)?;
    let (meta, params) = load_weights(&dir)?;
    let cfg = meta.model_config;
    let tok = tokenizer_for(&meta, cli.tokenizer.as_deref(), &cfg)?;
    eprintln!(
        "checkpoint {} (step {}, {} layers, width {}, {} parameters)",
        dir.display(),
        meta.step,
        cfg.n_layer,
        cfg.n_embd,
        cfg.num_params()
    );
    let make = |c: ModelConfig, batch: usize, seq: usize| -> Result<Gpt<B>> {
        // Recompute::Full: a forward keeps one layer's activations (plus each layer's input), not all.
        let mut m = Gpt::new(backend()?, c, batch, seq, Recompute::Full)?;
        m.set_params_from_host(&params)?;
        Ok(m)
    };
    if let Some(prompt) = &cli.sample {
        let mut m = make(cfg, 1, cfg.sequence_len)?;
        sample(cli, &mut m, &tok, prompt)?;
    }
    if cli.bpb {
        let mut m = make(cfg, cli.batch_rows, cfg.sequence_len)?;
        bpb(cli, &mut m, &meta)?;
    }
    if cli.core {
        core(cli, &dir, cfg, &tok, Box::new(make))?;
    }
    Ok(())
}

fn sample<B: Backend>(cli: &Cli, m: &mut Gpt<B>, tok: &Tokenizer, prompt: &str) -> Result<()> {
    let mut ids = vec![tok.bos_id()];
    ids.extend(tok.encode(prompt));
    let room = m.cfg.sequence_len.saturating_sub(ids.len());
    if room == 0 {
        return Err(NcError::new(format!(
            "the prompt is {} tokens with <|bos|>; the model has {} positions",
            ids.len(),
            m.cfg.sequence_len
        )));
    }
    if !(cli.temperature >= 0.0 && cli.temperature.is_finite()) {
        return Err(NcError::new("--temperature must be a finite number >= 0"));
    }
    let how = Sampling {
        temperature: cli.temperature,
        top_k: cli.top_k,
    };
    let mut sampler = Sampler::new(m, cli.max_tokens.min(room) + ids.len())?;
    let new = sampler.generate(m, &ids, cli.max_tokens.min(room), how, cli.seed, Some(tok.bos_id()))?;
    let text = tok.decode(new.strip_suffix(&[tok.bos_id()]).unwrap_or(&new));
    println!("{prompt}{text}");
    Ok(())
}

fn bpb<B: Backend>(cli: &Cli, m: &mut Gpt<B>, meta: &nc_core::checkpoint::CheckpointMeta) -> Result<()> {
    let source = data_source(meta)?;
    let (batch, seq) = (cli.batch_rows, m.cfg.sequence_len);
    let mut data = nc_core::data::run_data::load(&source, 0, 1, batch, seq)?;
    let loader = if cli.split == "val" {
        &mut data.val
    } else {
        &mut data.train
    };
    let steps = cli.tokens.div_ceil(batch * seq).max(1);
    let token_bytes = data.tokenizer.token_bytes().to_vec();
    let r = loss_and_bpb(m, loader, &token_bytes, steps)?;
    println!(
        "{} loss {:.6} | bpb {:.6} | {} tokens",
        cli.split, r.loss, r.bpb, r.tokens
    );
    Ok(())
}

fn print_task(t: &TaskResult) {
    let long = if t.beyond_train_len > 0 {
        format!(" | {} rows beyond the training length", t.beyond_train_len)
    } else {
        String::new()
    };
    eprintln!(
        "{:<35} {:>2}-shot {:<17} accuracy {:.4} | centered {:.4} | {} examples | {:.2}s{long}",
        t.label,
        t.num_fewshot,
        t.task_type.name(),
        t.accuracy,
        t.centered,
        t.examples,
        t.seconds
    );
}

fn core<B: Backend>(
    cli: &Cli,
    dir: &Path,
    cfg: ModelConfig,
    tok: &Tokenizer,
    make: nc_core::eval::run::ModelMaker<'_, B>,
) -> Result<()> {
    let bundle_dir = match &cli.eval_bundle {
        Some(d) => d.clone(),
        None => default_bundle_dir()?,
    };
    let bundle = EvalBundle::load(&bundle_dir)?;
    let mut models = GrowingModel::new(cfg, cli.batch_rows * cfg.sequence_len, make);
    let opts = CoreOptions {
        max_per_task: cli.max_per_task,
        rank: 0,
        world_size: 1,
    };
    let res = evaluate_core(&mut models, tok, &bundle, opts, &mut |_| Ok(()), &mut print_task)?;
    eprintln!("CORE metric: {:.4}", res.core_metric);
    let stem = match cli.max_per_task {
        Some(n) if n > 0 => format!("core_eval_max{n}"),
        _ => "core_eval".to_string(),
    };
    let json = res.to_json();
    write_atomic(&dir.join(format!("{stem}.csv")), res.to_csv().as_bytes())?;
    write_atomic(&dir.join(format!("{stem}.json")), format!("{json:#}\n").as_bytes())?;
    eprintln!("wrote {}/{stem}.csv and {stem}.json", dir.display());
    if cli.json {
        let nanochat = serde_json::json!({"results": json["results"], "centered_results": json["centered_results"],
                                          "core_metric": json["core_metric"]});
        println!("{nanochat}");
    } else {
        print!("{}", res.to_csv());
    }
    Ok(())
}
