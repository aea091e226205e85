//! The GPU peer-to-peer ring's kernels (kernels-ptx/cuda/p2p_ring.cu) run on the CPU: g++ compiles them with
//! kernels-ptx/emu/p2p_emu.cpp (every rank's blocks as concurrent threads over shared host memory, with a
//! memory model that publishes unreleased stores late), and this test feeds it the plan tables
//! `nc_comm::p2p_plan` builds from `schedule::ring_plan`, the tables the GPU gets. The program checks every
//! result bit for bit against host reductions (ring: `schedule::sum_order`; one-shot: rank order), and that
//! each planted bug (a skipped slice, releases that do not order the data, flags reused across launches)
//! makes a check fail. Bucket cases run one table over several tensors of a span (`encode_pieces`, what the
//! ZeRO-1 exchange launches), checked against each element's owner. Skipped, with a note, where g++ is
//! missing.

use nc_comm::p2p_plan::{encode, encode_pieces, one_shot_region_bytes, slice_elems, Piece};
use nc_comm::schedule::Phase;
use nc_comm::{even_bounds, Bounds};
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};
#[path = "../../kernels-ptx/tests/support/emu_run.rs"]
mod emu_run;
use emu_run::{gxx_present, output_text};

struct Case {
    label: String,
    kind: &'static str,
    dtype: &'static str,
    bounds: Bounds,
    offset: usize,
    /// Bucket cases: the tensors of the span (`bounds` then only sizes the span).
    pieces: Vec<Piece>,
    blocks: usize,
    threads: usize,
    slots: usize,
    slot_bytes: usize,
    plant: &'static str,
    iterations: usize,
}

fn write_case(out: &mut String, c: &Case) {
    let n = c.bounds.world_size();
    let elem = if c.dtype == "f32" { 4 } else { 2 };
    let region = one_shot_region_bytes(c.bounds.len(), elem, c.blocks).div_ceil(16) * 16;
    let bucket = !c.pieces.is_empty();
    writeln!(
        out,
        "case {} {}{} {} {n} {} {} {} {} {} {} {region} {} {}",
        c.label,
        c.kind,
        if bucket { "b" } else { "" },
        c.dtype,
        c.bounds.len(),
        c.offset,
        c.blocks,
        c.threads,
        c.slots,
        c.slot_bytes,
        c.plant,
        c.iterations
    )
    .unwrap();
    let offsets: Vec<String> = (0..n).map(|r| c.bounds.range(r).start.to_string()).collect();
    writeln!(out, "{} {}", offsets.join(" "), c.bounds.len()).unwrap();
    let phase = match c.kind {
        "rs" => Phase::ReduceScatter,
        "ag" => Phase::AllGather,
        _ => return,
    };
    let slice = slice_elems(phase, elem, c.blocks, c.slot_bytes);
    for rank in 0..n {
        let table = if bucket {
            encode_pieces(phase, &c.pieces, rank, slice)
        } else {
            encode(phase, &c.bounds, rank, slice)
        };
        let words: Vec<String> = table.iter().map(u64::to_string).collect();
        writeln!(out, "{} {}", table.len() / 2, words.join(" ")).unwrap();
    }
    if bucket {
        let owners: Vec<String> = (0..c.bounds.len())
            .map(|i| {
                c.pieces
                    .iter()
                    .find(|p| (p.start..p.end()).contains(&i))
                    .map_or(-1, |p| {
                        (0..n).find(|&r| p.bounds.range(r).contains(&(i - p.start))).unwrap() as i64
                    })
                    .to_string()
            })
            .collect();
        writeln!(out, "{}", owners.join(" ")).unwrap();
    }
}

