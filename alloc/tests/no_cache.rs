//! The no-caching mode (`NC_NO_ALLOC_CACHE=1`, `AllocatorConfig::caching = false`) on the host source, which
//! answers what a memory checker would: is this byte range inside one live allocation?
//!
//! - each block is its own source allocation of exactly the requested bytes: a checker sees one byte past a
//!   tensor's end as out of bounds (with caching that byte is inside the shared segment, unseen);
//! - a free waits for the freeing stream to reach it (an event recorded on that stream, waited on), then
//!   gives the memory back: afterwards the checker sees any access to it as a use after free;
//! - the statistics stay truthful: reserved equals allocated equals the requests, one segment per block,
//!   the summary and the out-of-memory report say caching is off;
//! - random allocations and frees on several streams keep all of that (proptest).

use nc_alloc::{AllocError, AllocatorConfig, CachingAllocator, DeviceBlock, HostSource, StreamId};
use proptest::prelude::*;

const S: StreamId = StreamId(1);
const T: StreamId = StreamId(2);
const MIB: usize = 1 << 20;

fn uncached(source: HostSource) -> CachingAllocator<HostSource> {
    let config = AllocatorConfig {
        caching: false,
        ..AllocatorConfig::default()
    };
    CachingAllocator::new(source, config).unwrap()
}

fn live(a: &CachingAllocator<HostSource>, addr: u64, len: usize) -> bool {
    a.with_source(|s| s.range_is_live(addr, len))
}

#[test]
fn every_block_is_its_own_allocation_ending_where_the_tensor_ends() {
    for source in [HostSource::backed(64 * MIB), HostSource::unbacked(64 * MIB)] {
        let a = uncached(source);
        // sizes in both pools, not multiples of 512 (the caching allocator would round them all)
        let blocks: Vec<DeviceBlock> = [4000, 1, 0, 3 * MIB + 12, 12 * MIB + 4]
            .into_iter()
            .map(|bytes| a.allocate(bytes, S).unwrap())
            .collect();
        for b in &blocks {
            let want = b.requested().max(1);
            assert_eq!(b.size(), want, "the block is the request, not a rounded size");
            assert_eq!(b.addr() % 512, 0);
            assert_eq!(
                a.with_source(|s| s.segment_containing(b.addr())),
                Some((b.addr(), want)),
                "one source allocation per block"
            );
            assert!(live(&a, b.addr(), want));
            assert!(
                !live(&a, b.addr(), want + 1),
                "one byte past the tensor must be out of bounds"
            );
        }
        assert_eq!(a.with_source(|s| s.allocate_calls), blocks.len() as u64);
        for b in blocks {
            a.free(b);
        }
    }

    // The same tensor under the caching allocator: the byte past its end lies inside the shared segment,
    // which is why the memory checks need this mode.
    let cached = CachingAllocator::new(HostSource::unbacked(64 * MIB), AllocatorConfig::default()).unwrap();
    let b = cached.allocate(4000, S).unwrap();
    assert!(cached.with_source(|s| s.range_is_live(b.addr(), 4001)));
    cached.free(b);
}

#[test]
fn a_free_waits_for_its_stream_then_gives_the_memory_back() {
    let a = uncached(HostSource::backed(64 * MIB));
    let x = a.allocate(5000, S).unwrap();
    let y = a.allocate(7000, T).unwrap();
    let (x_addr, y_addr) = (x.addr(), y.addr());
    a.free(x);
    // One event recorded on S, and the host waited on it before the release.
    let records = a.with_source(|s| s.event_records().to_vec());
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].stream, S);
    assert!(
        records[0].completed,
        "the free must wait for its stream before releasing"
    );
    assert!(
        !live(&a, x_addr, 1),
        "freed memory must be gone: a later access is a use after free"
    );
    assert!(live(&a, y_addr, 7000), "the other block is untouched");
    // Freed on another stream than it was allocated on: the wait is on the freeing stream.
    a.free_on_stream(y, S);
    let records = a.with_source(|s| s.event_records().to_vec());
    assert_eq!((records.len(), records[1].stream, records[1].completed), (2, S, true));
    assert!(!live(&a, y_addr, 1));
    assert_eq!(
        a.with_source(|s| (s.used_bytes(), s.live_segments(), s.release_calls)),
        (0, 0, 2)
    );
}

