//! The bf16 tensor-core flash attention kernels (kernels-ptx/cuda/flash_attention.cu) as the CUDA backend
//! launches them: which entry for a head dimension, the grid of each launch, and the checks a call must pass.
//!
//! The kernels take bf16 q/k/v/out/dout and write bf16 out/dq/dk/dv, with f32 lse and delta, in the layouts
//! of `AttnShape` (q, out (B, Tq, H, D); k, v (B, Tk, Hkv, D); lse, delta (B, H, Tq)). They are built for
//! head_dim 64 and 128; other head dims keep the f32 kernels. The backward is two launches on the backend's
//! stream: dq (which also writes delta) and then dk/dv (which reads it).
//!
//! Until the backend's buffers carry a bf16 storage tag (the bf16 engine's work), the entry points take
//! device addresses: `unsafe`, the caller vouches that each one holds its tensor in bf16 (or f32 for lse and
//! delta) for the given shape. The planning half (`flash_forward_launch`, `flash_backward_launches`) is plain
//! Rust and unit-tested without a GPU. Nothing here has run on a GPU: unverified.

use super::launch::{int, Arg};
use super::CudaBackend;
use crate::backend::AttnShape;
use crate::error::{NcError, Result};
use nc_kernels::{Kernel, LaunchDims};

/// One kernel launch: the entry and its grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashLaunch {
    pub kernel: Kernel,
    pub dims: LaunchDims,
}

/// Device addresses of a flash forward's tensors.
#[derive(Debug, Clone, Copy)]
pub struct FlashForwardPtrs {
    /// bf16 (B, Tq, H, D).
    pub q: u64,
    /// bf16 (B, Tk, Hkv, D).
    pub k: u64,
    /// bf16 (B, Tk, Hkv, D).
    pub v: u64,
    /// bf16 (B, Tq, H, D), written.
    pub out: u64,
    /// f32 (B, H, Tq), written.
    pub lse: u64,
}

/// Device addresses of a flash backward's tensors (training shape: Tq = Tk = T).
#[derive(Debug, Clone, Copy)]
pub struct FlashBackwardPtrs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    /// The forward's bf16 out and f32 lse.
    pub out: u64,
    pub lse: u64,
    /// bf16 (B, T, H, D).
    pub dout: u64,
    /// f32 (B, H, T) scratch: written by the dq launch, read by the dk/dv launch.
    pub delta: u64,
    /// bf16 outputs: dq (B, T, H, D), dk and dv (B, T, Hkv, D).
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
}

/// Whether the flash kernels take this shape: head_dim 64 or 128, n_kv_head dividing n_head, queries
/// inside the keys, and every count within the kernels' 32-bit ints.
fn check_shape(s: &AttnShape) -> Result<()> {
    if nc_kernels::flash_kernels(s.head_dim).is_none() {
        return Err(NcError::new(format!(
            "flash attention is built for head_dim {:?}, not {}: use the f32 attention kernels",
            nc_kernels::FLASH_HEAD_DIMS,
            s.head_dim
        )));
    }
    if s.n_kv_head == 0 || !s.n_head.is_multiple_of(s.n_kv_head) {
        return Err(NcError::new(format!(
            "flash attention: n_kv_head {} must divide n_head {}",
            s.n_kv_head, s.n_head
        )));
    }
    if s.q_pos0 + s.tq > s.tk {
        return Err(NcError::new(format!(
            "flash attention: queries {}..{} reach past the {} keys",
            s.q_pos0,
            s.q_pos0 + s.tq,
            s.tk
        )));
    }
    // Element offsets are formed in 64 bits inside the kernels; the counts themselves are ints.
    for (what, n) in [("batch", s.batch), ("tk", s.tk), ("n_head", s.n_head)] {
        if i32::try_from(n).is_err() {
            return Err(NcError::new(format!(
                "flash attention: {what} = {n} does not fit a 32-bit int"
            )));
        }
    }
    Ok(())
}

