//! The CUDA backend against the CPU backend (the reference): every op of the `Backend` trait on random
//! inputs with fixed seeds, then a whole model's loss and every parameter gradient, under each recompute
//! policy.
//!
//! Without a GPU (no libcuda, or no visible device) every CUDA test re-runs itself on the simulated GPU in a
//! child process (`nc_tests::cuda_backend_or_simulated`, tests/src/sim.rs) and passes only if it passed there;
//! where the simulator cannot be built (no g++) it prints "no CUDA device: ... not run" and passes. Set
//! NC_REQUIRE_CUDA=1 on a GPU machine to make a missing device a failure instead. A visible device whose
//! backend fails to start (no cuBLAS, PTX the driver cannot load) always fails. Two tests run everywhere:
//! the same test bodies with the device-like CPU backend (the harness runs clean), and with a backend that
//! rounds the way a GPU may (the tolerances admit legitimate differences).
//!
//! Tolerances are per element and derived from how the two implementations may round differently
//! (u = 2^-24, the unit roundoff of f32), so a kernel that reads a wrong index or misses a term fails:
//! - copies, fill, embedding lookup, relu^2, residual add, rows hit once by the embedding scatter-add: the
//!   same IEEE operations in the same order on both, so bit for bit;
//! - a scatter-add row hit r times: atomics add in any order; each order errs by at most r u sum|terms|,
//!   so two differ by at most 2 r u of it (2.5 r u allowed);
//! - rotary: the GPU may fuse x1 c + x2 s into an FMA, |error| <= 4u (|x1| + |x2|);
//! - softcap: the CPU's branch-free tanh (3e-7 relative) against CUDA's tanhf (2 ulp) and the roundings
//!   around them, 1.5e-6 relative;
//! - matmul: different blocking and FMA use, |error| <= 1e-6 sqrt(k) sum_p |a_ip b_pj| (17 u sqrt(k) of the
//!   products' magnitude; the two sides' typical difference is under u sqrt(k) of it);
//! - rmsnorm: sums in a different order, 1e-6 sqrt(dim) relative to the terms' magnitude;
//! - softcap cross-entropy: the capped logits differ by up to 8e-7 |z| (the two tanh), which moves a loss
//!   by at most 2 max|dz| <= 2.4e-5 nats at cap 15 (5e-5 allowed), and a probability by as much relative
//!   (5e-5 allowed);
//! - attention: online softmax over tiles of different sizes, 1e-4 of the output's largest magnitude;
//! - the optimizer's axpby, scale, Muon momentum and AdamW: bit for bit (the kernels round every operation
//!   explicitly, `__fmul_rn` and friends, so nothing is fused into an FMA, and divide and sqrt are IEEE);
//! - sum_squares: every term x^2 is exact in f64 and nonnegative, so any order of summing n of them errs by
//!   at most (n - 1) 2^-53 of the sum; the GPU's order (grid-stride lanes, then trees) and the CPU's
//!   (sequential) differ by at most 2 n 2^-53 of it (6.7e-11 relative at n = 300 000);
//! - the model: loss to 1e-5 relative, every gradient to 1e-4 of its largest magnitude.
//!
//! Views sit at nonzero offsets inside larger buffers, and everything outside a written view must come back
//! bit for bit (an op never writes past its view). Outputs that an op writes (not accumulates) start as NaN
//! on both sides, so reading an output before writing it fails.

use nc_core::backend::cpu::matmul_f64::matmul_f64;
use nc_core::backend::cpu::{CpuBackend, CpuBuf, CpuIds};
use nc_core::backend::cuda::CudaBackend;
use nc_core::backend::device_like::DeviceLikeCpu;
use nc_core::backend::{AdamwStep, AttnShape, Backend, Gemm, Heads, Rotation, Storage, View, ViewMut};
use nc_core::model::init::rotary_table;
use nc_core::model::{Gpt, HostMirror, Recompute, Rng};
use nc_core::ModelConfig;
use std::ops::Range;

/// Unit roundoff of f32.
const U: f64 = 1.0 / (1u64 << 24) as f64;

/// The CUDA backend on device 0, or None where the test returns at once: it ran and passed on the simulated GPU
/// in a child process, or there is no device of any kind (`nc_tests::cuda_backend_or_simulated`).
fn gpu() -> Option<CudaBackend> {
    nc_tests::cuda_backend_or_simulated("cuda_parity")
}

fn randn(rng: &mut Rng, len: usize, std: f64) -> Vec<f32> {
    (0..len).map(|_| (rng.normal() * std) as f32).collect()
}

/// `pre` random guard values, `body`, `post` guard values: a buffer in which a view sits at offset `pre`.
fn guarded(rng: &mut Rng, pre: usize, body: &[f32], post: usize) -> Vec<f32> {
    let mut v = randn(rng, pre, 1.0);
    v.extend_from_slice(body);
    v.extend(randn(rng, post, 1.0));
    v
}

fn max_abs(x: &[f32]) -> f64 {
    x.iter().fold(0.0f64, |m, v| m.max((*v as f64).abs()))
}

/// The same host data on both backends: the CPU reference and the device `D` under test.
struct Pair<D: Backend> {
    cpu: CpuBuf,
    gpu: D::Buf,
}

impl<D: Backend> Pair<D> {
    fn new(g: &D, data: &[f32]) -> Self {
        let mut gpu = g.alloc(data.len());
        g.upload(ViewMut::all(&mut gpu), data);
        Pair {
            cpu: CpuBuf::f32(data.to_vec()),
            gpu,
        }
    }
    fn cv(&self, off: usize, len: usize) -> View<'_, CpuBackend> {
        View::at(&self.cpu, off, len)
    }
    fn gv(&self, off: usize, len: usize) -> View<'_, D> {
        View::at(&self.gpu, off, len)
    }
    fn cm(&mut self, off: usize, len: usize) -> ViewMut<'_, CpuBackend> {
        ViewMut::at(&mut self.cpu, off, len)
    }
    fn gm(&mut self, off: usize, len: usize) -> ViewMut<'_, D> {
        ViewMut::at(&mut self.gpu, off, len)
    }
    fn want(&self) -> &[f32] {
        &self.cpu.0
    }
    fn got(&self, g: &D) -> Vec<f32> {
        let mut v = vec![0.0; self.cpu.0.len()];
        g.download(View::all(&self.gpu), &mut v);
        v
    }
}

fn ids_pair<D: Backend>(g: &D, ids: &[i32]) -> (CpuIds, D::Ids) {
    let mut gpu = g.alloc_ids(ids.len());
    g.upload_ids(&mut gpu, ids);
    (CpuIds(ids.to_vec()), gpu)
}

/// Bit-for-bit outside `range`; inside, |got - want| <= tol(i) for each index i of the whole buffer.
/// NaN matches NaN only where both are NaN (a NaN in one alone fails).
fn check(what: &str, got: &[f32], want: &[f32], range: Range<usize>, tol: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if !range.contains(&i) {
            assert!(
                g.to_bits() == w.to_bits(),
                "{what}: element {i} outside the view [{}, {}) changed: {g} (CPU {w})",
                range.start,
                range.end
            );
        }
    }
    // Report the element furthest past its tolerance (a zero tolerance counts as infinitely far).
    let mut worst: Option<(usize, f64)> = None;
    for i in range.clone() {
        let (g, w) = (got[i], want[i]);
        if g.is_nan() || w.is_nan() {
            assert!(
                g.is_nan() && w.is_nan(),
                "{what}: element {i} is {g} on the GPU, {w} on the CPU"
            );
            continue;
        }
        let (err, t) = ((g as f64 - w as f64).abs(), tol(i));
        if err > t {
            let ratio = if t > 0.0 { err / t } else { f64::INFINITY };
            if worst.is_none_or(|(_, r)| ratio > r) {
                worst = Some((i, ratio));
            }
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i} (view offset {}) is {} on the GPU, {} on the CPU: error {:e} > tolerance {:e}",
            i - range.start,
            got[i],
            want[i],
            (got[i] as f64 - want[i] as f64).abs(),
            tol(i)
        );
    }
}

fn exact(what: &str, got: &[f32], want: &[f32], range: Range<usize>) {
    check(what, got, want, range, |_| 0.0);
}

