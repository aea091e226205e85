//! Ring collectives between processes of one machine, through a shared-memory segment.
//!
//! The CPU twin of the GPU peer-to-peer ring: the same schedule (schedule.rs) and the same flag protocol
//! (shm_flags.rs), run by real processes, so CI exercises both. Each rank copies a slice of its buffer into
//! its own slot in the segment and raises its `sent` counter; the next rank adds (reduce-scatter) or copies
//! (all-gather) the slice into its buffer and raises its `consumed` counter. Sums are taken in the order
//! `schedule::sum_order` gives, the same as `ThreadRing`, so results are bit-identical on every rank.
//!
//! bf16: reduce-scatter widens to f32, reduces in f32 (f32 partial sums travel between ranks) and rounds
//! each owned element once at the end; all-gather moves bf16 unchanged.

use crate::partition::Bounds;
use crate::rendezvous::{PeerWatch, Rendezvous};
use crate::schedule::{ring_plan, Phase, RingOp};
use crate::shm_flags::{own_identity, Waiter};
use crate::shm_segment::{Segment, SlotHeader, SLOT_HEADER_BYTES, STATE_FAILED, STATE_JOINED, STATE_LEFT};
use crate::{Collective, CommError, Member};
use bytemuck::Pod;
use half::bf16;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Sizes of the segment's slots: the unit of pipelining between neighbours.
#[derive(Debug, Clone, Copy)]
pub struct ShmRingOptions {
    /// Payload bytes per slot (a multiple of 64): the largest slice sent at once.
    pub slot_bytes: usize,
    /// Slots per rank: how many slices a rank may run ahead of its next neighbour.
    pub slots: usize,
}

impl Default for ShmRingOptions {
    /// 64 KiB slices fit in L2 beside the buffers they are copied between; 8 of them let a sender run
    /// ahead when its neighbour is descheduled.
    fn default() -> Self {
        ShmRingOptions {
            slot_bytes: 64 << 10,
            slots: 8,
        }
    }
}

/// One rank's end of a shared-memory ring.
pub struct ShmRing {
    member: Member,
    timeout: Duration,
    seg: Segment,
    watch: PeerWatch,
    /// Slices this rank has sent / received so far: the epochs of its next send and receive.
    next_send: u64,
    next_recv: u64,
    /// Set by the first failed collective; later calls fail at once (the ring's counters are out of step).
    broken: Option<CommError>,
    /// f32 copy of a bf16 buffer during a bf16 reduce-scatter, kept between calls: a fresh one each call
    /// costs a page fault per 4 KiB, which at large sizes took longer than the ring itself.
    wide: Vec<f32>,
}

/// Describes a slice for the receiver's check: which collective, element size, where it belongs.
fn tag_of(phase: Phase, elem_bytes: usize) -> u64 {
    let phase_code = match phase {
        Phase::ReduceScatter => 1,
        Phase::AllGather => 2,
    };
    phase_code | (elem_bytes as u64) << 8
}

impl ShmRing {
    /// Every local rank calls it after the rendezvous (which agrees on `name`, unique per run). Rank 0
    /// creates the segment; the others open it. `timeout`: the longest a collective waits on a peer before
    /// failing with an error naming that peer (a peer whose process is gone is detected well before that).
    pub fn join(rdv: &mut Rendezvous, name: &str, timeout: Duration) -> Result<ShmRing, CommError> {
        Self::join_with(rdv, name, timeout, ShmRingOptions::default())
    }

