"""Checkpoints: exact resume (weights, AdamW state, RNG), pruning, and atomicity under crashes and SIGKILL."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmforge
from lmforge.train import checkpoint as ckpt
from lmforge.train.checkpoint import best_checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _llama(seed: int) -> nn.Module:
    return lmforge.build_model(lmforge.ModelConfig.from_preset("debug-llama"), seed=seed)


def _adamw(model: nn.Module) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    """A few steps on batches drawn from the global torch RNG, so a resume also needs the RNG back."""
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 16))
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for name, x in a["state"][i].items():
            y = b["state"][i][name]
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f"state/{i}/{name} differs"


def test_resume_continues_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = _llama(seed=0)
    opt = _adamw(model)
    _train(model, opt, 3)
    save_checkpoint(tmp_path, 3, model=model, optimizer=opt, state={"step": 3, "loader": {"cursor": 17}})
    want_losses = _train(model, opt, 3)

    torch.manual_seed(123)  # a fresh process: other weights, other RNG, empty optimiser
    resumed = _llama(seed=1)
    resumed_opt = _adamw(resumed)
    state = load_checkpoint(latest_checkpoint(tmp_path), model=resumed, optimizer=resumed_opt)
    assert state == {"step": 3, "loader": {"cursor": 17}}
    got_losses = _train(resumed, resumed_opt, 3)

    assert got_losses == want_losses, "the resumed run's losses differ from the uninterrupted run's"
    for (name, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs after resuming"
    _assert_same_optimizer_state(opt.state_dict(), resumed_opt.state_dict())


def test_optimizer_state_round_trips_exactly(tmp_path):
    model = _llama(seed=0)
    opt = _adamw(model)
    _train(model, opt, 2)
    path = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, state={})
    other = _adamw(_llama(seed=1))
    load_checkpoint(path, model=_llama(seed=1), optimizer=other)
    _assert_same_optimizer_state(opt.state_dict(), other.state_dict())
    step = other.state_dict()["state"][0]["step"]
    assert step.ndim == 0 and step.dtype == torch.float32 and step.item() == 2
    assert other.param_groups[0]["betas"] == (0.9, 0.95) and isinstance(other.param_groups[0]["betas"], tuple)
    assert json.loads((path / ckpt.OPTIMIZER_JSON).read_text()), "optimizer.json should hold the param groups"


def test_rng_states_are_restored(tmp_path):
    model = nn.Linear(3, 3)
    path = save_checkpoint(tmp_path, 0, model=model, optimizer=None, state={})
    want = torch.rand(4), np.random.rand(3), random.random()
    torch.rand(10), np.random.rand(10), random.random()  # move every generator on
    load_checkpoint(path, model=model, optimizer=None)
    got = torch.rand(4), np.random.rand(3), random.random()
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]

    after = torch.get_rng_state()
    load_checkpoint(path, model=model, optimizer=None, restore_rng=False)
    assert torch.equal(torch.get_rng_state(), after), "restore_rng=False must leave the generators alone"


class Tied(nn.Module):
    """An embedding shared with the output projection, plus a buffer that views the same storage."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("first_row", self.embed.weight.detach()[0])


def test_shared_parameters_save_and_stay_tied(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=torch.optim.AdamW(model.parameters()), state={})
    torch.manual_seed(1)
    other = Tied()
    load_checkpoint(path, model=other, optimizer=torch.optim.AdamW(other.parameters()))
    assert torch.equal(other.embed.weight, model.embed.weight)
    assert other.head.weight is other.embed.weight, "loading must keep the tie"
    assert torch.equal(other.first_row, model.embed.weight[0])


def test_load_is_strict_and_names_the_keys(tmp_path):
    path = save_checkpoint(tmp_path, 1, model=nn.Linear(2, 2), optimizer=None, state={})
    keys = r"missing keys \['0.bias', '0.weight'\].*unexpected keys \['bias', 'weight'\]"
    with pytest.raises(ValueError, match=keys):
        load_checkpoint(path, model=nn.Sequential(nn.Linear(2, 2)), optimizer=None)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(path, model=nn.Linear(2, 2), optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters()))