/// Tolerance relative to the largest magnitude of the expected values in `range`.
fn rel_to_max(want: &[f32], range: Range<usize>, rel: f64) -> f64 {
    let m = max_abs(&want[range]);
    assert!(m > 0.0, "expected values all zero: the comparison would prove nothing");
    rel * m
}

const NAN: f32 = f32::NAN;

#[test]
fn copies_fill_and_empty_buffers() {
    if let Some(g) = gpu() {
        copies_fill_and_empty_buffers_on(&g);
    }
}

fn copies_fill_and_empty_buffers_on<D: Backend>(g: &D) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(1);
    let data = randn(&mut rng, 1000, 1.0);

    // upload / download at an offset: only the view changes.
    let mut p = Pair::new(g, &data);
    let part = randn(&mut rng, 300, 1.0);
    cpu.upload(p.cm(123, 300), &part);
    g.upload(p.gm(123, 300), &part);
    exact("upload", &p.got(g), p.want(), 123..423);
    let mut sub = vec![0.0; 300];
    g.download(p.gv(123, 300), &mut sub);
    assert_eq!(sub, part, "download of a view");

    // fill, with a value other than zero.
    cpu.fill(p.cm(7, 501), -2.5);
    g.fill(p.gm(7, 501), -2.5);
    exact("fill", &p.got(g), p.want(), 7..508);

    // copy between two buffers at different offsets.
    let src = Pair::new(g, &data);
    cpu.copy(src.cv(10, 333), p.cm(600, 333));
    g.copy(src.gv(10, 333), p.gm(600, 333));
    exact("copy", &p.got(g), p.want(), 600..933);

    // ids: upload into the first entries, read back through an op (embedding of a one-column table).
    let (_, mut ids) = ids_pair(g, &[0; 8]);
    g.upload_ids(&mut ids, &[3, 1, 2]);
    let table = Pair::new(g, &[10.0, 11.0, 12.0, 13.0]);
    let mut out = Pair::new(g, &[NAN; 3]);
    g.embedding_forward(&ids, 3, table.gv(0, 4), 1, out.gm(0, 3));
    assert_eq!(out.got(g), vec![13.0, 11.0, 12.0], "upload_ids then embedding_forward");

    // Empty buffers and views (the model allocates some) work and touch nothing.
    let mut empty = g.alloc(0);
    assert_eq!(D::buf_len(&empty), 0);
    g.fill(ViewMut::all(&mut empty), 1.0);
    g.upload(ViewMut::all(&mut empty), &[]);
    g.download(View::all(&empty), &mut []);
    g.fill(p.gm(5, 0), 9.0);
    g.matmul(Gemm::nn(0, 4, 3), p.gv(0, 0), p.gv(0, 12), ViewMut::all(&mut empty));
    exact("empty ops", &p.got(g), p.want(), 0..0);
    let _ = g.alloc_ids(0);
}

#[test]
fn matmul_every_transpose_accumulate_and_offset() {
    if let Some(g) = gpu() {
        matmul_every_transpose_accumulate_and_offset_on(&g);
    }
}

fn matmul_every_transpose_accumulate_and_offset_on<D: Backend>(g: &D) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(2);
    for (m, n, k) in [(37, 29, 65), (1, 50, 300), (64, 96, 128), (130, 3, 1000), (3, 4, 0)] {
        for a_t in [false, true] {
            for b_t in [false, true] {
                for accumulate in [false, true] {
                    let what = format!("matmul {m}x{n}x{k} a_t {a_t} b_t {b_t} accumulate {accumulate}");
                    let (ao, bo, co) = (3, 5, 7);
                    let a_body = randn(&mut rng, m * k, 1.0);
                    let b_body = randn(&mut rng, k * n, 1.0);
                    // A written (not accumulated) C starts as NaN: beta = 0 must not read it.
                    let c_body = if accumulate {
                        randn(&mut rng, m * n, 1.0)
                    } else {
                        vec![NAN; m * n]
                    };
                    let a = Pair::new(g, &guarded(&mut rng, ao, &a_body, 4));
                    let b = Pair::new(g, &guarded(&mut rng, bo, &b_body, 6));
                    let mut c = Pair::new(g, &guarded(&mut rng, co, &c_body, 8));
                    let shape = Gemm::nn(m, n, k).transposed(a_t, b_t).accumulating(accumulate);
                    cpu.matmul(shape, a.cv(ao, m * k), b.cv(bo, k * n), c.cm(co, m * n));
                    g.matmul(shape, a.gv(ao, m * k), b.gv(bo, k * n), c.gm(co, m * n));
                    // Per element of C, sum_p |op(A)_ip op(B)_pj| (plus |C0_ij| when accumulating): the magnitude
                    // the rounding error of the dot product scales with.
                    let mut mag = matmul_f64(m, n, k, &a_body, a_t, &b_body, b_t).magnitude;
                    if accumulate {
                        mag.iter_mut().zip(&c_body).for_each(|(x, c)| *x += (*c as f64).abs());
                    }
                    let scale = 1e-6 * (k.max(1) as f64).sqrt();
                    check(&what, &c.got(g), c.want(), co..co + m * n, |i| scale * mag[i - co]);
                }
            }
        }
    }
}

#[test]
fn embedding_forward_and_scatter_add_with_repeated_ids() {
    if let Some(g) = gpu() {
        embedding_forward_and_scatter_add_with_repeated_ids_on(&g);
    }
}

fn embedding_forward_and_scatter_add_with_repeated_ids_on<D: Backend>(g: &D) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(3);
    let (vocab, d, n) = (50, 70, 300);
    // Ids from a small range so most repeat; the last row of the table too; rows 20..49 never hit.
    let mut ids: Vec<i32> = (0..n).map(|_| (rng.next_u64() % 20) as i32).collect();
    ids[17] = 49;
    ids[250] = 49;
    let (cids, gids) = ids_pair(g, &ids);
    let (wo, oo) = (11, 9);
    let wte_body = randn(&mut rng, vocab * d, 1.0);
    let wte = Pair::new(g, &guarded(&mut rng, wo, &wte_body, 5));

    let mut out = Pair::new(g, &guarded(&mut rng, oo, &vec![NAN; n * d], 3));
    cpu.embedding_forward(&cids, n, wte.cv(wo, vocab * d), d, out.cm(oo, n * d));
    g.embedding_forward(&gids, n, wte.gv(wo, vocab * d), d, out.gm(oo, n * d));
    exact("embedding_forward", &out.got(g), out.want(), oo..oo + n * d);

    // Backward accumulates into a nonzero dwte.
    let dout_body = randn(&mut rng, n * d, 1.0);
    let dout = Pair::new(g, &guarded(&mut rng, oo, &dout_body, 3));
    let mut dwte = Pair::new(g, &guarded(&mut rng, wo, &wte_body, 5));
    cpu.embedding_backward(&cids, n, dout.cv(oo, n * d), d, dwte.cm(wo, vocab * d));
    g.embedding_backward(&gids, n, dout.gv(oo, n * d), d, dwte.gm(wo, vocab * d));
    let mut hits = vec![0usize; vocab];
    let mut sum_abs: Vec<f64> = wte_body.iter().map(|v| (*v as f64).abs()).collect();
    for (i, &id) in ids.iter().enumerate() {
        let id = id as usize;
        hits[id] += 1;
        for c in 0..d {
            sum_abs[id * d + c] += (dout_body[i * d + c] as f64).abs();
        }
    }
    assert!(hits.iter().any(|&h| h > 1), "the ids should repeat");
    check(
        "embedding_backward",
        &dwte.got(g),
        dwte.want(),
        wo..wo + vocab * d,
        |i| {
            let e = i - wo;
            let r = hits[e / d];
            // One addition per element (or none) rounds the same everywhere; more can add in any order.
            if r <= 1 {
                0.0
            } else {
                2.5 * r as f64 * U * sum_abs[e]
            }
        },
    );
}

#[test]
fn rmsnorm_forward_and_backward() {
    if let Some(g) = gpu() {
        rmsnorm_forward_and_backward_on(&g);
    }
}

