//! The plan of a run: batch and horizon (SPEC.md section 5), per-GPU memory of every buffer under a
//! precision policy and an activation-recomputation policy, whether it fits, the largest device batch that
//! fits, and time and cost at a given MFU on named GPUs (issue 4).
//!
//! The training loop sizes its buffers from the same functions (`BatchPlan`, `Horizon`, the optimizer's
//! `ShardLayout`), so what `nc-train --plan` prints is what a run allocates.

use crate::bail;
use crate::config::ModelConfig;
use crate::error::{NcError, Result};
use crate::model::{self, activation_layout, activation_layout_for};
use crate::optim::shard::ShardLayout;
use serde::Serialize;

// The precision policy and the byte units live in the leaf module `precision`, which the model and the
// optimizer import too; re-exported here so `plan::Precision` keeps naming them for the binaries and tests.
pub use crate::precision::{Precision, GB, GIB};

// ---------------------------------------------------------------------------------------------------------
// Batch and horizon

/// Micro-batch, world and accumulation of a run (SPEC.md section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BatchPlan {
    pub device_batch_size: usize,
    pub seq_len: usize,
    pub world_size: usize,
    pub total_batch_size: usize,
    /// device_batch_size * seq_len
    pub tokens_per_fwdbwd: usize,
    /// tokens_per_fwdbwd * world_size
    pub world_tokens_per_fwdbwd: usize,
    pub grad_accum: usize,
}

impl BatchPlan {
    pub fn new(device_batch_size: usize, seq_len: usize, total_batch_size: usize, world_size: usize) -> Result<Self> {
        if device_batch_size == 0 || seq_len == 0 || world_size == 0 || total_batch_size == 0 {
            bail!(
                "--device-batch-size ({device_batch_size}), --max-seq-len ({seq_len}), --world-size ({world_size}) \
                 and --total-batch-size ({total_batch_size}) must all be at least 1"
            );
        }
        let tokens_per_fwdbwd = device_batch_size * seq_len;
        let world_tokens = tokens_per_fwdbwd * world_size;
        if !total_batch_size.is_multiple_of(world_tokens) {
            let lower = (total_batch_size / world_tokens).max(1) * world_tokens;
            bail!(
                "--total-batch-size {total_batch_size} is not a multiple of device_batch_size x max_seq_len x \
                 world_size = {device_batch_size} x {seq_len} x {world_size} = {world_tokens}; use \
                 --total-batch-size {lower} or {}",
                lower + world_tokens
            );
        }
        Ok(BatchPlan {
            device_batch_size,
            seq_len,
            world_size,
            total_batch_size,
            tokens_per_fwdbwd,
            world_tokens_per_fwdbwd: world_tokens,
            grad_accum: total_batch_size / world_tokens,
        })
    }
}

/// How long to train: the first of these that is set wins (SPEC.md section 5).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub enum Horizon {
    Iterations(u64),
    TargetFlops(f64),
    ParamDataRatio(f64),
}

impl Horizon {
    /// From the three optional flags, in nanochat's precedence; `ratio_default` when none is given.
    pub fn from_flags(num_iterations: Option<u64>, target_flops: Option<f64>, ratio: Option<f64>) -> Result<Self> {
        if let Some(n) = num_iterations {
            return Ok(Horizon::Iterations(n));
        }
        if let Some(f) = target_flops {
            if !(f.is_finite() && f > 0.0) {
                bail!("--target-flops {f} must be a positive number (e.g. 4e20)");
            }
            return Ok(Horizon::TargetFlops(f));
        }
        let r = ratio.unwrap_or(20.0);
        if !(r.is_finite() && r > 0.0) {
            bail!("--target-param-data-ratio {r} must be a positive number (nanochat uses 20)");
        }
        Ok(Horizon::ParamDataRatio(r))
    }

