"""What each fused CPU kernel (`lmforge/nn/kernels/cpu.c`) is worth in a bf16 training step: the step with every
kernel, with none, and with each of the model's kernels switched off alone (its torch ops instead), same
model, same run.

    .venv/bin/python bench/kernels.py                                  # gpt2 and llama, 6 x 384
    .venv/bin/python bench/kernels.py --families llama --sizes 8x512 --repeats 15

One step is what `bench/train_throughput.py` times for lmforge (forward under bf16 autocast, token
cross-entropy, backward, fused AdamW; batch --batch x --seq tokens, vocab --vocab). The kernels are chosen
per step through `LMFORGE_CPU_KERNELS` (a list of the kernels to use), which `lmforge.nn.kernels.use_kernel`
reads at every call. Steps are interleaved round by round so machine noise hits every setting alike; the table
shows median step times and each setting's time relative to all kernels on ("cost" > 1: the step is slower
without that kernel).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from train_throughput import FAMILIES, _size, _step_fn

import lmforge
from lmforge.nn.kernels import ENV_SWITCH, KERNELS, cpu_kernels
from lmforge.train.allocator import keep_freed_memory


def kernels_used(cfg: lmforge.ModelConfig) -> list[str]:
    """The kernels a bf16 training step of this model runs (the others would not change it)."""
    used = {"rms_norm": cfg.norm.kind == "rms", "rope": cfg.position.kind == "rope",
            "swiglu": cfg.mlp.gated and cfg.mlp.activation == "silu",
            "gelu_tanh": not cfg.mlp.gated and cfg.mlp.activation == "gelu_tanh",
            "attn_softmax": cfg.attention.backend == "sdpa", "cross_entropy": True}
    return [name for name in KERNELS if used[name]]


def run(family: str, layers: int, width: int, args) -> dict[str, float]:
    """Median step seconds per setting: "all", "none" and "-NAME" for each kernel the model uses."""
    cfg = lmforge.ModelConfig.from_preset(
        FAMILIES[family], n_layer=layers, d_model=width, vocab_size=args.vocab,
        attention={"n_head": width // 64, "n_kv_head": width // 64}, mlp={"d_ff": 4 * width},
        position={"max_seq_len": max(args.seq, 256)})
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    step = _step_fn(lmforge.build_model(cfg, seed=0).train(), ids, torch.bfloat16, True)
    used = kernels_used(cfg)
    settings = {"all": "1", "none": "0", **{f"-{name}": ",".join(k for k in used if k != name) or "0"
                                            for name in used}}
    times: dict[str, list[float]] = {name: [] for name in settings}
    try:
        for round_ in range(args.warmup + args.repeats):
            for name, switch in settings.items():
                os.environ[ENV_SWITCH] = switch
                step()  # one untimed step per switch: the optimiser's state and the allocator settle
                start = time.perf_counter()
                step()
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    finally:
        os.environ.pop(ENV_SWITCH, None)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=_size, nargs="+", default=[(6, 384)], help="LAYERSxWIDTH (default 6x384)")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=["gpt2", "llama"])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds; the table shows medians")
    args = parser.parse_args(argv)
    if os.environ.get(ENV_SWITCH, "1") != "1":
        parser.error(f"unset {ENV_SWITCH} (it is {os.environ[ENV_SWITCH]!r}): this script sets it per step")
    if cpu_kernels() is None:
        parser.error("the fused CPU kernels are not built here (they need Linux and a C compiler); nothing to compare")
    keep_freed_memory()  # as `lmforge train` does on the CPU
    print(f"bf16 training steps, batch {args.batch} x {args.seq}, vocab {args.vocab}, {torch.get_num_threads()} "
          f"threads, medians of {args.repeats} interleaved rounds")
    print(f"{'config':14s} {'kernels':16s} {'step ms':>8s} {'cost':>6s}")
    for layers, width in args.sizes:
        for family in args.families:
            result = run(family, layers, width, args)
            for name, seconds in result.items():
                print(f"{f'{family} {layers}x{width}':14s} {name:16s} {seconds * 1e3:8.1f} "
                      f"{seconds / result['all']:6.3f}", flush=True)


if __name__ == "__main__":
    main()