fn rmsnorm_forward_and_backward_on<D: Backend>(g: &D) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(4);
    let eps = nc_core::config::RMSNORM_EPS;
    for (rows, dim) in [(33, 200), (5, 1024), (64, 16), (1, 7)] {
        let rel = 1e-6 * (dim as f64).sqrt();
        let (xo, yo, ro) = (3, 5, 2);
        let x_body = randn(&mut rng, rows * dim, 2.0);
        let x = Pair::new(g, &guarded(&mut rng, xo, &x_body, 4));
        let mut y = Pair::new(g, &guarded(&mut rng, yo, &vec![NAN; rows * dim], 4));
        let mut rstd = Pair::new(g, &guarded(&mut rng, ro, &vec![NAN; rows], 4));
        cpu.rmsnorm_forward(
            x.cv(xo, rows * dim),
            rows,
            dim,
            eps,
            y.cm(yo, rows * dim),
            rstd.cm(ro, rows),
        );
        g.rmsnorm_forward(
            x.gv(xo, rows * dim),
            rows,
            dim,
            eps,
            y.gm(yo, rows * dim),
            rstd.gm(ro, rows),
        );
        let what = format!("rmsnorm_forward {rows}x{dim}");
        let yw = y.want().to_vec();
        check(&format!("{what} y"), &y.got(g), &yw, yo..yo + rows * dim, |i| {
            rel * (yw[i] as f64).abs()
        });
        let rw = rstd.want().to_vec();
        check(&format!("{what} rstd"), &rstd.got(g), &rw, ro..ro + rows, |i| {
            rel * (rw[i] as f64).abs()
        });

        // Backward from the CPU's y and rstd (the same inputs on both sides), written and accumulated.
        let y_in = Pair::new(g, &yw);
        let r_in = Pair::new(g, &rw);
        let y_body = &yw[yo..yo + rows * dim];
        let r_body = &rw[ro..ro + rows];
        let dy_body = randn(&mut rng, rows * dim, 1.0);
        let dy = Pair::new(g, &guarded(&mut rng, xo, &dy_body, 4));
        // The magnitude dx's rounding scales with: rstd (|dy| + |y| mean|dy y|).
        let mean_abs: Vec<f64> = (0..rows)
            .map(|r| {
                (0..dim)
                    .map(|c| (dy_body[r * dim + c] as f64 * y_body[r * dim + c] as f64).abs())
                    .sum::<f64>()
                    / dim as f64
            })
            .collect();
        for accumulate in [false, true] {
            let dx_body = if accumulate {
                randn(&mut rng, rows * dim, 1.0)
            } else {
                vec![NAN; rows * dim]
            };
            let mut dx = Pair::new(g, &guarded(&mut rng, yo, &dx_body, 4));
            cpu.rmsnorm_backward(
                y_in.cv(yo, rows * dim),
                r_in.cv(ro, rows),
                dy.cv(xo, rows * dim),
                rows,
                dim,
                dx.cm(yo, rows * dim),
                accumulate,
            );
            g.rmsnorm_backward(
                y_in.gv(yo, rows * dim),
                r_in.gv(ro, rows),
                dy.gv(xo, rows * dim),
                rows,
                dim,
                dx.gm(yo, rows * dim),
                accumulate,
            );
            let dxw = dx.want().to_vec();
            check(
                &format!("rmsnorm_backward {rows}x{dim} accumulate {accumulate}"),
                &dx.got(g),
                &dxw,
                yo..yo + rows * dim,
                |i| {
                    let e = i - yo;
                    let r = e / dim;
                    let mag = r_body[r] as f64 * ((dy_body[e] as f64).abs() + (y_body[e] as f64).abs() * mean_abs[r]);
                    rel * mag + 2.0 * U * (dxw[i] as f64).abs()
                },
            );
        }
    }
}

#[test]
fn rotary_forward_then_backward() {
    if let Some(g) = gpu() {
        rotary_forward_then_backward_on(&g);
    }
}

fn rotary_forward_then_backward_on<D: Backend>(g: &D) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(5);
    for (batch, t, heads, head_dim, pos0, max_pos) in
        [(2, 7, 3, 16, 0, 16), (2, 7, 3, 16, 5, 16), (1, 3, 2, 128, 60, 64)]
    {
        let what = format!("rotary b{batch} t{t} h{heads} d{head_dim} pos0 {pos0}");
        let shape = Heads::new(batch, t, heads, head_dim).from_position(pos0);
        let len = batch * t * heads * head_dim;
        let half = head_dim / 2;
        let table_host = rotary_table(max_pos, head_dim);
        let to = 6;
        let table = Pair::new(g, &guarded(&mut rng, to, &table_host, 2));
        let tv = table_host.len();
        let xo = 4;
        let x_body = randn(&mut rng, len, 1.0);
        // |x1| + |x2| of the pair an element belongs to: what the rotation's rounding scales with.
        let pair_mag = |x: &[f32], e: usize| {
            let (row, j) = (e / head_dim, e % head_dim % half);
            (x[row * head_dim + j] as f64).abs() + (x[row * head_dim + j + half] as f64).abs()
        };

        let mut x = Pair::new(g, &guarded(&mut rng, xo, &x_body, 3));
        cpu.rotary(x.cm(xo, len), shape, table.cv(to, tv), Rotation::Forward);
        g.rotary(x.gm(xo, len), shape, table.gv(to, tv), Rotation::Forward);
        let xw = x.want().to_vec();
        check(&format!("{what} forward"), &x.got(g), &xw, xo..xo + len, |i| {
            4.0 * U * pair_mag(&x_body, i - xo)
        });

        // Backward from the same input on both sides (the CPU's forward output).
        let rotated = xw[xo..xo + len].to_vec();
        let mut dx = Pair::new(g, &xw);
        cpu.rotary(dx.cm(xo, len), shape, table.cv(to, tv), Rotation::Inverse);
        g.rotary(dx.gm(xo, len), shape, table.gv(to, tv), Rotation::Inverse);
        let got = dx.got(g);
        check(&format!("{what} backward"), &got, dx.want(), xo..xo + len, |i| {
            4.0 * U * pair_mag(&rotated, i - xo)
        });
        // And the backward undoes the forward (cos^2 + sin^2 = 1 to a few ulps of the table).
        for e in 0..len {
            let err = (got[xo + e] as f64 - x_body[e] as f64).abs();
            assert!(
                err <= 1e-6 * pair_mag(&x_body, e) + 1e-30,
                "{what}: round trip off at {e}: {err:e}"
            );
        }
    }
}

#[test]
fn relu2_add_and_softcap() {
    if let Some(g) = gpu() {
        relu2_add_and_softcap_on(&g);
    }
}

fn relu2_add_and_softcap_on<D: Backend>(g: &D) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(6);
    let n = 100_003; // more than one block, not a multiple of the block size
    let mut u_body = randn(&mut rng, n, 1.0);
    u_body[0] = 0.0;
    u_body[1] = -0.0;
    let (uo, ho) = (5, 9);
    let u = Pair::new(g, &guarded(&mut rng, uo, &u_body, 3));

    let mut h = Pair::new(g, &guarded(&mut rng, ho, &vec![NAN; n], 3));
    cpu.relu2_forward(u.cv(uo, n), h.cm(ho, n));
    g.relu2_forward(u.gv(uo, n), h.gm(ho, n));
    exact("relu2_forward", &h.got(g), h.want(), ho..ho + n);

    let dh_body = randn(&mut rng, n, 1.0);
    let mut dh = Pair::new(g, &guarded(&mut rng, ho, &dh_body, 3));
    cpu.relu2_backward(u.cv(uo, n), dh.cm(ho, n));
    g.relu2_backward(u.gv(uo, n), dh.gm(ho, n));
    exact("relu2_backward", &dh.got(g), dh.want(), ho..ho + n);

    let mut x = Pair::new(g, &guarded(&mut rng, ho, &dh_body, 3));
    cpu.add_inplace(x.cm(ho, n), u.cv(uo, n));
    g.add_inplace(x.gm(ho, n), u.gv(uo, n));
    exact("add_inplace", &x.got(g), x.want(), ho..ho + n);

    // Softcap over raw logits of every size, from tiny (the Taylor branch on the CPU) to saturated.
    let z_body: Vec<f32> = (0..n)
        .map(|i| (rng.normal() * [0.01, 3.0, 30.0, 300.0][i % 4]) as f32)
        .collect();
    let mut z = Pair::new(g, &guarded(&mut rng, uo, &z_body, 3));
    cpu.softcap(z.cm(uo, n), 15.0);
    g.softcap(z.gm(uo, n), 15.0);
    let zw = z.want().to_vec();
    check("softcap", &z.got(g), &zw, uo..uo + n, |i| 1.5e-6 * (zw[i] as f64).abs());
}

