//! The fused rotary + QK-norm op of the CPU twin (`Backend::rotary_qknorm_forward/backward`) rounds exactly
//! where the CUDA kernel (kernels-ptx/cuda/rotary_qknorm.cu) stores bf16, and nowhere else:
//! - forward: the rotated value stays unrounded; y = bf16(rotary(x) * rstd); rstd f32.
//! - backward: the norm's input gradient g stays unrounded through the transpose rotation; dx = bf16(R^T g).
//!
//! Each is checked against an f64 reference that rounds at exactly those points: every output element whose
//! reference is not within 1e-5 (relative) of a bf16 rounding midpoint must equal the reference's rounding bit
//! for bit. The same check applied to the old two-op composition (which rounds the intermediate into the bf16
//! scratch) must fail, which shows it can tell one extra rounding point. On F32 buffers the fused op is the
//! two ops exactly (the strict f32 path keeps its bits).

mod common;

use common::TestRng;
use nc_core::backend::bf16::{is_bf16, round_bf16};
use nc_core::backend::cpu::{CpuBackend, CpuBuf};
use nc_core::backend::{
    rotary_qknorm_backward_unfused, rotary_qknorm_forward_unfused, Backend, Heads, Storage, View, ViewMut,
};
use nc_core::config::RMSNORM_EPS;
use nc_core::model::init::rotary_table;

struct Case {
    batch: usize,
    t: usize,
    heads: usize,
    hd: usize,
    pos0: usize,
}

const CASES: [Case; 3] = [
    Case {
        batch: 2,
        t: 5,
        heads: 3,
        hd: 64,
        pos0: 0,
    },
    Case {
        batch: 1,
        t: 7,
        heads: 2,
        hd: 128,
        pos0: 9,
    },
    Case {
        batch: 3,
        t: 4,
        heads: 4,
        hd: 16,
        pos0: 2,
    },
];

impl Case {
    fn shape(&self) -> Heads {
        Heads::new(self.batch, self.t, self.heads, self.hd).from_position(self.pos0)
    }
    fn len(&self) -> usize {
        self.batch * self.t * self.heads * self.hd
    }
    fn units(&self) -> usize {
        self.batch * self.t * self.heads
    }
    fn max_pos(&self) -> usize {
        self.pos0 + self.t + 3
    }
    /// (cos, sin) at the position of (row, head) unit `u`, pair j, as the f32 table holds them.
    fn cos_sin(&self, table: &[f32], u: usize, j: usize) -> (f64, f64) {
        let half = self.hd / 2;
        let p = self.pos0 + (u / self.heads) % self.t;
        let cos = table[p * half + j] as f64;
        let sin = table[self.max_pos() * half + p * half + j] as f64;
        (cos, sin)
    }
}

fn bf16_values(rng: &mut TestRng, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| round_bf16((rng.normal() * scale) as f32)).collect()
}

/// Forward in f64 with no rounding: (y before its bf16 store, rstd).
fn reference_forward(c: &Case, x: &[f32], table: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let (hd, half) = (c.hd, c.hd / 2);
    let mut y = vec![0.0f64; c.len()];
    let mut rstd = vec![0.0f64; c.units()];
    for u in 0..c.units() {
        let xh = &x[u * hd..(u + 1) * hd];
        let mut r = vec![0.0f64; hd];
        for j in 0..half {
            let (cos, sin) = c.cos_sin(table, u, j);
            let (a, b) = (xh[j] as f64, xh[j + half] as f64);
            r[j] = a * cos + b * sin;
            r[j + half] = -a * sin + b * cos;
        }
        let ms = r.iter().map(|v| v * v).sum::<f64>() / hd as f64;
        let s = 1.0 / (ms + RMSNORM_EPS as f64).sqrt();
        rstd[u] = s;
        for (o, v) in y[u * hd..(u + 1) * hd].iter_mut().zip(&r) {
            *o = v * s;
        }
    }
    (y, rstd)
}

