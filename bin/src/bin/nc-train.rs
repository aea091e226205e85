//! nc-train: trains a nanochat-style GPT. With no arguments, runs the embedded default on the CPU.
//!
//! This file only parses flags and prints; the plan, the loop and the checkpoints live in nc-core.
//! Flag names are nanochat's, with dashes; the underscore spellings (`--num_iterations=100`) are aliases so
//! nanochat command lines carry over.

use clap::Parser;
use nc_core::backend::cuda;
use nc_core::checkpoint;
use nc_core::config::{self, ModelConfig, PresetBatch};
use nc_core::data::run_data::DataSource;
use nc_core::error::{NcError, Result};
use nc_core::optim::adamw::AdamParams;
use nc_core::optim::OptimConfig;
use nc_core::plan::{self, BatchPlan, Horizon, Plan, PlanRequest, Precision, Recompute};
use nc_core::train::core_metric::{CoreMetricConfig, NANOCHAT_CORE_METRIC_EVERY, NANOCHAT_CORE_METRIC_MAX_PER_TASK};
use nc_core::train::launch::{self, WorkerEnv};
use nc_core::train::supervise::{self, SupervisorConfig};
use nc_core::train::zero1::{HostRanks, RankCollective};
use nc_core::train::zero1_nccl::NcclExchange;
use nc_core::train::zero1_p2p::P2pExchange;
use nc_core::train::{self, out_dir, signal, transport, Resume, TrainConfig};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
// args_override_self: a flag given twice takes its last value, so scripts' extra arguments override theirs
#[command(
    args_override_self = true,
    name = "nc-train",
    version,
    about = "Train a nanochat-style GPT (no arguments: a small model on the embedded corpus, on the CPU)",
    after_help = "Environment:\n  NC_NO_ALLOC_CACHE=1  --backend cuda: every tensor its own driver allocation, freed at once \
                  (no caching), so compute-sanitizer or the simulated GPU see each tensor's bounds; slower, for \
                  debugging (docs/no-alloc-cache.md)"
)]
struct Cli {
    // --- model
    /// Number of layers; model_dim = 64 * depth, heads of 128 (default 20, or a small model on the embedded corpus).
    #[arg(long)]
    depth: Option<usize>,
    /// A named model: d20, d26, d32, 3b (d38), 6.6b (d50), 7b (d52); instead of --depth. 3b, 6.6b and 7b also
    /// set the scaling plan's batch (3b: --dbs 48 --total-batch-size 786432; 6.6b, 7b: 24 and 393216) and, for
    /// --plan, its node (8 GPUs of 187.5 GB); flags given explicitly override them.
    #[arg(long)]
    preset: Option<String>,
    /// Key/value heads (grouped-query attention); must divide the number of heads (default: all heads).
    #[arg(long, alias = "n_kv_head")]
    n_kv_head: Option<usize>,
    /// With --depth: model_dim = depth x this (default 64, nanochat's). With --head-dim, a narrow model of a deep
    /// model's structure, e.g. to trace a d20 step on the simulated GPU (docs/simulated-gpu.md).
    #[arg(long, alias = "aspect_ratio")]
    aspect_ratio: Option<usize>,
    /// With --depth: the head dimension (default 128); model_dim must be a multiple of it.
    #[arg(long, alias = "head_dim")]
    head_dim: Option<usize>,
    /// Context length in tokens (default 2048).
    #[arg(long, alias = "max_seq_len")]
    max_seq_len: Option<usize>,

    // --- batch and horizon
    /// Sequences per GPU per forward/backward (default 32).
    #[arg(long, visible_alias = "dbs", alias = "device_batch_size")]
    device_batch_size: Option<usize>,
    /// Tokens per optimizer step over all GPUs; a multiple of dbs x seq_len x world_size (default 524288).
    #[arg(long, alias = "total_batch_size")]
    total_batch_size: Option<usize>,
    /// Optimizer steps to run; overrides --target-flops and --target-param-data-ratio.
    #[arg(long, alias = "num_iterations")]
    num_iterations: Option<u64>,
    /// Train for this many FLOPs (e.g. 4e20); overrides --target-param-data-ratio.
    #[arg(long, alias = "target_flops")]
    target_flops: Option<f64>,
    /// Train on this many tokens per parameter (default 20, Chinchilla).
    #[arg(long, alias = "target_param_data_ratio")]
    target_param_data_ratio: Option<f64>,

    // --- optimizer
    /// AdamW lr of the token embedding, before (d/768)^-0.5 scaling.
    #[arg(long, alias = "embedding_lr", default_value_t = 0.2)]
    embedding_lr: f32,
    /// AdamW lr of lm_head, before (d/768)^-0.5 scaling.
    #[arg(long, alias = "unembedding_lr", default_value_t = 0.004)]
    unembedding_lr: f32,
    /// Muon lr of the block matrices.
    #[arg(long, alias = "matrix_lr", default_value_t = 0.02)]
    matrix_lr: f32,
    /// AdamW decoupled weight decay.
    #[arg(long, alias = "weight_decay", default_value_t = 0.0)]
    weight_decay: f32,
    /// Clip the synchronized gradient to this global norm; 0 disables.
    #[arg(long, alias = "grad_clip", default_value_t = 1.0)]
    grad_clip: f64,
    /// Fraction of steps spent warming the lr up from 0.
    #[arg(long, alias = "warmup_ratio", default_value_t = 0.0)]
    warmup_ratio: f64,
    /// Fraction of steps at the end spent decaying the lr linearly.
    #[arg(long, alias = "warmdown_ratio", default_value_t = 0.2)]
    warmdown_ratio: f64,
    /// lr multiplier reached at the last step.
    #[arg(long, alias = "final_lr_frac", default_value_t = 0.0)]
    final_lr_frac: f64,

