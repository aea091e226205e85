//! Collectives between processes, in the style of nccl-tests: for each size, the time per call, the
//! algorithm bandwidth (bytes of the buffer / time) and the bus bandwidth (algbw x 2(n-1)/n for
//! all-reduce, x (n-1)/n for reduce-scatter and all-gather: the bytes each link carries, so rings of
//! different sizes compare), for the shared-memory ring (`ShmRing`) at 2 and 4 processes, f32 and bf16,
//! beside this machine's single-thread memcpy bandwidth. When a CUDA device and libnccl are present the
//! same table is made for NCCL (`NcclRing`, device buffers, one process per GPU); otherwise one line says
//! why not. Not a criterion bench: every row needs all ranks in step.
//!
//! Run:   cargo bench -p nc-benches --bench comm_shm
//! Flags: --max-bytes N (268435456)  --worlds 2,4  --skip-nccl
//!
//! The bench re-runs its own executable as the ranks (env NC_COMM_BENCH_RANK set); rank 0 times each size
//! after a barrier, over enough calls to fill ~0.2 s, and prints the row. Times are rank 0's; the other
//! ranks finish within one slice of it.

use nc_comm::{bf16, even_bounds, Collective, NcclRing, Rendezvous, RendezvousConfig, ShmRing};
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq)]
enum Op {
    AllReduce,
    ReduceScatter,
    AllGather,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::ReduceScatter => "reduce_scatter",
            Op::AllGather => "all_gather",
        }
    }
    /// busbw / algbw, as nccl-tests defines it.
    fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Op::AllReduce => 2.0 * (n - 1.0) / n,
            Op::ReduceScatter | Op::AllGather => (n - 1.0) / n,
        }
    }
}

const OPS: [Op; 3] = [Op::AllReduce, Op::ReduceScatter, Op::AllGather];

struct Config {
    max_bytes: usize,
    worlds: Vec<usize>,
    skip_nccl: bool,
}

fn parse_args() -> Config {
    let mut c = Config {
        max_bytes: 256 << 20,
        worlds: vec![2, 4],
        skip_nccl: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--max-bytes" => {
                c.max_bytes = args[i + 1].parse().expect("--max-bytes N");
                i += 1;
            }
            "--worlds" => {
                c.worlds = args[i + 1]
                    .split(',')
                    .map(|s| s.parse().expect("--worlds 2,4"))
                    .collect();
                i += 1;
            }
            "--skip-nccl" => c.skip_nccl = true,
            _ => {} // cargo bench passes --bench
        }
        i += 1;
    }
    c
}

/// 8 B, 64 B, ... x8 up to max_bytes, and max_bytes itself.
fn sizes(max_bytes: usize) -> Vec<usize> {
    let mut v: Vec<usize> = std::iter::successors(Some(8usize), |s| Some(s * 8))
        .take_while(|&s| s <= max_bytes)
        .collect();
    if v.last() != Some(&max_bytes) {
        v.push(max_bytes);
    }
    v
}

/// Calls to time for a buffer of `bytes`: about 0.2 s at ~1 GB/s, at least 3, at most 2000.
fn iterations(bytes: usize) -> usize {
    (200_000_000 / bytes.max(1)).clamp(3, 2000)
}

fn env_usize(name: &str) -> usize {
    std::env::var(name).unwrap().parse().unwrap()
}

fn main() {
    if std::env::var("NC_COMM_BENCH_RANK").is_ok() {
        rank_main();
        return;
    }
    let cfg = parse_args();
    println!("memcpy (one thread, 256 MiB, this machine): {:.2} GB/s", memcpy_gbs());
    for &n in &cfg.worlds {
        launch("shm", n, &cfg);
    }
    if cfg.skip_nccl {
        return;
    }
    match nccl_world() {
        Ok(n) => launch("nccl", n, &cfg),
        Err(why) => println!("NCCL: skipped ({why})"),
    }
}

/// Single-thread copy bandwidth over buffers far larger than the caches (bytes read + written counted
/// once, as a copy's size, like algbw).
fn memcpy_gbs() -> f64 {
    let src = vec![1u8; 256 << 20];
    let mut dst = vec![0u8; 256 << 20];
    dst.copy_from_slice(&src);
    let t = Instant::now();
    let reps = 4;
    for _ in 0..reps {
        dst.copy_from_slice(std::hint::black_box(&src));
    }
    std::hint::black_box(&dst);
    (reps * src.len()) as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// GPUs NCCL can use here, or why none.
fn nccl_world() -> Result<usize, String> {
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver library".into());
    }
    let count = cudarc::driver::CudaContext::device_count().map_err(|e| format!("no CUDA device: {e:?}"))?;
    if count < 1 {
        return Err("no CUDA device".into());
    }
    if !nc_comm::nccl_available() {
        return Err(nc_comm::nccl::MISSING_NCCL.into());
    }
    // One process per GPU, the largest power of two that fits (nccl-tests' usual runs).
    Ok([8usize, 4, 2, 1].into_iter().find(|&n| n <= count as usize).unwrap())
}

