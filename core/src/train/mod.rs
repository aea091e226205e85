//! The training loop with nanochat's semantics (SPEC.md section 5, issue 4).
//!
//! For step in 0..=N: evaluate validation loss and bits per byte at step 0, every `eval_every` and at the
//! end; print samples every `sample_every` and at the end; save at the end, every `save_every`, and when a
//! stop is requested (SIGINT/SIGTERM); stop at N; otherwise one optimizer step of `grad_accum` micro-steps,
//! clipping of the (synchronized) gradient, Muon + AdamW with the scheduled lr.
//!
//! The optimizer runs where the parameters live: on the CPU the host `Optimizer` works in place on the
//! buffers; on a device backend (buffers that are not host slices) the `DeviceOptimizer` clips and steps with
//! the backend's ops, and only its state comes to the host, for checkpoints, in the host optimizer's layout
//! (so a checkpoint resumes on either path). Several ranks (or one rank given a collective) exchange their
//! gradients with ZeRO-1 (`zero1`): each bucket of grads is reduced into its owners from the backward's hook
//! (on a GPU: NCCL on a communication stream, `zero1_nccl`), each rank's optimizer updates what it owns, and
//! the owners' weights are gathered.

pub mod buckets;
pub mod core_metric;
pub mod estimate;
pub mod launch;
pub mod metrics;
pub mod out_dir;
mod rank_loop;
pub mod reshard;
pub mod signal;
pub mod supervise;
pub mod sync;
pub mod transport;
pub mod zero1;
pub mod zero1_nccl;
pub mod zero1_p2p;
#[cfg(test)]
mod zero1_test_support;

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::bail;
use crate::checkpoint::{self, CheckpointMeta};
use crate::config::ModelConfig;
use crate::data::run_data::{DataSource, RunData};
use crate::error::{NcError, Result};
use crate::model::Gpt;
use crate::optim::device::{DeviceOptimizer, DeviceOptions};
use crate::optim::shard::ShardLayout;
use crate::optim::{OptimConfig, Optimizer};
use crate::plan::{self, BatchPlan, Horizon, Precision};
use crate::sample::{Sampler, Sampling};
use nc_comm::{Collective, ThreadRing};
use rank_loop::train_rank;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use zero1::{HostRanks, RankCollective};

/// Where a run resumes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Resume {
    No,
    /// The latest complete checkpoint in the out dir.
    Latest,
    Path(PathBuf),
}

/// Everything a run needs; saved in each checkpoint's meta.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The model's shape; its vocab_size is replaced by the tokenizer's.
    pub model: ModelConfig,
    pub device_batch_size: usize,
    pub total_batch_size: usize,
    pub world_size: usize,
    pub horizon: Horizon,
    pub optim: OptimConfig,
    /// Global-norm clip of the gradient; 0 disables.
    pub grad_clip: f64,
    pub warmup_ratio: f64,
    pub warmdown_ratio: f64,
    pub final_lr_frac: f64,
    /// 0: evaluate only at the first and the last step.
    pub eval_every: u64,
    pub eval_tokens: usize,
    /// 0: sample only at the end.
    pub sample_every: u64,
    /// 0: save only at the end (and on a stop request).
    pub save_every: u64,
    /// New tokens per sample.
    pub sample_tokens: usize,
    pub model_tag: String,
    pub data: DataSource,
    pub out_dir: PathBuf,
    pub resume: Resume,
    pub seed: u64,
    /// What the forward keeps for the backward: everything (none), all but the MLP hidden (selective), only
    /// layer inputs (full), or auto: the cheapest whose plan fits in the host's memory. Recompute changes no
    /// number of the run, so it may differ on resume; checkpoints written before it existed (which say
    /// `recompute_full`) read as auto.
    #[serde(default)]
    pub recompute: plan::Recompute,
    /// Numeric format of the model's buffers: fp32 (everything f32) or bf16 (f32 master weights, grads and
    /// optimizer state; bf16 working weights and activations: `model::Storages`). Checkpoints hold the f32
    /// master either way, so a run may resume in the other precision; older checkpoints read as fp32.
    #[serde(default)]
    pub precision: Precision,
    /// Behave as if a stop were requested when the loop reaches this step (dry runs and tests).
    pub stop_at_step: Option<u64>,
    /// Steps first..=last to capture with a profiler (`--profile-steps A:B`): the backend's capture starts
    /// before step A and stops after step B (`Backend::profiler_capture`; scripts/profile.sh).
    #[serde(default)]
    pub profile_steps: Option<(u64, u64)>,
    /// The CORE metric during training (`--core-metric-every`, `--core-metric-max-per-task`; off when every = 0).
    #[serde(default)]
    pub core_metric: core_metric::CoreMetricConfig,
    /// Print the log lines and samples (off in tests).
    pub verbose: bool,
}

