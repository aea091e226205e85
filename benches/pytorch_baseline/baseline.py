"""The baseline nc must beat: one nanochat training step in PyTorch, timed on one GPU.

Same model and optimizers as SPEC.md (rotary half-split, QK-norm, ReLU^2, untied embeddings, softcap 15,
Muon with Newton-Schulz 5 in bf16 for block matrices, AdamW for wte and lm_head), and run as nanochat runs them,
so the ratio nc reports is against the real thing: the model torch.compile'd (dynamic=False), Muon's
Newton-Schulz function torch.compile'd by itself (nanochat's muon.py decorates it with @torch.compile), its
iterations in bf16, Muon's parameters grouped by size with Nesterov momentum, fused AdamW, bf16 autocast with
fp32 master weights except the embedding (nanochat keeps wte and the rotary tables in bf16 on a GPU), TF32 for
the fp32 matmuls left, FlashAttention through scaled_dot_product_attention. Random tokens (no data pipeline:
this times the step, not the loader). --no-compile runs it eagerly (debugging only; not the baseline).

    python benches/pytorch_baseline/baseline.py --depth 20 --dbs 32                # on a GPU
    python benches/pytorch_baseline/baseline.py --sweep                            # depth 20 and up until OOM
    python benches/pytorch_baseline/baseline.py --check-fixture tests/reference/fixtures/tiny_gqa.safetensors
    python benches/pytorch_baseline/baseline.py --device cpu --no-compile --depth 2 --dbs 2 --seq-len 64 \
        --vocab 512 --steps 3 --warmup 1                                            # smoke test, any machine

Prints one JSON object per configuration: tokens/s, MFU against the GPU's dense bf16 peak (SPEC.md 5 and 8),
peak memory, and the loss (which must fall over the timed steps on a fixed batch, a check that the step works).
"""

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2.25e15, "A100": 312e12}


def gpu_peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak
    return None


def rms_norm(x):
    # The project's one eps: float32 machine epsilon (core/src/config.rs RMSNORM_EPS).
    return F.rms_norm(x, (x.size(-1),), eps=1.1920928955078125e-07)


class Block(nn.Module):
    def __init__(self, d, n_head, n_kv_head, head_dim):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.c_q = nn.Linear(d, n_head * head_dim, bias=False)
        self.c_k = nn.Linear(d, n_kv_head * head_dim, bias=False)
        self.c_v = nn.Linear(d, n_kv_head * head_dim, bias=False)
        self.c_proj = nn.Linear(n_head * head_dim, d, bias=False)
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = rms_norm(x)
        q = self.c_q(h).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(h).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(h).view(B, T, self.n_kv_head, self.head_dim)
        q, k = rms_norm(rotary(q, cos, sin)), rms_norm(rotary(k, cos, sin))
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + self.mlp_proj(F.relu(self.c_fc(rms_norm(x))).square())
        return x


def rotary(x, cos, sin):
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=-1).to(x.dtype)


class GPT(nn.Module):
    def __init__(self, depth, vocab, seq_len, n_kv_head=None, d=None, head_dim=128):
        super().__init__()
        d = d or depth * 64
        self.head_dim = head_dim
        n_head = d // self.head_dim
        n_kv_head = n_kv_head or n_head
        self.d, self.depth, self.n_head, self.vocab, self.seq_len = d, depth, n_head, vocab, seq_len
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, n_head, n_kv_head, self.head_dim) for _ in range(depth)])
        self.lm_head = nn.Linear(d, vocab, bias=False)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", freqs.sin()[None, :, None, :], persistent=False)
        self._init()

    @torch.no_grad()
    def _init(self):
        nn.init.normal_(self.wte.weight, 0.0, 1.0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                fan_out, fan_in = m.weight.shape
                nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in)))
        nn.init.zeros_(self.lm_head.weight)
        for b in self.blocks:
            nn.init.zeros_(b.c_proj.weight)
            nn.init.zeros_(b.mlp_proj.weight)

    def forward(self, idx, targets):
        T = idx.size(1)
        x = rms_norm(self.wte(idx))
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        for b in self.blocks:
            x = b(x, cos, sin)
        logits = self.lm_head(rms_norm(x)).float()
        logits = 15.0 * torch.tanh(logits / 15.0)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self):
        # SPEC.md section 1: 6 * (params - wte) + 12 * L * H * D * T.
        dense = 6 * (self.num_params() - self.wte.weight.numel())
        return dense + 12 * self.depth * self.n_head * self.head_dim * self.seq_len


def newton_schulz5(g, steps=5):
    """Orthogonalize g: the quintic Newton-Schulz iteration, in bf16, as nanochat's muon.py
    (zeropower_via_newtonschulz5). `Muon` calls it through torch.compile, as nanochat's decorator does."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = x @ x.mT
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """nanochat's single-GPU Muon: parameters grouped by size, Nesterov momentum on the gradient, the
    orthogonalized update scaled by sqrt(max(1, rows / cols)). `compile` wraps Newton-Schulz in torch.compile
    (nanochat: @torch.compile on the function, so each matrix shape compiles once, then runs the fused code)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, compile=True):
        params = list(params)
        groups = [dict(params=[p for p in params if p.numel() == n]) for n in sorted({p.numel() for p in params})]
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        self.orthogonalize = torch.compile(newton_schulz5) if compile else newton_schulz5

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - mu)
                g = g.lerp_(buf, mu) if group["nesterov"] else buf
                g = self.orthogonalize(g, steps=group["ns_steps"])
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                p.add_(g.to(p.dtype), alpha=-group["lr"] * scale)


