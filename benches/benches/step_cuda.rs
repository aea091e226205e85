//! Whole-step GPU throughput: zero_grads + forward + backward of a GPT on the CUDA backend, timed as the
//! host sees it, against the device's peaks. Optionally (`--optimizer`) it also times the optimizer step
//! the way the training loop runs it on a device backend: the `DeviceOptimizer`'s clip (global norm, back
//! to the host) and its Muon + AdamW step, on the device, synchronized. Prints a table and a last line of
//! JSON; not a criterion bench (a step is ~1 s).
//!
//! Run:   cargo bench -p nc-benches --bench step_cuda -- --depth 20 --dbs 8
//! Flags: --depth L (20)  --dbs B (8)  --seq T (2048)  --vocab V (65536)  --steps N (5)  --warmup N (2)
//!        --recompute none|selective|full (none)  --optimizer  --opt-steps N (1)  --device N (0)
//!        --tf32 (cuBLAS may use TF32 tensor cores for the GEMMs; default strict f32)
//!        --precision fp32|bf16 (fp32: the strict f32 engine; bf16: f32 master weights, bf16 working copy and
//!        activations, cuBLASLt bf16 GEMMs, the fused bf16 kernels and flash attention: `Storages`)
//!
//! To carry it to a GPU machine: `cargo bench -p nc-benches --bench step_cuda --no-run` builds it, and the
//! executable lands in target/release/deps/step_cuda-* (run it with the flags above, no `--`).
//!
//! Without a CUDA device (or when the backend cannot start) it prints one line saying why and exits 0:
//! the GPU check script reports a missing device itself.
//!
//! Figures:
//! - model FLOPs are `ModelConfig::flops_per_token` (6 * non-embedding params + 12 L H D T, SPEC.md
//!   section 1, the count nanochat's MFU uses) times the tokens of a step. Recomputation is not counted:
//!   it is work the model does not need, so a policy that recomputes shows a lower MFU.
//! - bf16 MFU divides by the dense bf16 tensor-core peak `nc_core::plan` prices runs with (989 TFLOP/s for
//!   H100 and H200, nanochat's figure): the figure a `--precision bf16` step is judged by. Under fp32 the
//!   backend computes in strict f32 (cuBLAS sgemm, no TF32), so there it is only a reference.
//! - f32 MFU divides by the non-tensor-core FP32 peak in NVIDIA's datasheets (see `F32_PEAKS`): the ceiling
//!   of the strict-f32 GEMMs this backend runs.

use nc_benches::usize_flag;
use nc_core::backend::cuda::{device_count, CudaBackend};
use nc_core::backend::Backend;
use nc_core::model::Gpt;
use nc_core::optim::device::DeviceOptimizer;
use nc_core::optim::schedule::muon_momentum;
use nc_core::optim::OptimConfig;
use nc_core::plan::{self, Precision, Recompute};
use nc_core::ModelConfig;
use std::time::Instant;

/// Dense FP32 (CUDA cores, not tensor cores) peaks, FLOP/s, by a fragment of the driver's device name.
/// Sources: NVIDIA H100 Tensor Core GPU datasheet (FP32: 67 TFLOPS SXM, 51 PCIe, 60 NVL), NVIDIA H200
/// datasheet (FP32: 67 TFLOPS SXM, 60 NVL), NVIDIA A100 datasheet (FP32: 19.5 TFLOPS). The H100 SXM figure
/// is also 132 SMs x 128 FP32 lanes x 2 (FMA) x 1.98 GHz boost. More specific fragments come first.
const F32_PEAKS: &[(&str, f64, &str)] = &[
    ("h100 pcie", 51e12, "NVIDIA H100 datasheet, PCIe"),
    ("h100 nvl", 60e12, "NVIDIA H100 datasheet, NVL"),
    ("h100", 67e12, "NVIDIA H100 datasheet, SXM"),
    ("h200 nvl", 60e12, "NVIDIA H200 datasheet, NVL"),
    ("h200", 67e12, "NVIDIA H200 datasheet, SXM"),
    ("a100", 19.5e12, "NVIDIA A100 datasheet"),
];

/// Max gradient norm for the clipped optimizer step: nc-train's default (--grad-clip 1.0).
const GRAD_CLIP: f64 = 1.0;

const MIB: f64 = 1048576.0;

/// The bf16 peak from the planner's table: the first of its GPU names found in the driver's name.
/// Returns (planner name, FLOP/s); None for a GPU the planner does not know.
fn bf16_peak(device_name: &str) -> Option<(&'static str, f64)> {
    let lower = device_name.to_ascii_lowercase();
    let known = plan::GPUS.iter().find(|g| lower.contains(g.name))?;
    let g = plan::gpu_by_name(known.name).ok()?;
    Some((g.name, g.peak_bf16_flops))
}

