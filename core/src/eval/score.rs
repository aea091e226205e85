//! Batched scoring of CORE rows through the model's forward on any backend: rows are grouped longest first,
//! each group padded on the right with a pad token to its longest row (nanochat pads with BOS; attention is
//! causal, so the padding changes nothing before it), and only the logits at the scored positions are
//! computed (`Gpt::forward_span_logits`). Losses and argmax are taken on the host in f64 from the f32
//! softcapped logits, as PyTorch's cross_entropy and argmax do over nanochat's logits.

use crate::backend::Backend;
use crate::bail;
use crate::error::Result;
use crate::eval::example::{Row, RowScore};
use crate::model::Gpt;

/// Mean loss and greedy match of each row, in the order given. Every row must fit the model's positions
/// (`cfg.sequence_len`); crop or grow the model first.
pub fn score_rows<B: Backend>(model: &mut Gpt<B>, rows: &[&Row], pad: u32) -> Result<Vec<RowScore>> {
    let (max_t, capacity, vocab) = (model.cfg.sequence_len, model.tokens(), model.cfg.vocab_size);
    if let Some(r) = rows.iter().find(|r| r.tokens.len() > max_t) {
        bail!(
            "a row of {} tokens is longer than the model's {max_t} positions",
            r.tokens.len()
        );
    }
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(rows[i].tokens.len()));
    let mut scores = vec![
        RowScore {
            mean_loss: f64::NAN,
            greedy_match: false
        };
        rows.len()
    ];
    let (mut inputs, mut spans, mut logits) = (Vec::new(), Vec::new(), Vec::new());
    let mut at = 0;
    while at < order.len() {
        let t = rows[order[at]].tokens.len();
        let group = &order[at..(at + (capacity / t).max(1)).min(order.len())];
        inputs.clear();
        spans.clear();
        for (j, &i) in group.iter().enumerate() {
            let r = rows[i];
            inputs.extend_from_slice(&r.tokens);
            inputs.resize((j + 1) * t, pad);
            spans.push((j * t + r.start - 1, r.end - r.start));
        }
        model.forward_span_logits(group.len(), t, &inputs, &spans, &mut logits)?;
        let mut position = 0;
        for &i in group {
            let r = rows[i];
            let targets = &r.tokens[r.start..r.end];
            let (mut loss_sum, mut all_match) = (0.0f64, true);
            for &target in targets {
                let l = &logits[position * vocab..(position + 1) * vocab];
                let (loss, argmax) = loss_and_argmax(l, target as usize);
                loss_sum += loss;
                all_match &= argmax == target as usize;
                position += 1;
            }
            scores[i] = RowScore {
                mean_loss: loss_sum / targets.len() as f64,
                greedy_match: all_match,
            };
        }
        at += group.len();
    }
    Ok(scores)
}

/// Cross-entropy of `target` under softmax(logits) (log-sum-exp in f64) and the first index of the maximum.
fn loss_and_argmax(logits: &[f32], target: usize) -> (f64, usize) {
    let mut argmax = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[argmax] {
            argmax = i;
        }
    }
    let max = logits[argmax] as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    (max + sum.ln() - logits[target] as f64, argmax)
}
