//! The CUDA backend's bf16 optimizer ops (core/src/backend/cuda/optim_bf16.rs) against their CPU twin.
//!
//! Without a GPU every test runs on the simulated GPU in a child process (tests/src/sim.rs), or where that cannot
//! be built prints "no CUDA device: ... not run" and passes (NC_REQUIRE_CUDA=1 makes that a failure, as the GPU
//! check runs it). Tolerances, from where the two may round differently:
//! - `muon_apply` and `adamw_multi`: bit for bit (the kernels round every f32 operation explicitly, as the
//!   CPU does; the bf16 stores are round-to-nearest-even on both);
//! - one Newton-Schulz iteration (`steps: 1`): the norm's f64 sum in another order (at most 2 n 2^-53
//!   relative, which moves the f32 norm by at most one ulp in the rare case it lands near a rounding
//!   boundary) and cuBLASLt's f32 accumulation order instead of the twin's. Either can put an element on the
//!   other side of a bf16 rounding boundary: off by one bf16 ulp, rarely (see tests/tests/ns_bf16.rs). At
//!   most 2 ulps (the flip of A or B carried into X') and 2% of the elements;
//! - five iterations: those flips carried along, 2% relative in Frobenius norm (the twin is 1.4% from the
//!   unrounded f64 result; two legitimate bf16 evaluations differ by less than that).

use nc_core::backend::bf16::round_bf16;
use nc_core::backend::cpu::CpuBackend;
use nc_core::backend::cuda::CudaBackend;
use nc_core::backend::{AdamwPiece, Backend, NsBatch, Storage, View, ViewMut};
use nc_core::model::Rng;
use nc_core::optim::adamw::{adamw_step, AdamParams};
use nc_core::optim::muon::muon_ns_batch;
use nc_tests::{newton_schulz_bf16_on, to_backend, to_host};

fn gpu() -> Option<CudaBackend> {
    nc_tests::cuda_backend_or_simulated("cuda_optim_bf16")
}

fn randn(rng: &mut Rng, len: usize, std: f64) -> Vec<f32> {
    (0..len).map(|_| (rng.normal() * std) as f32).collect()
}

#[test]
fn newton_schulz_bf16_matches_the_twin() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(41);
    for (batch, rows, cols) in [(3, 64, 96), (3, 96, 64), (2, 128, 128), (1, 256, 1024)] {
        let n = rows * cols;
        let grad = randn(&mut rng, batch * n, 0.02);
        for steps in [1, 5] {
            let ns = NsBatch {
                steps,
                ..muon_ns_batch(batch, rows, cols)
            };
            let got = newton_schulz_bf16_on(&g, &ns, &grad);
            let want = newton_schulz_bf16_on(&cpu, &ns, &grad);
            assert!(got.iter().all(|&v| v == round_bf16(v)), "the device's X is not bf16");
            for b in 0..batch {
                let (gm, wm) = (&got[b * n..(b + 1) * n], &want[b * n..(b + 1) * n]);
                if steps == 1 {
                    let mut off = 0;
                    for (i, (&x, &w)) in gm.iter().zip(wm).enumerate() {
                        if x != w {
                            off += 1;
                            let ulp = 2f64.powi(x.abs().max(w.abs()).log2().floor() as i32 - 7);
                            assert!(
                                (x as f64 - w as f64).abs() <= 2.0 * ulp,
                                "{batch}x{rows}x{cols} matrix {b} [{i}]: {x} vs twin {w}"
                            );
                        }
                    }
                    assert!(off * 50 <= n, "{batch}x{rows}x{cols} matrix {b}: {off} of {n} differ");
                } else {
                    let diff: f64 = gm.iter().zip(wm).map(|(&x, &w)| (x as f64 - w as f64).powi(2)).sum();
                    let size: f64 = wm.iter().map(|&w| (w as f64).powi(2)).sum();
                    let rel = (diff / size).sqrt();
                    eprintln!("{batch}x{rows}x{cols} matrix {b}: device vs twin {rel:.5}");
                    assert!(
                        rel <= 0.02,
                        "{batch}x{rows}x{cols} matrix {b}: {rel} relative to the twin"
                    );
                }
            }
        }
    }
}

#[test]
fn muon_apply_and_adamw_multi_match_the_cpu_to_the_bit() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(43);
    // muon_apply: p = a x + p and the working copy, at an offset inside larger buffers
    let n = 3000;
    let x: Vec<f32> = randn(&mut rng, n, 0.05).iter().map(|&v| round_bf16(v)).collect();
    let p0 = randn(&mut rng, n + 17, 0.1);
    fn apply<B: Backend>(be: &B, x: &[f32], p0: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let n = x.len();
        let mut xb = be.alloc_as(n, Storage::Bf16);
        be.upload(ViewMut::all(&mut xb), x);
        let mut p = to_backend(be, p0);
        let mut w = be.alloc_as(n + 17, Storage::Bf16);
        be.muon_apply(
            View::all(&xb),
            -0.0123,
            ViewMut::at(&mut p, 17, n),
            Some(ViewMut::at(&mut w, 17, n)),
        );
        (to_host(be, &p), to_host(be, &w))
    }
    let (want, got) = (apply(&cpu, &x, &p0), apply(&g, &x, &p0));
    assert!(
        want.0.iter().zip(&got.0).all(|(a, b)| a.to_bits() == b.to_bits()),
        "muon_apply: master differs"
    );
    assert!(
        want.1.iter().zip(&got.1).all(|(a, b)| a.to_bits() == b.to_bits()),
        "muon_apply: working copy differs"
    );

    // adamw_multi over three pieces (lengths not multiples of 4, so the scalar tail runs too)
    let total = 5000;
    let pieces = [(0usize, 1203usize, 0.01f32), (1203, 2001, 0.003), (3204, 1795, 0.02)];
    let h = AdamParams::default();
    let p0 = randn(&mut rng, total, 0.1);
    let grads: Vec<Vec<f32>> = (0..2).map(|_| randn(&mut rng, total, 0.01)).collect();
    let table: Vec<Vec<AdamwPiece>> = (1..=2u64)
        .map(|t| {
            pieces
                .iter()
                .map(|&(off, len, lr)| AdamwPiece {
                    p_off: off,
                    m_off: off,
                    working_off: off,
                    len,
                    step: adamw_step(lr, t, &h),
                })
                .collect()
        })
        .collect();
    fn adam<B: Backend>(be: &B, p0: &[f32], grads: &[Vec<f32>], table: &[Vec<AdamwPiece>]) -> [Vec<f32>; 4] {
        let total = p0.len();
        let mut p = to_backend(be, p0);
        let (mut m, mut v) = (be.alloc(total), be.alloc(total));
        let mut w = be.alloc_as(total, Storage::Bf16);
        for (g, step) in grads.iter().zip(table) {
            let gb = to_backend(be, g);
            be.adamw_multi(&mut p, &gb, &mut m, &mut v, Some(&mut w), step);
        }
        [to_host(be, &p), to_host(be, &m), to_host(be, &v), to_host(be, &w)]
    }
    let want = adam(&cpu, &p0, &grads, &table);
    let got = adam(&g, &p0, &grads, &table);
    for (what, (a, b)) in ["master", "m", "v", "working copy"].iter().zip(want.iter().zip(&got)) {
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "adamw_multi: {what} differs"
        );
    }
}