/// What the loop carries across steps (saved in checkpoints as `loop_state`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// EMA of the train loss (not yet debiased).
    pub smooth_loss: f64,
    pub min_val_bpb: f64,
    /// Seconds spent in optimizer steps so far.
    pub train_seconds: f64,
}

/// One evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalResult {
    pub step: u64,
    /// Mean nats per counted target token.
    pub val_loss: f64,
    pub val_bpb: f64,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub model: ModelConfig,
    pub num_iterations: u64,
    /// The step the loop ended at (num_iterations unless stopped early).
    pub final_step: u64,
    pub stopped_early: bool,
    /// (step, mean loss of the step's micro-batches) of every step this run took.
    pub train_losses: Vec<(u64, f32)>,
    pub evals: Vec<EvalResult>,
    pub samples: Vec<(String, String)>,
    pub min_val_bpb: f64,
    pub train_seconds: f64,
    pub peak_rss_bytes: Option<u64>,
    pub last_checkpoint: Option<PathBuf>,
    /// Validation batches per evaluation: what --eval-tokens asks for, or one pass over the validation split
    /// when that asks for more.
    pub eval_batches: usize,
    /// Whether --eval-tokens asked for more than the validation split holds (and one pass was evaluated).
    pub eval_capped: bool,
    /// Activation bytes (loss workspace included) the model allocated, as a device stores them, and what the
    /// plan priced them at when choosing the recompute policy (`--recompute auto`): the two must agree.
    pub activation_bytes_allocated: usize,
    pub activation_bytes_priced: f64,
}

/// EMA factor of the logged train loss.
const EMA_BETA: f64 = 0.9;

fn model_of(cfg: &TrainConfig, vocab: usize) -> Result<ModelConfig> {
    cfg.model
        .with_vocab_size(vocab)
        .map_err(|e| e.context("model with the tokenizer's vocabulary"))
}

/// Validation loss and bits per byte over `steps` validation batches (SPEC.md section 6).
fn evaluate<B: Backend>(model: &mut Gpt<B>, data: &mut RunData, steps: usize, step: u64) -> Result<EvalResult> {
    let token_bytes = data.tokenizer.token_bytes().to_vec();
    data.val.reset();
    let r = crate::eval::bpb::loss_and_bpb(model, &mut data.val, &token_bytes, steps)?;
    Ok(EvalResult {
        step,
        val_loss: r.loss,
        val_bpb: r.bpb,
    })
}

/// Greedy continuations of the data's prompts.
fn sample<B: Backend>(model: &mut Gpt<B>, data: &RunData, max_new: usize, seed: u64) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let max_len = model.cfg.sequence_len;
    let mut sampler = Sampler::new(model, max_len)?;
    for prompt in data.prompts.iter() {
        let mut ids = vec![data.tokenizer.bos_id()];
        ids.extend(data.tokenizer.encode(prompt));
        let room = max_len.saturating_sub(ids.len());
        if room == 0 {
            continue;
        }
        let new = sampler.generate(model, &ids, max_new.min(room), Sampling::greedy(), seed, None)?;
        out.push((prompt.clone(), data.tokenizer.decode(&new)));
    }
    Ok(out)
}

/// Say that a checkpoint about to be loaded has no checksums to verify it against.
fn note_integrity(dir: &Path, integrity: checkpoint::Integrity, say: &dyn Fn(String)) {
    if integrity == checkpoint::Integrity::Unrecorded {
        say(format!(
            "note: {} has no checksums (saved before nc recorded them); loading it unverified",
            dir.display()
        ));
    }
}

