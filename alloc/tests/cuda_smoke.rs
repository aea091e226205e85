//! The allocator on a real GPU through `CudaSource`. Runs only where the CUDA driver and a device exist
//! (it returns at once elsewhere, e.g. in CI); on a GPU machine: `cargo test -p nc-alloc --release
//! --test cuda_smoke -- --nocapture`. Exercises cuMemAlloc/cuMemFree, cuMemGetInfo and events recorded,
//! queried and waited on two real streams.

use cudarc::driver::result::stream;
use cudarc::driver::sys;
use nc_alloc::{AllocError, AllocatorConfig, CachingAllocator, CudaSource, StreamId};

#[test]
fn cuda_source_serves_the_allocator_on_a_gpu() {
    // SAFETY: only probes for the library.
    if !unsafe { sys::is_culib_present() } {
        eprintln!("no libcuda: CUDA smoke test not run");
        return;
    }
    let source = match CudaSource::new(0) {
        Ok(s) => s,
        Err(AllocError::NoDevice(msg)) => {
            eprintln!("no CUDA device ({msg}): CUDA smoke test not run");
            return;
        }
        Err(e) => panic!("unexpected error: {e}"),
    };
    let a = CachingAllocator::new(source, AllocatorConfig::default()).unwrap();
    let (free, total) = a
        .with_source(nc_alloc::MemorySource::memory_info)
        .expect("cuMemGetInfo");
    assert!(free <= total && total > 0);

    // cuMemAlloc made the context current on this thread, so streams can be created here.
    // Small-pool only, so the null stream's cache cannot compete with the large blocks below.
    let first = a.allocate(1000, StreamId(0)).unwrap();
    let (s_raw, t_raw) = (
        stream::create(stream::StreamKind::NonBlocking).unwrap(),
        stream::create(stream::StreamKind::NonBlocking).unwrap(),
    );
    let (s, t) = (StreamId(s_raw as u64), StreamId(t_raw as u64));

    let x = a.allocate(5 << 20, s).unwrap();
    assert_eq!(x.addr() % 512, 0);
    let x_addr = x.addr();
    a.free(x);
    let again = a.allocate(5 << 20, s).unwrap();
    assert_eq!(again.addr(), x_addr, "same stream: reused at once");
    a.free(again);
    // Stream t misses, which records an event on s; once s is idle the event completes and t may reuse.
    let y = a.allocate(64 << 10, t).unwrap();
    // SAFETY: a live stream created above.
    unsafe { stream::synchronize(s_raw) }.unwrap();
    a.process_events().unwrap();
    let z = a.allocate(5 << 20, t).unwrap();
    assert_eq!(z.addr(), x_addr, "after s's event completed, t takes s's block");
    assert!(a.stats().num_events_recorded >= 1);
    for b in [first, y, z] {
        a.free(b);
    }
    a.empty_cache().unwrap();
    assert_eq!(a.stats().reserved_bytes, 0);
    eprintln!("{}", a.summary());
    // SAFETY: streams created above; no work remains on them.
    unsafe {
        stream::destroy(s_raw).unwrap();
        stream::destroy(t_raw).unwrap();
    }
}
