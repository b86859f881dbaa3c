"""Training FLOPs per token, the device's matmul peak, and model FLOPs utilisation (MFU).

FLOPs per token follow Kaplan et al. 2020 (Table 1) and PaLM (Chowdhery et al. 2022, appendix B):

    flops_per_token = 6 N + 12 L H Q T

N counts the weights of every matmul a token passes through: attention q/k/v/o projections, the MLP
(for MoE: the router plus the top_k experts a token actually visits, not all n_experts) and the
output head (the LM head is a matmul whether or not it is tied to the embedding; its width is the
padded vocabulary, which is what gets multiplied). Embedding and position lookups, norms, biases and
activations are not matmuls and are left out. 6 = 2 (multiply + add) x 3 (forward, backward for the
input, backward for the weights). The second term is attention's two T x T matmuls (Q K^T and P V):
2 x 2 H Q T per token forward, x 3 for training. Like PaLM it counts the full T x T score matrix
even for causal or sliding-window masks (model FLOPs, not the FLOPs a kernel may skip).

MFU = tokens/s x flops_per_token / peak FLOP/s (PaLM appendix B). On CPU the peak is measured with a
square matmul and cached per machine; on known GPUs it is the datasheet's dense bf16 peak. The CPU peak
is the faster of aten's matmul and oneDNN's (weight pre-packed): on AMD CPUs aten's fp32 matmul takes
MKL's non-AVX-512 path at about half of what oneDNN reaches (this machine, 2 threads, 2048^3: ~210 vs
~420 GFLOP/s), and MFU against the slower one would overstate the utilisation about 2x.

The CPU peak is what the CPU does unloaded. Other work on the machine only ever slows a matmul down
(on 2 cores one busy core halves a 2-thread matmul: bf16 ~1000 -> ~420 GFLOP/s), and a peak measured
under load makes MFU read too high. So, per (CPU, thread count, dtype, method) key:
- a measurement times the kernels in interleaved rounds (>= 8 rounds and >= 1 s, after 0.5 s of
  warm-up: about 1.6 s per dtype on first use here, up to ~2.5 s under load) and takes, per kernel, the
  median of its 3 fastest calls: load that comes and goes during the window is skipped, and one
  mistimed call cannot set it;
- the cached figure only goes up: a later measurement (the training loop re-measures when MFU goes
  over 100%) replaces it only when higher, and so does one written meanwhile by another process;
- a peak with more threads is at least the cached peak of the same CPU and dtype with fewer threads
  (the same work could run on fewer of them), which bounds a measurement taken under load all along.
Load that lasts the whole measurement is not detected otherwise; delete the entry to measure again.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmforge._files import write_text_atomic
from lmforge.config import ModelConfig
from lmforge.data.fetch import default_cache_dir
from lmforge.nn.packed import packing_available

# Part of the peak cache key: peaks measured another way (aten only; the median of all calls, which load
# pulls down) are not reused, so every cached figure follows the rule of the module docstring.
PEAK_METHOD = "fastest3-of-aten-onednn"

# Dense (no 2:4 sparsity) bf16/fp16 tensor-core peaks from NVIDIA datasheets; first substring match wins.
GPU_BF16_PEAK = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
)


# -- FLOPs per token ---------------------------------------------------------------------------------

def _attention_weights(cfg: ModelConfig) -> tuple[int, int]:
    """Per token: (q and o projections, k and v projections) weight counts of one attention block."""
    a = cfg.attention
    return 2 * cfg.d_model * a.n_head * a.head_dim, 2 * cfg.d_model * a.n_kv_head * a.head_dim


def _ffn_weights(cfg: ModelConfig) -> int:
    """Weights one token multiplies in the MLP; for MoE the router plus its top_k experts."""
    per_expert = (3 if cfg.mlp.gated else 2) * cfg.d_model * cfg.mlp.d_ff
    if cfg.moe is None:
        return per_expert
    return cfg.d_model * cfg.moe.n_experts + cfg.moe.top_k * per_expert


def _head_weights(cfg: ModelConfig, seq_len: int) -> float:
    """Weights per token of the head; per-sequence parts (pooler, sequence classifier) spread over seq_len."""
    d = cfg.d_model
    pooler = d * d if cfg.pooler else 0
    if cfg.head == "lm":
        return d * cfg.padded_vocab_size + (d * d if cfg.head_transform else 0)
    if cfg.head == "token_classification":
        return d * cfg.n_labels
    if cfg.head == "sequence_classification":
        return (pooler + d * cfg.n_labels) / seq_len
    return pooler / seq_len  # "none"


def flops_per_token(cfg: ModelConfig, seq_len: int, target_len: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`: 6 N + 12 L H Q T.

    Encoder-decoder: the encoder reads `seq_len` source tokens, the decoder `target_len` target tokens
    (default: seq_len). Both stacks count; each decoder layer adds cross-attention (q/o projections on
    target tokens, k/v projections on every source token, and 12 H Q S for the T x S scores and mix).
    The head runs on target tokens. The result is one example's FLOPs divided by seq_len, so multiply
    it by source tokens/s.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be a positive number of tokens")
    a = cfg.attention
    qo, kv = _attention_weights(cfg)
    attn_per_key = 12 * a.n_head * a.head_dim  # x (keys each query sees) x (layers)
    layer = qo + kv + _ffn_weights(cfg)
    if cfg.arch != "encoder_decoder":
        n = cfg.n_layer * layer + _head_weights(cfg, seq_len)
        return 6 * n + attn_per_key * cfg.n_layer * seq_len

    src, tgt = seq_len, target_len if target_len is not None else seq_len
    if tgt <= 0:
        raise ValueError(f"target_len={tgt} must be a positive number of tokens")
    enc, dec = cfg.n_layer, cfg.n_decoder_layer
    encoder = src * (6 * enc * layer + attn_per_key * enc * src)
    decoder = tgt * (6 * dec * (layer + qo) + attn_per_key * dec * (tgt + src))
    cross_kv = src * 6 * dec * kv
    head = tgt * 6 * _head_weights(cfg, tgt)
    return (encoder + decoder + cross_kv + head) / src


# -- peak FLOP/s and MFU --------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_matmuls(dtype: torch.dtype, device: torch.device, n: int) -> dict[str, Callable[[], object]]:
    """The candidate peak kernels, each one n x n x n matmul per call: aten's `torch.mm` everywhere, and on
    a CPU with oneDNN its `_linear_pointwise` on a weight pre-packed into oneDNN's blocked layout (what
    `lmforge.nn.packed` runs), the faster of the two in fp32 on AMD CPUs."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    kernels: dict[str, Callable[[], object]] = {"aten": lambda: torch.mm(a, b, out=out)}
    if device.type == "cpu" and packing_available() and dtype in (torch.float32, torch.bfloat16):
        packed = torch.ops.mkldnn._reorder_linear_weight(b, n)  # b as an (out, in) weight: a @ b.T
        kernels["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    return kernels


def best_seconds(kernels: dict[str, Callable[[], object]], device: torch.device, warmup_s: float, min_s: float, *,
                 rounds: int = 8, best: int = 3, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Seconds per call of each kernel: the median of its `best` fastest calls out of at least `rounds`
    rounds lasting at least `min_s` seconds, after `warmup_s` seconds of warm-up (clock ramp, allocator,
    BLAS setup; each kernel runs at least once). A round calls every kernel once, so load that comes and
    goes hits all kernels alike. `clock`: seconds, monotonic (a fake one in tests)."""
    if best < 1 or rounds < best:
        raise ValueError(f"best={best} must be in [1, rounds={rounds}]: the median of the fastest `best` of `rounds`")
    start = clock()
    while True:
        for fn in kernels.values():
            fn()
            _sync(device)
        if clock() - start >= warmup_s:
            break
    times: dict[str, list[float]] = {name: [] for name in kernels}
    start, done = clock(), 0
    while done < rounds or clock() - start < min_s:
        for name, fn in kernels.items():
            t = clock()
            fn()
            _sync(device)
            times[name].append(clock() - t)
        done += 1
    return {name: statistics.median(sorted(calls)[:best]) for name, calls in times.items()}


def measure_peak_flops(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       size: int | None = None, *, warmup_s: float = 0.5, min_s: float = 1.0) -> float:
    """Achievable FLOP/s of a `size` x `size` matmul: each kernel of `peak_matmuls` (aten's, and oneDNN's
    with a pre-packed weight on CPU) timed by `best_seconds`; the best kernel's figure is the peak, so
    MFU is against what the hardware does, not against one library's code path. size defaults to 2048
    on CPU and 8192 on GPU: large enough to reach the BLAS plateau."""
    device = torch.device(device)
    n = size if size is not None else (8192 if device.type == "cuda" else 2048)
    if n <= 0:
        raise ValueError(f"size={n} must be a positive matrix size")
    seconds = best_seconds(peak_matmuls(dtype, device, n), device, warmup_s, min_s)
    return max(2 * n**3 / s for s in seconds.values())


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_key(dtype: torch.dtype, device: str | torch.device, threads: int | None = None) -> str:
    """What the peak depends on: the device model, the CPU thread count (default: torch's now), the dtype,
    and how it is measured (PEAK_METHOD: a change there must not reuse peaks measured the old way)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()} threads={threads if threads is not None else torch.get_num_threads()}"
    return f"{device.type}:{name}|{str(dtype).removeprefix('torch.')}|{PEAK_METHOD}"


def _fewer_threads_peak(cache: dict, dtype: torch.dtype, device: torch.device) -> float:
    """The highest cached CPU peak of this CPU and dtype with fewer threads than torch uses now (0 if none)."""
    if device.type != "cpu":
        return 0.0
    keys = (device_key(dtype, device, threads=t) for t in range(1, torch.get_num_threads()))
    return max((float(cache[key]) for key in keys if key in cache), default=0.0)


def table_peak_flops(dtype: torch.dtype, device: str | torch.device) -> float | None:
    """The datasheet peak for a known GPU in bf16/fp16, else None."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_BF16_PEAK if key in name), None)


def cached_peak_flops(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      cache_dir: str | Path | None = None, remeasure: bool = False) -> float:
    """The peak FLOP/s for (device, threads, dtype): a known GPU's datasheet value, else measured once
    with `measure_peak_flops` and kept in `<cache_dir>/peak_flops.json` (default cache: $LMFORGE_CACHE or
    ~/.cache/lmforge). Delete the entry (or the file) to measure again, e.g. after changing machines.

    The figure never goes down (see the module docstring): remeasure measures again and keeps the larger
    of the old and new figures (a peak measured while other work shared the CPU is too low, and an MFU
    above 1 gives it away: the training loop then re-measures); a CPU peak is at least the cached peak
    with fewer threads."""
    table = table_peak_flops(dtype, device)
    if table is not None:
        return table
    device = torch.device(device)
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "peak_flops.json"
    key = device_key(dtype, device)
    cache = _read_json(path)
    if key in cache and not remeasure:
        return max(float(cache[key]), _fewer_threads_peak(cache, dtype, device))
    peak = measure_peak_flops(dtype, device)
    cache = _read_json(path)  # another process may have written meanwhile: keep its entries
    peak = max(peak, float(cache.get(key, 0.0)), _fewer_threads_peak(cache, dtype, device))
    cache[key] = peak
    _write_json_atomic(path, cache)
    return peak


def mfu(tokens_per_second: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation (PaLM appendix B): achieved model FLOP/s over the peak, in [0, 1]-ish.
    Pass one device's tokens/s and that device's peak (or global tokens/s and peak x devices)."""
    if peak <= 0:
        raise ValueError(f"peak={peak} FLOP/s must be positive; measure it with cached_peak_flops")
    return tokens_per_second * flops_per_token / peak


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True), fsync=False)