/// `--resume` alone: the newest complete checkpoint of the out dir whose files verify against their checksums,
/// saying which newer ones it skipped and why.
fn newest_that_verifies(out_dir: &Path, say: &dyn Fn(String)) -> Result<PathBuf> {
    let found = checkpoint::list_complete(out_dir)?;
    if found.is_empty() {
        bail!(
            "--resume: no complete checkpoint in {}; start without --resume, or give --resume PATH",
            checkpoint::checkpoints_dir(out_dir).display()
        );
    }
    let mut newest_error = None;
    for (_, dir) in found.iter().rev() {
        match checkpoint::verify(dir) {
            Ok(integrity) => {
                note_integrity(dir, integrity, say);
                return Ok(dir.clone());
            }
            Err(e) => {
                say(format!("--resume: skipping {}: {e}", dir.display()));
                newest_error.get_or_insert(e);
            }
        }
    }
    let e = newest_error.expect("every checkpoint failed to verify");
    bail!(
        "--resume: none of the {} complete checkpoints in {} verifies (the newest: {e})",
        found.len(),
        checkpoint::checkpoints_dir(out_dir).display()
    )
}

/// The checkpoint to resume from, if any, verified and with its meta checked against this run.
fn resume_point(
    cfg: &TrainConfig,
    model: &ModelConfig,
    batch: &BatchPlan,
    say: &dyn Fn(String),
) -> Result<Option<(PathBuf, CheckpointMeta)>> {
    let dir = match &cfg.resume {
        Resume::No => return Ok(None),
        Resume::Latest => newest_that_verifies(&cfg.out_dir, say)?,
        Resume::Path(p) => {
            if !p.is_dir() {
                bail!(
                    "--resume {}: no such checkpoint folder; give a checkpoints/step_NNNNNN folder",
                    p.display()
                );
            }
            note_integrity(p, checkpoint::verify(p)?, say);
            p.clone()
        }
    };
    let meta = checkpoint::load_meta(&dir)?;
    if meta.model_config != *model {
        bail!(
            "checkpoint {} holds a model {:?} but this run builds {:?}; resume with the same --depth and data",
            dir.display(),
            meta.model_config,
            model
        );
    }
    let saved: TrainConfig = serde_json::from_value(meta.train_config.clone()).map_err(|e| {
        NcError::new(format!(
            "{}: train_config unreadable ({e}); the checkpoint is corrupt",
            dir.display()
        ))
    })?;
    // the world size and the device batch may change (the optimizer state is re-sharded, the loader's position
    // re-split); the tokens of an optimizer step may not, or the run would follow another curve
    if saved.total_batch_size != batch.total_batch_size {
        bail!(
            "checkpoint {} was trained with --total-batch-size {}; resume with the same (--world-size and --dbs may \
             change)",
            dir.display(),
            saved.total_batch_size
        );
    }
    let old_world = meta.optimizer.world_size;
    let lens_ok = (0..old_world)
        .all(|r| meta.optimizer.state_lens.get(r) == Some(&ShardLayout::new(model, r, old_world).state_len));
    if old_world == 0 || old_world != saved.world_size || meta.optimizer.state_lens.len() != old_world || !lens_ok {
        bail!(
            "checkpoint {}: its optimizer state ({} ranks, sizes {:?}) does not match the {} ranks it was trained \
             with on this model; it is corrupt",
            dir.display(),
            meta.optimizer.state_lens.len(),
            meta.optimizer.state_lens,
            saved.world_size
        );
    }
    Ok(Some((dir, meta)))
}

/// The device batch size a checkpoint was trained with (0 if its train config does not say).
fn saved_dbs(meta: &CheckpointMeta) -> u64 {
    meta.train_config
        .get("device_batch_size")
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
}

/// The optimizer of a rank: the host one where the backend's buffers are host memory (the CPU) and the run is
/// f32, the device one elsewhere (a GPU; and every bf16 run, so the CPU twin runs the engine's optimizer path:
/// batched bf16 Newton-Schulz, `backend::ns_bf16`, and the multi-tensor updates, rounding where the device
/// does); either updates only what the rank owns (`optim::shard`).
enum RankOptimizer<B: Backend> {
    Host(Optimizer),
    Device(DeviceOptimizer<B>),
}