def check_fixture(path):
    """Loads a JAX reference fixture (tests/reference/fixtures/tiny_*.safetensors) into this model and
    compares the loss, in float64 on the CPU: proof that the baseline times the same model as nc."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "reference"))
    import st_io

    t, meta = st_io.read(path)
    m = {k: int(meta[k]) for k in ["n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "vocab_size", "sequence_len"]}
    model = GPT(m["n_layer"], m["vocab_size"], m["sequence_len"], m["n_kv_head"], d=m["n_embd"],
                head_dim=m["head_dim"]).double()
    ours = {"wte.weight": "transformer.wte.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(m["n_layer"]):
        for a, b in [("c_q", "attn.c_q"), ("c_k", "attn.c_k"), ("c_v", "attn.c_v"), ("c_proj", "attn.c_proj"),
                     ("c_fc", "mlp.c_fc"), ("mlp_proj", "mlp.c_proj")]:
            ours[f"blocks.{i}.{a}.weight"] = f"transformer.h.{i}.{b}.weight"
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.tensor(t[ours[name]], dtype=torch.float64))
    idx = torch.tensor(t["idx"], dtype=torch.long)
    targets = torch.tensor(t["targets"], dtype=torch.long)
    loss = model(idx, targets).item()
    expected = float(t["loss"][0])
    ok = abs(loss - expected) < 1e-5 * abs(expected)
    print(json.dumps({"fixture": path, "loss": loss, "reference_loss": expected, "match": ok}))
    if not ok:
        raise SystemExit(1)


def run(args, depth, dbs):
    device = torch.device(args.device)
    torch.manual_seed(42)
    model = GPT(depth, args.vocab, args.seq_len, args.n_kv_head).to(device)
    if device.type == "cuda":
        # nanochat: the embedding and the rotary tables in bf16 on a GPU (its optimizer tolerates it; it saves
        # memory and traffic), the other weights fp32 masters under bf16 autocast; fp32 matmuls in TF32
        model.wte.to(dtype=torch.bfloat16)
        model.cos, model.sin = model.cos.bfloat16(), model.sin.bfloat16()
        torch.set_float32_matmul_precision("high")
    dmodel_scale = (model.d / 768) ** -0.5
    matrices = [p for b in model.blocks for p in b.parameters()]
    adam = torch.optim.AdamW(
        [dict(params=[model.wte.weight], lr=0.2 * dmodel_scale),
         dict(params=[model.lm_head.weight], lr=0.004 * dmodel_scale)],
        betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, fused=device.type == "cuda",
    )
    muon = Muon(matrices, lr=0.02, momentum=0.95, compile=args.compile)
    step_fn = torch.compile(model, dynamic=False) if args.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch = torch.randint(0, args.vocab, (dbs, args.seq_len + 1), generator=gen).to(device)
    x, y = batch[:, :-1], batch[:, 1:]

    def one_step():
        with autocast:
            loss = step_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        adam.step()
        muon.step()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    losses = []
    for _ in range(args.warmup):
        losses.append(one_step().item())
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    timed = [one_step() for _ in range(args.steps)]
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    losses += [l.item() for l in timed]
    tokens = dbs * args.seq_len
    peak = gpu_peak_flops(device)
    flops = model.flops_per_token() * tokens / dt
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "compile": args.compile, "depth": depth, "d_model": model.d,
        "params": model.num_params(), "flops_per_token": model.flops_per_token(), "dbs": dbs,
        "seq_len": args.seq_len, "tokens_per_step": tokens, "step_ms": dt * 1e3, "tok_per_sec": tokens / dt,
        "tflops": flops / 1e12, "mfu": flops / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loss_first": losses[0], "loss_last": losses[-1],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--dbs", type=int, default=32, help="device batch size (sequences)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--n-kv-head", type=int, default=None)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile the model and Newton-Schulz, as nanochat does (default; --no-compile: eager,"
                         " for debugging only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sweep", action="store_true",
                    help="depth 20, then 26, 32, 38, 44, 52 with the largest dbs in 32,16,8,4,2,1 that fits")
    ap.add_argument("--check-fixture", metavar="PATH", help="compare the loss with a JAX reference fixture, then exit")
    args = ap.parse_args()
    if args.check_fixture:
        check_fixture(args.check_fixture)
        return
    if not args.sweep:
        print(json.dumps(run(args, args.depth, args.dbs)), flush=True)
        return
    for depth in [20, 26, 32, 38, 44, 52]:
        fitted = False
        for dbs in [32, 16, 8, 4, 2, 1]:
            try:
                print(json.dumps(run(args, depth, dbs)), flush=True)
                fitted = True
                break
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(json.dumps({"depth": depth, "dbs": dbs, "oom": True}), flush=True)
        if not fitted:
            break


if __name__ == "__main__":
    main()
