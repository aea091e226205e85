//! All-reduce over the in-process thread ring: time per call, algorithm and bus bandwidth.
//!
//! busbw = algbw * 2(n-1)/n, the figure nccl-tests reports, so rings of different sizes compare.
//! Run: cargo bench -p nc-benches --bench comm_ring

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nc_comm::{Collective, ThreadRing};
use std::sync::mpsc;
use std::thread;

/// Keeps ranks 1..n looping on all-reduce in their own threads while the bench thread drives rank 0.
/// The ranks stay in lockstep: every worker call is matched by one call of rank 0.
struct RingFixture {
    rank0: ThreadRing,
    buf: Vec<f32>,
    stop: Vec<mpsc::Sender<()>>,
    workers: Vec<thread::JoinHandle<()>>,
}

impl RingFixture {
    fn new(n: usize, len: usize) -> Self {
        let mut ranks = ThreadRing::new(n);
        let rank0 = ranks.remove(0);
        let mut stop = Vec::new();
        let mut workers = Vec::new();
        for mut ring in ranks {
            let (tx, rx) = mpsc::channel::<()>();
            stop.push(tx);
            workers.push(thread::spawn(move || {
                let mut buf = vec![1.0f32; len];
                while rx.try_recv().is_err() {
                    if ring.all_reduce_sum(&mut buf).is_err() {
                        break;
                    }
                }
            }));
        }
        RingFixture {
            rank0,
            buf: vec![1.0f32; len],
            stop,
            workers,
        }
    }
}

impl Drop for RingFixture {
    fn drop(&mut self) {
        for s in &self.stop {
            let _ = s.send(());
        }
        // The workers are inside the next call; completing it lets each see the stop signal and exit.
        let _ = self.rank0.all_reduce_sum(&mut self.buf);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn bench_all_reduce(c: &mut Criterion) {
    let mut group = c.benchmark_group("thread_ring_all_reduce");
    for n in [2usize, 4] {
        for len in [1usize << 16, 1 << 22] {
            group.throughput(Throughput::Bytes((len * 4) as u64));
            let mut fx = RingFixture::new(n, len);
            group.bench_with_input(BenchmarkId::new(format!("ranks{n}"), len * 4), &len, |b, _| {
                b.iter(|| fx.rank0.all_reduce_sum(&mut fx.buf).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench_all_reduce
}
criterion_main!(benches);