    /// Number of optimizer steps for this model and total batch.
    pub fn num_iterations(&self, model: &ModelConfig, total_batch_size: usize) -> u64 {
        let tb = total_batch_size as f64;
        match *self {
            Horizon::Iterations(n) => n,
            Horizon::TargetFlops(f) => (f / (model.flops_per_token() * tb)).round() as u64,
            Horizon::ParamDataRatio(r) => ((r * model.num_params() as f64) / tb).floor() as u64,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Devices and policies

/// A GPU the planner knows: usable memory as the driver reports it, and the dense bf16 peak (SPEC.md 8).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Gpu {
    pub name: &'static str,
    pub mem_bytes: f64,
    pub peak_bf16_flops: f64,
}

/// Memory is the total nvidia-smi reports for each part (what an allocator can at most reach).
pub const GPUS: &[Gpu] = &[
    Gpu {
        name: "h100",
        mem_bytes: 81559.0 * 1048576.0,
        peak_bf16_flops: 989e12,
    },
    Gpu {
        name: "h200",
        mem_bytes: 143771.0 * 1048576.0,
        peak_bf16_flops: 989e12,
    },
    Gpu {
        name: "b200",
        mem_bytes: 179.0 * GIB,
        peak_bf16_flops: 2.25e15,
    },
    Gpu {
        name: "a100",
        mem_bytes: 81920.0 * 1048576.0,
        peak_bf16_flops: 312e12,
    },
];

/// The known GPU a driver's device name is (e.g. "NVIDIA H200" is the h200), if any.
pub fn gpu_for_device_name(device_name: &str) -> Option<Gpu> {
    let lower = device_name.to_ascii_lowercase();
    GPUS.iter().find(|g| lower.contains(g.name)).copied()
}

pub fn gpu_by_name(name: &str) -> Result<Gpu> {
    let lower = name.to_ascii_lowercase();
    match GPUS.iter().find(|g| g.name == lower) {
        Some(g) => Ok(*g),
        None => {
            let names: Vec<&str> = GPUS.iter().map(|g| g.name).collect();
            bail!(
                "unknown GPU '{name}'; known: {} (or give --gpu-mem, e.g. --gpu-mem 187.5GB)",
                names.join(", ")
            )
        }
    }
}

/// A memory size flag: a number of GiB, or a number with a unit GiB, GB, MiB, MB (e.g. `187.5GB`).
pub fn parse_mem_size(s: &str) -> Result<f64> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (num, mult) = [("gib", GIB), ("gb", GB), ("mib", 1048576.0), ("mb", 1e6), ("g", GIB)]
        .iter()
        .find(|(u, _)| lower.ends_with(u))
        .map(|(u, m)| (&t[..t.len() - u.len()], *m))
        .unwrap_or((t, GIB));
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v * mult),
        _ => bail!("memory size '{s}' is not a positive number with an optional unit (GiB, GB, MiB, MB), e.g. 187.5GB"),
    }
}

/// What the forward keeps for the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep every activation of every block.
    None,
    /// Keep the matmul (and attention) outputs and the norm outputs; recompute relu^2 (the only cheap op
    /// whose output is wider than what it is recomputed from). See `model::Recompute::Selective`.
    Selective,
    /// Keep only each block's input; recompute the whole block forward during the backward.
    Full,
    /// The cheapest of none, selective, full that fits.
    #[default]
    Auto,
}

impl Recompute {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Recompute::None),
            "selective" => Ok(Recompute::Selective),
            "full" => Ok(Recompute::Full),
            "auto" => Ok(Recompute::Auto),
            _ => bail!("--recompute '{s}' is not one of none, selective, full, auto"),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Selective => "selective",
            Recompute::Full => "full",
            Recompute::Auto => "auto",
        }
    }
    /// Concrete policies, cheapest in compute first.
    pub const CONCRETE: [Recompute; 3] = [Recompute::None, Recompute::Selective, Recompute::Full];
}

// ---------------------------------------------------------------------------------------------------------
// Activation memory: priced from the model's own accounting (`model::activation_layout`), which is what
// `Gpt::new` allocates, for every concrete policy.

/// The engine's policy for a plan policy. Auto is resolved against the device's memory before a GPU plan
/// prices it; given here unresolved it means none (the CPU engine keeps everything in host memory).
pub fn engine_policy(policy: Recompute) -> model::Recompute {
    match policy {
        Recompute::None | Recompute::Auto => model::Recompute::None,
        Recompute::Selective => model::Recompute::Selective,
        Recompute::Full => model::Recompute::Full,
    }
}

/// Activation elements per token per layer kept for the backward under a policy (SPEC 7's "about 32*d
/// bytes" in bf16 for none): the saved set plus the MLP hidden for none, the saved set for selective
/// (h is recomputed), the layer input for full.
pub fn activation_elems_per_token_per_layer(model: &ModelConfig, policy: Recompute) -> usize {
    let l = activation_layout(model, 1, 1, engine_policy(policy));
    match policy {
        Recompute::None | Recompute::Auto => l.layer_saved_per_token + l.hidden_per_token,
        Recompute::Selective => l.layer_saved_per_token,
        Recompute::Full => l.layer_input_per_token,
    }
}

