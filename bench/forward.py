"""Forward-pass throughput of lmforge vs Hugging Face transformers on the same weights.

    .venv/bin/python bench/forward.py [--preset smollm2-135m] [--batch 4] [--seq 256] [--repeats 7]

Builds the preset with random weights, writes it with `save_hf`, loads it into transformers, and
times no-grad forward passes of both (interleaved, after a warm-up). Prints median tokens/s and the
ratio lmforge / HF (> 1 means lmforge is faster). Both use SDPA attention in fp32 on the CPU unless
--dtype bfloat16 is given.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import lmforge


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--n-layer", type=int, default=None, help="override the preset's depth")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    overrides = {"n_layer": args.n_layer} if args.n_layer else {}
    cfg = lmforge.ModelConfig.from_preset(args.preset, **overrides)
    dtype = getattr(torch, args.dtype)
    ours = lmforge.build_model(cfg, seed=0).eval()
    with tempfile.TemporaryDirectory() as tmp:
        lmforge.save_hf(ours, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=dtype).eval()
    ours = ours.to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    with torch.no_grad():
        diff = (ours(ids).logits.float() - hf(ids).logits.float()).abs().max().item()
        ours_times, hf_times = [], []
        for _ in range(args.repeats):  # interleave so machine noise hits both alike
            ours_times += _time(lambda: ours(ids), 1)
            hf_times += _time(lambda: hf(ids), 1)
    tokens = args.batch * args.seq
    ours_tps, hf_tps = tokens / statistics.median(ours_times), tokens / statistics.median(hf_times)
    print(f"{args.preset} layers={cfg.n_layer} batch={args.batch} seq={args.seq} dtype={args.dtype} "
          f"threads={torch.get_num_threads()}  max|logit diff|={diff:.2e}")
    print(f"lmforge: {ours_tps:10.0f} tok/s (median of {args.repeats})")
    print(f"HF     : {hf_tps:10.0f} tok/s")
    print(f"ratio lmforge/HF: {ours_tps / hf_tps:.2f}")


if __name__ == "__main__":
    main()
