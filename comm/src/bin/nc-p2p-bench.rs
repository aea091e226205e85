//! nc-p2p-bench: checks the GPU peer-to-peer ring against host reductions, then times it beside NCCL in an
//! nccl-tests-style table. UNVERIFIED: written without a GPU; scripts/gpu_check.sh's `p2p` step runs it.
//!
//! Run it plainly (`nc-p2p-bench --nproc 4`): it starts that many copies of itself as ranks (the torchrun
//! variables, MASTER_ADDR 127.0.0.1 and a free port) and exits non-zero if any failed. Rank r uses GPU
//! r mod (GPUs visible); with fewer GPUs than ranks, ranks share GPUs: CUDA IPC between processes on one GPU
//! works, so the ring's results and protocol are checked, but the times say nothing about NVLink, and NCCL
//! refuses two ranks on one GPU, so its columns are skipped with that reason. Without a GPU it prints why
//! it skipped and exits 0.
//!
//! Check (every rank, bit for bit; each rank builds every rank's input from the rank number):
//! one-shot all-reduce = the f32 sum in rank order 0..n-1 (bf16: rounded once); ring reduce-scatter of even
//! and uneven bounds = the f32 sum in `schedule::sum_order`; ring all-gather = the owners' chunks; and
//! all-reduce above the one-shot threshold = reduce-scatter then all-gather.
//!
//! Bench (rank 0 prints): sizes from --min-bytes (8) to --max-bytes (1 GiB) doubling; all-reduce,
//! reduce-scatter and all-gather over a buffer of that many bytes, f32 and bf16; time per call (mean of
//! several after warm-up, rank 0's), algbw = bytes / time, busbw = algbw x 2(n-1)/n (all-reduce) or
//! (n-1)/n (reduce-scatter, all-gather), as nccl-tests reports them.
//!
//! Crossover (rank 0 prints, after the table): the all-reduce timed both ways on one ring whose one-shot
//! area holds --crossover-max bytes (default 4M; 0 skips it), sizes doubling from 1 KiB: one-shot against
//! reduce-scatter + all-gather, f32 and bf16, and the largest size up to which the one-shot was faster at
//! every size: the value for NC_P2P_ONE_SHOT_BYTES (the ring's threshold, a guess of 256 KiB until measured).
//!
//! The checks also run a "bucket": three tensors with gaps between them in one span of a buffer, each with
//! its own bounds, in one launch (`reduce_scatter_pieces` / `all_gather_pieces` on raw addresses, as the
//! ZeRO-1 exchange calls them): owned parts = the ring-order sums, elements outside the pieces untouched.
//!
//! Flags: --nproc N (default 2), --min-bytes B, --max-bytes B, --crossover-max B (suffixes K, M, G),
//! --check-only, --timeout-s S (a peer wait, default 60). The ring's one-shot threshold is the default or
//! NC_P2P_ONE_SHOT_BYTES.

use cudarc::driver::DevicePtrMut;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use nc_comm::p2p::parse_byte_count;
use nc_comm::schedule::sum_order;
use nc_comm::{
    bf16, even_bounds, nccl_available, Bounds, NcclRing, P2pOptions, P2pRing, Piece, Rendezvous, RendezvousConfig,
};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    nproc: usize,
    min_bytes: usize,
    max_bytes: usize,
    check_only: bool,
    timeout: Duration,
    crossover_max: usize,
}