impl<B: Backend> RankOptimizer<B> {
    fn new(model: &Gpt<B>, config: OptimConfig, rank: usize, world: usize) -> Result<Self> {
        let host_buffers = B::host_slice(model.params_buf()).is_some() && B::host_slice(model.grads_buf()).is_some();
        if host_buffers && model.precision != Precision::Bf16 {
            return Ok(RankOptimizer::Host(Optimizer::new(&model.cfg, config, rank, world)?));
        }
        // bf16 (on any backend): batched bf16 Newton-Schulz and multi-tensor AdamW writing the working copy
        // (optim::device); the rank's own segments only (ZeRO-1)
        let opts = DeviceOptions {
            precision: model.precision,
            rank,
            world_size: world,
            ..DeviceOptions::default()
        };
        let opt = DeviceOptimizer::with_options(&model.be, &model.cfg, config, opts)?;
        // a sharded master (bf16 ZeRO-1) holds the rank's segments packed (`model::MasterMap`)
        let packed = model.master_map().is_sharded();
        Ok(RankOptimizer::Device(if packed { opt.packed() } else { opt }))
    }
    /// Elements of the state in the host optimizer's layout (what a checkpoint holds for this rank).
    fn state_len(&self) -> usize {
        match self {
            RankOptimizer::Host(o) => o.layout().state_len,
            RankOptimizer::Device(o) => o.layout().state_len,
        }
    }
    fn steps_taken(&self) -> u64 {
        match self {
            RankOptimizer::Host(o) => o.steps_taken(),
            RankOptimizer::Device(o) => o.steps_taken(),
        }
    }
    /// The state in the host optimizer's layout, for a checkpoint.
    fn state_to_host(&self, be: &B) -> Vec<f32> {
        match self {
            RankOptimizer::Host(o) => o.state().to_vec(),
            RankOptimizer::Device(o) => o.state_to_host(be),
        }
    }
    fn restore(&mut self, be: &B, state: &[f32], steps_taken: u64) -> Result<()> {
        match self {
            RankOptimizer::Host(o) => o.restore(state, steps_taken),
            RankOptimizer::Device(o) => o.restore(be, state, steps_taken),
        }
    }
}

/// Train as `cfg` says. Returns after the last step, or early (with a checkpoint) on a stop request.
/// With `world_size` > 1 the ranks are threads of this process on the CPU, joined by a thread ring
/// (data parallel, ZeRO-1); rank 0 evaluates, samples, logs and saves, and its summary is returned. This is
/// the tests' fixture: `nc-train` runs one process per rank (`launch`), each through `train_as_rank`.
pub fn train(cfg: &TrainConfig) -> Result<RunSummary> {
    train_threads(cfg, MasterSharding::Owned)
}

/// `train` with every rank keeping the whole f32 master and the ranks gathering it (ZeRO-1 as it was before
/// bf16 runs sharded their master): the reference tests hold the sharded master to, bit for bit.
pub fn train_with_full_master(cfg: &TrainConfig) -> Result<RunSummary> {
    train_threads(cfg, MasterSharding::Full)
}

/// Which f32 master weights a rank of a bf16 ZeRO-1 run keeps (fp32 and single ranks keep all of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MasterSharding {
    /// Only what it owns (`Gpt::with_sharded_master`); the bf16 working copy is gathered. What runs use.
    Owned,
    /// All of it, and the f32 master is gathered (`train_with_full_master`, for tests).
    Full,
}

fn train_threads(cfg: &TrainConfig, sharding: MasterSharding) -> Result<RunSummary> {
    if cfg.world_size <= 1 {
        return train_rank(cfg, 0, None, cpu_device(cfg.world_size, cfg.world_size), sharding);
    }
    let rings = ThreadRing::new(cfg.world_size);
    std::thread::scope(|scope| {
        let mut rings = rings.into_iter();
        let ring0 = rings.next().expect("world_size > 1");
        let others: Vec<_> = rings
            .enumerate()
            .map(|(i, ring)| {
                std::thread::Builder::new()
                    .name(format!("nc-rank{}", i + 1))
                    .spawn_scoped(scope, move || {
                        let comm: Box<dyn RankCollective<CpuBackend>> = Box::new(HostRanks::new(Box::new(ring)));
                        let device = cpu_device(cfg.world_size, cfg.world_size);
                        train_rank(cfg, i + 1, Some(comm), device, sharding)
                    })
                    .map_err(|e| NcError::new(format!("starting rank {}: {e}", i + 1)))
            })
            .collect::<Result<_>>()?;
        let comm0: Box<dyn RankCollective<CpuBackend>> = Box::new(HostRanks::new(Box::new(ring0)));
        let first = train_rank(
            cfg,
            0,
            Some(comm0),
            cpu_device(cfg.world_size, cfg.world_size),
            sharding,
        );
        let mut result = first;
        for h in others {
            let r = h.join().map_err(|_| NcError::new("a rank thread panicked"))?;
            // rank 0's own error says most; otherwise report the first other rank's
            if let (Ok(_), Err(e)) = (&result, r) {
                result = Err(e);
            }
        }
        result
    })
}

