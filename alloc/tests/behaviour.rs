//! Targeted tests of the allocator's rules: reuse, splitting and merging, stream-ordered reuse, the
//! out-of-memory path, oversize blocks, statistics and thread safety.

use nc_alloc::{
    AllocError, AllocatorConfig, BlockState, CachingAllocator, HostSource, MemorySource, PoolKind, SourceError,
    StreamId,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const S: StreamId = StreamId(1);
const T: StreamId = StreamId(2);
const MIB: usize = 1 << 20;

fn unbacked(capacity: usize) -> CachingAllocator<HostSource> {
    CachingAllocator::new(HostSource::unbacked(capacity), AllocatorConfig::default()).unwrap()
}

/// The state of the first block of the segment at `addr`, from a snapshot.
fn first_block_state(a: &CachingAllocator<HostSource>, addr: u64) -> BlockState {
    let snap = a.snapshot();
    snap.iter().find(|s| s.addr == addr).expect("a segment at addr").blocks[0].state
}

#[test]
fn a_freed_block_is_reused_without_a_new_segment() {
    let a = unbacked(1 << 30);
    let b = a.allocate(1000, S).unwrap();
    assert_eq!((b.size(), b.requested()), (1024, 1000));
    let addr = b.addr();
    a.free(b);
    let b = a.allocate(900, S).unwrap();
    assert_eq!(b.addr(), addr, "best fit must return the freed block");
    a.free(b);
    let st = a.stats();
    assert_eq!((st.num_allocs, st.num_frees, st.num_segment_allocs), (2, 2, 1));
    assert_eq!(a.with_source(|s| s.allocate_calls), 1);
    assert_eq!((st.reserved_bytes, st.segments_small), (2 * MIB, 1));
}

#[test]
fn blocks_split_and_free_neighbours_merge() {
    let a = unbacked(1 << 30);
    let x = a.allocate(256 << 10, S).unwrap();
    let y = a.allocate(256 << 10, S).unwrap();
    let z = a.allocate(256 << 10, S).unwrap();
    let base = x.addr();
    assert_eq!(
        (y.addr(), z.addr()),
        (base + (256 << 10), base + (512 << 10)),
        "carved in address order"
    );
    a.free(y);
    a.free(x);
    let snap = a.snapshot();
    assert_eq!(snap.len(), 1);
    let blocks: Vec<(u64, usize, bool)> = snap[0]
        .blocks
        .iter()
        .map(|b| (b.addr - base, b.size, matches!(b.state, BlockState::Free { .. })))
        .collect();
    assert_eq!(
        blocks,
        vec![
            (0, 512 << 10, true),
            (512 << 10, 256 << 10, false),
            (768 << 10, 1280 << 10, true)
        ]
    );
    a.free(z);
    let snap = a.snapshot();
    assert_eq!(snap[0].blocks.len(), 1, "all free: one block spanning the segment");
    assert_eq!(snap[0].blocks[0].size, 2 * MIB);
    a.check_consistency().unwrap();
}

#[test]
fn small_and_large_requests_use_their_own_pools() {
    let a = unbacked(1 << 30);
    let small = a.allocate(MIB, S).unwrap();
    let mid = a.allocate(MIB + 1, S).unwrap();
    let big = a.allocate(50 * MIB, S).unwrap();
    let snap = a.snapshot();
    let kinds: Vec<(PoolKind, usize)> = snap.iter().map(|s| (s.kind, s.size)).collect();
    assert!(kinds.contains(&(PoolKind::Small, 2 * MIB)));
    assert!(kinds.contains(&(PoolKind::Large, 20 * MIB)));
    assert!(kinds.contains(&(PoolKind::Large, 50 * MIB)));
    assert_eq!(mid.size(), MIB + 512);
    for b in [small, mid, big] {
        a.free(b);
    }
}

#[test]
fn another_stream_waits_for_the_event_covering_the_free() {
    let a = unbacked(1 << 30);
    let b = a.allocate(4096, S).unwrap();
    let addr = b.addr();
    a.free(b);
    // T misses: S's block is not T's yet; one event is recorded on S, and T gets a new segment.
    let t1 = a.allocate(4096, T).unwrap();
    assert_ne!(
        t1.addr() & !(2 * MIB as u64 - 1),
        addr & !(2 * MIB as u64 - 1),
        "must not share S's segment"
    );
    assert_eq!(a.stats().num_events_recorded, 1);
    let recs = a.with_source(|s| s.event_records().to_vec());
    assert_eq!((recs.len(), recs[0].stream, recs[0].completed), (1, S, false));
    // S's free (merged back into its segment) is waiting on that event: counted as active.
    assert_eq!(a.stats().active_bytes, 4096 + 2 * MIB);
    a.process_events().unwrap();
    let free_for_s = |waiting| BlockState::Free {
        owner: Some(S),
        waiting,
    };
    assert_eq!(first_block_state(&a, addr), free_for_s(true));
    // S itself may still reuse it at once.
    let again = a.allocate(4096, S).unwrap();
    assert_eq!(again.addr(), addr);
    a.free(again);
    // Once the device passes the event, the block is anyone's.
    a.with_source(|s| assert!(s.complete_oldest_event(S)));
    a.process_events().unwrap();
    // The free after the event is not covered by it, so the segment's first block stays S's.
    assert_eq!(first_block_state(&a, addr), free_for_s(false));
    a.free(t1);
    a.check_consistency().unwrap();
}

#[test]
fn blocks_freed_before_a_completed_event_serve_other_streams() {
    let a = unbacked(1 << 30);
    let b = a.allocate(8 * MIB, S).unwrap();
    let addr = b.addr();
    a.free(b);
    let t_miss = a.allocate(4096, T).unwrap(); // records the event on S; T's remainder stays small-pool
    assert_ne!(t_miss.addr(), addr);
    a.with_source(|s| s.complete_all_events());
    let t_hit = a.allocate(8 * MIB, T).unwrap();
    assert_eq!(
        t_hit.addr(),
        addr,
        "after the event completed, T takes S's cached block"
    );
    assert_eq!(a.stats().num_segment_allocs, 2);
    a.free(t_hit);
    a.free(t_miss);
    a.empty_cache().unwrap();
    assert_eq!(a.with_source(|s| s.used_bytes()), 0);
}

#[test]
fn a_full_device_flushes_the_cache_and_retries_once() {
    let a = unbacked(40 * MIB);
    let b = a.allocate(15 * MIB, S).unwrap(); // exact segment, 16 MiB
    a.free(b);
    let big = a.allocate(30 * MIB, S).unwrap(); // 16 + 30 > 40: flush, then fits
    let st = a.stats();
    assert_eq!((st.num_cache_flushes, st.num_ooms, st.num_segment_frees), (1, 0, 1));
    assert_eq!(st.reserved_bytes, 30 * MIB);
    let err = a.allocate(30 * MIB, S).unwrap_err();
    let AllocError::OutOfMemory(report) = &err else {
        panic!("expected OOM, got {err:?}")
    };
    assert_eq!(report.requested, 30 * MIB);
    assert_eq!(
        (report.device_free, report.device_total),
        (Some(10 * MIB), Some(40 * MIB))
    );
    assert_eq!(
        (report.allocated, report.reserved, report.reserved_free),
        (30 * MIB, 30 * MIB, 0)
    );
    let msg = err.to_string();
    for needle in [
        "30.0 MiB",
        "10.0 MiB free of 40.0 MiB",
        "--dbs",
        "--recompute",
        "30.0 MiB allocated",
    ] {
        assert!(msg.contains(needle), "OOM message lacks {needle:?}: {msg}");
    }
    assert_eq!(a.stats().num_ooms, 1);
    a.free(big);
}

#[test]
fn the_oom_message_names_fragmentation_when_the_cache_has_room_but_no_hole() {
    let a = unbacked(40 * MIB);
    // Two 20 MiB segments, each with a 4 MiB hole between live blocks.
    let mut keep = Vec::new();
    for _ in 0..2 {
        let x = a.allocate(8 * MIB, S).unwrap();
        let hole = a.allocate(4 * MIB, S).unwrap();
        let y = a.allocate(8 * MIB, S).unwrap();
        a.free(hole);
        keep.extend([x, y]);
    }
    let err = a.allocate(6 * MIB, S).unwrap_err();
    let AllocError::OutOfMemory(report) = &err else {
        panic!("{err:?}")
    };
    assert_eq!((report.reserved_free, report.largest_free_block), (8 * MIB, 4 * MIB));
    assert!(err.to_string().contains("fragmented"), "{err}");
    for b in keep {
        a.free(b);
    }
}

#[test]
fn oversize_blocks_are_not_shredded() {
    let a = CachingAllocator::new(
        HostSource::unbacked(1 << 30),
        AllocatorConfig {
            max_split_size: 64 * MIB,
            ..AllocatorConfig::default()
        },
    )
    .unwrap();
    let huge = a.allocate(100 * MIB, S).unwrap();
    let huge_addr = huge.addr();
    a.free(huge);
    let small = a.allocate(12 * MIB, S).unwrap();
    assert_ne!(
        small.addr(),
        huge_addr,
        "a 12 MiB request must not split the 100 MiB hole"
    );
    let near = a.allocate(90 * MIB, S).unwrap();
    assert_eq!(
        (near.addr(), near.size()),
        (huge_addr, 100 * MIB),
        "within 20 MiB: whole block, unsplit"
    );
    a.free(near);
    let far = a.allocate(70 * MIB, S).unwrap();
    assert_ne!(
        far.addr(),
        huge_addr,
        "30 MiB of waste is too much for an oversize block"
    );
    a.free(far);
    a.free(small);
    assert!(CachingAllocator::new(
        HostSource::unbacked(1),
        AllocatorConfig {
            max_split_size: MIB,
            ..AllocatorConfig::default()
        }
    )
    .is_err());
}

#[test]
fn peaks_reset_and_summary_names_the_figures() {
    let a = unbacked(1 << 30);
    let x = a.allocate(30 * MIB, S).unwrap();
    a.free(x);
    let z = a.allocate(MIB, S).unwrap();
    a.free(z);
    a.empty_cache().unwrap(); // waits at once: the cached bytes were never held back from anyone
    let st = a.stats();
    assert_eq!((st.peak_allocated_bytes, st.allocated_bytes), (30 * MIB, 0));
    assert_eq!(st.peak_active_bytes, 30 * MIB, "a flush must not count as active");
    let x = a.allocate(30 * MIB, S).unwrap();
    a.free(x);
    a.reset_peak();
    let st = a.stats();
    assert_eq!((st.peak_allocated_bytes, st.peak_reserved_bytes), (0, 30 * MIB));
    let y = a.allocate(3000, S).unwrap();
    let summary = a.summary();
    assert!(summary.lines().count() <= 4, "{summary}");
    for needle in [
        "allocated 3.00 KiB (peak 3.00 KiB)",
        "reserved 32.0 MiB",
        "segments 2",
        "OOMs 0",
    ] {
        assert!(summary.contains(needle), "summary lacks {needle:?}:\n{summary}");
    }
    a.free(y);
}

/// A host source that reports its segment count and live events to the test through shared counters,
/// so the test can look after the allocator (and the source) is dropped.
struct Watched {
    inner: HostSource,
    live_segments: Arc<AtomicUsize>,
    live_events: Arc<AtomicUsize>,
}

impl MemorySource for Watched {
    type Event = <HostSource as MemorySource>::Event;
    fn name(&self) -> String {
        self.inner.name()
    }
    fn allocate(&mut self, bytes: usize) -> Result<u64, SourceError> {
        let r = self.inner.allocate(bytes);
        self.live_segments.store(self.inner.live_segments(), Ordering::SeqCst);
        r
    }
    fn release(&mut self, addr: u64, bytes: usize) -> Result<(), SourceError> {
        let r = self.inner.release(addr, bytes);
        self.live_segments.store(self.inner.live_segments(), Ordering::SeqCst);
        r
    }
    fn memory_info(&mut self) -> Option<(usize, usize)> {
        self.inner.memory_info()
    }
    fn create_event(&mut self) -> Result<Self::Event, SourceError> {
        self.live_events.fetch_add(1, Ordering::SeqCst);
        self.inner.create_event()
    }
    fn record_event(&mut self, event: &Self::Event, stream: StreamId) -> Result<(), SourceError> {
        self.inner.record_event(event, stream)
    }
    fn event_completed(&mut self, event: &Self::Event) -> Result<bool, SourceError> {
        self.inner.event_completed(event)
    }
    fn wait_event(&mut self, event: &Self::Event) -> Result<(), SourceError> {
        self.inner.wait_event(event)
    }
    fn destroy_event(&mut self, event: Self::Event) {
        self.live_events.fetch_sub(1, Ordering::SeqCst);
        self.inner.destroy_event(event)
    }
}

#[test]
fn dropping_the_allocator_gives_every_segment_and_event_back() {
    let segments = Arc::new(AtomicUsize::new(0));
    let events = Arc::new(AtomicUsize::new(0));
    let source = Watched {
        inner: HostSource::backed(256 * MIB),
        live_segments: segments.clone(),
        live_events: events.clone(),
    };
    let alloc = CachingAllocator::new(source, AllocatorConfig::default()).unwrap();
    let _held = alloc.allocate(5 * MIB, S).unwrap();
    let x = alloc.allocate(100, T).unwrap();
    alloc.free(x);
    // T's first miss recorded an event on S (its 15 MiB remainder); S's miss now records one on T.
    let _also_held = alloc.allocate(100, S).unwrap();
    assert_eq!(segments.load(Ordering::SeqCst), 3);
    assert_eq!(events.load(Ordering::SeqCst), 2);
    drop(alloc);
    assert_eq!(segments.load(Ordering::SeqCst), 0);
    assert_eq!(events.load(Ordering::SeqCst), 0);
}

#[test]
fn threads_share_one_allocator_and_never_share_bytes() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CachingAllocator<HostSource>>();
    let a = CachingAllocator::new(HostSource::backed(256 * MIB), AllocatorConfig::default()).unwrap();
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let a = &a;
            scope.spawn(move || {
                let stream = StreamId(10 + t);
                let mut live = Vec::new();
                let mut seed = 0x9e3779b97f4a7c15u64.wrapping_mul(t + 1);
                for i in 0..1500u64 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    if live.len() < 8 && !seed.is_multiple_of(3) {
                        let bytes = (seed % (3 * MIB as u64)) as usize + 1;
                        let b = a.allocate(bytes, stream).unwrap();
                        let tag = (t << 32) | i;
                        a.with_source(|s| s.write_canary(b.addr(), b.size(), tag));
                        live.push((b, tag));
                    } else if !live.is_empty() {
                        let (b, tag) = live.swap_remove((seed as usize / 3) % live.len());
                        assert!(
                            a.with_source(|s| s.check_canary(b.addr(), b.size(), tag)),
                            "bytes shared"
                        );
                        a.free(b);
                    }
                    if i % 100 == 0 {
                        a.with_source(|s| s.complete_all_events());
                    }
                }
                for (b, tag) in live {
                    assert!(
                        a.with_source(|s| s.check_canary(b.addr(), b.size(), tag)),
                        "bytes shared"
                    );
                    a.free(b);
                }
            });
        }
    });
    a.check_consistency().unwrap();
    assert_eq!(a.stats().allocated_bytes, 0);
    a.empty_cache().unwrap();
    assert_eq!(a.with_source(|s| (s.used_bytes(), s.live_segments())), (0, 0));
    assert_eq!(a.with_source(|s| s.pending_events()), 0);
}

#[test]
#[should_panic(expected = "did not hand out")]
fn a_block_given_to_the_wrong_allocator_is_refused() {
    let a = unbacked(1 << 30);
    let b = unbacked(1 << 30);
    let x = a.allocate(4096, S).unwrap();
    let _y = b.allocate(4096, S).unwrap(); // same address and slot in b: only the allocator id differs
    b.free(x);
}
