//! Muon's batched bf16 Newton-Schulz (`Backend::newton_schulz_bf16`, issue 10 item 5) against its GEMMs alone.
//!
//! GPU: for each same-shape batch of a d20 model's Muon matrices (n_embd 1280: 80 square 1280 x 1280 attention
//! matrices, 20 c_fc 5120 x 1280, 20 mlp c_proj 1280 x 5120), the whole call (norms on the device, then the
//! 15 strided-batched cuBLASLt GEMMs) and the same iterations alone (`CudaBackend::newton_schulz_gemms_bf16`).
//! The goal: the whole call within 1.3x of its GEMMs alone. Timed as the mean over `--iters` runs of
//! host wall time around the launches and a stream synchronize; the table gives ms and the ratio.
//! CPU: the host twin (backend/ns_bf16.rs) on a small model's shapes, against the f32 host Newton-Schulz
//! (optim/muon.rs) on the same matrices one by one: what the twin costs the CPU `--precision bf16` checks.
//!
//! Run:   cargo bench -p nc-benches --bench ns_bf16                 (add `-- --iters N`, default 20)
//! Without a CUDA device the GPU part prints one line saying why (and the bench exits 1 under
//! NC_REQUIRE_CUDA=1, as the GPU check runs it); the CPU part runs anyway. The GPU part has not run on a GPU
//! yet: unverified.

use nc_core::backend::cpu::{CpuBackend, CpuBuf};
use nc_core::backend::cuda::{device_count, CudaBackend};
use nc_core::backend::{Backend, NsBatch, View, ViewMut};
use nc_core::optim::muon::{muon_ns_batch as ns, newton_schulz5, NsWorkspace};
use nc_core::optim::ns_bf16_buffers::NsBf16Buffers;
use std::time::Instant;

/// Values spread over [-1, 1) (the speed does not depend on them).
fn data(n: usize) -> Vec<f32> {
    nc_benches::lcg_values(n, 0x9e37_79b9_7f4a_7c15)
}

/// Mean seconds of `iters` runs of `f` after one warm-up, `sync` called after the warm-up and after the runs.
fn time(iters: usize, sync: &dyn Fn(), mut f: impl FnMut()) -> f64 {
    f();
    sync();
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    sync();
    t0.elapsed().as_secs_f64() / iters as f64
}

/// The whole batched call's input (the momentum updates, f32) and buffers on a backend.
struct Buffers<B: Backend> {
    g: B::Buf,
    ns: NsBf16Buffers<B>,
}

impl<B: Backend> Buffers<B> {
    fn new(be: &B, s: &NsBatch) -> Self {
        let n = s.batch * s.numel();
        let mut g = be.alloc(n);
        be.upload(ViewMut::all(&mut g), &data(n));
        Buffers {
            g,
            ns: NsBf16Buffers::for_call(be, s),
        }
    }

    fn run(&mut self, be: &B, s: &NsBatch) {
        self.ns.run(be, s, View::all(&self.g));
    }
}

fn gpu(iters: usize) {
    let skip = |why: String| {
        println!("ns_bf16 (GPU): skipped: {why}");
        if std::env::var_os("NC_REQUIRE_CUDA").is_some() {
            std::process::exit(1);
        }
    };
    if device_count() == 0 {
        return skip("no CUDA device found (no driver, or none visible)".into());
    }
    let be = match CudaBackend::new(0) {
        Ok(be) => be,
        Err(e) => return skip(format!("the CUDA backend did not start: {e}")),
    };
    println!("\nGPU: {} (mean of {iters} runs)", be.device_name());
    println!("| batch x rows x cols | whole call ms | GEMMs alone ms | ratio (goal <= 1.3) | GEMM TFLOP/s |");
    println!("|---|---|---|---|---|");
    for s in [ns(80, 1280, 1280), ns(20, 5120, 1280), ns(20, 1280, 5120)] {
        let mut b = Buffers::new(&be, &s);
        let sync = || be.synchronize();
        let whole = time(iters, &sync, || b.run(&be, &s));
        let gemms = time(iters, &sync, || {
            be.newton_schulz_gemms_bf16(
                &s,
                ViewMut::all(&mut b.ns.x),
                ViewMut::all(&mut b.ns.x_tmp),
                ViewMut::all(&mut b.ns.gram),
                ViewMut::all(&mut b.ns.poly),
            )
        });
        // per iteration: A (short^2 long), A A (short^3), B X (short^2 long), 2 flops a multiply-add
        let (short, long) = (s.short() as f64, s.rows.max(s.cols) as f64);
        let flops = s.batch as f64 * s.steps as f64 * 2.0 * (2.0 * short * short * long + short.powi(3));
        println!(
            "| {} x {} x {} | {:.3} | {:.3} | {:.2} | {:.1} |",
            s.batch,
            s.rows,
            s.cols,
            whole * 1e3,
            gemms * 1e3,
            whole / gemms,
            flops / gemms / 1e12
        );
    }
}

fn cpu(iters: usize) {
    let be = CpuBackend::new();
    println!("\nCPU: host twin vs the f32 host Newton-Schulz, matrix by matrix (mean of {iters} runs)");
    println!("| batch x rows x cols | bf16 twin batched ms | f32 host one by one ms |");
    println!("|---|---|---|");
    for s in [ns(8, 256, 256), ns(2, 1024, 256), ns(2, 256, 1024)] {
        let mut b = Buffers::new(&be, &s);
        let twin = time(iters, &|| {}, || b.run(&be, &s));
        let g = CpuBackend::host(&b.g).to_vec();
        let mut ws = NsWorkspace::for_shapes([(s.rows, s.cols)].into_iter());
        let mut work = CpuBuf::f32(g.clone());
        let host = time(iters, &|| {}, || {
            work.0.copy_from_slice(&g);
            for m in work.0.chunks_exact_mut(s.numel()) {
                newton_schulz5(m, s.rows, s.cols, &mut ws);
            }
        });
        println!(
            "| {} x {} x {} | {:.2} | {:.2} |",
            s.batch,
            s.rows,
            s.cols,
            twin * 1e3,
            host * 1e3
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters = match args.iter().position(|a| a == "--iters") {
        Some(i) => match args.get(i + 1).and_then(|v| v.parse::<usize>().ok()) {
            Some(n) if n > 0 => n,
            _ => {
                eprintln!("--iters needs a positive integer");
                std::process::exit(2);
            }
        },
        None => 20,
    };
    cpu(iters.min(5));
    gpu(iters);
}
