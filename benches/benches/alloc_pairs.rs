//! Allocator: the cost of one alloc+free pair served from the warm cache, against the raw host source
//! (a fresh host allocation per pair, as a cache-less allocator would do) and the system allocator.
//!
//! cargo bench -p nc-benches --bench alloc_pairs

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use nc_alloc::{AllocatorConfig, CachingAllocator, HostSource, MemorySource, StreamId};
use std::alloc::{alloc, dealloc, Layout};

const STREAM: StreamId = StreamId(1);
const SIZES: [(&str, usize); 3] = [("4KiB", 4 << 10), ("256KiB", 256 << 10), ("8MiB", 8 << 20)];

fn warm_allocator() -> CachingAllocator<HostSource> {
    let a = CachingAllocator::new(HostSource::unbacked(1 << 36), AllocatorConfig::default()).unwrap();
    // Keep some live blocks around so the pools are not trivially empty.
    for bytes in [512usize, 3000, 70_000, 2 << 20, 12 << 20] {
        let b = a.allocate(bytes, STREAM).unwrap();
        a.free(b);
    }
    a
}

fn pairs(c: &mut Criterion) {
    let mut group = c.benchmark_group("alloc_pair");
    for (name, bytes) in SIZES {
        let a = warm_allocator();
        group.bench_function(BenchmarkId::new("cached", name), |b| {
            b.iter(|| {
                let block = a.allocate(black_box(bytes), STREAM).unwrap();
                a.free(black_box(block));
            })
        });

        let mut src = HostSource::backed(1 << 34);
        group.bench_function(BenchmarkId::new("raw_host_source", name), |b| {
            b.iter(|| {
                let addr = src.allocate(black_box(bytes)).unwrap();
                src.release(black_box(addr), bytes).unwrap();
            })
        });

        let layout = Layout::from_size_align(bytes, 512).unwrap();
        group.bench_function(BenchmarkId::new("system_allocator", name), |b| {
            b.iter(|| {
                // SAFETY: non-zero size; freed with the same layout at once.
                unsafe {
                    let p = alloc(black_box(layout));
                    dealloc(black_box(p), layout);
                }
            })
        });
    }
    group.finish();
}

/// A step-like pattern: 48 live blocks of mixed sizes; each iteration frees the oldest and allocates
/// the next size of a fixed cycle, so blocks are split and merged as in a real step.
fn mixed(c: &mut Criterion) {
    const CYCLE: [usize; 12] = [
        512,
        4096,
        100_000,
        1 << 20,
        3 << 20,
        7 << 20,
        16 << 20,
        64 << 20,
        2048,
        300_000,
        5 << 20,
        40 << 20,
    ];
    let a = warm_allocator();
    let mut live = std::collections::VecDeque::new();
    let mut i = 0usize;
    for _ in 0..48 {
        live.push_back(a.allocate(CYCLE[i % CYCLE.len()], STREAM).unwrap());
        i += 1;
    }
    // One full pass more so every segment the pattern needs exists before timing.
    for _ in 0..CYCLE.len() * 8 {
        a.free(live.pop_front().unwrap());
        live.push_back(a.allocate(CYCLE[i % CYCLE.len()], STREAM).unwrap());
        i += 1;
    }
    let segments = a.stats().num_segment_allocs;
    c.bench_function("alloc_pair/cached_mixed_48_live", |b| {
        b.iter(|| {
            a.free(live.pop_front().unwrap());
            live.push_back(a.allocate(black_box(CYCLE[i % CYCLE.len()]), STREAM).unwrap());
            i += 1;
        })
    });
    assert_eq!(
        a.stats().num_segment_allocs,
        segments,
        "the mixed pattern must run from the cache"
    );
    for b in live {
        a.free(b);
    }
}

criterion_group!(benches, pairs, mixed);
criterion_main!(benches);