fn launch(transport: &str, n: usize, cfg: &Config) {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let exe = std::env::current_exe().unwrap();
    println!("\n{transport}: {n} processes");
    println!("| op | dtype | size (B) | time (us) | algbw (GB/s) | busbw (GB/s) |");
    println!("|---|---|---:|---:|---:|---:|");
    let children: Vec<_> = (0..n)
        .map(|r| {
            Command::new(&exe)
                .env("NC_COMM_BENCH_RANK", r.to_string())
                .env("NC_COMM_BENCH_WORLD", n.to_string())
                .env("NC_COMM_BENCH_PORT", port.to_string())
                .env("NC_COMM_BENCH_MAX", cfg.max_bytes.to_string())
                .env("NC_COMM_BENCH_TRANSPORT", transport)
                .spawn()
                .unwrap()
        })
        .collect();
    for (r, mut c) in children.into_iter().enumerate() {
        let status = c.wait().unwrap();
        if !status.success() {
            println!("rank {r} failed ({status}); the table above is incomplete");
        }
    }
}

fn rank_main() {
    let (rank, n) = (env_usize("NC_COMM_BENCH_RANK"), env_usize("NC_COMM_BENCH_WORLD"));
    let port = env_usize("NC_COMM_BENCH_PORT") as u16;
    let max_bytes = env_usize("NC_COMM_BENCH_MAX");
    let cfg = RendezvousConfig {
        rank,
        world_size: n,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        timeout: Duration::from_secs(60),
    };
    let mut rdv = Rendezvous::join(&cfg, &[]).unwrap_or_else(|e| panic!("{e}"));
    match std::env::var("NC_COMM_BENCH_TRANSPORT").unwrap().as_str() {
        "shm" => {
            let mut ring = ShmRing::join(&mut rdv, &format!("bench-{port}"), Duration::from_secs(60)).unwrap();
            host_table(&mut ring, rank, n, max_bytes);
        }
        _ => nccl_table(&mut rdv, rank, n, max_bytes),
    }
}

fn row(op: Op, dtype: &str, bytes: usize, secs: f64, n: usize) {
    let algbw = bytes as f64 / secs / 1e9;
    println!(
        "| {} | {dtype} | {bytes} | {:.1} | {algbw:.3} | {:.3} |",
        op.name(),
        secs * 1e6,
        algbw * op.bus_factor(n)
    );
}

fn host_table(ring: &mut ShmRing, rank: usize, n: usize, max_bytes: usize) {
    for dtype in ["f32", "bf16"] {
        for op in OPS {
            for bytes in sizes(max_bytes) {
                let elem = if dtype == "f32" { 4 } else { 2 };
                let count = bytes / elem;
                let bounds = even_bounds(count, n);
                let mut f = vec![1.0f32; if dtype == "f32" { count } else { 0 }];
                let mut h = vec![bf16::ONE; if dtype == "bf16" { count } else { 0 }];
                let mut call = |ring: &mut ShmRing| match (dtype, op) {
                    ("f32", Op::AllReduce) => ring.all_reduce_sum(&mut f),
                    ("f32", Op::ReduceScatter) => ring.reduce_scatter_sum(&mut f, &bounds),
                    ("f32", Op::AllGather) => ring.all_gather(&mut f, &bounds),
                    (_, Op::AllReduce) => ring.all_reduce_sum_bf16(&mut h),
                    (_, Op::ReduceScatter) => ring.reduce_scatter_sum_bf16(&mut h, &bounds),
                    (_, Op::AllGather) => ring.all_gather_bf16(&mut h, &bounds),
                };
                call(ring).unwrap();
                ring.barrier().unwrap();
                let iters = iterations(bytes);
                let t = Instant::now();
                for _ in 0..iters {
                    call(ring).unwrap();
                }
                let secs = t.elapsed().as_secs_f64() / iters as f64;
                if rank == 0 {
                    row(op, dtype, bytes, secs, n);
                }
            }
        }
    }
}

/// UNVERIFIED (never run: no GPU where it was written). One GPU per rank; device buffers; each size timed
/// over `iterations` calls enqueued on the ring's stream, then one synchronize.
fn nccl_table(rdv: &mut Rendezvous, rank: usize, n: usize, max_bytes: usize) {
    let ctx = cudarc::driver::CudaContext::new(rank).unwrap();
    let stream = ctx.default_stream();
    let ring = NcclRing::join(rdv, stream.clone()).unwrap_or_else(|e| panic!("{e}"));
    for dtype in ["f32", "bf16"] {
        for op in OPS {
            for bytes in sizes(max_bytes) {
                let elem = if dtype == "f32" { 4 } else { 2 };
                let per_rank = bytes / elem / n;
                if per_rank == 0 {
                    continue;
                }
                let secs = if dtype == "f32" {
                    time_nccl::<f32>(&ring, &stream, op, per_rank, n, bytes)
                } else {
                    time_nccl::<bf16>(&ring, &stream, op, per_rank, n, bytes)
                };
                rdv.barrier().unwrap();
                if rank == 0 {
                    row(op, dtype, bytes, secs, n);
                }
            }
        }
    }
}

fn time_nccl<T>(
    ring: &NcclRing,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    op: Op,
    per_rank: usize,
    n: usize,
    bytes: usize,
) -> f64
where
    T: cudarc::nccl::NcclType + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
{
    let mut whole = stream.alloc_zeros::<T>(per_rank * n).unwrap();
    let mut part = stream.alloc_zeros::<T>(per_rank).unwrap();
    let mut call = || match op {
        Op::AllReduce => ring.all_reduce_device(&mut whole),
        Op::ReduceScatter => ring.reduce_scatter_device(&whole, &mut part),
        Op::AllGather => ring.all_gather_device(&part, &mut whole),
    };
    call().unwrap();
    stream.synchronize().unwrap();
    let iters = iterations(bytes);
    let t = Instant::now();
    for _ in 0..iters {
        call().unwrap();
    }
    stream.synchronize().unwrap();
    t.elapsed().as_secs_f64() / iters as f64
}
