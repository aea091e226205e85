//! The rendezvous and the shared-memory ring with real processes: N copies of `nc-comm-check` on
//! 127.0.0.1, compared bit for bit with sums taken here in the ring's order; failures (a killed rank, a
//! rank that never comes, mismatched flags) end every rank with an error naming the culprit.

use nc_comm::{bf16, even_bounds, Bounds, Collective, ThreadRing};
use proptest::prelude::*;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const CHECK: &str = env!("CARGO_BIN_EXE_nc-comm-check");

/// A port nothing listens on right now (the OS picks it; rank 0 binds it again a moment later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn rank_command(rank: usize, world: usize, port: u16, args: &[String]) -> Command {
    let mut cmd = Command::new(CHECK);
    cmd.env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs the given ranks (each with its own extra arguments) to completion, killing all after `limit`.
fn run_ranks(world: usize, ranks: &[usize], args: impl Fn(usize) -> Vec<String>, limit: Duration) -> Vec<Output> {
    let port = free_port();
    let children: Vec<Child> = ranks
        .iter()
        .map(|&r| rank_command(r, world, port, &args(r)).spawn().unwrap())
        .collect();
    let deadline = Instant::now() + limit;
    children
        .into_iter()
        .map(|mut c| {
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            c.wait_with_output().unwrap()
        })
        .collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Rank r's input: mixed magnitudes and signs, so a sum taken in another order differs in the low bits.
fn input(seed: u64, rank: usize, len: usize) -> Vec<f32> {
    let mut x = seed ^ (rank as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mantissa = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            mantissa * (1u64 << (x % 20)) as f32
        })
        .collect()
}

/// The naive reduction, in the ring's documented order: chunk c is summed over ranks c+1, ..., c (mod n).
fn ring_order_sum(inputs: &[Vec<f32>], bounds: &Bounds) -> Vec<f32> {
    let n = inputs.len();
    let mut out = vec![0.0f32; bounds.len()];
    for c in 0..n {
        for i in bounds.range(c) {
            let mut acc = inputs[(c + 1) % n][i];
            for k in 2..=n {
                acc += inputs[(c + k) % n][i];
            }
            out[i] = acc;
        }
    }
    out
}

