//! A test backend that computes exactly as the CPU backend but, like a GPU backend, does not expose its
//! buffers as host slices. It lets CI, which has no GPU, exercise every path the training loop takes for a
//! device backend (the optimizer on the backend's ops, the trait's default optimizer ops, checkpoints
//! through download and upload) and compare it with the CPU path.

use super::cpu::{CpuBackend, CpuBuf, CpuIds};
use super::{Backend, Gemm, View, ViewMut};

/// The CPU backend with its host access hidden (`host_slice` answers None, as a device's does). The second
/// field, when set, records the shape of every GEMM and cross-entropy launch (tests that pin launch shapes).
#[derive(Debug, Clone, Default)]
pub struct DeviceLikeCpu(pub CpuBackend, pub Option<LaunchLog>);

/// A shared record of launches, in call order.
pub type LaunchLog = std::sync::Arc<std::sync::Mutex<Vec<Launch>>>;

/// One recorded launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// One `matmul` of this shape.
    Matmul(Gemm),
    /// One `softcap_cross_entropy` over `rows` rows of `vocab` logits.
    CrossEntropy { rows: usize, vocab: usize },
}

impl DeviceLikeCpu {
    /// A DeviceLikeCpu that records its launches into the returned log.
    pub fn recording() -> (Self, LaunchLog) {
        let log = LaunchLog::default();
        (DeviceLikeCpu(CpuBackend::new(), Some(log.clone())), log)
    }
    fn record(&self, launch: Launch) {
        if let Some(log) = &self.1 {
            log.lock().expect("launch log").push(launch);
        }
    }
}

/// Everything goes to the CPU backend but the host slices (hidden: the trait's answer for a device, None) and
/// the launches it records (`delegate` forwards the rest, the fused and optimizer ops included).
impl super::delegate::Delegate for DeviceLikeCpu {
    type Inner = CpuBackend;
    fn inner(&self) -> &CpuBackend {
        &self.0
    }
    fn host_slice(_: &CpuBuf) -> Option<&[f32]> {
        None
    }
    fn host_slice_mut(_: &mut CpuBuf) -> Option<&mut [f32]> {
        None
    }
    fn matmul(&self, shape: Gemm, a: View<'_, CpuBackend>, b: View<'_, CpuBackend>, c: ViewMut<'_, CpuBackend>) {
        self.record(Launch::Matmul(shape));
        self.0.matmul(shape, a, b, c)
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
        self.record(Launch::CrossEntropy { rows, vocab });
        self.0
            .softcap_cross_entropy(logits, rows, vocab, cap, targets, target_off, losses, grad_scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::tests::values;
    use crate::backend::AdamwStep;

    fn buf<B: Backend>(be: &B, xs: &[f32]) -> B::Buf {
        let mut b = be.alloc(xs.len());
        be.upload(ViewMut::all(&mut b), xs);
        b
    }

    fn host<B: Backend>(be: &B, b: &B::Buf) -> Vec<f32> {
        let mut out = vec![0.0; B::buf_len(b)];
        be.download(View::all(b), &mut out);
        out
    }

    /// Runs the optimizer ops on a sub-view (offset 3) of each buffer, so the defaults' view handling is
    /// checked too; returns every buffer afterwards and the sum of squares.
    fn run_ops<B: Backend>(be: &B) -> (Vec<Vec<f32>>, f64) {
        let n = 37;
        let (mut p, g, mut m, mut v) = (
            buf(be, &values(n + 5, 1)),
            buf(be, &values(n + 5, 2)),
            buf(be, &values(n + 5, 3)),
            buf(be, &values(n + 5, 4)),
        );
        let mut u = buf(be, &vec![f32::NAN; n + 5]);
        // v must be non-negative for AdamW
        let vs: Vec<f32> = values(n + 5, 4).iter().map(|x| x * x).collect();
        be.upload(ViewMut::all(&mut v), &vs);
        be.muon_momentum(
            View::at(&g, 3, n),
            ViewMut::at(&mut m, 3, n),
            ViewMut::at(&mut u, 3, n),
            0.9,
        );
        be.axpby(0.5, View::at(&g, 3, n), -2.0, ViewMut::at(&mut p, 3, n));
        be.axpby(3.0, View::at(&g, 3, n), 0.0, ViewMut::at(&mut u, 0, n));
        be.scale(ViewMut::at(&mut p, 1, n), 0.25);
        let h = AdamwStep {
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-10,
            decay: 0.999,
            step: 0.01,
            inv_bc2: 20.0,
        };
        be.adamw(
            ViewMut::at(&mut p, 3, n),
            View::at(&g, 3, n),
            ViewMut::at(&mut m, 3, n),
            ViewMut::at(&mut v, 3, n),
            h,
        );
        let ss = be.sum_squares(View::at(&p, 2, n));
        (
            vec![host(be, &p), host(be, &g), host(be, &m), host(be, &v), host(be, &u)],
            ss,
        )
    }

    /// The trait's default optimizer ops (download, compute, upload) equal the CPU's in-place ones bit for bit.
    #[test]
    fn default_optimizer_ops_equal_the_cpus() {
        let (cpu, cpu_ss) = run_ops(&CpuBackend::new());
        let (dev, dev_ss) = run_ops(&DeviceLikeCpu::default());
        assert_eq!(cpu_ss.to_bits(), dev_ss.to_bits());
        for (i, (a, b)) in cpu.iter().zip(&dev).enumerate() {
            let (a, b): (Vec<u32>, Vec<u32>) = (
                a.iter().map(|x| x.to_bits()).collect(),
                b.iter().map(|x| x.to_bits()).collect(),
            );
            assert_eq!(a, b, "buffer {i} differs");
        }
        // and the ops did something: p changed from its initial values
        assert_ne!(cpu[0], values(42, 1));
    }
}