    // --- evaluation, samples, checkpoints
    /// Evaluate validation bits per byte every this many steps (also at the first and last; 0: only those).
    #[arg(long, alias = "eval_every")]
    eval_every: Option<u64>,
    /// Validation tokens per evaluation (default 20 x 524288).
    #[arg(long, alias = "eval_tokens")]
    eval_tokens: Option<usize>,
    /// Print samples every this many steps (also at the end; 0: only at the end).
    #[arg(long, alias = "sample_every")]
    sample_every: Option<u64>,
    /// Save a checkpoint every this many steps (always at the end and on Ctrl-C; 0: only those).
    #[arg(long, alias = "save_every", default_value_t = 0)]
    save_every: u64,
    /// Evaluate the CORE metric every this many steps and at the last step (default 2000, nanochat's; without
    /// --data-dir, never); -1 or 0: never. Off, with one line saying how to get it, when there is no eval bundle.
    #[arg(long, alias = "core_metric_every", allow_negative_numbers = true)]
    core_metric_every: Option<i64>,
    /// Examples per task in the CORE estimate during training (nanochat's default; -1 or 0: all).
    #[arg(long, alias = "core_metric_max_per_task", default_value_t = NANOCHAT_CORE_METRIC_MAX_PER_TASK as i64, allow_negative_numbers = true)]
    core_metric_max_per_task: i64,
    /// The CORE eval bundle folder (default $NANOCHAT_BASE_DIR/eval_bundle or ~/.cache/nanochat/eval_bundle).
    #[arg(long)]
    eval_bundle: Option<String>,
    /// Name of the run, used for the default --out-dir runs/<model-tag> (default d<depth>; a model narrower or
    /// wider than nanochat's for its depth adds its width: the embedded default is d4-w128).
    #[arg(long, alias = "model_tag")]
    model_tag: Option<String>,

    // --- files and devices
    /// Folder of token shards and tokenizer (from nc-data); without it, trains on the embedded corpus.
    #[arg(long, alias = "data_dir")]
    data_dir: Option<String>,
    /// Where metrics.jsonl and checkpoints/ go (default runs/<model-tag>).
    #[arg(long, alias = "out_dir")]
    out_dir: Option<String>,
    /// Resume from the newest checkpoint in --out-dir whose files verify against their checksums (saying which
    /// newer ones it skipped), or from the checkpoint folder given. Without it, a run refuses an out dir that
    /// already holds a run.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest")]
    resume: Option<String>,
    /// Compute backend: cpu, cuda (GPUs, f32 or the bf16 engine per --precision; not yet verified on a GPU) or
    /// auto (the CPU, for now).
    #[arg(long, default_value = "auto")]
    backend: String,
    /// With --backend cuda: let the GEMMs use TF32 tensor cores (faster, 10-bit mantissa inputs) instead of
    /// strict f32.
    #[arg(long)]
    tf32: bool,
    /// Number of ranks (GPUs) training together (default 1; with --plan and a 3b/6.6b/7b preset, 8). Above 1,
    /// nc-train starts one process per rank on this machine and supervises them; under a launcher (torchrun,
    /// srun) WORLD_SIZE says it.
    #[arg(long, alias = "world_size")]
    world_size: Option<usize>,
    /// Ranks to start on this machine, one process each (also at 1: the multi-process path with one rank);
    /// the same as --world-size on one machine.
    #[arg(long, alias = "nproc_per_node")]
    nproc_per_node: Option<usize>,
    /// Collectives between ranks: auto (CUDA: nc's peer-to-peer ring inside one node when every pair of GPUs
    /// can reach each other, NCCL across nodes or without P2P; CPU: the shared-memory ring), ring (the P2P
    /// ring or an error saying why not; it also lets ranks share GPUs, local rank i on GPU i mod GPUs, to check
    /// correctness on fewer GPUs) or nccl (one rank a GPU). One line at start-up says which and why. The P2P
    /// ring's one-shot threshold: NC_P2P_ONE_SHOT_BYTES (see README).
    #[arg(long, default_value = "auto")]
    comm: String,
    /// Seed of the initialization and of sampling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Stop (saving a checkpoint, as on Ctrl-C) when this step is reached; continue later with --resume.
    #[arg(long, alias = "stop_at_step")]
    stop_at_step: Option<u64>,
    /// Profile steps A to B (inclusive) only: the CUDA profiler's capture starts before step A and stops after
    /// step B (run under `nsys profile --capture-range=cudaProfilerApi`; scripts/profile.sh). Needs --backend
    /// cuda.
    #[arg(long, alias = "profile_steps", value_name = "A:B")]
    profile_steps: Option<String>,

    // --- the plan
    /// Print the memory, time and cost plan of this configuration and exit (runs nothing).
    #[arg(long)]
    plan: bool,
    /// With --plan: print the plan as one JSON object.
    #[arg(long)]
    json: bool,
    /// Activation recomputation: none, selective, full, or auto (the cheapest that fits).
    #[arg(long, default_value = "auto")]
    recompute: String,
    /// GPU to plan for: h100, h200, b200, a100 (default h100).
    #[arg(long)]
    gpu: Option<String>,
    /// Memory per GPU, in GiB or with a unit (e.g. 187.5GB); overrides the named GPU's memory.
    #[arg(long)]
    gpu_mem: Option<String>,
    /// Training precision: fp32 (default) or bf16 (f32 master weights, bf16 working weights and
    /// activations; on --backend cpu the CPU twin of the bf16 engine). With --plan, the precision planned
    /// on a GPU: bf16 (default) or fp32 (the default with --backend cuda).
    #[arg(long)]
    precision: Option<String>,
    /// Model FLOPs utilization assumed for time estimates, in (0, 1].
    #[arg(long, default_value_t = 0.5)]
    mfu: f64,
    /// Price of one GPU-hour, for the cost estimate.
    #[arg(long)]
    usd_per_gpu_hour: Option<f64>,

    // --- nanochat's base_train flags with no meaning here: accepted, each with a one-line note of what nc does
    // instead, so a nanochat command line runs
    /// nanochat's wandb run name; nc logs to <out-dir>/metrics.jsonl instead (accepted, with a note).
    #[arg(long)]
    run: Option<String>,
    /// nanochat's device (cuda|cpu|mps); nc's is --backend (accepted, with a note).
    #[arg(long, alias = "device_type")]
    device_type: Option<String>,
    /// nanochat's FP8 training; nc trains in fp32 or bf16 (--precision) (accepted, with a note).
    #[arg(long)]
    fp8: bool,
    /// nanochat's FP8 scaling recipe (accepted, with a note).
    #[arg(long, alias = "fp8_recipe")]
    fp8_recipe: Option<String>,
    /// nanochat's sliding-window pattern; nc attends over the full context in every layer (accepted, with a
    /// note).
    #[arg(long, alias = "window_pattern")]
    window_pattern: Option<String>,
    /// nanochat's resume step (-1: none): resumes <out-dir>/checkpoints/step_N, as --resume PATH does.
    #[arg(long, alias = "resume_from_step", allow_negative_numbers = true)]
    resume_from_step: Option<i64>,
}

