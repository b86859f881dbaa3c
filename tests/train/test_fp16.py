"""fp16 mixed precision through the real training loop, on the CPU: autocast plus dynamic loss scaling
(Micikevicius et al. 2018, "Mixed Precision Training", §3.2). A run trains like fp32 and logs its loss
scale; an overflowing gradient skips its step and halves the scale without counting toward the NaN/inf
guard, while a non-finite loss still does; a resumed run restores the scale and reproduces every loss."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.train import loop
from lmforge.train.guard import NonFiniteError
from lmforge.train.loss import token_loss
from lmforge.train.metrics import read_metrics
from lmforge.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "debug.yaml"
QUIET_EVAL = "eval.every=1000"  # evaluate only after the last step (its token_loss calls come after training's)


def _run(out: Path, *overrides: str, messages: list | None = None) -> list[dict]:
    recipe = load_recipe(RECIPE, ["train.precision=fp16", *overrides])
    loop.train(recipe, out, log=(messages.append if messages is not None else lambda *a, **k: None))
    return read_metrics(out)


class _InfGradient(torch.autograd.Function):
    """Identity forward; the backward turns the gradient into inf, as an overflow of the scaled gradient in
    fp16 does, while the loss itself stays finite."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf


def _poison_loss(monkeypatch, from_call: int, to_call: int, poison) -> None:
    """Replace the loop's token_loss: calls from_call..to_call (0-based; 2 micro-batches per step in the
    debug recipe) return poison(loss_sum)."""
    calls = itertools.count()

    def poisoned(logits, labels, **kwargs):
        loss_sum, n = token_loss(logits, labels, **kwargs)
        return (poison(loss_sum) if from_call <= next(calls) <= to_call else loss_sum), n

    monkeypatch.setattr(loop, "token_loss", poisoned)


def _adamw_updates(run: Path) -> int:
    """How many updates AdamW applied, from the latest checkpoint's optimiser state."""
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state = load_file(run / "checkpoints" / latest / "optimizer.safetensors")
    return int(state["state/0/step"].item())


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fp16")
    return out, _run(out, "train.steps=16", "checkpoint.every=16", QUIET_EVAL)


def test_fp16_run_trains_and_logs_the_loss_scale(fp16_run):
    _, rows = fp16_run
    losses = [r["loss"] for r in rows]
    assert len(rows) == 16 and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - 0.3, f"fp16 loss did not fall: {losses}"
    assert all(r["scale"] == 2.0**16 and r["overflows"] == 0 and r["skipped"] == 0 for r in rows), \
        "torch's initial scale 2^16 fits the debug model: no overflow, no growth within 2000 steps"
    assert math.isfinite(rows[-1]["val_loss"])


def test_fp16_losses_track_the_fp32_golden_curve(fp16_run):
    """fp16 matmuls with fp32 master weights, softmax and loss: the same curve up to fp16 rounding
    (measured: at most 7e-5 apart over the 16 steps)."""
    out, rows = fp16_run
    golden = json.loads((ROOT / "tests" / "assets" / "golden_debug_losses.json").read_text())
    if json.loads((out / "run.json").read_text())["tokenizer_fingerprint"] != golden["tokenizer_fingerprint"]:
        pytest.skip("the python-code corpus differs on this machine, so the golden fp32 curve does not apply")
    worst = max(abs(r["loss"] - g) for r, g in zip(rows, golden["loss"], strict=True))
    assert worst < 1e-3, f"fp16 losses are {worst:.2e} away from the fp32 golden curve"


def test_an_overflowing_micro_batch_skips_its_step_and_halves_the_scale(tmp_path, monkeypatch):
    _poison_loss(monkeypatch, 4, 4, _InfGradient.apply)  # the first micro-batch of step 3
    run = tmp_path / "overflow"
    # max_bad_steps=1: were the overflow counted as a bad step, the run would abort at step 3
    rows = _run(run, "train.steps=6", "checkpoint.every=6", QUIET_EVAL, "train.max_bad_steps=1")
    assert [r["scale"] for r in rows] == [2.0**16] * 3 + [2.0**15] * 3, "the scale halves after step 3"
    assert [r["overflows"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert all(r["skipped"] == 0 for r in rows), "an overflow is not a bad step for the NaN/inf guard"
    assert not math.isfinite(rows[2]["grad_norm"]) and math.isfinite(rows[2]["loss"])
    assert all(math.isfinite(r["grad_norm"]) for r in rows[3:]), "training goes on after the overflow"
    assert _adamw_updates(run) == 5, "6 steps, one of them skipped"


def test_a_non_finite_loss_still_trips_the_guard(tmp_path, monkeypatch):
    _poison_loss(monkeypatch, 4, math.inf, lambda loss_sum: loss_sum * math.nan)  # every step from step 3
    with pytest.raises(NonFiniteError, match=r"2 consecutive steps .* at step 4 .*loss=nan"):
        _run(tmp_path / "nan", "train.steps=6", "checkpoint.every=6", QUIET_EVAL, "train.max_bad_steps=2")
    row = read_metrics(tmp_path / "nan")[-1]
    assert (row["step"], row["skipped"], row["overflows"]) == (3, 1, 0)


def test_resume_restores_the_loss_scale_and_reproduces_every_loss(tmp_path, monkeypatch):
    """From a huge initial scale the first steps overflow and the scale settles; with growth every 2 clean
    steps it keeps probing upwards. A resumed run must continue with the saved scale and growth count."""
    monkeypatch.setattr(loop, "grad_scaler", lambda precision, device: torch.amp.GradScaler(
        device.type, init_scale=2.0**24, growth_interval=2))
    overrides = ("train.steps=8", "checkpoint.every=4", "checkpoint.keep_last=2", "eval.every=4")  # cadence rule
    full = _run(tmp_path / "full", *overrides)
    assert full[0]["overflows"] == 1 and full[4]["scale"] < 2.0**24, \
        "precondition: at the step-4 checkpoint the scale is not the initial one, so its state matters"
    killed = tmp_path / "killed"  # a run killed after its step-4 checkpoint (a SIGKILL loses nothing else)
    shutil.copytree(tmp_path / "full", killed)
    shutil.rmtree(killed / "checkpoints" / "step-00000008")
    messages: list = []
    resumed = _run(killed, *overrides, messages=messages)
    assert any("resuming" in str(m) and "step 4" in str(m) for m in messages), messages
    for key in ("loss", "scale", "overflows", "grad_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in full], f"resumed {key} differs from the uninterrupted run"


def test_fp16_refuses_onednn_matmuls():
    with pytest.raises(ValueError, match="train.matmul=onednn .* train.precision=fp16"):
        load_recipe(RECIPE, ["train.precision=fp16", "train.matmul=onednn"])
