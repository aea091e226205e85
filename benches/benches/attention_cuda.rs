//! Flash attention on tensor cores (kernels-ptx/cuda/flash_attention.cu, bf16 in and out, f32 softmax and
//! accumulation) through the CUDA backend's launch helper: forward and backward TFLOP/s at the training shapes
//! of d20 (B 32, H 10, T 2048, D 128: nanochat's d20 device batch) and d52 (B 8, H 26, T 2048, D 128), causal.
//! Criterion times each launch sequence (host wall time around the launches and a stream synchronize); the
//! table printed after it gives TFLOP/s from the mean of `--iters` timed runs.
//!
//! FLOPs counted (the convention of the FlashAttention papers, so figures compare with theirs and with
//! benches/attention_sdpa.py): forward 4 B H T^2 D (two T x T x D products), halved by the causal mask;
//! backward 2.5 times the forward (five products: S recomputed, dP, dV, dK, dQ). The kernels recompute S and
//! dP in both backward launches (dq and dk/dv), 7 products in all, so the extra work shows as a lower figure.
//!
//! Run:   cargo bench -p nc-benches --bench attention_cuda            (add `-- --iters N`, default 20; other
//!        arguments are ignored: criterion runs with this file's settings)
//! Without a CUDA device it prints one line saying why and exits 0 (1 under NC_REQUIRE_CUDA=1, as the GPU
//! check runs it). Nothing of this has run on a GPU yet: unverified.

use criterion::Criterion;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use nc_core::backend::cuda::{device_count, CudaBackend, FlashBackwardPtrs, FlashForwardPtrs};
use nc_core::backend::{AttnShape, Backend};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn skip(why: &str) -> ! {
    println!("attention_cuda: skipped: {why}");
    std::process::exit(if std::env::var_os("NC_REQUIRE_CUDA").is_some() {
        1
    } else {
        0
    })
}

/// Forward FLOPs of causal attention: 4 B H T^2 D / 2.
fn forward_flops(s: &AttnShape) -> f64 {
    2.0 * (s.batch * s.n_head) as f64 * (s.tq * s.tk) as f64 * s.head_dim as f64
}

/// Backward FLOPs: 2.5 times the forward.
fn backward_flops(s: &AttnShape) -> f64 {
    2.5 * forward_flops(s)
}

/// Device buffers of one shape: bf16 as u16 bits, f32 for lse and delta.
struct Tensors {
    _bf16: Vec<CudaSlice<u16>>,
    _f32: Vec<CudaSlice<f32>>,
    forward: FlashForwardPtrs,
    backward: FlashBackwardPtrs,
}

/// bf16 bits of values spread over [-2, 2) (the speed does not depend on the values, only on their being finite
/// and the softmax not degenerate).
fn bf16_data(n: usize) -> Vec<u16> {
    let values = nc_benches::lcg_values(n, 0x2545_f491_4f6c_dd1d);
    let to_bf16 = |x: f32| {
        let bits = (2.0 * x).to_bits();
        ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16 // round to nearest even
    };
    values.into_iter().map(to_bf16).collect()
}

fn alloc(stream: &Arc<CudaStream>, s: &AttnShape) -> Result<Tensors, cudarc::driver::DriverError> {
    let (nq, nkv, nl) = (s.q_len(), s.kv_len(), s.lse_len());
    let data = bf16_data(nq.max(nkv));
    let mut bf = Vec::new();
    for len in [nq, nkv, nkv, nq, nq, nq, nkv, nkv] {
        // q, k, v, out, dout, dq, dk, dv
        bf.push(stream.clone_htod(&data[..len])?);
    }
    let f = vec![stream.alloc_zeros::<f32>(nl)?, stream.alloc_zeros::<f32>(nl)?]; // lse, delta
    stream.synchronize()?;
    let a: Vec<u64> = bf.iter().map(|b| b.device_ptr(stream).0).collect();
    let (lse, delta) = (f[0].device_ptr(stream).0, f[1].device_ptr(stream).0);
    Ok(Tensors {
        forward: FlashForwardPtrs {
            q: a[0],
            k: a[1],
            v: a[2],
            out: a[3],
            lse,
        },
        backward: FlashBackwardPtrs {
            q: a[0],
            k: a[1],
            v: a[2],
            out: a[3],
            lse,
            dout: a[4],
            delta,
            dq: a[5],
            dk: a[6],
            dv: a[7],
        },
        _bf16: bf,
        _f32: f,
    })
}

fn forward(be: &CudaBackend, s: AttnShape, t: &Tensors) {
    // SAFETY: every address is a live allocation of `t` sized for `s` (alloc above).
    unsafe { be.flash_attention_forward_bf16(s, t.forward) }.unwrap_or_else(|e| panic!("{e}"));
}

fn backward(be: &CudaBackend, s: AttnShape, t: &Tensors) {
    // SAFETY: as in `forward`.
    unsafe { be.flash_attention_backward_bf16(s, t.backward) }.unwrap_or_else(|e| panic!("{e}"));
}

fn time(be: &CudaBackend, iters: u64, f: impl Fn()) -> Duration {
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    be.synchronize();
    t0.elapsed()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters: u64 = match args.iter().position(|a| a == "--iters") {
        Some(i) => match args.get(i + 1).and_then(|v| v.parse().ok()) {
            Some(n) if n > 0 => n,
            _ => {
                eprintln!("--iters needs a positive integer");
                std::process::exit(2);
            }
        },
        None => 20,
    };
    if device_count() == 0 {
        skip("no CUDA device found (no driver, or none visible)");
    }
    let be = CudaBackend::new(0).unwrap_or_else(|e| skip(&format!("the CUDA backend did not start: {e}")));
    let ctx = CudaContext::new(0).unwrap_or_else(|e| skip(&format!("no CUDA context: {e}")));
    let stream = ctx.default_stream();
    let cases = [
        ("d20", AttnShape::causal(32, 2048, 10, 10, 128)),
        ("d52", AttnShape::causal(8, 2048, 26, 26, 128)),
    ];
    let mut criterion = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(3));
    let mut table = Vec::new();
    for (name, s) in cases {
        let t = alloc(&stream, &s).unwrap_or_else(|e| panic!("allocating the {name} tensors: {e}"));
        forward(&be, s, &t); // warm up (JIT of the PTX happens at backend start)
        backward(&be, s, &t);
        be.synchronize();
        criterion.bench_function(&format!("flash fwd {name}"), |b| {
            b.iter_custom(|n| time(&be, n, || forward(&be, s, &t)))
        });
        criterion.bench_function(&format!("flash bwd {name}"), |b| {
            b.iter_custom(|n| time(&be, n, || backward(&be, s, &t)))
        });
        let fwd = time(&be, iters, || forward(&be, s, &t)).as_secs_f64() / iters as f64;
        let bwd = time(&be, iters, || backward(&be, s, &t)).as_secs_f64() / iters as f64;
        table.push((name, s, fwd, bwd));
    }
    criterion.final_summary();
    println!(
        "\nflash attention, bf16, causal, on {} (mean of {iters} runs)",
        be.device_name()
    );
    println!("| shape | B x H x T x D | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s |");
    println!("|---|---|---|---|---|---|");
    for (name, s, fwd, bwd) in table {
        println!(
            "| {name} | {} x {} x {} x {} | {:.3} | {:.1} | {:.3} | {:.1} |",
            s.batch,
            s.n_head,
            s.tq,
            s.head_dim,
            fwd * 1e3,
            forward_flops(&s) / fwd / 1e12,
            bwd * 1e3,
            backward_flops(&s) / bwd / 1e12
        );
    }
}
