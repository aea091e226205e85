"""Regenerate every fixture under tests/reference/fixtures/ (deterministic: fixed seeds, float64 math).

Usage: python tests/reference/make_fixtures.py
Every input is drawn, rounded to float32, and the float64 computation starts from those float32 values,
so the stored inputs are exactly what the stored outputs were computed from. Outputs are stored float32.
See README.md in this folder for the contents of each file.
"""

import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import model  # noqa: E402  (enables jax x64)
import optim  # noqa: E402
import st_io  # noqa: E402

import jax.numpy as jnp  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def f32(x):
    """Round to float32 (what gets stored)."""
    return np.ascontiguousarray(np.asarray(x, dtype=np.float64).astype(np.float32))


def f32_exact(x):
    """Round to float32 and return as float64, so later math starts from the stored values."""
    return f32(x).astype(np.float64)


def random_params(cfg, rng):
    """Random non-zero weights: wte ~ N(0, 1), every other matrix ~ N(0, 1/fan_in)."""
    params = {}
    for name, (out_f, in_f) in model.param_shapes(cfg):
        std = 1.0 if name == "transformer.wte.weight" else 1.0 / np.sqrt(in_f)
        params[name] = f32_exact(rng.normal(0.0, std, size=(out_f, in_f)))
    return params


def save(name, tensors, metadata):
    path = os.path.join(FIXTURES, name)
    st_io.write(path, tensors, metadata)
    # cross-check our writer against the official reader: same names, dtypes and values
    back = load_file(path)
    assert sorted(back) == sorted(tensors), name
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), (name, k)
    print(f"wrote {path} ({len(tensors)} tensors)")


def make_model_fixture(name, cfg, batch, seed):
    rng = np.random.default_rng(seed)
    params = random_params(cfg, rng)
    T = cfg.sequence_len
    idx = rng.integers(0, cfg.vocab_size, size=(batch, T), dtype=np.int64).astype(np.int32)
    targets = rng.integers(0, cfg.vocab_size, size=(batch, T), dtype=np.int64).astype(np.int32)
    # a few ignored targets, in both rows, including the very first and very last position
    for b, t in [(0, 0), (0, 5), (1, 9), (1, T - 1)]:
        targets[b, t] = -1
    prompt = rng.integers(0, cfg.vocab_size, size=(7,), dtype=np.int64).astype(np.int32)

    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    loss, grads = model.loss_and_grads(cfg, jparams, jnp.asarray(idx), jnp.asarray(targets))
    logits_last = model.logits(cfg, jparams, jnp.asarray(prompt)[None, :])[0, -1]

    tensors = {k: f32(v) for k, v in params.items()}
    tensors["idx"] = idx
    tensors["targets"] = targets
    tensors["loss"] = f32(np.asarray([float(loss)]))
    for k, g in grads.items():
        tensors["grad." + k] = f32(g)
    tensors["prompt"] = prompt
    tensors["logits_last"] = f32(logits_last)
    meta = cfg.metadata()
    meta["batch_size"] = str(batch)
    save(name, tensors, meta)
    print(f"  loss {float(loss):.6f}")


def make_muon_fixture():
    rng = np.random.default_rng(1001)
    lr, momentum = 0.02, 0.9
    tensors = {}
    for tag, shape in [("tall", (48, 24)), ("wide", (24, 48))]:
        param = f32_exact(rng.normal(0.0, 1.0 / np.sqrt(shape[1]), size=shape))
        grad = f32_exact(rng.normal(0.0, 0.1, size=shape))
        buf = f32_exact(rng.normal(0.0, 0.05, size=shape))
        param_out, buf_out = optim.muon_step(param, grad, buf, lr, momentum)
        tensors.update(
            {
                f"{tag}.param": f32(param),
                f"{tag}.grad": f32(grad),
                f"{tag}.buf": f32(buf),
                f"{tag}.param_out": f32(param_out),
                f"{tag}.buf_out": f32(buf_out),
            }
        )
    meta = {
        "lr": repr(lr),
        "momentum": repr(momentum),
        "ns_coefficients": f"{optim.NS_A},{optim.NS_B},{optim.NS_C}",
        "ns_steps": str(optim.NS_STEPS),
        "ns_eps": repr(optim.NS_EPS),
    }
    save("muon_step.safetensors", tensors, meta)


def make_adamw_fixture():
    rng = np.random.default_rng(1002)
    shape = (16, 8)
    t, lr, beta1, beta2, eps, wd = 3, 0.01, 0.8, 0.95, 1e-10, 0.01
    param = f32_exact(rng.normal(0.0, 1.0, size=shape))
    grad = f32_exact(rng.normal(0.0, 0.1, size=shape))
    m = f32_exact(rng.normal(0.0, 0.05, size=shape))
    v = f32_exact(rng.uniform(0.0, 0.02, size=shape))
    param_out, m_out, v_out = optim.adamw_step(param, grad, m, v, t, lr, beta1, beta2, eps, wd)
    tensors = {
        "param": f32(param),
        "grad": f32(grad),
        "m": f32(m),
        "v": f32(v),
        "param_out": f32(param_out),
        "m_out": f32(m_out),
        "v_out": f32(v_out),
    }
    meta = {
        "step": str(t),
        "lr": repr(lr),
        "beta1": repr(beta1),
        "beta2": repr(beta2),
        "eps": repr(eps),
        "weight_decay": repr(wd),
    }
    save("adamw_step.safetensors", tensors, meta)


