//! CPU backend kernels at the shapes of d=256..512 models: the GEMMs of a block (forward and both
//! backward products), causal attention forward/backward, rmsnorm, and one chunk of the lm_head loss.
//! Throughput is reported in "elements" = FLOPs for GEMMs and attention, rows for the rest.
//!
//! Run: cargo bench -p nc-benches --bench cpu_kernels

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use nc_core::backend::cpu::{CpuBackend, CpuBuf, CpuIds};
use nc_core::backend::{AttnShape, Backend, Gemm, View, ViewMut};
use nc_core::config::{LOGIT_SOFTCAP, RMSNORM_EPS};
use std::time::Duration;

/// Tokens per micro-batch in these benches (batch 2 x seq 512, as bench step_cpu).
const TOKENS: usize = 1024;

fn filled(be: &CpuBackend, n: usize, seed: u32) -> nc_core::backend::cpu::CpuBuf {
    let mut b = be.alloc(n);
    let mut x = seed.wrapping_mul(2654435761);
    for v in b.0.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *v = (x as f32 / u32::MAX as f32) - 0.5;
    }
    b
}

/// A criterion benchmark group measuring wall time.
type Group<'a> = BenchmarkGroup<'a, WallTime>;

/// How a group samples: `samples` samples, measured for `measure` after `warm_up`.
struct Sampling {
    samples: usize,
    measure: Duration,
    warm_up: Duration,
}

/// GEMMs, attention and the loss chunk: milliseconds an iteration.
const LONG_OPS: Sampling = Sampling {
    samples: 10,
    measure: Duration::from_secs(3),
    warm_up: Duration::from_millis(500),
};

/// rmsnorm: well under a millisecond an iteration.
const SHORT_OPS: Sampling = Sampling {
    samples: 20,
    measure: Duration::from_secs(2),
    warm_up: Duration::from_millis(300),
};

fn group<'a>(c: &'a mut Criterion, name: &str, sampling: Sampling) -> Group<'a> {
    let mut g = c.benchmark_group(name);
    g.sample_size(sampling.samples)
        .measurement_time(sampling.measure)
        .warm_up_time(sampling.warm_up);
    g
}

fn matmuls(c: &mut Criterion) {
    let be = CpuBackend::new();
    let mut g = group(c, "cpu_matmul", LONG_OPS);
    for d in [256usize, 512] {
        let n = TOKENS;
        // (label, m, n, k, a_t, b_t): forward x W^T, backward dX = dY W, dW = dY^T X.
        let shapes = [
            ("fwd c_q x W^T", n, d, d, false, true),
            ("fwd c_fc x W^T", n, 4 * d, d, false, true),
            ("fwd mlp.c_proj x W^T", n, d, 4 * d, false, true),
            ("bwd dX c_fc = dY W", n, d, 4 * d, false, false),
            ("bwd dW c_fc = dY^T X", 4 * d, d, n, true, false),
        ];
        bench_matmuls(&mut g, &be, &format!("d{d} "), &shapes);
    }
    // The lm_head chunk (1024 rows at vocab 65536, d 256: `LossChunks`): logits = x W^T, dX = dL W, dW = dL^T x.
    let (rows, vocab, d) = (nc_core::model::loss_chunk_rows(65536, TOKENS), 65536usize, 256usize);
    let shapes = [
        ("lm_head fwd x W^T", rows, vocab, d, false, true),
        ("lm_head bwd dX = dL W", rows, d, vocab, false, false),
        ("lm_head bwd dW = dL^T x", vocab, d, rows, true, false),
    ];
    bench_matmuls(&mut g, &be, "", &shapes);
    g.finish();
}

/// One benchmark per (label, m, n, k, a_t, b_t): C (m x n) = op(A) op(B), throughput in FLOPs; `id` prefixes
/// the shape in the benchmark's name.
fn bench_matmuls(g: &mut Group<'_>, be: &CpuBackend, id: &str, shapes: &[(&str, usize, usize, usize, bool, bool)]) {
    for &(label, m, nn, k, at, bt) in shapes {
        let a = filled(be, m * k, 1);
        let b = filled(be, k * nn, 2);
        let mut out = be.alloc(m * nn);
        g.throughput(Throughput::Elements(2 * (m * nn * k) as u64));
        g.bench_function(BenchmarkId::new(label, format!("{id}{m}x{nn}x{k}")), |bench| {
            bench.iter(|| {
                let (a, b, c) = (View::all(&a), View::all(&b), ViewMut::all(&mut out));
                be.matmul(Gemm::nn(m, nn, k).transposed(at, bt), a, b, c)
            })
        });
    }
}