/// Backward in f64 from the stored y (bf16), rstd (f32) and dy (bf16): dx before its bf16 store.
fn reference_backward(c: &Case, y: &[f32], rstd: &[f32], dy: &[f32], table: &[f32]) -> Vec<f64> {
    let (hd, half) = (c.hd, c.hd / 2);
    let mut dx = vec![0.0f64; c.len()];
    for u in 0..c.units() {
        let (yh, dyh) = (&y[u * hd..(u + 1) * hd], &dy[u * hd..(u + 1) * hd]);
        let mean = yh.iter().zip(dyh).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / hd as f64;
        let s = rstd[u] as f64;
        let g: Vec<f64> = yh
            .iter()
            .zip(dyh)
            .map(|(&a, &b)| s * (b as f64 - a as f64 * mean))
            .collect();
        for j in 0..half {
            let (cos, sin) = c.cos_sin(table, u, j);
            // The transpose of the forward's rotation [[c, s], [-s, c]].
            dx[u * hd + j] = g[j] * cos - g[j + half] * sin;
            dx[u * hd + j + half] = g[j] * sin + g[j + half] * cos;
        }
    }
    dx
}

/// Elements that disagree with the rounded reference, among those whose reference is not within 1e-5
/// (relative) of a rounding midpoint (where f32 and f64 arithmetic may round either way), and how many were
/// skipped as too close to call.
fn mismatches(got: &[f32], reference: &[f64]) -> (usize, usize) {
    assert_eq!(got.len(), reference.len());
    let (mut bad, mut skipped) = (0, 0);
    for (&g, &r) in got.iter().zip(reference) {
        assert!(is_bf16(g), "{g} is not a bf16 value");
        let (lo, hi) = (
            round_bf16((r * (1.0 - 1e-5)) as f32),
            round_bf16((r * (1.0 + 1e-5)) as f32),
        );
        if lo != hi {
            skipped += 1;
        } else if g.to_bits() != lo.to_bits() {
            bad += 1;
        }
    }
    (bad, skipped)
}

fn assert_rounds_once(what: &str, got: &[f32], reference: &[f64]) {
    let (bad, skipped) = mismatches(got, reference);
    assert!(
        skipped * 20 < got.len(),
        "{what}: {skipped} of {} too close to call",
        got.len()
    );
    assert_eq!(
        bad,
        0,
        "{what}: {bad} of {} elements are not the reference rounded once",
        got.len()
    );
}

/// The old composition's extra rounding point shows: clearly more mismatches than the tolerance of 0.
fn assert_detects_double_rounding(what: &str, got: &[f32], reference: &[f64]) {
    let (bad, _) = mismatches(got, reference);
    assert!(
        bad * 50 > got.len(),
        "{what}: the check does not see an extra rounding point ({bad} of {} differ)",
        got.len()
    );
}

struct Inputs {
    x: CpuBuf,
    dy: CpuBuf,
    table: CpuBuf,
}

fn inputs(c: &Case, seed: u64) -> Inputs {
    let mut rng = TestRng(seed);
    Inputs {
        x: CpuBuf::with_storage(bf16_values(&mut rng, c.len(), 1.5), Storage::Bf16),
        dy: CpuBuf::with_storage(bf16_values(&mut rng, c.len(), 1.0), Storage::Bf16),
        table: CpuBuf::f32(rotary_table(c.max_pos(), c.hd)),
    }
}

/// Which implementation runs: the backend's fused op, or the trait's default of two unfused calls.
#[derive(Clone, Copy)]
enum Path {
    Fused,
    Unfused,
}

/// The forward by `path` from `x` (copied: the op uses it as scratch) into a new y stored as `st` and an f32
/// rstd: (y, rstd).
fn forward(be: &CpuBackend, path: Path, c: &Case, x: &CpuBuf, table: &CpuBuf, st: Storage) -> (CpuBuf, CpuBuf) {
    let mut x = x.clone();
    let (mut y, mut rstd) = (be.alloc_as(c.len(), st), be.alloc(c.units()));
    let (xv, tv, yv, rv) = (
        ViewMut::all(&mut x),
        View::all(table),
        ViewMut::all(&mut y),
        ViewMut::all(&mut rstd),
    );
    let shape = c.shape();
    match path {
        Path::Fused => be.rotary_qknorm_forward(xv, shape, tv, RMSNORM_EPS, yv, rv),
        Path::Unfused => rotary_qknorm_forward_unfused(be, xv, shape, tv, RMSNORM_EPS, yv, rv),
    }
    (y, rstd)
}

