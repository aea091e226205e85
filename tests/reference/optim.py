"""Reference optimizers and schedules of SPEC.md section 4, in float64 numpy.

Plain numpy (no autodiff needed): these are the formulas the Rust optimizers are checked against.
Matrices are (out, in), as PyTorch's Linear stores them.
"""

import math

import numpy as np

# Newton-Schulz quintic coefficients (SPEC.md section 4).
NS_A, NS_B, NS_C = 3.4445, -4.7750, 2.0315
NS_STEPS = 5
NS_EPS = 1e-7

# Global-norm clipping: clip_coef = max_norm / (total_norm + CLIP_EPS), applied only when < 1 (as PyTorch).
CLIP_EPS = 1e-6


def lerp(a, b, w):
    """a + w (b - a), torch.lerp."""
    return a + w * (b - a)


def newton_schulz(g):
    """Approximately orthogonalize g (out, in) with 5 quintic Newton-Schulz steps."""
    x = np.array(g, dtype=np.float64)
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the wide orientation so A = X X^T is the small Gram matrix
        x = x.T
    x = x / (np.linalg.norm(x) + NS_EPS)  # Frobenius norm
    for _ in range(NS_STEPS):
        a = x @ x.T
        b = NS_B * a + NS_C * (a @ a)
        x = NS_A * x + b @ x
    if tall:
        x = x.T
    return x


def muon_step(param, grad, buf, lr, momentum):
    """One Muon step on one matrix; returns (param_out, buf_out)."""
    buf_out = lerp(buf, grad, 1.0 - momentum)
    g = lerp(grad, buf_out, momentum)  # nesterov
    x = newton_schulz(g)
    out_f, in_f = param.shape
    scale = math.sqrt(max(1.0, out_f / in_f))
    return param - lr * scale * x, buf_out


def adamw_step(param, grad, m, v, t, lr, beta1, beta2, eps, weight_decay):
    """One PyTorch-AdamW step (t is 1-based); returns (param_out, m_out, v_out).

    p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """
    p = param * (1.0 - lr * weight_decay)
    m_out = beta1 * m + (1.0 - beta1) * grad
    v_out = beta2 * v + (1.0 - beta2) * grad * grad
    bias1 = 1.0 - beta1**t
    bias2 = 1.0 - beta2**t
    denom = np.sqrt(v_out) / math.sqrt(bias2) + eps
    return p - (lr / bias1) * m_out / denom, m_out, v_out


def schedule_iters(num_iterations, warmup_ratio, warmdown_ratio):
    """(warmup_iters, warmdown_iters), rounded as Python's round() (half to even)."""
    return round(warmup_ratio * num_iterations), round(warmdown_ratio * num_iterations)


def lr_multiplier(it, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """nanochat's lr multiplier: linear warmup, flat, linear warmdown to final_lr_frac."""
    warmup_iters, warmdown_iters = schedule_iters(num_iterations, warmup_ratio, warmdown_ratio)
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    if it <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - it) / warmdown_iters
    return progress * 1.0 + (1.0 - progress) * final_lr_frac


def muon_momentum(it):
    """0.85 -> 0.95 linearly over the first 300 steps, then 0.95."""
    frac = min(it / 300.0, 1.0)
    return (1.0 - frac) * 0.85 + frac * 0.95


def clip_global_norm(grads, max_norm):
    """Scale a dict of grads so their global L2 norm is at most ~max_norm.

    Returns (clipped_grads, total_norm, coef_applied) with coef = max_norm / (total_norm + 1e-6),
    applied only when coef < 1 (otherwise the grads are returned unchanged and coef_applied is 1).
    """
    total = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    coef = max_norm / (total + CLIP_EPS)
    if coef >= 1.0:
        return dict(grads), total, 1.0
    return {k: g * coef for k, g in grads.items()}, total, coef