fn f32_peak(device_name: &str) -> Option<(f64, &'static str)> {
    // Driver names look like "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200 NVL".
    let lower = device_name.to_ascii_lowercase();
    F32_PEAKS
        .iter()
        .find(|(frag, _, _)| {
            // every word of the fragment appears in the name, in any position
            frag.split(' ').all(|w| lower.contains(w))
        })
        .map(|&(_, peak, source)| (peak, source))
}

/// (used, total) device memory in bytes, as cuMemGetInfo reports it for the whole device (other
/// processes included); None if the query fails.
fn mem_used(ctx: &cudarc::driver::CudaContext) -> Option<(f64, f64)> {
    ctx.mem_get_info()
        .ok()
        .map(|(free, total)| ((total - free) as f64, total as f64))
}

fn pct(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{:.2}", 100.0 * v))
}

fn mib(x: Option<(f64, f64)>) -> String {
    x.map_or("-".into(), |(used, _)| format!("{:.0}", used / MIB))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let depth = usize_flag(&args, "--depth", 20);
    let dbs = usize_flag(&args, "--dbs", 8);
    let seq = usize_flag(&args, "--seq", 2048);
    let vocab = usize_flag(&args, "--vocab", 65536);
    let steps = usize_flag(&args, "--steps", 5).max(1);
    let warmup = usize_flag(&args, "--warmup", 2);
    let ordinal = usize_flag(&args, "--device", 0);
    let with_optimizer = args.iter().any(|a| a == "--optimizer");
    let tf32 = args.iter().any(|a| a == "--tf32");
    let precision = match args.iter().position(|a| a == "--precision") {
        None => Precision::Fp32Gpu,
        Some(i) => match args.get(i + 1).map(String::as_str) {
            Some("fp32") => Precision::Fp32Gpu,
            Some("bf16") => Precision::Bf16,
            _ => {
                eprintln!("--precision needs fp32 or bf16");
                std::process::exit(2);
            }
        },
    };
    let prec_name = if precision == Precision::Bf16 { "bf16" } else { "fp32" };
    let opt_steps = usize_flag(&args, "--opt-steps", 1).max(1);
    let policy = match args.iter().position(|a| a == "--recompute") {
        None => Recompute::None,
        Some(i) => match args.get(i + 1).map(String::as_str) {
            Some(s @ ("none" | "selective" | "full")) => Recompute::parse(s).expect("a concrete policy"),
            _ => {
                eprintln!("--recompute needs none, selective or full");
                std::process::exit(2);
            }
        },
    };
    let cfg = ModelConfig::from_depth(depth)
        .and_then(|c| c.with_vocab_size(vocab))
        .and_then(|c| c.with_sequence_len(seq))
        .unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2)
        });

    // No device is not a failure here: this bench only means something on a GPU. The GPU check sets
    // NC_REQUIRE_CUDA=1, where a skip would hide a broken machine, so there every skip exits 1.
    if device_count() == 0 {
        skip("no CUDA device found (no driver, or none visible)");
    }
    let t0 = Instant::now();
    let be = match CudaBackend::new(ordinal) {
        Ok(be) => be,
        Err(e) => skip(&format!("the CUDA backend did not start: {e}")),
    };
    if let Err(e) = be.set_tf32(tf32) {
        eprintln!("step_cuda: {e}");
        std::process::exit(1);
    }
    let backend_s = t0.elapsed().as_secs_f64();
    let device_name = be.device_name();
    // A second handle on the same (primary) context, only to ask the driver for free memory: the
    // backend keeps its own context private.
    let ctx = match cudarc::driver::CudaContext::new(ordinal) {
        Ok(c) => c,
        Err(e) => skip(&format!("opening CUDA device {ordinal} for memory queries failed: {e}")),
    };

    // What the planner says the device holds at this precision: params (with the bf16 working copy), grads,
    // activations and the loss workspace, and with --optimizer the optimizer state and Muon's scratch too (the
    // device optimizer keeps both there).
    let mem_plan = plan::memory_per_gpu(&cfg, dbs, 1, precision, policy);
    let plan_state = if with_optimizer {
        mem_plan.optimizer_state + mem_plan.optimizer_scratch
    } else {
        0.0
    };
    let plan_device = mem_plan.params + mem_plan.grads + mem_plan.activations + mem_plan.loss_workspace + plan_state;
    let mem_backend = mem_used(&ctx);
    if let Some((used, total)) = mem_backend {
        if plan_device > total - used {
            eprintln!(
                "step_cuda: the model needs about {:.0} MiB on the device (params, grads, activations and with \
                 --optimizer its state, at {prec_name}) and {:.0} MiB are free; try --recompute selective or full, \
                 or a smaller --dbs",
                plan_device / MIB,
                (total - used) / MIB
            );
            std::process::exit(1);
        }
    }

    let t0 = Instant::now();
    let mut model = match Gpt::with_precision(be, cfg, dbs, seq, plan::engine_policy(policy), precision) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("step_cuda: {e}");
            std::process::exit(2);
        }
    };
    model.init(42);
    model.be.synchronize();
    let build_s = t0.elapsed().as_secs_f64();
    let mem_model = mem_used(&ctx);

    // One row of T + 1 tokens per sequence from a fixed LCG: inputs are the first T, targets the last T
    // (the step's cost does not depend on the values, but a real shift keeps the loss meaningful).
    let n = dbs * seq;
    let mut x = 12345u64;
    let mut next = || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((x >> 33) % vocab as u64) as u32
    };
    let mut inputs = Vec::with_capacity(n);
    let mut targets = Vec::with_capacity(n);
    for _ in 0..dbs {
        let row: Vec<u32> = (0..=seq).map(|_| next()).collect();
        inputs.extend_from_slice(&row[..seq]);
        targets.extend(row[1..].iter().map(|&t| t as i32));
    }

    let step = |model: &mut Gpt<CudaBackend>| -> f32 {
        model.zero_grads();
        let loss = model.forward_backward(&inputs, &targets, 1.0).unwrap_or_else(|e| {
            eprintln!("step_cuda: forward_backward: {e}");
            std::process::exit(1)
        });
        // forward_backward already downloads the losses (which waits); this makes the end of the step
        // explicit and surfaces a kernel fault here rather than in the next step.
        model.be.synchronize();
        loss
    };

    // Warm-up: the PTX is already JIT-compiled by `new`, but cuBLAS picks and caches its kernels, and
    // attention's scratch grows, on the first calls.
    let mut warm_ms = Vec::new();
    for _ in 0..warmup {
        let t0 = Instant::now();
        step(&mut model);
        warm_ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let mut times = Vec::with_capacity(steps);
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t0 = Instant::now();
        losses.push(step(&mut model));
        times.push(t0.elapsed().as_secs_f64());
    }
    let mem_steps = mem_used(&ctx);

    let flops_tok = cfg.flops_per_token();
    let step_flops = flops_tok * n as f64;
    let bf16 = bf16_peak(&device_name);
    let f32p = f32_peak(&device_name);
    let mfu = |secs: f64, peak: Option<f64>| peak.map(|p| step_flops / secs / p);
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let best_s = sorted[0];
    let median_s = sorted[sorted.len() / 2];
    let mean_s = times.iter().sum::<f64>() / steps as f64;

    println!(
        "step_cuda: {device_name} (cuda:{ordinal}), depth {depth} (d {}, {} heads of {}), vocab {vocab}, \
         batch {dbs} x seq {seq} = {n} tokens, recompute {}, precision {prec_name}, {warmup} warm-up + {steps} \
         timed steps",
        cfg.n_embd,
        cfg.n_head,
        cfg.head_dim,
        policy.name()
    );
    println!(
        "params {:.1} M, model FLOPs/token (6N + 12LHDT) {:.3e}, per step {:.3e}",
        cfg.num_params() as f64 / 1e6,
        flops_tok,
        step_flops
    );
    match bf16 {
        Some((name, p)) => {
            let lower = device_name.to_ascii_lowercase();
            let note = if lower.contains("pcie") || lower.contains("nvl") {
                " (the planner's figure is the SXM part's; this one's is lower)"
            } else {
                ""
            };
            println!(
                "peak bf16 dense {:.0} TFLOP/s (nc_core::plan, '{name}'){note}",
                p / 1e12
            )
        }
        None => println!("peak bf16 dense: unknown for this device (nc_core::plan knows h100, h200, b200, a100)"),
    }
    match f32p {
        Some((p, source)) => println!("peak f32 non-tensor {:.1} TFLOP/s ({source})", p / 1e12),
        None => println!("peak f32 non-tensor: unknown for this device"),
    }
    println!(
        "backend start {:.2} s (context, PTX JIT, cuBLAS), model build + init {:.2} s, warm-up steps ms {:?}",
        backend_s,
        build_s,
        warm_ms.iter().map(|m| m.round()).collect::<Vec<_>>()
    );
    println!();

    println!("{:<34} {:>12}", "device memory (MiB used)", "");
    println!("{:<34} {:>12}", "  after backend start", mib(mem_backend));
    println!("{:<34} {:>12}", "  after model build", mib(mem_model));
    println!("{:<34} {:>12}", "  after the timed steps", mib(mem_steps));
    if let Some((_, total)) = mem_backend {
        println!("{:<34} {:>12.0}", "  device total", total / MIB);
    }
    let delta = match (mem_backend, mem_model) {
        (Some(a), Some(b)) => Some(b.0 - a.0),
        _ => None,
    };
    println!(
        "{:<34} {:>12}",
        "  model build (measured delta)",
        delta.map_or("-".into(), |d| format!("{:.0}", d / MIB))
    );
    // As stored: f32 master and grads, the bf16 working copy under bf16, activations by their storages.
    let (master_bytes, working_bytes) = model.allocated_weight_bytes();
    let alloc_params = (2 * master_bytes + working_bytes) as f64;
    let alloc_acts = model.allocated_activation_bytes() as f64;
    println!(
        "{:<34} {:>12.0}",
        "  model's buffers, as allocated",
        (alloc_params + alloc_acts) / MIB
    );
    println!("{:<34} {:>12.0}", "  plan: params", mem_plan.params / MIB);
    println!("{:<34} {:>12.0}", "  plan: grads", mem_plan.grads / MIB);
    println!("{:<34} {:>12.0}", "  plan: activations", mem_plan.activations / MIB);
    println!(
        "{:<34} {:>12.0}",
        "  plan: loss workspace",
        mem_plan.loss_workspace / MIB
    );
    println!("{:<34} {:>12.0}", "  plan: device total", plan_device / MIB);
    println!(
        "{:<34} {:>12.0}",
        if with_optimizer {
            "  plan: optimizer state (in it)"
        } else {
            "  plan: optimizer state (not)"
        },
        mem_plan.optimizer_state / MIB
    );
    println!();

    println!(
        "{:<8} {:>10} {:>12} {:>14} {:>10} {:>10} {:>10}",
        "step", "ms", "tokens/s", "model TFLOP/s", "MFU bf16%", "MFU f32%", "loss"
    );
    let row = |label: &str, secs: f64, loss: Option<f32>| {
        println!(
            "{:<8} {:>10.1} {:>12.0} {:>14.2} {:>10} {:>10} {:>10}",
            label,
            secs * 1e3,
            n as f64 / secs,
            step_flops / secs / 1e12,
            pct(mfu(secs, bf16.map(|b| b.1))),
            pct(mfu(secs, f32p.map(|f| f.0))),
            loss.map_or("".into(), |l| format!("{l:.4}"))
        )
    };
    for (i, (&s, &l)) in times.iter().zip(&losses).enumerate() {
        row(&format!("{}", i + 1), s, Some(l));
    }
    row("best", best_s, None);
    row("median", median_s, None);
    row("mean", mean_s, None);
    let (loss_first, loss_last) = (losses[0], losses[steps - 1]);

    // The optimizer as nc-train runs it on a device backend (train/mod.rs): the device optimizer clips and
    // steps where the parameters live; only the gradient norm comes to the host. Clip and step are timed
    // apart (a synchronize between them), each until the device is done.
    struct OptTimes {
        clip: f64,
        update: f64,
        total: f64,
        grad_norm: f64,
        loss_after: f32,
    }
    let mut opt_times: Vec<OptTimes> = Vec::new();
    let mut mem_opt = None;
    if with_optimizer {
        // built outside the timings: it allocates its state and scratch once
        let mut opt = DeviceOptimizer::new(&model.be, &cfg, OptimConfig::default()).unwrap_or_else(|e| {
            eprintln!("step_cuda: optimizer: {e}");
            std::process::exit(1)
        });
        model.be.synchronize();
        mem_opt = mem_used(&ctx);
        for i in 0..opt_steps {
            // The grads on the device are those of the last step (each step zeroes them first).
            let t0 = Instant::now();
            let (be, params, grads) = model.backend_params_grads_mut();
            let grad_norm = opt.clip(be, grads, GRAD_CLIP);
            be.synchronize();
            let t_clip = Instant::now();
            opt.step(be, params, grads, 1.0, muon_momentum(i as u64));
            be.synchronize();
            let t_end = Instant::now();
            // A fresh gradient at the new params (untimed here): the loss after the update, which should
            // be lower than before on this same batch, and the grads the next optimizer step uses.
            let loss_after = step(&mut model);
            opt_times.push(OptTimes {
                clip: (t_clip - t0).as_secs_f64(),
                update: (t_end - t_clip).as_secs_f64(),
                total: (t_end - t0).as_secs_f64(),
                grad_norm,
                loss_after,
            });
        }
        println!();
        println!("device optimizer step (Muon + AdamW on the device, clip {GRAD_CLIP}), ms:");
        println!(
            "{:<6} {:>10} {:>12} {:>10} {:>10} {:>11}",
            "opt", "clip", "Muon+AdamW", "total", "grad norm", "loss after"
        );
        for (i, o) in opt_times.iter().enumerate() {
            println!(
                "{:<6} {:>10.1} {:>12.1} {:>10.1} {:>10.4} {:>11.4}",
                i + 1,
                o.clip * 1e3,
                o.update * 1e3,
                o.total * 1e3,
                o.grad_norm,
                o.loss_after
            );
        }
        println!(
            "device memory after the optimizer's allocations: {} MiB (state {:.0} MiB planned)",
            mib(mem_opt),
            mem_plan.optimizer_state / MIB
        );
        let opt_s = opt_times.iter().map(|o| o.total).fold(f64::INFINITY, f64::min);
        let whole = median_s + opt_s;
        println!(
            "median step + best optimizer step: {:.1} ms, {:.0} tokens/s, MFU bf16 {}%, f32 {}%",
            whole * 1e3,
            n as f64 / whole,
            pct(mfu(whole, bf16.map(|b| b.1))),
            pct(mfu(whole, f32p.map(|f| f.0)))
        );
    }

    let finite = losses.iter().all(|l| l.is_finite()) && opt_times.iter().all(|o| o.loss_after.is_finite());
    let opt_best = opt_times.iter().map(|o| o.total).fold(f64::INFINITY, f64::min);
    let opt_json = if opt_times.is_empty() {
        serde_json::Value::Null
    } else {
        let first = &opt_times[0];
        serde_json::json!({
            "steps": opt_times.len(),
            "where": "device",
            "best_ms": opt_best * 1e3,
            "clip_ms": first.clip * 1e3,
            "update_ms": first.update * 1e3,
            "mem_used_after_optimizer_bytes": mem_opt.map(|m| m.0),
            "grad_norm": first.grad_norm,
            "loss_after": opt_times.last().map(|o| o.loss_after),
            "step_plus_opt_tokens_per_s": n as f64 / (median_s + opt_best),
        })
    };
    let json = serde_json::json!({
        "bench": "step_cuda",
        "device": device_name,
        "tf32": tf32,
        "precision": prec_name,
        "ordinal": ordinal,
        "depth": depth,
        "dbs": dbs,
        "seq": seq,
        "vocab": vocab,
        "tokens_per_step": n,
        "recompute": policy.name(),
        "steps": steps,
        "warmup": warmup,
        "params": cfg.num_params(),
        "flops_per_token": flops_tok,
        "step_ms_best": best_s * 1e3,
        "step_ms_median": median_s * 1e3,
        "step_ms_mean": mean_s * 1e3,
        "tokens_per_s": n as f64 / median_s,
        "model_tflops": step_flops / median_s / 1e12,
        "peak_bf16_flops": bf16.map(|b| b.1),
        "peak_f32_flops": f32p.map(|f| f.0),
        "mfu_bf16": mfu(median_s, bf16.map(|b| b.1)),
        "mfu_f32": mfu(median_s, f32p.map(|f| f.0)),
        "loss_first": loss_first,
        "loss_last": loss_last,
        "loss_finite": finite,
        "mem_total_bytes": mem_backend.map(|m| m.1),
        "mem_used_after_backend_bytes": mem_backend.map(|m| m.0),
        "mem_used_after_model_bytes": mem_model.map(|m| m.0),
        "mem_used_after_steps_bytes": mem_steps.map(|m| m.0),
        "plan_device_bytes": plan_device,
        "model_allocated_bytes": alloc_params + alloc_acts,
        "backend_start_s": backend_s,
        "optimizer": opt_json,
    });
    println!();
    println!("{json}");
    // A non-finite loss is a broken step, whatever its speed: fail so a script running this notices.
    if !finite {
        eprintln!("step_cuda: a loss was not finite ({losses:?}); the timings above measure a broken step");
        std::process::exit(1);
    }
}

/// Says why the bench cannot run and exits: 0 normally, 1 under NC_REQUIRE_CUDA (the GPU check).
fn skip(why: &str) -> ! {
    println!("step_cuda: {why}; skipped");
    std::process::exit(if std::env::var_os("NC_REQUIRE_CUDA").is_some() {
        1
    } else {
        0
    });
}
