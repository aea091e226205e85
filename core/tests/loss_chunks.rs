//! The loss path's chunking (issue 10 item 4): the rule gives every lm_head chunk >= 1024 tokens whenever the
//! micro-batch has that many (so the weight-gradient GEMM accumulates K >= 1024 per call and the
//! cross-entropy runs >= 1024 rows per launch), covers every token once also when the token count is not a
//! multiple of the chunk, and the chunked loss equals an unchunked f64 computation.

use nc_core::backend::cpu::CpuBackend;
use nc_core::backend::device_like::{DeviceLikeCpu, Launch};
use nc_core::backend::{Backend, Gemm, View, ViewMut};
use nc_core::config::{ModelConfig, LOGIT_SOFTCAP};
use nc_core::model::{loss, Gpt, LossChunks, Recompute, Rng, LOSS_MIN_CHUNK_ROWS};

/// Shapes a run meets: nanochat's vocabularies and tiny ones, token counts below, at and above 1024,
/// multiples and not.
const VOCABS: [usize; 6] = [65536, 50304, 32768, 8192, 512, 37];
const TOKENS: [usize; 13] = [
    1,
    7,
    100,
    1000,
    1023,
    1024,
    1025,
    1500,
    2048,
    3000,
    4097,
    8 * 2048,
    32 * 2048,
];

#[test]
fn every_chunk_has_at_least_1024_tokens_and_they_cover_the_batch_once() {
    for vocab in VOCABS {
        for tokens in TOKENS {
            let c = LossChunks::new(vocab, tokens);
            let mut next = 0;
            for (start, rows) in c.iter() {
                assert_eq!(start, next, "vocab {vocab}, {tokens} tokens: chunks must be contiguous");
                assert!(
                    rows >= tokens.min(LOSS_MIN_CHUNK_ROWS),
                    "vocab {vocab}, {tokens} tokens: a chunk of {rows} rows (K of the weight-gradient GEMM)"
                );
                assert!(
                    rows <= c.max_rows(),
                    "vocab {vocab}, {tokens} tokens: workspace too small"
                );
                next = start + rows;
            }
            assert_eq!(next, tokens, "vocab {vocab}: the chunks must cover all {tokens} tokens");
            // The workspace is never more than twice the target chunk, and exactly 1024 rows for nanochat's
            // vocabulary at realistic token counts (multiples of 1024).
            let target = ((1usize << 23) / vocab).max(1024).min(tokens);
            assert!(c.max_rows() < 2 * target, "vocab {vocab}, {tokens} tokens: {c:?}");
            if vocab == 65536 && tokens % 1024 == 0 {
                assert_eq!(c.max_rows(), 1024, "{tokens} tokens");
            }
            // Below 1024 tokens, one chunk of everything.
            if tokens < 1024 {
                assert_eq!((c.count, c.max_rows()), (1, tokens));
            }
        }
    }
    // Full logits never exist once a micro-batch holds two chunks' worth of tokens.
    let c = LossChunks::new(65536, 32 * 2048);
    assert_eq!(c.count, 64);
}

/// The model's loss on a GEMM-recording backend: vocab 16384 makes the target chunk 1024 rows (2^23 logits
/// alone would be 512); 5 x 500 = 2500 tokens make two chunks of 1250 (not a multiple of 1024). Every lm_head GEMM and every cross-entropy
/// launch must see >= 1024 rows, and the launches must cover the 2500 tokens.
#[test]
fn the_model_runs_every_loss_gemm_and_launch_on_at_least_1024_rows() {
    let (vocab, d, batch, seq) = (16384, 16, 5, 500);
    let cfg = ModelConfig::new(1, d, 2, 1, 8, vocab, seq).unwrap();
    let (be, log) = DeviceLikeCpu::recording();
    let mut m = Gpt::new(be, cfg, batch, seq, Recompute::None).unwrap();
    m.init(1);
    let mut rng = Rng::new(2);
    let n = batch * seq;
    let inputs: Vec<u32> = (0..n).map(|_| (rng.uniform() * vocab as f64) as u32).collect();
    let targets: Vec<i32> = (0..n).map(|_| (rng.uniform() * vocab as f64) as i32).collect();
    m.zero_grads();
    log.lock().unwrap().clear();
    m.forward_backward(&inputs, &targets, 1.0).unwrap();
    let launches = log.lock().unwrap().clone();
    let (mut weight_grads, mut ce_rows, mut ce_launches) = (0, 0, 0);
    for l in &launches {
        match *l {
            // dW(lm_head) += dlogits^T x: K is the chunk's tokens.
            Launch::Matmul(Gemm { m, n, k, .. }) if m == vocab && n == d => {
                assert!(k >= LOSS_MIN_CHUNK_ROWS, "lm_head weight-gradient GEMM with K = {k}");
                weight_grads += 1;
            }
            // logits = x W^T (K = d) and dxf = dlogits W (K = vocab): M is the chunk's tokens.
            Launch::Matmul(Gemm { m, n, k, .. }) if n == vocab || k == vocab => {
                assert!(m >= LOSS_MIN_CHUNK_ROWS, "lm_head GEMM {m} x {n} x {k}");
            }
            Launch::CrossEntropy { rows, .. } => {
                assert!(rows >= LOSS_MIN_CHUNK_ROWS, "cross-entropy launch of {rows} rows");
                ce_rows += rows;
                ce_launches += 1;
            }
            _ => {}
        }
    }
    assert_eq!(ce_rows, n, "the cross-entropy launches cover every token once");
    assert_eq!((weight_grads, ce_launches), (2, 2), "{launches:?}");
}

