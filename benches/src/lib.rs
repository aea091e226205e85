//! nc-benches: benchmarks live in benches/; this library only holds shared helpers.

/// The value of `--name N` in `args`, else `default`; a missing or unparsable N exits with a one-line error.
pub fn usize_flag(args: &[String], name: &str, default: usize) -> usize {
    match args.iter().position(|a| a == name) {
        Some(i) => match args.get(i + 1).and_then(|s| s.parse().ok()) {
            Some(v) => v,
            None => {
                eprintln!("{name} needs a non-negative integer");
                std::process::exit(2);
            }
        },
        None => default,
    }
}

/// `n` values spread over [-1, 1) from a fixed LCG started at `state` (a benchmark's speed does not depend on
/// the values, only on their being finite and ordinary).
pub fn lcg_values(n: usize, mut state: u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