/// The concrete policy of a run, and why. Auto asks the plan for the cheapest policy under which every
/// replica sharing the device's memory (all CPU ranks of this process share the host's; a GPU holds one)
/// fits in it, its buffers priced at `priced` (`priced_precision`).
fn resolve_recompute<B: Backend>(
    asked: plan::Recompute,
    model: &ModelConfig,
    batch: &BatchPlan,
    device: &Device<B>,
    priced: Precision,
) -> (plan::Recompute, String) {
    if asked != plan::Recompute::Auto {
        return (asked, "as asked".into());
    }
    let Some(mem) = device.memory_bytes else {
        return (
            plan::Recompute::None,
            format!("auto: {} unknown, keeping every activation", device.memory_name),
        );
    };
    let (b, w) = (batch.device_batch_size, batch.world_size);
    let what = format!("{:.1} GiB of {}", mem / plan::GIB, device.memory_name);
    match plan::cheapest_policy_that_fits(model, b, w, priced, mem, device.replicas_sharing_memory) {
        Some(p) => (p, format!("auto: the cheapest that fits in {what}")),
        None => (
            plan::Recompute::Full,
            format!("auto: nothing fits in {what}, even full recomputation; lower --dbs"),
        ),
    }
}

/// How the plan prices a run's buffers: as the run allocates them. A bf16 run stores bf16 working weights and
/// activations on any backend (the CPU twin allocates the engine's layout, `model::Storages`); an fp32 run as
/// the device's f32 path (the host's, or a GPU's with its context).
pub fn priced_precision(run: Precision, device: Precision) -> Precision {
    match run {
        Precision::Bf16 => Precision::Bf16,
        Precision::Fp32 | Precision::Fp32Gpu => device,
    }
}

/// What a rank computes on: its backend, and the peak FLOP/s (with how it was found) that its MFU is
/// measured against.
pub struct Device<B: Backend> {
    pub be: B,
    /// This rank's peak; MFU divides the FLOPs of all ranks by the peaks of all ranks (world size x this).
    pub peak_flops: f64,
    pub peak_how: String,
    /// The memory the run's buffers live in, for `--recompute auto` (None: unknown), and its name for logs.
    pub memory_bytes: Option<f64>,
    pub memory_name: String,
    /// How many ranks' replicas share that memory (all CPU ranks share the host's; a GPU holds one).
    pub replicas_sharing_memory: usize,
    /// How the plan prices this device's f32 buffers (for `--recompute auto`; a bf16 run is priced as bf16
    /// whatever this says: `priced_precision`).
    pub precision: Precision,
}

/// Train on one rank with the given backend (a GPU's, or a test's), without a collective. Several ranks are
/// processes (`train_as_rank`), or CPU threads of one process (`train`, the tests' fixture).
pub fn train_on<B: Backend>(cfg: &TrainConfig, device: Device<B>) -> Result<RunSummary> {
    if cfg.world_size > 1 {
        bail!(
            "--world-size {} on a device runs one process per GPU: start them with nc-train --nproc-per-node {} \
             (or torchrun), not in this process",
            cfg.world_size,
            cfg.world_size
        );
    }
    train_rank(cfg, 0, None, device, MasterSharding::Owned)
}

/// Train as rank `rank` of `cfg.world_size`, one rank of several processes (or machines) joined by `comm`
/// (None: a single rank; a collective may be given at world size 1 too, which runs the ZeRO-1 exchange with
/// one rank). Every rank logs nothing but rank 0, saves its own optimizer state, and stops at the step the
/// ranks agree on.
pub fn train_as_rank<B: Backend>(
    cfg: &TrainConfig,
    rank: usize,
    comm: Option<Box<dyn RankCollective<B>>>,
    device: Device<B>,
) -> Result<RunSummary> {
    if let Some(c) = &comm {
        if (c.rank(), c.world_size()) != (rank, cfg.world_size) {
            bail!(
                "rank {rank} of {} was given a collective of rank {} of {}",
                cfg.world_size,
                c.rank(),
                c.world_size()
            );
        }
    } else if cfg.world_size > 1 {
        bail!(
            "rank {rank} of {} has no collective to reach the others",
            cfg.world_size
        );
    }
    train_rank(cfg, rank, comm, device, MasterSharding::Owned)
}

