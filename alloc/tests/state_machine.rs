//! Property test: random sequences of allocations, frees (on the block's stream or another), event
//! completions, event polling and cache flushes, checked against a simple model after every step.
//!
//! The model is the list of live blocks the test holds, plus, for every freed byte range, the stream it
//! was freed on and how many events had been recorded at that moment. Invariants checked after each step:
//! - segments do not overlap, and the blocks of each segment tile it exactly;
//! - the allocated blocks are exactly the blocks the test holds, and no two overlap;
//! - every statistic equals a recount from the segment snapshot and the source;
//! - the allocator's own structure (links, pools, merges) is consistent.
//!
//! On each allocation: memory last freed on another stream is handed out only if an event recorded on
//! that stream after the free has completed. On each free: the block's canary (a tag at every 512-byte
//! granule, written by the host source at allocation) is intact, so no bytes were handed out twice.
//! At the end: after freeing everything and flushing, the source holds nothing.

use nc_alloc::sizes::{block_size_for, segment_size_for};
use nc_alloc::{
    AllocError, AllocatorConfig, BlockState, CachingAllocator, DeviceBlock, HostSource, PoolKind, StreamId,
};
use proptest::prelude::*;

const MIB: usize = 1 << 20;
const CAPACITY: usize = 96 * MIB;
const STREAMS: [StreamId; 3] = [StreamId(0xa), StreamId(0xb), StreamId(0xc)];

#[derive(Debug, Clone)]
enum Op {
    Alloc {
        bytes: usize,
        stream: usize,
    },
    /// Free the live block at `index % live.len()`, on its own stream or on `other` stream.
    Free {
        index: usize,
        other: Option<usize>,
    },
    CompleteOldestEvent {
        stream: usize,
    },
    CompleteAllEvents,
    ProcessEvents,
    EmptyCache,
}

fn request_size() -> impl Strategy<Value = usize> {
    prop_oneof![
        12 => 0usize..=64 << 10,
        5 => (64usize << 10)..=(MIB + 4096),
        2 => (MIB + 1)..=12 * MIB,
        1 => (12 * MIB)..=40 * MIB,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (request_size(), 0..STREAMS.len()).prop_map(|(bytes, stream)| Op::Alloc { bytes, stream }),
        8 => (any::<usize>(), prop::option::weighted(0.2, 0..STREAMS.len()))
            .prop_map(|(index, other)| Op::Free { index, other }),
        2 => (0..STREAMS.len()).prop_map(|stream| Op::CompleteOldestEvent { stream }),
        1 => Just(Op::CompleteAllEvents),
        1 => Just(Op::ProcessEvents),
        1 => Just(Op::EmptyCache),
    ]
}

struct Live {
    block: DeviceBlock,
    tag: u64,
}

/// A byte range whose last use ended with a free on `stream`, when `events_before` events existed.
#[derive(Debug, Clone, Copy)]
struct Freed {
    start: u64,
    end: u64,
    stream: StreamId,
    events_before: usize,
}

struct Model {
    live: Vec<Live>,
    freed: Vec<Freed>,
    next_tag: u64,
}

fn overlaps(a0: u64, a1: u64, b0: u64, b1: u64) -> bool {
    a0 < b1 && b0 < a1
}

impl Model {
    /// The new block [start, end) on `stream`: every byte last freed on another stream must be covered by
    /// a completed event recorded on that stream after the free. Then the range is no longer "freed".
    fn claim(&mut self, start: u64, end: u64, stream: StreamId, alloc: &CachingAllocator<HostSource>) {
        let records = alloc.with_source(|s| s.event_records().to_vec());
        let mut kept = Vec::with_capacity(self.freed.len());
        for f in self.freed.drain(..) {
            if !overlaps(f.start, f.end, start, end) {
                kept.push(f);
                continue;
            }
            if f.stream != stream {
                let safe = records[f.events_before..]
                    .iter()
                    .any(|r| r.stream == f.stream && r.completed);
                assert!(
                    safe,
                    "{stream} got {start:#x}..{end:#x}, which overlaps {:#x}..{:#x} freed on {} with no completed \
                     event after the free",
                    f.start, f.end, f.stream
                );
            }
            if f.start < start {
                kept.push(Freed { end: start, ..f });
            }
            if f.end > end {
                kept.push(Freed { start: end, ..f });
            }
        }
        self.freed = kept;
    }
}