/// Activation bytes of a micro-batch of `batch` sequences under a policy and precision, without and of
/// the loss workspace, as `model::Storages` stores each buffer (the model's own accounting).
pub fn activation_bytes(model: &ModelConfig, batch: usize, policy: Recompute, precision: Precision) -> (f64, f64) {
    let l = activation_layout_for(model, batch, model.sequence_len, engine_policy(policy), precision);
    (l.activation_bytes as f64, l.loss_workspace_bytes as f64)
}

/// Activation elements of a micro-batch of `batch` sequences under a policy, without the loss workspace.
pub fn activation_elems(model: &ModelConfig, batch: usize, policy: Recompute) -> usize {
    let l = activation_layout(model, batch, model.sequence_len, engine_policy(policy));
    l.total - l.loss_workspace
}

/// The cheapest concrete policy (none, then selective, then full) under which `ranks` model replicas of
/// `memory_per_gpu` each fit in `mem_bytes`; None when not even full recomputation fits. `ranks` is 1 on a
/// GPU (one rank per device) and the world size for CPU ranks, which are threads sharing the host's memory.
pub fn cheapest_policy_that_fits(
    model: &ModelConfig,
    device_batch_size: usize,
    world_size: usize,
    precision: Precision,
    mem_bytes: f64,
    ranks: usize,
) -> Option<Recompute> {
    Recompute::CONCRETE.into_iter().find(|&policy| {
        memory_per_gpu(model, device_batch_size, world_size, precision, policy).total * ranks as f64 <= mem_bytes
    })
}

/// Total memory of this host (Linux /proc/meminfo MemTotal), in bytes; None where it cannot be read.
pub fn host_memory_bytes() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

/// Bytes of the chunked loss workspace: fp32 logits of one chunk (their gradient overwrites them).
pub fn loss_workspace_bytes(model: &ModelConfig, tokens: usize) -> f64 {
    (model::loss_chunk_rows(model.vocab_size, tokens) * model.vocab_size * 4) as f64
}

/// Bytes fp32 logits of a whole micro-batch would take (what chunking avoids).
pub fn unchunked_logits_bytes(model: &ModelConfig, tokens: usize) -> f64 {
    (tokens * model.vocab_size * 4) as f64
}

// ---------------------------------------------------------------------------------------------------------
// The memory plan

/// Per-GPU bytes of each buffer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MemoryBreakdown {
    pub params: f64,
    pub grads: f64,
    pub master_weights: f64,
    pub optimizer_state: f64,
    /// Muon's fp32 scratch: the update, Newton-Schulz's iterates and Gram matrices of the largest matrix.
    pub optimizer_scratch: f64,
    pub activations: f64,
    pub loss_workspace: f64,
    pub comm_buffers: f64,
    pub slack: f64,
    pub total: f64,
}

/// Fixed per-process overhead on a GPU: CUDA context, cuBLASLt workspace, kernels.
pub const GPU_CONTEXT_BYTES: f64 = 1.5 * GIB;
/// Allocator fragmentation and temporaries, as a fraction of everything else.
pub const SLACK_FRACTION: f64 = 0.05;

/// Memory of one GPU (or the host, for Fp32) for a model, device batch, world size and concrete policy.
pub fn memory_per_gpu(
    model: &ModelConfig,
    device_batch_size: usize,
    world_size: usize,
    precision: Precision,
    policy: Recompute,
) -> MemoryBreakdown {
    let n = model.num_params() as f64;
    let owned = ShardLayout::max_owned_params(model, world_size) as f64;
    let state = ShardLayout::max_state_len(model, world_size) as f64;
    let params = n * precision.param_bytes();
    let grads = n * 4.0;
    let master_weights = owned * precision.master_bytes();
    let optimizer_state = state * 4.0;
    let optimizer_scratch = crate::optim::device::muon_scratch_bytes(model, world_size, precision) as f64;
    let (activations, loss_workspace) = activation_bytes(model, device_batch_size, policy, precision);
    // the ZeRO-1 exchange runs in place on the grads and on the weights the forward reads (`plan_comm`), and
    // a bf16 rank keeps the f32 master of its own pieces only (`model::MasterMap`, counted above): nothing
    // more to hold
    let comm_buffers = 0.0;
    let sum = params
        + grads
        + master_weights
        + optimizer_state
        + optimizer_scratch
        + activations
        + loss_workspace
        + comm_buffers;
    let slack = match precision {
        Precision::Bf16 | Precision::Fp32Gpu => GPU_CONTEXT_BYTES + SLACK_FRACTION * sum,
        Precision::Fp32 => SLACK_FRACTION * sum,
    };
    MemoryBreakdown {
        params,
        grads,
        master_weights,
        optimizer_state,
        optimizer_scratch,
        activations,
        loss_workspace,
        comm_buffers,
        slack,
        total: sum + slack,
    }
}

