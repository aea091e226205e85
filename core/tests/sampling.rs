//! KV-cached generation: the cache path against fresh forwards and against the training forward, and the
//! token pickers (greedy, temperature, top-k).

mod common;

use common::TestRng;
use nc_core::backend::cpu::CpuBackend;
use nc_core::model::{Gpt, Recompute, Rng};
use nc_core::sample::{pick_token, Sampler, Sampling};
use nc_core::ModelConfig;

fn model(t: usize, seed: u64) -> Gpt<CpuBackend> {
    let cfg = ModelConfig::new(2, 32, 2, 1, 16, 37, t).unwrap();
    let mut m = Gpt::new(CpuBackend::new(), cfg, 1, t, Recompute::None).unwrap();
    let mut rng = TestRng(seed);
    for v in m.params_mut() {
        *v = (rng.normal() * 0.4) as f32;
    }
    m
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn cache_matches_fresh_forward_and_training_losses() {
    // T = 80 crosses the attention's 64-row tile.
    let t = 80;
    let mut m = model(t, 3);
    let mut rng = TestRng(4);
    let tokens: Vec<u32> = (0..t).map(|_| rng.below(37) as u32).collect();
    let targets: Vec<i32> = (1..=t).map(|i| if i < t { tokens[i] as i32 } else { -1 }).collect();
    let mut losses = vec![0.0f32; t];
    m.forward_losses(&tokens, &targets, &mut losses).unwrap();

    let mut cached = Sampler::new(&m, t).unwrap();
    let mut fresh = Sampler::new(&m, t).unwrap();
    // Prefill a few tokens at once, then one at a time.
    let prefill = 5;
    let mut logits = cached.extend(&mut m, &tokens[..prefill]).unwrap().to_vec();
    for p in prefill..=t {
        let want = fresh.logits_for_last_position(&mut m, &tokens[..p]).unwrap();
        assert!(
            max_rel(&logits, &want) <= 1e-5,
            "position {}: cache vs fresh forward",
            p - 1
        );
        // The training forward's loss at position p-1 from the same logits: lse(z) - z[target].
        if p < t {
            let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = mx + logits.iter().map(|z| (z - mx).exp()).sum::<f32>().ln();
            let l = lse - logits[tokens[p] as usize];
            assert!(
                (l - losses[p - 1]).abs() <= 1e-5 * l.abs().max(1.0),
                "position {}: {l} vs {}",
                p - 1,
                losses[p - 1]
            );
            logits = cached.extend(&mut m, &[tokens[p]]).unwrap().to_vec();
        }
    }
    assert_eq!(cached.len(), t);
    assert!(cached.extend(&mut m, &[0]).is_err(), "the cache is full");
}

#[test]
fn greedy_generation_follows_argmax_and_sampling_is_seeded() {
    let mut m = model(24, 5);
    let mut s = Sampler::new(&m, 24).unwrap();
    let prompt = [1u32, 2, 3];
    let out = s.generate(&mut m, &prompt, 6, Sampling::greedy(), 0, None).unwrap();
    assert_eq!(out.len(), 6);
    // Each greedy token is the argmax of a fresh forward over everything before it.
    let mut seq = prompt.to_vec();
    let mut fresh = Sampler::new(&m, 24).unwrap();
    for &tok in &out {
        let l = fresh.logits_for_last_position(&mut m, &seq).unwrap();
        let arg = (0..l.len()).fold(0, |b, i| if l[i] > l[b] { i } else { b });
        assert_eq!(tok as usize, arg);
        seq.push(tok);
    }
    let hot = Sampling {
        temperature: 1.0,
        top_k: 10,
    };
    let a = s.generate(&mut m, &prompt, 10, hot, 42, None).unwrap();
    let b = s.generate(&mut m, &prompt, 10, hot, 42, None).unwrap();
    assert_eq!(a, b, "same seed, same tokens");
    let top1 = s
        .generate(
            &mut m,
            &prompt,
            6,
            Sampling {
                temperature: 0.7,
                top_k: 1,
            },
            9,
            None,
        )
        .unwrap();
    assert_eq!(top1, out, "top_k 1 is greedy");
    let stop = out[2];
    let early = s
        .generate(&mut m, &prompt, 6, Sampling::greedy(), 0, Some(stop))
        .unwrap();
    assert_eq!(early, out[..=out.iter().position(|&x| x == stop).unwrap()]);
    assert!(
        s.generate(&mut m, &prompt, 22, Sampling::greedy(), 0, None).is_err(),
        "past max_len"
    );
    assert!(
        s.logits_for_last_position(&mut m, &[37]).is_err(),
        "outside the vocabulary"
    );
    assert!(Sampler::new(&m, 25).is_err());
}

#[test]
fn top_k_sampling_stays_in_the_top_k_and_follows_the_distribution() {
    let logits: Vec<f32> = vec![0.0, 3.0, 1.0, 2.9, -1.0, 2.0];
    let mut rng = Rng::new(1);
    let mut cand = Vec::new();
    let mut counts = [0usize; 6];
    let draws = 20000;
    for _ in 0..draws {
        counts[pick_token(
            &logits,
            Sampling {
                temperature: 1.0,
                top_k: 3,
            },
            &mut rng,
            &mut cand,
        ) as usize] += 1;
    }
    assert_eq!(
        counts[0] + counts[2] + counts[4],
        0,
        "only tokens 1, 3, 5 are in the top 3: {counts:?}"
    );
    let z: f64 = [3.0f64, 2.9, 2.0].iter().map(|x| x.exp()).sum();
    for (tok, l) in [(1usize, 3.0f64), (3, 2.9), (5, 2.0)] {
        let want = l.exp() / z;
        let got = counts[tok] as f64 / draws as f64;
        assert!(
            (got - want).abs() < 0.02,
            "token {tok}: frequency {got} vs probability {want}"
        );
    }
    assert_eq!(pick_token(&logits, Sampling::greedy(), &mut rng, &mut cand), 1);
}

/// TEMPORARY (while both exist): the sampler folded into the model's forward gives exactly the logits and
/// tokens of the sampler's own copy of the block forward (`sample_legacy`), on the f32 CPU: GQA and MHA,
/// Recompute none and full, a model whose buffers hold the whole sequence and one whose buffers hold 16
/// tokens (prefill in pieces), prefill then one token at a time, greedy and seeded top-k generation.
/// Bit for bit where the prefill fits the buffers; where it runs in pieces (the legacy sampler never did),
/// attention groups its queries differently, so the logits agree to f32 reassociation (1e-5 of the largest).
#[test]
fn fold_matches_the_legacy_sampler_bit_for_bit() {
    use nc_core::sample_legacy::LegacySampler;
    let t = 80;
    for (n_head, n_kv_head) in [(2, 1), (2, 2)] {
        for policy in [Recompute::None, Recompute::Full] {
            for (batch, seq) in [(1, t), (2, 40), (1, 16)] {
                let cfg = ModelConfig::new(2, 32, n_head, n_kv_head, 16, 37, t).unwrap();
                let mut m = Gpt::new(CpuBackend::new(), cfg, batch, seq, policy).unwrap();
                let mut rng = TestRng(11);
                for v in m.params_mut() {
                    *v = (rng.normal() * 0.4) as f32;
                }
                let tokens: Vec<u32> = (0..t).map(|_| rng.below(37) as u32).collect();
                let what = format!("heads {n_head}/{n_kv_head}, {policy:?}, buffers {batch}x{seq}");
                let mut old = LegacySampler::new(&m, t).unwrap();
                let mut new = Sampler::new(&m, t).unwrap();
                let prefill = 30;
                let same = |a: &[f32], b: &[f32], at: &str| {
                    if batch * seq >= prefill {
                        assert_eq!(a, b, "{what}: {at}");
                    } else {
                        assert!(max_rel(a, b) <= 1e-5, "{what}: {at}: {a:?} vs {b:?}");
                    }
                };
                let a = old.extend(&m, &tokens[..prefill]).unwrap().to_vec();
                let b = new.extend(&mut m, &tokens[..prefill]).unwrap().to_vec();
                same(&a, &b, "prefill logits");
                for (p, &tok) in tokens.iter().enumerate().skip(prefill) {
                    let a = old.extend(&m, &[tok]).unwrap().to_vec();
                    let b = new.extend(&mut m, &[tok]).unwrap().to_vec();
                    same(&a, &b, &format!("logits at position {p}"));
                }
                let prompt = &tokens[..7];
                let greedy_old = old.generate(&m, prompt, 40, Sampling::greedy(), 0, None).unwrap();
                let greedy_new = new.generate(&mut m, prompt, 40, Sampling::greedy(), 0, None).unwrap();
                assert_eq!(greedy_old, greedy_new, "{what}: greedy tokens");
                let hot = Sampling {
                    temperature: 0.9,
                    top_k: 8,
                };
                let hot_old = old.generate(&m, prompt, 40, hot, 5, None).unwrap();
                let hot_new = new.generate(&mut m, prompt, 40, hot, 5, None).unwrap();
                assert_eq!(hot_old, hot_new, "{what}: sampled tokens");
            }
        }
    }
}
