"""FLOPs per token against hand counts and torch's FlopCounterMode; MFU arithmetic; the peak cache."""

import json
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lmforge
from lmforge.nn.packed import packing_available
from lmforge.train import flops
from lmforge.train.flops import cached_peak_flops, flops_per_token, measure_peak_flops, mfu


def test_debug_llama_by_hand():
    # d=64, 4 heads of 16, 2 kv heads, SwiGLU d_ff=128, 2 layers, vocab 256 tied.
    cfg = lmforge.ModelConfig.from_preset("debug-llama")
    qkv_o = 64 * (64 + 2 * 32) + 64 * 64
    mlp = 3 * 64 * 128
    head = 64 * 256  # tied, but still a matmul
    n = 2 * (qkv_o + mlp) + head
    assert n == 90112
    assert flops_per_token(cfg, 64) == 6 * n + 12 * 2 * 4 * 16 * 64


def test_gpt2_by_hand():
    # GPT-2 124M: 12 layers, d=768, d_ff=3072, vocab 50257 tied; N (non-embedding + head) = 85M + 38.6M.
    cfg = lmforge.ModelConfig.from_preset("gpt2")
    n = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768 * 50257
    assert n == 123_532_032
    assert flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert flops_per_token(cfg, 1024) == pytest.approx(8.54e8, rel=1e-3)  # ~0.85 GFLOP/token, nanoGPT's figure


def test_moe_counts_only_the_active_experts():
    dense = lmforge.ModelConfig.from_preset("debug-mixtral", moe=None)
    moe = lmforge.ModelConfig.from_preset("debug-mixtral")
    router = 64 * moe.moe.n_experts
    extra_experts = (moe.moe.top_k - 1) * 3 * 64 * 96
    assert flops_per_token(moe, 32) - flops_per_token(dense, 32) == 6 * moe.n_layer * (router + extra_experts)
    more = lmforge.ModelConfig.from_preset("debug-mixtral", moe={"n_experts": 64, "top_k": 2})
    assert flops_per_token(more, 32) - flops_per_token(moe, 32) == 6 * 2 * 64 * 60  # only the router grows


def _counted(model, inputs, backward: bool) -> int:
    with FlopCounterMode(display=False) as counter:
        logits = model(*inputs).logits
        if backward:
            logits.float().sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("preset", ["debug-llama", "debug-gpt2", "debug-mixtral", "debug-bert", "debug-t5",
                                    "debug-transformer"])
def test_matches_flop_counter(preset):
    """Eager attention so the T x T matmuls are visible to the counter (the CPU SDPA kernel is not)."""
    cfg = lmforge.ModelConfig.from_preset(preset, **{"attention.backend": "eager"})
    model = lmforge.build_model(cfg, seed=0)
    B, S, T = 2, 48, 32
    src = torch.randint(0, cfg.vocab_size, (B, S))
    if cfg.arch == "encoder_decoder":
        inputs, expected = (src, torch.randint(0, cfg.vocab_size, (B, T))), flops_per_token(cfg, S, T) * B * S
    else:
        inputs, expected = (src,), flops_per_token(cfg, S) * B * S
    forward = _counted(model, inputs, backward=False)
    # The formula counts every matmul the model runs, so the match is exact, not approximate.
    assert 3 * forward == pytest.approx(expected, rel=1e-12), "forward x 3 should be the training FLOPs"
    # Forward + backward counted for real: every matmul's two backward products (the first layer's input
    # gradient included, since the embedding is trained) make it exactly 3x.
    assert _counted(model, inputs, backward=True) == pytest.approx(expected, rel=1e-12)


def test_encoder_decoder_by_hand():
    # debug-t5: d=64, 4 heads of 16, ReLU d_ff=128, 2 + 2 layers, vocab 256 tied; S source, T target tokens.
    cfg = lmforge.ModelConfig.from_preset("debug-t5")
    S, T = 40, 24
    qo = kv = 2 * 64 * 64
    ffn = 2 * 64 * 128
    attn = 12 * 4 * 16  # per layer, per query, per key
    encoder = S * (6 * 2 * (qo + kv + ffn) + 2 * attn * S)
    decoder = T * (6 * 2 * (qo + kv + qo + ffn) + 2 * attn * (T + S))  # self + cross q/o + MLP; T and S keys
    cross_kv = S * 6 * 2 * kv  # cross-attention keys and values come from every source token
    head = T * 6 * 64 * 256
    assert flops_per_token(cfg, S, T) * S == encoder + decoder + cross_kv + head
    assert flops_per_token(cfg, S) == flops_per_token(cfg, S, S)
    with pytest.raises(ValueError, match="seq_len=0"):
        flops_per_token(cfg, 0)


