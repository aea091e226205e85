//! The device optimizer's bf16 path (issue 10 items 3, 5 and 6) on the CPU backend, its twin.
//!
//! - Each step equals, to the bit, the per-matrix composition written out here from the host pieces: Muon's
//!   momentum, one matrix's bf16 Newton-Schulz (the twin, batch of one), p = a X + p; AdamW's host update;
//!   and the working copy is bf16(new master) everywhere. Whatever the grouping into batched calls (one call
//!   per shape, or one matrix per call).
//! - ZeRO-1's use: the ranks of a world, each stepping the segments it owns on one shared buffer, give the
//!   single rank's parameters and working copy exactly.
//! - Training: a bf16 model whose optimizer writes the working copy and clears the stale flag has the same
//!   losses, bit for bit, as the same run refreshing the copy with `refresh_weights` (the cast pass).

use nc_core::backend::bf16::round_bf16;
use nc_core::backend::cpu::{CpuBackend, CpuBuf};
use nc_core::backend::ns_bf16::newton_schulz_bf16;
use nc_core::backend::optim_ops::muon_momentum;
use nc_core::backend::{Backend, Storage};
use nc_core::config::{ModelConfig, ParamKind};
use nc_core::model::{Gpt, Recompute, Rng};
use nc_core::optim::adamw::{adam_lr_scale, adamw_update};
use nc_core::optim::device::{DeviceOptimizer, DeviceOptions};
use nc_core::optim::muon::{muon_ns_batch, shape_scale};
use nc_core::optim::shard::ShardLayout;
use nc_core::optim::OptimConfig;
use nc_core::plan::Precision;
use nc_tests::harness::muon_matrices;

/// Square, tall and wide matrices, several of each shape per layer.
fn tiny() -> ModelConfig {
    ModelConfig::new(3, 64, 2, 2, 32, 50, 8).unwrap()
}

fn normal(n: usize, rng: &mut Rng, scale: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * scale) as f32).collect()
}

/// What the step tests start from: (`tiny()`, its parameter count, the CPU backend, the starting parameters,
/// `steps` gradients), the parameters and gradients drawn in that order from seed `seed`.
fn start(steps: usize, seed: u64) -> (ModelConfig, usize, CpuBackend, Vec<f32>, Vec<Vec<f32>>) {
    let model = tiny();
    let n = model.num_params() as usize;
    let mut rng = Rng::new(seed);
    let p0 = normal(n, &mut rng, 0.05);
    let grads = (0..steps).map(|_| normal(n, &mut rng, 0.01)).collect();
    (model, n, CpuBackend::new(), p0, grads)
}

fn bf16_opts(rank: usize, world_size: usize, ns_batch_max_elems: usize) -> DeviceOptions {
    DeviceOptions {
        precision: Precision::Bf16,
        rank,
        world_size,
        ns_batch_max_elems,
    }
}

/// The host composition of one bf16 step over every parameter (world size 1).
struct Expected {
    params: Vec<f32>,
    momentum: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    t: u64,
}

impl Expected {
    fn new(model: &ModelConfig, params: Vec<f32>) -> Self {
        let layout = ShardLayout::new(model, 0, 1);
        let zeros = |kind: bool| {
            layout
                .segments
                .iter()
                .map(|s| {
                    vec![
                        0.0f32;
                        if (s.kind == ParamKind::Matrix) == kind {
                            s.len
                        } else {
                            0
                        }
                    ]
                })
                .collect()
        };
        Expected {
            params,
            momentum: zeros(true),
            m: zeros(false),
            v: zeros(false),
            t: 0,
        }
    }

