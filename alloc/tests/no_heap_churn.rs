//! The hot path does not touch the heap: once the cache and the allocator's tables are warm, cached
//! alloc+free pairs make no call to the global allocator. Counted by a global allocator that tallies the
//! calls made on the test's own thread.

use nc_alloc::{AllocatorConfig, CachingAllocator, HostSource, StreamId};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct CountingAllocator;

thread_local! {
    static HEAP_CALLS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP_CALLS.with(|c| c.set(c.get() + 1));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HEAP_CALLS.with(|c| c.set(c.get() + 1));
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HEAP_CALLS.with(|c| c.set(c.get() + 1));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn heap_calls() -> u64 {
    HEAP_CALLS.with(|c| c.get())
}

/// A step-like pattern on two streams: blocks of many sizes, freed in an order different from the
/// allocation order, so blocks are split and merged every round.
fn one_round(a: &CachingAllocator<HostSource>, live: &mut Vec<nc_alloc::DeviceBlock>) {
    const SIZES: [usize; 10] = [
        100,
        4096,
        70_000,
        1 << 20,
        3 << 20,
        600,
        9 << 20,
        12 << 20,
        250_000,
        40 << 20,
    ];
    for (i, &bytes) in SIZES.iter().enumerate() {
        let stream = StreamId(1 + (i % 2) as u64);
        live.push(a.allocate(bytes, stream).unwrap());
    }
    // Free odd positions first, then the rest in reverse.
    let mut i = live.len();
    while i > 0 {
        i -= 1;
        if i % 2 == 1 {
            a.free(live.swap_remove(i));
        }
    }
    while let Some(b) = live.pop() {
        a.free(b);
    }
}

#[test]
fn cached_alloc_free_pairs_make_no_heap_calls() {
    let a = CachingAllocator::new(HostSource::unbacked(1 << 34), AllocatorConfig::default()).unwrap();
    let mut live = Vec::with_capacity(16);
    for _ in 0..3 {
        one_round(&a, &mut live);
    }
    let segments = a.stats().num_segment_allocs;
    let before = heap_calls();
    for _ in 0..1000 {
        one_round(&a, &mut live);
    }
    let after = heap_calls();
    assert_eq!(
        a.stats().num_segment_allocs,
        segments,
        "the warm cache must serve every request"
    );
    assert_eq!(
        after - before,
        0,
        "cached alloc/free pairs called the heap {} times",
        after - before
    );
    // The counter works: a heap allocation on this thread is seen.
    let v = std::hint::black_box(vec![1u8; 10]);
    assert!(heap_calls() > after);
    drop(v);
}
