//! Allocator: the cost of one alloc+free pair served from the warm cache, against the raw host source
//! (a fresh host allocation per pair, as a cache-less allocator would do) and the system allocator.
//!
//! cargo bench -p nc-benches --bench alloc_pairs
//!
//! Each case runs twice: `alloc_pair/...` in wall time (criterion's default) and `alloc_pair_cpu/...` in
//! the benchmark thread's CPU time. On a shared machine a loaded CPU inflates wall time by the share of
//! time the thread is not running; thread CPU time leaves that out.

use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nc_alloc::{AllocatorConfig, CachingAllocator, HostSource, MemorySource, StreamId};
use std::alloc::{alloc, dealloc, Layout};

const STREAM: StreamId = StreamId(1);
const SIZES: [(&str, usize); 3] = [("4KiB", 4 << 10), ("256KiB", 256 << 10), ("8MiB", 8 << 20)];

/// CPU time of the calling thread (CLOCK_THREAD_CPUTIME_ID), in nanoseconds.
struct ThreadCpuTime;

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a valid out pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_ns() - start
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, value: &u64) -> f64 {
        *value as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &NanosFormatter
    }
}

/// Formats nanoseconds as "ns (cpu)" / "us (cpu)" / "ms (cpu)".
struct NanosFormatter;

impl ValueFormatter for NanosFormatter {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = if typical < 1e3 {
            (1.0, "ns (cpu)")
        } else if typical < 1e6 {
            (1e-3, "us (cpu)")
        } else {
            (1e-6, "ms (cpu)")
        };
        for v in values {
            *v *= factor;
        }
        unit
    }
    fn scale_throughputs(&self, _typical: f64, throughput: &Throughput, values: &mut [f64]) -> &'static str {
        let per_iter = match throughput {
            Throughput::Elements(n) | Throughput::Bytes(n) | Throughput::BytesDecimal(n) => *n as f64,
        };
        for v in values {
            *v = per_iter * 1e9 / *v;
        }
        "per cpu-second"
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

/// An allocator whose pools already hold segments of each size class.
fn warm_allocator() -> CachingAllocator<HostSource> {
    let a = CachingAllocator::new(HostSource::unbacked(1 << 36), AllocatorConfig::default()).unwrap();
    for bytes in [512usize, 3000, 70_000, 2 << 20, 12 << 20] {
        let b = a.allocate(bytes, STREAM).unwrap();
        a.free(b);
    }
    a
}

fn pairs<M: Measurement>(c: &mut Criterion<M>, group_name: &str) {
    let mut group = c.benchmark_group(group_name);
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
    mixed(&mut group);
    group.finish();
}

/// A step-like pattern: 48 live blocks of mixed sizes; each iteration frees the oldest and allocates
/// the next size of a fixed cycle, so blocks are split and merged as in a real step.
fn mixed<M: Measurement>(group: &mut criterion::BenchmarkGroup<'_, M>) {
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
    // Eight full cycles more so every segment the pattern needs exists before timing.
    for _ in 0..CYCLE.len() * 8 {
        a.free(live.pop_front().unwrap());
        live.push_back(a.allocate(CYCLE[i % CYCLE.len()], STREAM).unwrap());
        i += 1;
    }
    let segments = a.stats().num_segment_allocs;
    group.bench_function("cached_mixed_48_live", |b| {
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

fn wall_time(c: &mut Criterion) {
    pairs(c, "alloc_pair");
}

fn cpu_time(c: &mut Criterion<ThreadCpuTime>) {
    pairs(c, "alloc_pair_cpu");
}

criterion_group!(wall, wall_time);
criterion_group! {
    name = cpu;
    config = Criterion::default().with_measurement(ThreadCpuTime);
    targets = cpu_time
}
criterion_main!(wall, cpu);
