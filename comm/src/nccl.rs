//! Collectives over NCCL (through cudarc), for GPUs in one machine or many.
//!
//! Run on simulated GPUs over the simulator's NCCL stand-in (sim/nccl/, bin/tests/sim_multi_nccl.rs), not yet
//! on a GPU with NVIDIA's NCCL: the first GPU machine checks it.
//!
//! Finding NCCL: cudarc loads `libnccl.so` (or `libnccl.so.<CUDA major>`), not the `libnccl.so.2` that the
//! `nvidia-nccl-cu13` pip wheel ships. `nccl_available()` probes for it; `NcclRing::join` with more than
//! one rank and no NCCL is an error that says how to provide it (see `MISSING_NCCL`).
//!
//! The unique id travels through the `Rendezvous` (rank 0 creates it, broadcasts its 128 bytes). cudarc's
//! `Comm` is not `Send`; `NcclRing` is, because `Collective` requires it: NCCL allows a communicator to be
//! used from any thread as long as no two calls overlap, which `&mut self` guarantees, and every call first
//! makes the stream's CUDA context current on the calling thread.
//!
//! Two levels:
//! - device buffers (`reduce_scatter_device`, `all_gather_device`, `all_reduce_device`, any `NcclType`,
//!   bf16 included): what the CUDA training path uses. NCCL's own bf16 sums round at every hop and take
//!   their own order; the f32 ones are not in `schedule::sum_order` either, but all ranks get the same bits
//!   from a reduce-scatter + all-gather, since the owner's result is what is gathered.
//! - `Collective` on host slices: stages through device memory. bf16 reduce-scatter uses the trait's
//!   default (f32 sums, rounded once), as the contract asks. Chunks of unequal size are padded to the
//!   largest, since NCCL's reduce-scatter and all-gather take equal counts per rank.
//! - raw device addresses (`reduce_in_place_f32`, `broadcast_in_place_f32`, `group_start`/`group_end`): what
//!   the device ZeRO-1 exchange (nc-core `train::zero1_nccl`) queues on this ring's stream, on buffers of the
//!   engine's own allocator (not cudarc slices).
//!
//! The communicator is held raw (`ncclComm_t`), not as cudarc's `Comm`, because aborting it from another
//! thread needs the handle: with more than one rank, `join` starts a watchdog thread (`watchdog.rs`) that,
//! every `WATCHDOG_PERIOD`, ends the run with one line naming this rank and the cause when
//! - a peer's process is gone (the rendezvous's `PeerWatch`): exit code `EXIT_PEER_GONE`;
//! - NCCL reports an asynchronous error (`ncclCommGetAsyncError`, with `ncclGetLastError`'s text): a failed
//!   transport, a peer NCCL saw leave: `EXIT_NCCL_ERROR`;
//! - a collective queued longer ago than the collective timeout has not completed (NC_COLLECTIVE_TIMEOUT: a
//!   stuck peer, which NCCL itself never reports): `EXIT_COLLECTIVE_TIMEOUT`.
//!
//! Each time it first calls `ncclCommAbort`, which makes this rank's queued and blocked NCCL work return.
//! Without it a rank blocked in a collective whose peer died or hangs would wait forever (NCCL has no
//! timeout). Completion is counted by a host function queued on the stream after each group or ungrouped
//! collective (`CollectiveClock`), not by event queries from the watchdog thread. Dropping the ring stops the
//! watchdog before the communicator is destroyed.

use crate::nccl_watchdog::{describe_result, CollectiveClock, SendComm, Watchdog, Watched};
use crate::partition::{even_bounds, Bounds};
use crate::rendezvous::Rendezvous;
use crate::{bf16, Collective, CommError, Member};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::{result, sys, NcclType};
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use crate::nccl_watchdog::{EXIT_COLLECTIVE_TIMEOUT, EXIT_NCCL_ERROR, EXIT_PEER_GONE, WATCHDOG_PERIOD};
/// How long a collective may take by default before the watchdog ends the run (`NcclRing::join`): rank 0
/// evaluates and saves while the others wait in the next collective, so it is long.
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(1800);

