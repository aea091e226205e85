//! The peer-to-peer ring: nc's own reduce-scatter, all-gather and all-reduce between the GPUs of one node,
//! over CUDA IPC (kernels-ptx/cuda/p2p_ring.cu).
//!
//! UNVERIFIED on a GPU: never run on one. It runs, host code and kernels, across processes on simulated
//! devices (the simulator's CUDA IPC: comm/tests/sim_p2p.rs, bin/tests/sim_multi_ring.rs), and the kernels
//! in the CPU emulation (comm/tests/p2p_emu.rs). To be checked with scripts/gpu_check.sh's `p2p` step.
//!
//! Each rank allocates with cuMemAlloc (not the stream-ordered pool, which IPC cannot export) a data area
//! (ring slots, then a one-shot area) and a signal area (flags), zeroes both and waits for the zeros to land,
//! exports both with cuIpcGetMemHandle, exchanges the handles through the rendezvous and opens every peer's
//! with cuIpcOpenMemHandle. Before that every rank checks, for every peer, that its GPU is visible here and that
//! cuDeviceCanAccessPeer says yes (or that it is the same GPU: IPC between processes on one device works,
//! which is how the ring is tested on a one-GPU machine); every rank learns every rank's verdict, so all
//! agree on whether the ring can run (`p2p_support`).
//!
//! The ring kernels run the plan tables `p2p_plan` encodes from `schedule::ring_plan` (uploaded once per
//! distinct bounds and cached), with this rank's sequence numbers carried from launch to launch (the
//! flags are epochs over the ring's life, never reset). Everything is enqueued on the ring's stream; order
//! it after the producer with `wait_for` and before the consumer with the consumer stream's `join`.
//! A wait that times out (a dead or stuck peer) ends the kernel with a code in this rank's error word;
//! `check` (and every host-slice collective) reads it and names the peer.
//!
//! Sums: reduce-scatter sums chunk c over ranks c+1, ..., c (the shared-memory ring's order) in f32, bf16
//! rounded once by the owner; the one-shot all-reduce (messages up to `P2pOptions::one_shot_bytes`) sums in
//! rank order 0..n-1. Both give the same bits on every rank; they differ from each other in the last bits.

use crate::nccl_watchdog::Watchdog;
use crate::p2p_plan::{counts, encode_pieces, last_step, one_shot_region_bytes, pieces_span, slice_elems, Piece};
use crate::partition::{even_bounds, Bounds};
use crate::rendezvous::Rendezvous;
use crate::schedule::Phase;
use crate::{bf16, Collective, CommError, Member};
use cudarc::driver::sys;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchArgs, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use nc_kernels::p2p as k;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Sizes of the ring. Every rank must pass the same.
#[derive(Debug, Clone, Copy)]
pub struct P2pOptions {
    /// Blocks (channels) per launch, 1..=16. 8: enough 512-thread blocks to stream a link, few enough to
    /// leave the SMs to the backward pass the collective overlaps.
    pub blocks: usize,
    /// Slots per block: how many slices a rank may run ahead of the next.
    pub slots: usize,
    /// Bytes of one slot (a multiple of 256): one block's part of a slice.
    pub slot_bytes: usize,
    /// Largest all-reduce (bytes) that takes the one-shot path; larger ones run reduce-scatter + all-gather.
    pub one_shot_bytes: usize,
    /// Longest a kernel waits on a peer before it gives up.
    pub timeout: Duration,
}

impl Default for P2pOptions {
    /// 8 blocks x 4 slots x 128 KiB = 4 MiB of slots a rank; one-shot up to 256 KiB (a guess until measured:
    /// below it the ring's 2(n-1) steps of latency should cost more than reading every peer once;
    /// `nc-p2p-bench` prints the measured crossover, and `NC_P2P_ONE_SHOT_BYTES` overrides it).
    fn default() -> Self {
        P2pOptions {
            blocks: 8,
            slots: 4,
            slot_bytes: 128 << 10,
            one_shot_bytes: 256 << 10,
            timeout: Duration::from_secs(60),
        }
    }
}

/// The environment variable that overrides `P2pOptions::one_shot_bytes` (bytes, or with a K/M suffix for
/// KiB/MiB): set it to the crossover `nc-p2p-bench` measures on the machine. Every rank must see the same
/// value (`P2pRing::join` refuses ranks whose options differ).
pub const ONE_SHOT_ENV: &str = "NC_P2P_ONE_SHOT_BYTES";

/// The largest one-shot threshold accepted: the one-shot area is this big on every rank.
pub const MAX_ONE_SHOT_BYTES: usize = 64 << 20;