/// One line for each of nanochat's flags that nc accepts without using: what nc does instead.
fn nanochat_notes(cli: &Cli) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(r) = &cli.run {
        notes.push(format!(
            "--run {r}: nanochat's wandb run name; nc logs every step to <out-dir>/metrics.jsonl instead (name the \
             folder with --model-tag or --out-dir)"
        ));
    }
    if let Some(d) = &cli.device_type {
        notes.push(format!(
            "--device-type {d}: nanochat's device; nc picks it with --backend (cpu, cuda, or auto: now {})",
            cli.backend
        ));
    }
    if cli.fp8 || cli.fp8_recipe.is_some() {
        notes.push(
            "--fp8/--fp8-recipe: nc has no FP8 training; it trains in fp32 or bf16 (--precision bf16)".to_string(),
        );
    }
    if let Some(w) = &cli.window_pattern {
        notes.push(format!(
            "--window-pattern {w}: nc has no sliding-window attention; every layer attends over the whole context \
             (nanochat's pattern L)"
        ));
    }
    if let Some(n) = cli.resume_from_step {
        notes.push(if n < 0 {
            format!("--resume-from-step {n}: no resume (nc's own flag: --resume [PATH])")
        } else {
            format!(
                "--resume-from-step {n}: resumes checkpoints/step_{n:06} of the out dir (nc's own flag: --resume PATH)"
            )
        });
    }
    notes
}

fn print_notes(cli: &Cli) {
    for n in nanochat_notes(cli) {
        eprintln!("nc-train: note: {n}");
    }
}

/// The embedded default run (no --data-dir): a 4-layer, 128-wide model on the embedded corpus.
const EMBEDDED_LAYERS: usize = 4;
const EMBEDDED_DIM: usize = 128;
const EMBEDDED_HEAD_DIM: usize = 64;
const EMBEDDED_SEQ: usize = 128;
const EMBEDDED_DBS: usize = 16;
const EMBEDDED_STEPS: u64 = 300;
const EMBEDDED_EVAL_EVERY: u64 = 100;
const EMBEDDED_EVAL_TOKENS: usize = 8 * 16 * 128;

/// nanochat's defaults for a full-size run (SPEC.md section 5).
const DEFAULT_DEPTH: usize = 20;
const DEFAULT_DBS: usize = 32;
const DEFAULT_TOTAL_BATCH: usize = 524288;

/// Without --data-dir, models larger than this are refused: the embedded corpus (about 0.5M tokens) is for the
/// small default, and a model of this size would only memorize it.
const EMBEDDED_MAX_PARAMS: u64 = 100_000_000;

/// The scaling plan's batch of the --preset given, if it has one (3b, 6.6b, 7b).
fn preset_batch(cli: &Cli) -> Option<PresetBatch> {
    cli.preset.as_deref().and_then(config::preset_batch)
}

/// --dbs, or the preset's, or `default`.
fn device_batch_size(cli: &Cli, default: usize) -> usize {
    cli.device_batch_size
        .or(preset_batch(cli).map(|b| b.device_batch_size))
        .unwrap_or(default)
}

/// --total-batch-size, or the preset's.
fn total_batch_size(cli: &Cli) -> Option<usize> {
    cli.total_batch_size.or(preset_batch(cli).map(|b| b.total_batch_size))
}

fn model_from_flags(cli: &Cli) -> Result<ModelConfig> {
    let shaped = cli.aspect_ratio.is_some() || cli.head_dim.is_some();
    let mut model = match (&cli.preset, cli.depth) {
        (Some(_), Some(_)) => return Err(NcError::new("give --depth or --preset, not both")),
        (_, None) if shaped => return Err(NcError::new("--aspect-ratio and --head-dim need --depth")),
        (Some(p), None) => ModelConfig::preset(p)?,
        (None, Some(d)) if shaped => shaped_model(cli, d)?,
        (None, d) => ModelConfig::from_depth(d.unwrap_or(DEFAULT_DEPTH))?,
    };
    if let Some(kv) = cli.n_kv_head {
        model = model.with_kv_heads(kv)?;
    }
    if let Some(t) = cli.max_seq_len {
        model = model.with_sequence_len(t)?;
    }
    Ok(model)
}

/// --depth with --aspect-ratio and/or --head-dim: model_dim = depth x aspect ratio, heads of head_dim.
fn shaped_model(cli: &Cli, depth: usize) -> Result<ModelConfig> {
    let aspect = cli.aspect_ratio.unwrap_or(config::ASPECT_RATIO);
    let head_dim = cli.head_dim.unwrap_or(config::HEAD_DIM);
    let n_embd = depth * aspect;
    if depth == 0 || aspect == 0 || head_dim == 0 || !n_embd.is_multiple_of(head_dim) {
        return Err(NcError::new(format!(
            "--depth {depth} x --aspect-ratio {aspect} = model_dim {n_embd}, which must be a positive multiple of \
             --head-dim {head_dim}; change one of them"
        )));
    }
    let n_head = n_embd / head_dim;
    ModelConfig::new(
        depth,
        n_embd,
        n_head,
        n_head,
        head_dim,
        config::DEFAULT_VOCAB_SIZE,
        config::DEFAULT_SEQ_LEN,
    )
}

fn check_common(cli: &Cli) -> Result<()> {
    if cli.json && !cli.plan {
        return Err(NcError::new("--json only applies to --plan; add --plan or drop --json"));
    }
    transport::CommFlag::parse(&cli.comm)?;
    if cli.world_size == Some(0) || cli.nproc_per_node == Some(0) {
        return Err(NcError::new("--world-size and --nproc-per-node must be at least 1"));
    }
    if !matches!(cli.backend.as_str(), "auto" | "cpu" | "cuda") {
        return Err(NcError::new(format!(
            "--backend '{}' is not one of auto, cpu, cuda",
            cli.backend
        )));
    }
    for (name, v) in [
        ("--warmup-ratio", cli.warmup_ratio),
        ("--warmdown-ratio", cli.warmdown_ratio),
    ] {
        if !(0.0..=1.0).contains(&v) {
            return Err(NcError::new(format!("{name} {v} must be between 0 and 1")));
        }
    }
    if cli.warmup_ratio + cli.warmdown_ratio > 1.0 {
        return Err(NcError::new("--warmup-ratio plus --warmdown-ratio must not exceed 1"));
    }
    Ok(())
}

