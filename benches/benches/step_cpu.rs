//! Whole-step CPU throughput: forward + backward of a depth-4 GPT, against the `gemm` crate's own speed
//! on exactly the matmul shapes of that step. Prints a table; not a criterion bench (a step is ~1 s).
//!
//! Run: cargo bench -p nc-benches --bench step_cpu [-- --vocab V --batch B --seq T --steps N --threads N
//!      --depth L --recompute none|selective|full]
//!
//! The step runs through `Timed`, a `Backend` that forwards to the CPU backend and times every op, so the
//! table says where the time goes. Then every matmul shape the step issued is re-run alone (same gemm,
//! same threads): their total FLOPs over their total time is "gemm's own GFLOP/s" for this model.

use nc_benches::usize_flag;
use nc_core::backend::cpu::{CpuBackend, CpuIds};
use nc_core::backend::{AttnShape, Backend, Gemm, Heads, Rotation, View, ViewMut};
use nc_core::model::{Gpt, Recompute};
use nc_core::ModelConfig;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Stats {
    /// op name -> (time, calls, flops)
    ops: BTreeMap<&'static str, (Duration, u64, f64)>,
    /// The shape of every matmul of a step, in order.
    shapes: Vec<Gemm>,
    record_shapes: bool,
}

/// The CPU backend with a stopwatch around every op.
struct Timed {
    inner: CpuBackend,
    /// Matmuls with the vocabulary as a dimension are the lm_head's; the table reports them apart.
    vocab: usize,
    stats: RefCell<Stats>,
}

impl Timed {
    fn time<R>(&self, name: &'static str, flops: f64, f: impl FnOnce() -> R) -> R {
        let t0 = Instant::now();
        let r = f();
        let dt = t0.elapsed();
        let mut s = self.stats.borrow_mut();
        let e = s.ops.entry(name).or_default();
        e.0 += dt;
        e.1 += 1;
        e.2 += flops;
        r
    }
}

/// Multiply-adds of causal attention: the T(T+1)/2 visible (query, key) pairs, D wide, per head.
fn attn_pairs(s: &AttnShape) -> f64 {
    (s.batch * s.n_head * s.head_dim) as f64 * (s.tq * (s.tq + 1) / 2) as f64
}