fn parse_bytes(flag: &str, v: &str) -> Result<usize, String> {
    parse_byte_count(v)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("{flag} {v:?}: expected a positive byte count like 8, 64K, 256M, 1G"))
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        nproc: 2,
        min_bytes: 8,
        max_bytes: 1 << 30,
        check_only: false,
        timeout: Duration::from_secs(60),
        crossover_max: 4 << 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--nproc" => {
                let v = value()?;
                a.nproc = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| format!("--nproc {v:?}: expected 1..=64"))?;
            }
            "--min-bytes" => a.min_bytes = parse_bytes("--min-bytes", &value()?)?,
            "--max-bytes" => a.max_bytes = parse_bytes("--max-bytes", &value()?)?,
            "--crossover-max" => {
                let v = value()?;
                a.crossover_max = if v == "0" {
                    0
                } else {
                    parse_bytes("--crossover-max", &v)?
                };
                if a.crossover_max > nc_comm::p2p::MAX_ONE_SHOT_BYTES {
                    return Err(format!(
                        "--crossover-max {v}: at most {} MiB (the largest one-shot area)",
                        nc_comm::p2p::MAX_ONE_SHOT_BYTES >> 20
                    ));
                }
            }
            "--check-only" => a.check_only = true,
            "--timeout-s" => {
                let v = value()?;
                a.timeout = Duration::from_secs(v.parse().map_err(|_| format!("--timeout-s {v:?}: not a number"))?);
            }
            other => return Err(format!("unknown flag {other:?} (see the file's header for the flags)")),
        }
    }
    if a.min_bytes > a.max_bytes {
        return Err(format!(
            "--min-bytes {} exceeds --max-bytes {}",
            a.min_bytes, a.max_bytes
        ));
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nc-p2p-bench: {e}");
            std::process::exit(2);
        }
    };
    let code = match std::env::var("RANK") {
        Err(_) => launch(&args),
        Ok(_) => match rank_main(&args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("nc-p2p-bench: {e}");
                1
            }
        },
    };
    std::process::exit(code);
}

fn gpu_count() -> Result<usize, String> {
    // Only tries to dlopen the driver library; never panics (device_count would, without it).
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda.so) could not be loaded: no GPU driver here".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err("no CUDA device".into()),
        Err(e) => Err(format!("no CUDA driver or device ({e:?})")),
    }
}

/// Starts `nproc` ranks of this binary and waits for them.
fn launch(args: &Args) -> i32 {
    let gpus = match gpu_count() {
        Ok(n) => n,
        Err(why) => {
            println!("nc-p2p-bench: skipped: {why}");
            return 0;
        }
    };
    let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => {
            eprintln!("nc-p2p-bench: no free local port for the rendezvous: {e}");
            return 1;
        }
    };
    println!(
        "nc-p2p-bench: {} ranks on {} GPU(s){}",
        args.nproc,
        gpus,
        if gpus < args.nproc {
            " (shared: checks results and protocol, not NVLink speed)"
        } else {
            ""
        }
    );
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("nc-p2p-bench: cannot find this program to start its ranks: {e}");
            return 1;
        }
    };
    let mut children = Vec::new();
    for rank in 0..args.nproc {
        let child = Command::new(&exe)
            .args(std::env::args().skip(1))
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", args.nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", args.nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn();
        match child {
            Ok(c) => children.push(c),
            Err(e) => {
                eprintln!("nc-p2p-bench: starting rank {rank}: {e}");
                for mut c in children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return 1;
            }
        }
    }
    let mut failed = 0;
    for (rank, mut c) in children.into_iter().enumerate() {
        match c.wait() {
            Ok(s) if s.success() => {}
            Ok(s) => {
                eprintln!("nc-p2p-bench: rank {rank} failed ({s})");
                failed += 1;
            }
            Err(e) => {
                eprintln!("nc-p2p-bench: waiting for rank {rank}: {e}");
                failed += 1;
            }
        }
    }
    i32::from(failed > 0)
}

fn env_usize(name: &str) -> Result<usize, String> {
    let v = std::env::var(name).map_err(|_| format!("{name} is not set"))?;
    v.parse().map_err(|_| format!("{name}={v:?} is not a number"))
}

/// Rank r's input element i: a value in [-1, 1) with 16 significant bits (exact in f32), from a hash.
fn input(r: usize, i: usize) -> f32 {
    let mut x = (r as u64) << 40 ^ i as u64 ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    ((x >> 48) as f32) / 32768.0 - 1.0
}

trait Elem: nc_comm::p2p::P2pElem + cudarc::nccl::NcclType + PartialEq + std::fmt::Debug {
    const NAME: &'static str;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    fn bits(self) -> u32;
}
impl Elem for f32 {
    const NAME: &'static str = "f32";
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn bits(self) -> u32 {
        self.to_bits()
    }
}
impl Elem for bf16 {
    const NAME: &'static str = "bf16";
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn bits(self) -> u32 {
        self.to_bits() as u32
    }
}

/// The rank whose chunk of `bounds` holds element i.
fn owner(bounds: &Bounds, i: usize) -> usize {
    (0..bounds.world_size())
        .find(|&c| bounds.range(c).contains(&i))
        .unwrap()
}