/// Largest device batch (at most `limit`) whose memory fits under `mem_bytes`; 0 if none does.
pub fn max_device_batch(
    model: &ModelConfig,
    world_size: usize,
    precision: Precision,
    policy: Recompute,
    mem_bytes: f64,
    limit: usize,
) -> usize {
    let fits = |b: usize| memory_per_gpu(model, b, world_size, precision, policy).total <= mem_bytes;
    if !fits(1) {
        return 0;
    }
    // memory grows with the batch: binary search the last batch that fits
    let (mut lo, mut hi) = (1usize, limit.max(1));
    if fits(hi) {
        return hi;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Training time and cost of the run on `world_size` GPUs of one kind at the plan's MFU.
#[derive(Debug, Clone, Serialize)]
pub struct TimeEstimate {
    pub gpu: &'static str,
    pub world_size: usize,
    pub hours: f64,
    pub usd: Option<f64>,
}

/// Everything `nc-train --plan` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub model: ModelConfig,
    pub params: u64,
    pub flops_per_token: f64,
    pub batch: BatchPlan,
    pub grad_accum: usize,
    pub num_iterations: u64,
    pub tokens: u64,
    pub total_flops: f64,
    pub precision: Precision,
    pub device: String,
    pub device_mem_bytes: f64,
    /// The policy asked for (may be auto) and the one used.
    pub recompute_requested: Recompute,
    pub recompute: Recompute,
    pub memory: MemoryBreakdown,
    pub memory_bytes_per_gpu: f64,
    pub fits: bool,
    /// What the same configuration needs with no recomputation.
    pub memory_without_recompute: MemoryBreakdown,
    pub fits_without_recompute: bool,
    /// fp32 logits of a whole micro-batch, which the chunked loss never holds.
    pub unchunked_logits_bytes: f64,
    /// Largest device batch that fits with the chosen policy (auto: with full recomputation) and with none.
    pub max_device_batch: usize,
    pub max_device_batch_without_recompute: usize,
    /// Extra FLOPs the backward spends re-running forwards, as a fraction of the model FLOPs.
    pub recompute_flops_overhead: f64,
    pub mfu: f64,
    pub times: Vec<TimeEstimate>,
    /// What the data-parallel exchange moves each step (None for one GPU).
    pub comm: Option<crate::plan_comm::CommPlan>,
}

/// Inputs of a plan.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub model: ModelConfig,
    pub batch: BatchPlan,
    pub horizon: Horizon,
    pub precision: Precision,
    /// Name of the device (a GPU name of `GPUS`, whose peak prices the run, or "cpu") and its memory in
    /// bytes (the named GPU's, or what --gpu-mem says).
    pub device: String,
    pub device_mem_bytes: f64,
    pub recompute: Recompute,
    pub mfu: f64,
    pub usd_per_gpu_hour: Option<f64>,
}

/// FLOPs per token the backward adds by re-running block forwards (full: a third of the block matmul
/// and attention FLOPs; selective only redoes relu^2, 2 * 4d FLOPs per token per layer, counted as zero
/// against the 6N + attention of a step).
pub fn recompute_flops_per_token(model: &ModelConfig, policy: Recompute) -> f64 {
    match policy {
        Recompute::Full => {
            let block_params = (model.num_params() - 2 * model.num_params_wte()) as f64;
            let attn = 4.0 * (model.n_layer * model.n_head * model.head_dim * model.sequence_len) as f64;
            2.0 * block_params + attn
        }
        _ => 0.0,
    }
}