def test_keeps_the_last_n_plus_the_best(tmp_path):
    model = nn.Linear(2, 2)
    metrics = [5.0, 1.0, 4.0, None, float("nan"), 3.0]
    for step, metric in enumerate(metrics, start=1):
        save_checkpoint(tmp_path, step, model=model, optimizer=None, state={"step": step}, metric=metric, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-00000002", "step-00000005", "step-00000006"]
    assert latest_checkpoint(tmp_path) == root / "step-00000006"
    assert best_checkpoint(tmp_path) == root / "step-00000002"
    assert (root / "latest").read_text().strip() == "step-00000006"
    index = json.loads((root / "index.json").read_text())
    assert index["best"] == "step-00000002" and index["latest"] == "step-00000006"
    assert [c["step"] for c in index["checkpoints"]] == [2, 5, 6]
    assert index["checkpoints"][1]["metric"] is not None and math.isnan(index["checkpoints"][1]["metric"])
    assert json.loads((root / "step-00000002" / ckpt.STATE).read_text())["metric"] == 1.0


def test_saving_the_same_step_again_replaces_it(tmp_path):
    model = nn.Linear(2, 2)
    save_checkpoint(tmp_path, 4, model=model, optimizer=None, state={"run": 1})
    save_checkpoint(tmp_path, 4, model=model, optimizer=None, state={"run": 2})
    assert load_checkpoint(latest_checkpoint(tmp_path), model=model, optimizer=None) == {"run": 2}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == ["step-00000004"]


def test_empty_run_and_incomplete_folders_are_skipped_with_a_warning(tmp_path):
    assert latest_checkpoint(tmp_path) is None and best_checkpoint(tmp_path) is None
    model = nn.Linear(2, 2)
    save_checkpoint(tmp_path, 1, model=model, optimizer=None, state={}, metric=1.0)
    broken = tmp_path / "checkpoints" / "step-00000009"  # e.g. copied by hand, files missing
    broken.mkdir()
    (broken / ckpt.MODEL).write_bytes(b"")
    with pytest.warns(UserWarning, match=r"step-00000009: not a complete checkpoint, state.json, rng.safetensors"):
        assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert best_checkpoint(tmp_path).name == "step-00000001"
    with pytest.raises(ValueError, match="not a complete checkpoint, state.json, rng.safetensors, rng.json missing"):
        load_checkpoint(broken, model=model, optimizer=None)


@pytest.mark.parametrize("fail_on", ["optimizer_file", "rename"])
def test_a_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail_on):
    model = nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    _train_linear(model, opt)
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, state={"step": 1})
    want = model.weight.detach().clone()

    def boom(*args, **kwargs):
        raise OSError("injected crash")

    if fail_on == "optimizer_file":
        real_save = ckpt.save_file
        monkeypatch.setattr(ckpt, "save_file", lambda t, p, **k: boom() if p.name == ckpt.OPTIMIZER else
                            real_save(t, p, **k))
    else:
        real_replace = os.replace
        monkeypatch.setattr(ckpt.os, "replace", lambda a, b: boom() if Path(b).name == "step-00000002" else
                            real_replace(a, b))
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match="injected crash"):
        save_checkpoint(tmp_path, 2, model=model, optimizer=opt, state={"step": 2})
    monkeypatch.undo()

    root = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) == root / "step-00000001"
    assert (root / "latest").read_text().strip() == "step-00000001"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-00000001"], "the failed save left a folder"
    fresh = nn.Linear(4, 4)
    assert load_checkpoint(root / "step-00000001", model=fresh, optimizer=torch.optim.AdamW(fresh.parameters())) == {
        "step": 1}
    assert torch.equal(fresh.weight, want)


def _train_linear(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(2, model.in_features)).sum().backward()
    opt.step()