#[test]
fn softcap_cross_entropy_with_and_without_grad() {
    if let Some(g) = gpu() {
        softcap_cross_entropy_with_and_without_grad_on(&g);
    }
}

fn softcap_cross_entropy_with_and_without_grad_on<D: Backend>(g: &D) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(7);
    let cap = 15.0f32;
    // vocab 70 < the block's 256 threads (threads with no column); 1000 and 4099 are not multiples of it.
    for (rows, vocab) in [(13, 1000), (9, 70), (4, 4099)] {
        let target_off = 5;
        let mut targets: Vec<i32> = (0..target_off + rows + 3)
            .map(|_| (rng.next_u64() % vocab as u64) as i32)
            .collect();
        targets[target_off + 1] = -1; // ignored rows
        targets[target_off + rows - 1] = -1;
        targets[target_off + 2] = (vocab - 1) as i32;
        let (ct, gt) = ids_pair(g, &targets);
        let mut logits_body = randn(&mut rng, rows * vocab, 3.0);
        // A confident, right prediction: loss near zero (the log1p path) and a saturated logit.
        let t0 = targets[target_off] as usize;
        logits_body[t0] = 40.0;
        let (lo, so) = (3, 2);
        let row_range = |r: usize| lo + r * vocab..lo + (r + 1) * vocab;
        let ignored = |r: usize| targets[target_off + r] < 0;

        // Without a gradient: per-row losses, and the capped logits in rows with a target.
        let mut logits = Pair::new(g, &guarded(&mut rng, lo, &logits_body, 4));
        let mut losses = Pair::new(g, &guarded(&mut rng, so, &vec![NAN; rows], 4));
        let lv = rows * vocab;
        cpu.softcap_cross_entropy(
            logits.cm(lo, lv),
            rows,
            vocab,
            cap,
            &ct,
            target_off,
            losses.cm(so, rows),
            None,
        );
        g.softcap_cross_entropy(
            logits.gm(lo, lv),
            rows,
            vocab,
            cap,
            &gt,
            target_off,
            losses.gm(so, rows),
            None,
        );
        let what = format!("softcap_cross_entropy {rows}x{vocab}");
        let lw = losses.want().to_vec();
        check(&format!("{what} losses"), &losses.got(g), &lw, so..so + rows, |i| {
            5e-5 + 1e-6 * (lw[i] as f64).abs()
        });
        for r in 0..rows {
            if ignored(r) {
                assert_eq!(losses.got(g)[so + r], 0.0, "{what}: ignored row {r} has a loss");
            }
        }
        let got_z = logits.got(g);
        let want_z = logits.want().to_vec();
        for r in (0..rows).filter(|&r| !ignored(r)) {
            // Only rows with a target are specified to hold z (the CPU leaves ignored rows raw).
            let range = row_range(r);
            for i in range {
                let err = (got_z[i] as f64 - want_z[i] as f64).abs();
                assert!(
                    err <= 1.5e-6 * (want_z[i] as f64).abs(),
                    "{what}: capped logit {i} is {} on the GPU, {} on the CPU",
                    got_z[i],
                    want_z[i]
                );
            }
        }
        // p = softmax(z) per row (f64, from the CPU's z), for the gradient's tolerance.
        let p: Vec<f64> = (0..rows)
            .flat_map(|r| {
                let z = &want_z[row_range(r)];
                let m = z.iter().fold(f64::MIN, |m, v| m.max(*v as f64));
                let e: Vec<f64> = z.iter().map(|v| (*v as f64 - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.into_iter().map(move |x| x / s)
            })
            .collect();

        // With a gradient.
        let scale = 0.37f32;
        let mut logits = Pair::new(g, &guarded(&mut rng, lo, &logits_body, 4));
        let mut losses = Pair::new(g, &guarded(&mut rng, so, &vec![NAN; rows], 4));
        cpu.softcap_cross_entropy(
            logits.cm(lo, lv),
            rows,
            vocab,
            cap,
            &ct,
            target_off,
            losses.cm(so, rows),
            Some(scale),
        );
        g.softcap_cross_entropy(
            logits.gm(lo, lv),
            rows,
            vocab,
            cap,
            &gt,
            target_off,
            losses.gm(so, rows),
            Some(scale),
        );
        check(
            &format!("{what} losses (grad)"),
            &losses.got(g),
            losses.want(),
            so..so + rows,
            |i| 5e-5 + 1e-6 * (lw[i] as f64).abs(),
        );
        let dw = logits.want().to_vec();
        check(&format!("{what} grad"), &logits.got(g), &dw, lo..lo + lv, |i| {
            let e = i - lo;
            let (r, j) = (e / vocab, e % vocab);
            if ignored(r) {
                return 0.0; // exactly zero on both
            }
            // 5e-5 of the value: the probabilities' relative error; 4e-6 |s (p - onehot)|: the error of the
            // factor 1 - (z/cap)^2, absolute (it cancels where z nears the cap).
            let onehot = if j as i32 == targets[target_off + r] { 1.0 } else { 0.0 };
            5e-5 * (dw[i] as f64).abs() + 4e-6 * scale as f64 * (p[e] - onehot).abs()
        });
    }
}

#[test]
fn optimizer_ops_axpby_scale_sum_squares_momentum_adamw() {
    if let Some(g) = gpu() {
        optimizer_ops_on(&g);
    }
}

/// Unit roundoff of f64.
const U64: f64 = 1.0 / (1u64 << 53) as f64;

fn optimizer_ops_on<D: Backend>(g: &D) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(11);
    // Several elementwise blocks, not a multiple of 256; a size past 2^20 blocks is not needed (the
    // grid-stride loop is the same code as elementwise.cu's); and a few elements.
    for n in [300_001usize, 5] {
        let (xo, yo) = (7, 13);
        let x_body = randn(&mut rng, n, 1.0);
        let x = Pair::new(g, &guarded(&mut rng, xo, &x_body, 5));
        let y_body = randn(&mut rng, n, 2.0);

        let mut y = Pair::new(g, &guarded(&mut rng, yo, &y_body, 5));
        cpu.axpby(0.7, x.cv(xo, n), -1.1, y.cm(yo, n));
        g.axpby(0.7, x.gv(xo, n), -1.1, y.gm(yo, n));
        exact(&format!("axpby n {n}"), &y.got(g), y.want(), yo..yo + n);

        // b = 0 (and -0): y = a x without reading y, so its NaNs must not come through.
        for zero in [0.0f32, -0.0] {
            let mut y = Pair::new(g, &guarded(&mut rng, yo, &vec![NAN; n], 5));
            cpu.axpby(-3.0, x.cv(xo, n), zero, y.cm(yo, n));
            g.axpby(-3.0, x.gv(xo, n), zero, y.gm(yo, n));
            let got = y.got(g);
            assert!(
                got[yo..yo + n].iter().all(|v| !v.is_nan()),
                "axpby b = {zero}: a NaN of y survived"
            );
            exact(&format!("axpby b = {zero} n {n}"), &got, y.want(), yo..yo + n);
        }

        let mut z = Pair::new(g, &guarded(&mut rng, yo, &y_body, 5));
        cpu.scale(z.cm(yo, n), -0.37);
        g.scale(z.gm(yo, n), -0.37);
        exact(&format!("scale n {n}"), &z.got(g), z.want(), yo..yo + n);

        // Muon's momentum: buf updated in place, update written (NaN before).
        let (go, bo, uo) = (3, 11, 5);
        let gr = Pair::new(g, &guarded(&mut rng, go, &x_body, 2));
        let buf_body = randn(&mut rng, n, 0.5);
        for mu in [0.95f32, 0.85] {
            let mut buf = Pair::new(g, &guarded(&mut rng, bo, &buf_body, 2));
            let mut upd = Pair::new(g, &guarded(&mut rng, uo, &vec![NAN; n], 2));
            cpu.muon_momentum(gr.cv(go, n), buf.cm(bo, n), upd.cm(uo, n), mu);
            g.muon_momentum(gr.gv(go, n), buf.gm(bo, n), upd.gm(uo, n), mu);
            exact(
                &format!("muon_momentum buf mu {mu} n {n}"),
                &buf.got(g),
                buf.want(),
                bo..bo + n,
            );
            exact(
                &format!("muon_momentum update mu {mu} n {n}"),
                &upd.got(g),
                upd.want(),
                uo..uo + n,
            );
        }

        // AdamW at step 3 (lr 0.004, weight decay 0.01, betas 0.8 and 0.95, eps 1e-10), with the host
        // scalars computed as the optimizer does; element 0 has no gradient and no moments yet (0 / eps).
        let (lr, wd, beta1, beta2, t) = (0.004f64, 0.01f64, 0.8f32, 0.95f32, 3);
        let h = AdamwStep {
            beta1,
            beta2,
            eps: 1e-10,
            decay: (1.0 - lr * wd) as f32,
            step: (lr / (1.0 - (beta1 as f64).powi(t))) as f32,
            inv_bc2: (1.0 / (1.0 - (beta2 as f64).powi(t))) as f32,
        };
        let mut g_body = randn(&mut rng, n, 0.1);
        let mut m_body = randn(&mut rng, n, 0.05);
        let mut v_body: Vec<f32> = randn(&mut rng, n, 0.01).iter().map(|v| v * v).collect();
        (g_body[0], m_body[0], v_body[0]) = (0.0, 0.0, 0.0);
        let (po, gro, mo, vo) = (9, 4, 6, 2);
        let mut p = Pair::new(g, &guarded(&mut rng, po, &x_body, 3));
        let grad = Pair::new(g, &guarded(&mut rng, gro, &g_body, 3));
        let mut m = Pair::new(g, &guarded(&mut rng, mo, &m_body, 3));
        let mut v = Pair::new(g, &guarded(&mut rng, vo, &v_body, 3));
        cpu.adamw(p.cm(po, n), grad.cv(gro, n), m.cm(mo, n), v.cm(vo, n), h);
        g.adamw(p.gm(po, n), grad.gv(gro, n), m.gm(mo, n), v.gm(vo, n), h);
        exact(&format!("adamw p n {n}"), &p.got(g), p.want(), po..po + n);
        exact(&format!("adamw m n {n}"), &m.got(g), m.want(), mo..mo + n);
        exact(&format!("adamw v n {n}"), &v.got(g), v.want(), vo..vo + n);
    }

    // sum_squares: empty, one element, partial blocks, several blocks, and past 256 x 1024 elements (every
    // one of the 1024 blocks loops grid-stride more than once), at an offset; mixed magnitudes.
    for n in [0usize, 1, 255, 257, 100_003, 256 * 1024 + 12_345, 3 * 256 * 1024 + 7] {
        let off = 17;
        let body: Vec<f32> = (0..n)
            .map(|i| (rng.normal() * [1.0, 1e-3, 1e3][i % 3]) as f32)
            .collect();
        let x = Pair::new(g, &guarded(&mut rng, off, &body, 9));
        let want = cpu.sum_squares(x.cv(off, n));
        let got = g.sum_squares(x.gv(off, n));
        let tol = 2.0 * n as f64 * U64 * want;
        assert!(
            (got - want).abs() <= tol,
            "sum_squares n {n}: {got:e} on the GPU, {want:e} on the CPU, error {:e} > tolerance {tol:e}",
            (got - want).abs()
        );
        if n == 0 {
            assert_eq!(got, 0.0, "sum_squares of nothing");
        }
        exact(&format!("sum_squares n {n} leaves x"), &x.got(g), x.want(), 0..0);
    }
}

