//! A long run near a full device: random request sizes (log-uniform from 512 B to 256 MiB), live bytes kept
//! under 2 GiB on a 2.5 GiB device (80% full), 200,000 operations on one stream. With the default split
//! limit no request may fail: the cache flushes and retries instead of dying of fragmentation. Without the
//! limit the same workload does fail, which shows the workload is hard enough to test the limit.

use nc_alloc::{AllocError, AllocatorConfig, AllocatorStats, CachingAllocator, HostSource, StreamId};

const S: StreamId = StreamId(3);
const LIVE_CAP: usize = 2 << 30;
const DEVICE: usize = 2560 << 20;

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Run the workload; returns the final statistics.
fn run(config: AllocatorConfig) -> AllocatorStats {
    let a = CachingAllocator::new(HostSource::unbacked(DEVICE), config).unwrap();
    let mut live = Vec::new();
    let mut live_bytes = 0usize;
    let mut rng = 0x2545f4914f6cdd1du64;
    for _ in 0..200_000 {
        let r = xorshift(&mut rng);
        // 2^(9 + 19u) bytes for u uniform in [0, 1): as many 1 KiB requests as 100 MiB ones.
        let exponent = 9.0 + (r % 1_000_000) as f64 / 1_000_000.0 * 19.0;
        let bytes = 2f64.powf(exponent) as usize;
        if live_bytes + bytes <= LIVE_CAP && (live.is_empty() || r.is_multiple_of(2)) {
            match a.allocate(bytes, S) {
                Ok(b) => {
                    live_bytes += b.size();
                    live.push(b);
                }
                Err(AllocError::OutOfMemory(_)) => {}
                Err(e) => panic!("unexpected error: {e}"),
            }
        } else if !live.is_empty() {
            let b = live.swap_remove((r >> 32) as usize % live.len());
            live_bytes -= b.size();
            a.free(b);
        }
    }
    a.check_consistency().unwrap();
    let stats = a.stats();
    eprintln!("max_split_size {} MiB:\n{}", config.max_split_size >> 20, a.summary());
    for b in live {
        a.free(b);
    }
    stats
}

#[test]
fn a_device_80_percent_full_never_ooms_with_the_split_limit() {
    let with_limit = run(AllocatorConfig::default());
    assert!(
        with_limit.num_allocs > 90_000,
        "the workload ran: {} allocations",
        with_limit.num_allocs
    );
    assert_eq!(
        with_limit.num_ooms, 0,
        "fragmentation OOMs with the default split limit"
    );
    assert!(
        with_limit.peak_allocated_bytes > LIVE_CAP * 9 / 10,
        "the device was really 80% full"
    );

    let without_limit = run(AllocatorConfig {
        max_split_size: usize::MAX,
        ..AllocatorConfig::default()
    });
    assert!(
        without_limit.num_ooms > 0,
        "without the split limit this workload fragments the device"
    );
}