/// A byte count: a whole number, or one with a K, M or G suffix (KiB, MiB, GiB; either case); None for
/// anything else or a count past usize. The callers bound it and say what they expected.
pub fn parse_byte_count(v: &str) -> Option<usize> {
    let (digits, mult) = match v.chars().last() {
        Some('K') | Some('k') => (&v[..v.len() - 1], 1usize << 10),
        Some('M') | Some('m') => (&v[..v.len() - 1], 1 << 20),
        Some('G') | Some('g') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    digits.parse::<usize>().ok().and_then(|d| d.checked_mul(mult))
}

/// Parses a one-shot threshold: "262144", "256K", "1M" (K = KiB, M = MiB); 0 turns the one-shot path off.
pub fn parse_one_shot_bytes(value: &str) -> Result<usize, String> {
    parse_byte_count(value.trim())
        .filter(|&b| b <= MAX_ONE_SHOT_BYTES)
        .ok_or_else(|| {
            format!(
                "{ONE_SHOT_ENV}={value:?}: expected a byte count up to {} MiB, like 262144, 256K or 1M (0 turns the \
                 one-shot all-reduce off)",
                MAX_ONE_SHOT_BYTES >> 20
            )
        })
}

impl P2pOptions {
    /// These options with `one_shot_bytes` from `NC_P2P_ONE_SHOT_BYTES` when it is set.
    pub fn with_env_overrides(self) -> Result<P2pOptions, CommError> {
        match std::env::var(ONE_SHOT_ENV) {
            Err(_) => Ok(self),
            Ok(v) => Ok(P2pOptions {
                one_shot_bytes: parse_one_shot_bytes(&v).map_err(CommError::unranked)?,
                ..self
            }),
        }
    }

    /// What every rank must agree on (all but the timeout), as text for the rendezvous.
    fn agreed(&self) -> String {
        format!(
            "blocks {} slots {} slot_bytes {} one_shot_bytes {}",
            self.blocks, self.slots, self.slot_bytes, self.one_shot_bytes
        )
    }
}

/// Every rank's options (all but the timeout) against rank 0's, through the rendezvous: ranks with other
/// sizes would run other plans and wait on each other until the timeout. Err (on every rank) naming a rank
/// that differs.
pub fn agree_on_options(rdv: &mut Rendezvous, opts: &P2pOptions) -> Result<(), CommError> {
    let rank = rdv.rank();
    let theirs = rdv.all_gather_bytes(opts.agreed().as_bytes())?;
    match theirs
        .iter()
        .enumerate()
        .find(|(_, o)| o.as_slice() != theirs[0].as_slice())
    {
        None => Ok(()),
        Some((r, other)) => Err(CommError::at(
            rank,
            format!(
                "rank {r} runs the peer-to-peer ring with other options ({}) than rank 0 ({}); every \
                 rank must see the same {ONE_SHOT_ENV}",
                String::from_utf8_lossy(other),
                String::from_utf8_lossy(&theirs[0])
            ),
        )),
    }
}

/// The element types the kernels move.
pub trait P2pElem: DeviceRepr + ValidAsZeroBits + Copy + Default + Unpin {
    const BYTES: usize;
    const IS_BF16: bool;
    /// The ring's kept device copy for host buffers of this type (the `Collective` methods' staging).
    fn staging_buffer(ring: &mut P2pRing) -> &mut Option<CudaSlice<Self>>;
}
impl P2pElem for f32 {
    const BYTES: usize = 4;
    const IS_BF16: bool = false;
    fn staging_buffer(ring: &mut P2pRing) -> &mut Option<CudaSlice<f32>> {
        &mut ring.stage_f32
    }
}
impl P2pElem for bf16 {
    const BYTES: usize = 2;
    const IS_BF16: bool = true;
    fn staging_buffer(ring: &mut P2pRing) -> &mut Option<CudaSlice<bf16>> {
        &mut ring.stage_bf16
    }
}

fn cu(rank: usize, what: &str, r: sys::CUresult) -> Result<(), CommError> {
    r.result()
        .map_err(|e| CommError::at(rank, format!("{what} failed: {e:?}")))
}

/// Device memory from cuMemAlloc (exportable through IPC), freed on drop.
struct DeviceAlloc {
    ptr: sys::CUdeviceptr,
    ctx: Arc<CudaContext>,
}

impl DeviceAlloc {
    fn zeroed(ctx: &Arc<CudaContext>, rank: usize, bytes: usize, what: &str) -> Result<DeviceAlloc, CommError> {
        let mut ptr = 0;
        cu(rank, &format!("cuMemAlloc of {bytes} bytes for the {what}"), unsafe {
            sys::cuMemAlloc_v2(&mut ptr, bytes)
        })?;
        let alloc = DeviceAlloc { ptr, ctx: ctx.clone() };
        cu(rank, "cuMemsetD8", unsafe { sys::cuMemsetD8_v2(ptr, 0, bytes) })?;
        Ok(alloc)
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        unsafe {
            let _ = sys::cuMemFree_v2(self.ptr);
        }
    }
}

/// A peer's buffer opened through IPC, closed on drop.
struct PeerMapping {
    ptr: sys::CUdeviceptr,
}

impl Drop for PeerMapping {
    fn drop(&mut self) {
        unsafe {
            let _ = sys::cuIpcCloseMemHandle(self.ptr);
        }
    }
}

/// This rank's verdict on P2P with every peer: None if it can read every peer's memory, else why not.
fn local_verdict(rank: usize, ctx: &Arc<CudaContext>, bus_ids: &[Vec<u8>]) -> Option<String> {
    let me = ctx.cu_device();
    for (peer, id) in bus_ids.iter().enumerate() {
        if peer == rank {
            continue;
        }
        let mut c_id = id.clone();
        c_id.push(0);
        let mut dev = 0;
        let name = String::from_utf8_lossy(id).into_owned();
        if unsafe { sys::cuDeviceGetByPCIBusId(&mut dev, c_id.as_ptr() as *const std::ffi::c_char) }
            .result()
            .is_err()
        {
            return Some(format!(
                "rank {peer}'s GPU (PCI {name}) is not visible to rank {rank} (CUDA_VISIBLE_DEVICES hides it?)"
            ));
        }
        if dev == me {
            continue; // the same GPU: IPC between processes works without peer access
        }
        let mut can = 0;
        if unsafe { sys::cuDeviceCanAccessPeer(&mut can, me, dev) }
            .result()
            .is_err()
            || can == 0
        {
            return Some(format!(
                "cuDeviceCanAccessPeer says rank {rank}'s GPU cannot read rank {peer}'s (PCI {name})"
            ));
        }
    }
    None
}

/// Whether the ring can run among these ranks, agreed by all: Ok(None) if every pair can reach each other,
/// Ok(Some(why not)) otherwise (the same answer on every rank), Err if the exchange itself failed. Every
/// rank must call it (it goes through the rendezvous), with the context of its GPU.
pub fn p2p_support(rdv: &mut Rendezvous, ctx: &Arc<CudaContext>) -> Result<Option<String>, CommError> {
    let rank = rdv.rank();
    ctx.bind_to_thread()
        .map_err(|e| CommError::at(rank, format!("binding the CUDA context: {e:?}")))?;
    let mut id = [0 as std::ffi::c_char; 64];
    let bus = unsafe { sys::cuDeviceGetPCIBusId(id.as_mut_ptr(), id.len() as i32, ctx.cu_device()) };
    let mine: Vec<u8> = if bus.result().is_ok() {
        id.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect()
    } else {
        Vec::new()
    };
    let bus_ids = rdv.all_gather_bytes(&mine)?;
    let verdict = if let Some(r) = bus_ids.iter().position(|b| b.is_empty()) {
        Some(format!("rank {r} could not read its GPU's PCI bus id"))
    } else {
        local_verdict(rank, ctx, &bus_ids)
    };
    let verdicts = rdv.all_gather_bytes(verdict.as_deref().unwrap_or("").as_bytes())?;
    Ok(verdicts
        .iter()
        .find(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned()))
}

/// Bytes of one block's one-shot region: the largest one-shot message split over the blocks, rounded up to
/// the kernel's parts (and to 16 bytes, so every region starts aligned).
fn region_bytes(opts: &P2pOptions) -> usize {
    one_shot_region_bytes(opts.one_shot_bytes.div_ceil(2), 2, opts.blocks)
        .max(one_shot_region_bytes(opts.one_shot_bytes.div_ceil(4), 4, opts.blocks))
        .div_ceil(16)
        * 16
}

/// Whether `len` elements of `elem_bytes` take the one-shot path under `opts` (and fit its regions).
pub fn one_shot_fits(opts: &P2pOptions, len: usize, elem_bytes: usize) -> bool {
    len * elem_bytes <= opts.one_shot_bytes && one_shot_region_bytes(len, elem_bytes, opts.blocks) <= region_bytes(opts)
}

/// The kernels of `nc_kernels::p2p`, loaded once per ring.
/// The ring's options as `join` accepts them; the message says which limit a value breaks.
fn check_options(opts: &P2pOptions) -> Result<(), String> {
    if !(1..=k::MAX_BLOCKS as usize).contains(&opts.blocks)
        || opts.slots == 0
        || opts.slot_bytes == 0
        || !opts.slot_bytes.is_multiple_of(256)
        || opts.slot_bytes >= 1 << 32
    {
        return Err(format!(
            "P2P ring options need 1..={} blocks, >= 1 slot and slot_bytes a positive multiple of 256 below 4 GiB; got {opts:?}",
            k::MAX_BLOCKS
        ));
    }
    if opts.one_shot_bytes > MAX_ONE_SHOT_BYTES {
        return Err(format!(
            "a one-shot threshold of {} bytes is above the largest accepted, {MAX_ONE_SHOT_BYTES}",
            opts.one_shot_bytes
        ));
    }
    Ok(())
}

fn rank_error(rank: usize, message: String) -> CommError {
    CommError::at(rank, message)
}

/// This rank's side of the ring: its data and signal areas (zeroed), their IPC handles (64 bytes each, data
/// then signal) for the peers to open, and the ring's kernels.
fn set_up_own_side(
    ctx: &Arc<CudaContext>,
    rank: usize,
    bytes: usize,
) -> Result<(DeviceAlloc, DeviceAlloc, Vec<u8>, Kernels), CommError> {
    let fail = |m: String| rank_error(rank, m);
    ctx.bind_to_thread()
        .map_err(|e| fail(format!("binding the CUDA context: {e:?}")))?;
    let data = DeviceAlloc::zeroed(ctx, rank, bytes, "ring's data area")?;
    let signal = DeviceAlloc::zeroed(ctx, rank, k::SIGNAL_U64S * 8, "ring's signal area")?;
    // cuMemsetD8 on device memory may return before it runs: the zeros must be in memory before any peer can
    // open the handles (a peer reading a stale flag would take a slot's old bytes for data), and before this
    // rank's own kernels run on the ring's (non-blocking) stream.
    ctx.synchronize()
        .map_err(|e| fail(format!("synchronizing after zeroing the ring's areas: {e:?}")))?;
    let mut handles = Vec::with_capacity(128);
    for alloc in [&data, &signal] {
        let mut h = std::mem::MaybeUninit::<sys::CUipcMemHandle>::zeroed();
        cu(rank, "cuIpcGetMemHandle", unsafe {
            sys::cuIpcGetMemHandle(h.as_mut_ptr(), alloc.ptr)
        })?;
        let h = unsafe { h.assume_init() };
        handles.extend(h.reserved.iter().map(|&c| c as u8));
    }
    let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(k::PTX)).map_err(|e| {
        fail(format!(
            "loading the p2p_ring PTX (nvcc 13.0; an older driver cannot JIT it): {e:?}"
        ))
    })?;
    let f = |kernel: nc_kernels::Kernel| {
        module
            .load_function(kernel.name)
            .map_err(|e| fail(format!("finding kernel {}: {e:?}", kernel.name)))
    };
    let kernels = Kernels {
        rs_f32: f(k::REDUCE_SCATTER_F32)?,
        rs_bf16: f(k::REDUCE_SCATTER_BF16)?,
        ag: f(k::ALL_GATHER)?,
        one_shot_f32: f(k::ONE_SHOT_F32)?,
        one_shot_bf16: f(k::ONE_SHOT_BF16)?,
    };
    Ok((data, signal, handles, kernels))
}