impl Plan {
    pub fn new(req: &PlanRequest) -> Result<Plan> {
        let m = &req.model;
        if !(req.mfu > 0.0 && req.mfu <= 1.0) {
            bail!("--mfu {} must be in (0, 1], e.g. 0.5", req.mfu);
        }
        if req.batch.seq_len != m.sequence_len {
            return Err(NcError::new(format!(
                "plan: batch sequence length {} differs from the model's {}",
                req.batch.seq_len, m.sequence_len
            )));
        }
        let (b, w, p) = (req.batch.device_batch_size, req.batch.world_size, req.precision);
        let mem = |policy| memory_per_gpu(m, b, w, p, policy);
        let recompute = match req.recompute {
            Recompute::Auto => {
                cheapest_policy_that_fits(m, b, w, p, req.device_mem_bytes, 1).unwrap_or(Recompute::Full)
            }
            other => other,
        };
        let memory = mem(recompute);
        let none = mem(Recompute::None);
        let num_iterations = req.horizon.num_iterations(m, req.batch.total_batch_size);
        let tokens = num_iterations * req.batch.total_batch_size as u64;
        let flops_per_token = m.flops_per_token();
        let total_flops = tokens as f64 * flops_per_token;
        // a batch search that stops at 4096 sequences per GPU: far past anything that fits
        let limit = 4096;
        let max_policy = if req.recompute == Recompute::Auto {
            Recompute::Full
        } else {
            recompute
        };
        let times = GPUS
            .iter()
            .map(|g| {
                let hours = total_flops / (req.mfu * g.peak_bf16_flops * w as f64) / 3600.0;
                let usd = if g.name == req.device {
                    req.usd_per_gpu_hour.map(|u| u * hours * w as f64)
                } else {
                    None
                };
                TimeEstimate {
                    gpu: g.name,
                    world_size: w,
                    hours,
                    usd,
                }
            })
            .collect();
        Ok(Plan {
            model: *m,
            params: m.num_params(),
            flops_per_token,
            batch: req.batch,
            grad_accum: req.batch.grad_accum,
            num_iterations,
            tokens,
            total_flops,
            precision: p,
            device: req.device.clone(),
            device_mem_bytes: req.device_mem_bytes,
            recompute_requested: req.recompute,
            recompute,
            memory_bytes_per_gpu: memory.total,
            fits: memory.total <= req.device_mem_bytes,
            memory,
            fits_without_recompute: none.total <= req.device_mem_bytes,
            memory_without_recompute: none,
            unchunked_logits_bytes: unchunked_logits_bytes(m, req.batch.tokens_per_fwdbwd),
            max_device_batch: max_device_batch(m, w, p, max_policy, req.device_mem_bytes, limit),
            max_device_batch_without_recompute: max_device_batch(m, w, p, Recompute::None, req.device_mem_bytes, limit),
            recompute_flops_overhead: recompute_flops_per_token(m, recompute) / flops_per_token,
            mfu: req.mfu,
            times,
            comm: crate::plan_comm::CommPlan::new(m, w, &req.device, p),
        })
    }