/// What to tell a user whose NCCL cannot be loaded.
pub const MISSING_NCCL: &str = "NCCL was not found: cudarc loads libnccl.so from the library path. Either \
    `pip install nvidia-nccl-cu13`, then `ln -s libnccl.so.2 libnccl.so` inside its nvidia/nccl/lib folder and \
    put that folder on LD_LIBRARY_PATH, or install NCCL with CUDA (e.g. the libnccl2 + libnccl-dev packages) \
    so that libnccl.so is on the loader's path";

/// Whether cudarc can load the NCCL library.
pub fn nccl_available() -> bool {
    // Only tries to dlopen the library candidates; never panics.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// One rank's NCCL communicator, or nothing at world size 1 without NCCL (every collective is then the
/// identity, which is exact for one rank).
pub struct NcclRing {
    member: Member,
    comm: Option<RawComm>,
    stream: Arc<CudaStream>,
    watchdog: Option<Watchdog>,
    /// Counts collectives queued and completed on the stream, for the watchdog's timeout (None without one).
    clock: Option<&'static CollectiveClock>,
    /// Open `group_start`s: collectives inside a group are counted once, at its `group_end`.
    group_depth: Cell<u32>,
    /// An NCCL call returned an error: the communicator is aborted on drop instead of destroyed.
    failed: Cell<bool>,
}

/// An NCCL communicator handle; destroyed on drop (unless the watchdog aborted it).
struct RawComm {
    comm: sys::ncclComm_t,
    /// Set by the watchdog before it aborts the communicator: nothing may use or destroy it after.
    aborted: Arc<AtomicBool>,
}

impl Drop for RawComm {
    fn drop(&mut self) {
        if !self.aborted.load(Ordering::Acquire) {
            // SAFETY: the handle came from ncclCommInitRank and is destroyed once, here.
            let _ = unsafe { result::comm_destroy(self.comm) };
        }
    }
}

// SAFETY: see the module comment: NCCL communicators may be used from any thread, one call at a time,
// which `&mut self` on every collective enforces; the context is bound before each call.
unsafe impl Send for NcclRing {}

impl Drop for NcclRing {
    fn drop(&mut self) {
        if let (true, Some(c)) = (self.failed.get(), &self.comm) {
            // An NCCL call failed: the ranks' sequences of collectives no longer match, so what is queued may
            // never complete. NCCL's rule: abort the communicator (its queued work returns), never destroy it.
            if !c.aborted.swap(true, Ordering::AcqRel) {
                // SAFETY: a live handle; `aborted` keeps RawComm from destroying it.
                let _ = unsafe { result::comm_abort(c.comm) };
            }
        }
        // The queued collectives finish with the watchdog still watching: a peer that dies meanwhile ends this
        // process instead of leaving it waiting here. Then the watchdog stops, before the communicator is
        // destroyed (it must never abort one that is being destroyed).
        let _ = self.stream.synchronize();
        self.watchdog = None;
    }
}

/// What one of cudarc's raw NCCL calls returns.
type NcclCallResult = Result<result::NcclStatus, result::NcclError>;

/// A failed NCCL call, with NCCL's own words for it (`comm` may be null: the call had none).
fn call_err(rank: usize, what: &str, e: result::NcclError, comm: sys::ncclComm_t) -> CommError {
    CommError::at(rank, format!("NCCL {what} failed: {}", describe_result(e.0, comm)))
}

fn nccl_err(rank: usize, what: &str, e: impl std::fmt::Debug) -> CommError {
    CommError::at(rank, format!("NCCL {what} failed: {e:?}"))
}

impl NcclRing {
    /// Every rank calls it after the rendezvous, with the stream its collectives will run on (its GPU's).
    /// Collectives may take up to `DEFAULT_COLLECTIVE_TIMEOUT`.
    pub fn join(rdv: &mut Rendezvous, stream: Arc<CudaStream>) -> Result<NcclRing, CommError> {
        Self::join_with_timeout(rdv, stream, DEFAULT_COLLECTIVE_TIMEOUT)
    }

    /// `join`, with the time after which a collective that has not completed ends the run (the watchdog's;
    /// nc-train's NC_COLLECTIVE_TIMEOUT).
    pub fn join_with_timeout(
        rdv: &mut Rendezvous,
        stream: Arc<CudaStream>,
        timeout: Duration,
    ) -> Result<NcclRing, CommError> {
        let (rank, world_size) = (rdv.rank(), rdv.world_size());
        let have_nccl = nccl_available();
        // Every rank says whether it found NCCL, so a rank without it fails every rank, by name.
        let found = rdv.all_gather_bytes(&[have_nccl as u8])?;
        if world_size == 1 && !have_nccl {
            return Ok(NcclRing {
                member: Member { rank, world_size },
                comm: None,
                stream,
                watchdog: None,
                clock: None,
                group_depth: Cell::new(0),
                failed: Cell::new(false),
            });
        }
        if let Some(r) = found.iter().position(|f| f.first() != Some(&1)) {
            return Err(CommError::at(rank, format!("rank {r} cannot run NCCL: {MISSING_NCCL}")));
        }
        let id_bytes = if rank == 0 {
            let id = result::get_uniqueid().map_err(|e| call_err(rank, "ncclGetUniqueId", e, std::ptr::null_mut()))?;
            rdv.broadcast_bytes(&id.internal.iter().map(|&c| c as u8).collect::<Vec<u8>>())?
        } else {
            rdv.broadcast_bytes(&[])?
        };
        let internal: [std::ffi::c_char; 128] = id_bytes
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| {
                CommError::at(
                    rank,
                    format!("the NCCL unique id from rank 0 has {} bytes, not 128", id_bytes.len()),
                )
            })?;
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| nccl_err(rank, "binding the CUDA context", e))?;
        let mut handle = std::mem::MaybeUninit::uninit();
        // SAFETY: `handle` is written by NCCL on success; the id is rank 0's, 128 bytes.
        let comm = unsafe {
            result::comm_init_rank(
                handle.as_mut_ptr(),
                world_size as i32,
                sys::ncclUniqueId { internal },
                rank as i32,
            )
            .map_err(|e| call_err(rank, "ncclCommInitRank", e, std::ptr::null_mut()))?;
            handle.assume_init()
        };
        let aborted = Arc::new(AtomicBool::new(false));
        let (watchdog, clock) = if world_size > 1 {
            let clock = CollectiveClock::new();
            let watched = Watched {
                rank,
                peers: rdv.watch(),
                comm: SendComm(comm),
                aborted: aborted.clone(),
                clock,
                timeout,
            };
            (Some(Watchdog::start(watched)?), Some(clock))
        } else {
            (None, None)
        };
        Ok(NcclRing {
            member: Member { rank, world_size },
            comm: Some(RawComm { comm, aborted }),
            stream,
            watchdog,
            clock,
            group_depth: Cell::new(0),
            failed: Cell::new(false),
        })
    }

    /// Whether collectives go through NCCL (false only at world size 1 without NCCL).
    pub fn uses_nccl(&self) -> bool {
        self.comm.is_some()
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The raw handle (context bound to this thread), None without NCCL; an error once the watchdog
    /// aborted it.
    fn comm(&self) -> Result<Option<sys::ncclComm_t>, CommError> {
        let Some(c) = &self.comm else {
            return Ok(None);
        };
        if c.aborted.load(Ordering::Acquire) {
            return Err(CommError::at(
                self.member.rank,
                "NCCL was aborted by the watchdog (its line says why)",
            ));
        }
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| nccl_err(self.member.rank, "binding the CUDA context", e))?;
        Ok(Some(c.comm))
    }

    fn raw_stream(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as sys::cudaStream_t
    }

    /// Counts the collective (or group) just queued for the watchdog's timeout, unless inside a group (the
    /// group counts once, at its end); passes `queued` through.
    fn counted(&self, queued: Result<(), CommError>) -> Result<(), CommError> {
        if queued.is_err() {
            self.failed.set(true);
        }
        queued?;
        match self.clock {
            Some(clock) if self.group_depth.get() == 0 => clock
                .mark(&self.stream)
                .map_err(|e| nccl_err(self.member.rank, "queueing the completion count (cuLaunchHostFunc)", e)),
            _ => Ok(()),
        }
    }

    /// Start an NCCL group: the calls up to `group_end` are launched together (one kernel per group).
    pub fn group_start(&self) -> Result<(), CommError> {
        if self.comm()?.is_some() {
            result::group_start().map_err(|e| call_err(self.member.rank, "ncclGroupStart", e, std::ptr::null_mut()))?;
            self.group_depth.set(self.group_depth.get() + 1);
        }
        Ok(())
    }

    pub fn group_end(&self) -> Result<(), CommError> {
        if self.comm()?.is_some() {
            self.group_depth.set(self.group_depth.get().saturating_sub(1));
            let ended = result::group_end()
                .map(|_| ())
                .map_err(|e| call_err(self.member.rank, "ncclGroupEnd", e, std::ptr::null_mut()));
            self.counted(ended)?;
        }
        Ok(())
    }

    /// Sum `count` f32 at device address `addr` over the ranks into rank `root`'s copy, in place (queued on
    /// this ring's stream; non-root ranks' values are left as they were). The identity without NCCL.
    ///
    /// # Safety
    /// `addr` must hold `count` f32 in this ring's context and stay allocated, and not be written by other
    /// streams, until the work queued on this ring's stream now has run.
    pub unsafe fn reduce_in_place_f32(&self, addr: u64, count: usize, root: usize) -> Result<(), CommError> {
        let Some(comm) = self.comm()? else {
            return Ok(());
        };
        let p = addr as *mut std::ffi::c_void;
        let queued = result::reduce(
            p as *const _,
            p,
            count,
            sys::ncclDataType_t::ncclFloat32,
            sys::ncclRedOp_t::ncclSum,
            root as i32,
            comm,
            self.raw_stream(),
        )
        .map(|_| ())
        .map_err(|e| call_err(self.member.rank, "ncclReduce", e, comm));
        self.counted(queued)
    }

    /// Rank `root`'s `count` f32 at `addr` to every rank's `addr`, in place (queued on this ring's stream).
    ///
    /// # Safety
    /// As `reduce_in_place_f32`.
    pub unsafe fn broadcast_in_place_f32(&self, addr: u64, count: usize, root: usize) -> Result<(), CommError> {
        self.broadcast_in_place(addr, count, root, sys::ncclDataType_t::ncclFloat32, "ncclBroadcast")
    }

    /// Rank `root`'s `count` bf16 at `addr` to every rank's `addr`, in place (queued on this ring's stream):
    /// ZeRO-1's gather of a bf16 working copy, half the bytes of `broadcast_in_place_f32`.
    ///
    /// # Safety
    /// `addr` must hold `count` bf16 (2 bytes each) in this ring's context, otherwise as
    /// `reduce_in_place_f32`.
    pub unsafe fn broadcast_in_place_bf16(&self, addr: u64, count: usize, root: usize) -> Result<(), CommError> {
        self.broadcast_in_place(
            addr,
            count,
            root,
            sys::ncclDataType_t::ncclBfloat16,
            "ncclBroadcast (bf16)",
        )
    }

    /// The in-place broadcast of `count` elements of `dtype` behind both element types; `what` names it in
    /// errors.
    ///
    /// # Safety
    /// As `broadcast_in_place_f32`, for elements of `dtype`.
    unsafe fn broadcast_in_place(
        &self,
        addr: u64,
        count: usize,
        root: usize,
        dtype: sys::ncclDataType_t,
        what: &str,
    ) -> Result<(), CommError> {
        let Some(comm) = self.comm()? else {
            return Ok(());
        };
        let p = addr as *mut std::ffi::c_void;
        let queued = result::broadcast(p as *const _, p, count, dtype, root as i32, comm, self.raw_stream())
            .map(|_| ())
            .map_err(|e| call_err(self.member.rank, what, e, comm));
        self.counted(queued)
    }

    /// `recv` (count c) gets rank `rank`'s sum of `send[rank * c..(rank + 1) * c]`; `send` holds
    /// world_size * c elements. Enqueued on the ring's stream.
    pub fn reduce_scatter_device<T: NcclType + DeviceRepr>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
    ) -> Result<(), CommError> {
        self.check_counts("reduce_scatter_device", ("send", send.len()), recv.len())?;
        let count = recv.len();
        // SAFETY (of the call): both slices live on this ring's stream for at least the counts given.
        self.send_recv(send, recv, "reduce_scatter", |src, dst, c, stream| unsafe {
            result::reduce_scatter(src, dst, count, T::as_nccl_type(), sys::ncclRedOp_t::ncclSum, c, stream)
        })
    }

    /// `recv` (world_size * c elements) gets every rank's `send` (c elements) in rank order.
    pub fn all_gather_device<T: NcclType + DeviceRepr>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
    ) -> Result<(), CommError> {
        self.check_counts("all_gather_device", ("recv", recv.len()), send.len())?;
        let count = send.len();
        // SAFETY (of the call): both slices live on this ring's stream for at least the counts given.
        self.send_recv(send, recv, "all_gather", |src, dst, c, stream| unsafe {
            result::all_gather(src, dst, count, T::as_nccl_type(), c, stream)
        })
    }

    /// Err unless `whole` (named, with its length) holds `part` elements for each rank.
    fn check_counts(&self, what: &str, (whole, whole_len): (&str, usize), part: usize) -> Result<(), CommError> {
        if whole_len == part * self.member.world_size {
            return Ok(());
        }
        Err(CommError::at(
            self.member.rank,
            format!(
                "{what}: {whole} has {whole_len} elements, expected {part} x {} ranks",
                self.member.world_size
            ),
        ))
    }

    /// Enqueues `call(src, dst, comm, stream)`, an NCCL collective from `send` into `recv`, on the ring's
    /// stream; without NCCL (one rank) copies `send` into `recv` (the counts are checked: they are equal).
    fn send_recv<T: DeviceRepr>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
        what: &str,
        call: impl FnOnce(*const c_void, *mut c_void, sys::ncclComm_t, sys::cudaStream_t) -> NcclCallResult,
    ) -> Result<(), CommError> {
        match self.comm()? {
            Some(c) => {
                let (src, _src_done) = send.device_ptr(&self.stream);
                let (dst, _dst_done) = recv.device_ptr_mut(&self.stream);
                let queued = call(src as *const _, dst as *mut _, c, self.raw_stream())
                    .map(|_| ())
                    .map_err(|e| call_err(self.member.rank, what, e, c));
                self.counted(queued)
            }
            None => self
                .stream
                .memcpy_dtod(send, recv)
                .map_err(|e| nccl_err(self.member.rank, "copy", e)),
        }
    }

    /// In-place sum over ranks.
    pub fn all_reduce_device<T: NcclType + DeviceRepr, B: DevicePtrMut<T>>(
        &self,
        buf: &mut B,
    ) -> Result<(), CommError> {
        match self.comm()? {
            Some(c) => {
                let count = buf.len();
                let (ptr, _done) = buf.device_ptr_mut(&self.stream);
                // SAFETY: the buffer lives on this ring's stream for `count` elements.
                let queued = unsafe {
                    result::all_reduce(
                        ptr as *const _,
                        ptr as *mut _,
                        count,
                        T::as_nccl_type(),
                        sys::ncclRedOp_t::ncclSum,
                        c,
                        self.raw_stream(),
                    )
                }
                .map(|_| ())
                .map_err(|e| call_err(self.member.rank, "all_reduce", e, c));
                self.counted(queued)
            }
            None => Ok(()),
        }
    }

    /// Host-staged reduce-scatter or all-gather with chunks padded to the largest.
    fn staged<T: NcclType + DeviceRepr + ValidAsZeroBits + Copy + Default>(
        &mut self,
        buf: &mut [T],
        bounds: &Bounds,
        gather: bool,
        what: &str,
    ) -> Result<(), CommError> {
        bounds.check_call(self.member, buf.len(), what)?;
        let n = self.member.world_size;
        let width = (0..n).map(|r| bounds.range(r).len()).max().unwrap_or(0);
        if n == 1 || width == 0 {
            return Ok(());
        }
        let err = |e| nccl_err(self.member.rank, what, e);
        let mine = bounds.range(self.member.rank);
        if gather {
            let mut own = vec![T::default(); width];
            own[..mine.len()].copy_from_slice(&buf[mine]);
            let send = self.stream.clone_htod(&own).map_err(err)?;
            let mut recv = self.stream.alloc_zeros::<T>(n * width).map_err(err)?;
            self.all_gather_device(&send, &mut recv)?;
            let all = self.stream.clone_dtoh(&recv).map_err(err)?;
            unpad(&all, bounds, width, buf);
        } else {
            let send = self.stream.clone_htod(&pad(buf, bounds, width)).map_err(err)?;
            let mut recv = self.stream.alloc_zeros::<T>(width).map_err(err)?;
            self.reduce_scatter_device(&send, &mut recv)?;
            let out = self.stream.clone_dtoh(&recv).map_err(err)?;
            let len = mine.len();
            buf[mine].copy_from_slice(&out[..len]);
        }
        Ok(())
    }
}

