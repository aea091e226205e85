//! The training step on the CPU: the optimizer alone (Muon's Newton-Schulz dominates) and a whole step
//! (forward/backward, clipping, Muon + AdamW) of the embedded default model, as tokens per second.
//! Run: cargo bench -p nc-benches --bench train_step

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nc_core::backend::cpu::CpuBackend;
use nc_core::config::ModelConfig;
use nc_core::model::{Gpt, Recompute};
use nc_core::optim::clip::clip_grad_norm;
use nc_core::optim::{OptimConfig, Optimizer};
use std::hint::black_box;
use std::time::Duration;

/// The embedded default's model (nc-train with no arguments): 4 layers, d 128, 2 heads of 64, vocab 512.
fn embedded_model() -> ModelConfig {
    ModelConfig::new(4, 128, 2, 2, 64, 512, 128).unwrap()
}

fn optimizer_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("optimizer_step");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    // the embedded model, and a d8 model (d 512, vocab 8192) where Newton-Schulz runs on 2048 x 512 matrices
    for (name, m) in [
        ("embedded_d4_128", embedded_model()),
        (
            "d8_512_v8192",
            ModelConfig::from_depth(8).unwrap().with_vocab_size(8192).unwrap(),
        ),
    ] {
        let n = m.num_params() as usize;
        let mut params: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 0.02).collect();
        let grads: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.11).cos() * 0.01).collect();
        let mut opt = Optimizer::new(&m, OptimConfig::default(), 0, 1).unwrap();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(name, |b| b.iter(|| opt.step(black_box(&mut params), &grads, 1.0, 0.95)));
    }
    g.finish();
}

fn whole_step(c: &mut Criterion) {
    let m = embedded_model();
    let (batch, seq) = (16, 128);
    let mut model = Gpt::new(CpuBackend::new(), m, batch, seq, Recompute::None).unwrap();
    model.init(42);
    let mut opt = Optimizer::new(&m, OptimConfig::default(), 0, 1).unwrap();
    let inputs: Vec<u32> = (0..batch * seq).map(|i| ((i * 7919) % 512) as u32).collect();
    let targets: Vec<i32> = (0..batch * seq).map(|i| (((i + 1) * 7919) % 512) as i32).collect();
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements((batch * seq) as u64));
    g.bench_function("embedded_d4_128_b16x128", |b| {
        b.iter(|| {
            model.zero_grads();
            let loss = model.forward_backward(&inputs, &targets, 1.0).unwrap();
            let (p, gr) = model.params_and_grads_mut();
            clip_grad_norm(gr, 1.0);
            opt.step(p, gr, 1.0, 0.95);
            black_box(loss)
        })
    });
    g.finish();
}

criterion_group!(benches, optimizer_step, whole_step);
criterion_main!(benches);