    /// The human-readable plan.
    pub fn render(&self) -> String {
        let m = &self.model;
        let gb = |b: f64| format!("{:8.2} GB", b / GB);
        let mut s = String::new();
        let mut line = |t: String| {
            s.push_str(&t);
            s.push('\n');
        };
        line(format!(
            "model      depth {}  d {}  heads {} (kv {})  vocab {}  seq {}",
            m.n_layer, m.n_embd, m.n_head, m.n_kv_head, m.vocab_size, m.sequence_len
        ));
        line(format!(
            "params     {} ({:.3} B)   FLOPs/token {:.3e}",
            self.params,
            self.params as f64 / 1e9,
            self.flops_per_token
        ));
        let bp = &self.batch;
        line(format!(
            "batch      {} x {} tokens per GPU x {} GPUs x {} accum = {} tokens per step",
            bp.device_batch_size, bp.seq_len, bp.world_size, bp.grad_accum, bp.total_batch_size
        ));
        line(format!(
            "horizon    {} steps, {:.3e} tokens ({:.1} tokens/param), {:.3e} FLOPs",
            self.num_iterations,
            self.tokens as f64,
            self.tokens as f64 / self.params as f64,
            self.total_flops
        ));
        line(format!(
            "memory per GPU ({} with {:.1} GB, {} precision, recompute {}{}):",
            self.device,
            self.device_mem_bytes / GB,
            self.precision.label(),
            self.recompute.name(),
            if self.recompute_requested == Recompute::Auto {
                " (auto)"
            } else {
                ""
            }
        ));
        let mm = &self.memory;
        for (name, v) in [
            ("params", mm.params),
            ("grads (fp32)", mm.grads),
            ("master weights", mm.master_weights),
            ("optimizer state", mm.optimizer_state),
            ("optimizer scratch", mm.optimizer_scratch),
            ("activations", mm.activations),
            ("loss workspace", mm.loss_workspace),
            ("comm buffers", mm.comm_buffers),
            ("slack", mm.slack),
        ] {
            line(format!("  {name:<18}{}", gb(v)));
        }
        line(format!(
            "  {:<18}{}  of {:.1} GB: {}",
            "total",
            gb(mm.total),
            self.device_mem_bytes / GB,
            if self.fits { "fits" } else { "DOES NOT FIT" }
        ));
        line(format!(
            "without recomputation: {} ({} of it activations): {}",
            gb(self.memory_without_recompute.total).trim(),
            gb(self.memory_without_recompute.activations).trim(),
            if self.fits_without_recompute {
                "fits"
            } else {
                "does not fit"
            }
        ));
        line(format!(
            "unchunked fp32 logits would add {} (the loss runs in chunks of at most {} tokens)",
            gb(self.unchunked_logits_bytes).trim(),
            model::loss_chunk_rows(self.model.vocab_size, self.batch.tokens_per_fwdbwd)
        ));
        line(format!(
            "largest device batch that fits: {} (recompute {}), {} without recomputation",
            self.max_device_batch,
            if self.recompute_requested == Recompute::Auto {
                "full"
            } else {
                self.recompute.name()
            },
            self.max_device_batch_without_recompute
        ));
        if self.recompute_flops_overhead > 0.0 {
            line(format!(
                "recomputation adds {:.0}% to the FLOPs of a step",
                100.0 * self.recompute_flops_overhead
            ));
        }
        if let Some(c) = &self.comm {
            s.push_str(&c.render());
        }
        let mut line = |t: String| {
            s.push_str(&t);
            s.push('\n');
        };
        line(format!("time at {:.0}% MFU:", 100.0 * self.mfu));
        for t in &self.times {
            let cost = t.usd.map(|u| format!("  ${u:.0}")).unwrap_or_default();
            line(format!("  {} x {:<5} {:10.1} h{cost}", t.world_size, t.gpu, t.hours));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_node_request(depth: usize, dbs: usize, total: usize) -> PlanRequest {
        let model = ModelConfig::from_depth(depth).unwrap();
        PlanRequest {
            model,
            batch: BatchPlan::new(dbs, 2048, total, 8).unwrap(),
            horizon: Horizon::ParamDataRatio(20.0),
            precision: Precision::Bf16,
            device: "h100".into(),
            device_mem_bytes: 187.5 * GB,
            recompute: Recompute::Auto,
            mfu: 0.5,
            usd_per_gpu_hour: None,
        }
    }

    #[test]
    fn non_divisible_batch_is_a_clear_error() {
        let e = BatchPlan::new(48, 2048, 524288, 8).unwrap_err();
        assert!(e.message.contains("786432"), "{e}");
        assert!(e.message.contains("--total-batch-size"), "{e}");
        let b = BatchPlan::new(16, 2048, 524288, 2).unwrap();
        assert_eq!(b.grad_accum, 8);
    }

    #[test]
    fn horizon_precedence_and_counts() {
        let m = ModelConfig::from_depth(20).unwrap();
        let h = Horizon::from_flags(Some(7), Some(1e20), Some(3.0)).unwrap();
        assert_eq!(h.num_iterations(&m, 524288), 7);
        let h = Horizon::from_flags(None, Some(1e19), Some(3.0)).unwrap();
        let expect = (1e19 / (m.flops_per_token() * 524288.0)).round() as u64;
        assert_eq!(h.num_iterations(&m, 524288), expect);
        // d20: 20 * 560988160 / 524288 = 21400.1 -> 21400 (nanochat's speedrun count)
        let h = Horizon::from_flags(None, None, None).unwrap();
        assert_eq!(h.num_iterations(&m, 524288), 21400);
        assert!(Horizon::from_flags(None, Some(-1.0), None).is_err());
    }

    /// SPEC.md section 7: about 32*d bytes per token per layer without recomputation (the engine keeps
    /// 14d + a few per-head values: 28d bytes in bf16), d for full, in between for selective.
    #[test]
    fn activations_per_policy_match_spec_section_7() {
        let m = ModelConfig::from_depth(38).unwrap();
        let d = 2432.0;
        let per = activation_elems_per_token_per_layer(&m, Recompute::None) as f64 * 2.0;
        assert!(per > 26.0 * d && per < 34.0 * d, "{} d bytes/token/layer", per / d);
        assert_eq!(activation_elems_per_token_per_layer(&m, Recompute::Full), 2432);
        let sel = activation_elems_per_token_per_layer(&m, Recompute::Selective) as f64 * 2.0;
        assert!(sel > 12.0 * d && sel < 0.75 * per, "selective {} d", sel / d);
        // d38 at 48 x 2048: 250-300 GB kept, far over 187.5 GB
        let kept = per * 38.0 * 48.0 * 2048.0;
        assert!(kept > 250e9 && kept < 300e9, "{kept:e}");
        // fp32 logits of that micro-batch: ~26 GB
        assert!((unchunked_logits_bytes(&m, 48 * 2048) / 25.8e9 - 1.0).abs() < 0.01);
    }

    /// This build's CUDA backend keeps the CPU's f32 buffers, plus the CUDA context; bf16 halves the
    /// weights and most activations and adds fp32 master weights.
    #[test]
    fn fp32_on_a_gpu_is_the_cpus_buffers_plus_the_context() {
        let m = ModelConfig::from_depth(8).unwrap();
        let cpu = memory_per_gpu(&m, 4, 1, Precision::Fp32, Recompute::None);
        let gpu = memory_per_gpu(&m, 4, 1, Precision::Fp32Gpu, Recompute::None);
        let bf16 = memory_per_gpu(&m, 4, 1, Precision::Bf16, Recompute::None);
        let before_slack = cpu.total - cpu.slack;
        assert_eq!(gpu.total - gpu.slack, before_slack);
        assert_eq!(gpu.slack - cpu.slack, GPU_CONTEXT_BYTES);
        assert_eq!(bf16.params * 2.0, gpu.params);
        // bf16 halves the activations but the residual stream, its gradient and the statistics (f32)
        assert!(bf16.activations * 2.0 > gpu.activations && bf16.activations * 2.0 < 1.1 * gpu.activations);
        assert_eq!((gpu.master_weights, bf16.master_weights), (0.0, gpu.params));
    }

    #[test]
    fn driver_names_map_to_known_gpus() {
        assert_eq!(gpu_for_device_name("NVIDIA H200").unwrap().name, "h200");
        assert_eq!(gpu_for_device_name("NVIDIA H100 80GB HBM3").unwrap().name, "h100");
        assert_eq!(gpu_for_device_name("NVIDIA B200").unwrap().name, "b200");
        assert!(gpu_for_device_name("NVIDIA GeForce RTX 4090").is_none());
    }

    /// Auto picks none, selective or full by where the memory falls, and CPU ranks (threads) share it.
    #[test]
    fn cheapest_policy_follows_the_memory() {
        let m = ModelConfig::from_depth(8).unwrap();
        let total = |p| memory_per_gpu(&m, 4, 1, Precision::Fp32, p).total;
        let (none, sel, full) = (
            total(Recompute::None),
            total(Recompute::Selective),
            total(Recompute::Full),
        );
        assert!(none > sel && sel > full, "{none} {sel} {full}");
        let pick = |mem, ranks| cheapest_policy_that_fits(&m, 4, 1, Precision::Fp32, mem, ranks);
        assert_eq!(pick(none, 1), Some(Recompute::None));
        assert_eq!(pick(none - 1.0, 1), Some(Recompute::Selective));
        assert_eq!(pick(sel - 1.0, 1), Some(Recompute::Full));
        assert_eq!(pick(full - 1.0, 1), None);
        // two thread ranks need twice the memory for the same choice
        assert_eq!(pick(2.0 * none - 1.0, 2), Some(Recompute::Selective));
        assert_eq!(pick(2.0 * none, 2), Some(Recompute::None));
        assert_eq!(
            pick(none, 2),
            if 2.0 * full <= none {
                Some(Recompute::Full)
            } else {
                None
            }
        );
    }

    /// SPEC.md section 7 / issue 4: the user's two configurations on 8 x 187.5 GB fit with recomputation,
    /// not without, and the plan says how much they would need.
    #[test]
    fn user_configs_fit_only_with_recomputation() {
        for (depth, dbs, total) in [(38usize, 48usize, 786432usize), (52, 24, 393216)] {
            let p = Plan::new(&user_node_request(depth, dbs, total)).unwrap();
            assert!(p.fits, "d{depth}: {}", p.render());
            assert_ne!(p.recompute, Recompute::None);
            assert!(!p.fits_without_recompute, "d{depth}");
            assert!(
                p.memory_without_recompute.total > 187.5 * GB + 50e9,
                "d{depth}: {}",
                p.render()
            );
            assert!(p.memory.total < 187.5 * GB);
            assert_eq!(p.grad_accum, 1);
            assert!(
                p.max_device_batch >= dbs && p.max_device_batch_without_recompute < dbs,
                "d{depth}"
            );
            let text = p.render();
            assert!(
                !text.contains("DOES NOT FIT")
                    && text.contains("without recomputation")
                    && text.contains("does not fit")
            );
        }
    }

    #[test]
    fn spec_flops_tokens_and_hours() {
        let p = Plan::new(&user_node_request(38, 48, 786432)).unwrap();
        // 2*V*d + 12*L*d^2 (the seed document's 3,016,274,944 has an arithmetic slip in the layer term)
        assert_eq!(p.params, 3_015_835_648);
        assert!((p.flops_per_token / 1.94e10 - 1.0).abs() < 0.005);
        // 20 tokens per param, floor to whole steps of 786432 tokens
        assert_eq!(p.num_iterations, 20 * 3_015_835_648 / 786432);
        // SPEC 7: ~82 h on 8 x H100 and ~36 h on 8 x B200 at 50% MFU
        let h100 = p.times.iter().find(|t| t.gpu == "h100").unwrap().hours;
        let b200 = p.times.iter().find(|t| t.gpu == "b200").unwrap().hours;
        assert!((h100 / 82.0 - 1.0).abs() < 0.02, "{h100}");
        assert!((b200 / 36.0 - 1.0).abs() < 0.02, "{b200}");
        let p = Plan::new(&user_node_request(52, 24, 393216)).unwrap();
        assert!((p.flops_per_token / 4.70e10 - 1.0).abs() < 0.005);
        let h100 = p.times.iter().find(|t| t.gpu == "h100").unwrap();
        assert!((h100.hours / 485.0 - 1.0).abs() < 0.02, "{}", h100.hours);
        assert_eq!(h100.usd, None);
        let mut r = user_node_request(52, 24, 393216);
        r.usd_per_gpu_hour = Some(2.0);
        let p = Plan::new(&r).unwrap();
        let h100 = p.times.iter().find(|t| t.gpu == "h100").unwrap();
        assert_eq!(h100.usd, Some(2.0 * 8.0 * h100.hours));
    }

    #[test]
    fn memory_breakdown_by_hand_for_a_small_case() {
        // world 1, fp32: params 4N, grads 4N, no master, state = 2 * 4 * (wte + lm_head) + 4 * matrices
        let m = ModelConfig::new(2, 64, 2, 2, 32, 100, 16).unwrap();
        let n = m.num_params() as f64;
        let emb = 2.0 * 100.0 * 64.0;
        let mm = memory_per_gpu(&m, 1, 1, Precision::Fp32, Recompute::Full);
        assert_eq!(mm.params, 4.0 * n);
        assert_eq!(mm.grads, 4.0 * n);
        assert_eq!(mm.master_weights, 0.0);
        assert_eq!(mm.optimizer_state, 4.0 * (2.0 * emb + (n - emb)));
        assert_eq!(mm.comm_buffers, 0.0);
        // exactly what the model allocates for this micro-batch, in f32
        let l = activation_layout(&m, 1, 16, model::Recompute::Full);
        assert_eq!(mm.activations, ((l.total - l.loss_workspace) * 4) as f64);
        assert_eq!(mm.loss_workspace, (l.loss_workspace * 4) as f64);
        // world 4, bf16: master weights and state shrink roughly 4x
        let m4 = memory_per_gpu(&m, 1, 4, Precision::Bf16, Recompute::Full);
        assert!(m4.optimizer_state < mm.optimizer_state / 3.0);
        assert_eq!(m4.params, 2.0 * n);
    }

    #[test]
    fn auto_picks_the_cheapest_that_fits() {
        let mut r = user_node_request(20, 4, 65536);
        r.device_mem_bytes = 80.0 * GIB;
        let p = Plan::new(&r).unwrap();
        assert_eq!(p.recompute, Recompute::None);
        r.batch = BatchPlan::new(64, 2048, 8 * 64 * 2048, 8).unwrap();
        let p = Plan::new(&r).unwrap();
        assert_ne!(p.recompute, Recompute::None);
        assert!(p.fits);
    }

    #[test]
    fn mem_sizes_parse_with_units() {
        assert_eq!(parse_mem_size("187.5GB").unwrap(), 187.5e9);
        assert_eq!(parse_mem_size("80").unwrap(), 80.0 * GIB);
        assert_eq!(parse_mem_size("179 GiB").unwrap(), 179.0 * GIB);
        assert!(parse_mem_size("lots").is_err());
        assert!(parse_mem_size("-3GB").is_err());
        assert!(gpu_by_name("H100").is_ok());
        assert!(gpu_by_name("tpu").is_err());
    }
}