fn f32s(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bf16s(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn round_bf16(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
}

/// Runs the six collectives on `world` processes and checks every rank's results bit for bit against
/// the naive sums; also that ThreadRing, given the same inputs, gives the same bits.
fn check_collectives(world: usize, bounds: Bounds, seed: u64, slot_bytes: usize, slots: usize) {
    let dir = tempfile::tempdir().unwrap();
    let len = bounds.len();
    let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(seed, r, len)).collect();
    let path = |what: &str, r: usize| -> PathBuf { dir.path().join(format!("{what}{r}")) };
    for (r, v) in inputs.iter().enumerate() {
        std::fs::write(
            path("in", r),
            v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
        )
        .unwrap();
    }
    let offsets: Vec<String> = (0..=world)
        .map(|r| if r == 0 { 0 } else { bounds.range(r - 1).end }.to_string())
        .collect();
    let offsets = offsets.join(",");
    let outputs = run_ranks(
        world,
        &(0..world).collect::<Vec<_>>(),
        |r| {
            [
                "--input",
                path_str(&path("in", r)),
                "--out",
                path_str(&path("out", r)),
                "--bounds",
                &offsets,
                "--slot-bytes",
                &slot_bytes.to_string(),
                "--slots",
                &slots.to_string(),
                "--timeout-ms",
                "20000",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        },
        Duration::from_secs(60),
    );
    for (r, o) in outputs.iter().enumerate() {
        assert!(o.status.success(), "rank {r} failed: {}", stderr(o));
    }

    let sum = ring_order_sum(&inputs, &bounds);
    let even = even_bounds(len, world);
    let sum_even = ring_order_sum(&inputs, &even);
    let narrow: Vec<Vec<f32>> = inputs
        .iter()
        .map(|v| v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect())
        .collect();
    let sum_bf16 = round_bf16(&ring_order_sum(&narrow, &bounds));
    let sum_bf16_even = round_bf16(&ring_order_sum(&narrow, &even));
    for r in 0..world {
        let out = std::fs::read(path("out", r)).unwrap();
        let mine = bounds.range(r);
        let mut at = 0;
        let mut take = |n: usize| {
            at += n;
            &out[at - n..at]
        };
        assert_eq!(
            f32s(take(mine.len() * 4)),
            bits(&sum[mine.clone()]),
            "f32 reduce-scatter, rank {r}"
        );
        assert_eq!(f32s(take(len * 4)), bits(&sum), "f32 all-gather, rank {r}");
        assert_eq!(f32s(take(len * 4)), bits(&sum_even), "f32 all-reduce, rank {r}");
        assert_eq!(
            bf16s(take(mine.len() * 2)),
            sum_bf16[mine.clone()],
            "bf16 reduce-scatter, rank {r}"
        );
        assert_eq!(bf16s(take(len * 2)), sum_bf16, "bf16 all-gather, rank {r}");
        assert_eq!(bf16s(take(len * 2)), sum_bf16_even, "bf16 all-reduce, rank {r}");
        assert_eq!(at, out.len(), "rank {r} wrote more than expected");
    }

    // ThreadRing, on the same inputs, must agree with the processes to the bit.
    let handles: Vec<_> = ThreadRing::new(world)
        .into_iter()
        .zip(inputs.clone())
        .map(|(mut ring, mut buf)| std::thread::spawn(move || ring.all_reduce_sum(&mut buf).map(|_| buf)))
        .collect();
    for h in handles {
        assert_eq!(
            bits(&h.join().unwrap().unwrap()),
            bits(&sum_even),
            "ThreadRing differs from ShmRing"
        );
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn four_processes_uneven_bounds_many_slices() {
    // 64-byte slots and 2 per rank: each slot is reused many times per call, across six calls.
    check_collectives(4, Bounds::new(vec![0, 37, 37, 140, 301]).unwrap(), 7, 64, 2);
}

#[test]
fn large_buffer_with_default_slots() {
    check_collectives(3, even_bounds(200_003, 3), 11, 64 << 10, 8);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_ring_equals_the_naive_sum(
        world in 1usize..=8,
        len in 0usize..600,
        seed in any::<u64>(),
        slot_bytes in prop_oneof![Just(64usize), Just(128), Just(1024)],
        slots in 1usize..4,
    ) {
        check_collectives(world, even_bounds(len, world), seed, slot_bytes, slots);
    }
}

/// Starts the ranks in `--loop` mode, waits until all run, kills `victim` with SIGKILL, and returns the
/// survivors' outputs and how long they took to exit.
fn kill_one(world: usize, victim: usize, mode: &str, timeout_ms: u64) -> (Vec<(usize, Output)>, Duration) {
    let port = free_port();
    let args = vec![mode.to_string(), "--timeout-ms".to_string(), timeout_ms.to_string()];
    let mut children: Vec<Child> = (0..world)
        .map(|r| rank_command(r, world, port, &args).spawn().unwrap())
        .collect();
    for (r, c) in children.iter_mut().enumerate() {
        let mut line = String::new();
        BufReader::new(c.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "rank {r} stopped before running");
    }
    let killed_at = Instant::now();
    children[victim].kill().unwrap(); // SIGKILL
    children[victim].wait().unwrap();
    let mut outs = Vec::new();
    for (r, mut c) in children.into_iter().enumerate().filter(|(r, _)| *r != victim) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = c.kill();
        outs.push((r, c.wait_with_output().unwrap()));
    }
    (outs, killed_at.elapsed())
}

#[test]
fn killing_a_rank_fails_the_others_naming_it_long_before_the_timeout() {
    // The collective timeout is 60 s: only the liveness checks can end the survivors this early.
    // Rank 3 is no neighbour of rank 1: it must still name rank 1, not the neighbour that failed first.
    let (outs, took) = kill_one(4, 1, "--loop", 60_000);
    for (r, o) in &outs {
        assert!(!o.status.success(), "rank {r} should fail");
        assert!(
            stderr(o).contains("rank 1"),
            "rank {r} does not name rank 1: {}",
            stderr(o)
        );
    }
    assert!(took < Duration::from_secs(10), "survivors took {took:?}");
}

#[test]
fn the_rendezvous_reports_a_killed_rank() {
    let (outs, took) = kill_one(3, 2, "--watch", 60_000);
    for (r, o) in &outs {
        assert!(!o.status.success(), "rank {r} should fail");
        assert!(stderr(o).contains("rank 2 is gone"), "rank {r}: {}", stderr(o));
    }
    assert!(took < Duration::from_secs(10), "survivors took {took:?}");
}

#[test]
fn mismatched_fingerprints_refuse_on_every_rank() {
    let outs = run_ranks(
        3,
        &[0, 1, 2],
        |r| {
            let depth = if r == 2 { "16" } else { "12" };
            vec![
                "--fingerprint".into(),
                format!("--depth={depth}"),
                "--timeout-ms".into(),
                "10000".into(),
            ]
        },
        Duration::from_secs(30),
    );
    for (r, o) in outs.iter().enumerate() {
        let e = stderr(o);
        assert!(!o.status.success(), "rank {r} should refuse");
        assert!(
            e.contains("--depth") && e.contains("\"12\"") && e.contains("\"16\"") && e.contains("rank 2"),
            "rank {r}: {e}"
        );
    }
}

#[test]
fn a_rank_that_never_arrives_is_named() {
    let outs = run_ranks(
        3,
        &[0, 1],
        |_| vec!["--timeout-ms".into(), "1500".into()],
        Duration::from_secs(30),
    );
    for (r, o) in outs.iter().enumerate() {
        let e = stderr(o);
        assert!(!o.status.success(), "rank {r} should fail");
        assert!(e.contains("[2]") && e.contains("127.0.0.1:"), "rank {r}: {e}");
    }
}

#[test]
fn no_rank_zero_is_an_error_naming_the_address() {
    let outs = run_ranks(
        2,
        &[1],
        |_| vec!["--timeout-ms".into(), "500".into()],
        Duration::from_secs(30),
    );
    let e = stderr(&outs[0]);
    assert!(!outs[0].status.success());
    assert!(e.contains("rank 0 did not come up at 127.0.0.1:"), "{e}");
}

#[test]
fn the_self_check_passes_and_leaves_nothing_in_dev_shm() {
    let port = free_port();
    let outs = run_ranks(
        2,
        &[0, 1],
        |_| vec!["--name".into(), format!("selftest{port}")],
        Duration::from_secs(60),
    );
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r}: {}", stderr(o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("OK"));
    }
    let left: Vec<_> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("nc-selftest{port}"))
        })
        .collect();
    assert!(left.is_empty(), "segments left behind: {left:?}");
}