/// Every op the model's step calls is timed by name; the rest (allocation, the optimizer's ops) go to the CPU
/// backend untimed (`Delegate` forwards them).
impl nc_core::backend::delegate::Delegate for Timed {
    type Inner = CpuBackend;
    fn inner(&self) -> &CpuBackend {
        &self.inner
    }
    fn upload(&self, dst: ViewMut<'_, CpuBackend>, src: &[f32]) {
        self.time("upload/download", 0.0, || self.inner.upload(dst, src))
    }
    fn download(&self, src: View<'_, CpuBackend>, dst: &mut [f32]) {
        self.time("upload/download", 0.0, || self.inner.download(src, dst))
    }
    fn upload_ids(&self, dst: &mut CpuIds, src: &[i32]) {
        self.time("upload/download", 0.0, || self.inner.upload_ids(dst, src))
    }
    fn fill(&self, dst: ViewMut<'_, CpuBackend>, value: f32) {
        self.time("fill/copy", 0.0, || self.inner.fill(dst, value))
    }
    fn copy(&self, src: View<'_, CpuBackend>, dst: ViewMut<'_, CpuBackend>) {
        self.time("fill/copy", 0.0, || self.inner.copy(src, dst))
    }
    fn matmul(&self, shape: Gemm, a: View<'_, CpuBackend>, b: View<'_, CpuBackend>, c: ViewMut<'_, CpuBackend>) {
        if self.stats.borrow().record_shapes {
            self.stats.borrow_mut().shapes.push(shape);
        }
        let name = if [shape.m, shape.n, shape.k].contains(&self.vocab) {
            "matmul (lm_head)"
        } else {
            "matmul (blocks)"
        };
        self.time(name, shape.flops(), || self.inner.matmul(shape, a, b, c))
    }
    fn embedding_forward(
        &self,
        ids: &CpuIds,
        n: usize,
        wte: View<'_, CpuBackend>,
        d: usize,
        out: ViewMut<'_, CpuBackend>,
    ) {
        self.time("embedding", 0.0, || self.inner.embedding_forward(ids, n, wte, d, out))
    }
    fn embedding_backward(
        &self,
        ids: &CpuIds,
        n: usize,
        dout: View<'_, CpuBackend>,
        d: usize,
        dwte: ViewMut<'_, CpuBackend>,
    ) {
        self.time("embedding", 0.0, || {
            self.inner.embedding_backward(ids, n, dout, d, dwte)
        })
    }
    fn rmsnorm_forward(
        &self,
        x: View<'_, CpuBackend>,
        rows: usize,
        dim: usize,
        eps: f32,
        y: ViewMut<'_, CpuBackend>,
        rstd: ViewMut<'_, CpuBackend>,
    ) {
        self.time("rmsnorm", 0.0, || {
            self.inner.rmsnorm_forward(x, rows, dim, eps, y, rstd)
        })
    }
    fn rmsnorm_backward(
        &self,
        y: View<'_, CpuBackend>,
        rstd: View<'_, CpuBackend>,
        dy: View<'_, CpuBackend>,
        rows: usize,
        dim: usize,
        dx: ViewMut<'_, CpuBackend>,
        accumulate: bool,
    ) {
        self.time("rmsnorm", 0.0, || {
            self.inner.rmsnorm_backward(y, rstd, dy, rows, dim, dx, accumulate)
        })
    }
    fn rotary(&self, x: ViewMut<'_, CpuBackend>, shape: Heads, table: View<'_, CpuBackend>, rotation: Rotation) {
        self.time("rotary", 0.0, || self.inner.rotary(x, shape, table, rotation))
    }
    fn attention_forward(
        &self,
        shape: AttnShape,
        q: View<'_, CpuBackend>,
        k: View<'_, CpuBackend>,
        vv: View<'_, CpuBackend>,
        out: ViewMut<'_, CpuBackend>,
        lse: ViewMut<'_, CpuBackend>,
    ) {
        // Two products (QK^T, PV) over the visible pairs.
        let flops = 4.0 * attn_pairs(&shape);
        self.time("attention fwd", flops, || {
            self.inner.attention_forward(shape, q, k, vv, out, lse)
        })
    }
    fn attention_backward(
        &self,
        shape: AttnShape,
        q: View<'_, CpuBackend>,
        k: View<'_, CpuBackend>,
        vv: View<'_, CpuBackend>,
        out: View<'_, CpuBackend>,
        lse: View<'_, CpuBackend>,
        dout: View<'_, CpuBackend>,
        dq: ViewMut<'_, CpuBackend>,
        dk: ViewMut<'_, CpuBackend>,
        dv: ViewMut<'_, CpuBackend>,
    ) {
        // Five products: QK^T (recompute), P^T dO, dO V^T, dS K, dS^T Q.
        let flops = 10.0 * attn_pairs(&shape);
        self.time("attention bwd", flops, || {
            self.inner
                .attention_backward(shape, q, k, vv, out, lse, dout, dq, dk, dv)
        })
    }
    fn relu2_forward(&self, u: View<'_, CpuBackend>, h: ViewMut<'_, CpuBackend>) {
        self.time("relu2", 0.0, || self.inner.relu2_forward(u, h))
    }
    fn relu2_backward(&self, u: View<'_, CpuBackend>, dh: ViewMut<'_, CpuBackend>) {
        self.time("relu2", 0.0, || self.inner.relu2_backward(u, dh))
    }
    fn add_inplace(&self, x: ViewMut<'_, CpuBackend>, y: View<'_, CpuBackend>) {
        self.time("add", 0.0, || self.inner.add_inplace(x, y))
    }
    fn softcap_cross_entropy(
        &self,
        logits: ViewMut<'_, CpuBackend>,
        rows: usize,
        vocab: usize,
        cap: f32,
        targets: &CpuIds,
        target_off: usize,
        losses: ViewMut<'_, CpuBackend>,
        grad_scale: Option<f32>,
    ) {
        self.time("softcap+cross-entropy", 0.0, || {
            self.inner
                .softcap_cross_entropy(logits, rows, vocab, cap, targets, target_off, losses, grad_scale)
        })
    }
    fn softcap(&self, logits: ViewMut<'_, CpuBackend>, cap: f32) {
        self.time("softcap+cross-entropy", 0.0, || self.inner.softcap(logits, cap))
    }
    fn rotary_qknorm_forward(
        &self,
        x: ViewMut<'_, CpuBackend>,
        shape: Heads,
        table: View<'_, CpuBackend>,
        eps: f32,
        y: ViewMut<'_, CpuBackend>,
        rstd: ViewMut<'_, CpuBackend>,
    ) {
        self.time("rotary+qk-norm", 0.0, || {
            self.inner.rotary_qknorm_forward(x, shape, table, eps, y, rstd)
        })
    }
    fn rotary_qknorm_backward(
        &self,
        y: View<'_, CpuBackend>,
        rstd: View<'_, CpuBackend>,
        dy: View<'_, CpuBackend>,
        shape: Heads,
        table: View<'_, CpuBackend>,
        dx: ViewMut<'_, CpuBackend>,
    ) {
        self.time("rotary+qk-norm", 0.0, || {
            self.inner.rotary_qknorm_backward(y, rstd, dy, shape, table, dx)
        })
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let vocab = usize_flag(&args, "--vocab", 65536);
    let batch = usize_flag(&args, "--batch", 2);
    let seq = usize_flag(&args, "--seq", 512);
    let steps = usize_flag(&args, "--steps", 5);
    let threads = usize_flag(&args, "--threads", 0);
    let depth = usize_flag(&args, "--depth", 4);
    let policy = match args
        .iter()
        .position(|a| a == "--recompute")
        .map(|i| args.get(i + 1).map(String::as_str))
    {
        None => Recompute::None,
        Some(Some("none")) => Recompute::None,
        Some(Some("selective")) => Recompute::Selective,
        Some(Some("full")) => Recompute::Full,
        Some(_) => {
            eprintln!("--recompute needs none, selective or full");
            std::process::exit(2);
        }
    };
    if threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .expect("rayon pool");
    }
    let cfg = ModelConfig::from_depth(depth)
        .and_then(|c| c.with_vocab_size(vocab))
        .and_then(|c| c.with_sequence_len(seq))
        .unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2)
        });
    let timed = Timed {
        inner: CpuBackend::new(),
        vocab,
        stats: RefCell::new(Stats::default()),
    };
    let mut model = Gpt::new(timed, cfg, batch, seq, policy).expect("model");
    model.init(42);
    let n = batch * seq;
    // Token ids from a fixed LCG: the step's cost does not depend on their values.
    let mut x = 12345u64;
    let mut next = || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((x >> 33) % vocab as u64) as u32
    };
    let inputs: Vec<u32> = (0..n).map(|_| next()).collect();
    let targets: Vec<i32> = (0..n).map(|_| next() as i32).collect();

    // Warm-up step (thread pools, scratch growth, page faults), recording the matmul shapes.
    model.be.stats.borrow_mut().record_shapes = true;
    model.forward_backward(&inputs, &targets, 1.0).unwrap();
    let shapes = std::mem::take(&mut model.be.stats.borrow_mut().shapes);
    model.be.stats.borrow_mut().record_shapes = false;
    model.be.stats.borrow_mut().ops.clear();

    let mut times = Vec::new();
    for _ in 0..steps {
        let t0 = Instant::now();
        model.forward_backward(&inputs, &targets, 1.0).unwrap();
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    // Best of N for both the step and gemm alone: on a shared machine the minimum is the least disturbed.
    let step_s = times[0];
    let median_s = times[times.len() / 2];
    let total_s: f64 = times.iter().sum();

    // gemm alone on the same shapes: each shape once per repetition, in step order.
    let be = CpuBackend::new();
    let maxlen = shapes
        .iter()
        .map(|s| s.a_len().max(s.b_len()).max(s.c_len()))
        .max()
        .unwrap_or(0);
    // Zero-filled inputs: gemm's speed does not depend on the values.
    let (a, b) = (be.alloc(maxlen), be.alloc(maxlen));
    let mut c = be.alloc(maxlen);
    let gemm_flops: f64 = shapes.iter().map(Gemm::flops).sum();
    let mut gemm_s = f64::INFINITY;
    for _ in 0..steps {
        let t0 = Instant::now();
        for s in &shapes {
            // Written, not accumulated, whatever the step did (the same work but for reading C).
            let (a, b) = (View::at(&a, 0, s.a_len()), View::at(&b, 0, s.b_len()));
            be.matmul(s.accumulating(false), a, b, ViewMut::at(&mut c, 0, s.c_len()));
        }
        gemm_s = gemm_s.min(t0.elapsed().as_secs_f64());
    }

    let model_flops = cfg.flops_per_token() * n as f64;
    let stats = model.be.stats.borrow();
    let exec_flops: f64 = stats.ops.values().map(|e| e.2).sum::<f64>() / steps as f64;
    println!("step_cpu: depth {depth} (d {}, {} heads of {}), vocab {vocab}, batch {batch} x seq {seq} = {n} tokens, {} threads, {steps} timed steps",
        cfg.n_embd, cfg.n_head, cfg.head_dim, rayon::current_num_threads());
    println!(
        "params {:.1} M, model FLOPs/token (6N + 12LHDT) {:.3e}",
        cfg.num_params() as f64 / 1e6,
        cfg.flops_per_token()
    );
    println!(
        "recompute {policy:?}: activations {:.1} MiB (f32, as allocated)",
        model.allocated_activation_elements() as f64 * 4.0 / (1u64 << 20) as f64
    );
    println!();
    println!("{:<34} {:>12}", "best step time (s)", format!("{step_s:.3}"));
    println!("{:<34} {:>12}", "median step time (s)", format!("{median_s:.3}"));
    println!("{:<34} {:>12.0}", "tokens/s (best step)", n as f64 / step_s);
    println!(
        "{:<34} {:>12.2}",
        "model GFLOP/s (6N+12LHDT)",
        model_flops / step_s / 1e9
    );
    println!(
        "{:<34} {:>12.2}",
        "executed GFLOP/s (counted)",
        exec_flops / step_s / 1e9
    );
    println!(
        "{:<34} {:>12.2}",
        "gemm alone, same shapes, GFLOP/s",
        gemm_flops / gemm_s / 1e9
    );
    println!(
        "{:<34} {:>12.2}",
        "model GFLOP/s / gemm GFLOP/s",
        (model_flops / step_s) / (gemm_flops / gemm_s)
    );
    println!();
    println!(
        "{:<24} {:>9} {:>7} {:>8} {:>10}",
        "op (per step)", "ms", "%", "calls", "GFLOP/s"
    );
    let mut rows: Vec<_> = stats.ops.iter().collect();
    rows.sort_by(|x, y| y.1 .0.cmp(&x.1 .0));
    let per_step_total = total_s / steps as f64;
    let mut accounted = 0.0;
    for (name, (dt, calls, flops)) in rows {
        let s = dt.as_secs_f64() / steps as f64;
        accounted += s;
        let gf = if *flops > 0.0 {
            format!("{:.2}", flops / dt.as_secs_f64() / 1e9)
        } else {
            "-".into()
        };
        println!(
            "{:<24} {:>9.1} {:>7.1} {:>8} {:>10}",
            name,
            s * 1e3,
            100.0 * s / per_step_total,
            calls / steps as u64,
            gf
        );
    }
    let other = per_step_total - accounted;
    println!(
        "{:<24} {:>9.1} {:>7.1}",
        "(outside ops)",
        other * 1e3,
        100.0 * other / per_step_total
    );
}