/// Opens every peer's data and signal areas from the handles each rank sent ("ok:" then 128 bytes), filling
/// `data[r]` and `signal[r]` (this rank's own areas at its index); the mappings go into `maps`, which the
/// caller keeps, so what opened before a failure stays mapped until the ring or the caller lets it go.
fn open_peer_areas(
    rank: usize,
    all: &[Vec<u8>],
    (own_data, own_signal): (&DeviceAlloc, &DeviceAlloc),
    (data, signal): (&mut [u64], &mut [u64]),
    maps: &mut Vec<PeerMapping>,
) -> Result<(), CommError> {
    for (r, news) in all.iter().enumerate() {
        if r == rank {
            data[r] = own_data.ptr;
            signal[r] = own_signal.ptr;
            continue;
        }
        for (i, slot) in [&mut data[r], &mut signal[r]].into_iter().enumerate() {
            let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
            for (d, s) in h.reserved.iter_mut().zip(&news[3 + 64 * i..3 + 64 * (i + 1)]) {
                *d = *s as std::ffi::c_char;
            }
            let mut ptr = 0;
            cu(rank, &format!("cuIpcOpenMemHandle of rank {r}'s area"), unsafe {
                sys::cuIpcOpenMemHandle_v2(
                    &mut ptr,
                    h,
                    sys::CUipcMem_flags_enum::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
                )
            })?;
            maps.push(PeerMapping { ptr });
            *slot = ptr;
        }
    }
    Ok(())
}

