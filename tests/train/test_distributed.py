"""Data parallelism: FSDP2 and DDP under torchrun (2 CPU processes, gloo) against 1 process, resuming a
checkpoint under another world size or parallel mode, and the single-process checkpoint layout that
makes this possible (FSDP2's full state dicts converted to it and back).

Tolerances: a 2-process run sums the same samples in another order (per-rank partial sums, then an
all-reduce or reduce-scatter), so it is not bit-exact with 1 process; on this CPU the per-step losses
(about 6-7 nats) differ by at most ~1e-6 over 16 steps, and the gradient norms by ~3e-6 relative. The
tests allow 1e-5 and 1e-4. Validation covers the same sequences under any number of processes (the first
eval.batches x micro_batch), so the runs with micro-batches of 2 evaluate 8 batches to match the 1-process
run's 4 batches of 4, and val_loss is held to the loss tolerance too.

The runs keep train.matmul's default, auto, which on this CPU is oneDNN: every linear map (the tied LM head
included) on `lmforge.nn.packed.onednn_linear`, under DDP's gradient hooks and FSDP2's sharded parameters.
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lmforge.config import ModelConfig
from lmforge.models import build_model
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import (
    is_sharded,
    loadable,
    optimizer_state_by_index,
    optimizer_state_by_name,
    saveable,
)
from lmforge.train.optim import OptimConfig, make_optimizer

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "debug.yaml"
SHORT = ["--train.steps=16", "--checkpoint.every=4", "--eval.every=4", "--checkpoint.keep_last=10"]
LOSS_TOL, GRAD_NORM_RTOL = 1e-5, 1e-4


def _train(out: Path, *extra: str, processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    if processes == 1:
        launcher = [sys.executable]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        assert torchrun, "torchrun ships with torch"
        launcher = [torchrun, "--standalone", "--nproc-per-node", str(processes)]
    cmd = [*launcher, "-m", "lmforge", "train", str(RECIPE), "--out", str(out), *SHORT, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0 or not check, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "steps must be logged once each, in order"
    return rows


def _resume_copy(run: Path, dest: Path, step: int) -> Path:
    """A copy of `run` as if it had been stopped right after the checkpoint of `step`."""
    shutil.copytree(run, dest)
    for folder in (dest / "checkpoints").glob("step-*"):
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)
    return dest


def _assert_same_trajectory(reference: Path, other: Path, what: str) -> None:
    a, b = _rows(reference), _rows(other)
    assert len(a) == len(b) == 16
    loss = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    norm = max(abs(x["grad_norm"] - y["grad_norm"]) / x["grad_norm"] for x, y in zip(a, b))
    assert loss < LOSS_TOL, f"{what}: losses differ from the 1-process run by up to {loss:.2e}"
    assert norm < GRAD_NORM_RTOL, f"{what}: gradient norms differ from the 1-process run by up to {norm:.2e}"
    val = {r["step"]: r["val_loss"] for r in a if "val_loss" in r}
    other_val = {r["step"]: r["val_loss"] for r in b if "val_loss" in r}
    assert set(val) == set(other_val) == {4, 8, 12, 16}, \
        f"{what}: evaluated at steps {sorted(other_val)}, not 4, 8, 12 and 16"
    worst = max(abs(val[s] - other_val[s]) for s in val)
    assert worst < LOSS_TOL, f"{what}: val_loss differs from 1 process by up to {worst:.2e}: {val} vs {other_val}"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    _train(out)
    return out


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    # micro-batches of 2 on each of 2 processes: 2 accumulation steps (no reduce-scatter on the first)
    _train(out, "--train.parallel=fsdp", "--train.activation_checkpointing=true", "--batch.micro_batch=2",
           "--eval.batches=8", processes=2)
    return out


@pytest.mark.slow
def test_two_process_fsdp_with_accumulation_and_activation_checkpointing_matches_one_process(single, fsdp):
    _assert_same_trajectory(single, fsdp, "2-process FSDP2 + accumulation + activation checkpointing")


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(single, tmp_path):
    _train(tmp_path, "--train.parallel=ddp", "--batch.micro_batch=2", "--eval.batches=8", processes=2)
    _assert_same_trajectory(single, tmp_path, "2-process DDP + accumulation")


@pytest.mark.slow
def test_one_process_checkpoint_resumes_with_two_fsdp_processes(single, tmp_path):
    out = _resume_copy(single, tmp_path / "run", step=8)
    _train(out, "--train.parallel=fsdp", "--batch.micro_batch=2", "--eval.batches=8", processes=2)
    _assert_same_trajectory(single, out, "1 process -> 2 FSDP processes at step 8")


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_ddp_whose_checkpoint_resumes_with_one_process(single, fsdp, tmp_path):
    ddp = _resume_copy(fsdp, tmp_path / "ddp", step=8)
    _train(ddp, "--train.parallel=ddp", processes=2)
    _assert_same_trajectory(single, ddp, "2 FSDP -> 2 DDP processes at step 8")
    one = _resume_copy(ddp, tmp_path / "one", step=12)  # step 12 was written by the DDP processes
    _train(one)
    _assert_same_trajectory(single, one, "2 DDP processes -> 1 process at step 12")


@pytest.mark.slow
def test_two_processes_skip_a_damaged_checkpoint_that_rank_0_alone_verified(single, tmp_path):
    """Rank 0 hashes the checkpoints and hands its pick to rank 1 (Dist.from_main): one warning, not one per
    process, and both resume from the intact step 8 past the damaged step 12, on the 1-process trajectory."""
    out = _resume_copy(single, tmp_path / "run", step=12)
    weights = out / "checkpoints" / "step-00000012" / ckpt.MODEL
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])  # tensor bytes: the file parses, only the sha256 differs
    weights.write_bytes(bytes(data))
    proc = _train(out, "--train.parallel=ddp", "--batch.micro_batch=2", "--eval.batches=8", processes=2)
    output = proc.stdout + proc.stderr
    assert output.count("skipping damaged checkpoint") == 1, output[-3000:]
    assert "resuming" in output and "step-00000008" in output, output[-3000:]
    _assert_same_trajectory(single, out, "2 DDP processes resuming past a damaged checkpoint")


@pytest.mark.slow
def test_rank_0s_error_reaches_every_rank(single, tmp_path):
    """No intact checkpoint: rank 0's ValueError goes to rank 1 too, so the job ends with the message and a
    non-zero exit instead of rank 1 waiting for a broadcast that never comes."""
    out = _resume_copy(single, tmp_path / "run", step=8)
    for state in (out / "checkpoints").glob("step-*/" + ckpt.STATE):
        state.write_text("{")  # unparseable in every checkpoint
    proc = _train(out, "--train.parallel=ddp", processes=2, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "can be loaded" in output, output[-3000:]
    assert "rank 0: no checkpoint under" in output, "rank 1 must report rank 0's error"


# --- the checkpoint layout, in this process (FSDP2 over a 1-process gloo group) ---------------------


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        gc.collect()  # let gloo's threads drop finished work before the group goes away
        dist.destroy_process_group()


def _model_and_optimizer(shard: bool):
    from torch.distributed.fsdp import fully_shard

    cfg = ModelConfig.from_preset("debug-llama", n_layer=2)
    model = build_model(cfg, seed=0)
    if shard:
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model, make_optimizer(model, OptimConfig(lr=1e-2))


def _step(model, optimizer, seed: int) -> float:
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    loss = model(ids).logits.logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def _plain(state: dict) -> dict:
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}


def test_optimizer_state_keys_convert_between_names_and_indices():
    state = {"state": {"b.w": {"step": 1}, "a.w": {"step": 2}},
             "param_groups": [{"lr": 1.0, "params": ["a.w"]}, {"lr": 2.0, "params": ["b.w"]}]}
    names = ["a.w", "b.w"]
    by_index = optimizer_state_by_index(state, names)
    assert by_index == {"state": {1: {"step": 1}, 0: {"step": 2}},
                        "param_groups": [{"lr": 1.0, "params": [0]}, {"lr": 2.0, "params": [1]}]}
    assert optimizer_state_by_name(by_index, names) == state
    with pytest.raises(ValueError, match="checkpoint's optimizer has 2 parameters but this one has 1"):
        optimizer_state_by_name(by_index, ["a.w"])


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
def test_checkpoints_move_between_plain_and_fsdp_models(group, tmp_path):
    plain, plain_opt = _model_and_optimizer(shard=False)
    sharded, sharded_opt = _model_and_optimizer(shard=True)
    assert is_sharded(sharded) and not is_sharded(plain)
    for seed in range(2):
        assert abs(_step(plain, plain_opt, seed) - _step(sharded, sharded_opt, seed)) < 1e-6

    # FSDP -> files: exactly the single-process layout
    model_out, optimizer_out = saveable(sharded, sharded_opt)
    written = ckpt.save_checkpoint(tmp_path / "fsdp", 2, model=model_out, optimizer=optimizer_out, state={})
    reference = ckpt.save_checkpoint(tmp_path / "plain", 2, model=plain, optimizer=plain_opt, state={})
    assert json.loads((written / ckpt.OPTIMIZER_JSON).read_text()) == \
        json.loads((reference / ckpt.OPTIMIZER_JSON).read_text()), "param groups and keys in torch's index layout"

    # files -> a fresh plain model, and a fresh FSDP model: both continue as the originals
    fresh_plain, fresh_plain_opt = _model_and_optimizer(shard=False)
    ckpt.load_checkpoint(written, model=fresh_plain, optimizer=fresh_plain_opt, restore_rng=False)
    fresh_sharded, fresh_sharded_opt = _model_and_optimizer(shard=True)
    model_in, optimizer_in = loadable(fresh_sharded, fresh_sharded_opt)
    ckpt.load_checkpoint(reference, model=model_in, optimizer=optimizer_in, restore_rng=False)
    for name, value in plain.state_dict().items():
        assert torch.allclose(fresh_plain.state_dict()[name], value, atol=1e-6), name
        assert torch.allclose(_plain(fresh_sharded.state_dict())[name], value, atol=1e-6), name
    losses = [_step(m, o, seed=7) for m, o in ((plain, plain_opt), (fresh_plain, fresh_plain_opt),
                                               (sharded, sharded_opt), (fresh_sharded, fresh_sharded_opt))]
    assert max(losses) - min(losses) < 1e-6, losses
    then = [_step(m, o, seed=8) for m, o in ((plain, plain_opt), (fresh_sharded, fresh_sharded_opt))]
    assert abs(then[0] - then[1]) < 1e-5, f"the optimizer state did not carry over: {then}"


def test_unknown_parallel_mode_is_refused():
    from lmforge.train.recipe import load_recipe

    with pytest.raises(ValueError, match=r"train.parallel='zero' is not supported; choose one of \('ddp', 'fsdp'\)"):
        load_recipe(RECIPE, ["train.parallel=zero"])