fn attention_inputs(rng: &mut Rng, s: &AttnShape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        randn(rng, s.q_len(), 1.0),
        randn(rng, s.kv_len(), 1.0),
        randn(rng, s.kv_len(), 1.0),
    )
}

#[test]
fn attention_forward_training_and_decode_shapes() {
    if let Some(g) = gpu() {
        attention_forward_training_and_decode_shapes_on(&g);
    }
}

fn attention_forward_training_and_decode_shapes_on<D: Backend>(g: &D) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(8);
    let shapes = [
        AttnShape::causal(2, 37, 4, 4, 16),  // MHA, T not a multiple of any tile
        AttnShape::causal(2, 70, 6, 2, 8),   // GQA, group 3
        AttnShape::causal(1, 40, 2, 1, 128), // the largest head_dim, GQA
        AttnShape::causal(1, 1, 2, 2, 16),   // one position
        // Decoding with a KV cache: new rows at q_pos0 > 0.
        AttnShape {
            batch: 2,
            tq: 1,
            tk: 45,
            n_head: 4,
            n_kv_head: 2,
            head_dim: 16,
            q_pos0: 44,
        },
        AttnShape {
            batch: 1,
            tq: 3,
            tk: 50,
            n_head: 4,
            n_kv_head: 4,
            head_dim: 8,
            q_pos0: 40, // keys 43..49 exist but no row sees them
        },
        AttnShape {
            batch: 2,
            tq: 5,
            tk: 65,
            n_head: 2,
            n_kv_head: 1,
            head_dim: 128,
            q_pos0: 60,
        },
    ];
    for s in shapes {
        let what = format!("attention_forward {s:?}");
        let (q_body, k_body, v_body) = attention_inputs(&mut rng, &s);
        let (qo, ko, vo, oo, lo) = (3, 5, 7, 2, 4);
        let q = Pair::new(g, &guarded(&mut rng, qo, &q_body, 2));
        let k = Pair::new(g, &guarded(&mut rng, ko, &k_body, 2));
        let v = Pair::new(g, &guarded(&mut rng, vo, &v_body, 2));
        let mut out = Pair::new(g, &guarded(&mut rng, oo, &vec![NAN; s.q_len()], 2));
        let mut lse = Pair::new(g, &guarded(&mut rng, lo, &vec![NAN; s.lse_len()], 2));
        let (ql, kl, ll) = (s.q_len(), s.kv_len(), s.lse_len());
        cpu.attention_forward(
            s,
            q.cv(qo, ql),
            k.cv(ko, kl),
            v.cv(vo, kl),
            out.cm(oo, ql),
            lse.cm(lo, ll),
        );
        g.attention_forward(
            s,
            q.gv(qo, ql),
            k.gv(ko, kl),
            v.gv(vo, kl),
            out.gm(oo, ql),
            lse.gm(lo, ll),
        );
        let tol = rel_to_max(out.want(), oo..oo + ql, 1e-4);
        check(&format!("{what} out"), &out.got(g), out.want(), oo..oo + ql, |_| tol);
        let tol = rel_to_max(lse.want(), lo..lo + ll, 1e-4);
        check(&format!("{what} lse"), &lse.got(g), lse.want(), lo..lo + ll, |_| tol);
    }
}

#[test]
fn attention_backward_training_shapes() {
    if let Some(g) = gpu() {
        attention_backward_training_shapes_on(&g);
    }
}

