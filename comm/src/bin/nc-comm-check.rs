//! nc-comm-check: one rank of a rendezvous + shared-memory ring check, run as a real process.
//!
//! Reads the torchrun variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), joins, and then:
//! - with `--input FILE --out FILE`: runs reduce-scatter, all-gather and all-reduce in f32 and bf16 on the
//!   f32 values in FILE (little-endian) and writes each result, for a test to compare with its own sums;
//! - with `--loop`: all-reduces forever, printing "running" once, until a collective fails (kill tests);
//! - with `--watch`: polls the rendezvous's peer watch until a peer is reported gone;
//! - with neither: a self-check: every rank builds every rank's input from the rank number, runs an
//!   f32 all-reduce of a few sizes, compares the bits with a plain sum in the ring's order, prints OK.
//!
//! Other flags: `--name NAME` (segment name, default from the port), `--timeout-ms N`, `--slot-bytes N`,
//! `--slots N`, `--bounds o0,o1,...,on` (reduce-scatter/all-gather offsets, default even), and
//! `--fingerprint KEY=VALUE` (repeatable). Errors go to stderr with exit code 1.

use nc_comm::{bf16, even_bounds, Bounds, Collective, Rendezvous, RendezvousConfig, ShmRing, ShmRingOptions};
use std::io::Write;
use std::time::Duration;

struct Args {
    input: Option<String>,
    out: Option<String>,
    looping: bool,
    watch: bool,
    name: Option<String>,
    timeout: Duration,
    opts: ShmRingOptions,
    bounds: Option<Vec<usize>>,
    fingerprint: Vec<(String, String)>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        input: None,
        out: None,
        looping: false,
        watch: false,
        name: None,
        timeout: Duration::from_secs(30),
        opts: ShmRingOptions::default(),
        bounds: None,
        fingerprint: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| v.parse::<usize>().map_err(|_| format!("{flag}: {v:?} is not a number"));
        match flag.as_str() {
            "--input" => a.input = Some(value()?),
            "--out" => a.out = Some(value()?),
            "--loop" => a.looping = true,
            "--watch" => a.watch = true,
            "--name" => a.name = Some(value()?),
            "--timeout-ms" => a.timeout = Duration::from_millis(number(value()?)? as u64),
            "--slot-bytes" => a.opts.slot_bytes = number(value()?)?,
            "--slots" => a.opts.slots = number(value()?)?,
            "--bounds" => {
                let v = value()?;
                let offsets: Result<Vec<usize>, _> = v.split(',').map(|s| s.trim().parse()).collect();
                a.bounds = Some(offsets.map_err(|_| format!("--bounds: {v:?} is not a list of numbers"))?);
            }
            "--fingerprint" => {
                let v = value()?;
                let (k, val) = v
                    .split_once('=')
                    .ok_or_else(|| format!("--fingerprint wants KEY=VALUE, got {v:?}"))?;
                a.fingerprint.push((k.to_string(), val.to_string()));
            }
            other => return Err(format!("unknown flag {other:?} (see the top of nc-comm-check.rs)")),
        }
    }
    Ok(a)
}