/// The backward by `path` into a new dx stored as `st`.
#[allow(clippy::too_many_arguments)]
fn backward(
    be: &CpuBackend,
    path: Path,
    c: &Case,
    y: &CpuBuf,
    rstd: &CpuBuf,
    dy: &CpuBuf,
    table: &CpuBuf,
    st: Storage,
) -> CpuBuf {
    let mut dx = be.alloc_as(c.len(), st);
    let (yv, rv, dyv, tv, dxv) = (
        View::all(y),
        View::all(rstd),
        View::all(dy),
        View::all(table),
        ViewMut::all(&mut dx),
    );
    let shape = c.shape();
    match path {
        Path::Fused => be.rotary_qknorm_backward(yv, rv, dyv, shape, tv, dxv),
        Path::Unfused => rotary_qknorm_backward_unfused(be, yv, rv, dyv, shape, tv, dxv),
    }
    dx
}

/// Each case's inputs (seed `seed0` + the case's index) and the fused forward on them in Bf16 buffers:
/// (index, case, inputs, y, rstd).
fn fused_forwards(be: &CpuBackend, seed0: u64) -> impl Iterator<Item = (usize, &Case, Inputs, CpuBuf, CpuBuf)> + '_ {
    CASES.iter().enumerate().map(move |(i, c)| {
        let inp = inputs(c, seed0 + i as u64);
        let (y, rstd) = forward(be, Path::Fused, c, &inp.x, &inp.table, Storage::Bf16);
        (i, c, inp, y, rstd)
    })
}

#[test]
fn fused_forward_rounds_only_the_normalized_output() {
    let be = CpuBackend::new();
    for (i, c, inp, y, rstd) in fused_forwards(&be, 100) {
        let (want_y, want_rstd) = reference_forward(c, &inp.x.0, &inp.table.0);
        assert_eq!(CpuBackend::storage(&rstd), Storage::F32);
        for (u, (&g, &w)) in rstd.0.iter().zip(&want_rstd).enumerate() {
            assert!(((g as f64 - w) / w).abs() < 1e-6, "case {i} rstd[{u}]: {g} vs {w}");
        }
        assert_rounds_once(&format!("case {i} forward y"), &y.0, &want_y);

        // The old two ops round the rotated value into the bf16 scratch first: the check must see it.
        let (y2, _) = forward(&be, Path::Unfused, c, &inp.x, &inp.table, Storage::Bf16);
        assert_detects_double_rounding(&format!("case {i} two-op forward"), &y2.0, &want_y);
    }
}

#[test]
fn fused_backward_rounds_only_the_projection_gradient() {
    let be = CpuBackend::new();
    for (i, c, inp, y, rstd) in fused_forwards(&be, 200) {
        let dx = backward(&be, Path::Fused, c, &y, &rstd, &inp.dy, &inp.table, Storage::Bf16);
        let want = reference_backward(c, &y.0, &rstd.0, &inp.dy.0, &inp.table.0);
        assert_rounds_once(&format!("case {i} backward dx"), &dx.0, &want);

        // The old two ops round g into the bf16 dx before rotating it.
        let dx2 = backward(&be, Path::Unfused, c, &y, &rstd, &inp.dy, &inp.table, Storage::Bf16);
        assert_detects_double_rounding(&format!("case {i} two-op backward"), &dx2.0, &want);
    }
}

/// On F32 buffers the fused op is the two ops bit for bit (the strict f32 path is unchanged).
#[test]
fn on_f32_buffers_the_fused_op_is_the_two_ops_exactly() {
    let be = CpuBackend::new();
    let c = &CASES[1];
    let mut rng = TestRng(3);
    let x0: Vec<f32> = (0..c.len()).map(|_| rng.normal() as f32).collect();
    let dy: Vec<f32> = (0..c.len()).map(|_| rng.normal() as f32).collect();
    let (table, dy, x) = (
        CpuBuf::f32(rotary_table(c.max_pos(), c.hd)),
        CpuBuf::f32(dy),
        CpuBuf::f32(x0),
    );

    let (y, rstd) = forward(&be, Path::Fused, c, &x, &table, Storage::F32);
    let (y2, rstd2) = forward(&be, Path::Unfused, c, &x, &table, Storage::F32);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&y.0), bits(&y2.0));
    assert_eq!(bits(&rstd.0), bits(&rstd2.0));

    let dx = backward(&be, Path::Fused, c, &y, &rstd, &dy, &table, Storage::F32);
    let dx2 = backward(&be, Path::Unfused, c, &y, &rstd, &dy, &table, Storage::F32);
    assert_eq!(bits(&dx.0), bits(&dx2.0));
}