def test_mfu_arithmetic():
    assert mfu(1000.0, 2e8, 1e12) == pytest.approx(0.2)
    assert mfu(0.0, 2e8, 1e12) == 0.0
    with pytest.raises(ValueError, match="peak"):
        mfu(1.0, 1.0, 0.0)


def test_measure_peak_flops_is_plausible():
    peak = measure_peak_flops(torch.float32, "cpu", size=128, warmup_s=0.0, min_s=0.0)
    assert 1e6 < peak < 1e15


def test_peak_is_the_best_kernel(monkeypatch):
    """Every candidate kernel is timed and the fastest one's FLOP/s is the peak (not the first, not aten's)."""
    calls = {"slow": 0, "fast": 0}

    def kernel(name, seconds):
        return lambda: calls.__setitem__(name, calls[name] + 1) or time.sleep(seconds)

    monkeypatch.setattr(flops, "peak_matmuls", lambda dtype, device, n: {"slow": kernel("slow", 0.02),
                                                                        "fast": kernel("fast", 0.005)})
    peak = measure_peak_flops(torch.float32, "cpu", size=100, warmup_s=0.0, min_s=0.0)
    assert calls["slow"] >= 5 and calls["fast"] >= 5, "each kernel is timed over at least 5 repeats"
    assert 2 * 100**3 / 0.0075 < peak <= 2 * 100**3 / 0.005  # the fast kernel's figure (sleep overshoots)


@pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN ops")
def test_cpu_peak_kernels_include_onednn():
    """The oneDNN candidate computes the same n^3 product as aten's (a @ b.T with b as an (out, in) weight)."""
    torch.manual_seed(0)
    kernels = flops.peak_matmuls(torch.float32, torch.device("cpu"), 64)
    assert set(kernels) == {"aten", "onednn"}
    a_times_b = kernels["aten"]()
    a_times_bt = kernels["onednn"]()
    assert a_times_b.shape == a_times_bt.shape == (64, 64)
    assert not torch.allclose(a_times_b, a_times_bt)  # different products of the same operands, same FLOPs
    assert set(flops.peak_matmuls(torch.float16, torch.device("cpu"), 8)) == {"aten"}


def test_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(flops, "measure_peak_flops", lambda dtype, device: calls.append(dtype) or 123e9)
    assert cached_peak_flops(torch.float32, "cpu", cache_dir=tmp_path) == 123e9
    assert cached_peak_flops(torch.float32, "cpu", cache_dir=tmp_path) == 123e9
    assert calls == [torch.float32], "the second call must read the cache, not measure again"
    cache = json.loads((tmp_path / "peak_flops.json").read_text())
    (key,) = cache
    assert key == flops.device_key(torch.float32, "cpu") and "float32" in key
    assert f"threads={torch.get_num_threads()}" in key and flops.cpu_name() in key
    assert key.endswith(flops.PEAK_METHOD), "peaks measured another way (aten only) must not be reused"
    cached_peak_flops(torch.bfloat16, "cpu", cache_dir=tmp_path)  # another dtype: another entry
    assert calls == [torch.float32, torch.bfloat16]
    assert len(json.loads((tmp_path / "peak_flops.json").read_text())) == 2