/// `buf` with chunk r moved to `r * width` and the gaps zero (`width` >= every chunk's length): the
/// equal-count layout NCCL's reduce-scatter reads.
fn pad<T: Copy + Default>(buf: &[T], bounds: &Bounds, width: usize) -> Vec<T> {
    let mut padded = vec![T::default(); bounds.world_size() * width];
    for r in 0..bounds.world_size() {
        let range = bounds.range(r);
        padded[r * width..r * width + range.len()].copy_from_slice(&buf[range]);
    }
    padded
}

/// The inverse of `pad`: chunk r of `buf` from `all[r * width..]` (what NCCL's all-gather writes).
fn unpad<T: Copy>(all: &[T], bounds: &Bounds, width: usize, buf: &mut [T]) {
    for r in 0..bounds.world_size() {
        let range = bounds.range(r);
        buf[range.clone()].copy_from_slice(&all[r * width..r * width + range.len()]);
    }
}

impl Collective for NcclRing {
    fn member(&self) -> Member {
        self.member
    }

    fn reduce_scatter_sum(&mut self, buf: &mut [f32], bounds: &Bounds) -> Result<(), CommError> {
        self.staged(buf, bounds, false, "reduce_scatter_sum")
    }

    fn all_gather(&mut self, buf: &mut [f32], bounds: &Bounds) -> Result<(), CommError> {
        self.staged(buf, bounds, true, "all_gather")
    }

    fn all_gather_bf16(&mut self, buf: &mut [bf16], bounds: &Bounds) -> Result<(), CommError> {
        self.staged(buf, bounds, true, "all_gather_bf16")
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        let bounds = even_bounds(buf.len(), self.member.world_size);
        self.reduce_scatter_sum(buf, &bounds)?;
        self.all_gather(buf, &bounds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_puts_chunk_r_at_r_times_width_and_back() {
        let bounds = Bounds::new(vec![0, 3, 3, 7]).unwrap();
        let buf: Vec<f32> = (1..=7).map(|x| x as f32).collect();
        let padded = pad(&buf, &bounds, 4);
        assert_eq!(padded, vec![1., 2., 3., 0., 0., 0., 0., 0., 4., 5., 6., 7.]);
        let mut back = vec![0.0f32; 7];
        unpad(&padded, &bounds, 4, &mut back);
        assert_eq!(back, buf);
    }
}
