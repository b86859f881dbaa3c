"""Training throughput and MFU of lmforge (aten matmuls, and oneDNN's: `train.matmul: onednn`) vs Hugging Face
transformers on the same configs, same run.

    .venv/bin/python bench/train_throughput.py                              # 3 sizes x {gpt2, llama} x {fp32, bf16}
    .venv/bin/python bench/train_throughput.py --sizes 6x384 --families llama --dtypes bf16 --repeats 9
    .venv/bin/python bench/train_throughput.py --sizes 6x384 --compile      # every side torch.compile-d

Each size is LAYERSxWIDTH (heads of 64, MLP 4 x width, vocab --vocab, --seq tokens, --batch sequences);
the default covers a smaller model, the issue's 6 x 384 and a larger one. For every (family, size, dtype)
one training step is forward + loss + backward + optimiser step, each side with its own training path:
lmforge with `lmforge.train.loss.token_loss` and `lmforge.train.optim.make_optimizer` (fused AdamW where
the device has it); HF with the same cross-entropy (float logits, summed over the batch's tokens) and
`torch.optim.AdamW(fused=True)`, the `adamw_torch_fused` default of HF's Trainer on torch >= 2.8. bf16
means autocast with fp32 master weights on both sides. The "lmforge" column is `train.matmul: aten`; the
"+oneDNN" column is lmforge's step on a copy of the same model with `lmforge.nn.packed.use_onednn_linears`
(every nn.Linear, the tied LM head and MoE experts on oneDNN GEMMs: `train.matmul: onednn`). The summary
lines at the end rate each against HF, and "as trained" the one `lmforge train` runs by default
(`train.matmul: auto`, `lmforge.nn.packed.resolve_matmul`: oneDNN in fp32 on the CPU, aten in bf16).

Memory: glibc's malloc keeps freed memory for reuse (`lmforge.train.allocator.keep_freed_memory`, what
`lmforge train` does on the CPU) for every side, as it is process-wide; `--default-malloc` leaves it alone.

Timing: after warm-up, rounds of (lmforge step, lmforge+oneDNN step, HF step, the peak matmuls) are
interleaved so machine noise hits all alike; the table shows medians over the rounds: tokens/s, MFU (model
FLOPs per token, as `lmforge.train.flops.flops_per_token`, over the peak of a 2048 x 2048 matmul of the
same dtype timed in the same rounds: the faster median of aten's and oneDNN's kernels, as
`lmforge.train.flops.measure_peak_flops`) and the ratios lmforge / HF and lmforge+oneDNN / HF.

`--breakdown` adds, per configuration, where one step of lmforge (as trained) and of HF spends its time,
from torch.profiler's event tree over a few profiled steps: matmuls (GEMM kernels: aten mm / addmm / bmm,
oneDNN `_linear_pointwise`) outside attention, attention (torch's SDPA or lmforge's MatmulAttention, forward
and backward, all they run) and everything else (norms, activations, casts, copies, loss, optimiser,
Python). "bound" is the MFU the measured step would reach if everything else took no time: MFU / (matmul +
attention share). It says how far fusing and trimming the elementwise work can go before the matmul and
attention kernels themselves must get faster.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import lmforge
from lmforge.nn.packed import resolve_matmul, use_onednn_linears
from lmforge.train.allocator import keep_freed_memory
from lmforge.train.flops import flops_per_token, peak_matmuls
from lmforge.train.loss import token_loss
from lmforge.train.optim import OptimConfig, make_optimizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FAMILIES = {"gpt2": "debug-gpt2", "llama": "debug-llama"}
PEAK_SIZE = 2048
SIDES = ("lmforge", "+oneDNN", "HF")
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
            "mkldnn::_linear_pointwise"}


def _size(text: str) -> tuple[int, int]:
    try:
        layers, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must be LAYERSxWIDTH, e.g. 6x384") from None
    if layers < 1 or width < 64 or width % 64:
        raise argparse.ArgumentTypeError(f"size {text!r}: need >= 1 layer and a width that is a multiple of 64 "
                                         "(heads of 64)")
    return layers, width


def _step_fn(model, ids: torch.Tensor, dtype: torch.dtype, ours: bool):
    """One training step: forward (autocast for bf16), summed token cross-entropy / tokens, backward, AdamW."""
    if ours:
        optimizer = make_optimizer(model, OptimConfig(lr=1e-4))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = model(inputs).logits
        if ours:
            loss_sum, n = token_loss(logits, labels)
        else:
            loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
            n = labels.numel()
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _is_attention(name: str) -> bool:
    """torch's SDPA (the op, its fused kernels and their backward nodes) and lmforge's MatmulAttention."""
    flat = name.lower().replace("_", "")
    return "scaleddotproduct" in flat or "flashattention" in flat or "matmulattention" in flat


def breakdown(step, rounds: int = 3) -> dict[str, float]:
    """Shares of a step's wall time spent in matmul kernels and in attention, from the profiler's event tree
    over `rounds` profiled steps: an attention event counts whole (its own matmuls, softmax and copies too),
    a GEMM op outside attention counts its self time; the rest is everything else."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(rounds):
            step()
        wall = time.perf_counter() - start
    totals = {"matmul": 0.0, "attention": 0.0}

    def walk(event) -> None:
        if _is_attention(event.name):
            totals["attention"] += event.cpu_time_total
            return
        if event.name in GEMM_OPS:
            totals["matmul"] += event.self_cpu_time_total
        for child in event.cpu_children:
            walk(child)

    for event in prof.events():
        if event.cpu_parent is None:
            walk(event)
    return {name: us / (wall * 1e6) for name, us in totals.items()}  # profiler times are in microseconds