/// `loss::forward_backward` over several chunks (2100 tokens, vocab 9000: two chunks of 1050) against the
/// same math in f64 without chunks: per-token losses, d(xf) and lm_head's gradient (accumulated onto a
/// non-zero gradient, as in a real step).
#[test]
fn chunked_loss_equals_an_unchunked_f64_reference() {
    let (n, d, vocab) = (2100usize, 8usize, 9000usize);
    let chunks = LossChunks::new(vocab, n);
    assert_eq!(chunks.count, 2);
    let be = CpuBackend::new();
    let mut rng = Rng::new(7);
    let mut randn = |len: usize, s: f64| -> Vec<f32> { (0..len).map(|_| (rng.normal() * s) as f32).collect() };
    let (lm_off, w_len) = (5usize, vocab * d);
    let params_h = randn(lm_off + w_len, 0.5);
    let xf_h = randn(n * d, 1.0);
    let grads0 = randn(lm_off + w_len, 0.1);
    let mut t_rng = Rng::new(8);
    let targets_h: Vec<i32> = (0..n)
        .map(|i| {
            if i % 17 == 3 {
                -1
            } else {
                (t_rng.uniform() * vocab as f64) as i32
            }
        })
        .collect();
    let counted = targets_h.iter().filter(|&&t| t >= 0).count();
    let scale = 0.5 / counted as f32;

    let upload = |h: &[f32]| {
        let mut b = be.alloc(h.len());
        be.upload(ViewMut::all(&mut b), h);
        b
    };
    let (params, xf) = (upload(&params_h), upload(&xf_h));
    let mut grads = upload(&grads0);
    let mut targets = be.alloc_ids(n);
    be.upload_ids(&mut targets, &targets_h);
    let mut logits_ws = be.alloc(chunks.max_rows() * vocab);
    let mut dlogits_cast = be.alloc(0);
    let mut losses = be.alloc(n);
    let mut dxf = be.alloc(n * d);
    loss::forward_backward(
        &be,
        n,
        d,
        vocab,
        chunks,
        &params,
        lm_off,
        &xf,
        &targets,
        &mut logits_ws,
        &mut dlogits_cast,
        &mut losses,
        Some(loss::LossGrad {
            scale,
            grads: &mut grads,
            dxf: &mut dxf,
        }),
    );
    let get = |b: &<CpuBackend as Backend>::Buf| {
        let mut h = vec![0.0f32; CpuBackend::buf_len(b)];
        be.download(View::all(b), &mut h);
        h
    };
    let (losses, dxf, grads) = (get(&losses), get(&dxf), get(&grads));

    // The f64 reference, one token at a time.
    let w = &params_h[lm_off..];
    let cap = LOGIT_SOFTCAP as f64;
    let mut want_dxf = vec![0.0f64; n * d];
    let mut want_dw: Vec<f64> = grads0[lm_off..].iter().map(|&g| g as f64).collect();
    let mut worst_loss = 0.0f64;
    let mut z = vec![0.0f64; vocab];
    for r in 0..n {
        let x = &xf_h[r * d..(r + 1) * d];
        for (j, zj) in z.iter_mut().enumerate() {
            let raw: f64 = (0..d).map(|e| x[e] as f64 * w[j * d + e] as f64).sum();
            *zj = cap * (raw / cap).tanh();
        }
        let t = targets_h[r];
        if t < 0 {
            assert_eq!(losses[r], 0.0, "token {r} has no target");
            continue;
        }
        let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|v| (v - mx).exp()).sum();
        let want = mx + sum.ln() - z[t as usize];
        worst_loss = worst_loss.max((losses[r] as f64 - want).abs() / want.abs().max(1.0));
        for j in 0..vocab {
            let p = (z[j] - mx).exp() / sum;
            let dz = p - if j == t as usize { 1.0 } else { 0.0 };
            // through the softcap: d cap*tanh(raw/cap) / d raw = 1 - (z/cap)^2
            let draw = scale as f64 * dz * (1.0 - (z[j] / cap).powi(2));
            for e in 0..d {
                want_dxf[r * d + e] += draw * w[j * d + e] as f64;
                want_dw[j * d + e] += draw * x[e] as f64;
            }
        }
    }
    assert!(worst_loss <= 1e-5, "per-token loss off by {worst_loss:.2e}");
    let rel_l2 = |got: &[f32], want: &[f64]| {
        let num: f64 = got.iter().zip(want).map(|(g, w)| (*g as f64 - w).powi(2)).sum();
        let den: f64 = want.iter().map(|w| w * w).sum();
        (num / den).sqrt()
    };
    let e_dxf = rel_l2(&dxf, &want_dxf);
    let e_dw = rel_l2(&grads[lm_off..], &want_dw);
    assert!(e_dxf <= 1e-5, "d(xf) off by {e_dxf:.2e} (relative L2)");
    assert!(e_dw <= 1e-5, "lm_head grad off by {e_dw:.2e} (relative L2)");
    assert_eq!(
        &grads[..lm_off],
        &grads0[..lm_off],
        "nothing outside lm_head's gradient is written"
    );
}
