//! Loader throughput: tokens per second handed to the training loop (B x T per batch), from an mmap'd
//! uint16 shard, with the background prefetch thread.
//! Run: cargo bench -p nc-benches --bench data_loader

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nc_core::data::{write_shard, DataLoader};

fn loader_benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train_000000.bin");
    // 64M tokens (128 MB): several epochs' worth of batches would not fit in the cache of a small CPU.
    let tokens: Vec<u32> = (0..64u32 << 20).map(|i| i.wrapping_mul(2654435761) >> 16).collect();
    write_shard(&path, &tokens, 65536).unwrap();
    drop(tokens);
    let mut g = c.benchmark_group("loader");
    g.sample_size(20);
    for (b, t) in [(8usize, 1024usize), (32, 2048)] {
        g.throughput(Throughput::Elements((b * t) as u64));
        let mut loader = DataLoader::new(std::slice::from_ref(&path), 0, 1, b, t).unwrap();
        g.bench_with_input(
            BenchmarkId::new("next_batch", format!("{b}x{t}")),
            &(b, t),
            |bench, _| bench.iter(|| loader.next_batch()),
        );
    }
    g.finish();
}

criterion_group!(benches, loader_benches);
criterion_main!(benches);
