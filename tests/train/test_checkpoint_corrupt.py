"""Damaged checkpoints: every kind of damage is named, the newest good checkpoint is used instead (with a
warning), nothing is applied from a bad one, old checkpoints without checksums still load, and files
follow the umask."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lmforge.train import checkpoint as ckpt
from lmforge.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _model_and_optimizer(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    return model, opt


def _two_checkpoints(run: Path) -> dict[int, torch.Tensor]:
    """Checkpoints at steps 1 and 2 with different weights; returns each step's weight."""
    weights = {}
    for step in (1, 2):
        model, opt = _model_and_optimizer(seed=step)
        save_checkpoint(run, step, model=model, optimizer=opt, state={"step": step})
        weights[step] = model.weight.detach().clone()
    return weights


def _data_start(path: Path) -> int:
    """Where a safetensors file's tensor bytes begin (after the 8-byte length and the JSON header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    """Overwrite 64 bytes in the middle of the tensor data: the file still parses, the numbers are garbage."""
    data = bytearray(path.read_bytes())
    at = (_data_start(path) + len(data)) // 2
    data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
    path.write_bytes(bytes(data))


# (what to do to step 2, which file, what the message must say)
DAMAGE = {
    "truncated weights": (_truncate, ckpt.MODEL, r"model\.safetensors is truncated"),
    "truncated optimizer": (_truncate, ckpt.OPTIMIZER, r"optimizer\.safetensors is truncated"),
    "truncated rng": (_truncate, ckpt.RNG, r"rng\.safetensors is truncated"),
    "flipped weight bytes": (_flip, ckpt.MODEL, r"model\.safetensors has sha256 [0-9a-f]{64}, SHA256SUMS records"),
    "flipped optimizer bytes": (_flip, ckpt.OPTIMIZER, r"optimizer\.safetensors has sha256 [0-9a-f]{64}"),
    "garbage state.json": (lambda p: p.write_bytes(os.urandom(300)), ckpt.STATE, r"state\.json is not readable JSON"),
    "garbage optimizer.json": (lambda p: p.write_text("{not json"), ckpt.OPTIMIZER_JSON,
                               r"optimizer\.json is not readable JSON"),
    "deleted checksums": (lambda p: p.unlink(), ckpt.SUMS, r"not a complete checkpoint, SHA256SUMS missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, damage):
    weights = _two_checkpoints(tmp_path)
    hurt, name, says = DAMAGE[damage]
    root = tmp_path / "checkpoints"
    hurt(root / "step-00000002" / name)

    with pytest.warns(UserWarning) as caught:
        latest = latest_checkpoint(tmp_path)
    assert latest == root / "step-00000001"
    message = str(caught[0].message)
    assert f"skipping damaged checkpoint {root / 'step-00000002'}: " in message, message
    assert "Using the previous checkpoint step-00000001 (step 1)" in message, message
    assert re.search(says, message), f"{says!r} not in {message!r}"

    model, opt = _model_and_optimizer(seed=7)
    assert load_checkpoint(latest, model=model, optimizer=opt) == {"step": 1}
    assert torch.equal(model.weight, weights[1])

    # loading the damaged folder directly: an error naming it and the file, and nothing applied
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match=f"cannot load checkpoint {root / 'step-00000002'}: {says}"):
        load_checkpoint(root / "step-00000002", model=model, optimizer=opt)
    assert torch.equal(model.weight, before), "a failed load must leave the model as it was"


def test_only_the_checksum_catches_flipped_tensor_bytes(tmp_path):
    """Without the hash the flipped file loads silently (the damage the checksum exists for)."""
    _two_checkpoints(tmp_path)
    folder = tmp_path / "checkpoints" / "step-00000002"
    _flip(folder / ckpt.MODEL)
    model, _ = _model_and_optimizer(seed=7)
    load_checkpoint(folder, model=model, optimizer=None, verify=False)
    with pytest.raises(ValueError, match="model.safetensors has sha256"):
        load_checkpoint(folder, model=model, optimizer=None)


def test_when_every_checkpoint_is_damaged_the_error_lists_them_with_the_fix(tmp_path):
    _two_checkpoints(tmp_path)
    root = tmp_path / "checkpoints"
    _flip(root / "step-00000002" / ckpt.MODEL)
    (root / "step-00000001" / ckpt.STATE).write_text("garbage")
    with pytest.raises(ValueError) as err:
        latest_checkpoint(tmp_path)
    message = str(err.value)
    assert f"no checkpoint under {root} can be loaded" in message
    assert f"{root / 'step-00000002'}: model.safetensors has sha256" in message
    assert f"{root / 'step-00000001'}: state.json is not readable JSON" in message
    assert "restore the damaged files from a backup, or start the run over with `--fresh --overwrite`" in message


def test_a_bad_checksum_line_is_reported(tmp_path):
    _two_checkpoints(tmp_path)
    (tmp_path / "checkpoints" / "step-00000002" / ckpt.SUMS).write_text("abc  model.safetensors\n")
    with pytest.warns(UserWarning, match=r"SHA256SUMS line 1 is not '<sha256>  <file name>'"):
        assert latest_checkpoint(tmp_path).name == "step-00000001"


def test_a_checkpoint_written_before_checksums_still_loads(tmp_path):
    """Format version 1 had no SHA256SUMS: it loads without a warning, and the cheap checks still apply."""
    weights = _two_checkpoints(tmp_path)
    for step in (1, 2):
        folder = tmp_path / "checkpoints" / f"step-{step:08d}"
        (folder / ckpt.SUMS).unlink()
        meta = json.loads((folder / ckpt.STATE).read_text())
        (folder / ckpt.STATE).write_text(json.dumps({**meta, "version": 1}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-00000002"
    model, opt = _model_and_optimizer(seed=7)
    assert load_checkpoint(latest, model=model, optimizer=opt) == {"step": 2}
    assert torch.equal(model.weight, weights[2])

    _truncate(latest / ckpt.OPTIMIZER)
    with pytest.warns(UserWarning, match=r"optimizer\.safetensors is truncated"):
        assert latest_checkpoint(tmp_path).name == "step-00000001"


def test_a_newer_format_version_is_named(tmp_path):
    _two_checkpoints(tmp_path)
    state = tmp_path / "checkpoints" / "step-00000002" / ckpt.STATE
    state.write_text(json.dumps({**json.loads(state.read_text()), "version": 99}))
    with pytest.warns(UserWarning, match=r"format version 99, this lmforge reads versions \[1, 2\]"):
        assert latest_checkpoint(tmp_path).name == "step-00000001"


def test_checksums_are_in_sha256sum_format(tmp_path):
    _two_checkpoints(tmp_path)
    folder = tmp_path / "checkpoints" / "step-00000002"
    listed = sorted(line.split("  ", 1)[1] for line in (folder / ckpt.SUMS).read_text().splitlines())
    assert listed == sorted(p.name for p in folder.iterdir() if p.name != ckpt.SUMS)
    if shutil.which("sha256sum") is None:
        pytest.skip("sha256sum (coreutils) is not installed")
    check = subprocess.run(["sha256sum", "--check", "--strict", ckpt.SUMS], cwd=folder, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        model, opt = _model_and_optimizer(seed=1)
        folder = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, state={})
    finally:
        os.umask(previous)
    written = [*folder.iterdir(), *folder.parent.iterdir()]  # the checkpoint's files, latest, index.json
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written}
    want = {p.name: oct((0o777 if p.is_dir() else 0o666) & ~umask) for p in written}
    assert modes == want, f"umask {oct(umask)}: got {modes}, want {want}"


def _losses(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("val_loss")) for r in rows]


@pytest.mark.slow
def test_resume_from_a_run_with_a_damaged_latest_checkpoint(tmp_path):
    """End to end through the command line: the damaged step 8 is named, the run resumes from step 4 and
    reproduces the undamaged run's losses exactly; with every checkpoint damaged it stops with the fix."""
    cmd = [sys.executable, "-m", "lmforge", "train", str(ROOT / "recipes" / "debug.yaml"), "--out", str(tmp_path),
           "--train.steps=8", "--checkpoint.every=4", "--eval.every=4"]

    def train() -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)

    first = train()
    assert first.returncode == 0, first.stderr[-3000:]
    want = _losses(tmp_path)
    root = tmp_path / "checkpoints"
    _flip(root / "step-00000008" / ckpt.MODEL)

    resumed = train()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout + resumed.stderr
    assert f"skipping damaged checkpoint {root / 'step-00000008'}: model.safetensors has sha256" in out, out[-3000:]
    assert "from step 4 (step-00000004)" in out, out[-3000:]
    assert _losses(tmp_path) == want, "the resumed run must redo steps 5-8 exactly"

    for step in (4, 8):
        _truncate(root / f"step-{step:08d}" / ckpt.OPTIMIZER)
    failed = train()
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert f"no checkpoint under {root} can be loaded" in failed.stderr
    assert "--fresh --overwrite" in failed.stderr
