"""Training throughput and MFU of lmforge vs Hugging Face transformers on the same configs, same run.

    .venv/bin/python bench/train_throughput.py [--layers 6 --width 384 --vocab 8192 --seq 256 --batch 8]

For a GPT-2-style and a Llama-style model of the same size, times forward + backward + AdamW steps
of both implementations (interleaved, after warm-up) in fp32 and bf16 autocast, and prints median
tokens/s, MFU against the matmul peak measured in this run, and the ratio lmforge / HF.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]  # bench/tokenize.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lmforge  # noqa: E402
from lmforge.train.flops import flops_per_token, measure_peak_flops  # noqa: E402


def _step_fn(model, ids, dtype, is_hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    tokens = args.batch * args.seq
    for preset in ("debug-gpt2", "debug-llama"):
        overrides = dict(n_layer=args.layers, d_model=args.width, vocab_size=args.vocab,
                         attention={"n_head": args.width // 64, "n_kv_head": args.width // 64},
                         mlp={"d_ff": 4 * args.width}, position={"max_seq_len": max(args.seq, 256)})
        cfg = lmforge.ModelConfig.from_preset(preset, **overrides)
        per_token = flops_per_token(cfg, args.seq)
        for dtype in (torch.float32, torch.bfloat16):
            peak = measure_peak_flops(dtype, "cpu")
            ours = lmforge.build_model(cfg, seed=0).train()
            with tempfile.TemporaryDirectory() as tmp:
                lmforge.save_hf(ours, tmp)
                hf = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa").train()
            steps = {"lmforge": _step_fn(ours, ids, dtype, False), "HF": _step_fn(hf, ids, dtype, True)}
            for fn in steps.values():  # warm-up
                fn()
            times: dict[str, list[float]] = {name: [] for name in steps}
            for _ in range(args.repeats):  # interleaved so machine noise hits both alike
                for name, fn in steps.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            tps = {name: tokens / statistics.median(t) for name, t in times.items()}
            label = f"{preset.removeprefix('debug-')} L{args.layers} d{args.width} {str(dtype).split('.')[-1]}"
            print(f"{label:28s} peak {peak / 1e9:6.0f} GFLOP/s | " + " | ".join(
                f"{name} {v:7.0f} tok/s MFU {v * per_token / peak:5.1%}" for name, v in tps.items())
                + f" | ratio {tps['lmforge'] / tps['HF']:.2f}")


if __name__ == "__main__":
    main()