/// The arguments both ring kernels (reduce-scatter, all-gather) end with, in `nc_kernels::p2p`'s order: this
/// rank's and the previous rank's data slots, the three signal areas, the sequence numbers, the slot layout,
/// the neighbours and the timeout.
struct RingArgs {
    my_data: u64,
    prev_data: u64,
    my_signal: u64,
    prev_signal: u64,
    next_signal: u64,
    send_seq: u64,
    recv_seq: u64,
    slots: i32,
    slot_bytes: u64,
    prev_rank: i32,
    next_rank: i32,
    timeout_ns: u64,
}

impl RingArgs {
    /// Appends the arguments to a launch whose kernel-specific ones are already pushed.
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(&self.my_data)
            .arg(&self.prev_data)
            .arg(&self.my_signal)
            .arg(&self.prev_signal)
            .arg(&self.next_signal);
        b.arg(&self.send_seq)
            .arg(&self.recv_seq)
            .arg(&self.slots)
            .arg(&self.slot_bytes)
            .arg(&self.prev_rank)
            .arg(&self.next_rank)
            .arg(&self.timeout_ns);
    }
}

struct Kernels {
    rs_f32: CudaFunction,
    rs_bf16: CudaFunction,
    ag: CudaFunction,
    one_shot_f32: CudaFunction,
    one_shot_bf16: CudaFunction,
}

/// A cached plan table: the device copy and how many sends / receives it holds.
struct Plan {
    table: CudaSlice<u64>,
    sends: u64,
    recvs: u64,
}

/// One rank's end of the GPU peer-to-peer ring.
pub struct P2pRing {
    member: Member,
    opts: P2pOptions,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    // Field order is drop order: peers' mappings close before our own memory goes.
    _peer_maps: Vec<PeerMapping>,
    data: Vec<sys::CUdeviceptr>,
    signal: Vec<sys::CUdeviceptr>,
    /// One-shot area and signal area pointers of every rank, for the one-shot kernel.
    peers_table: CudaSlice<u64>,
    _own_data: DeviceAlloc,
    _own_signal: DeviceAlloc,
    send_seq: u64,
    recv_seq: u64,
    epoch: u64,
    /// Keyed by (phase, element size, every piece's start and bounds offsets).
    plans: HashMap<(u8, usize, Vec<usize>), Plan>,
    /// f32 partial sums of a bf16 reduce-scatter (grown on demand, kept).
    work: Option<CudaSlice<f32>>,
    /// Device copies of host buffers for the `Collective` methods (grown on demand, kept).
    stage_f32: Option<CudaSlice<f32>>,
    stage_bf16: Option<CudaSlice<bf16>>,
    broken: Option<CommError>,
    /// Exits the process when a peer's process dies (with more than one rank); stopped first on drop.
    watchdog: Option<Watchdog>,
}

// SAFETY: the raw device pointers are plain addresses; every call binds the stream's context first, and
// `&mut self` keeps calls from overlapping.
unsafe impl Send for P2pRing {}

impl P2pRing {
    /// Every rank calls it after the rendezvous, with the stream its collectives will run on. Fails on every
    /// rank, with the same reason, when some pair of GPUs cannot reach each other (see `p2p_support`).
    pub fn join(rdv: &mut Rendezvous, stream: Arc<CudaStream>, opts: P2pOptions) -> Result<P2pRing, CommError> {
        let (rank, world_size) = (rdv.rank(), rdv.world_size());
        let fail = |m: String| rank_error(rank, m);
        check_options(&opts).map_err(fail)?;
        agree_on_options(rdv, &opts)?;
        let ctx = stream.context().clone();
        if let Some(why) = p2p_support(rdv, &ctx)? {
            return Err(fail(format!("the peer-to-peer ring cannot run: {why}")));
        }
        let slots_bytes = opts.blocks * opts.slots * opts.slot_bytes;
        let region = Self::region_bytes(&opts);
        // Set up this rank's side; report success or the error to everyone before anyone goes on.
        let local = set_up_own_side(&ctx, rank, slots_bytes + opts.blocks * region);
        let news = match &local {
            Ok((_, _, handles, _)) => [b"ok:".as_slice(), handles].concat(),
            Err(e) => [b"no:".as_slice(), e.to_string().as_bytes()].concat(),
        };
        let all = rdv.all_gather_bytes(&news)?;
        if let Some((r, bad)) = all
            .iter()
            .enumerate()
            .find(|(_, n)| !n.starts_with(b"ok:") || n.len() != 3 + 128)
        {
            return Err(fail(format!(
                "rank {r} could not set up its side of the peer-to-peer ring: {}",
                String::from_utf8_lossy(bad.get(3..).unwrap_or(&[]))
            )));
        }
        let (own_data, own_signal, _, kernels) = local?;
        // Open every peer's areas (the one-shot reads all of them; the ring only its neighbours').
        let mut maps = Vec::new();
        let mut data = vec![0; world_size];
        let mut signal = vec![0; world_size];
        let opened = open_peer_areas(
            rank,
            &all,
            (&own_data, &own_signal),
            (&mut data, &mut signal),
            &mut maps,
        );
        let why = opened.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
        let statuses = rdv.all_gather_bytes(why.as_bytes())?;
        if let Some((r, why)) = statuses.iter().enumerate().find(|(_, s)| !s.is_empty()) {
            return Err(fail(format!(
                "rank {r} could not open its peers' buffers: {}",
                String::from_utf8_lossy(why)
            )));
        }
        let table: Vec<u64> = data
            .iter()
            .map(|&d| d + slots_bytes as u64)
            .chain(signal.iter().copied())
            .collect();
        let peers_table = stream
            .clone_htod(&table)
            .map_err(|e| fail(format!("uploading the peer table: {e:?}")))?;
        let watchdog = if world_size > 1 {
            Some(start_watchdog(rank, rdv.watch())?)
        } else {
            None
        };
        Ok(P2pRing {
            member: Member { rank, world_size },
            opts,
            stream,
            kernels,
            _peer_maps: maps,
            data,
            signal,
            peers_table,
            _own_data: own_data,
            _own_signal: own_signal,
            send_seq: 0,
            recv_seq: 0,
            epoch: 1,
            plans: HashMap::new(),
            work: None,
            stage_f32: None,
            stage_bf16: None,
            broken: None,
            watchdog,
        })
    }

