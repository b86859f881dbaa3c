"""Atomic writes (`lmforge._files`) give files the mode a plain open() gives, not mkstemp's 0600, and leave no
temporary file behind; so do the HF checkpoint writer, metrics.jsonl and the peak cache that use them."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from lmforge._files import write_text_atomic
from lmforge.models.hf.io import write_checkpoint
from lmforge.train.metrics import MetricsLogger


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_text_atomic_follows_the_umask(tmp_path, umask):
    path = tmp_path / "a.json"
    path.write_text("old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert _mode(path) == 0o666 & ~umask, f"mode {oct(_mode(path))} under umask {oct(umask)}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"], "a temporary file was left behind"


def test_hf_checkpoint_and_metrics_follow_the_umask(tmp_path, umask):
    write_checkpoint(tmp_path / "hf", {"model_type": "llama"}, {"w": torch.ones(2, 2)})
    metrics = MetricsLogger(tmp_path / "run")
    metrics.log(1, loss=1.0)
    metrics.truncate_after(1)  # the atomic rewrite a resume does
    metrics.close()
    files = [*(tmp_path / "hf").iterdir(), tmp_path / "run" / "metrics.jsonl"]
    assert {p.name for p in files} >= {"config.json", "model.safetensors", "metrics.jsonl"}
    for path in files:
        assert _mode(path) == 0o666 & ~umask, f"{path.name}: mode {oct(_mode(path))} under umask {oct(umask)}"
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
