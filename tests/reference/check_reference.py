"""Self-checks of the reference itself (run after make_fixtures.py; exits non-zero on any failure).

1. A second forward, written differently (numpy, explicit loops over batch, head and position, one
   softmax row at a time), must agree with model.logits to float64 round-off, for MHA and GQA.
2. jax.grad must agree with central finite differences of the float64 loss on random entries of every
   parameter.
3. The stored fixtures must be reproducible from their own stored float32 inputs: loss, every gradient
   and logits_last recomputed from the file match what the file holds.
5. eval_checkpoint.py on a checkpoint made from tiny_mha (F32 and BF16) and uint16 / uint32 shards gives
   the loss computed directly, and bad inputs give exit code 2 with a message, not a traceback.
4. Muon's Newton-Schulz output must have singular values near 1 (the point of the iteration), and the
   5-step fixture's recorded clip coefficients must follow from its stored gradients.
"""

import contextlib
import io
import json
import math
import os
import struct
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import checks  # noqa: E402
import model  # noqa: E402
import optim  # noqa: E402
import st_io  # noqa: E402
import eval_checkpoint  # noqa: E402

import jax.numpy as jnp  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
check = checks.check


def loop_logits(cfg, params, idx):
    """Forward pass by explicit loops; deliberately shares no code with model.py."""
    eps = float(np.float32(np.finfo(np.float32).eps))
    H, Hkv, D, d = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_embd
    B, T = idx.shape

    def norm(v):
        return v / math.sqrt(float(np.dot(v, v)) / v.shape[0] + eps)

    def rope(v, t):
        out = np.empty_like(v)
        half = D // 2
        for j in range(half):
            theta = t / (10000.0 ** (2.0 * j / D))
            c, s = math.cos(theta), math.sin(theta)
            out[j] = v[j] * c + v[j + half] * s
            out[j + half] = -v[j] * s + v[j + half] * c
        return out

    result = np.zeros((B, T, cfg.vocab_size))
    for b in range(B):
        x = np.array([norm(params["transformer.wte.weight"][idx[b, t]]) for t in range(T)])
        for i in range(cfg.n_layer):
            pre = f"transformer.h.{i}."
            h = np.array([norm(x[t]) for t in range(T)])
            q = h @ params[pre + "attn.c_q.weight"].T
            k = h @ params[pre + "attn.c_k.weight"].T
            v = h @ params[pre + "attn.c_v.weight"].T
            y = np.zeros((T, H * D))
            for head in range(H):
                kvh = head // (H // Hkv)
                qs = [norm(rope(q[t, head * D : (head + 1) * D], t)) for t in range(T)]
                ks = [norm(rope(k[t, kvh * D : (kvh + 1) * D], t)) for t in range(T)]
                vs = [v[t, kvh * D : (kvh + 1) * D] for t in range(T)]
                for t in range(T):
                    s = np.array([np.dot(qs[t], ks[u]) / math.sqrt(D) for u in range(t + 1)])
                    w = np.exp(s - s.max())
                    w /= w.sum()
                    y[t, head * D : (head + 1) * D] = sum(w[u] * vs[u] for u in range(t + 1))
            x = x + y @ params[pre + "attn.c_proj.weight"].T
            h = np.array([norm(x[t]) for t in range(T)])
            a = np.maximum(h @ params[pre + "mlp.c_fc.weight"].T, 0.0)
            x = x + (a * a) @ params[pre + "mlp.c_proj.weight"].T
        x = np.array([norm(x[t]) for t in range(T)])
        result[b] = 15.0 * np.tanh((x @ params["lm_head.weight"].T) / 15.0)
    assert d == x.shape[1]
    return result


def random_params(cfg, rng):
    return {
        n: rng.normal(0.0, 1.0 if n == "transformer.wte.weight" else 1.0 / math.sqrt(s[1]), size=s)
        for n, s in model.param_shapes(cfg)
    }


def check_forward_and_grads():
    rng = np.random.default_rng(7)
    for cfg in [
        model.Config(2, 32, 4, 4, 8, 23, 9),
        model.Config(2, 48, 6, 2, 8, 31, 11),  # GQA 3:1
        model.Config(1, 32, 2, 1, 16, 19, 6),  # MQA
    ]:
        params = random_params(cfg, rng)
        idx = rng.integers(0, cfg.vocab_size, size=(2, cfg.sequence_len))
        jp = {k: jnp.asarray(v) for k, v in params.items()}
        ref = np.asarray(model.logits(cfg, jp, jnp.asarray(idx)))
        alt = loop_logits(cfg, params, idx)
        err = np.max(np.abs(ref - alt))
        check(err < 1e-11, f"loop forward == jax forward, H={cfg.n_head} Hkv={cfg.n_kv_head}: max err {err:.2e}")

        targets = rng.integers(0, cfg.vocab_size, size=(2, cfg.sequence_len))
        targets[0, 1] = -1
        targets[1, -1] = -1
        tj = jnp.asarray(targets)
        _, grads = model.loss_and_grads(cfg, jp, jnp.asarray(idx), tj)
        worst = 0.0
        for name, shape in model.param_shapes(cfg):
            for _ in range(3):
                pos = tuple(rng.integers(0, n) for n in shape)
                if name == "transformer.wte.weight":
                    pos = (int(idx[0, 0]), pos[1])  # a row that is used
                h = 1e-5
                plus = dict(params)
                minus = dict(params)
                plus[name] = params[name].copy()
                minus[name] = params[name].copy()
                plus[name][pos] += h
                minus[name][pos] -= h
                lp = float(model.loss(cfg, {k: jnp.asarray(v) for k, v in plus.items()}, jnp.asarray(idx), tj))
                lm = float(model.loss(cfg, {k: jnp.asarray(v) for k, v in minus.items()}, jnp.asarray(idx), tj))
                fd = (lp - lm) / (2 * h)
                g = float(grads[name][pos])
                worst = max(worst, abs(fd - g) / max(1e-6, abs(g), abs(fd)))
        check(worst < 1e-5, f"jax.grad == finite differences, H={cfg.n_head} Hkv={cfg.n_kv_head}: worst rel {worst:.2e}")