    /// `join` with chosen slot sizes (tests use tiny slots to run many slices through few bytes).
    pub fn join_with(
        rdv: &mut Rendezvous,
        name: &str,
        timeout: Duration,
        opts: ShmRingOptions,
    ) -> Result<ShmRing, CommError> {
        let rank = rdv.rank();
        let world_size = rdv.world_size();
        let fail = |message: String| CommError::at(rank, message);
        let name_ok = !name.is_empty()
            && name.len() <= 200
            && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !name_ok {
            return Err(fail(format!(
                "{name:?} is not a usable segment name (use 1-200 of A-Z a-z 0-9 . _ -)"
            )));
        }
        if opts.slots == 0 || opts.slot_bytes == 0 || !opts.slot_bytes.is_multiple_of(64) {
            return Err(fail(format!(
                "slots must be >= 1 and slot_bytes a positive multiple of 64, got {opts:?}"
            )));
        }
        // Rank 0 creates the segment and tells everyone its path (or why it could not).
        let seg = if rank == 0 {
            let path = PathBuf::from(format!("/dev/shm/nc-{name}-{}", std::process::id()));
            let created = Segment::create(&path, world_size, opts.slots, opts.slot_bytes);
            let news = match &created {
                Ok(_) => [b"ok:".as_slice(), path.as_os_str().as_encoded_bytes()].concat(),
                Err(e) => [b"no:".as_slice(), e.to_string().as_bytes()].concat(),
            };
            rdv.broadcast_bytes(&news)?;
            created.map_err(|e| fail(e.to_string()))?
        } else {
            let news = rdv.broadcast_bytes(&[])?;
            let text = String::from_utf8_lossy(&news[3.min(news.len())..]).into_owned();
            if !news.starts_with(b"ok:") {
                return Err(fail(format!(
                    "rank 0 could not create the shared-memory segment: {text}"
                )));
            }
            match Segment::open(&PathBuf::from(&text), world_size) {
                Ok(seg) => seg,
                Err(e) => {
                    // Tell the others before leaving, so they fail naming this rank instead of waiting.
                    let _ = rdv.all_gather_bytes(e.to_string().as_bytes());
                    return Err(fail(e.to_string()));
                }
            }
        };
        let me = seg.record(rank);
        let (pid, start_time) = own_identity();
        me.pid.store(pid, Ordering::Relaxed);
        me.start_time.store(start_time, Ordering::Relaxed);
        me.state.store(STATE_JOINED, Ordering::Release);
        // Everyone has opened (or failed to): the name can go, so a crash later leaves nothing in /dev/shm.
        let statuses = rdv.all_gather_bytes(&[]);
        if rank == 0 {
            let _ = seg.unlink();
        }
        for (r, status) in statuses?.iter().enumerate() {
            if !status.is_empty() {
                return Err(fail(format!(
                    "rank {r} could not open the segment: {}",
                    String::from_utf8_lossy(status)
                )));
            }
        }
        Ok(ShmRing {
            member: Member { rank, world_size },
            timeout,
            seg,
            watch: rdv.watch(),
            next_send: 0,
            next_recv: 0,
            broken: None,
            wide: Vec::new(),
        })
    }

    fn waiter(&self) -> Waiter<'_> {
        Waiter {
            seg: &self.seg,
            rank: self.member.rank,
            timeout: self.timeout,
            watch: Some(&self.watch),
        }
    }

    fn check_call(&self, len: usize, bounds: &Bounds, what: &str) -> Result<(), CommError> {
        if let Some(e) = &self.broken {
            // the first failure names the rank that saw it
            return Err(CommError::unranked(format!(
                "{what} on a ring that already failed: {e}"
            )));
        }
        bounds.check_call(self.member, len, what)
    }

    /// Runs one half of a ring collective over `buf`; `combine(mine, theirs)` applies a received slice.
    /// A failure marks this rank failed in the segment so its peers stop waiting for it.
    fn run<T: Pod>(
        &mut self,
        phase: Phase,
        buf: &mut [T],
        bounds: &Bounds,
        what: &str,
        combine: fn(&mut [T], &[T]),
    ) -> Result<(), CommError> {
        self.check_call(buf.len(), bounds, what)?;
        let elem = std::mem::size_of::<T>();
        let tag = tag_of(phase, elem);
        let plan = ring_plan(phase, bounds, self.member.rank, self.seg.slot_bytes / elem);
        let result = plan.into_iter().try_for_each(|op| match op {
            RingOp::Send { elems, .. } => self.send_slice(tag, elems.start, &buf[elems], what),
            RingOp::Recv { elems, .. } => {
                let start = elems.start;
                self.recv_slice(tag, start, &mut buf[elems], what, combine)
            }
        });
        if let Err(e) = &result {
            self.seg
                .record(self.member.rank)
                .state
                .store(STATE_FAILED, Ordering::Release);
            self.broken = Some(e.clone());
        }
        result
    }

    /// Publishes `data` (elements `start..` of the buffer) as this rank's next slice.
    fn send_slice<T: Pod>(&mut self, tag: u64, start: usize, data: &[T], what: &str) -> Result<(), CommError> {
        let slots = self.seg.slots as u64;
        let seq = self.next_send;
        let next = self.member.next();
        if seq >= slots {
            // The slot last held slice seq - slots: wait until the next rank has read it.
            let w = self.waiter();
            w.wait_for(&self.seg.record(next).consumed, seq + 1 - slots, next, &|| {
                format!("finish reading slice {} in {what}", seq - slots)
            })?;
        }
        let slot = self.seg.slot(self.member.rank, (seq % slots) as usize);
        let bytes: &[u8] = bytemuck::cast_slice(data);
        debug_assert!(bytes.len() <= self.seg.slot_bytes);
        // Only this rank writes its slots, and the next rank reads this one only after the release below.
        unsafe {
            (slot as *mut SlotHeader).write(SlotHeader {
                seq,
                tag,
                start: start as u64,
                len: data.len() as u64,
            });
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), slot.add(SLOT_HEADER_BYTES), bytes.len());
        }
        self.seg.record(self.member.rank).sent.store(seq + 1, Ordering::Release);
        self.next_send += 1;
        Ok(())
    }

    /// Waits for the previous rank's next slice, checks it is the expected one, applies it to `mine`.
    fn recv_slice<T: Pod>(
        &mut self,
        tag: u64,
        start: usize,
        mine: &mut [T],
        what: &str,
        combine: fn(&mut [T], &[T]),
    ) -> Result<(), CommError> {
        let slots = self.seg.slots as u64;
        let seq = self.next_recv;
        let prev = self.member.prev();
        let w = self.waiter();
        w.wait_for(&self.seg.record(prev).sent, seq + 1, prev, &|| {
            format!("send slice {seq} in {what}")
        })?;
        let slot = self.seg.slot(prev, (seq % slots) as usize);
        // The acquire above makes the previous rank's writes of this slot visible, and it will not write
        // the slot again until our `consumed` release below.
        let header = unsafe { (slot as *const SlotHeader).read() };
        let expected = (seq, tag, start as u64, mine.len() as u64);
        if (header.seq, header.tag, header.start, header.len) != expected {
            return Err(CommError::at(
                self.member.rank,
                format!(
                    "in {what}, rank {prev} sent slice {} (kind {:#x}, elements {}..+{}) where slice {seq} \
                     (kind {tag:#x}, elements {start}..+{}) was expected: the ranks called different collectives \
                     or passed different bounds",
                    header.seq,
                    header.tag,
                    header.start,
                    header.len,
                    mine.len()
                ),
            ));
        }
        let theirs = unsafe { std::slice::from_raw_parts(slot.add(SLOT_HEADER_BYTES) as *const T, mine.len()) };
        combine(mine, theirs);
        self.seg
            .record(self.member.rank)
            .consumed
            .store(seq + 1, Ordering::Release);
        self.next_recv += 1;
        Ok(())
    }
}