def test_known_gpus_use_the_datasheet(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert flops.table_peak_flops(torch.bfloat16, "cuda") == 989e12
    assert flops.table_peak_flops(torch.float32, "cuda") is None  # fp32: measured instead
    assert flops.table_peak_flops(torch.bfloat16, "cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert flops.table_peak_flops(torch.bfloat16, "cuda") == 312e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert flops.table_peak_flops(torch.float16, "cuda") == 756e12


def test_remeasure_keeps_the_larger_peak(tmp_path, monkeypatch):
    """A peak measured under load is too low: re-measuring keeps the larger figure, never a lower one."""
    measured = iter([50e9, 200e9, 120e9])
    monkeypatch.setattr(flops, "measure_peak_flops", lambda dtype, device: next(measured))
    assert cached_peak_flops(torch.float32, "cpu", cache_dir=tmp_path) == 50e9
    assert cached_peak_flops(torch.float32, "cpu", cache_dir=tmp_path, remeasure=True) == 200e9
    assert cached_peak_flops(torch.float32, "cpu", cache_dir=tmp_path, remeasure=True) == 200e9
    assert cached_peak_flops(torch.float32, "cpu", cache_dir=tmp_path) == 200e9


class FakeClock:
    """Seconds that pass only when a fake kernel runs: each call advances it by the kernel's next duration."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def kernel(self, durations: list[float], calls: list[int] | None = None):
        left = iter(durations)

        def run() -> None:
            self.now += next(left)
            if calls is not None:
                calls.append(1)

        return run


def test_best_seconds_is_the_median_of_the_fastest_calls():
    """Load slows some calls down: the 3 fastest of the timed calls count, and their median, so neither
    the slow calls nor one too-fast (mistimed) call sets the figure."""
    clock = FakeClock()
    kernels = {"aten": clock.kernel([9.0, 0.4, 0.2, 0.9, 0.05, 0.25, 0.2, 0.6, 0.3]),  # 9.0: the warm-up call
               "onednn": clock.kernel([9.0, 0.8, 0.7, 0.1, 0.9, 0.12, 0.8, 0.11, 0.9])}
    seconds = flops.best_seconds(kernels, torch.device("cpu"), warmup_s=0.0, min_s=0.0, clock=clock)
    assert seconds == pytest.approx({"aten": 0.2, "onednn": 0.11}, abs=1e-12)
    with pytest.raises(ValueError, match="best=9"):
        flops.best_seconds(kernels, torch.device("cpu"), 0.0, 0.0, best=9, clock=clock)


def test_best_seconds_warms_up_then_times_for_min_s():
    clock, calls = FakeClock(), {"a": [], "b": []}
    kernels = {name: clock.kernel([0.1] * 100, calls[name]) for name in calls}
    flops.best_seconds(kernels, torch.device("cpu"), warmup_s=0.5, min_s=3.0, clock=clock)
    # warm-up: rounds of 0.2 s until 0.5 s have passed (3 rounds); then rounds until 3 s have passed (15)
    assert len(calls["a"]) == len(calls["b"]) == 3 + 15, "the kernels run in interleaved rounds"
    clock, calls = FakeClock(), {"a": [], "b": []}
    kernels = {name: clock.kernel([0.001] * 100, calls[name]) for name in calls}
    flops.best_seconds(kernels, torch.device("cpu"), warmup_s=0.0, min_s=0.0, clock=clock)
    assert len(calls["a"]) == 1 + 8, "at least one warm-up call and 8 timed rounds however fast the kernel"


def test_a_peak_measured_under_load_is_raised_to_the_fewer_threads_peak(tmp_path, monkeypatch):
    """The audit's cache: bf16 at 2 threads measured under load (422) below 1 thread (539). More threads
    cannot lower the hardware's peak, so 2 threads reads at least 539; a higher measurement still wins."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    one, two = (flops.device_key(torch.bfloat16, "cpu", threads=t) for t in (1, 2))
    assert two == flops.device_key(torch.bfloat16, "cpu") and "threads=1" in one
    path = tmp_path / "peak_flops.json"
    path.write_text(json.dumps({one: 539e9, two: 422e9}))
    monkeypatch.setattr(flops, "measure_peak_flops", lambda dtype, device: pytest.fail("a cache hit measures nothing"))
    assert cached_peak_flops(torch.bfloat16, "cpu", cache_dir=tmp_path) == 539e9
    path.write_text(json.dumps({one: 539e9}))
    monkeypatch.setattr(flops, "measure_peak_flops", lambda dtype, device: 422e9)
    assert cached_peak_flops(torch.bfloat16, "cpu", cache_dir=tmp_path) == 539e9
    assert json.loads(path.read_text())[two] == 539e9
    monkeypatch.setattr(flops, "measure_peak_flops", lambda dtype, device: 980e9)
    assert cached_peak_flops(torch.bfloat16, "cpu", cache_dir=tmp_path, remeasure=True) == 980e9
    assert cached_peak_flops(torch.float32, "cpu", cache_dir=tmp_path) == 980e9, "fp32 has its own entries"
    assert json.loads(path.read_text())[one] == 539e9, "the 1-thread entry is left as measured"


def test_a_higher_peak_written_meanwhile_by_another_process_is_kept(tmp_path, monkeypatch):
    key = flops.device_key(torch.float32, "cpu")

    def measure(dtype, device):  # another process finishes a higher measurement while this one measures
        (tmp_path / "peak_flops.json").write_text(json.dumps({key: 300e9, "other": 1.0}))
        return 200e9

    monkeypatch.setattr(flops, "measure_peak_flops", measure)
    assert cached_peak_flops(torch.float32, "cpu", cache_dir=tmp_path) == 300e9
    assert json.loads((tmp_path / "peak_flops.json").read_text()) == {key: 300e9, "other": 1.0}