fn plan_from_flags(cli: &Cli) -> Result<Plan> {
    let mut model = model_from_flags(cli)?;
    // with a data dir, plan with its tokenizer's vocabulary, as the run will
    if let Some(dir) = &cli.data_dir {
        let tok = nc_core::data::load_tokenizer(&PathBuf::from(dir).join("tokenizer"))
            .map_err(|e| e.context(format!("--plan --data-dir {dir}")))?;
        model = model.with_vocab_size(tok.vocab_size())?;
    }
    // a preset of the scaling plan is planned on the plan's node unless told otherwise
    let node = preset_batch(cli);
    let batch = BatchPlan::new(
        device_batch_size(cli, DEFAULT_DBS),
        model.sequence_len,
        total_batch_size(cli).unwrap_or(DEFAULT_TOTAL_BATCH),
        cli.world_size.or(node.map(|b| b.world_size)).unwrap_or(1),
    )?;
    let horizon = Horizon::from_flags(cli.num_iterations, cli.target_flops, cli.target_param_data_ratio)?;
    let gpu_precision = match (cli.precision.as_deref(), cli.backend.as_str()) {
        (Some("bf16"), "cpu") => {
            return Err(NcError::new(
                "--plan with --backend cpu prices the host's f32 buffers; drop --precision, or plan a GPU (no --backend cpu)",
            ))
        }
        (Some("bf16"), _) => Precision::Bf16,
        (Some("fp32"), _) => Precision::Fp32Gpu,
        (Some(other), _) => return Err(NcError::new(format!("--precision '{other}' is not one of bf16, fp32"))),
        (None, "cuda") => Precision::Fp32Gpu,
        (None, _) => Precision::Bf16,
    };
    let (precision, device, mem) = if cli.backend == "cpu" {
        let mem = match &cli.gpu_mem {
            Some(s) => plan::parse_mem_size(s)?,
            None => plan::host_memory_bytes().ok_or_else(|| {
                NcError::new(
                    "cannot read the host memory size from /proc/meminfo; give --gpu-mem (e.g. --gpu-mem 64GiB)",
                )
            })?,
        };
        (Precision::Fp32, "cpu".to_string(), mem)
    } else {
        let gpu = plan::gpu_by_name(cli.gpu.as_deref().unwrap_or("h100"))?;
        let node_mem = match (node, &cli.gpu) {
            (Some(b), None) => Some(format!("{}GB", b.gpu_mem_gb)),
            _ => None,
        };
        match cli.gpu_mem.as_ref().or(node_mem.as_ref()) {
            // --gpu-mem alone sizes a GPU that is not one of the named ones: do not call it an h100
            Some(s) => {
                let name = if cli.gpu.is_some() { gpu.name } else { "gpu" };
                (gpu_precision, name.to_string(), plan::parse_mem_size(s)?)
            }
            None => (gpu_precision, gpu.name.to_string(), gpu.mem_bytes),
        }
    };
    if let Some(u) = cli.usd_per_gpu_hour {
        if !(u.is_finite() && u >= 0.0) {
            return Err(NcError::new(format!(
                "--usd-per-gpu-hour {u} must be a non-negative number"
            )));
        }
    }
    Plan::new(&PlanRequest {
        model,
        batch,
        horizon,
        precision,
        device,
        device_mem_bytes: mem,
        recompute: Recompute::parse(&cli.recompute)?,
        mfu: cli.mfu,
        usd_per_gpu_hour: cli.usd_per_gpu_hour,
    })
}

