//! What the ZeRO-1 tests of `zero1.rs` and `zero1_p2p.rs` share: the tiny model, each rank's micro-batches,
//! and one step's micro-steps with the last one's backward reducing buckets through the exchange. Both
//! files compare runs bit for bit, so both must build them the same way.

use super::zero1::Zero1;
use crate::backend::cpu::CpuBackend;
use crate::config::ModelConfig;
use crate::model::{Gpt, Rng};

/// Three layers of width 32, two heads, vocabulary 64, sequence 8: fast, and every tensor takes several
/// slices of the exchanges' tables.
pub fn tiny() -> ModelConfig {
    ModelConfig::new(3, 32, 2, 2, 16, 64, 8).unwrap()
}

/// A micro-batch of rank `rank` at micro-step `k` of step `step` (every rank sees other tokens): `n` inputs
/// and their next-token targets.
pub fn batch(cfg: &ModelConfig, n: usize, rank: usize, step: usize, k: usize) -> (Vec<u32>, Vec<i32>) {
    let mut rng = Rng::new((rank * 1000 + step * 10 + k) as u64);
    let toks: Vec<u32> = (0..=n)
        .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32)
        .collect();
    (toks[..n].to_vec(), toks[1..].iter().map(|&t| t as i32).collect())
}

/// One step's `accum` micro-batches of rank `rank` (of `world`), grads scaled to the mean over all of them;
/// with `bucketed` the last backward hands each bucket to `zero1` as it becomes final (the caller finishes
/// the reduction), else no exchange happens here. The sum of the micro-batches' losses.
pub fn micro_steps(
    model: &mut Gpt<CpuBackend>,
    zero1: &mut Zero1<CpuBackend>,
    (rank, world): (usize, usize),
    (step, accum): (usize, usize),
    bucketed: bool,
) -> f32 {
    let (cfg, n) = (model.cfg, model.batch * model.seq);
    let scale = 1.0 / (accum * world) as f32;
    let mut sum = 0.0f32;
    for k in 0..accum {
        let (x, y) = batch(&cfg, n, rank, step, k);
        sum += if bucketed && k + 1 == accum {
            zero1.begin_reduce();
            model
                .forward_backward_hooked(&x, &y, scale, &mut |be, g, r| zero1.grads_ready(be, g, r))
                .unwrap()
        } else {
            model.forward_backward(&x, &y, scale).unwrap()
        };
    }
    sum
}
