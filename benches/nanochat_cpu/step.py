"""nanochat's own forward + backward step on the CPU, timed: the figure nc's CPU engine is compared against.

It imports nanochat's `gpt.py` from a checkout given on the command line (nothing of nanochat is copied into
this repository) and builds the model as nanochat's base_train does for a given depth: n_embd = 64 x depth,
heads of 128 (ceil), as many kv heads as heads, f32 on the CPU (base_train autocasts to bf16 only on CUDA),
`init_weights()`, and, unless --eager, `torch.compile(model, dynamic=False)`. One step is what nc's
`step_cpu` bench times: the loss on a fixed random batch, then `loss.backward()` (no optimizer); gradients
are dropped between steps (`zero_grad(set_to_none=True)`, as nanochat does after its optimizer step).

    git -C /path/to/nanochat archive a088b7a nanochat | tar -x -C /tmp/nanochat-oct2025   # its Oct 2025 gpt.py
    python benches/nanochat_cpu/step.py --nanochat /tmp/nanochat-oct2025 --threads 2 \\
        --depth 4 --batch 8 --seq 256 --vocab 8192 --steps 7            # add --eager for the uncompiled model

Prints one JSON line: the configuration, torch's version and CPU capability, every timed step and their
median, and the first and last loss (they must be finite: a check that the step really ran; with no optimizer
they are equal).
"""

import argparse
import json
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanochat", required=True, help="directory holding nanochat's `nanochat` package")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=7, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--eager", action="store_true", help="no torch.compile")
    return p.parse_args()


def main():
    args = parse_args()
    sys.path.insert(0, args.nanochat)
    import torch

    try:
        from nanochat.gpt import GPT, GPTConfig
    except ImportError as e:
        sys.exit(f"cannot import nanochat.gpt from {args.nanochat!r} ({e}): pass the directory that holds nanochat/")

    torch.set_num_threads(args.threads)
    torch.manual_seed(42)
    n_embd = 64 * args.depth
    n_head = max(1, (n_embd + 127) // 128)
    config = GPTConfig(
        sequence_len=args.seq,
        vocab_size=args.vocab,
        n_layer=args.depth,
        n_head=n_head,
        n_kv_head=n_head,
        n_embd=n_embd,
    )
    model = GPT(config)
    model.init_weights()
    step_model = model if args.eager else torch.compile(model, dynamic=False)

    g = torch.Generator().manual_seed(12345)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)

    def step():
        loss = step_model(x, y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    t0 = time.perf_counter()
    first = None
    for _ in range(args.warmup):
        loss = step()
        first = loss if first is None else first
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    if first is None:
        first = loss
    out = {
        "engine": "nanochat " + ("eager" if args.eager else "torch.compile"),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "depth": args.depth,
        "n_embd": n_embd,
        "n_head": n_head,
        "batch": args.batch,
        "seq": args.seq,
        "vocab": args.vocab,
        "warmup_s": round(warmup_s, 3),
        "step_s": [round(t, 4) for t in times],
        "median_step_s": round(statistics.median(times), 4),
        "first_loss": first,
        "last_loss": loss,
    }
    if not all(v == v and abs(v) != float("inf") for v in (first, loss)):
        sys.exit(f"non-finite loss: {out}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
