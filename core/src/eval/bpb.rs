//! Loss and bits per byte over batches of a loader (SPEC.md section 6): the sum of per-token losses (nats)
//! over targets with a byte length > 0, divided by ln(2) x their bytes. The training loop's validation and
//! `nc-eval --bpb` both use it.

use crate::backend::Backend;
use crate::data::DataLoader;
use crate::error::Result;
use crate::model::Gpt;

/// Mean loss (nats per counted target) and bits per byte.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossBpb {
    pub loss: f64,
    pub bpb: f64,
    /// Targets counted (not -1).
    pub tokens: u64,
}

/// `steps` batches of `loader` from its current position; `token_bytes[id]` = bytes of token id.
pub fn loss_and_bpb<B: Backend>(
    model: &mut Gpt<B>,
    loader: &mut DataLoader,
    token_bytes: &[u32],
    steps: usize,
) -> Result<LossBpb> {
    let mut losses = vec![0.0f32; model.tokens()];
    let (mut nats, mut counted) = (0.0f64, 0u64);
    let (mut bpb_nats, mut bytes) = (0.0f64, 0u64);
    for _ in 0..steps {
        let batch = loader.next_batch();
        model.forward_losses(&batch.inputs, &batch.targets, &mut losses)?;
        for (&l, &t) in losses.iter().zip(&batch.targets) {
            if t < 0 {
                continue;
            }
            nats += l as f64;
            counted += 1;
            let b = token_bytes.get(t as usize).copied().unwrap_or(0);
            if b > 0 {
                bpb_nats += l as f64;
                bytes += b as u64;
            }
        }
    }
    Ok(LossBpb {
        loss: if counted > 0 { nats / counted as f64 } else { f64::NAN },
        bpb: if bytes > 0 {
            bpb_nats / (std::f64::consts::LN_2 * bytes as f64)
        } else {
            f64::NAN
        },
        tokens: counted,
    })
}