def check_model_fixtures():
    for name in ["tiny_mha.safetensors", "tiny_gqa.safetensors"]:
        t, meta = st_io.read(os.path.join(FIXTURES, name))
        cfg = model.Config(
            int(meta["n_layer"]), int(meta["n_embd"]), int(meta["n_head"]), int(meta["n_kv_head"]),
            int(meta["head_dim"]), int(meta["vocab_size"]), int(meta["sequence_len"]),
        )
        check(float(meta["rmsnorm_eps"]) == float(np.finfo(np.float32).eps), f"{name}: rmsnorm_eps is f32 epsilon")
        params = {n: jnp.asarray(t[n].astype(np.float64)) for n, _ in model.param_shapes(cfg)}
        check(len(t) == 2 * len(params) + 5,
              f"{name}: holds params, grads, idx, targets, loss, prompt, logits_last only")
        loss, grads = model.loss_and_grads(cfg, params, jnp.asarray(t["idx"]), jnp.asarray(t["targets"]))
        check(abs(float(loss) - float(t["loss"][0])) < 1e-6, f"{name}: loss reproduces ({float(loss):.6f})")
        worst = max(
            float(np.max(np.abs(np.asarray(g) - t["grad." + n])) / np.max(np.abs(t["grad." + n])))
            for n, g in grads.items()
        )
        check(worst < 1e-6, f"{name}: every gradient reproduces (worst {worst:.1e})")
        smallest = min(float(np.max(np.abs(t["grad." + n]))) for n in grads)
        check(smallest > 1e-4, f"{name}: no gradient is trivially zero (smallest max|g| {smallest:.2e})")
        ll = np.asarray(model.logits(cfg, params, jnp.asarray(t["prompt"])[None, :])[0, -1])
        check(np.max(np.abs(ll - t["logits_last"])) < 1e-5, f"{name}: logits_last reproduces")
        # logits_last is not the same as the last-position logits of a longer sequence with the prompt as prefix
        # only by accident: causality means extending the prompt must not change it.
        longer = jnp.asarray(np.concatenate([t["prompt"], t["idx"][0, :3]]))[None, :]
        ll2 = np.asarray(model.logits(cfg, params, longer)[0, len(t["prompt"]) - 1])
        check(np.max(np.abs(ll2 - ll)) < 1e-10, f"{name}: forward is causal (future tokens do not change logits)")


def check_optim_fixtures():
    t, meta = st_io.read(os.path.join(FIXTURES, "muon_step.safetensors"))
    for tag in ["tall", "wide"]:
        g = t[f"{tag}.grad"].astype(np.float64)
        buf = t[f"{tag}.buf"].astype(np.float64)
        mu = float(meta["momentum"])
        nest = optim.lerp(g, optim.lerp(buf, g, 1 - mu), mu)
        sv = np.linalg.svd(optim.newton_schulz(nest), compute_uv=False)
        check(0.5 < sv.min() and sv.max() < 1.5, f"muon {tag}: NS singular values in ({sv.min():.3f}, {sv.max():.3f})")
        p_out, b_out = optim.muon_step(t[f"{tag}.param"].astype(np.float64), g, buf, float(meta["lr"]), mu)
        check(np.array_equal(p_out.astype(np.float32), t[f"{tag}.param_out"]), f"muon {tag}: param_out reproduces")
        moved = np.max(np.abs(t[f"{tag}.param_out"] - t[f"{tag}.param"]))
        check(moved > 1e-3, f"muon {tag}: the step moves the parameters ({moved:.2e})")

    t, meta = st_io.read(os.path.join(FIXTURES, "optim_5steps.safetensors"))
    names = sorted({k.split(".", 1)[1] for k in t if k.startswith("init.")})
    coefs = [float(x) for x in meta["clip_coef"].split(",")]
    for k in range(int(meta["num_steps"])):
        total = math.sqrt(sum(float(np.sum(t[f"grad{k}.{n}"].astype(np.float64) ** 2)) for n in names))
        expect = min(1.0, 1.0 / (total + 1e-6))
        check(abs(expect - coefs[k]) < 1e-12, f"optim_5steps step {k}: clip coef {coefs[k]:.6f} from norm {total:.4f}")
    check(any(c < 1 for c in coefs) and any(c == 1 for c in coefs), "optim_5steps: some steps clip, some do not")


