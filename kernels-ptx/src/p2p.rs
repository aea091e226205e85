//! The peer-to-peer ring's kernels (`cuda/p2p_ring.cu`, UNVERIFIED: never run on a GPU), kept apart from
//! `MODULES`/`ALL`: the CUDA backend does not load them; `nc_comm::P2pRing` does, on its own stream.
//!
//! Parameter lists (p = pointer, u = u64, i = i32), the contract with `nc_comm::p2p`:
//! - `REDUCE_SCATTER_F32` / `REDUCE_SCATTER_BF16`: (p plan, i n_ops, i last_step, p in, p work, p out,
//!   p my_data, p prev_data, p my_signal, p prev_signal, p next_signal, u send_seq, u recv_seq, i slots,
//!   u slot_bytes, i prev_rank, i next_rank, u timeout_ns)
//! - `ALL_GATHER`: (p plan, i n_ops, p buf, i elem_bytes, p my_data, p prev_data, p my_signal, p prev_signal,
//!   p next_signal, u send_seq, u recv_seq, i slots, u slot_bytes, i prev_rank, i next_rank, u timeout_ns)
//! - `ONE_SHOT_F32` / `ONE_SHOT_BF16`: (p in, p out, u n, p peers, i n_ranks, i rank, u epoch,
//!   u region_bytes, u timeout_ns)
//!
//! Launch: grid (blocks, 1, 1) with 1 <= blocks <= `MAX_BLOCKS`, block (`THREADS`, 1, 1), no dynamic shared
//! memory. The constants below equal the `#define`s of the source (tests/p2p_ptx.rs checks).

use crate::Kernel;

/// The PTX text of `cuda/p2p_ring.cu`.
pub const PTX: &str = include_str!("../ptx/p2p_ring.ptx");
pub const MODULE: &str = "p2p_ring";

const fn kernel(name: &'static str) -> Kernel {
    Kernel {
        module: MODULE,
        ptx: PTX,
        name,
    }
}

pub const REDUCE_SCATTER_F32: Kernel = kernel("nc_p2p_reduce_scatter_f32");
pub const REDUCE_SCATTER_BF16: Kernel = kernel("nc_p2p_reduce_scatter_bf16");
pub const ALL_GATHER: Kernel = kernel("nc_p2p_all_gather");
pub const ONE_SHOT_F32: Kernel = kernel("nc_p2p_one_shot_f32");
pub const ONE_SHOT_BF16: Kernel = kernel("nc_p2p_one_shot_bf16");
/// Every kernel of the module, with its parameter letters (p pointer, u u64, i i32).
pub const ALL: [(Kernel, &str); 5] = [
    (REDUCE_SCATTER_F32, "piippppppppuuiuiiu"),
    (REDUCE_SCATTER_BF16, "piippppppppuuiuiiu"),
    (ALL_GATHER, "pipipppppuuiuiiu"),
    (ONE_SHOT_F32, "ppupiiuuu"),
    (ONE_SHOT_BF16, "ppupiiuuu"),
];

/// Threads per block.
pub const THREADS: u32 = 512;
/// Most blocks (channels) one launch may use; the flags of the signal area are laid out for this many.
pub const MAX_BLOCKS: u32 = 16;
/// u64s between two flags (one 64-byte line each).
pub const FLAG_STRIDE: usize = 8;
/// Flags per block: SENT, CONSUMED, POSTED, DONE.
pub const FLAGS_PER_BLOCK: usize = 4;
/// Index (in u64s) of the error word in a signal area.
pub const ERROR_WORD: usize = MAX_BLOCKS as usize * FLAGS_PER_BLOCK * FLAG_STRIDE;
/// u64s of a signal area.
pub const SIGNAL_U64S: usize = ERROR_WORD + FLAG_STRIDE;
/// Bit of a plan word 1 that marks a receive.
pub const OP_RECV: u64 = 1 << 48;
/// A block's part of a slice is a multiple of this many elements.
pub const PART_ALIGN: usize = 8;