fn attention_backward_training_shapes_on<D: Backend>(g: &D) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(9);
    for s in [
        AttnShape::causal(2, 37, 4, 4, 16),
        AttnShape::causal(2, 70, 6, 2, 8),
        AttnShape::causal(1, 40, 2, 1, 128),
        AttnShape::causal(1, 1, 2, 2, 16),
        AttnShape::causal(1, 129, 2, 2, 16), // several key tiles and query tiles
    ] {
        let what = format!("attention_backward {s:?}");
        let (ql, kl, ll) = (s.q_len(), s.kv_len(), s.lse_len());
        let (q_body, k_body, v_body) = attention_inputs(&mut rng, &s);
        // out and lse from the CPU forward, so both backwards see identical inputs.
        let mut out_body = vec![0.0; ql];
        let mut lse_body = vec![0.0; ll];
        {
            let (qb, kb, vb) = (
                CpuBuf::f32(q_body.clone()),
                CpuBuf::f32(k_body.clone()),
                CpuBuf::f32(v_body.clone()),
            );
            let (mut ob, mut lb) = (CpuBuf::f32(vec![0.0; ql]), CpuBuf::f32(vec![0.0; ll]));
            cpu.attention_forward(
                s,
                View::all(&qb),
                View::all(&kb),
                View::all(&vb),
                ViewMut::all(&mut ob),
                ViewMut::all(&mut lb),
            );
            out_body.copy_from_slice(&ob.0);
            lse_body.copy_from_slice(&lb.0);
        }
        let dout_body = randn(&mut rng, ql, 1.0);
        let (qo, ko, vo, oo, lo, go) = (3, 5, 7, 2, 4, 6);
        let q = Pair::new(g, &guarded(&mut rng, qo, &q_body, 2));
        let k = Pair::new(g, &guarded(&mut rng, ko, &k_body, 2));
        let v = Pair::new(g, &guarded(&mut rng, vo, &v_body, 2));
        let out = Pair::new(g, &guarded(&mut rng, oo, &out_body, 2));
        let lse = Pair::new(g, &guarded(&mut rng, lo, &lse_body, 2));
        let dout = Pair::new(g, &guarded(&mut rng, go, &dout_body, 2));
        // dq, dk, dv are written: they start as NaN.
        let mut dq = Pair::new(g, &guarded(&mut rng, qo, &vec![NAN; ql], 2));
        let mut dk = Pair::new(g, &guarded(&mut rng, ko, &vec![NAN; kl], 2));
        let mut dv = Pair::new(g, &guarded(&mut rng, vo, &vec![NAN; kl], 2));
        cpu.attention_backward(
            s,
            q.cv(qo, ql),
            k.cv(ko, kl),
            v.cv(vo, kl),
            out.cv(oo, ql),
            lse.cv(lo, ll),
            dout.cv(go, ql),
            dq.cm(qo, ql),
            dk.cm(ko, kl),
            dv.cm(vo, kl),
        );
        g.attention_backward(
            s,
            q.gv(qo, ql),
            k.gv(ko, kl),
            v.gv(vo, kl),
            out.gv(oo, ql),
            lse.gv(lo, ll),
            dout.gv(go, ql),
            dq.gm(qo, ql),
            dk.gm(ko, kl),
            dv.gm(vo, kl),
        );
        // A query row that sees one key has P = 1, so dS = dP - delta = dout.v - dout.out = 0 exactly (out = v):
        // its dq, and that key's dk, are the rounding noise of two length-d dot products, each within
        // d u sum|dout v| on either side, so the sides differ by up to 4 d u scale max|k| (or |q|) sum|dout v|.
        // At T = 1 every row is like that: dq and dk are all noise, and a tolerance relative to their own
        // largest value compares noise with noise (seen on the simulated GPU: dq 2.5e-7 against -2.5e-7).
        let noise_floor = |other: &[f32]| {
            let d = s.head_dim as f64;
            let dot_terms = d * max_abs(&dout_body) * max_abs(&v_body);
            4.0 * d * U * max_abs(other) * dot_terms / d.sqrt()
        };
        let single_key = s.tk == 1;
        for (name, p, off, len, other) in [
            ("dq", &dq, qo, ql, &k_body),
            ("dk", &dk, ko, kl, &q_body),
            ("dv", &dv, vo, kl, &v_body),
        ] {
            let mut tol = rel_to_max(p.want(), off..off + len, 1e-4);
            if single_key && name != "dv" {
                tol = tol.max(noise_floor(other));
            }
            check(&format!("{what} {name}"), &p.got(g), p.want(), off..off + len, |_| tol);
        }
    }
}

/// Two micro-batches of (inputs, targets), with some ignored targets.
fn batches(rng: &mut Rng, cfg: &ModelConfig, tokens: usize) -> Vec<(Vec<u32>, Vec<i32>)> {
    (0..2)
        .map(|_| {
            let inputs: Vec<u32> = (0..tokens)
                .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
                .collect();
            let targets: Vec<i32> = (0..tokens)
                .map(|i| {
                    if i % 7 == 3 {
                        -1
                    } else {
                        (rng.next_u64() % cfg.vocab_size as u64) as i32
                    }
                })
                .collect();
            (inputs, targets)
        })
        .collect()
}

/// The CPU model (recompute None, the reference) and a CUDA model per policy, with the same parameters:
/// two micro-steps of forward+backward (grads accumulate), then every loss and gradient compared, and the
/// forward-only per-token losses.
fn model_parity_on<D: Backend>(make: &dyn Fn() -> D, cfg: ModelConfig, batch: usize, seq: usize) {
    let mut cpu = Gpt::new(CpuBackend::new(), cfg, batch, seq, Recompute::None).unwrap();
    cpu.init(11);
    // The init leaves lm_head and both c_proj at zero, which would zero most gradients: perturb every
    // parameter so each gradient is nonzero and the comparison proves something.
    let mut mirror = HostMirror::default();
    let mut params = cpu.host_params(&mut mirror).to_vec();
    let mut rng = Rng::new(12);
    for p in &mut params {
        *p += (0.05 * rng.normal()) as f32;
    }
    cpu.set_params_from_host(&params).unwrap();
    let data = batches(&mut rng, &cfg, batch * seq);
    cpu.zero_grads();
    let cpu_losses: Vec<f32> = data
        .iter()
        .map(|(i, t)| cpu.forward_backward(i, t, 0.5).unwrap())
        .collect();
    let mut cpu_token_losses = vec![0.0; batch * seq];
    cpu.forward_losses(&data[0].0, &data[0].1, &mut cpu_token_losses)
        .unwrap();

    for policy in [Recompute::None, Recompute::Selective, Recompute::Full] {
        let what = format!("model {cfg:?} batch {batch} seq {seq} recompute {policy:?}");
        let be = make();
        let mut gm = Gpt::new(be, cfg, batch, seq, policy).unwrap();
        gm.set_params_from_host(&params).unwrap();
        gm.zero_grads();
        for (step, (i, t)) in data.iter().enumerate() {
            let loss = gm.forward_backward(i, t, 0.5).unwrap();
            let want = cpu_losses[step];
            assert!(
                ((loss - want) as f64).abs() <= 1e-5 * (want as f64).abs(),
                "{what}: loss of micro-step {step} is {loss} on the GPU, {want} on the CPU"
            );
        }
        for spec in cpu.param_specs() {
            let mut want = vec![0.0; spec.numel()];
            let mut got = vec![0.0; spec.numel()];
            cpu.read_grad(&spec.name, &mut want).unwrap();
            gm.read_grad(&spec.name, &mut got).unwrap();
            let tol = rel_to_max(&want, 0..want.len(), 1e-4);
            check(
                &format!("{what} grad of {}", spec.name),
                &got,
                &want,
                0..want.len(),
                |_| tol,
            );
        }
        let mut token_losses = vec![0.0; batch * seq];
        gm.forward_losses(&data[0].0, &data[0].1, &mut token_losses).unwrap();
        check(
            &format!("{what} forward_losses"),
            &token_losses,
            &cpu_token_losses,
            0..token_losses.len(),
            |i| 5e-5 + 1e-5 * (cpu_token_losses[i] as f64).abs(),
        );
    }
}

#[test]
fn model_gqa_matches_the_cpu_under_every_recompute_policy() {
    if gpu().is_some() {
        model_parity_on(&cuda_backend, gqa_model(), 2, 24);
    }
}

/// 2 layers, d 64, 4 heads of 16 sharing 2 kv heads, vocab 97 (run on two sequences of 24).
fn gqa_model() -> ModelConfig {
    ModelConfig::new(2, 64, 4, 2, 16, 97, 32).unwrap()
}

#[test]
fn model_mha_head_dim_128_matches_the_cpu() {
    if gpu().is_some() {
        model_parity_on(&cuda_backend, mha_model(), 1, 40);
    }
}

/// Full MHA with the presets' head_dim 128, a vocabulary over one block's 256 threads (one sequence of 40).
fn mha_model() -> ModelConfig {
    ModelConfig::new(1, 256, 2, 2, 128, 300, 40).unwrap()
}

