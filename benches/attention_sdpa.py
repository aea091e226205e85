"""PyTorch's scaled_dot_product_attention (flash backend), bf16, causal, at the shapes and with the FLOP count
of benches/benches/attention_cuda.rs, so the two tables compare line for line (scripts/gpu_check.sh runs both
in one device call: step `attention`).

Layout: nc's kernels take (B, T, H, D); SDPA takes (B, H, T, D), so the tensors are made (B, T, H, D) and
passed transposed (a view: the flash backend reads strided heads). FLOPs: forward 4 B H T^2 D / 2 (causal),
backward 2.5 times that. Backward time = time(forward + backward) - time(forward).

Run: python3 benches/attention_sdpa.py [--iters N]   (needs torch with CUDA; exits 1 without a GPU)
"""
import argparse
import json
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

SHAPES = [("d20", 32, 10, 2048, 128), ("d52", 8, 26, 2048, 128)]


def timed(fn, iters):
    """Mean seconds per call, CUDA events around `iters` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("attention_sdpa: no CUDA device")
        sys.exit(1)
    print(f"\nPyTorch {torch.__version__} SDPA (flash backend), bf16, causal, on {torch.cuda.get_device_name()}")
    print("| shape | B x H x T x D | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s |")
    print("|---|---|---|---|---|---|")
    results = []
    for name, b, h, t, d in SHAPES:
        q, k, v = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)

        def fwd():
            return scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)

        def fwd_bwd():
            out = fwd()
            torch.autograd.grad(out, (q, k, v), dout)

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
            t_fwd = timed(fwd, args.iters)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            t_bwd = timed(fwd_bwd, args.iters) - t_fwd
        flops = 2.0 * b * h * t * t * d
        print(f"| {name} | {b} x {h} x {t} x {d} | {t_fwd * 1e3:.3f} | {flops / t_fwd / 1e12:.1f} | "
              f"{t_bwd * 1e3:.3f} | {2.5 * flops / t_bwd / 1e12:.1f} |")
        results.append({"shape": name, "fwd_s": t_fwd, "bwd_s": t_bwd, "fwd_tflops": flops / t_fwd / 1e12,
                        "bwd_tflops": 2.5 * flops / t_bwd / 1e12})
    print(json.dumps({"sdpa": results}))


if __name__ == "__main__":
    main()
