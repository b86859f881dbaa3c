"""Fused CPU kernels for bf16 training: `cpu.c`, compiled on first use and called through ctypes.

Why: in a bf16 training step on the CPU the matmuls run near the machine's peak, and what is left is
elementwise and row-wise work that torch runs as several kernels, each a pass over memory (RMSNorm's
backward alone is about ten). Each kernel here reads its inputs once and writes its outputs once,
computing in fp32 and rounding to bf16 once. They serve bf16 work on the CPU only (autocast training,
bf16 inference): fp32 keeps the torch ops, which reproduce their references bit for bit (and the golden
loss curve with them).

Who uses them: `lmforge.nn.norms` (RMSNorm), `lmforge.nn.positions` (RoPE), `lmforge.nn.mlp` (SwiGLU,
GELU), `lmforge.nn.attention` (MatmulAttention's softmax) and `lmforge.train.loss` (cross-entropy), each
through `use_kernel(name)`, falling back to its torch ops when that says no: `LMFORGE_CPU_KERNELS=0` (or a
list of the kernels to use, e.g. `rms_norm,rope`), not Linux, or no C compiler (one warning says so and how
to fix it); the callers also keep their torch ops under torch.compile, which cannot trace a ctypes call.
tests/nn/test_cpu_kernels.py checks every kernel against its readable torch reference.

Build: `cc -O3 -march=native -fopenmp -fno-math-errno -fno-trapping-math -shared -fPIC`, once per
machine, into `<cache>/kernels/<key>/libcpu.so` ($LMFORGE_CACHE or ~/.cache/lmforge), where the key
hashes the source, the compiler's version, the flags and the CPU's features, so nodes that share a cache
but not a CPU build their own. The library is written under a temporary name and renamed into place:
processes that build at once each write whole files, and the last rename wins. Threads: the library
links libgomp.so.1, which resolves to the OpenMP runtime torch has already loaded, so
`torch.set_num_threads` applies to these kernels too.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
ENV_SWITCH = "LMFORGE_CPU_KERNELS"

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {
    "rms_norm_fwd": [_P, _P, _P, _P, _I, _I, _F],
    "rms_norm_bwd": [_P, _P, _P, _P, _P, _P, _I, _I],
    "rope": [_P, _I, _I, _I, _P, _I, _I, _I, _P, _P, _I, _I, _I, _I, _I, ctypes.c_int],
    "swiglu_fwd": [_P, _P, _P, _I],
    "swiglu_bwd": [_P, _P, _P, _P, _P, _I],
    "gelu_tanh_fwd": [_P, _P, _I],
    "gelu_tanh_bwd": [_P, _P, _P, _I],
    "attn_softmax_fwd": [_P, _P, _I, _I, _I, _F, ctypes.c_int],
    "cross_entropy_fwd": [_P, _P, _P, _P, _P, _I, _I],
    "cross_entropy_bwd": [_P, _P, _P, _P, _P, _P, _P, _I, _I],
}

RETURNS_STATUS = {"rms_norm_bwd", "cross_entropy_fwd", "cross_entropy_bwd"}  # 0, or -1 on bad input

# Longest score row attn_softmax_fwd takes: it keeps one row of fp32 values on the stack (32 KiB).
MAX_SOFTMAX_COLS = 8192


def _need(dtype: torch.dtype, *tensors: torch.Tensor, contiguous: bool = True, same_shape: bool = False) -> None:
    """The kernels read raw pointers: a tensor of another dtype, device, layout or (with same_shape) size would
    be read as garbage or past its end."""
    if same_shape and len({t.shape for t in tensors}) > 1:
        raise ValueError(f"lmforge.nn.kernels: need tensors of one shape, got {[tuple(t.shape) for t in tensors]}")
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != dtype or not (t.is_contiguous() if contiguous else t.stride(-1) == 1):
            raise ValueError(f"lmforge.nn.kernels: need {'contiguous ' if contiguous else ''}CPU {dtype} tensors, got "
                             f"{t.dtype} on {t.device} with strides {t.stride()}; call .contiguous() / .to() first")


def _need_sizes(**named: tuple[torch.Tensor, tuple[int, ...]]) -> None:
    for name, (t, shape) in named.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"lmforge.nn.kernels: {name} has shape {tuple(t.shape)}, the kernel needs {shape}")


class CPUKernels:
    """The compiled kernels behind tensor-level calls. Inputs must be contiguous CPU tensors of the dtypes
    named (checked); each call allocates its outputs (or writes in place where it says so)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        for name, argtypes in SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = ctypes.c_int if name in RETURNS_STATUS else None
        self.lib = lib

    def rms_norm_fwd(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x (rows, dim) fp32, weight (dim,) fp32 -> y (rows, dim) fp32, rstd (rows,) fp32."""
        _need(torch.float32, x, weight)
        rows, dim = x.shape
        _need_sizes(weight=(weight, (dim,)))
        y, rstd = torch.empty_like(x), torch.empty(rows, dtype=torch.float32)
        self.lib.rms_norm_fwd(x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr(), rows, dim, eps)
        return y, rstd

    def rms_norm_bwd(self, x, weight, rstd, grad) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (grad_x (rows, dim), grad_weight (dim,)), all fp32."""
        _need(torch.float32, x, grad, same_shape=True)
        _need(torch.float32, weight, rstd)
        rows, dim = x.shape
        _need_sizes(weight=(weight, (dim,)), rstd=(rstd, (rows,)))
        grad_x, grad_w = torch.empty_like(x), torch.empty(dim, dtype=torch.float32)
        if self.lib.rms_norm_bwd(x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), grad.data_ptr(),
                                 grad_x.data_ptr(), grad_w.data_ptr(), rows, dim):
            raise MemoryError(f"rms_norm_bwd: no memory for its per-thread sums ({torch.get_num_threads()} x {dim})")
        return grad_x, grad_w

    def rope_(self, x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> None:
        """Rotate bf16 x (B, T, heads, D) into out (same shape, any strides, channels contiguous) by the fp32
        tables cos, sin (B|1, T, D), contiguous; backward applies the transposed rotation."""
        _need(torch.bfloat16, x, out, contiguous=False, same_shape=True)
        _need(torch.float32, cos, sin, same_shape=True)
        if cos.shape[1:] != (x.shape[1], x.shape[3]):
            raise ValueError(f"rope_: tables {tuple(cos.shape)} do not match x {tuple(x.shape)}: need (B|1, T, D)")
        B, T, heads, D = x.shape
        table_stride = cos.stride(0) if cos.shape[0] > 1 else 0
        self.lib.rope(x.data_ptr(), *x.stride()[:3], out.data_ptr(), *out.stride()[:3], cos.data_ptr(),
                      sin.data_ptr(), table_stride, B, T, heads, D, int(backward))

    def swiglu_fwd(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up, bf16 of one shape."""
        _need(torch.bfloat16, gate, up, same_shape=True)
        out = torch.empty_like(gate)
        self.lib.swiglu_fwd(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel())
        return out

    def swiglu_bwd(self, gate, up, grad) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (grad_gate, grad_up), bf16."""
        _need(torch.bfloat16, gate, up, grad, same_shape=True)
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        self.lib.swiglu_bwd(gate.data_ptr(), up.data_ptr(), grad.data_ptr(), grad_gate.data_ptr(),
                            grad_up.data_ptr(), gate.numel())
        return grad_gate, grad_up

    def gelu_tanh_fwd(self, x: torch.Tensor) -> torch.Tensor:
        """GELU, tanh form, of bf16 x."""
        _need(torch.bfloat16, x)
        out = torch.empty_like(x)
        self.lib.gelu_tanh_fwd(x.data_ptr(), out.data_ptr(), x.numel())
        return out

    def gelu_tanh_bwd(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """-> grad_x, bf16."""
        _need(torch.bfloat16, x, grad, same_shape=True)
        grad_x = torch.empty_like(x)
        self.lib.gelu_tanh_bwd(x.data_ptr(), grad.data_ptr(), grad_x.data_ptr(), x.numel())
        return grad_x

    def attn_softmax_(self, scores: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
        """In place: bf16 scores (..., T, S) -> softmax(scale * scores) over S, causal keys j <= i + S - T."""
        _need(torch.bfloat16, scores)
        T, S = scores.shape[-2:]
        if S > MAX_SOFTMAX_COLS:
            raise ValueError(f"attn_softmax_: rows of {S} scores exceed MAX_SOFTMAX_COLS={MAX_SOFTMAX_COLS}")
        self.lib.attn_softmax_fwd(scores.data_ptr(), scores.data_ptr(), scores.numel() // S, S, T, scale, int(causal))
        return scores

    def cross_entropy_fwd(self, logits: torch.Tensor, labels: torch.Tensor, with_sum: bool):
        """logits (N, V) bf16, labels (N,) int64 in [0, V) -> (lse, log p_label, sum_j log p_j or None), fp32 (N,)."""
        _need(torch.bfloat16, logits)
        _need(torch.int64, labels)
        rows, vocab = logits.shape
        _need_sizes(labels=(labels, (rows,)))
        lse, picked = torch.empty(rows, dtype=torch.float32), torch.empty(rows, dtype=torch.float32)
        total = torch.empty(rows, dtype=torch.float32) if with_sum else None
        if self.lib.cross_entropy_fwd(logits.data_ptr(), labels.data_ptr(), lse.data_ptr(), picked.data_ptr(),
                                      total.data_ptr() if total is not None else None, rows, vocab):
            raise ValueError(f"cross_entropy_fwd: labels must lie in [0, {vocab}); map ignored ones to 0 first")
        return lse, picked, total

    def cross_entropy_bwd(self, logits, labels, lse, coef_p, coef_all, coef_label) -> torch.Tensor:
        """grad (N, V) bf16: coef_p p + coef_all + coef_label at the label, per-row fp32 coefficients."""
        _need(torch.bfloat16, logits)
        _need(torch.int64, labels)
        _need(torch.float32, lse, coef_p, coef_all, coef_label)
        rows, vocab = logits.shape
        _need_sizes(**{name: (t, (rows,)) for name, t in (("labels", labels), ("lse", lse), ("coef_p", coef_p),
                                                            ("coef_all", coef_all), ("coef_label", coef_label))})
        grad = torch.empty_like(logits)
        if self.lib.cross_entropy_bwd(logits.data_ptr(), labels.data_ptr(), lse.data_ptr(), coef_p.data_ptr(),
                                      coef_all.data_ptr(), coef_label.data_ptr(), grad.data_ptr(), rows, vocab):
            raise ValueError(f"cross_entropy_bwd: labels must lie in [0, {vocab}); map ignored ones to 0 first")
        return grad


KERNELS = ("rms_norm", "rope", "swiglu", "gelu_tanh", "attn_softmax", "cross_entropy")

_loaded: dict[str, CPUKernels | None] = {}


def use_kernel(name: str) -> bool:
    """Whether the fused kernel `name` (one of KERNELS) is to run: $LMFORGE_CPU_KERNELS unset or 1 (all), 0
    (none) or a comma-separated list of the kernels to use, and the library built (see `cpu_kernels`)."""
    switch = os.environ.get(ENV_SWITCH, "1").strip()
    if switch == "0":
        return False
    if switch != "1":
        chosen = {part.strip() for part in switch.split(",") if part.strip()}
        if chosen - set(KERNELS):
            raise ValueError(f"{ENV_SWITCH}={switch!r} names unknown kernels {sorted(chosen - set(KERNELS))}; use 1 "
                             f"(all), 0 (none) or a comma-separated list of {', '.join(KERNELS)}")
        if name not in chosen:
            return False
    return cpu_kernels() is not None


def cpu_kernels() -> CPUKernels | None:
    """The kernels, built on first call; None where they cannot be (see the module doc). Callers decide with
    `use_kernel`, which also reads the switch."""
    if "kernels" not in _loaded:
        _loaded["kernels"] = _load()
    return _loaded["kernels"]


def _load() -> CPUKernels | None:
    if platform.system() != "Linux":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn(f"lmforge: no C compiler found (cc, gcc, $CC), so bf16 training on the CPU runs without "
                      f"its fused kernels (lmforge/nn/kernels/cpu.c), slower; install gcc to use them, or set "
                      f"{ENV_SWITCH}=0 to silence this", stacklevel=3)
        return None
    try:
        path = build(compiler)
        return CPUKernels(ctypes.CDLL(str(path)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = err.stderr if isinstance(err, subprocess.CalledProcessError) else err
        warnings.warn(f"lmforge: building the fused CPU kernels with {compiler} failed, so bf16 training on the "
                      f"CPU runs without them: {detail}; set {ENV_SWITCH}=0 to silence this", stacklevel=3)
        return None


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine()


def build(compiler: str) -> Path:
    """Compile cpu.c unless this machine's build is cached; returns the library's path."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), _cpu_features()]).encode())
    # lmforge.data.fetch.default_cache_dir's rule (nn imports no stage)
    cache = Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")
    path = cache / "kernels" / key.hexdigest()[:16] / "libcpu.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".libcpu.{os.getpid()}.so")
    try:
        subprocess.run([compiler, *FLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True, check=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
