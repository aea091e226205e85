//! The bf16 tensor-core flash attention kernels on a GPU (through `CudaBackend::flash_attention_*_bf16`)
//! against the CPU backend's f32 attention of the same bf16-rounded inputs: forward (training and KV-cache
//! decoding shapes) and backward, GQA, head_dim 64 and 128, T not a multiple of any tile.
//!
//! Tolerance: the kernels round P (forward, dv) or dS (dq, dk) and every output to bf16 (unit roundoff
//! u = 2^-8); those errors are independent across the terms of each sum, so the relative error of a whole
//! tensor, ||got - want|| / ||want||, sits near u / 2 (kernels-ptx/emu/test_flash.cpp bounds them element by
//! element in emulation). 2e-2 here leaves room for the f32 reference's own error and fails on any wrong
//! index, mask or rescale (those give O(1)). lse is f32 throughout: 1e-4 absolute. With a single key, dq and
//! dk are exactly 0 and both sides rounding noise: each value is held to the noise bound instead
//! (`single_key_noise_bound`).
//!
//! Without a CUDA device it runs on the simulated GPU in a child process (tests/src/sim.rs), or is skipped where
//! that cannot be built (set NC_REQUIRE_CUDA=1 to make that a failure, as scripts/gpu_check.sh does). Not yet run on a GPU: unverified.

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use nc_core::backend::cpu::CpuBackend;
use nc_core::backend::cuda::{CudaBackend, FlashBackwardPtrs, FlashForwardPtrs};
use nc_core::backend::{AttnShape, Backend, View, ViewMut};
use nc_core::model::Rng;
use nc_tests::max_abs_diff;
use std::sync::Arc;

fn gpu() -> Option<(CudaBackend, Arc<CudaStream>)> {
    let be = nc_tests::cuda_backend_or_simulated("cuda_flash")?;
    let ctx = CudaContext::new(0).expect("CUDA context");
    Some((be, ctx.default_stream()))
}

fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}
fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Random values already representable in bf16, and their bits.
fn bf16_randn(rng: &mut Rng, n: usize, std: f64) -> (Vec<f32>, Vec<u16>) {
    let bits: Vec<u16> = (0..n).map(|_| to_bf16((rng.normal() * std) as f32)).collect();
    (bits.iter().map(|&b| from_bf16(b)).collect(), bits)
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

fn cpu_vec(cpu: &CpuBackend, data: &[f32]) -> <CpuBackend as Backend>::Buf {
    let mut b = cpu.alloc(data.len());
    cpu.upload(ViewMut::all(&mut b), data);
    b
}
fn cpu_read(cpu: &CpuBackend, b: &<CpuBackend as Backend>::Buf) -> Vec<f32> {
    let mut out = vec![0.0; CpuBackend::buf_len(b)];
    cpu.download(View::all(b), &mut out);
    out
}

struct Dev {
    stream: Arc<CudaStream>,
    bufs: Vec<CudaSlice<u16>>,
    f32s: Vec<CudaSlice<f32>>,
}
impl Dev {
    fn bf16(&mut self, bits: &[u16]) -> u64 {
        let b = self.stream.clone_htod(bits).expect("upload");
        let p = b.device_ptr(&self.stream).0;
        self.bufs.push(b);
        p
    }
    fn f32(&mut self, n: usize) -> u64 {
        let b = self.stream.alloc_zeros::<f32>(n).expect("alloc");
        let p = b.device_ptr(&self.stream).0;
        self.f32s.push(b);
        p
    }
    fn read_bf16(&self, i: usize) -> Vec<f32> {
        self.stream.synchronize().unwrap();
        self.stream
            .clone_dtoh(&self.bufs[i])
            .expect("download")
            .iter()
            .map(|&b| from_bf16(b))
            .collect()
    }
    fn read_f32(&self, i: usize) -> Vec<f32> {
        self.stream.synchronize().unwrap();
        self.stream.clone_dtoh(&self.f32s[i]).expect("download")
    }
}

fn check(s: AttnShape, be: &CudaBackend, stream: &Arc<CudaStream>, rng: &mut Rng) {
    let cpu = CpuBackend::new();
    let (q, qb) = bf16_randn(rng, s.q_len(), 2.0);
    let (k, kb) = bf16_randn(rng, s.kv_len(), 1.0);
    let (v, vb) = bf16_randn(rng, s.kv_len(), 1.0);
    let (cq, ck, cv) = (cpu_vec(&cpu, &q), cpu_vec(&cpu, &k), cpu_vec(&cpu, &v));
    let (mut cout, mut clse) = (cpu.alloc(s.q_len()), cpu.alloc(s.lse_len()));
    cpu.attention_forward(
        s,
        View::all(&cq),
        View::all(&ck),
        View::all(&cv),
        ViewMut::all(&mut cout),
        ViewMut::all(&mut clse),
    );

    let mut d = Dev {
        stream: stream.clone(),
        bufs: vec![],
        f32s: vec![],
    };
    let nan = vec![to_bf16(f32::NAN); s.q_len()];
    let p = FlashForwardPtrs {
        q: d.bf16(&qb),
        k: d.bf16(&kb),
        v: d.bf16(&vb),
        out: d.bf16(&nan),
        lse: d.f32(s.lse_len()),
    };
    d.stream.synchronize().unwrap();
    // SAFETY: the addresses are live allocations of `d` sized for `s`.
    unsafe { be.flash_attention_forward_bf16(s, p) }.unwrap();
    be.synchronize();
    let out = d.read_bf16(3);
    let lse = d.read_f32(0);
    let e = rel_err(&out, &cpu_read(&cpu, &cout));
    assert!(e < 2e-2, "{s:?}: forward out relative error {e}");
    let lse_want = cpu_read(&cpu, &clse);
    let worst = max_abs_diff(&lse, &lse_want);
    assert!(worst < 1e-4, "{s:?}: lse off by {worst}");
    if s.tq != s.tk || s.q_pos0 != 0 {
        return;
    }

    let (dout, doutb) = bf16_randn(rng, s.q_len(), 1.0);
    let cdout = cpu_vec(&cpu, &dout);
    // The CPU backward takes the GPU's out (bf16-widened) and lse, as a model would feed it.
    let (cgout, cglse) = (cpu_vec(&cpu, &out), cpu_vec(&cpu, &lse));
    let (mut cdq, mut cdk, mut cdv) = (cpu.alloc(s.q_len()), cpu.alloc(s.kv_len()), cpu.alloc(s.kv_len()));
    cpu.attention_backward(
        s,
        View::all(&cq),
        View::all(&ck),
        View::all(&cv),
        View::all(&cgout),
        View::all(&cglse),
        View::all(&cdout),
        ViewMut::all(&mut cdq),
        ViewMut::all(&mut cdk),
        ViewMut::all(&mut cdv),
    );
    let nan_kv = vec![to_bf16(f32::NAN); s.kv_len()];
    let pb = FlashBackwardPtrs {
        q: p.q,
        k: p.k,
        v: p.v,
        out: p.out,
        lse: p.lse,
        dout: d.bf16(&doutb),
        delta: d.f32(s.lse_len()),
        dq: d.bf16(&nan),
        dk: d.bf16(&nan_kv),
        dv: d.bf16(&nan_kv),
    };
    d.stream.synchronize().unwrap();
    // SAFETY: as above.
    unsafe { be.flash_attention_backward_bf16(s, pb) }.unwrap();
    be.synchronize();
    for (i, what, want) in [(5, "dq", &cdq), (6, "dk", &cdk), (7, "dv", &cdv)] {
        let (got, want) = (d.read_bf16(i), cpu_read(&cpu, want));
        if s.tk == 1 && what != "dv" {
            let bound = single_key_noise_bound(&s, what, &q, &k, &v, &dout);
            for (j, ((&a, &b), &bound)) in got.iter().zip(&want).zip(&bound).enumerate() {
                let off = (a as f64 - b as f64).abs();
                assert!(
                    off <= bound,
                    "{s:?}: {what}[{j}] {a} vs {b}, beyond the noise bound {bound:e}"
                );
            }
            continue;
        }
        let e = rel_err(&got, &want);
        assert!(e < 2e-2, "{s:?}: {what} relative error {e}");
    }
}

/// With one key (tk = 1), P = 1 and out = v exactly, so dS = dout.v - dout.out is exactly 0, and dq and dk
/// are the rounding noise of two length-d f32 dot products (dP on the tensor cores or in the CPU's GEMM, delta
/// summed apart), each within d u sum|dout v| of the true value (u = 2^-24, any summation order) on either
/// side; the device's bf16 rounding of dS and of the output adds 2^-8 of that each. A relative error compares
/// noise with noise here (it read 1.0 on the simulated GPU), so each value of dq (or dk) is held to the bound
/// of the difference of the two sides: 2 (2 d u sum|dout v|) (1 + 2^-8)^2 scale |k| (or, summed over the
/// group's heads, |q|). A delta taken from anything but exactly out.dout (one ulp of one element of out) fails.
fn single_key_noise_bound(s: &AttnShape, what: &str, q: &[f32], k: &[f32], v: &[f32], dout: &[f32]) -> Vec<f64> {
    let d = s.head_dim;
    let (u, scale) = (1.0 / (1u64 << 24) as f64, 1.0 / (d as f64).sqrt());
    let group = s.n_head / s.n_kv_head;
    let mut bound = vec![0.0; if what == "dq" { s.q_len() } else { s.kv_len() }];
    for b in 0..s.batch {
        for h in 0..s.n_head {
            let (qrow, krow) = ((b * s.n_head + h) * d, (b * s.n_kv_head + h / group) * d);
            let dot_abs: f64 = (0..d).map(|c| (dout[qrow + c] as f64 * v[krow + c] as f64).abs()).sum();
            let ds = 2.0 * (2.0 * d as f64 * u * dot_abs) * (1.0 + 1.0 / 256.0f64).powi(2);
            for c in 0..d {
                match what {
                    "dq" => bound[qrow + c] = ds * scale * (k[krow + c] as f64).abs(),
                    _ => bound[krow + c] += ds * scale * (q[qrow + c] as f64).abs(),
                }
            }
        }
    }
    bound
}

#[test]
fn flash_attention_matches_the_cpu_backend() {
    let Some((be, stream)) = gpu() else { return };
    let mut rng = Rng::new(11);
    let decode = |tq, tk, h, hkv, d| AttnShape {
        tq,
        tk,
        q_pos0: tk - tq,
        ..AttnShape::causal(2, tq, h, hkv, d)
    };
    for s in [
        AttnShape::causal(2, 200, 4, 2, 128), // GQA 2:1, T not a multiple of 64 or 32
        AttnShape::causal(1, 333, 6, 2, 64),  // GQA 3:1, head_dim 64
        AttnShape::causal(3, 64, 2, 2, 128),  // exactly one tile
        AttnShape::causal(1, 1, 2, 1, 128),   // one position
        decode(1, 300, 4, 2, 128),            // decoding one token after 299
        decode(7, 150, 2, 2, 64),             // a decode chunk
    ] {
        check(s, &be, &stream, &mut rng);
    }
}