/// Adds the incoming partial sum to this rank's term. IEEE addition is commutative, so which operand
/// comes first within one addition does not change the bits; the order across ranks (the schedule) does.
fn add_f32(mine: &mut [f32], theirs: &[f32]) {
    for (m, t) in mine.iter_mut().zip(theirs) {
        *m += *t;
    }
}

fn copy<T: Pod>(mine: &mut [T], theirs: &[T]) {
    mine.copy_from_slice(theirs);
}

impl Collective for ShmRing {
    fn member(&self) -> Member {
        self.member
    }

    fn reduce_scatter_sum(&mut self, buf: &mut [f32], bounds: &Bounds) -> Result<(), CommError> {
        self.run(Phase::ReduceScatter, buf, bounds, "reduce_scatter_sum", add_f32)
    }

    fn all_gather(&mut self, buf: &mut [f32], bounds: &Bounds) -> Result<(), CommError> {
        self.run(Phase::AllGather, buf, bounds, "all_gather", copy::<f32>)
    }

    /// Widens into the kept f32 buffer, reduces in f32 (f32 partial sums travel), rounds the owned range
    /// once: the trait's default without its allocation.
    fn reduce_scatter_sum_bf16(&mut self, buf: &mut [bf16], bounds: &Bounds) -> Result<(), CommError> {
        let mut wide = std::mem::take(&mut self.wide);
        wide.clear();
        wide.extend(buf.iter().map(|x| x.to_f32()));
        let result = self.run(
            Phase::ReduceScatter,
            &mut wide,
            bounds,
            "reduce_scatter_sum_bf16",
            add_f32,
        );
        if result.is_ok() {
            let mine = bounds.range(self.member.rank);
            for (b, w) in buf[mine.clone()].iter_mut().zip(&wide[mine]) {
                *b = bf16::from_f32(*w);
            }
        }
        self.wide = wide;
        result
    }

    /// bf16 moves as bf16: half the bytes of the f32 default.
    fn all_gather_bf16(&mut self, buf: &mut [bf16], bounds: &Bounds) -> Result<(), CommError> {
        self.run(Phase::AllGather, buf, bounds, "all_gather_bf16", copy::<bf16>)
    }
}

impl Drop for ShmRing {
    fn drop(&mut self) {
        let state = &self.seg.record(self.member.rank).state;
        if state.load(Ordering::Relaxed) != STATE_FAILED {
            state.store(STATE_LEFT, Ordering::Release);
        }
    }
}
