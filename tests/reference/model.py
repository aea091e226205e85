"""Independent JAX reference of nanochat's GPT (SPEC.md section 2), computed in float64.

Written from SPEC.md alone, not from the Rust engine, so that the two can check each other.
Parameters are a dict keyed by nanochat's names, each stored as PyTorch's Linear stores it:
(out_features, in_features), so a linear layer is `x @ W.T`.
"""

from dataclasses import dataclass

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402  (x64 must be enabled before arrays are made)
import numpy as np  # noqa: E402

# The project's one rmsnorm epsilon: f32 machine epsilon (core/src/config.rs RMSNORM_EPS).
RMSNORM_EPS = float(np.finfo(np.float32).eps)
ROPE_BASE = 10000.0
LOGIT_SOFTCAP = 15.0


@dataclass(frozen=True)
class Config:
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    vocab_size: int
    sequence_len: int

    def __post_init__(self):
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary")

    def metadata(self):
        """The safetensors `__metadata__` strings describing this shape."""
        return {
            "n_layer": str(self.n_layer),
            "n_embd": str(self.n_embd),
            "n_head": str(self.n_head),
            "n_kv_head": str(self.n_kv_head),
            "head_dim": str(self.head_dim),
            "vocab_size": str(self.vocab_size),
            "sequence_len": str(self.sequence_len),
            "rmsnorm_eps": repr(RMSNORM_EPS),
        }


def param_shapes(cfg):
    """Every parameter in nanochat's order with its (out, in) shape."""
    d, hd = cfg.n_embd, cfg.head_dim
    shapes = [("transformer.wte.weight", (cfg.vocab_size, d))]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        shapes += [
            (p + "attn.c_q.weight", (cfg.n_head * hd, d)),
            (p + "attn.c_k.weight", (cfg.n_kv_head * hd, d)),
            (p + "attn.c_v.weight", (cfg.n_kv_head * hd, d)),
            (p + "attn.c_proj.weight", (d, cfg.n_head * hd)),
            (p + "mlp.c_fc.weight", (4 * d, d)),
            (p + "mlp.c_proj.weight", (d, 4 * d)),
        ]
    shapes.append(("lm_head.weight", (cfg.vocab_size, d)))
    return shapes


def rmsnorm(x):
    """x / sqrt(mean(x^2) + eps) over the last axis, no weight."""
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + RMSNORM_EPS)


def rotary_cos_sin(T, head_dim):
    """cos and sin of angle(t, j) = t / 10000^(2j/head_dim), shape (T, head_dim/2)."""
    j = np.arange(head_dim // 2, dtype=np.float64)
    inv_freq = 1.0 / (ROPE_BASE ** (2.0 * j / head_dim))
    angle = np.outer(np.arange(T, dtype=np.float64), inv_freq)
    return jnp.asarray(np.cos(angle)), jnp.asarray(np.sin(angle))


def apply_rotary(x, cos, sin):
    """Half-split rotary on x (B, T, heads, D): y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    return jnp.concatenate([x1 * c + x2 * s, -x1 * s + x2 * c], axis=-1)


def attention(cfg, params, i, x, cos, sin):
    B, T, _ = x.shape
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    p = f"transformer.h.{i}.attn."
    q = (x @ params[p + "c_q.weight"].T).reshape(B, T, H, D)
    k = (x @ params[p + "c_k.weight"].T).reshape(B, T, Hkv, D)
    v = (x @ params[p + "c_v.weight"].T).reshape(B, T, Hkv, D)
    q = rmsnorm(apply_rotary(q, cos, sin))  # QK-norm comes after rotary
    k = rmsnorm(apply_rotary(k, cos, sin))
    # GQA: query head h reads kv head h // (H / Hkv).
    group = H // Hkv
    k = jnp.repeat(k, group, axis=2)
    v = jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)
    causal = np.tril(np.ones((T, T), dtype=bool))
    scores = jnp.where(causal[None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    y = jnp.einsum("bhts,bshd->bthd", probs, v).reshape(B, T, H * D)
    return y @ params[p + "c_proj.weight"].T


def mlp(params, i, x):
    p = f"transformer.h.{i}.mlp."
    h = jax.nn.relu(x @ params[p + "c_fc.weight"].T)
    return (h * h) @ params[p + "c_proj.weight"].T


def logits(cfg, params, idx):
    """Softcapped logits (B, T, V) for int tokens idx (B, T)."""
    T = idx.shape[1]
    cos, sin = rotary_cos_sin(T, cfg.head_dim)
    x = params["transformer.wte.weight"][idx]
    x = rmsnorm(x)
    for i in range(cfg.n_layer):
        x = x + attention(cfg, params, i, rmsnorm(x), cos, sin)
        x = x + mlp(params, i, rmsnorm(x))
    x = rmsnorm(x)
    z = x @ params["lm_head.weight"].T
    return LOGIT_SOFTCAP * jnp.tanh(z / LOGIT_SOFTCAP)


def per_token_loss(cfg, params, idx, targets):
    """Cross-entropy (nats) per position and the mask of targets that count (targets != -1)."""
    z = logits(cfg, params, idx)
    logz = jax.nn.logsumexp(z, axis=-1)
    valid = targets != -1
    safe = jnp.where(valid, targets, 0)
    picked = jnp.take_along_axis(z, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, logz - picked, 0.0), valid


def loss(cfg, params, idx, targets):
    """Mean cross-entropy over targets != -1."""
    nll, valid = per_token_loss(cfg, params, idx, targets)
    return jnp.sum(nll) / jnp.sum(valid)


def loss_and_grads(cfg, params, idx, targets):
    """(loss, {name: dloss/dparam}) by jax.grad, all float64."""
    f = lambda p: loss(cfg, p, idx, targets)  # noqa: E731
    return jax.value_and_grad(f)(params)