fn cases() -> Vec<Case> {
    let mut all = Vec::new();
    let uneven = |n: usize| {
        let mut offsets = vec![0];
        for r in 0..n {
            offsets.push(offsets[r] + 37 + 23 * ((r * 5) % 7));
        }
        Bounds::new(offsets).unwrap()
    };
    let mut add = |kind, dtype, bounds: Bounds, offset, blocks, threads, slots, slot_bytes, plant| {
        let label = format!(
            "{kind} {dtype} n{} len{} off{offset} blocks{blocks} slots{slots} slot{slot_bytes} {}",
            bounds.world_size(),
            bounds.len(),
            if plant == "none" {
                String::new()
            } else {
                format!("planted:{plant}")
            }
        );
        all.push(Case {
            label: label.trim().replace(' ', "_"),
            kind,
            dtype,
            bounds,
            offset,
            pieces: Vec::new(),
            blocks,
            threads,
            slots,
            slot_bytes,
            plant,
            iterations: 2,
        });
    };
    for kind in ["rs", "ag", "os"] {
        for dtype in ["f32", "bf16"] {
            for n in [1, 3, 8] {
                add(kind, dtype, even_bounds(64 * n + 8, n), 0, 2, 32, 2, 64, "none");
            }
            for n in [2, 5] {
                add(kind, dtype, uneven(n), 1, 3, 32, 3, 96, "none");
            }
            // One slot: every send waits for the previous slice's consumption.
            add(kind, dtype, uneven(4), 0, 1, 32, 1, 32, "none");
        }
    }
    // Buckets: three tensors of one span with gaps, one table (a matrix owned whole by one rank, an uneven
    // split, an even one), as the ZeRO-1 exchange launches them.
    let mut buckets = Vec::new();
    for kind in ["rs", "ag"] {
        for dtype in ["f32", "bf16"] {
            for n in [2usize, 3] {
                let pieces = vec![
                    Piece {
                        start: 3,
                        bounds: Bounds::new((0..=n).map(|k| if k < n { 0 } else { 150 }).collect()).unwrap(),
                    },
                    Piece {
                        start: 160,
                        bounds: uneven(n),
                    },
                    Piece {
                        start: 160 + uneven(n).len() + 5,
                        bounds: even_bounds(70, n),
                    },
                ];
                let span = pieces[2].end() + 4;
                buckets.push(Case {
                    label: format!("bucket_{kind}_{dtype}_n{n}_span{span}"),
                    kind,
                    dtype,
                    bounds: even_bounds(span, n),
                    offset: 0,
                    pieces,
                    blocks: 2,
                    threads: 32,
                    slots: 2,
                    slot_bytes: 64,
                    plant: "none",
                    iterations: 2,
                });
            }
        }
    }
    // Planted bugs: each must make a check fail.
    add("rs", "f32", even_bounds(300, 3), 0, 2, 32, 2, 64, "no_release");
    add("ag", "bf16", even_bounds(300, 3), 0, 2, 32, 2, 64, "no_release");
    add("os", "f32", even_bounds(300, 3), 0, 2, 32, 2, 64, "no_release");
    add("rs", "f32", even_bounds(300, 3), 0, 2, 32, 2, 64, "reused_flag");
    add("ag", "f32", even_bounds(300, 3), 0, 2, 32, 2, 64, "reused_flag");
    add("os", "bf16", even_bounds(300, 3), 0, 2, 32, 2, 64, "reused_flag");
    add("rs", "bf16", even_bounds(300, 4), 0, 2, 32, 2, 64, "skipped_chunk");
    add("ag", "f32", even_bounds(300, 4), 0, 2, 32, 2, 64, "skipped_chunk");
    all.extend(buckets);
    all
}

#[test]
fn p2p_kernels_match_host_reductions_in_the_cpu_emulation() {
    if !gxx_present("the peer-to-peer kernels' CPU emulation") {
        return;
    }
    let kernels = concat!(env!("CARGO_MANIFEST_DIR"), "/../kernels-ptx");
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("p2p_emu");
    let build = Command::new("g++")
        .args(["-std=c++20", "-O1", "-ffp-contract=off", "-pthread"])
        .arg(format!("-I{kernels}/emu/shim"))
        .arg(format!("-I{kernels}/emu"))
        .arg(format!("-I{kernels}/cuda"))
        .arg(format!("{kernels}/emu/p2p_emu.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("running g++");
    assert!(
        build.status.success(),
        "g++ failed on emu/p2p_emu.cpp:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let cases = cases();
    let mut input = String::new();
    for c in &cases {
        write_case(&mut input, c);
    }
    let mut child = Command::new(&exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = output_text(&out);
    assert!(out.status.success(), "the emulation reported failures:\n{text}");
    assert!(text.contains(&format!("{} cases\n0 failures", cases.len())), "{text}");
    for c in &cases {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(c.label.as_str()))
            .unwrap_or_else(|| panic!("no result for {}:\n{text}", c.label));
        let want = if c.plant == "none" {
            " ok "
        } else {
            "planted bug caught"
        };
        assert!(line.contains(want), "{line}");
    }
}

/// The emulation checks the ring's sums against the order c+1, c+2, ..., c (hard-coded in p2p_emu.cpp);
/// that must be the order every other ring sums in (`schedule::sum_order`: ThreadRing, ShmRing, the host
/// twin), or the kernels would be checked against another order than the one the CPU twin reproduces.
#[test]
fn the_emulations_ring_order_is_the_shared_sum_order() {
    for n in 1..=8 {
        for c in 0..n {
            let emu: Vec<usize> = (1..=n).map(|k| (c + k) % n).collect();
            assert_eq!(
                nc_comm::schedule::sum_order(n, c).collect::<Vec<_>>(),
                emu,
                "n {n} chunk {c}"
            );
        }
    }
}
