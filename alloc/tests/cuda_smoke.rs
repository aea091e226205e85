//! The allocator on a CUDA device through `CudaSource`: a real GPU where there is one; elsewhere the test
//! re-runs itself on the simulated GPU in a child process (tests/src/sim.rs) and passes only if it passed
//! there, or prints why it did not run where the simulator cannot be built (no g++). On a GPU machine:
//! `cargo test -p nc-alloc --release --test cuda_smoke -- --nocapture`. Exercises cuMemAlloc/cuMemFree,
//! cuMemGetInfo and events recorded, queried and waited on two real streams, and the no-caching mode
//! (every block its own cuMemAlloc, given back on free).

use cudarc::driver::result::stream;
use cudarc::driver::sys;
use nc_alloc::{AllocError, AllocatorConfig, CachingAllocator, CudaSource, StreamId};

// The simulated-GPU harness of nc-tests (std only); nc-alloc cannot depend on nc-tests, which depends on it.
#[allow(dead_code)]
#[path = "../../tests/src/sim.rs"]
mod sim;

/// The source on device 0, or None when the test must return: it passed on the simulated GPU in a child
/// process, or there is no device of any kind (a failure under NC_REQUIRE_CUDA=1).
fn source_or_simulated() -> Option<CudaSource> {
    // SAFETY: only probes for the library.
    let why = if !unsafe { sys::is_culib_present() } {
        "no libcuda".to_string()
    } else {
        match CudaSource::new(0) {
            Ok(s) => return Some(s),
            Err(AllocError::NoDevice(msg)) => msg,
            Err(e) => panic!("unexpected error: {e}"),
        }
    };
    match sim::run_this_test_simulated(&[]) {
        sim::Simulated::Passed => None,
        sim::Simulated::Unavailable(no_sim) => {
            if std::env::var_os("NC_REQUIRE_CUDA").is_some() {
                panic!("NC_REQUIRE_CUDA is set but there is no CUDA device ({why}) and no simulated GPU ({no_sim})");
            }
            eprintln!("no CUDA device ({why}) and no simulated GPU ({no_sim}): CUDA smoke test not run");
            None
        }
    }
}

#[test]
fn cuda_source_serves_the_allocator_on_a_gpu() {
    let Some(source) = source_or_simulated() else { return };
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

    // No caching: one cuMemAlloc of exactly the request per block, cuMemFree (after the stream's work) on free.
    let config = AllocatorConfig {
        caching: false,
        ..AllocatorConfig::default()
    };
    let u = CachingAllocator::new(CudaSource::new(0).unwrap(), config).unwrap();
    let (b1, b2) = (u.allocate((3 << 20) + 12, s).unwrap(), u.allocate(4000, t).unwrap());
    assert_eq!((b1.size(), b2.size()), ((3 << 20) + 12, 4000));
    let st = u.stats();
    assert_eq!((st.num_segment_allocs, st.reserved_bytes), (2, (3 << 20) + 4012));
    u.free(b1);
    u.free(b2);
    let st = u.stats();
    assert_eq!((st.num_segment_frees, st.reserved_bytes, st.allocated_bytes), (2, 0, 0));
    assert!(st.num_events_recorded >= 2, "each free waits for its stream");
    eprintln!("{}", u.summary());
    // SAFETY: streams created above; no work remains on them.
    unsafe {
        stream::destroy(s_raw).unwrap();
        stream::destroy(t_raw).unwrap();
    }
}
