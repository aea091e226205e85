//! nc-benches: benchmarks live in benches/; this library only holds shared helpers.
