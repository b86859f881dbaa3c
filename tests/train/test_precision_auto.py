"""train.precision: auto picks bf16 where the device computes it natively, else fp32, and the run records the
concrete choice (so a resume compares and reports real precisions)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.train.loop import resolve_precision, train
from lmforge.train.recipe import load_recipe, read_yaml

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "debug.yaml"


def test_explicit_precisions_pass_through():
    for precision in ("fp32", "bf16", "fp16"):
        assert resolve_precision(precision, torch.device("cpu")) == precision


def test_auto_on_the_cpu_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    for avx512_bf16, amx, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_precision("auto", cpu) == expected, f"avx512_bf16={avx512_bf16} amx={amx}"


def test_a_run_records_the_precision_auto_chose(tmp_path):
    recipe = load_recipe(RECIPE, ["train.steps=2", "schedule.warmup_steps=1", "train.precision=auto", "eval.every=2",
                                  "checkpoint.every=2"])
    lines = []
    train(recipe, tmp_path / "run", log=lines.append)
    chosen = resolve_precision("auto", torch.device("cpu"))
    assert f"train.precision auto: {chosen} on cpu" in lines
    recorded = read_yaml((tmp_path / "run" / "recipe.yaml").read_text())["train"]["precision"]
    assert recorded == chosen, f"recipe.yaml records {recorded!r}, the run used {chosen!r}"


def test_auto_is_a_valid_choice_and_others_are_not():
    assert load_recipe(RECIPE, ["train.precision=auto"]).train.precision == "auto"
    with pytest.raises(ValueError, match="auto"):
        load_recipe(RECIPE, ["train.precision=fp8"])
