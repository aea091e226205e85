"""Optional cross-check of the fixtures against PyTorch's own primitives (float64, CPU).

    pip install torch && python tests/reference/check_torch.py

Not needed to regenerate anything. It rebuilds the model the way nanochat does with PyTorch
(F.rms_norm, F.scaled_dot_product_attention with enable_gqa, F.cross_entropy(ignore_index=-1), autograd),
steps torch.optim.AdamW from the fixture's state, clips with clip_grad_norm_, and compares each result with
the stored fixtures. Exits 1 on any mismatch.
"""

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import checks  # noqa: E402
import st_io  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
EPS = float(np.finfo(np.float32).eps)
check = checks.check


def rel(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def torch_logits(meta, w, idx):
    L, H, Hkv, D = (int(meta[k]) for k in ["n_layer", "n_head", "n_kv_head", "head_dim"])
    B, T = idx.shape

    def norm(x):
        return F.rms_norm(x, (x.size(-1),), eps=EPS)

    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    def rotary(x):
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=-1)

    x = norm(F.embedding(idx, w["transformer.wte.weight"]))
    for i in range(L):
        p = f"transformer.h.{i}."
        h = norm(x)
        q = F.linear(h, w[p + "attn.c_q.weight"]).view(B, T, H, D)
        k = F.linear(h, w[p + "attn.c_k.weight"]).view(B, T, Hkv, D)
        v = F.linear(h, w[p + "attn.c_v.weight"]).view(B, T, Hkv, D)
        q, k = norm(rotary(q)), norm(rotary(k))
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=Hkv != H
        )
        x = x + F.linear(y.transpose(1, 2).reshape(B, T, H * D), w[p + "attn.c_proj.weight"])
        h = norm(x)
        x = x + F.linear(F.relu(F.linear(h, w[p + "mlp.c_fc.weight"])).square(), w[p + "mlp.c_proj.weight"])
    x = norm(x)
    return 15.0 * torch.tanh(F.linear(x, w["lm_head.weight"]) / 15.0)


def check_models():
    for name in ["tiny_mha.safetensors", "tiny_gqa.safetensors"]:
        t, meta = st_io.read(os.path.join(FIXTURES, name))
        w = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in t.items()
             if k.endswith(".weight") and not k.startswith("grad.")}
        idx = torch.tensor(t["idx"], dtype=torch.long)
        targets = torch.tensor(t["targets"], dtype=torch.long)
        z = torch_logits(meta, w, idx)
        loss = F.cross_entropy(z.view(-1, z.size(-1)), targets.view(-1), ignore_index=-1)
        loss.backward()
        check(abs(loss.item() - float(t["loss"][0])) < 1e-6, f"torch {name}: loss {loss.item():.6f}")
        worst = max(rel(w[k].grad.numpy(), t["grad." + k]) for k in w)
        check(worst < 1e-6, f"torch {name}: autograd grads match (worst rel {worst:.1e})")
        with torch.no_grad():
            last = torch_logits(meta, w, torch.tensor(t["prompt"], dtype=torch.long)[None])[0, -1]
        check(rel(last.numpy(), t["logits_last"]) < 1e-6, f"torch {name}: logits_last matches")


