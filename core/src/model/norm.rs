//! Weightless rmsnorm with the one epsilon of the project (`config::RMSNORM_EPS`).

use crate::backend::{Backend, View, ViewMut};
use crate::config::RMSNORM_EPS;

/// y = x / sqrt(mean(x^2) + eps) over rows of `dim`; saves rstd per row.
pub fn forward<B: Backend>(be: &B, x: View<'_, B>, rows: usize, dim: usize, y: ViewMut<'_, B>, rstd: ViewMut<'_, B>) {
    be.rmsnorm_forward(x, rows, dim, RMSNORM_EPS, y, rstd);
}

/// dx (= or += with `accumulate`) from the saved output y and rstd.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    be: &B,
    y: View<'_, B>,
    rstd: View<'_, B>,
    dy: View<'_, B>,
    rows: usize,
    dim: usize,
    dx: ViewMut<'_, B>,
    accumulate: bool,
) {
    be.rmsnorm_backward(y, rstd, dy, rows, dim, dx, accumulate);
}