fn check_invariants(alloc: &CachingAllocator<HostSource>, model: &Model) {
    alloc.check_consistency().unwrap();
    let snap = alloc.snapshot();
    let stats = alloc.stats();

    let mut allocated_blocks = Vec::new();
    let (mut free_blocks, mut largest_free, mut waiting) = (0usize, 0usize, 0usize);
    let (mut small, mut large, mut reserved, mut split_free) = (0usize, 0usize, 0usize, 0usize);
    let mut prev_end = 0u64;
    for seg in &snap {
        assert!(seg.addr >= prev_end, "segments overlap at {:#x}", seg.addr);
        prev_end = seg.addr + seg.size as u64;
        reserved += seg.size;
        match seg.kind {
            PoolKind::Small => small += 1,
            PoolKind::Large => large += 1,
        }
        let mut at = seg.addr;
        for b in &seg.blocks {
            assert_eq!(b.addr, at, "blocks of segment {:#x} do not tile it", seg.addr);
            assert!(b.size > 0 && b.size % 512 == 0, "block size {}", b.size);
            at += b.size as u64;
            match b.state {
                BlockState::Allocated { stream } => allocated_blocks.push((b.addr, b.size, stream)),
                BlockState::Free { waiting: w, .. } => {
                    free_blocks += 1;
                    largest_free = largest_free.max(b.size);
                    if w {
                        waiting += b.size;
                    }
                }
            }
        }
        assert_eq!(at, prev_end, "blocks of segment {:#x} do not reach its end", seg.addr);
        if seg
            .blocks
            .iter()
            .any(|b| matches!(b.state, BlockState::Allocated { .. }))
        {
            split_free += seg
                .blocks
                .iter()
                .filter(|b| matches!(b.state, BlockState::Free { .. }))
                .map(|b| b.size)
                .sum::<usize>();
        }
    }

    let mut held: Vec<(u64, usize, StreamId)> = model
        .live
        .iter()
        .map(|l| (l.block.addr(), l.block.size(), l.block.stream()))
        .collect();
    held.sort();
    allocated_blocks.sort();
    assert_eq!(
        allocated_blocks, held,
        "allocated blocks differ from the blocks the test holds"
    );
    for w in held.windows(2) {
        assert!(
            w[0].0 + w[0].1 as u64 <= w[1].0,
            "live blocks overlap: {:?} and {:?}",
            w[0],
            w[1]
        );
    }

    let allocated: usize = held.iter().map(|h| h.1).sum();
    let requested: usize = model.live.iter().map(|l| l.block.requested()).sum();
    assert_eq!(stats.allocated_bytes, allocated);
    assert_eq!(stats.requested_bytes, requested);
    assert_eq!(stats.reserved_bytes, reserved);
    assert_eq!(stats.active_bytes, allocated + waiting);
    assert_eq!(stats.live_blocks, model.live.len());
    assert_eq!(stats.free_blocks, free_blocks);
    assert_eq!(stats.largest_free_block, largest_free);
    assert_eq!(stats.inactive_split_bytes, split_free);
    assert_eq!((stats.segments_small, stats.segments_large), (small, large));
    assert_eq!(stats.num_segment_allocs - stats.num_segment_frees, snap.len() as u64);
    assert!(stats.peak_allocated_bytes >= stats.allocated_bytes);
    assert!(stats.peak_reserved_bytes >= stats.reserved_bytes);
    assert!(stats.peak_active_bytes >= stats.active_bytes);
    let (used, segments) = alloc.with_source(|s| (s.used_bytes(), s.live_segments()));
    assert_eq!(
        (used, segments),
        (reserved, snap.len()),
        "the source and the allocator disagree"
    );
}