fn inputs<T: Elem>(r: usize, len: usize) -> Vec<T> {
    (0..len).map(|i| T::from_f32(input(r, i))).collect()
}

struct Rank {
    rank: usize,
    n: usize,
    stream: Arc<CudaStream>,
    ring: P2pRing,
    failures: usize,
}

impl Rank {
    fn upload<T: Elem>(&self, host: &[T]) -> Result<CudaSlice<T>, String> {
        self.stream.clone_htod(host).map_err(|e| format!("upload: {e:?}"))
    }
    fn download<T: Elem>(&mut self, dev: &CudaSlice<T>) -> Result<Vec<T>, String> {
        self.ring.check().map_err(|e| e.to_string())?;
        self.stream.clone_dtoh(dev).map_err(|e| format!("download: {e:?}"))
    }
    /// Uploads this rank's inputs (`len` elements), runs `op` on them and downloads the result.
    fn run_on_inputs<T: Elem>(
        &mut self,
        len: usize,
        op: impl FnOnce(&mut P2pRing, &mut CudaSlice<T>) -> Result<(), nc_comm::CommError>,
    ) -> Result<Vec<T>, String> {
        let mut buf = self.upload(&inputs::<T>(self.rank, len))?;
        op(&mut self.ring, &mut buf).map_err(|e| e.to_string())?;
        self.download(&buf)
    }
    /// Compares the elements `which` of `got` with `want(i)`, bit for bit; prints the first difference.
    fn compare<T: Elem>(&mut self, what: &str, got: &[T], which: std::ops::Range<usize>, want: impl Fn(usize) -> T) {
        let bad = which.clone().find(|&i| got[i].bits() != want(i).bits());
        match bad {
            None => {
                if self.rank == 0 {
                    println!("check {what:<58} ok");
                }
            }
            Some(i) => {
                self.failures += 1;
                println!(
                    "check {what:<58} FAIL on rank {}: element {i} is {:?}, want {:?}",
                    self.rank,
                    got[i],
                    want(i)
                );
            }
        }
    }

    fn check_type<T: Elem>(&mut self) -> Result<(), String> {
        let n = self.n;
        let threshold = self.ring.options().one_shot_bytes / std::mem::size_of::<T>();
        let slice = self.ring.options().blocks * self.ring.options().slot_bytes / 4;
        // rank-order sum (one-shot) and ring-order sum of element i of chunk c
        let rank_order = |i: usize| {
            T::from_f32((1..n).fold(T::from_f32(input(0, i)).to_f32(), |a, r| {
                a + T::from_f32(input(r, i)).to_f32()
            }))
        };
        let ring_order = |c: usize, i: usize| {
            let mut order = sum_order(n, c);
            let first = T::from_f32(input(order.next().unwrap(), i)).to_f32();
            T::from_f32(order.fold(first, |a, r| a + T::from_f32(input(r, i)).to_f32()))
        };
        for len in [1, 7, 1000, threshold] {
            let got = self.run_on_inputs::<T>(len, |ring, buf| ring.all_reduce_device(buf))?;
            self.compare(
                &format!("one-shot all-reduce {} n{n} len {len}", T::NAME),
                &got,
                0..len,
                rank_order,
            );
        }
        for (label, len, bounds) in [
            ("even", 3 * slice + 5, even_bounds(3 * slice + 5, n)),
            ("uneven", 2 * slice + 13, uneven(2 * slice + 13, n)),
            ("even 4M", (1 << 22) + 3, even_bounds((1 << 22) + 3, n)),
        ] {
            let got = self.run_on_inputs::<T>(len, |ring, buf| ring.reduce_scatter_device(buf, &bounds))?;
            let mine = bounds.range(self.rank);
            let me = self.rank;
            self.compare(
                &format!("ring reduce-scatter {} n{n} len {len} {label}", T::NAME),
                &got,
                mine,
                |i| ring_order(me, i),
            );
            // all-gather of each owner's chunk of its own input
            let got = self.run_on_inputs::<T>(len, |ring, buf| ring.all_gather_device(buf, &bounds))?;
            self.compare(
                &format!("ring all-gather {} n{n} len {len} {label}", T::NAME),
                &got,
                0..len,
                |i| T::from_f32(input(owner(&bounds, i), i)),
            );
        }
        self.check_bucket::<T>(slice)?;
        let len = 2 * threshold + 9;
        let bounds = even_bounds(len, n);
        let got = self.run_on_inputs::<T>(len, |ring, buf| ring.all_reduce_device(buf))?;
        self.compare(
            &format!("ring all-reduce {} n{n} len {len}", T::NAME),
            &got,
            0..len,
            |i| ring_order(owner(&bounds, i), i),
        );
        Ok(())
    }
}

