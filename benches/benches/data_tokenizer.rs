//! Tokenizer training and encoding throughput (MB of text per second), on 1 and 2 threads.
//!
//! Text: the tokenizer fixture documents (core/tests/fixtures/tokenizer/docs.json, 0.72 MB of generated
//! multilingual text) repeated 8 times, 5.8 MB; the same text that
//! core/tests/fixtures/tokenizer/bench_reference.py feeds rustbpe and tiktoken.
//! Run: cargo bench -p nc-benches --bench data_tokenizer

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nc_core::data::bpe_train::train_merges;
use nc_core::data::pretokenize::SplitPattern;
use nc_core::data::tokenizer_files::parse_tiktoken_ranks;
use nc_core::data::Tokenizer;

const REPEAT: usize = 8;
const TRAIN_MERGES: usize = 2048 - 256;

fn fixture(name: &str) -> String {
    let path = format!("{}/../core/tests/fixtures/tokenizer/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn bench_docs() -> Vec<String> {
    let docs: Vec<String> = serde_json::from_str(&fixture("docs.json")).expect("docs.json is a list of strings");
    let mut out = Vec::with_capacity(docs.len() * REPEAT);
    for _ in 0..REPEAT {
        out.extend(docs.iter().cloned());
    }
    out
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool")
}

fn tokenizer_benches(c: &mut Criterion) {
    let docs = bench_docs();
    let bytes: usize = docs.iter().map(|d| d.len()).sum();
    let ranks = parse_tiktoken_ranks(&fixture("rustbpe_ranks.tiktoken")).unwrap();
    let tok = Tokenizer::with_nanochat_specials(ranks, SplitPattern::NANOCHAT).unwrap();

    let mut g = c.benchmark_group("tokenizer");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(bytes as u64));
    for threads in [1, 2] {
        let p = pool(threads);
        g.bench_with_input(BenchmarkId::new("train_2048", threads), &threads, |b, _| {
            b.iter(|| p.install(|| train_merges(&docs, TRAIN_MERGES, SplitPattern::NANOCHAT)))
        });
        g.bench_with_input(BenchmarkId::new("encode", threads), &threads, |b, _| {
            b.iter(|| p.install(|| tok.encode_batch(&docs, false)))
        });
    }
    g.finish();
}

criterion_group!(benches, tokenizer_benches);
criterion_main!(benches);