/// `nc-train --plan | head` closes stdout early; print! would panic there, so write and let a closed pipe go.
fn print_ignoring_closed_pipe(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn run(cli: Cli) -> Result<Outcome> {
    // printed once: by this process, or by rank 0 where this one supervises ranks or is one (run_worker)
    let ranks = std::env::var_os("RANK").is_some() || processes_to_start(&cli).ok().flatten().is_some();
    if !ranks || cli.plan {
        print_notes(&cli);
    }
    check_common(&cli)?;
    if cli.plan {
        let plan = plan_from_flags(&cli)?;
        if cli.json {
            let text = serde_json::to_string(&plan).map_err(|e| NcError::new(format!("plan to JSON: {e}")))?;
            print_ignoring_closed_pipe(&format!("{text}\n"));
        } else {
            print_ignoring_closed_pipe(&plan.render());
        }
        return Ok(Outcome::Finished);
    }
    if let Some(env) = WorkerEnv::from_env()? {
        let rank = env.rank;
        return run_worker(cli, env).map_err(|e| e.with_rank(rank));
    }
    // checked before any process starts, so a bad flag is one error, not one per rank
    let cfg = train_config_from_flags(&cli)?;
    let on_cuda = backend_is_cuda(&cli, &cfg)?;
    out_dir::check_fresh_run(&cfg.out_dir, cfg.resume != Resume::No)?;
    if let Some(n) = processes_to_start(&cli)? {
        if on_cuda {
            // one process per GPU (NCCL refuses two ranks on one GPU), except that --comm ring may share GPUs:
            // said before starting any
            transport::p2p_options()?; // a bad NC_P2P_ONE_SHOT_BYTES is one error here, not one per rank
            transport::gpu_for_rank(transport::CommFlag::parse(&cli.comm)?, 0, n, cuda::device_count())?;
        }
        let exe = std::env::current_exe()
            .map_err(|e| NcError::new(format!("finding nc-train's own executable to start the ranks: {e}")))?;
        let code = supervise::supervise(&SupervisorConfig {
            nprocs: n,
            cpu: !on_cuda,
            exe,
            args: std::env::args_os().skip(1).collect(),
            grace: supervise::GRACE,
        })?;
        return Ok(Outcome::Code(code));
    }
    signal::install_handlers(true);
    let summary = if on_cuda {
        // one GPU in --precision's scheme (bf16 engine, or strict f32); the device check comes before anything
        // is written
        train::train_on(&cfg, train::cuda_device(0, cli.tf32, cfg.precision)?)?
    } else {
        train::train(&cfg)?
    };
    Ok(if summary.stopped_early {
        Outcome::Stopped
    } else {
        Outcome::Finished
    })
}

/// Whether to train on the GPU (--backend cuda) or the CPU; --tf32 and --profile-steps only with cuda. Either
/// backend takes either precision (bf16 on the CPU is the twin of the CUDA bf16 engine).
fn backend_is_cuda(cli: &Cli, cfg: &TrainConfig) -> Result<bool> {
    if cli.tf32 && cli.backend != "cuda" {
        return Err(NcError::new(
            "--tf32 sets how the CUDA backend's GEMMs round; it needs --backend cuda",
        ));
    }
    if cfg.profile_steps.is_some() && cli.backend != "cuda" {
        return Err(NcError::new(
            "--profile-steps starts and stops the CUDA profiler's capture; it needs --backend cuda",
        ));
    }
    Ok(match cli.backend.as_str() {
        "cuda" => true,
        "cpu" => false,
        // auto stays on the CPU until the CUDA path has passed its GPU check (scripts/gpu_check.sh)
        _ => {
            if cuda::device_count() > 0 {
                eprintln!(
                    "nc-train: a CUDA device is visible, but --backend auto trains on the CPU until the CUDA \
                     path has passed its GPU check; --backend cuda trains on the GPU"
                );
            }
            false
        }
    })
}

/// How many worker processes this nc-train (not started by a launcher) supervises: --nproc-per-node N (even
/// 1), or --world-size N above 1; None to train in this process.
fn processes_to_start(cli: &Cli) -> Result<Option<usize>> {
    match (cli.world_size, cli.nproc_per_node) {
        (Some(w), Some(n)) if w != n => Err(NcError::new(format!(
            "--world-size {w} with --nproc-per-node {n}: nc-train starts ranks on this machine only, so they must \
             agree; for several machines start nc-train under torchrun or srun (see README)"
        ))),
        (_, Some(n)) => Ok(Some(n)),
        (Some(w), None) if w > 1 => Ok(Some(w)),
        _ => Ok(None),
    }
}

/// One rank started by a launcher (this binary's supervisor, torchrun, an srun wrapper): its world comes from
/// the environment; it meets the others at the rendezvous, checking that all run the same job, joins their
/// collective and trains its share.
fn run_worker(mut cli: Cli, env: WorkerEnv) -> Result<Outcome> {
    if env.rank == 0 {
        print_notes(&cli);
    }
    if let Some(w) = cli.world_size {
        if w != env.world_size {
            return Err(NcError::new(format!(
                "WORLD_SIZE={} (from the launcher) and --world-size {w} differ; drop --world-size, the launcher's \
                 wins",
                env.world_size
            )));
        }
    }
    if let Some(n) = cli.nproc_per_node {
        if n != env.local_world_size {
            return Err(NcError::new(format!(
                "LOCAL_WORLD_SIZE={} (from the launcher) and --nproc-per-node {n} differ; drop --nproc-per-node",
                env.local_world_size
            )));
        }
    }
    cli.world_size = Some(env.world_size);
    let mut cfg = train_config_from_flags(&cli)?;
    cfg.verbose = env.rank == 0;
    let on_cuda = backend_is_cuda(&cli, &cfg)?;
    // every rank checks before the rendezvous, so none has written anything yet
    out_dir::check_fresh_run(&cfg.out_dir, cfg.resume != Resume::No)?;
    signal::install_handlers(env.rank == 0);
    let comm_flag = transport::CommFlag::parse(&cli.comm)?;
    let mut fingerprint = launch::fingerprint(&cfg, if on_cuda { "cuda" } else { "cpu" })?;
    fingerprint.push(("--comm".into(), cli.comm.clone()));
    let mut rdv = launch::rendezvous(&env, &fingerprint)?;
    let summary = if on_cuda {
        // The transport (`--comm`, `transport::choose_transport`: the peer-to-peer ring inside a node, NCCL
        // across nodes or at --comm nccl, NCCL's one-rank communicator at world size 1, so a one-GPU machine
        // checks launch and NCCL init), then GPU LOCAL_RANK (shared over the ring with --comm ring and more ranks
        // than GPUs) and the device ZeRO-1 exchange on a communication stream of it. UNVERIFIED: not yet run on
        // a GPU.
        let gpus = cuda::device_count();
        let (gpu, sharing) = transport::gpu_for_rank(comm_flag, env.local_rank, env.local_world_size, gpus)?;
        let p2p_opts = transport::p2p_options()?;
        let at = transport::Placement {
            on_cuda: true,
            world_size: env.world_size,
            local_world_size: env.local_world_size,
        };
        let choice = transport::choose_transport(
            comm_flag,
            at,
            p2p_opts.one_shot_bytes,
            &mut || transport::probe_p2p(env.rank, gpu, &mut rdv),
            env.rank == 0,
        )?;
        if choice.transport != transport::Transport::P2pRing {
            // NCCL: one rank a GPU (gpu_for_rank allowed sharing for --comm ring only)
            launch::check_gpus_for_ranks(env.local_world_size, gpus)?;
        }
        let mut device = train::cuda_device(gpu, cli.tf32, cfg.precision)?;
        if sharing.is_some() {
            // the memory plan gives each rank its share of the GPU
            device.replicas_sharing_memory = env.local_world_size.div_ceil(gpus);
        }
        let comm: Box<dyn RankCollective<cuda::CudaBackend>> = if choice.transport == transport::Transport::P2pRing {
            if let (Some(line), 0) = (&sharing, env.rank) {
                println!("launch: {line}");
            }
            let ring = transport::join_p2p(env.rank, &device.be, &mut rdv, p2p_opts)?;
            if env.rank == 0 {
                println!(
                    "launch: rank {} of {} on GPU {gpu}; peer-to-peer ring joined (one-shot up to {} bytes)",
                    env.rank, env.world_size, p2p_opts.one_shot_bytes
                );
            }
            Box::new(P2pExchange::on_gpu(ring))
        } else {
            let nccl = launch::join_nccl(&env, &mut rdv, &device.be)?;
            if env.rank == 0 {
                println!(
                    "launch: rank {} of {} on GPU {gpu}; NCCL {}",
                    env.rank,
                    env.world_size,
                    if nccl.uses_nccl() {
                        "communicator initialized"
                    } else {
                        "not found (not needed for one rank)"
                    }
                );
            }
            Box::new(NcclExchange::new(nccl))
        };
        // the exchange (and its NCCL watchdog) ends inside, before the rendezvous says goodbye here
        let s = train::train_as_rank(&cfg, env.rank, Some(comm), device)?;
        drop(rdv);
        s
    } else {
        let comm: Option<Box<dyn RankCollective<nc_core::backend::cpu::CpuBackend>>> = if env.world_size > 1 {
            let at = transport::Placement {
                on_cuda: false,
                world_size: env.world_size,
                local_world_size: env.local_world_size,
            };
            transport::choose_transport(comm_flag, at, 0, &mut || Ok(None), env.rank == 0)?;
            Some(Box::new(HostRanks::new(Box::new(launch::join_cpu_ring(&env, rdv)?))))
        } else {
            None
        };
        let device = train::cpu_device(env.world_size, env.local_world_size);
        train::train_as_rank(&cfg, env.rank, comm, device)?
    };
    Ok(if summary.stopped_early {
        Outcome::Stopped
    } else {
        Outcome::Finished
    })
}

/// How a run ended without an error.
#[derive(Debug)]
enum Outcome {
    Finished,
    /// Stopped early on request (Ctrl-C, SIGTERM, --stop-at-step), after saving a checkpoint.
    Stopped,
    /// The supervisor's workers ended: the first failure's exit code (0 if none failed).
    Code(i32),
}

/// The embedded default: a model small enough to learn the embedded corpus on 2 CPU cores in minutes.
fn embedded_model() -> Result<ModelConfig> {
    ModelConfig::new(
        EMBEDDED_LAYERS,
        EMBEDDED_DIM,
        EMBEDDED_DIM / EMBEDDED_HEAD_DIM,
        EMBEDDED_DIM / EMBEDDED_HEAD_DIM,
        EMBEDDED_HEAD_DIM,
        512,
        EMBEDDED_SEQ,
    )
}

/// Flags to a training configuration. Without --data-dir the defaults are the embedded run's; with it,
/// nanochat's.
fn train_config_from_flags(cli: &Cli) -> Result<TrainConfig> {
    let embedded = cli.data_dir.is_none();
    let shaped = cli.aspect_ratio.is_some() || cli.head_dim.is_some();
    let model = if embedded && cli.depth.is_none() && cli.preset.is_none() && !shaped {
        let mut m = embedded_model()?;
        if let Some(kv) = cli.n_kv_head {
            m = m.with_kv_heads(kv)?;
        }
        if let Some(t) = cli.max_seq_len {
            m = m.with_sequence_len(t)?;
        }
        m
    } else {
        model_from_flags(cli)?
    };
    if embedded && model.num_params() > EMBEDDED_MAX_PARAMS {
        return Err(NcError::new(format!(
            "a d{} model ({:.2}B parameters) with no --data-dir would train on the embedded corpus, which is for the \
             small default model only; prepare real data (nc-data download, then nc-data train-tokenizer and nc-data \
             tokenize; see README, Data) and pass --data-dir DATA (for a smoke test without downloads: nc-data synth \
             --out DATA)",
            model.n_layer,
            model.num_params() as f64 / 1e9
        )));
    }
    let world_size = cli.world_size.unwrap_or(1);
    let dbs = device_batch_size(cli, if embedded { EMBEDDED_DBS } else { DEFAULT_DBS });
    let total = total_batch_size(cli).unwrap_or(if embedded {
        dbs * model.sequence_len * world_size
    } else {
        DEFAULT_TOTAL_BATCH
    });
    // checked here too so a bad batch fails before any data is read
    BatchPlan::new(dbs, model.sequence_len, total, world_size)?;
    let num_iterations = match (
        embedded,
        cli.num_iterations,
        cli.target_flops,
        cli.target_param_data_ratio,
    ) {
        (true, None, None, None) => Some(EMBEDDED_STEPS),
        (_, n, _, _) => n,
    };
    let horizon = Horizon::from_flags(num_iterations, cli.target_flops, cli.target_param_data_ratio)?;
    let model_tag = cli.model_tag.clone().unwrap_or_else(|| default_model_tag(&model));
    let out_dir = PathBuf::from(cli.out_dir.clone().unwrap_or_else(|| format!("runs/{model_tag}")));
    let resume = match (cli.resume.as_deref(), cli.resume_from_step) {
        (Some(_), Some(n)) if n >= 0 => {
            return Err(NcError::new(
                "--resume and --resume-from-step both say where to resume from; give one",
            ))
        }
        // nanochat's spelling: the step's folder in this run's out dir
        (None, Some(n)) if n >= 0 => {
            Resume::Path(checkpoint::checkpoints_dir(&out_dir).join(checkpoint::step_dir_name(n as u64)))
        }
        (None, _) => Resume::No,
        (Some("latest"), _) => Resume::Latest,
        (Some(p), _) => Resume::Path(PathBuf::from(p)),
    };
    let recompute = Recompute::parse(&cli.recompute)?;
    Ok(TrainConfig {
        model,
        device_batch_size: dbs,
        total_batch_size: total,
        world_size,
        horizon,
        optim: OptimConfig {
            matrix_lr: cli.matrix_lr,
            embedding_lr: cli.embedding_lr,
            unembedding_lr: cli.unembedding_lr,
            adam: AdamParams {
                weight_decay: cli.weight_decay,
                ..AdamParams::default()
            },
        },
        grad_clip: cli.grad_clip,
        warmup_ratio: cli.warmup_ratio,
        warmdown_ratio: cli.warmdown_ratio,
        final_lr_frac: cli.final_lr_frac,
        eval_every: cli
            .eval_every
            .unwrap_or(if embedded { EMBEDDED_EVAL_EVERY } else { 250 }),
        eval_tokens: cli
            .eval_tokens
            .unwrap_or(if embedded { EMBEDDED_EVAL_TOKENS } else { 20 * 524288 }),
        sample_every: cli.sample_every.unwrap_or(if embedded { 0 } else { 2000 }),
        save_every: cli.save_every,
        sample_tokens: if embedded { 24 } else { 16 },
        model_tag,
        data: match &cli.data_dir {
            None => DataSource::embedded(),
            Some(d) => DataSource::Dir(PathBuf::from(d)),
        },
        out_dir,
        resume,
        seed: cli.seed,
        recompute,
        precision: match cli.precision.as_deref() {
            None => Precision::Fp32,
            Some(s) => Precision::parse(s)?,
        },
        stop_at_step: cli.stop_at_step,
        profile_steps: cli.profile_steps.as_deref().map(parse_profile_steps).transpose()?,
        core_metric: CoreMetricConfig {
            every: cli
                .core_metric_every
                .unwrap_or(if embedded { 0 } else { NANOCHAT_CORE_METRIC_EVERY as i64 })
                .max(0) as u64,
            max_per_task: cli.core_metric_max_per_task.max(0) as usize,
            bundle: cli.eval_bundle.as_ref().map(PathBuf::from),
        },
        verbose: true,
    })
}

/// The default --model-tag, hence out dir: d<depth> as nanochat's, with the width added when it is not
/// nanochat's for that depth (the embedded default, 4 layers 128 wide, is d4-w128), so the embedded default and
/// `--depth 4` never share a folder.
fn default_model_tag(model: &ModelConfig) -> String {
    let standard = ModelConfig::from_depth(model.n_layer).is_ok_and(|m| m.n_embd == model.n_embd);
    if standard {
        model.model_tag()
    } else {
        format!("{}-w{}", model.model_tag(), model.n_embd)
    }
}

/// `--profile-steps A:B`: the first and last step to capture, A <= B.
fn parse_profile_steps(s: &str) -> Result<(u64, u64)> {
    let bad = || {
        NcError::new(format!(
            "--profile-steps '{s}' is not A:B with step numbers A <= B (e.g. --profile-steps 10:12 captures steps \
             10, 11 and 12)"
        ))
    };
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    let (a, b): (u64, u64) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a > b {
        return Err(bad());
    }
    Ok((a, b))
}

/// This process's rank when a launcher started it as one rank of several (RANK; this binary's supervisor sets
/// it for its workers), for its error line.
fn rank_of_this_process() -> Option<String> {
    std::env::var("RANK").ok().filter(|r| !r.trim().is_empty())
}

/// The line that ends a failed run. In a rank of several processes, whose lines interleave with the other
/// ranks' in one terminal or log, the error is one line that starts with the rank: a message of several lines
/// (the allocator's out-of-memory report and its advice) is joined, so that no part of it stands without the
/// rank and the output's last line names the rank and the cause. One process keeps the message's own lines.
fn error_line(e: &NcError, rank: Option<&str>) -> String {
    let Some(rank) = rank else {
        return format!("nc-train: error: {e}");
    };
    // the error seen by this process's rank (a worker's errors carry it) names it once; another rank it names
    // is part of the cause
    let cause = match e.rank {
        Some(seen_by) if seen_by.to_string() == rank => e.message.clone(),
        _ => e.to_string(),
    };
    let joined = cause
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    format!("nc-train: error: rank {rank}: {joined}")
}

/// Every panic ends the process at once, with one line that names its cause (and the rank, in a rank of
/// several processes: `error_line`). A panic here is a bug or a device that failed under the run (a CUDA
/// error the backend cannot recover from: after a faulted kernel the device's context is broken and every
/// later call fails, as after an out-of-memory the batch cannot proceed). Either way the run cannot go on and
/// the checkpoints already saved are what is left (each is renamed into place only when complete). Unwinding
/// would run the device's destructors, whose calls fail in turn and bury the cause under their warnings; a
/// rank that hung on would leave the others waiting. The process ends with `_exit`, not `exit`: exit handlers
/// of a driver whose context faulted can hang or crash and lose the code. RUST_BACKTRACE=1 adds the
/// backtrace, before the line.
fn end_run_on_panic() {
    let backtrace = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
    let rank = rank_of_this_process();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("a panic without a message");
        if backtrace {
            eprintln!("{}", std::backtrace::Backtrace::force_capture());
        }
        let at = info
            .location()
            .map(|l| format!(" (at {}:{})", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("{}{at}", error_line(&NcError::new(message), rank.as_deref()));
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // SAFETY: _exit ends the process at once; nothing after it runs.
        unsafe { libc::_exit(101) }
    }));
}