impl Rank {
    /// Three tensors of one span with gaps between them (a matrix owned whole by the last rank, an uneven
    /// split, an even one), one launch each way on raw addresses: the ZeRO-1 exchange's calls.
    fn check_bucket<T: Elem>(&mut self, slice: usize) -> Result<(), String> {
        let n = self.n;
        let whole_to_last: Vec<usize> = (0..=n).map(|k| if k < n { 0 } else { slice + 3 }).collect();
        let pieces = vec![
            Piece {
                start: 5,
                bounds: Bounds::new(whole_to_last).expect("non-decreasing"),
            },
            Piece {
                start: slice + 19,
                bounds: uneven(2 * slice + 7, n),
            },
            Piece {
                start: 3 * slice + 40,
                bounds: even_bounds(slice / 2 + 1, n),
            },
        ];
        let span = pieces[2].end() + 11;
        let inside = |i: usize| pieces.iter().find(|p| (p.start..p.end()).contains(&i));
        let owner_of = |p: &Piece, i: usize| (0..n).find(|&c| p.bounds.range(c).contains(&(i - p.start))).unwrap();
        for gather in [false, true] {
            let mut buf = self.upload(&inputs::<T>(self.rank, span))?;
            let stream = self.stream.clone();
            let (ptr, sync) = buf.device_ptr_mut(&stream);
            // SAFETY: `ptr` addresses the `span` elements of `buf`, alive until after the download below
            // (which waits for the ring's stream); `sync` records the use on the stream.
            let r = unsafe {
                if gather {
                    self.ring.all_gather_pieces::<T>(ptr, span, &pieces)
                } else {
                    self.ring.reduce_scatter_pieces::<T>(ptr, span, &pieces)
                }
            };
            drop(sync);
            r.map_err(|e| e.to_string())?;
            let got = self.download(&buf)?;
            let me = self.rank;
            let what = if gather { "all-gather" } else { "reduce-scatter" };
            let ring_order = |c: usize, i: usize| {
                let mut order = sum_order(n, c);
                let first = T::from_f32(input(order.next().unwrap(), i)).to_f32();
                T::from_f32(order.fold(first, |a, r| a + T::from_f32(input(r, i)).to_f32()))
            };
            // checked: the elements outside the pieces, and each piece's owned (reduce) or every (gather) part
            let checked: Vec<usize> = (0..span)
                .filter(|&i| match inside(i) {
                    None => true,
                    Some(p) => gather || owner_of(p, i) == me,
                })
                .collect();
            let want = |i: usize| match inside(i) {
                None => T::from_f32(input(me, i)),
                Some(p) if gather => T::from_f32(input(owner_of(p, i), i)),
                Some(_) => ring_order(me, i),
            };
            let bad = checked.iter().copied().find(|&i| got[i].bits() != want(i).bits());
            let label = format!("bucket {what} {} n{n} span {span} (3 pieces, one launch)", T::NAME);
            match bad {
                None if self.rank == 0 => println!("check {label:<58} ok"),
                None => {}
                Some(i) => {
                    self.failures += 1;
                    println!(
                        "check {label:<58} FAIL on rank {}: element {i} is {:?}, want {:?}",
                        self.rank,
                        got[i],
                        want(i)
                    );
                }
            }
        }
        Ok(())
    }
}

/// Bounds of unequal chunks (rank r gets a share growing with r; some may be empty at small lengths).
fn uneven(len: usize, n: usize) -> Bounds {
    let weights: Vec<usize> = (0..n).map(|r| r + 1).collect();
    let total: usize = weights.iter().sum();
    let mut offsets = vec![0];
    for w in &weights {
        offsets.push((offsets.last().unwrap() + len * w / total).min(len));
    }
    *offsets.last_mut().unwrap() = len;
    Bounds::new(offsets).expect("non-decreasing")
}