def torch_adamw_step(param, grad, m, v, step_before, lr, betas, eps, wd):
    p = torch.tensor(param, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    opt.state[p] = {
        "step": torch.tensor(float(step_before), dtype=torch.float64),
        "exp_avg": torch.tensor(m, dtype=torch.float64),
        "exp_avg_sq": torch.tensor(v, dtype=torch.float64),
    }
    p.grad = torch.tensor(grad, dtype=torch.float64)
    opt.step()
    s = opt.state[p]
    return p.detach().numpy(), s["exp_avg"].numpy(), s["exp_avg_sq"].numpy()


def check_adamw():
    t, meta = st_io.read(os.path.join(FIXTURES, "adamw_step.safetensors"))
    step = int(meta["step"])
    p, m, v = torch_adamw_step(
        t["param"], t["grad"], t["m"], t["v"], step - 1, float(meta["lr"]),
        (float(meta["beta1"]), float(meta["beta2"])), float(meta["eps"]), float(meta["weight_decay"]),
    )
    check(rel(p - t["param"], t["param_out"] - t["param"]) < 1e-5, "torch AdamW: param update matches")
    check(rel(m, t["m_out"]) < 1e-6 and rel(v, t["v_out"]) < 1e-6, "torch AdamW: m, v match")


def nanochat_muon(p, g, buf, lr, mu):
    """Muon as nanochat writes it, in float64 torch (its NS runs in bf16 on GPU)."""
    buf.lerp_(g, 1 - mu)
    g = g.lerp(buf, mu)
    X = g
    if g.size(-2) > g.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(5):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if g.size(-2) > g.size(-1):
        X = X.mT
    p.add_(X, alpha=-lr * max(1, p.size(-2) / p.size(-1)) ** 0.5)


def check_muon():
    t, meta = st_io.read(os.path.join(FIXTURES, "muon_step.safetensors"))
    for tag in ["tall", "wide"]:
        p = torch.tensor(t[f"{tag}.param"], dtype=torch.float64)
        buf = torch.tensor(t[f"{tag}.buf"], dtype=torch.float64)
        nanochat_muon(p, torch.tensor(t[f"{tag}.grad"], dtype=torch.float64), buf, float(meta["lr"]), float(meta["momentum"]))
        check(rel(p.numpy() - t[f"{tag}.param"], t[f"{tag}.param_out"] - t[f"{tag}.param"]) < 1e-5, f"torch Muon {tag}: update matches")
        check(rel(buf.numpy(), t[f"{tag}.buf_out"]) < 1e-6, f"torch Muon {tag}: buf matches")


def check_five_steps():
    t, meta = st_io.read(os.path.join(FIXTURES, "optim_5steps.safetensors"))
    names = sorted(k.split(".", 1)[1] for k in t if k.startswith("init."))
    d = int(meta["n_embd"])
    lrm = [float(x) for x in meta["lr_mult"].split(",")]
    mus = [float(x) for x in meta["muon_momentum"].split(",")]
    w = {n: torch.tensor(t["init." + n], dtype=torch.float64, requires_grad=True) for n in names}
    adam_names = ["lm_head.weight", "transformer.wte.weight"]
    groups = [
        {"params": [w["transformer.wte.weight"]], "lr": 0.2 * (d / 768) ** -0.5},
        {"params": [w["lm_head.weight"]], "lr": 0.004 * (d / 768) ** -0.5},
    ]
    for g in groups:
        g["initial_lr"] = g["lr"]
    adam = torch.optim.AdamW(groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, foreach=False)
    bufs = {n: torch.zeros_like(w[n]) for n in names if n not in adam_names}
    for k in range(int(meta["num_steps"])):
        for n in names:
            w[n].grad = torch.tensor(t[f"grad{k}.{n}"], dtype=torch.float64)
        torch.nn.utils.clip_grad_norm_([w[n] for n in names], 1.0)
        for g in adam.param_groups:
            g["lr"] = g["initial_lr"] * lrm[k]
        adam.step()
        with torch.no_grad():
            for n in bufs:
                nanochat_muon(w[n], w[n].grad, bufs[n], 0.02 * lrm[k], mus[k])
        worst = max(rel(w[n].detach().numpy() - t["init." + n], t[f"step{k}.{n}"] - t["init." + n]) for n in names)
        check(worst < 1e-5, f"torch 5 steps, step {k}: params match (worst rel of displacement {worst:.1e})")


def main():
    torch.set_default_dtype(torch.float64)
    checks.run([check_models, check_adamw, check_muon, check_five_steps])


if __name__ == "__main__":
    main()