fn main() -> ExitCode {
    end_run_on_panic();
    let cli = Cli::parse();
    match run(cli) {
        Ok(Outcome::Finished) => ExitCode::SUCCESS,
        // the shell's convention for "interrupted"; the checkpoint to resume from is saved
        Ok(Outcome::Stopped) => ExitCode::from(130),
        Ok(Outcome::Code(c)) => ExitCode::from(c.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("{}", error_line(&e, rank_of_this_process().as_deref()));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("nc-train").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn a_rank_ends_with_one_line_naming_it_and_the_cause() {
        let report = "out of memory on cuda:1: tried to allocate 244 B\nWhat to do: lower the device batch size";
        let joined = "out of memory on cuda:1: tried to allocate 244 B What to do: lower the device batch size";
        assert_eq!(
            error_line(&NcError::new(report), Some("1")),
            format!("nc-train: error: rank 1: {joined}")
        );
        // the rank already named (the worker's errors carry it): not twice
        assert_eq!(
            error_line(&NcError::at_rank(1, report), Some("1")),
            format!("nc-train: error: rank 1: {joined}")
        );
        // another rank named first is the cause, not this rank's name
        assert_eq!(
            error_line(&NcError::at_rank(10, "x"), Some("1")),
            "nc-train: error: rank 1: rank 10: x"
        );
        // one process: the message's own lines, after the rank of the thread that saw it, if any
        assert_eq!(
            error_line(&NcError::new(report), None),
            format!("nc-train: error: {report}")
        );
        assert_eq!(
            error_line(&NcError::at_rank(1, report), None),
            format!("nc-train: error: rank 1: {report}")
        );
    }

    #[test]
    fn profile_steps_parse_or_say_what_is_wrong() {
        assert_eq!(parse_profile_steps("10:12").unwrap(), (10, 12));
        assert_eq!(parse_profile_steps("5:5").unwrap(), (5, 5));
        for bad in ["12:10", "10", "a:b", "10:", ":3", "-1:2"] {
            let e = parse_profile_steps(bad).unwrap_err().to_string();
            assert!(e.contains("A <= B"), "{bad}: {e}");
        }
        // the CUDA profiler only: refused on the CPU before anything runs
        let c = parse(&["--backend", "cpu", "--profile-steps", "1:2"]);
        let cfg = train_config_from_flags(&c).unwrap();
        assert_eq!(cfg.profile_steps, Some((1, 2)));
        assert!(backend_is_cuda(&c, &cfg)
            .unwrap_err()
            .to_string()
            .contains("--backend cuda"));
    }

    #[test]
    fn dbs_alias_and_underscore_spellings() {
        let c = parse(&["--dbs", "48", "--num_iterations=100", "--depth", "38"]);
        assert_eq!(c.device_batch_size, Some(48));
        assert_eq!(c.num_iterations, Some(100));
        let c = parse(&["--device_batch_size=24", "--total_batch_size=393216"]);
        assert_eq!((c.device_batch_size, c.total_batch_size), (Some(24), Some(393216)));
    }

    #[test]
    fn plan_json_reports_spec_numbers() {
        let c = parse(&[
            "--plan",
            "--json",
            "--depth",
            "52",
            "--dbs",
            "24",
            "--total-batch-size",
            "393216",
            "--world-size",
            "8",
            "--gpu-mem",
            "187.5GB",
        ]);
        let p = plan_from_flags(&c).unwrap();
        let v: serde_json::Value = serde_json::to_value(&p).unwrap();
        assert_eq!(v["params"].as_u64(), Some(2 * 65536 * 3328 + 12 * 52 * 3328 * 3328));
        let f = v["flops_per_token"].as_f64().unwrap();
        assert!((f / 4.70e10 - 1.0).abs() < 0.005);
        assert_eq!(v["grad_accum"].as_u64(), Some(1));
        assert_eq!(v["fits"].as_bool(), Some(true));
        assert!(v["recompute"].as_str().is_some_and(|r| r != "none"));
        for key in ["tokens", "num_iterations", "memory_bytes_per_gpu"] {
            assert!(v[key].is_number(), "{key}");
        }
        // `--plan --json --depth N` alone (nanochat's batch defaults, one H100): SPEC.md's counts and FLOPs
        // (16 B/param of weights, grads, master weights and state: d38 fits an H100 with full recomputation,
        // d52 cannot)
        for (depth, d, flops, fits) in [(38u64, 2432u64, 1.94e10, true), (52, 3328, 4.70e10, false)] {
            let c = parse(&["--plan", "--json", "--depth", &depth.to_string()]);
            let v = serde_json::to_value(plan_from_flags(&c).unwrap()).unwrap();
            assert_eq!(v["params"].as_u64(), Some(2 * 65536 * d + 12 * depth * d * d));
            assert!((v["flops_per_token"].as_f64().unwrap() / flops - 1.0).abs() < 0.005);
            assert_eq!(v["grad_accum"].as_u64(), Some(524288 / (32 * 2048)));
            assert_eq!(v["fits"].as_bool(), Some(fits), "d{depth} on one H100");
        }
    }

    /// `--preset 7b --plan` answers the seed's question: its batch on its node (8 GPUs of 187.5 GB), gradient
    /// accumulation 1; explicit flags override the preset's.
    #[test]
    fn presets_carry_the_scaling_plans_batch() {
        let plan = |args: &[&str]| serde_json::to_value(plan_from_flags(&parse(args)).unwrap()).unwrap();
        for (name, dbs, total) in [("3b", 48u64, 786_432u64), ("6.6b", 24, 393_216), ("7b", 24, 393_216)] {
            let v = plan(&["--plan", "--json", "--preset", name]);
            assert_eq!(v["batch"]["device_batch_size"].as_u64(), Some(dbs), "{name}");
            assert_eq!(v["batch"]["total_batch_size"].as_u64(), Some(total), "{name}");
            assert_eq!(v["batch"]["world_size"].as_u64(), Some(8), "{name}");
            assert_eq!(v["grad_accum"].as_u64(), Some(1), "{name}");
            assert_eq!(v["device_mem_bytes"].as_f64(), Some(187.5e9), "{name}");
        }
        // explicit flags win: a smaller device batch doubles the accumulation, a named GPU its memory
        let v = plan(&["--plan", "--json", "--preset", "7b", "--dbs", "12", "--gpu", "h100"]);
        assert_eq!(v["grad_accum"].as_u64(), Some(2));
        assert_eq!(v["batch"]["total_batch_size"].as_u64(), Some(393_216));
        assert_eq!(v["device"].as_str(), Some("h100"));
        let v = plan(&["--plan", "--json", "--preset", "3b", "--world-size", "2"]);
        assert_eq!(v["grad_accum"].as_u64(), Some(4));
        // the d* presets keep nanochat's defaults, on one GPU
        let v = plan(&["--plan", "--json", "--preset", "d20"]);
        assert_eq!(v["batch"]["device_batch_size"].as_u64(), Some(32));
        assert_eq!(v["batch"]["world_size"].as_u64(), Some(1));
        // a training run takes the preset's batch at its own world size
        let c = parse(&["--preset", "3b", "--data-dir", "/nonexistent"]);
        let t = train_config_from_flags(&c).unwrap();
        assert_eq!(
            (t.device_batch_size, t.total_batch_size, t.world_size),
            (48, 786_432, 1)
        );
    }

    /// A big model without --data-dir is refused with the way to real data; small ones still run embedded.
    #[test]
    fn a_big_model_without_data_is_refused() {
        let e = train_config_from_flags(&parse(&["--depth", "52", "--dbs", "24"])).unwrap_err();
        assert!(
            e.message.contains("embedded corpus") && e.message.contains("nc-data download"),
            "{e}"
        );
        assert!(!e.message.contains('\n'));
        assert!(train_config_from_flags(&parse(&["--depth", "4"])).is_ok());
        assert!(train_config_from_flags(&parse(&["--depth", "52", "--data-dir", "/data"])).is_ok());
    }

    /// The default out dir is runs/<tag>, the tag d<depth>, with the width when it is not nanochat's for that
    /// depth: the embedded default (4 layers, 128 wide) and --depth 4 (256 wide) get different folders.
    #[test]
    fn default_out_dirs_are_per_model() {
        let out = |args: &[&str]| train_config_from_flags(&parse(args)).unwrap().out_dir;
        assert_eq!(out(&[]), PathBuf::from("runs/d4-w128"));
        assert_eq!(out(&["--depth", "4"]), PathBuf::from("runs/d4"));
        assert_eq!(out(&["--depth", "2"]), PathBuf::from("runs/d2"));
        assert_eq!(out(&["--data-dir", "/data"]), PathBuf::from("runs/d20"));
        assert_eq!(out(&["--model-tag", "mine"]), PathBuf::from("runs/mine"));
        assert_eq!(out(&["--out-dir", "/x", "--model-tag", "mine"]), PathBuf::from("/x"));
    }

    #[test]
    fn later_flags_override_earlier_ones() {
        // the scripts pass their flags first and the user's after
        let c = parse(&["--depth", "38", "--dbs", "48", "--depth", "2", "--dbs=4"]);
        assert_eq!((c.depth, c.device_batch_size), (Some(2), Some(4)));
    }

    #[test]
    fn bad_combinations_are_one_line_errors() {
        let cases: &[(&[&str], &str)] = &[
            (&["--depth", "20", "--preset", "3b"], "not both"),
            (&["--json"], "--plan"),
            (&["--plan", "--dbs", "48", "--world-size", "8"], "--total-batch-size"),
            (&["--plan", "--recompute", "some"], "none, selective, full, auto"),
            (&["--plan", "--gpu", "tpu"], "known"),
            (&["--plan", "--depth", "3"], "even depth"),
            (&["--backend", "metal"], "auto, cpu, cuda"),
            (&["--warmup-ratio", "0.9"], "must not exceed 1"),
        ];
        for (args, needle) in cases {
            let c = parse(args);
            let e = run(c).unwrap_err();
            assert!(e.message.contains(needle), "{args:?}: {e}");
            assert!(!e.message.contains('\n'), "{args:?}: one line: {e}");
        }
    }
}