/// The forward launch for `s` (training or KV-cache decoding).
pub fn flash_forward_launch(s: &AttnShape) -> Result<FlashLaunch> {
    check_shape(s)?;
    let kernels = nc_kernels::flash_kernels(s.head_dim).expect("checked");
    Ok(FlashLaunch {
        kernel: kernels.forward,
        dims: nc_kernels::flash_forward_dims(s.batch, s.n_head, s.tq),
    })
}

/// The backward's two launches for `s`, in order: dq (writes delta), then dk/dv. Training shape only.
pub fn flash_backward_launches(s: &AttnShape) -> Result<[FlashLaunch; 2]> {
    check_shape(s)?;
    if s.tq != s.tk || s.q_pos0 != 0 {
        return Err(NcError::new(format!(
            "flash attention backward takes the training shape only (tq = tk, q_pos0 = 0), got tq {} tk {} \
             q_pos0 {}",
            s.tq, s.tk, s.q_pos0
        )));
    }
    let kernels = nc_kernels::flash_kernels(s.head_dim).expect("checked");
    Ok([
        FlashLaunch {
            kernel: kernels.backward_dq,
            dims: nc_kernels::flash_dq_dims(s.batch, s.n_head, s.tq),
        },
        FlashLaunch {
            kernel: kernels.backward_dkdv,
            dims: nc_kernels::flash_dkdv_dims(s.batch, s.n_kv_head, s.tq),
        },
    ])
}

/// The kernels move rows in 16-byte chunks: every tensor must start 16-byte aligned.
fn check_aligned(ptrs: &[(&str, u64)]) -> Result<()> {
    for &(what, p) in ptrs {
        if !p.is_multiple_of(16) {
            return Err(NcError::new(format!(
                "flash attention: {what} at device address {p:#x} is not 16-byte aligned (a bf16 view must start \
                 at a multiple of 8 elements)"
            )));
        }
    }
    Ok(())
}

fn scale(head_dim: usize) -> Arg {
    // Exactly the CPU backend's and the f32 kernels' 1/sqrt(D).
    Arg::F32(1.0 / (head_dim as f32).sqrt())
}

impl CudaBackend {
    /// Queues the bf16 flash forward for `s` on the backend's stream. Errors (nothing launched) when the
    /// shape is not one the kernels take or a pointer is misaligned.
    ///
    /// # Safety
    /// Each address must be a live device allocation of this backend's context holding its tensor for `s`
    /// (bf16 for q/k/v/out, f32 for lse), and out/lse must not overlap the inputs.
    pub unsafe fn flash_attention_forward_bf16(&self, s: AttnShape, p: FlashForwardPtrs) -> Result<()> {
        let launch = flash_forward_launch(&s)?;
        check_aligned(&[("q", p.q), ("k", p.k), ("v", p.v), ("out", p.out)])?;
        if s.batch == 0 || s.tq == 0 || s.n_head == 0 {
            return Ok(());
        }
        let args = [
            Arg::Ptr(p.q),
            Arg::Ptr(p.k),
            Arg::Ptr(p.v),
            Arg::Ptr(p.out),
            Arg::Ptr(p.lse),
            int(s.batch, "batch"),
            int(s.tq, "tq"),
            int(s.tk, "tk"),
            int(s.n_head, "n_head"),
            int(s.n_kv_head, "n_kv_head"),
            int(s.q_pos0, "q_pos0"),
            scale(s.head_dim),
        ];
        self.launch(launch.kernel, launch.dims, &args);
        Ok(())
    }