    fn region_bytes(opts: &P2pOptions) -> usize {
        region_bytes(opts)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn options(&self) -> &P2pOptions {
        &self.opts
    }

    /// Orders the ring's next collectives after everything enqueued so far on `producer` (an event).
    pub fn wait_for(&self, producer: &CudaStream) -> Result<(), CommError> {
        self.stream
            .join(producer)
            .map_err(|e| self.err(format!("waiting for the producer stream: {e:?}")))
    }

    fn err(&self, m: String) -> CommError {
        CommError::at(self.member.rank, m)
    }

    fn usable(&self, what: &str) -> Result<(), CommError> {
        match &self.broken {
            Some(e) => Err(self.err(format!("{what} on a peer-to-peer ring that already failed: {e}"))),
            None => self
                .stream
                .context()
                .bind_to_thread()
                .map_err(|e| self.err(format!("binding the CUDA context: {e:?}"))),
        }
    }

    /// Waits for the ring's stream and reads this rank's error word: Err naming the peer a kernel gave up
    /// on. A failed ring stays failed (its epochs are out of step with the peers').
    pub fn check(&mut self) -> Result<(), CommError> {
        self.usable("check")?;
        self.stream
            .synchronize()
            .map_err(|e| self.err(format!("the ring's stream failed: {e:?}")))?;
        let mut word = 0u64;
        cu(self.member.rank, "reading the error word", unsafe {
            sys::cuMemcpyDtoH_v2(
                &mut word as *mut u64 as *mut std::ffi::c_void,
                self.signal[self.member.rank] + (k::ERROR_WORD * 8) as u64,
                8,
            )
        })?;
        if word != 0 {
            let flag = ["SENT", "CONSUMED", "POSTED", "DONE"]
                .get((word & 0xff) as usize)
                .unwrap_or(&"?");
            let e = self.err(format!(
                "a peer-to-peer kernel waited {:?} for rank {}'s {flag} flag and gave up (is that rank alive, and did \
                 every rank call the same collectives?)",
                self.opts.timeout,
                (word >> 8) & 0xffff
            ));
            self.broken = Some(e.clone());
            return Err(e);
        }
        Ok(())
    }

    fn check_bounds(&self, len: usize, bounds: &Bounds, what: &str) -> Result<(), CommError> {
        bounds.check_call(self.member, len, what)
    }

    /// The cached device table for (phase, element size, pieces).
    fn plan(&mut self, phase: Phase, elem: usize, pieces: &[Piece]) -> Result<(u64, u64, u64), CommError> {
        let mut shape = Vec::with_capacity(pieces.len() * (self.member.world_size + 2));
        for p in pieces {
            shape.push(p.start);
            shape.extend((0..self.member.world_size).map(|r| p.bounds.range(r).start));
            shape.push(p.bounds.len());
        }
        let key = (phase as u8, elem, shape);
        if !self.plans.contains_key(&key) {
            let slice = slice_elems(phase, elem, self.opts.blocks, self.opts.slot_bytes);
            let table = encode_pieces(phase, pieces, self.member.rank, slice);
            let (sends, recvs) = counts(&table);
            // An empty table (one rank) still gets a device buffer, so the pointer is valid.
            let upload = if table.is_empty() { vec![0u64; 2] } else { table };
            let table = self
                .stream
                .clone_htod(&upload)
                .map_err(|e| self.err(format!("uploading a plan table: {e:?}")))?;
            self.plans.insert(key.clone(), Plan { table, sends, recvs });
        }
        let plan = &self.plans[&key];
        let (ptr, _sync) = plan.table.device_ptr(&self.stream);
        Ok((ptr, plan.sends, plan.recvs))
    }

    /// Checks `pieces` against a span of `span_len` elements: their span, or the error.
    fn check_pieces(&self, span_len: usize, pieces: &[Piece], what: &str) -> Result<(), CommError> {
        let end = pieces_span(pieces, self.member.world_size).map_err(|m| self.err(format!("{what}: {m}")))?;
        if end > span_len {
            return Err(self.err(format!(
                "{what}: the pieces reach element {end} of a span of {span_len} elements"
            )));
        }
        Ok(())
    }

    /// The checks before a pieces collective (the ring is usable, the pieces lie in the span), then its plan
    /// uploaded: (plan address, sends, receives), or None when this rank has nothing to send or receive.
    fn checked_plan(
        &mut self,
        phase: Phase,
        elem: usize,
        span_len: usize,
        pieces: &[Piece],
        what: &str,
    ) -> Result<Option<(u64, u64, u64)>, CommError> {
        self.usable(what)?;
        self.check_pieces(span_len, pieces, what)?;
        let (plan, sends, recvs) = self.plan(phase, elem, pieces)?;
        Ok((sends + recvs > 0).then_some((plan, sends, recvs)))
    }

    /// The ring arguments both ring kernels end with, as of now (the sequence numbers before this launch).
    fn ring_args(&self) -> RingArgs {
        let next = self.member.next();
        let prev = self.member.prev();
        RingArgs {
            my_data: self.data[self.member.rank],
            prev_data: self.data[prev],
            my_signal: self.signal[self.member.rank],
            prev_signal: self.signal[prev],
            next_signal: self.signal[next],
            send_seq: self.send_seq,
            recv_seq: self.recv_seq,
            slots: self.opts.slots as i32,
            slot_bytes: self.opts.slot_bytes as u64,
            prev_rank: prev as i32,
            next_rank: next as i32,
            timeout_ns: self.opts.timeout.as_nanos().min(u64::MAX as u128) as u64,
        }
    }

    /// After a ring kernel was enqueued: its sends and receives move the sequence numbers on.
    fn advance(&mut self, sends: u64, recvs: u64) {
        self.send_seq += sends;
        self.recv_seq += recvs;
    }

    fn launch_config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.opts.blocks as u32, 1, 1),
            block_dim: (k::THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Ring reduce-scatter of `buf` in place, enqueued on the ring's stream: afterwards `buf[bounds.range(rank)]`
    /// holds the sum over ranks (f32 accumulation; bf16 rounded once). f32: other elements hold partial sums;
    /// bf16: other elements are untouched.
    pub fn reduce_scatter_device<T: P2pElem>(
        &mut self,
        buf: &mut CudaSlice<T>,
        bounds: &Bounds,
    ) -> Result<(), CommError> {
        self.whole_buffer(buf, bounds, "reduce_scatter_device", Self::reduce_scatter_pieces::<T>)
    }

    /// Ring all-gather of `buf` in place, enqueued on the ring's stream: afterwards every rank's
    /// `buf[bounds.range(r)]` is rank r's.
    pub fn all_gather_device<T: P2pElem>(&mut self, buf: &mut CudaSlice<T>, bounds: &Bounds) -> Result<(), CommError> {
        self.whole_buffer(buf, bounds, "all_gather_device", Self::all_gather_pieces::<T>)
    }

    /// Runs `pieces_op` (`reduce_scatter_pieces` or `all_gather_pieces`) on the whole of `buf` as one piece
    /// split by `bounds`.
    fn whole_buffer<T: P2pElem>(
        &mut self,
        buf: &mut CudaSlice<T>,
        bounds: &Bounds,
        what: &str,
        pieces_op: unsafe fn(&mut P2pRing, u64, usize, &[Piece]) -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        self.check_bounds(buf.len(), bounds, what)?;
        let stream = self.stream.clone();
        let len = buf.len();
        let (ptr, _sync) = buf.device_ptr_mut(&stream);
        let whole = [Piece {
            start: 0,
            bounds: bounds.clone(),
        }];
        // SAFETY: `ptr` addresses `len` elements of T of the ring's context; `_sync` records the use of `buf`
        // on the ring's stream when it drops, after the launch.
        unsafe { pieces_op(self, ptr, len, &whole) }
    }

    /// Ring reduce-scatter of several tensors of one span of device memory, one launch for all of them,
    /// enqueued on the ring's stream: afterwards each piece's `bounds.range(rank)` (elements from `base +
    /// piece.start`) holds the sum over ranks (f32 accumulation; bf16 rounded once). f32: the rest of each
    /// piece holds partial sums; bf16: it is untouched. Elements of the span outside every piece are not
    /// touched. Every rank must pass the same pieces (their bounds, and starts relative to its own span).
    ///
    /// # Safety
    /// `base` is the device address of `span_len` elements of T in the ring's CUDA context, which stay
    /// allocated, and which no other stream touches, until the ring's stream has passed this call (order
    /// the consumer after it with an event: `stream().join`-style, or `check`).
    pub unsafe fn reduce_scatter_pieces<T: P2pElem>(
        &mut self,
        base: u64,
        span_len: usize,
        pieces: &[Piece],
    ) -> Result<(), CommError> {
        let Some((plan, sends, recvs)) = self.checked_plan(
            Phase::ReduceScatter,
            T::BYTES,
            span_len,
            pieces,
            "reduce_scatter_pieces",
        )?
        else {
            return Ok(());
        };
        // bf16 partials live in an f32 scratch indexed like the span: as long as the last piece's end.
        let scratch = pieces.last().map_or(0, Piece::end);
        if T::IS_BF16 && self.work.as_ref().is_none_or(|w| w.len() < scratch) {
            self.work = None; // free the old one first
            self.work = Some(
                self.stream
                    .alloc_zeros::<f32>(scratch)
                    .map_err(|e| self.err(format!("allocating the f32 partials: {e:?}")))?,
            );
        }
        let ring = self.ring_args();
        let n_ops = ((sends + recvs) as i32, last_step(self.member.world_size) as i32);
        let cfg = self.launch_config();
        let stream = self.stream.clone();
        let work_ptr = match &mut self.work {
            Some(w) if T::IS_BF16 => w.device_ptr_mut(&stream).0,
            _ => base,
        };
        let f = if T::IS_BF16 {
            &self.kernels.rs_bf16
        } else {
            &self.kernels.rs_f32
        };
        let mut b = stream.launch_builder(f);
        b.arg(&plan)
            .arg(&n_ops.0)
            .arg(&n_ops.1)
            .arg(&base)
            .arg(&work_ptr)
            .arg(&base);
        ring.push(&mut b);
        // SAFETY: the arguments follow nc_kernels::p2p's documented list; the plan's ranges lie within the
        // pieces, which lie within the caller's span (checked) and the f32 scratch (sized to the last piece's
        // end); peers' areas were opened at join.
        unsafe { b.launch(cfg) }.map_err(|e| self.err(format!("launching the reduce-scatter kernel: {e:?}")))?;
        self.advance(sends, recvs);
        Ok(())
    }

    /// Ring all-gather of several tensors of one span of device memory, one launch for all of them, enqueued
    /// on the ring's stream: afterwards every rank's `bounds.range(r)` of each piece is rank r's. Elements
    /// outside every piece are not touched.
    ///
    /// # Safety
    /// As for `reduce_scatter_pieces`.
    pub unsafe fn all_gather_pieces<T: P2pElem>(
        &mut self,
        base: u64,
        span_len: usize,
        pieces: &[Piece],
    ) -> Result<(), CommError> {
        let Some((plan, sends, recvs)) =
            self.checked_plan(Phase::AllGather, T::BYTES, span_len, pieces, "all_gather_pieces")?
        else {
            return Ok(());
        };
        let ring = self.ring_args();
        let n_ops = (sends + recvs) as i32;
        let elem = T::BYTES as i32;
        let cfg = self.launch_config();
        let stream = self.stream.clone();
        let mut b = stream.launch_builder(&self.kernels.ag);
        b.arg(&plan).arg(&n_ops).arg(&base).arg(&elem);
        ring.push(&mut b);
        // SAFETY: as for reduce_scatter_pieces.
        unsafe { b.launch(cfg) }.map_err(|e| self.err(format!("launching the all-gather kernel: {e:?}")))?;
        self.advance(sends, recvs);
        Ok(())
    }

    /// Whether an all-reduce of `len` elements of `elem_bytes` takes the one-shot path.
    pub fn uses_one_shot(&self, len: usize, elem_bytes: usize) -> bool {
        one_shot_fits(&self.opts, len, elem_bytes)
    }

    /// One-shot all-reduce (every rank reads every rank's copy, sums in rank order), enqueued on the ring's
    /// stream. Err if `buf` is larger than the one-shot area (`uses_one_shot`).
    pub fn one_shot_device<T: P2pElem>(&mut self, buf: &mut CudaSlice<T>) -> Result<(), CommError> {
        self.usable("one_shot_device")?;
        if !self.uses_one_shot(buf.len(), T::BYTES) {
            return Err(self.err(format!(
                "one_shot_device: {} elements of {} bytes exceed the one-shot area ({} bytes)",
                buf.len(),
                T::BYTES,
                self.opts.one_shot_bytes
            )));
        }
        let n = buf.len() as u64;
        let (ranks, rank) = (self.member.world_size as i32, self.member.rank as i32);
        let (epoch, region) = (self.epoch, Self::region_bytes(&self.opts) as u64);
        let timeout = self.opts.timeout.as_nanos().min(u64::MAX as u128) as u64;
        let cfg = self.launch_config();
        let stream = self.stream.clone();
        let (peers, _s1) = self.peers_table.device_ptr(&stream);
        let (buf_ptr, _s2) = buf.device_ptr_mut(&stream);
        let f = if T::IS_BF16 {
            &self.kernels.one_shot_bf16
        } else {
            &self.kernels.one_shot_f32
        };
        let mut b = stream.launch_builder(f);
        b.arg(&buf_ptr).arg(&buf_ptr).arg(&n).arg(&peers).arg(&ranks).arg(&rank);
        b.arg(&epoch).arg(&region).arg(&timeout);
        // SAFETY: the argument list is nc_kernels::p2p's; n fits every rank's one-shot regions (checked above,
        // and every rank has the same options).
        unsafe { b.launch(cfg) }.map_err(|e| self.err(format!("launching the one-shot kernel: {e:?}")))?;
        self.epoch += 1;
        Ok(())
    }

    /// All-reduce in place: one-shot up to `one_shot_bytes`, reduce-scatter + all-gather above.
    pub fn all_reduce_device<T: P2pElem>(&mut self, buf: &mut CudaSlice<T>) -> Result<(), CommError> {
        if self.uses_one_shot(buf.len(), T::BYTES) {
            self.one_shot_device(buf)
        } else {
            let bounds = even_bounds(buf.len(), self.member.world_size);
            self.reduce_scatter_device(buf, &bounds)?;
            self.all_gather_device(buf, &bounds)
        }
    }

    /// Copies a host buffer to the kept staging buffer of its type, runs `op` on it, copies it back and
    /// checks the error word; `bounds`, where the collective has them, are checked first.
    fn staged<T: P2pElem>(
        &mut self,
        host: &mut [T],
        bounds: Option<&Bounds>,
        what: &str,
        op: impl FnOnce(&mut P2pRing, &mut CudaSlice<T>) -> Result<(), CommError>,
    ) -> Result<(), CommError> {
        if let Some(bounds) = bounds {
            self.check_bounds(host.len(), bounds, what)?;
        }
        self.usable(what)?;
        if host.is_empty() {
            return Ok(());
        }
        let stream = self.stream.clone();
        let mut stage = match T::staging_buffer(self).take() {
            Some(s) if s.len() == host.len() => s,
            _ => stream
                .alloc_zeros::<T>(host.len())
                .map_err(|e| self.err(format!("{what}: allocating a staging buffer: {e:?}")))?,
        };
        let result = (|| {
            stream
                .memcpy_htod(host, &mut stage)
                .map_err(|e| self.err(format!("{what}: copy to the device: {e:?}")))?;
            op(self, &mut stage)?;
            stream
                .memcpy_dtoh(&stage, host)
                .map_err(|e| self.err(format!("{what}: copy to the host: {e:?}")))?;
            self.check()
        })();
        *T::staging_buffer(self) = Some(stage);
        result
    }
}

impl P2pRing {
    /// Reads a u64 flag of some rank's signal area (this rank's or a peer's mapping).
    fn read_flag(&self, signal: sys::CUdeviceptr, block: usize, which: usize) -> Option<u64> {
        let at = signal + ((block * k::FLAGS_PER_BLOCK + which) * k::FLAG_STRIDE * 8) as u64;
        let mut word = 0u64;
        // SAFETY: `at` lies in a signal area of SIGNAL_U64S u64s, mapped in this context.
        let r = unsafe { sys::cuMemcpyDtoH_v2(&mut word as *mut u64 as *mut std::ffi::c_void, at, 8) };
        r.result().ok().map(|_| word)
    }