fn run(ops: Vec<Op>, max_split_size: usize) {
    let alloc = CachingAllocator::new(
        HostSource::backed(CAPACITY),
        AllocatorConfig {
            max_split_size,
            ..AllocatorConfig::default()
        },
    )
    .unwrap();
    let mut model = Model {
        live: Vec::new(),
        freed: Vec::new(),
        next_tag: 1,
    };
    for op in ops {
        match op {
            Op::Alloc { bytes, stream } => {
                let stream = STREAMS[stream];
                let ooms_before = alloc.stats().num_ooms;
                match alloc.allocate(bytes, stream) {
                    Ok(block) => {
                        assert!(block.size() >= bytes && block.addr() % 512 == 0);
                        assert_eq!(block.stream(), stream);
                        model.claim(block.addr(), block.addr() + block.size() as u64, stream, &alloc);
                        let tag = model.next_tag;
                        model.next_tag += 1;
                        alloc.with_source(|s| s.write_canary(block.addr(), block.size(), tag));
                        model.live.push(Live { block, tag });
                    }
                    Err(AllocError::OutOfMemory(report)) => {
                        assert_eq!(report.requested, bytes);
                        let need = segment_size_for(block_size_for(bytes).unwrap()).unwrap();
                        assert_eq!(report.segment_size, need);
                        let used = alloc.with_source(|s| s.used_bytes());
                        assert!(used + need > CAPACITY, "OOM with room for the segment: {used} + {need}");
                        assert_eq!(alloc.stats().num_ooms, ooms_before + 1);
                        // The flush gave back every segment with no allocated block.
                        for seg in alloc.snapshot() {
                            assert!(
                                seg.blocks
                                    .iter()
                                    .any(|b| matches!(b.state, BlockState::Allocated { .. })),
                                "an unused segment survived the OOM flush"
                            );
                        }
                    }
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
            Op::Free { index, other } => {
                if model.live.is_empty() {
                    continue;
                }
                let Live { block, tag } = model.live.swap_remove(index % model.live.len());
                let intact = alloc.with_source(|s| s.check_canary(block.addr(), block.size(), tag));
                assert!(
                    intact,
                    "block {:#x}+{} was overwritten: handed out twice",
                    block.addr(),
                    block.size()
                );
                let stream = other.map_or(block.stream(), |s| STREAMS[s]);
                let events_before = alloc.with_source(|s| s.event_records().len());
                let (start, end) = (block.addr(), block.addr() + block.size() as u64);
                model.freed.push(Freed {
                    start,
                    end,
                    stream,
                    events_before,
                });
                alloc.free_on_stream(block, stream);
            }
            Op::CompleteOldestEvent { stream } => {
                alloc.with_source(|s| s.complete_oldest_event(STREAMS[stream]));
            }
            Op::CompleteAllEvents => alloc.with_source(|s| s.complete_all_events()),
            Op::ProcessEvents => alloc.process_events().unwrap(),
            Op::EmptyCache => {
                alloc.empty_cache().unwrap();
                // Only segments holding an allocated block survive a flush.
                for seg in alloc.snapshot() {
                    assert!(seg
                        .blocks
                        .iter()
                        .any(|b| matches!(b.state, BlockState::Allocated { .. })));
                }
            }
        }
        check_invariants(&alloc, &model);
    }
    for Live { block, tag } in model.live.drain(..) {
        assert!(
            alloc.with_source(|s| s.check_canary(block.addr(), block.size(), tag)),
            "canary broken"
        );
        alloc.free(block);
    }
    alloc.empty_cache().unwrap();
    check_invariants(&alloc, &model);
    assert_eq!(
        alloc.with_source(|s| (s.used_bytes(), s.live_segments())),
        (0, 0),
        "the source still holds memory"
    );
    let stats = alloc.stats();
    assert_eq!(
        (stats.reserved_bytes, stats.allocated_bytes, stats.active_bytes),
        (0, 0, 0)
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_every_invariant(
        ops in prop::collection::vec(op(), 1..160),
        max_split_size in prop_oneof![Just(21 * MIB), Just(32 * MIB), Just(512 * MIB)],
    ) {
        run(ops, max_split_size);
    }
}