    fn step(&mut self, model: &ModelConfig, grads: &[f32], lr_mult: f64, mu: f32) {
        let config = OptimConfig::default();
        let scale = adam_lr_scale(model.n_embd);
        self.t += 1;
        for (i, seg) in ShardLayout::new(model, 0, 1).segments.iter().enumerate() {
            let lr = config.scheduled_lr(seg.kind, scale, lr_mult);
            let (p, g) = (&mut self.params[seg.range()], &grads[seg.range()]);
            match seg.kind {
                ParamKind::Matrix => {
                    let mut update = vec![0.0f32; seg.len];
                    muon_momentum(g, &mut self.momentum[i], &mut update, mu);
                    let mut x = vec![0.0f32; seg.len];
                    newton_schulz_bf16(&muon_ns_batch(1, seg.rows, seg.cols), &update, &mut x);
                    let a = -(lr * shape_scale(seg.rows, seg.cols));
                    p.iter_mut().zip(&x).for_each(|(p, &x)| *p += a * x);
                }
                ParamKind::Embedding | ParamKind::Unembedding => {
                    adamw_update(p, g, &mut self.m[i], &mut self.v[i], lr, self.t, &config.adam);
                }
            }
        }
    }
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn bf16_steps_equal_the_per_matrix_composition_and_write_the_working_copy() {
    let (model, n, be, p0, grads) = start(3, 17);
    // one call per shape, and one matrix per call
    for cap in [usize::MAX, 1] {
        let mut opt = DeviceOptimizer::with_options(&be, &model, OptimConfig::default(), bf16_opts(0, 1, cap)).unwrap();
        let calls = opt.ns_groups().len();
        let matrices = muon_matrices(opt.layout());
        if cap == 1 {
            assert_eq!(calls, matrices);
        } else {
            assert!(calls < matrices && opt.ns_groups().iter().any(|g| g.members.len() > 1));
        }
        let mut params = CpuBuf::f32(p0.clone());
        let mut working = be.alloc_as(n, Storage::Bf16);
        let mut want = Expected::new(&model, p0.clone());
        for (s, g) in grads.iter().enumerate() {
            let lr_mult = 1.0 - 0.2 * s as f64;
            let gb = CpuBuf::f32(g.clone());
            opt.step_writing(&be, &mut params, &gb, Some(&mut working), lr_mult, 0.9);
            want.step(&model, g, lr_mult, 0.9);
            assert!(same_bits(&params.0, &want.params), "cap {cap} step {s}: master differs");
            let cast: Vec<f32> = want.params.iter().map(|&p| round_bf16(p)).collect();
            assert!(
                same_bits(&working.0, &cast),
                "cap {cap} step {s}: working copy is not bf16(master)"
            );
        }
        assert!(!same_bits(&params.0, &p0));
    }
}

#[test]
fn ranks_stepping_their_own_segments_equal_one_rank() {
    let (model, n, be, p0, grads) = start(2, 23);
    let run = |world: usize| {
        let mut opts: Vec<_> = (0..world)
            .map(|r| {
                DeviceOptimizer::with_options(&be, &model, OptimConfig::default(), bf16_opts(r, world, usize::MAX))
                    .unwrap()
            })
            .collect();
        assert_eq!(opts[0].owns_everything(), world == 1);
        let mut params = CpuBuf::f32(p0.clone());
        let mut working = be.alloc_as(n, Storage::Bf16);
        for g in &grads {
            let gb = CpuBuf::f32(g.clone());
            for o in opts.iter_mut() {
                o.step_writing(&be, &mut params, &gb, Some(&mut working), 1.0, 0.9);
            }
        }
        (params.0, working.0)
    };
    let (p1, w1) = run(1);
    for world in [2, 3] {
        let (p, w) = run(world);
        assert!(same_bits(&p, &p1), "world {world}: params differ from one rank's");
        assert!(
            same_bits(&w, &w1),
            "world {world}: working copy differs from one rank's"
        );
    }
}

/// Losses of a few bf16 training steps with the device optimizer, the working copy either written by the
/// optimizer (stale flag cleared) or cast by `refresh_weights`.
fn losses(optimizer_writes_copy: bool) -> Vec<u32> {
    let model = ModelConfig::new(2, 64, 2, 2, 32, 64, 16).unwrap();
    let (batch, seq) = (2, 16);
    let mut gpt = Gpt::with_precision(CpuBackend::new(), model, batch, seq, Recompute::None, Precision::Bf16).unwrap();
    gpt.init(5);
    let mut opt =
        DeviceOptimizer::with_options(&gpt.be, &model, OptimConfig::default(), bf16_opts(0, 1, usize::MAX)).unwrap();
    let mut rng = Rng::new(9);
    let mut out = Vec::new();
    for _ in 0..4 {
        let tokens: Vec<u32> = (0..batch * seq + 1).map(|_| (rng.next_u64() % 64) as u32).collect();
        let inputs = &tokens[..batch * seq];
        let targets: Vec<i32> = tokens[1..].iter().map(|&t| t as i32).collect();
        gpt.zero_grads();
        out.push(gpt.forward_backward(inputs, &targets, 1.0).unwrap().to_bits());
        let (be, params, grads, working) = gpt.backend_params_grads_working_mut();
        assert!(working.is_some(), "a bf16 model has a working copy");
        opt.clip(be, grads, 1.0);
        let working = if optimizer_writes_copy { working } else { None };
        opt.step_writing(be, params, grads, working, 1.0, 0.9);
        if optimizer_writes_copy {
            gpt.working_written();
        } else {
            gpt.refresh_weights();
        }
    }
    out
}

#[test]
fn the_optimizer_writing_the_working_copy_trains_exactly_as_refreshing_it() {
    let written = losses(true);
    let refreshed = losses(false);
    assert_eq!(written, refreshed, "losses differ (f32 bits)");
    assert!(
        written.windows(2).any(|w| w[0] != w[1]),
        "the steps must change the loss"
    );
}