    /// Before this rank's areas go: waits (up to `DRAIN_TIMEOUT`) until the next rank has consumed every
    /// slice this rank sent and every peer has read this rank's last one-shot post, so no peer reads freed
    /// memory. A peer that is gone or stuck ends the wait at the deadline (it reads nothing any more, or its
    /// own kernel times out).
    fn drain(&self) {
        if self.member.world_size < 2 || self.broken.is_some() {
            return;
        }
        const CONSUMED: usize = 1;
        const DONE: usize = 3;
        let next = self.member.next();
        let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
        let settled = |ring: &P2pRing| {
            (0..ring.opts.blocks).all(|b| {
                ring.read_flag(ring.signal[next], b, CONSUMED)
                    .is_none_or(|v| v >= ring.send_seq)
                    && (0..ring.member.world_size).filter(|&p| p != ring.member.rank).all(|p| {
                        ring.read_flag(ring.signal[p], b, DONE)
                            .is_none_or(|v| v + 1 >= ring.epoch)
                    })
            })
        };
        while !settled(self) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// How long a dropped ring waits for its peers to finish reading its memory.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

impl Drop for P2pRing {
    /// The watchdog first (a peer exiting normally after this is no death); then this rank's kernels finish
    /// and its peers finish reading its slots and one-shot region (`drain`) before its memory and the
    /// mappings go.
    fn drop(&mut self) {
        self.watchdog = None;
        if self.stream.synchronize().is_ok() && self.stream.context().bind_to_thread().is_ok() {
            self.drain();
        }
    }
}

/// Exits the process (code `nccl::EXIT_PEER_GONE`, naming the rank) when the rendezvous reports a peer's
/// process gone: a kernel waiting on a dead peer would otherwise spin until its timeout (minutes: it must
/// outlast rank 0's evaluations and checkpoints). Checked every `nccl::WATCHDOG_PERIOD`. It exits through
/// `nccl_watchdog::exit_now` (no exit handlers: a broken driver's can hang or crash and lose the code).
fn start_watchdog(rank: usize, watch: crate::rendezvous::PeerWatch) -> Result<Watchdog, CommError> {
    Watchdog::spawn(rank, format!("nc-p2p-watchdog{rank}"), move || {
        let e = watch.check().err()?;
        eprintln!(
            "rank {rank}: {e}; the peer-to-peer ring's kernels would wait for it until their timeout, so exiting \
             with code {}",
            crate::nccl::EXIT_PEER_GONE
        );
        Some(crate::nccl::EXIT_PEER_GONE)
    })
}

impl Collective for P2pRing {
    fn member(&self) -> Member {
        self.member
    }

    fn reduce_scatter_sum(&mut self, buf: &mut [f32], bounds: &Bounds) -> Result<(), CommError> {
        self.staged(buf, Some(bounds), "reduce_scatter_sum", |r, s| {
            r.reduce_scatter_device(s, bounds)
        })
    }

    fn all_gather(&mut self, buf: &mut [f32], bounds: &Bounds) -> Result<(), CommError> {
        self.staged(buf, Some(bounds), "all_gather", |r, s| r.all_gather_device(s, bounds))
    }

    fn reduce_scatter_sum_bf16(&mut self, buf: &mut [bf16], bounds: &Bounds) -> Result<(), CommError> {
        self.staged(buf, Some(bounds), "reduce_scatter_sum_bf16", |r, s| {
            r.reduce_scatter_device(s, bounds)
        })
    }

    fn all_gather_bf16(&mut self, buf: &mut [bf16], bounds: &Bounds) -> Result<(), CommError> {
        self.staged(buf, Some(bounds), "all_gather_bf16", |r, s| {
            r.all_gather_device(s, bounds)
        })
    }

    /// One-shot below `one_shot_bytes` (rank-order sum), ring above (the trait's order).
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.staged(buf, None, "all_reduce_sum", |r, s| r.all_reduce_device(s))
    }

    fn all_reduce_sum_bf16(&mut self, buf: &mut [bf16]) -> Result<(), CommError> {
        self.staged(buf, None, "all_reduce_sum_bf16", |r, s| r.all_reduce_device(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_one_shot_threshold_parses_and_refuses_nonsense() {
        assert_eq!(parse_one_shot_bytes("262144"), Ok(262144));
        assert_eq!(parse_one_shot_bytes("256K"), Ok(256 << 10));
        assert_eq!(parse_one_shot_bytes(" 1m "), Ok(1 << 20));
        assert_eq!(parse_one_shot_bytes("0"), Ok(0));
        assert_eq!(parse_one_shot_bytes("64M"), Ok(MAX_ONE_SHOT_BYTES));
        for bad in ["", "-1", "1.5M", "65M", "lots", "1G"] {
            let e = parse_one_shot_bytes(bad).unwrap_err();
            assert!(e.contains(ONE_SHOT_ENV) && e.contains("256K"), "{bad}: {e}");
        }
    }

    /// Ranks that disagree on the ring's sizes (a different NC_P2P_ONE_SHOT_BYTES) all fail, naming the odd
    /// rank, instead of running plans that never pair up; the timeout may differ.
    #[test]
    fn ranks_must_agree_on_the_options() {
        use crate::rendezvous::RendezvousConfig;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let results: Vec<Result<(), CommError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    s.spawn(move || {
                        let cfg = RendezvousConfig {
                            rank,
                            world_size: 3,
                            master_addr: "127.0.0.1".into(),
                            master_port: port,
                            timeout: Duration::from_secs(20),
                        };
                        let mut rdv = Rendezvous::join(&cfg, &[]).unwrap();
                        let mut opts = P2pOptions {
                            timeout: Duration::from_secs(rank as u64 + 1),
                            ..P2pOptions::default()
                        };
                        agree_on_options(&mut rdv, &opts)?;
                        if rank == 2 {
                            opts.one_shot_bytes = 1 << 20;
                        }
                        agree_on_options(&mut rdv, &opts)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, r) in results.iter().enumerate() {
            let e = r.as_ref().unwrap_err();
            assert!(
                e.reason
                    .contains("rank 2 runs the peer-to-peer ring with other options")
                    && e.reason.contains("one_shot_bytes 1048576"),
                "rank {rank}: {e}"
            );
        }
    }

    #[test]
    fn every_message_up_to_the_threshold_fits_the_one_shot_regions() {
        for blocks in [1, 3, 8, 16] {
            for one_shot_bytes in [0, 1, 100, 4096, 256 << 10, (256 << 10) + 6] {
                let opts = P2pOptions {
                    blocks,
                    one_shot_bytes,
                    ..P2pOptions::default()
                };
                for elem in [2, 4] {
                    let most = one_shot_bytes / elem;
                    for len in [0, most / 2, most.saturating_sub(1), most] {
                        assert!(
                            one_shot_fits(&opts, len, elem),
                            "{blocks} {one_shot_bytes} {elem} {len}"
                        );
                        // The kernel's parts of `len` elements fit one block's region.
                        assert!(one_shot_region_bytes(len, elem, blocks) <= region_bytes(&opts));
                    }
                    assert!(!one_shot_fits(&opts, most + 1, elem));
                }
                assert_eq!(region_bytes(&opts) % 16, 0);
            }
        }
    }
}
