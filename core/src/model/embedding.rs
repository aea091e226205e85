//! Token embedding: a row lookup in wte (V x d) forward, a scatter-add into its grad backward.

use crate::backend::{Backend, View, ViewMut};

pub fn forward<B: Backend>(be: &B, ids: &B::Ids, n: usize, wte: View<'_, B>, d: usize, out: ViewMut<'_, B>) {
    be.embedding_forward(ids, n, wte, d, out);
}

/// dwte += scatter of dout by ids (a parameter grad: accumulates).
pub fn backward<B: Backend>(be: &B, ids: &B::Ids, n: usize, dout: View<'_, B>, d: usize, dwte: ViewMut<'_, B>) {
    be.embedding_backward(ids, n, dout, d, dwte);
}
