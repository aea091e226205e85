//! Weightless rmsnorm with the one epsilon of the project (`config::RMSNORM_EPS`). The backward has no epsilon
//! (it reads the saved rstd): callers call `Backend::rmsnorm_backward` directly.

use crate::backend::{Backend, View, ViewMut};
use crate::config::RMSNORM_EPS;

/// y = x / sqrt(mean(x^2) + eps) over rows of `dim`; saves rstd per row.
pub fn forward<B: Backend>(be: &B, x: View<'_, B>, rows: usize, dim: usize, y: ViewMut<'_, B>, rstd: ViewMut<'_, B>) {
    be.rmsnorm_forward(x, rows, dim, RMSNORM_EPS, y, rstd);
}