def make_schedule_fixture():
    n, warmup, warmdown, final = 100, 0.1, 0.2, 0.05
    warmup_iters, warmdown_iters = optim.schedule_iters(n, warmup, warmdown)
    doc = {
        "num_iterations": n,
        "warmup_ratio": warmup,
        "warmdown_ratio": warmdown,
        "final_lr_frac": final,
        "warmup_iters": warmup_iters,
        "warmdown_iters": warmdown_iters,
        "lr_mult": [optim.lr_multiplier(it, n, warmup, warmdown, final) for it in range(n + 1)],
        "muon_momentum": [optim.muon_momentum(it) for it in range(n + 1)],
    }
    path = os.path.join(FIXTURES, "schedule.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {path}")


# The full recipe of optim_5steps (SPEC.md section 4 with the tiny_mha shape).
FIVE_STEPS = 5
MATRIX_LR = 0.02
EMBEDDING_LR = 0.2
UNEMBEDDING_LR = 0.004
ADAM_BETAS = (0.8, 0.95)
ADAM_EPS = 1e-10
GRAD_CLIP = 1.0
# Global gradient norms of the five given gradients: some steps clip, some do not.
GRAD_NORMS = [0.5, 3.0, 0.9, 12.0, 1.5]


def make_optim_5steps_fixture(cfg):
    rng = np.random.default_rng(1003)
    params = random_params(cfg, rng)
    names = [n for n, _ in model.param_shapes(cfg)]
    d_scale = (cfg.n_embd / 768.0) ** -0.5
    adam_lr = {
        "transformer.wte.weight": EMBEDDING_LR * d_scale,
        "lm_head.weight": UNEMBEDDING_LR * d_scale,
    }
    muon_buf = {n: np.zeros_like(params[n]) for n in names if n not in adam_lr}
    adam_m = {n: np.zeros_like(params[n]) for n in adam_lr}
    adam_v = {n: np.zeros_like(params[n]) for n in adam_lr}

    tensors = {"init." + n: f32(params[n]) for n in names}
    lr_mults, momenta, norms, coefs = [], [], [], []
    for k in range(FIVE_STEPS):
        # per-tensor scales differ so the global norm is not dominated evenly
        raw = {n: rng.normal(0.0, rng.uniform(0.2, 2.0), size=params[n].shape) for n in names}
        total = np.sqrt(sum(np.sum(g * g) for g in raw.values()))
        grads = {n: f32_exact(g * (GRAD_NORMS[k] / total)) for n, g in raw.items()}
        for n in names:
            tensors[f"grad{k}.{n}"] = f32(grads[n])

        grads, total_norm, coef = optim.clip_global_norm(grads, GRAD_CLIP)
        lrm = optim.lr_multiplier(k, FIVE_STEPS, 0.0, 0.2, 0.0)
        mu = optim.muon_momentum(k)
        for n in names:
            if n in adam_lr:
                params[n], adam_m[n], adam_v[n] = optim.adamw_step(
                    params[n], grads[n], adam_m[n], adam_v[n], k + 1, adam_lr[n] * lrm,
                    ADAM_BETAS[0], ADAM_BETAS[1], ADAM_EPS, 0.0,
                )
            else:
                params[n], muon_buf[n] = optim.muon_step(params[n], grads[n], muon_buf[n], MATRIX_LR * lrm, mu)
        for n in names:
            tensors[f"step{k}.{n}"] = f32(params[n])
        lr_mults.append(lrm)
        momenta.append(mu)
        norms.append(total_norm)
        coefs.append(coef)

    meta = model.Config.metadata(cfg)
    meta.update(
        {
            "num_steps": str(FIVE_STEPS),
            "num_iterations": str(FIVE_STEPS),
            "warmup_ratio": "0.0",
            "warmdown_ratio": "0.2",
            "final_lr_frac": "0.0",
            "matrix_lr": repr(MATRIX_LR),
            "embedding_lr": repr(EMBEDDING_LR),
            "unembedding_lr": repr(UNEMBEDDING_LR),
            "adam_lr_scale": "(n_embd/768)^-0.5",
            "adam_betas": f"{ADAM_BETAS[0]},{ADAM_BETAS[1]}",
            "adam_eps": repr(ADAM_EPS),
            "weight_decay": "0.0",
            "grad_clip": repr(GRAD_CLIP),
            "clip_formula": "total_norm = sqrt(sum over all params of sum(g^2)); "
            "coef = grad_clip / (total_norm + 1e-6); if coef < 1: g *= coef",
            "lr_mult": ",".join(repr(x) for x in lr_mults),
            "muon_momentum": ",".join(repr(x) for x in momenta),
            "grad_total_norm": ",".join(repr(x) for x in norms),
            "clip_coef": ",".join(repr(x) for x in coefs),
            "layout": "init.<name> = params before step 0; grad{k}.<name> = raw (unclipped) grad at step k; "
            "step{k}.<name> = params after step k; k = 0..4; AdamW step count t = k+1",
        }
    )
    save("optim_5steps.safetensors", tensors, meta)


def main():
    os.makedirs(FIXTURES, exist_ok=True)
    tiny_mha = model.Config(n_layer=2, n_embd=64, n_head=4, n_kv_head=4, head_dim=16, vocab_size=97, sequence_len=16)
    tiny_gqa = model.Config(n_layer=3, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, vocab_size=97, sequence_len=16)
    make_model_fixture("tiny_mha.safetensors", tiny_mha, batch=2, seed=42)
    make_model_fixture("tiny_gqa.safetensors", tiny_gqa, batch=2, seed=43)
    make_muon_fixture()
    make_adamw_fixture()
    make_schedule_fixture()
    make_optim_5steps_fixture(tiny_mha)


if __name__ == "__main__":
    main()