def write_shard(path, tokens, magic, version, dtype, count=None):
    header = np.zeros(256, dtype="<i4")
    header[:3] = [magic, version, len(tokens) if count is None else count]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=dtype).tobytes())


def write_bf16_safetensors(path, tensors):
    """BF16 by truncating float32 bits (what the reader must undo); hand-built header."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        data = (np.asarray(tensors[name], dtype="<f4").view("<u4") >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def run_eval(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = eval_checkpoint.main(argv)
    return rc, out.getvalue(), err.getvalue()


def check_eval_checkpoint():
    t, meta = st_io.read(os.path.join(FIXTURES, "tiny_mha.safetensors"))
    cfg = model.Config(2, 64, 4, 4, 16, 97, 16)
    names = [n for n, _ in model.param_shapes(cfg)]
    rng = np.random.default_rng(11)
    B, T, N = 2, 8, 3
    tokens = rng.integers(0, cfg.vocab_size, size=N * (B * T + 1) + 5)

    def direct(params, stride):
        tot = 0.0
        for k in range(N):
            w = tokens[k * stride : k * stride + B * T + 1]
            tot += float(model.loss(cfg, params, jnp.asarray(w[:-1].reshape(B, T)), jnp.asarray(w[1:].reshape(B, T))))
        return tot / N

    with tempfile.TemporaryDirectory() as tmp:
        ck = os.path.join(tmp, "ck")
        os.makedirs(ck)
        st_io.write(os.path.join(ck, "model.safetensors"), {n: t[n] for n in names})
        with open(os.path.join(ck, "meta.json"), "w") as f:
            json.dump({"step": 5, "model_config": {k: int(meta[k]) for k in eval_checkpoint.SHAPE_KEYS}}, f)
        s16, s32 = os.path.join(tmp, "a.bin"), os.path.join(tmp, "b.bin")
        write_shard(s16, tokens, 20240520, 1, "<u2")
        write_shard(s32, tokens, 20240801, 7, "<u4")
        params = {n: jnp.asarray(t[n].astype(np.float64)) for n in names}
        for shard in [s16, s32]:
            for stride in [None, B * T]:
                argv = ["--checkpoint", ck, "--shard", shard, "--batch", str(B), "--seq", str(T), "--steps", str(N)]
                if stride:
                    argv += ["--stride", str(stride)]
                rc, out, _ = run_eval(argv)
                got = json.loads(out)["val_loss"] if rc == 0 else float("nan")
                want = direct(params, stride or B * T + 1)
                check(abs(got - want) < 1e-12, f"eval_checkpoint {os.path.basename(shard)} stride {stride}: {got:.6f} == {want:.6f}")

        # BF16 checkpoint, top-level meta keys, head_dim implied
        ck2 = os.path.join(tmp, "ck2")
        os.makedirs(ck2)
        write_bf16_safetensors(os.path.join(ck2, "model.safetensors"), {n: t[n] for n in names})
        with open(os.path.join(ck2, "meta.json"), "w") as f:
            json.dump({k: int(meta[k]) for k in eval_checkpoint.SHAPE_KEYS}, f)
        rc, out, _ = run_eval(["--checkpoint", ck2, "--shard", s16, "--batch", str(B), "--seq", str(T), "--steps", str(N)])
        bf = {n: jnp.asarray(((t[n].view("<u4") >> 16) << 16).view("<f4").astype(np.float64)) for n in names}
        got = json.loads(out)["val_loss"] if rc == 0 else float("nan")
        want = direct(bf, B * T + 1)
        check(abs(got - want) < 1e-12 and abs(got - direct(params, B * T + 1)) > 1e-7,
              f"eval_checkpoint BF16 weights, top-level meta: {got:.6f} == {want:.6f}")

        bad_magic, short = os.path.join(tmp, "c.bin"), os.path.join(tmp, "d.bin")
        write_shard(bad_magic, tokens, 12345, 1, "<u2")
        write_shard(short, tokens, 20240520, 1, "<u2", count=len(tokens) + 10)
        for what, argv in [
            ("bad magic", ["--checkpoint", ck, "--shard", bad_magic]),
            ("truncated shard", ["--checkpoint", ck, "--shard", short]),
            ("missing shard", ["--checkpoint", ck, "--shard", os.path.join(tmp, "none.bin")]),
            ("missing checkpoint", ["--checkpoint", os.path.join(tmp, "none"), "--shard", s16]),
            ("too many steps", ["--checkpoint", ck, "--shard", s16, "--steps", "1000"]),
        ]:
            rc, _, err = run_eval(argv)
            check(rc == 2 and err.startswith("error: ") and err.count("\n") == 1, f"eval_checkpoint {what}: {err.strip()}")


def main():
    checks.run([check_forward_and_grads, check_model_fixtures, check_optim_fixtures, check_eval_checkpoint])


if __name__ == "__main__":
    main()