#[test]
fn the_statistics_say_what_was_allocated_and_that_nothing_is_cached() {
    let a = uncached(HostSource::unbacked(64 * MIB));
    let x = a.allocate(4000, S).unwrap();
    let y = a.allocate(3 * MIB + 12, S).unwrap();
    let s = a.stats();
    assert!(!s.caching);
    let both = 4000 + 3 * MIB + 12;
    assert_eq!(
        (s.allocated_bytes, s.requested_bytes, s.reserved_bytes),
        (both, both, both)
    );
    assert_eq!((s.num_allocs, s.num_segment_allocs), (2, 2));
    assert_eq!((s.segments_small, s.segments_large, s.live_blocks), (1, 1, 2));
    a.free(x);
    let s = a.stats();
    assert_eq!((s.allocated_bytes, s.reserved_bytes), (3 * MIB + 12, 3 * MIB + 12));
    assert_eq!((s.num_frees, s.num_segment_frees, s.segments_small), (1, 1, 0));
    assert_eq!((s.peak_allocated_bytes, s.peak_reserved_bytes), (both, both));
    assert_eq!(
        (s.free_blocks, s.cached_free_bytes(), s.active_bytes),
        (0, 0, 3 * MIB + 12)
    );
    assert!(
        a.summary().contains("no caching (NC_NO_ALLOC_CACHE=1)"),
        "{}",
        a.summary()
    );
    a.free(y);
    assert_eq!(a.with_source(|s| s.used_bytes()), 0);
    a.check_consistency().unwrap();

    // Out of memory: the report says caching is off and nothing was flushed.
    let small = uncached(HostSource::unbacked(MIB));
    let held = small.allocate(MIB - 100, S).unwrap();
    let report = match small.allocate(200, S) {
        Err(AllocError::OutOfMemory(r)) => r,
        other => panic!("expected out of memory, got {other:?}"),
    };
    assert!(!report.caching);
    assert_eq!((report.requested, report.segment_size), (200, 200));
    let text = report.to_string();
    assert!(
        text.contains("caching is off (NC_NO_ALLOC_CACHE=1") && !text.contains("cached segments were"),
        "{text}"
    );
    let s = small.stats();
    assert_eq!((s.num_ooms, s.num_cache_flushes), (1, 0));
    small.free(held);
}

#[derive(Debug, Clone)]
enum Op {
    Alloc { bytes: usize, stream: usize },
    Free { index: usize, stream: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..3 * MIB, 0usize..2).prop_map(|(bytes, stream)| Op::Alloc { bytes, stream }),
        2 => (any::<usize>(), 0usize..2).prop_map(|(index, stream)| Op::Free { index, stream }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// After every step: each held block is exactly one live source allocation, nothing else is live, and
    /// the statistics equal the sums over the held blocks.
    #[test]
    fn random_allocations_and_frees_keep_one_allocation_per_block(ops in prop::collection::vec(op(), 1..60)) {
        let a = uncached(HostSource::backed(16 * MIB));
        let streams = [S, T];
        let mut held: Vec<DeviceBlock> = Vec::new();
        for op in ops {
            match op {
                Op::Alloc { bytes, stream } => match a.allocate(bytes, streams[stream]) {
                    Ok(b) => held.push(b),
                    Err(AllocError::OutOfMemory(_)) => {
                        let used = a.with_source(|s| s.used_bytes());
                        prop_assert!(used + bytes.max(1) > 16 * MIB, "OOM with room left");
                    }
                    Err(e) => panic!("{e}"),
                },
                Op::Free { index, stream } => {
                    if !held.is_empty() {
                        let b = held.swap_remove(index % held.len());
                        let addr = b.addr();
                        a.free_on_stream(b, streams[stream]);
                        prop_assert!(!live(&a, addr, 1));
                    }
                }
            }
            let total: usize = held.iter().map(|b| b.size()).sum();
            for b in &held {
                prop_assert_eq!(a.with_source(|s| s.segment_containing(b.addr())), Some((b.addr(), b.size())));
            }
            prop_assert_eq!(a.with_source(|s| (s.live_segments(), s.used_bytes())), (held.len(), total));
            let s = a.stats();
            prop_assert_eq!((s.allocated_bytes, s.reserved_bytes, s.live_blocks), (total, total, held.len()));
            prop_assert_eq!(a.with_source(|s| s.pending_events()), 0);
            a.check_consistency().map_err(TestCaseError::fail)?;
        }
        for b in held {
            a.free(b);
        }
        prop_assert_eq!(a.with_source(|s| s.used_bytes()), 0);
    }
}