def run(family: str, layers: int, width: int, dtype_name: str, args) -> dict:
    """Median tokens/s of the three sides and the best kernel's median peak FLOP/s, for one configuration
    (with --breakdown, the time shares of lmforge as trained and of HF too)."""
    from transformers import AutoModelForCausalLM

    overrides = dict(n_layer=layers, d_model=width, vocab_size=args.vocab,
                     attention={"n_head": width // 64, "n_kv_head": width // 64},
                     mlp={"d_ff": 4 * width}, position={"max_seq_len": max(args.seq, 256)})
    cfg = lmforge.ModelConfig.from_preset(FAMILIES[family], **overrides)
    dtype = DTYPES[dtype_name]
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    ours = lmforge.build_model(cfg, seed=0).train()
    with tempfile.TemporaryDirectory() as tmp:
        lmforge.save_hf(ours, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa").train()
    onednn = use_onednn_linears(copy.deepcopy(ours))
    if args.compile:  # every side compiled alike; compilation happens in the warm-up rounds
        ours, onednn, hf = (torch.compile(model) for model in (ours, onednn, hf))
    peaks = {f"peak {name}": fn for name, fn in peak_matmuls(dtype, torch.device("cpu"), PEAK_SIZE).items()}
    fns = {"lmforge": _step_fn(ours, ids, dtype, True), "+oneDNN": _step_fn(onednn, ids, dtype, True),
           "HF": _step_fn(hf, ids, dtype, False), **peaks}
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):  # interleaved so machine noise hits all alike
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    tokens = args.batch * args.seq
    result = {name: tokens / statistics.median(times[name]) for name in SIDES}
    result["peak"] = max(2 * PEAK_SIZE**3 / statistics.median(times[name]) for name in peaks)
    result["flops_per_token"] = flops_per_token(cfg, args.seq)
    # the side `lmforge train` runs by default (train.matmul: auto)
    result["trained"] = "+oneDNN" if resolve_matmul("auto", torch.device("cpu"), dtype_name) == "onednn" else "lmforge"
    if args.breakdown:
        result["breakdown"] = {"lmforge": breakdown(fns[result["trained"]]), "HF": breakdown(fns["HF"])}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=_size, nargs="+", default=[(4, 256), (6, 384), (8, 512)],
                        help="LAYERSxWIDTH models to time (default: 4x256 6x384 8x512; the issue's is 6x384)")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=["gpt2", "llama"])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (allocator, BLAS setup)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the table shows medians")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is; by default freed memory is kept for reuse, as "
                             "`lmforge train` does on the CPU (train.keep_freed_memory), for every side alike")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every side's model (lmforge, +oneDNN and HF) before timing")
    parser.add_argument("--breakdown", action="store_true",
                        help="also profile lmforge (as trained) and HF: time shares of matmuls, attention and the "
                             "rest, and the MFU bound if the rest took no time")
    args = parser.parse_args(argv)
    if args.compile and args.warmup < 1:
        parser.error(f"--compile needs --warmup >= 1 (got {args.warmup}): the first call of a compiled step "
                     "compiles it and must not be timed")
    kept = not args.default_malloc and keep_freed_memory()  # process-wide: every side runs with it
    print(f"vocab {args.vocab}, seq {args.seq}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved rounds{', all sides torch.compile-d' if args.compile else ''}"
          f"{', freed memory kept (train.keep_freed_memory)' if kept else ''}")
    header = (f"{'config':22s} {'peak GFLOP/s':>12s} {'lmforge tok/s':>14s} {'MFU':>6s} {'+oneDNN tok/s':>14s} "
              f"{'MFU':>6s} {'HF tok/s':>9s} {'MFU':>6s}")
    print(header + f" {'ratio':>6s} {'oneDNN ratio':>12s}")
    rows, onednn_rows, default_rows, breakdowns = [], [], [], []
    for layers, width in args.sizes:
        for family in args.families:
            for dtype_name in args.dtypes:
                r = run(family, layers, width, dtype_name, args)
                mfu = {side: r[side] * r["flops_per_token"] / r["peak"] for side in SIDES}
                ratio, onednn_ratio = r["lmforge"] / r["HF"], r["+oneDNN"] / r["HF"]
                rows.append(ratio)
                onednn_rows.append(onednn_ratio)
                default_rows.append(onednn_ratio if r["trained"] == "+oneDNN" else ratio)
                label = f"{family} {layers}x{width} {dtype_name}"
                print(f"{label:22s} {r['peak'] / 1e9:12.0f} {r['lmforge']:14.0f} {mfu['lmforge']:6.1%} "
                      f"{r['+oneDNN']:14.0f} {mfu['+oneDNN']:6.1%} {r['HF']:9.0f} {mfu['HF']:6.1%} {ratio:6.2f} "
                      f"{onednn_ratio:12.2f}", flush=True)
                if args.breakdown:
                    for side, shares in r["breakdown"].items():
                        kernels = shares["matmul"] + shares["attention"]
                        mfu_side = mfu[r["trained"] if side == "lmforge" else side]
                        breakdowns.append((label, side, shares, 1 - kernels, mfu_side, mfu_side / kernels))
    if breakdowns:
        print("\nwhere a step's time goes (profiled; lmforge as trained): matmul, attention, the rest; MFU as "
              "measured, and its bound if the rest took no time")
        print(f"{'config':22s} {'side':8s} {'matmul':>7s} {'attn':>6s} {'rest':>6s} {'MFU':>6s} {'bound':>6s}")
        for label, side, shares, rest, mfu_side, bound in breakdowns:
            print(f"{label:22s} {side:8s} {shares['matmul']:7.1%} {shares['attention']:6.1%} {rest:6.1%} "
                  f"{mfu_side:6.1%} {bound:6.1%}")
    for name, ratios in (("lmforge (aten)", rows), ("lmforge+oneDNN", onednn_rows),
                         ("lmforge as trained (train.matmul: auto)", default_rows)):
        print(f"{name} ahead of HF in {sum(r > 1 for r in ratios)} of {len(ratios)} configurations; "
              f"geometric-mean ratio {statistics.geometric_mean(ratios):.2f}")


if __name__ == "__main__":
    main()