# A child that saves a 1024 x 1024 Linear and its AdamW state (12 MiB) at steps 1, 2, 3, ... with the
# weights filled with the step, so a loaded checkpoint shows whether its files belong together.
# With a hang point it stops inside the save of step 3, on the n-th call of `ckpt.<name>` (or of
# shutil's `rmtree`), and touches `hung` so the parent knows where it is when it sends SIGKILL;
# without one it saves until killed.
CHILD = """
import shutil, sys, time
from pathlib import Path
import torch
from lmforge.train import checkpoint as ckpt

run, where, nth = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
model = torch.nn.Linear(1024, 1024)
opt = torch.optim.AdamW(model.parameters())
model(torch.randn(2, 1024)).sum().backward()
opt.step()
step, calls = 0, 0
if where != "none":
    owner = shutil if where == "rmtree" else ckpt
    real = getattr(owner, where)
    def hang(*args, **kwargs):
        global calls
        if step == 3:
            calls += 1
            if calls == nth:
                (run / "hung").touch()
                time.sleep(600)
        return real(*args, **kwargs)
    setattr(owner, where, hang)
for step in range(1, 1_000_000):
    with torch.no_grad():
        model.weight.fill_(step)
    ckpt.save_checkpoint(run, step, model=model, optimizer=opt, state={"step": step}, keep_last=2)
    (run / "saved").write_text(str(step))
"""


def _spawn(run: Path, where: str, nth: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(run), where, str(nth)], env=env, cwd=REPO,
                            stderr=subprocess.PIPE)


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the child exited early:\n{proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the child did not reach the kill point in time")
        time.sleep(0.01)


def _assert_loads_consistently(run: Path, step: int | None = None) -> int:
    latest = latest_checkpoint(run)
    assert latest is not None, "no loadable checkpoint after the kill"
    model = nn.Linear(1024, 1024)
    opt = torch.optim.AdamW(model.parameters())
    state = load_checkpoint(latest, model=model, optimizer=opt)
    assert step is None or state["step"] == step, f"latest checkpoint is step {state['step']}, expected {step}"
    assert torch.all(model.weight == state["step"]), "weights from another step than state.json"
    assert opt.state_dict()["state"][0]["step"].item() == 1
    return state["step"]


@pytest.mark.parametrize("where, nth, newest", [
    ("save_file", 2, 2),    # model.safetensors of step 3 written, optimizer file not: step 2 is the newest
    ("_write_text", 1, 3),  # step 3 renamed into place, `latest` not yet updated: step 3 counts
    ("rmtree", 1, 3),       # mid-prune: step 1 renamed to .del-<pid>, not yet deleted
])
def test_sigkill_mid_save_leaves_a_loadable_checkpoint(tmp_path, where, nth, newest):
    proc = _spawn(tmp_path, where, nth)
    _wait_for(proc, (tmp_path / "hung").exists)
    proc.kill()
    proc.wait()
    root = tmp_path / "checkpoints"
    if where == "_write_text":  # the pointer is stale; the scan still finds step 3
        assert (root / "latest").read_text().strip() == "step-00000002"
    else:
        left = {"save_file": ".tmp-", "rmtree": ".del-"}[where]
        assert any(left in p.name for p in root.iterdir()), f"the kill should have left a {left}* behind"
    _assert_loads_consistently(tmp_path, newest)

    model = nn.Linear(1024, 1024)
    save_checkpoint(tmp_path, newest + 1, model=model, optimizer=None, state={"step": newest + 1}, keep_last=2)
    leftovers = [p.name for p in root.iterdir() if ".tmp-" in p.name or ".del-" in p.name]
    assert leftovers == [], f"the next save should remove what the killed one left: {leftovers}"
    assert latest_checkpoint(tmp_path) == root / f"step-{newest + 1:08d}"


def test_sigkill_at_a_random_moment_leaves_a_loadable_checkpoint(tmp_path):
    proc = _spawn(tmp_path, "none", 0)
    _wait_for(proc, lambda: (tmp_path / "saved").exists())
    time.sleep(0.05)  # somewhere inside a later save (one takes about as long)
    proc.kill()
    proc.wait()
    text = (tmp_path / "saved").read_text()  # empty if the kill landed inside this write
    saved = int(text) if text else 1
    assert _assert_loads_consistently(tmp_path) >= saved