    /// Queues the bf16 flash backward for `s` (dq and delta, then dk and dv) on the backend's stream.
    /// Deterministic: every output element is written once, by one block, in a fixed order.
    ///
    /// # Safety
    /// As `flash_attention_forward_bf16`: live allocations holding their tensors for `s` (bf16 q, k, v, out,
    /// dout, dq, dk, dv; f32 lse and delta), outputs not overlapping inputs.
    pub unsafe fn flash_attention_backward_bf16(&self, s: AttnShape, p: FlashBackwardPtrs) -> Result<()> {
        let [dq_launch, dkdv_launch] = flash_backward_launches(&s)?;
        check_aligned(&[
            ("q", p.q),
            ("k", p.k),
            ("v", p.v),
            ("out", p.out),
            ("dout", p.dout),
            ("dq", p.dq),
            ("dk", p.dk),
            ("dv", p.dv),
        ])?;
        if s.batch == 0 || s.tq == 0 || s.n_head == 0 {
            return Ok(());
        }
        let (batch, t, n_head, n_kv_head) = (
            int(s.batch, "batch"),
            int(s.tq, "t"),
            int(s.n_head, "n_head"),
            int(s.n_kv_head, "n_kv_head"),
        );
        let (q, k, v, lse, dout, delta) = (
            Arg::Ptr(p.q),
            Arg::Ptr(p.k),
            Arg::Ptr(p.v),
            Arg::Ptr(p.lse),
            Arg::Ptr(p.dout),
            Arg::Ptr(p.delta),
        );
        let args = [
            q,
            k,
            v,
            Arg::Ptr(p.out),
            dout,
            lse,
            delta,
            Arg::Ptr(p.dq),
            batch,
            t,
            n_head,
            n_kv_head,
            scale(s.head_dim),
        ];
        self.launch(dq_launch.kernel, dq_launch.dims, &args);
        let args = [
            q,
            k,
            v,
            dout,
            lse,
            delta,
            Arg::Ptr(p.dk),
            Arg::Ptr(p.dv),
            batch,
            t,
            n_head,
            n_kv_head,
            scale(s.head_dim),
        ];
        self.launch(dkdv_launch.kernel, dkdv_launch.dims, &args);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_picks_the_entry_of_the_head_dim_and_covers_every_row() {
        for (d, name) in [(128, "nc_flash_forward_d128_bf16"), (64, "nc_flash_forward_d64_bf16")] {
            let s = AttnShape::causal(4, 2048, 10, 5, d);
            let l = flash_forward_launch(&s).unwrap();
            assert_eq!(l.kernel.name, name);
            assert_eq!(l.dims.grid, (32, 10, 4));
            assert_eq!(l.dims.block, (128, 1, 1));
        }
        // Decoding: one row at position 99 of 100 keys.
        let s = AttnShape {
            tq: 1,
            tk: 100,
            q_pos0: 99,
            ..AttnShape::causal(2, 1, 8, 2, 128)
        };
        assert_eq!(flash_forward_launch(&s).unwrap().dims.grid, (1, 8, 2));
    }

    #[test]
    fn backward_is_dq_then_dkdv_over_kv_heads() {
        let s = AttnShape::causal(2, 130, 6, 2, 64);
        let [dq, dkdv] = flash_backward_launches(&s).unwrap();
        assert_eq!(dq.kernel.name, "nc_flash_backward_dq_d64_bf16");
        assert_eq!(dq.dims.grid, (3, 6, 2));
        assert_eq!(dkdv.kernel.name, "nc_flash_backward_dkdv_d64_bf16");
        assert_eq!(dkdv.dims.grid, (3, 2, 2));
    }

    #[test]
    fn unsupported_shapes_say_why() {
        let err = |s: AttnShape| flash_forward_launch(&s).unwrap_err().message;
        assert!(err(AttnShape::causal(1, 8, 2, 2, 96)).contains("head_dim"));
        assert!(err(AttnShape::causal(1, 8, 6, 4, 64)).contains("must divide"));
        assert!(err(AttnShape::causal(1, 8, 6, 0, 64)).contains("must divide"));
        let past = AttnShape {
            q_pos0: 5,
            ..AttnShape::causal(1, 8, 2, 2, 64)
        };
        assert!(err(past).contains("reach past"));
        let decode = AttnShape {
            tq: 1,
            tk: 9,
            q_pos0: 8,
            ..AttnShape::causal(1, 1, 2, 2, 64)
        };
        let e = flash_backward_launches(&decode).unwrap_err().message;
        assert!(e.contains("training shape"), "{e}");
    }

    #[test]
    fn misaligned_pointers_are_refused() {
        assert!(check_aligned(&[("q", 0x1000), ("k", 0x2010)]).is_ok());
        let e = check_aligned(&[("q", 0x1000), ("k", 0x2008)]).unwrap_err().message;
        assert!(e.contains("k at device address 0x2008"), "{e}");
    }
}