/// The device optimizer (Muon with Newton-Schulz on the backend's matmul, AdamW, clipping) on the device
/// against the same optimizer on the CPU backend, four steps from the same parameters and gradients:
/// - AdamW's parameters and every state value (Muon momentum, AdamW moments) to the bit: the kernels round as
///   the CPU does and, without clipping, both sides see the same gradients;
/// - Muon's matrices within 5e-5 of their change: the GEMMs round differently (cuBLAS against gemm) and
///   Newton-Schulz amplifies that (its slope at 0 is ~490); the CPU's own device-vs-host optimizer gap, the
///   same kind of difference, measures 6.5e-6 (tests/tests/device_optimizer.rs), so this allows ~8x it. A
///   first estimate until it has run on a GPU;
/// - clipping: the norm to 4 n 2^-53 relative (f64 sums in another order), the clipped gradient to 2 ulps;
/// - state_to_host then restore round-trips to the bit on the device.
fn device_optimizer_on<D: Backend>(g: &D) {
    use nc_core::config::ParamKind;
    use nc_core::optim::device::DeviceOptimizer;
    use nc_core::optim::schedule::muon_momentum;
    use nc_core::optim::OptimConfig;
    let model = ModelConfig::new(2, 64, 2, 2, 32, 50, 8).unwrap();
    let n = model.num_params() as usize;
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(21);
    let p0 = randn(&mut rng, n, 0.1);
    let (mut p_cpu, mut p_dev) = (cpu.alloc(n), g.alloc(n));
    cpu.upload(ViewMut::all(&mut p_cpu), &p0);
    g.upload(ViewMut::all(&mut p_dev), &p0);
    let mut o_cpu = DeviceOptimizer::new(&cpu, &model, OptimConfig::default()).unwrap();
    let mut o_dev = DeviceOptimizer::new(g, &model, OptimConfig::default()).unwrap();
    for k in 0..4u64 {
        let grads = randn(&mut rng, n, 0.01 * (1 + k) as f64);
        let (mut g_cpu, mut g_dev) = (cpu.alloc(n), g.alloc(n));
        cpu.upload(ViewMut::all(&mut g_cpu), &grads);
        g.upload(ViewMut::all(&mut g_dev), &grads);
        let (lr_mult, mu) = (1.0 - 0.2 * k as f64, muon_momentum(k * 100));
        o_cpu.step(&cpu, &mut p_cpu, &g_cpu, lr_mult, mu);
        o_dev.step(g, &mut p_dev, &g_dev, lr_mult, mu);
        let (want, got) = (download_all(&cpu, &p_cpu), download_all(g, &p_dev));
        assert!(got.iter().all(|v| v.is_finite()), "step {k}: non-finite parameters");
        for seg in &o_cpu.layout().segments {
            let r = seg.range();
            match seg.kind {
                ParamKind::Matrix => {
                    let change = r
                        .clone()
                        .map(|i| (want[i] as f64 - p0[i] as f64).abs())
                        .fold(0.0, f64::max);
                    assert!(change > 0.0, "step {k}: the matrix at {} did not move", seg.start);
                    let what = format!("step {k} muon {}x{} at {}", seg.rows, seg.cols, seg.start);
                    check(&what, &got[r.clone()], &want[r.clone()], 0..r.len(), |_| 5e-5 * change);
                }
                ParamKind::Embedding | ParamKind::Unembedding => {
                    let what = format!("step {k} adamw at {}", seg.start);
                    exact(&what, &got[r.clone()], &want[r.clone()], 0..r.len());
                }
            }
        }
        let (sw, sg) = (o_cpu.state_to_host(&cpu), o_dev.state_to_host(g));
        exact(&format!("step {k} optimizer state"), &sg, &sw, 0..sw.len());
    }
    // clipping above the threshold
    let grads = randn(&mut rng, n, 0.05);
    let (mut g_cpu, mut g_dev) = (cpu.alloc(n), g.alloc(n));
    cpu.upload(ViewMut::all(&mut g_cpu), &grads);
    g.upload(ViewMut::all(&mut g_dev), &grads);
    let (norm_cpu, norm_dev) = (o_cpu.clip(&cpu, &mut g_cpu, 0.5), o_dev.clip(g, &mut g_dev, 0.5));
    assert!(norm_cpu > 0.5, "the clip case must clip ({norm_cpu})");
    let rel = (norm_dev - norm_cpu).abs() / norm_cpu;
    assert!(
        rel <= 4.0 * n as f64 * 2f64.powi(-53),
        "clip norm {norm_dev} vs {norm_cpu}"
    );
    let want = download_all(&cpu, &g_cpu);
    check("clipped grads", &download_all(g, &g_dev), &want, 0..n, |i| {
        2.0 * 2.0 * U * want[i].abs() as f64
    });
    // state round trip on the device
    let saved = o_dev.state_to_host(g);
    let mut again = DeviceOptimizer::new(g, &model, OptimConfig::default()).unwrap();
    again.restore(g, &saved, o_dev.steps_taken()).unwrap();
    exact("restored state", &again.state_to_host(g), &saved, 0..saved.len());
}

fn download_all<D: Backend>(be: &D, buf: &D::Buf) -> Vec<f32> {
    let mut out = vec![0.0f32; D::buf_len(buf)];
    be.download(View::all(buf), &mut out);
    out
}

#[test]
fn device_optimizer_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    device_optimizer_on(&g);
}

fn cuda_backend() -> CudaBackend {
    CudaBackend::new(0).expect("the CUDA backend started once in this test already")
}

/// The harness itself, on a machine without a GPU: every test body above with the device-like CPU backend
/// (the CPU's arithmetic behind the trait, buffers not host-visible) in place of CUDA. Its results equal
/// the reference exactly, so this proves the tests run clean (views, guards, NaN starts, the nonzero
/// gradients the model comparison relies on) and leaves the tolerances to the GPU run.
#[test]
fn the_harness_runs_clean_with_a_device_like_cpu() {
    let g = DeviceLikeCpu::default();
    copies_fill_and_empty_buffers_on(&g);
    matmul_every_transpose_accumulate_and_offset_on(&g);
    embedding_forward_and_scatter_add_with_repeated_ids_on(&g);
    rmsnorm_forward_and_backward_on(&g);
    rotary_forward_then_backward_on(&g);
    relu2_add_and_softcap_on(&g);
    softcap_cross_entropy_with_and_without_grad_on(&g);
    attention_forward_training_and_decode_shapes_on(&g);
    attention_backward_training_shapes_on(&g);
    optimizer_ops_on(&g);
    device_optimizer_on(&g);
    model_parity_on(&DeviceLikeCpu::default, gqa_model(), 2, 24);
    model_parity_on(&DeviceLikeCpu::default, mha_model(), 1, 40);
}

/// The comparison fails where it should: one ulp off where bits must match, a write past the view, a
/// NaN on one side only, an error past the tolerance.
#[test]
fn the_comparison_catches_what_it_should() {
    let want = vec![1.0f32, 2.0, 3.0, 4.0];
    let caught = |got: Vec<f32>, range: Range<usize>, tol: f64| {
        let want = want.clone();
        std::panic::catch_unwind(move || check("probe", &got, &want, range, |_| tol)).is_err()
    };
    assert!(!caught(want.clone(), 0..4, 0.0));
    assert!(caught(
        vec![1.0, f32::from_bits(2.0f32.to_bits() + 1), 3.0, 4.0],
        0..4,
        0.0
    ));
    assert!(caught(vec![1.0, 2.0, 3.0, 4.5], 0..3, 1.0), "outside the view");
    assert!(caught(vec![1.0, f32::NAN, 3.0, 4.0], 0..4, 1e9));
    assert!(caught(vec![1.0, 2.0, 3.1, 4.0], 0..4, 0.05));
    assert!(!caught(vec![1.0, 2.0, 3.04, 4.0], 0..4, 0.05));
}

/// The tolerances themselves, on a machine without a GPU: a backend that computes every op the way a GPU
/// kernel may (other summation orders, fused multiply-adds, libm's tanh and exp, the row max instead of the
/// cap as the softmax shift, scatter-adds in another order, the sum of squares in strided lanes and a tree)
/// must pass every comparison above. Attention and the elementwise ops that must match bit for bit (the
/// optimizer's among them) keep the CPU's code.
#[test]
fn the_tolerances_admit_a_gpu_like_rounding() {
    let g = OtherRounding::default();
    matmul_every_transpose_accumulate_and_offset_on(&g);
    embedding_forward_and_scatter_add_with_repeated_ids_on(&g);
    rmsnorm_forward_and_backward_on(&g);
    rotary_forward_then_backward_on(&g);
    relu2_add_and_softcap_on(&g);
    softcap_cross_entropy_with_and_without_grad_on(&g);
    optimizer_ops_on(&g);
    model_parity_on(&OtherRounding::default, gqa_model(), 2, 24);
    model_parity_on(&OtherRounding::default, mha_model(), 1, 40);
}

/// The CPU backend with the ops whose rounding a GPU may change reimplemented the way a kernel computes
/// them (see `the_tolerances_admit_a_gpu_like_rounding`).
#[derive(Default)]
struct OtherRounding(CpuBackend);

