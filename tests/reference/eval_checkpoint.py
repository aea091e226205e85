"""Validation loss of a checkpoint on an llm.c token shard, by the JAX reference (float64).

    python tests/reference/eval_checkpoint.py --checkpoint DIR --shard FILE [--batch B] [--seq T]
        [--steps N] [--stride S]

DIR holds `model.safetensors` (nanochat parameter names, (out, in) layout; F32, F16 or BF16) and
`meta.json` (the model shape under `model_config`, or as top-level keys: n_layer, n_embd, n_head,
n_kv_head, vocab_size, sequence_len, optionally head_dim, else n_embd / n_head).

FILE is an llm.c token shard: a header of 256 little-endian int32 (magic 20240520, version 1, token count)
then uint16 tokens, or (magic 20240801, version 7, token count) then uint32 tokens.

Window k (k = 0..N-1) is the B*T+1 tokens starting at k*S (S defaults to B*T+1: each batch takes the next
B*T+1 tokens, as nanochat's loader does; pass --stride B*T for llm.c's overlapping-by-one windows).
Inputs are its first B*T tokens as (B, T), targets the same shifted by one. Prints one JSON object:
{"val_loss": mean nats per target over all windows, "tokens": targets counted, "windows": N, ...}.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import model  # noqa: E402
import st_io  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

HEADER_INTS = 256
SHARD_FORMATS = {20240520: (1, np.dtype("<u2")), 20240801: (7, np.dtype("<u4"))}
SHAPE_KEYS = ["n_layer", "n_embd", "n_head", "n_kv_head", "vocab_size", "sequence_len"]


class InputError(Exception):
    """Something wrong with the user's files or flags; printed as one line, no traceback."""


def read_shard(path):
    """Tokens of an llm.c shard as an int64 array."""
    try:
        raw = open(path, "rb").read()
    except OSError as e:
        raise InputError(f"cannot read shard {path}: {e.strerror}; pass an existing llm.c .bin token shard")
    if len(raw) < HEADER_INTS * 4:
        raise InputError(f"shard {path} is {len(raw)} bytes, shorter than the 1024-byte llm.c header")
    header = np.frombuffer(raw[: HEADER_INTS * 4], dtype="<i4")
    magic, version, count = int(header[0]), int(header[1]), int(header[2])
    if magic not in SHARD_FORMATS:
        raise InputError(f"shard {path}: magic {magic} is neither 20240520 (uint16) nor 20240801 (uint32)")
    want_version, dtype = SHARD_FORMATS[magic]
    if version != want_version:
        raise InputError(f"shard {path}: magic {magic} needs version {want_version}, header says {version}")
    body = raw[HEADER_INTS * 4 :]
    if count < 0 or count * dtype.itemsize > len(body):
        raise InputError(
            f"shard {path}: header promises {count} tokens but the file holds {len(body) // dtype.itemsize}; "
            "the file is truncated or not an llm.c shard"
        )
    return np.frombuffer(body[: count * dtype.itemsize], dtype=dtype).astype(np.int64)


def read_config(ckpt_dir):
    path = os.path.join(ckpt_dir, "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}; --checkpoint must be a checkpoint directory")
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e})")
    shape = meta.get("model_config", meta)
    missing = [k for k in SHAPE_KEYS if k not in shape]
    if missing:
        raise InputError(f"{path}: model shape lacks {', '.join(missing)} (looked in model_config and top level)")
    try:
        head_dim = int(shape.get("head_dim", int(shape["n_embd"]) // int(shape["n_head"])))
        return model.Config(
            int(shape["n_layer"]), int(shape["n_embd"]), int(shape["n_head"]), int(shape["n_kv_head"]),
            head_dim, int(shape["vocab_size"]), int(shape["sequence_len"]),
        )
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: bad model shape: {e}")


def read_params(ckpt_dir, cfg):
    path = os.path.join(ckpt_dir, "model.safetensors")
    try:
        tensors, _ = st_io.read(path)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}")
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not a readable safetensors file: {e}")
    # torch.compile'd nanochat models save names with this prefix
    tensors = {k.removeprefix("_orig_mod."): v for k, v in tensors.items()}
    params = {}
    for name, shape in model.param_shapes(cfg):
        if name not in tensors:
            raise InputError(f"{path} has no tensor {name}; is meta.json's model shape the checkpoint's?")
        if tuple(tensors[name].shape) != shape:
            raise InputError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, meta.json implies {shape}")
        params[name] = jnp.asarray(tensors[name].astype(np.float64))
    return params


def evaluate(cfg, params, tokens, batch, seq, steps, stride):
    """(mean loss in nats per target, number of targets) over `steps` windows."""
    need = (steps - 1) * stride + batch * seq + 1
    if need > len(tokens):
        raise InputError(
            f"--steps {steps} windows of --batch {batch} x --seq {seq} need {need} tokens, "
            f"the shard has {len(tokens)}; lower --steps"
        )
    if tokens[:need].max() >= cfg.vocab_size:
        raise InputError(f"the shard has token id {tokens[:need].max()} >= vocab_size {cfg.vocab_size}")

    @jax.jit
    def window_nll_sum(params, idx, targets):
        nll, _ = model.per_token_loss(cfg, params, idx, targets)
        return jnp.sum(nll)

    total = 0.0
    for k in range(steps):
        w = tokens[k * stride : k * stride + batch * seq + 1]
        idx = jnp.asarray(w[:-1].reshape(batch, seq))
        targets = jnp.asarray(w[1:].reshape(batch, seq))
        total += float(window_nll_sum(params, idx, targets))
    count = steps * batch * seq
    return total / count, count


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="directory with model.safetensors and meta.json")
    ap.add_argument("--shard", required=True, help="llm.c token shard (.bin)")
    ap.add_argument("--batch", type=int, default=1, help="rows per window (B)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (T); default the model's sequence_len")
    ap.add_argument("--steps", type=int, default=1, help="number of windows (N)")
    ap.add_argument("--stride", type=int, default=None, help="tokens between window starts; default B*T+1")
    args = ap.parse_args(argv)
    try:
        cfg = read_config(args.checkpoint)
        seq = args.seq if args.seq is not None else cfg.sequence_len
        stride = args.stride if args.stride is not None else args.batch * seq + 1
        for flag, v in [("--batch", args.batch), ("--seq", seq), ("--steps", args.steps), ("--stride", stride)]:
            if v < 1:
                raise InputError(f"{flag} must be at least 1, got {v}")
        params = read_params(args.checkpoint, cfg)
        tokens = read_shard(args.shard)
        loss, count = evaluate(cfg, params, tokens, args.batch, seq, args.steps, stride)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"val_loss": loss, "tokens": count, "windows": args.steps, "batch": args.batch,
                      "seq": seq, "stride": stride}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