/// A CPU rank of `world_size`, `sharing` of which run on this machine: its peak FLOP/s are its share of the
/// machine's cores (`metrics::cpu_peak_flops`), and the ranks' replicas share the host's memory.
pub fn cpu_device(world_size: usize, sharing: usize) -> Device<CpuBackend> {
    let sharing = sharing.clamp(1, world_size.max(1));
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let (peak_flops, how) = metrics::cpu_peak_flops(cores, sharing);
    Device {
        be: CpuBackend::new(),
        peak_flops,
        peak_how: format!("a CPU peak: {how}"),
        memory_bytes: plan::host_memory_bytes(),
        memory_name: "host memory".into(),
        replicas_sharing_memory: sharing,
        precision: Precision::Fp32,
    }
}

/// A rank on CUDA device `ordinal`, training in `precision` (the model's storage comes from the run's config;
/// this says how `--recompute auto` prices the device's buffers and what the MFU is measured against). Its MFU
/// is measured against the GPU's dense bf16 peak, as nanochat's is, even on the strict f32 path.
pub fn cuda_device(
    ordinal: usize,
    tf32: bool,
    precision: Precision,
) -> Result<Device<crate::backend::cuda::CudaBackend>> {
    let be = crate::backend::cuda::CudaBackend::new(ordinal)?;
    be.set_tf32(tf32)?;
    let name = be.device_name();
    let computes = match precision {
        Precision::Bf16 => "this run's GEMMs take bf16 inputs",
        Precision::Fp32 | Precision::Fp32Gpu => "this run computes in f32",
    };
    let (peak_flops, peak_how) = match plan::gpu_for_device_name(&name) {
        Some(g) => (g.peak_bf16_flops, format!("the {name}'s dense bf16 peak; {computes}")),
        None => (
            plan::gpu_by_name("h100")?.peak_bf16_flops,
            format!("an H100's dense bf16 peak: {name} is not a GPU the planner knows"),
        ),
    };
    Ok(Device {
        memory_bytes: be.memory_bytes(),
        memory_name: format!("{name} memory"),
        replicas_sharing_memory: 1,
        // bf16: the engine's layout (bf16 working weights and activations); fp32: the strict f32 path
        precision: match precision {
            Precision::Bf16 => Precision::Bf16,
            Precision::Fp32 | Precision::Fp32Gpu => Precision::Fp32Gpu,
        },
        be,
        peak_flops,
        peak_how,
    })
}

/// Save a checkpoint with every rank writing its own optimizer state (`checkpoint`'s phases): rank 0 makes the
/// partial folder, each rank writes its file, rank 0 the weights and meta.json, and once the ranks agree that
/// all succeeded rank 0 marks it complete. A rank whose write fails makes every rank fail the save (and the
/// partial folder is never marked). Returns the checkpoint's folder on rank 0.
fn save_checkpoint(
    cfg: &TrainConfig,
    rank: usize,
    mut comm: Option<&mut (dyn Collective + 'static)>,
    meta: &CheckpointMeta,
    params: Option<&[f32]>,
    optim_state: &[f32],
) -> Result<Option<PathBuf>> {
    let lead = rank == 0;
    // each phase ends with the ranks agreeing whether any of them failed
    let agree = |failed: bool, comm: &mut Option<&mut (dyn Collective + 'static)>| -> Result<bool> {
        match comm.as_deref_mut() {
            Some(c) => sync::any_rank(c, failed),
            None => Ok(failed),
        }
    };
    // another rank's failure, told by this one (that rank's own line says why)
    let elsewhere = |what: &str| NcError::at_rank(rank, format!("{what} of step {}; see its error", meta.step));
    let begun = if lead {
        checkpoint::begin_save(&cfg.out_dir, meta.step).map(Some)
    } else {
        Ok(None)
    };
    if agree(begun.is_err(), &mut comm)? {
        begun?;
        return Err(elsewhere("rank 0 could not start the checkpoint"));
    }
    let partial = checkpoint::partial_dir(&cfg.out_dir, meta.step);
    let mut written = checkpoint::write_optim_state(&partial, rank, optim_state).map(|_| ());
    if let (true, Ok(())) = (lead, &written) {
        let params = params.expect("rank 0 passes the parameters");
        written = checkpoint::write_model_file(&partial, meta, params);
    }
    if agree(written.is_err(), &mut comm)? {
        written?;
        return Err(elsewhere("another rank could not write its part of the checkpoint"));
    }
    if lead {
        return checkpoint::finish_save(&cfg.out_dir, meta).map(Some);
    }
    Ok(None)
}