fn rank_main(args: &Args) -> Result<(), String> {
    let rank = env_usize("RANK")?;
    let n = env_usize("WORLD_SIZE")?;
    let local = env_usize("LOCAL_RANK").unwrap_or(rank);
    let master_addr = std::env::var("MASTER_ADDR").map_err(|_| "MASTER_ADDR is not set".to_string())?;
    let master_port: u16 = env_usize("MASTER_PORT")?
        .try_into()
        .map_err(|_| "MASTER_PORT is not a port".to_string())?;
    let gpus = gpu_count()?;
    let device = local % gpus;
    let cfg = RendezvousConfig {
        rank,
        world_size: n,
        master_addr,
        master_port,
        timeout: Duration::from_secs(120),
    };
    let mut rdv = Rendezvous::join(&cfg, &[]).map_err(|e| e.to_string())?;
    let ctx = CudaContext::new(device).map_err(|e| format!("rank {rank}: GPU {device}: {e:?}"))?;
    let stream = ctx.new_stream().map_err(|e| format!("rank {rank}: a stream: {e:?}"))?;
    // The simulated GPU (docs/simulated-gpu.md) names itself so: its checks are real, its times are not.
    let device_name = ctx.name().unwrap_or_else(|e| format!("(name unknown: {e:?})"));
    let simulated = device_name.contains("simulated");
    if rank == 0 {
        println!(
            "device: {device_name}{}",
            if simulated {
                " (a simulated device: the checks are real; the times are the emulation's CPU times, not a GPU's)"
            } else {
                ""
            }
        );
    }
    let opts = P2pOptions {
        timeout: args.timeout,
        ..P2pOptions::default()
    }
    .with_env_overrides()
    .map_err(|e| e.to_string())?;
    let ring = P2pRing::join(&mut rdv, stream.clone(), opts).map_err(|e| e.to_string())?;
    if rank == 0 {
        println!(
            "ring: {} blocks x {} slots x {} KiB; one-shot all-reduce up to {} bytes",
            opts.blocks,
            opts.slots,
            opts.slot_bytes >> 10,
            opts.one_shot_bytes
        );
    }
    let mut me = Rank {
        rank,
        n,
        stream: stream.clone(),
        ring,
        failures: 0,
    };
    me.check_type::<f32>()?;
    me.check_type::<bf16>()?;
    let all = rdv
        .all_gather_bytes(&(me.failures as u64).to_le_bytes())
        .map_err(|e| e.to_string())?;
    let failures: u64 = all
        .iter()
        .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8])))
        .sum();
    if rank == 0 {
        println!("check: {failures} failures");
    }
    if failures > 0 {
        return Err(format!("rank {rank}: {failures} checks failed"));
    }
    if args.check_only {
        return Ok(());
    }
    // NCCL needs one GPU per rank.
    let nccl_skip = if gpus < n {
        Some(format!(
            "{n} ranks share {gpus} GPU(s): NCCL refuses two ranks on one GPU"
        ))
    } else if !nccl_available() {
        Some(nc_comm::nccl::MISSING_NCCL.to_string())
    } else {
        None
    };
    let nccl = match nccl_skip {
        None => Some(NcclRing::join(&mut rdv, stream.clone()).map_err(|e| e.to_string())?),
        Some(_) => None,
    };
    if rank == 0 {
        if let Some(why) = &nccl_skip {
            println!("NCCL columns skipped: {why}");
        }
        println!(
            "{:>12} {:>11} {:>5} {:>15} | {:>11} {:>8} {:>8} | {:>11} {:>8} {:>8}",
            "size(B)", "count", "type", "op", "ring(us)", "algbw", "busbw", "nccl(us)", "algbw", "busbw"
        );
    }
    let mut bench = Bench {
        me,
        rdv,
        nccl,
        crossover: None,
        n,
        ranks_share_gpu: gpus < n,
    };
    bench.run::<f32>(args)?;
    bench.run::<bf16>(args)?;
    if rank == 0 {
        println!("(GB/s = 1e9 bytes/s; rank 0's mean time per call; bus bandwidth as nccl-tests defines it)");
        if simulated {
            println!("(simulated device: these times are not GPU times and say nothing about NVLink)");
        }
    }
    if args.crossover_max > 0 && n > 1 {
        // a second ring whose one-shot area holds the largest size timed
        let xopts = P2pOptions {
            one_shot_bytes: args.crossover_max,
            ..opts
        };
        bench.crossover = Some(P2pRing::join(&mut bench.rdv, stream.clone(), xopts).map_err(|e| e.to_string())?);
        let f = bench.crossover_sizes::<f32>(args)?;
        let b = bench.crossover_sizes::<bf16>(args)?;
        if rank == 0 {
            let say = |t: &str, c: Option<usize>| match c {
                Some(c) if c >= args.crossover_max => {
                    format!("{t}: one-shot faster at every size tried (up to {c} bytes): raise --crossover-max")
                }
                Some(c) => format!("{t}: one-shot faster up to {c} bytes, the ring from {}", 2 * c),
                None => format!("{t}: the ring is faster from the smallest size tried"),
            };
            println!("crossover {}", say("f32", f));
            println!("crossover {}", say("bf16", b));
            let both = f.unwrap_or(0).min(b.unwrap_or(0));
            println!(
                "crossover: suggested NC_P2P_ONE_SHOT_BYTES={both} (the smaller of the two; {} ranks{})",
                n,
                if simulated {
                    ", on a simulated device: not a GPU's figure"
                } else if gpus < n {
                    ", sharing GPUs: not NVLink's figure"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

struct Bench {
    me: Rank,
    // the rings before the rendezvous: they drain on drop while peers are still connected
    crossover: Option<P2pRing>,
    nccl: Option<NcclRing>,
    rdv: Rendezvous,
    n: usize,
    ranks_share_gpu: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    AllReduce,
    ReduceScatter,
    AllGather,
    /// The crossover ring's one-shot all-reduce.
    OneShot,
    /// The crossover ring's reduce-scatter + all-gather all-reduce.
    RingAllReduce,
}

impl Bench {
    fn run<T: Elem>(&mut self, args: &Args) -> Result<(), String> {
        let elem = std::mem::size_of::<T>();
        let mut bytes = args.min_bytes.max(elem).next_power_of_two();
        while bytes <= args.max_bytes {
            // reduce-scatter and all-gather need a multiple of n elements (NCCL's equal counts)
            let count = (bytes / elem).max(1);
            for op in [Op::AllReduce, Op::ReduceScatter, Op::AllGather] {
                let count = if op == Op::AllReduce {
                    count
                } else {
                    count.div_ceil(self.n) * self.n
                };
                let ring = self.time::<T>(op, count, false)?;
                let nccl = match self.nccl.is_some() {
                    true => Some(self.time::<T>(op, count, true)?),
                    false => None,
                };
                if self.me.rank == 0 {
                    let size = count * elem;
                    let factor = match op {
                        Op::AllReduce => 2.0 * (self.n as f64 - 1.0) / self.n as f64,
                        _ => (self.n as f64 - 1.0) / self.n as f64,
                    };
                    let cols = |t: f64| {
                        let algbw = size as f64 / t / 1e9;
                        format!("{:>11.2} {:>8.2} {:>8.2}", t * 1e6, algbw, algbw * factor)
                    };
                    let name = match op {
                        Op::AllReduce => "all_reduce",
                        Op::ReduceScatter => "reduce_scatter",
                        Op::AllGather => "all_gather",
                        Op::OneShot | Op::RingAllReduce => unreachable!("the table times the three collectives"),
                    };
                    println!(
                        "{size:>12} {count:>11} {:>5} {name:>15} | {} | {}",
                        T::NAME,
                        cols(ring),
                        nccl.map(cols)
                            .unwrap_or_else(|| format!("{:>11} {:>8} {:>8}", "-", "-", "-"))
                    );
                }
            }
            bytes *= 2;
        }
        if self.ranks_share_gpu && self.me.rank == 0 {
            println!("(ranks share a GPU: these times are not NVLink's)");
        }
        Ok(())
    }

    /// Mean seconds per call of `op` over `count` elements, after warm-up.
    fn time<T: Elem>(&mut self, op: Op, count: usize, nccl: bool) -> Result<f64, String> {
        let stream = self.me.stream.clone();
        let err = |e: cudarc::driver::DriverError| format!("bench buffer: {e:?}");
        let mut buf = stream.alloc_zeros::<T>(count).map_err(err)?;
        let part = count / self.n;
        let mut part_buf = stream.alloc_zeros::<T>(part.max(1)).map_err(err)?;
        let bounds = even_bounds(count, self.n);
        let iters = ((1usize << 30) / (count * std::mem::size_of::<T>())).clamp(5, 50);
        for _ in 0..3 {
            self.call(op, nccl, &mut buf, &mut part_buf, &bounds)?;
        }
        stream.synchronize().map_err(err)?;
        self.rdv.barrier().map_err(|e| e.to_string())?;
        let started = Instant::now();
        for _ in 0..iters {
            self.call(op, nccl, &mut buf, &mut part_buf, &bounds)?;
        }
        stream.synchronize().map_err(err)?;
        let secs = started.elapsed().as_secs_f64() / iters as f64;
        if !nccl {
            self.me.ring.check().map_err(|e| e.to_string())?;
            if let Some(x) = self.crossover.as_mut() {
                x.check().map_err(|e| e.to_string())?;
            }
        }
        Ok(secs)
    }

    /// Times the crossover ring's all-reduce one-shot and as a ring from 1 KiB to --crossover-max, doubling
    /// (rank 0 prints each size); returns the largest size up to which the one-shot was faster at every size
    /// (None if the ring won at the first).
    fn crossover_sizes<T: Elem>(&mut self, args: &Args) -> Result<Option<usize>, String> {
        let elem = std::mem::size_of::<T>();
        let mut bytes = 1usize << 10;
        let mut last_win = None;
        let mut lost = false;
        if self.me.rank == 0 {
            println!(
                "{:>12} {:>5} {:>14} {:>14}  faster",
                "size(B)", "type", "one-shot(us)", "ring(us)"
            );
        }
        while bytes <= args.crossover_max {
            let count = bytes / elem;
            let one_shot = self.time::<T>(Op::OneShot, count, false)?;
            let ring = self.time::<T>(Op::RingAllReduce, count, false)?;
            // rank 0's times decide, so every rank agrees (they only print on rank 0 anyway)
            let decided = self
                .rdv
                .broadcast_bytes(&[u8::from(one_shot < ring)])
                .map_err(|e| e.to_string())?;
            let one_shot_wins = decided.first() == Some(&1);
            if one_shot_wins && !lost {
                last_win = Some(bytes);
            }
            lost |= !one_shot_wins;
            if self.me.rank == 0 {
                println!(
                    "{bytes:>12} {:>5} {:>14.2} {:>14.2}  {}",
                    T::NAME,
                    one_shot * 1e6,
                    ring * 1e6,
                    if one_shot_wins { "one-shot" } else { "ring" }
                );
            }
            bytes *= 2;
        }
        Ok(last_win)
    }

    /// One call of `op` on the ring or NCCL (reduce-scatter from `buf` into `part`, all-gather from `part`
    /// into `buf` for NCCL, whose counts are equal; in place on `buf` for the ring).
    fn call<T: Elem>(
        &mut self,
        op: Op,
        nccl: bool,
        buf: &mut CudaSlice<T>,
        part: &mut CudaSlice<T>,
        bounds: &Bounds,
    ) -> Result<(), String> {
        let r = match (nccl, op, self.nccl.as_ref()) {
            (false, Op::AllReduce, _) => self.me.ring.all_reduce_device(buf),
            (false, Op::ReduceScatter, _) => self.me.ring.reduce_scatter_device(buf, bounds),
            (false, Op::AllGather, _) => self.me.ring.all_gather_device(buf, bounds),
            (true, Op::AllReduce, Some(c)) => c.all_reduce_device(buf),
            (true, Op::ReduceScatter, Some(c)) => c.reduce_scatter_device(buf, part),
            (true, Op::AllGather, Some(c)) => c.all_gather_device(part, buf),
            (true, _, None) => return Err("NCCL is not joined".into()),
            (_, Op::OneShot, _) | (_, Op::RingAllReduce, _) => {
                let Some(x) = self.crossover.as_mut() else {
                    return Err("the crossover ring is not joined".into());
                };
                if op == Op::OneShot {
                    x.one_shot_device(buf)
                } else {
                    x.reduce_scatter_device(buf, bounds)
                        .and_then(|_| x.all_gather_device(buf, bounds))
                }
            }
        };
        r.map_err(|e| e.to_string())
    }
}