fn attention(c: &mut Criterion) {
    let be = CpuBackend::new();
    let mut g = group(c, "cpu_attention", LONG_OPS);
    // d 256 = 2 heads of 128 (and d 512 = 4 heads), batch 2 x 512, causal.
    for heads in [2usize, 4] {
        let s = AttnShape::causal(2, 512, heads, heads, 128);
        let (q, k, v) = (
            filled(&be, s.q_len(), 3),
            filled(&be, s.kv_len(), 4),
            filled(&be, s.kv_len(), 5),
        );
        let dout = filled(&be, s.q_len(), 6);
        let (mut out, mut lse) = (be.alloc(s.q_len()), be.alloc(s.lse_len()));
        let (mut dq, mut dk, mut dv) = (be.alloc(s.q_len()), be.alloc(s.kv_len()), be.alloc(s.kv_len()));
        let pairs = (s.batch * s.n_head * s.head_dim * s.tq * (s.tq + 1) / 2) as u64;
        g.throughput(Throughput::Elements(4 * pairs));
        g.bench_function(BenchmarkId::new("forward", format!("{heads}x128 B2 T512")), |bench| {
            bench.iter(|| {
                be.attention_forward(
                    s,
                    View::all(&q),
                    View::all(&k),
                    View::all(&v),
                    ViewMut::all(&mut out),
                    ViewMut::all(&mut lse),
                )
            })
        });
        g.throughput(Throughput::Elements(10 * pairs));
        g.bench_function(BenchmarkId::new("backward", format!("{heads}x128 B2 T512")), |bench| {
            bench.iter(|| {
                be.attention_backward(
                    s,
                    View::all(&q),
                    View::all(&k),
                    View::all(&v),
                    View::all(&out),
                    View::all(&lse),
                    View::all(&dout),
                    ViewMut::all(&mut dq),
                    ViewMut::all(&mut dk),
                    ViewMut::all(&mut dv),
                )
            })
        });
    }
    g.finish();
}

fn rmsnorm(c: &mut Criterion) {
    let be = CpuBackend::new();
    let mut g = group(c, "cpu_rmsnorm", SHORT_OPS);
    for d in [256usize, 512] {
        let x = filled(&be, TOKENS * d, 7);
        let dy = filled(&be, TOKENS * d, 8);
        let (mut y, mut rstd, mut dx) = (be.alloc(TOKENS * d), be.alloc(TOKENS), be.alloc(TOKENS * d));
        g.throughput(Throughput::Elements(TOKENS as u64));
        g.bench_function(BenchmarkId::new("forward", format!("{TOKENS}x{d}")), |bench| {
            bench.iter(|| {
                be.rmsnorm_forward(
                    View::all(&x),
                    TOKENS,
                    d,
                    RMSNORM_EPS,
                    ViewMut::all(&mut y),
                    ViewMut::all(&mut rstd),
                )
            })
        });
        g.bench_function(BenchmarkId::new("backward", format!("{TOKENS}x{d}")), |bench| {
            bench.iter(|| {
                be.rmsnorm_backward(
                    View::all(&y),
                    View::all(&rstd),
                    View::all(&dy),
                    TOKENS,
                    d,
                    ViewMut::all(&mut dx),
                    true,
                )
            })
        });
    }
    g.finish();
}

/// The loss over a chunk's `rows x vocab` logits as the model runs it: softcap, cross-entropy, and the
/// gradient in place of the logits (scale 1).
fn softcap_ce(be: &CpuBackend, logits: &mut CpuBuf, losses: &mut CpuBuf, targets: &CpuIds, rows: usize, vocab: usize) {
    let (logits, losses) = (ViewMut::all(logits), ViewMut::all(losses));
    be.softcap_cross_entropy(logits, rows, vocab, LOGIT_SOFTCAP, targets, 0, losses, Some(1.0));
}

/// One chunk of the chunked loss as the model runs it: logits = x W^T, softcap + CE (+ grad), dX = dL W,
/// dW += dL^T x. Rows per chunk as the model picks them for vocab 65536 (`LossChunks`: 1024).
fn loss_chunk(c: &mut Criterion) {
    let be = CpuBackend::new();
    let mut g = group(c, "cpu_loss_chunk", LONG_OPS);
    let (vocab, d) = (65536usize, 256usize);
    let rows = nc_core::model::loss_chunk_rows(vocab, TOKENS);
    let x = filled(&be, rows * d, 9);
    let w = filled(&be, vocab * d, 10);
    let targets = CpuIds((0..rows as i32).map(|r| (r * 7919) % vocab as i32).collect());
    let (mut logits, mut losses) = (be.alloc(rows * vocab), be.alloc(rows));
    let (mut dx, mut dw) = (be.alloc(rows * d), be.alloc(vocab * d));
    g.throughput(Throughput::Elements(rows as u64));
    g.bench_function(
        BenchmarkId::new("softcap+CE fwd+bwd only", format!("{rows}x{vocab}")),
        |bench| bench.iter(|| softcap_ce(&be, &mut logits, &mut losses, &targets, rows, vocab)),
    );
    g.bench_function(
        BenchmarkId::new("lm_head chunk: 3 GEMMs + softcap+CE", format!("{rows}x{vocab}x{d}")),
        |bench| {
            bench.iter(|| {
                be.matmul(
                    Gemm::nt(rows, vocab, d),
                    View::all(&x),
                    View::all(&w),
                    ViewMut::all(&mut logits),
                );
                softcap_ce(&be, &mut logits, &mut losses, &targets, rows, vocab);
                be.matmul(
                    Gemm::nn(rows, d, vocab),
                    View::all(&logits),
                    View::all(&w),
                    ViewMut::all(&mut dx),
                );
                let dw_shape = Gemm::tn(vocab, d, rows).accumulating(true);
                be.matmul(dw_shape, View::all(&logits), View::all(&x), ViewMut::all(&mut dw));
            })
        },
    );
    g.finish();
}

criterion_group!(benches, matmuls, attention, rmsnorm, loss_chunk);
criterion_main!(benches);
