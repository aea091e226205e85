//! The training step on the CPU: the optimizer alone (Muon's Newton-Schulz dominates) and a whole step
//! (forward/backward, clipping, Muon + AdamW) of the embedded default model, as tokens per second.
//! Each comes twice: f32 (the host optimizer, what `--backend cpu` runs) and the bf16 twin
//! (`--backend cpu --precision bf16`: the bf16 model and the device optimizer on the CPU backend, batched bf16
//! Newton-Schulz), so the twin's cost over f32 is read off one run (issue 24 item 2).
//! Run: cargo bench -p nc-benches --bench train_step

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nc_core::backend::cpu::CpuBackend;
use nc_core::backend::{Backend, Storage, ViewMut};
use nc_core::config::ModelConfig;
use nc_core::model::{Gpt, Recompute};
use nc_core::optim::clip::clip_grad_norm;
use nc_core::optim::device::{DeviceOptimizer, DeviceOptions};
use nc_core::optim::{OptimConfig, Optimizer};
use nc_core::precision::Precision;
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
        g.bench_function(format!("{name}_f32"), |b| {
            b.iter(|| opt.step(black_box(&mut params), &grads, 1.0, 0.95))
        });
        // the twin: the same values through the device optimizer's bf16 path, writing the bf16 working copy
        let be = CpuBackend::new();
        let opts = DeviceOptions {
            precision: Precision::Bf16,
            ..DeviceOptions::default()
        };
        let mut twin = DeviceOptimizer::with_options(&be, &m, OptimConfig::default(), opts).unwrap();
        let buf = |values: &[f32], storage: Storage| {
            let mut b = be.alloc_as(values.len(), storage);
            be.upload(ViewMut::all(&mut b), values);
            b
        };
        let mut master = buf(&params, Storage::F32);
        let twin_grads = buf(&grads, Storage::F32);
        let mut working = buf(&params, Storage::Bf16);
        g.bench_function(format!("{name}_bf16_twin"), |b| {
            b.iter(|| twin.step_writing(&be, black_box(&mut master), &twin_grads, Some(&mut working), 1.0, 0.95))
        });
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
    g.bench_function("embedded_d4_128_b16x128_f32", |b| {
        b.iter(|| {
            model.zero_grads();
            let loss = model.forward_backward(&inputs, &targets, 1.0).unwrap();
            let (p, gr) = model.params_and_grads_mut();
            clip_grad_norm(gr, 1.0);
            opt.step(p, gr, 1.0, 0.95);
            black_box(loss)
        })
    });
    // The twin, as rank_loop steps a single bf16 rank: clip and step on the backend, the update writing the
    // bf16 working copy (so no cast pass before the next forward).
    let mut twin = Gpt::with_precision(CpuBackend::new(), m, batch, seq, Recompute::None, Precision::Bf16).unwrap();
    twin.init(42);
    let opts = DeviceOptions {
        precision: Precision::Bf16,
        ..DeviceOptions::default()
    };
    let mut twin_opt = DeviceOptimizer::with_options(&CpuBackend::new(), &m, OptimConfig::default(), opts).unwrap();
    g.bench_function("embedded_d4_128_b16x128_bf16_twin", |b| {
        b.iter(|| {
            twin.zero_grads();
            let loss = twin.forward_backward(&inputs, &targets, 1.0).unwrap();
            let (be, params, grads, working) = twin.backend_params_grads_working_mut();
            twin_opt.clip(be, grads, 1.0);
            twin_opt.step_writing(be, params, grads, working, 1.0, 0.95);
            twin.working_written();
            black_box(loss)
        })
    });
    g.finish();
}

criterion_group!(benches, optimizer_step, whole_step);
criterion_main!(benches);
