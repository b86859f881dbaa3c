"""Attention forward + backward on the CPU: lmforge's MatmulAttention vs torch's scaled_dot_product_attention,
same inputs, same run.

    .venv/bin/python bench/attention.py                          # bf16, causal, T = 64 ... 2048 at 2048 tokens
    .venv/bin/python bench/attention.py --dtype fp32 --seqs 256 --dropout 0.1

For each sequence length T the batch is --tokens / T rows of --heads heads of --head-dim (q, k and v
strided views of one (B, T, 3, H, D) projection, as the model makes them); one call is the forward plus
the backward of all three inputs. torch's side is `F.scaled_dot_product_attention(is_causal=True)` (its
CPU flash kernel; with dropout its unfused math path), lmforge's is `matmul_attention`, which the sdpa
backend takes in bf16 up to T x S = `MATMUL_MAX_SCORES`. Calls are interleaved so machine noise hits both
alike; the table shows medians and the ratio torch / lmforge (> 1: MatmulAttention is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmforge.nn.attention import MATMUL_MAX_SCORES, AttentionMask, matmul_attention
from lmforge.train.allocator import keep_freed_memory

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def time_sides(B: int, T: int, H: int, D: int, dtype: torch.dtype, p: float, repeats: int) -> dict[str, float]:
    """Median milliseconds of one forward + backward call of each side, interleaved."""
    qkv = torch.randn(B, T, 3, H, D, generator=torch.Generator().manual_seed(0)).to(dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2).requires_grad_() for i in range(3))  # (B, H, T, D) views
    grad = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    sides = {
        "torch": lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True).backward(grad),
        "lmforge": lambda: matmul_attention(q, k, v, AttentionMask(is_causal=True), D**-0.5, p).backward(grad),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for fn in sides.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--tokens", type=int, default=2048, help="batch rows x T per call")
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per side (interleaved)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as `lmforge train` runs on the CPU
    dtype, H, D, p = DTYPES[args.dtype], args.heads, args.head_dim, args.dropout
    print(f"{args.dtype}, causal, {H} heads of {D}, {args.tokens} tokens per call, dropout {p}, "
          f"{torch.get_num_threads()} threads, medians of {args.repeats} interleaved calls; "
          f"the sdpa backend takes MatmulAttention in bf16 up to T x S = {MATMUL_MAX_SCORES}")
    print(f"{'T':>6s} {'batch':>6s} {'torch ms':>9s} {'lmforge ms':>11s} {'ratio':>6s}")
    for T in args.seqs:
        B = max(args.tokens // T, 1)
        ms = time_sides(B, T, H, D, dtype, p, args.repeats)
        print(f"{T:6d} {B:6d} {ms['torch']:9.2f} {ms['lmforge']:11.2f} {ms['torch'] / ms['lmforge']:6.2f}",
              flush=True)


if __name__ == "__main__":
    main()