fn sl(x: View<'_, CpuBackend>) -> &[f32] {
    &x.buf.0[x.off..x.off + x.len]
}

fn sl_mut(x: ViewMut<'_, CpuBackend>) -> &mut [f32] {
    &mut x.buf.0[x.off..x.off + x.len]
}

/// A sum in 32 lanes then a tree, the shape of a warp reduction.
fn lane_sum(values: impl Iterator<Item = f32>) -> f32 {
    let mut lanes = [0.0f32; 32];
    for (i, v) in values.enumerate() {
        lanes[i % 32] += v;
    }
    let mut width = 16;
    while width > 0 {
        for l in 0..width {
            lanes[l] += lanes[l + width];
        }
        width /= 2;
    }
    lanes[0]
}

/// The ops a GPU may round differently are reimplemented; the rest go to the CPU backend (`Delegate`). It has
/// no narrow storage (its ops write f32 values: every buffer is F32, as the trait's default `alloc_as` keeps
/// them) and no host slices (the model and the optimizer take the device path).
impl nc_core::backend::delegate::Delegate for OtherRounding {
    type Inner = CpuBackend;
    fn inner(&self) -> &CpuBackend {
        &self.0
    }
    fn alloc_as(&self, len: usize, _: Storage) -> CpuBuf {
        self.0.alloc(len)
    }
    fn try_alloc_as(&self, len: usize, _: Storage) -> nc_core::Result<CpuBuf> {
        Ok(self.0.alloc(len))
    }
    fn host_slice(_: &CpuBuf) -> Option<&[f32]> {
        None
    }
    fn host_slice_mut(_: &mut CpuBuf) -> Option<&mut [f32]> {
        None
    }

    /// Dot products with fused multiply-adds, summed from the last term to the first.
    fn matmul(&self, shape: Gemm, a: View<'_, CpuBackend>, b: View<'_, CpuBackend>, c: ViewMut<'_, CpuBackend>) {
        let Gemm {
            m,
            n,
            k,
            a_t,
            b_t,
            accumulate,
        } = shape;
        let (a, b, c) = (sl(a), sl(b), sl_mut(c));
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f32;
                for p in (0..k).rev() {
                    let av = if a_t { a[p * m + i] } else { a[i * k + p] };
                    let bv = if b_t { b[j * k + p] } else { b[p * n + j] };
                    acc = av.mul_add(bv, acc);
                }
                c[i * n + j] = if accumulate { c[i * n + j] + acc } else { acc };
            }
        }
    }
    /// The scatter-add in reverse token order.
    fn embedding_backward(
        &self,
        ids: &CpuIds,
        n: usize,
        dout: View<'_, CpuBackend>,
        d: usize,
        dwte: ViewMut<'_, CpuBackend>,
    ) {
        let (dout, dwte) = (sl(dout), sl_mut(dwte));
        for i in (0..n).rev() {
            let id = ids.0[i] as usize;
            for c in 0..d {
                dwte[id * d + c] += dout[i * d + c];
            }
        }
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
        let (x, y, rstd) = (sl(x), sl_mut(y), sl_mut(rstd));
        for r in 0..rows {
            let row = &x[r * dim..(r + 1) * dim];
            let s = 1.0 / (lane_sum(row.iter().map(|v| v * v)) / dim as f32 + eps).sqrt();
            rstd[r] = s;
            for c in 0..dim {
                y[r * dim + c] = row[c] * s;
            }
        }
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
        let (y, rstd, dy, dx) = (sl(y), sl(rstd), sl(dy), sl_mut(dx));
        for (r, s) in rstd[..rows].iter().enumerate() {
            let o = r * dim;
            let mean = lane_sum((0..dim).map(|c| y[o + c] * dy[o + c])) / dim as f32;
            for c in 0..dim {
                let g = s * (-y[o + c]).mul_add(mean, dy[o + c]);
                dx[o + c] = if accumulate { dx[o + c] + g } else { g };
            }
        }
    }
    /// The pair's two products fused into one multiply-add each.
    fn rotary(&self, x: ViewMut<'_, CpuBackend>, shape: Heads, table: View<'_, CpuBackend>, rotation: Rotation) {
        let sin_sign = if rotation == Rotation::Inverse { -1.0 } else { 1.0 };
        other_rotary(sl_mut(x), shape, sl(table), sin_sign);
    }
    /// libm's tanh and exp, the row max as the shift, sums in warp-reduction order.
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
        let (logits, losses) = (sl_mut(logits), sl_mut(losses));
        for r in 0..rows {
            let x = &mut logits[r * vocab..(r + 1) * vocab];
            let target = targets.0[target_off + r];
            let z: Vec<f32> = x.iter().map(|l| cap * (l / cap).tanh()).collect();
            if target < 0 {
                losses[r] = 0.0;
                for (x, z) in x.iter_mut().zip(&z) {
                    *x = if grad_scale.is_some() { 0.0 } else { *z };
                }
                continue;
            }
            let t = target as usize;
            let max = z.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
            let other = lane_sum(
                z.iter()
                    .enumerate()
                    .filter(|(j, _)| *j != t)
                    .map(|(_, v)| (v - max).exp()),
            );
            let e_t = (z[t] - max).exp();
            let sum = other + e_t;
            losses[r] = (other / e_t).ln_1p();
            for (j, (x, z)) in x.iter_mut().zip(&z).enumerate() {
                *x = match grad_scale {
                    Some(s) => {
                        let dz = if j == t { -other / sum } else { (z - max).exp() / sum };
                        let c = z / cap;
                        s * dz * (1.0 - c * c)
                    }
                    None => *z,
                };
            }
        }
    }
    fn softcap(&self, logits: ViewMut<'_, CpuBackend>, cap: f32) {
        for z in sl_mut(logits) {
            *z = cap * (*z / cap).tanh();
        }
    }
    /// The kernel's shape of sum: 1024 x 256 lanes, each summing its strided elements, then a pairwise tree.
    fn sum_squares(&self, x: View<'_, CpuBackend>) -> f64 {
        let mut lanes = vec![0.0f64; 1 << 18];
        for (i, v) in sl(x).iter().enumerate() {
            lanes[i % (1 << 18)] += (*v as f64) * (*v as f64);
        }
        let mut width = lanes.len() / 2;
        while width > 0 {
            for l in 0..width {
                lanes[l] += lanes[l + width];
            }
            width /= 2;
        }
        lanes[0]
    }
    /// This backend's own rotary, then its own rmsnorm (the trait's default two calls; the CPU's fused op
    /// would skip both).
    fn rotary_qknorm_forward(
        &self,
        x: ViewMut<'_, CpuBackend>,
        shape: Heads,
        table: View<'_, CpuBackend>,
        eps: f32,
        y: ViewMut<'_, CpuBackend>,
        rstd: ViewMut<'_, CpuBackend>,
    ) {
        use nc_core::backend::delegate::{outer_view as ov, outer_view_mut as om};
        nc_core::backend::rotary_qknorm_forward_unfused(
            self,
            om::<Self>(x),
            shape,
            ov::<Self>(table),
            eps,
            om::<Self>(y),
            om::<Self>(rstd),
        )
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
        use nc_core::backend::delegate::{outer_view as ov, outer_view_mut as om};
        nc_core::backend::rotary_qknorm_backward_unfused(
            self,
            ov::<Self>(y),
            ov::<Self>(rstd),
            ov::<Self>(dy),
            shape,
            ov::<Self>(table),
            om::<Self>(dx),
        )
    }
}

fn other_rotary(x: &mut [f32], shape: Heads, table: &[f32], sin_sign: f32) {
    let (t, heads, head_dim, pos0) = (shape.t, shape.heads, shape.head_dim, shape.pos0);
    let half = head_dim / 2;
    let max_pos = table.len() / (2 * half);
    for row in 0..shape.rows() {
        let p = pos0 + (row / heads) % t;
        for j in 0..half {
            let (c, s) = (table[p * half + j], sin_sign * table[max_pos * half + p * half + j]);
            let (x1, x2) = (x[row * head_dim + j], x[row * head_dim + j + half]);
            x[row * head_dim + j] = x1.mul_add(c, x2 * s);
            x[row * head_dim + j + half] = (-x1).mul_add(s, x2 * c);
        }
    }
}