fn env_var<T: std::str::FromStr>(name: &str) -> Result<T, String> {
    let v = std::env::var(name)
        .map_err(|_| format!("{name} is not set (set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"))?;
    v.parse().map_err(|_| format!("{name}={v:?} is not valid"))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("nc-comm-check: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let cfg = RendezvousConfig {
        rank: env_var("RANK")?,
        world_size: env_var("WORLD_SIZE")?,
        master_addr: env_var("MASTER_ADDR")?,
        master_port: env_var("MASTER_PORT")?,
        timeout: args.timeout,
    };
    let mut rdv = Rendezvous::join(&cfg, &args.fingerprint).map_err(|e| e.to_string())?;
    if args.watch {
        println!("watching");
        loop {
            rdv.check_peers().map_err(|e| e.to_string())?;
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("check-{}", cfg.master_port));
    let mut ring = ShmRing::join_with(&mut rdv, &name, args.timeout, args.opts).map_err(|e| e.to_string())?;
    if args.looping {
        let mut buf = vec![1.0f32; 4096];
        ring.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
        println!("running");
        std::io::stdout().flush().map_err(|e| e.to_string())?;
        loop {
            ring.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
        }
    }
    match (&args.input, &args.out) {
        (Some(input), Some(out)) => run_on_file(&mut ring, &args, input, out),
        (None, None) => self_check(&mut ring),
        _ => Err("--input and --out go together".into()),
    }
}

fn run_on_file(ring: &mut ShmRing, args: &Args, input: &str, out: &str) -> Result<(), String> {
    let raw = std::fs::read(input).map_err(|e| format!("cannot read {input}: {e}"))?;
    if raw.len() % 4 != 0 {
        return Err(format!("{input} holds {} bytes, not a whole number of f32", raw.len()));
    }
    let values: Vec<f32> = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let bounds = match &args.bounds {
        Some(offsets) => Bounds::new(offsets.clone()).ok_or("--bounds must start at 0 and not decrease")?,
        None => even_bounds(values.len(), ring.world_size()),
    };
    let mine = bounds.range(ring.rank());
    let err = |e: nc_comm::CommError| e.to_string();
    let mut result: Vec<u8> = Vec::new();
    let put_f32 = |v: &[f32], result: &mut Vec<u8>| result.extend(v.iter().flat_map(|x| x.to_le_bytes()));

    let mut buf = values.clone();
    ring.reduce_scatter_sum(&mut buf, &bounds).map_err(err)?;
    put_f32(&buf[mine.clone()], &mut result);
    ring.all_gather(&mut buf, &bounds).map_err(err)?;
    put_f32(&buf, &mut result);
    let mut buf = values.clone();
    ring.all_reduce_sum(&mut buf).map_err(err)?;
    put_f32(&buf, &mut result);

    let put_bf16 = |v: &[bf16], result: &mut Vec<u8>| result.extend(v.iter().flat_map(|x| x.to_bits().to_le_bytes()));
    let narrow: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
    let mut buf = narrow.clone();
    ring.reduce_scatter_sum_bf16(&mut buf, &bounds).map_err(err)?;
    put_bf16(&buf[mine], &mut result);
    ring.all_gather_bf16(&mut buf, &bounds).map_err(err)?;
    put_bf16(&buf, &mut result);
    let mut buf = narrow;
    ring.all_reduce_sum_bf16(&mut buf).map_err(err)?;
    put_bf16(&buf, &mut result);
    ring.barrier().map_err(err)?;

    let tmp = format!("{out}.tmp");
    std::fs::write(&tmp, &result)
        .and_then(|_| std::fs::rename(&tmp, out))
        .map_err(|e| format!("cannot write {out}: {e}"))
}

/// Every rank's input, computable by every rank: values of mixed magnitude so the order of the sum
/// shows in the bits.
fn check_input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 31 + rank * 17) % 97) as f32 / (1.0 + (rank + i % 5) as f32) - 20.0)
        .collect()
}

fn self_check(ring: &mut ShmRing) -> Result<(), String> {
    let (n, rank) = (ring.world_size(), ring.rank());
    for len in [1usize, 1000, 300_001] {
        let inputs: Vec<Vec<f32>> = (0..n).map(|r| check_input(r, len)).collect();
        let bounds = even_bounds(len, n);
        // The ring sums chunk c over ranks c+1, c+2, ..., c (mod n).
        let mut expected = vec![0.0f32; len];
        for c in 0..n {
            for i in bounds.range(c) {
                let mut acc = inputs[(c + 1) % n][i];
                for k in 2..=n {
                    acc += inputs[(c + k) % n][i];
                }
                expected[i] = acc;
            }
        }
        let mut buf = inputs[rank].clone();
        ring.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
        if let Some(i) = (0..len).find(|&i| buf[i].to_bits() != expected[i].to_bits()) {
            return Err(format!(
                "f32 all-reduce of {len}: element {i} is {} but should be {}",
                buf[i], expected[i]
            ));
        }
        println!("rank {rank}: f32 all-reduce of {len} elements over {n} ranks OK");
    }
    ring.barrier().map_err(|e| e.to_string())?;
    Ok(())
}
