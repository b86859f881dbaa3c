"""The run folder: --fresh --overwrite deletes only run folders (never the current directory), the lock
keeps a second run out (and dies with its holder, SIGKILL included), and a resumed run may change the
schedule-like settings of its recipe but not the model, data, batch or seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lmforge.train.recipe import recipe_from_dict
from lmforge.train.run_dir import (
    LOCK_FILE,
    RunFolderInUse,
    RunLock,
    check_flags,
    check_resume,
    prepare_run_dir,
    recipe_changes,
    record_resume,
    write_recipe,
)


def _run_folder(path):
    (path / "checkpoints" / "step-00000004").mkdir(parents=True)
    (path / "run.json").write_text("{}")
    (path / "metrics.jsonl").write_text("")
    return path


def test_overwrite_needs_fresh():
    with pytest.raises(ValueError, match="add --fresh"):
        check_flags(fresh=False, overwrite=True)
    check_flags(fresh=True, overwrite=True)
    check_flags(fresh=False, overwrite=False)


def test_fresh_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    out = tmp_path / "thesis"
    (out / "src").mkdir(parents=True)
    (out / "src" / "thesis.tex").write_text("precious")
    (out / "notes.txt").write_text("precious")
    with pytest.raises(ValueError) as info:
        prepare_run_dir(out, fresh=True, overwrite=True)
    message = str(info.value)
    for needed in (str(out), "not an lmforge run folder", "notes.txt, src", "another --out"):
        assert needed in message, f"{needed!r} missing from: {message}"
    assert (out / "src" / "thesis.tex").read_text() == "precious" and (out / "notes.txt").exists()
    assert not (out / LOCK_FILE).exists(), "a refused folder is left exactly as it was"


def test_fresh_needs_overwrite_then_empties_a_run_folder(tmp_path):
    out = _run_folder(tmp_path / "run")
    with pytest.raises(ValueError, match="pass --overwrite"):
        prepare_run_dir(out, fresh=True, overwrite=False)
    assert (out / "run.json").exists()
    with prepare_run_dir(out, fresh=True, overwrite=True):
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE], "everything but the held lock is deleted"


def test_fresh_on_a_new_or_empty_folder_needs_no_overwrite(tmp_path):
    with prepare_run_dir(tmp_path / "new" / "run", fresh=True, overwrite=False):
        pass
    with prepare_run_dir(tmp_path / "new" / "run", fresh=True, overwrite=False):  # only the lock file in it
        pass


def test_fresh_overwrite_never_deletes_the_current_directory_or_a_parent(tmp_path, monkeypatch):
    out = _run_folder(tmp_path / "run")
    (out / "sub").mkdir()
    for cwd, relative in ((out, "."), (out / "sub", "..")):
        monkeypatch.chdir(cwd)
        for given in (out, Path(relative)):
            with pytest.raises(ValueError, match="holds the current directory"):
                prepare_run_dir(given, fresh=True, overwrite=True)
    assert (out / "run.json").exists()


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        prepare_run_dir(tmp_path / "file", fresh=False, overwrite=False)


def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunFolderInUse) as info:
            RunLock(tmp_path)  # another open file description: flock conflicts even within one process
        assert str(tmp_path) in str(info.value) and f"process {os.getpid()} on host" in str(info.value)
        assert info.value.exit_code == 1
    with RunLock(tmp_path):  # released: free again
        pass
    assert (tmp_path / LOCK_FILE).read_text() == "", "a released lock leaves no pid behind"


def test_lock_dies_with_a_killed_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from lmforge.train.run_dir import RunLock
        lock = RunLock(Path({str(tmp_path)!r}))
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderInUse, match=f"process {holder.pid} on host"):
            RunLock(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(tmp_path):  # the kernel dropped the dead process's lock; the stale pid does not matter
        pass


RECIPE = {"model": {"preset": "debug-llama", "overrides": {"n_layer": 2, "d_model": 64}},
          "data": {"inputs": ["python-code"], "tokenizer": {"vocab_size": 1024}},
          "optim": {"lr": 3e-3}, "train": {"steps": 40}}


def _recipe(*overrides):
    return recipe_from_dict(RECIPE, list(overrides))


def test_schedule_like_changes_are_allowed(tmp_path):
    write_recipe(tmp_path, _recipe())
    assert check_resume(tmp_path, _recipe()) == []
    changes = check_resume(tmp_path, _recipe("optim.lr=0.01", "train.steps=60", "eval.every=5", "checkpoint.every=10",
                                             "train.precision=bf16", "schedule.kind=wsd", "batch.micro_batch=4",
                                             "train.parallel=fsdp"))
    assert sorted(changes) == [("batch.micro_batch", 8, 4), ("checkpoint.every", 50, 10), ("eval.every", 50, 5),
                               ("optim.lr", 0.003, 0.01), ("schedule.kind", "cosine", "wsd"),
                               ("train.parallel", "ddp", "fsdp"), ("train.precision", "fp32", "bf16"),
                               ("train.steps", 40, 60)]


def test_model_data_batch_and_seed_changes_are_refused_by_name(tmp_path):
    write_recipe(tmp_path, _recipe())
    cases = {"model.overrides.d_model=128": "model.overrides.d_model 64 -> 128",
             "model.overrides.n_head=2": "model.overrides.n_head (unset) -> 2",
             "data.tokenizer.vocab_size=2048": "data.tokenizer.vocab_size 1024 -> 2048",
             "data.inputs=[other]": "data.inputs ['python-code'] -> ['other']",
             "batch.global_batch=16": "batch.global_batch 8 -> 16",
             "batch.seq_len=64": "batch.seq_len 128 -> 64",
             "train.seed=1": "train.seed 0 -> 1"}
    for override, needed in cases.items():
        with pytest.raises(ValueError) as info:
            check_resume(tmp_path, _recipe(override, "optim.lr=0.01"))
        message = str(info.value)
        assert needed in message and "optim.lr" not in message, message
        assert "--fresh --overwrite" in message and "another --out" in message, message


def test_a_field_added_since_the_run_started_is_not_a_change():
    old = _recipe().to_dict()
    del old["train"]["matmul"], old["batch"]["seq_len"]  # as a recipe.yaml written before these fields existed
    assert recipe_changes(old, _recipe()) == []


def test_record_resume_keeps_the_recipe_of_the_steps_done(tmp_path):
    write_recipe(tmp_path, _recipe())
    messages = []
    new = _recipe("optim.lr=0.01")
    record_resume(tmp_path, new, check_resume(tmp_path, new), 20, messages.append)
    assert messages == ["resuming with changed settings: optim.lr 0.003 -> 0.01 (recipe.yaml updated; the recipe "
                        "up to step 20 is recipe-step20.yaml)"]
    assert yaml.safe_load((tmp_path / "recipe-step20.yaml").read_text())["optim"]["lr"] == 0.003
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text())["optim"]["lr"] == 0.01
    # killed before the next checkpoint, resumed from step 20 again: steps 1-20 still ran at lr 0.003
    newer = _recipe("optim.lr=0.02")
    record_resume(tmp_path, newer, check_resume(tmp_path, newer), 20, messages.append)
    assert yaml.safe_load((tmp_path / "recipe-step20.yaml").read_text())["optim"]["lr"] == 0.003
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text())["optim"]["lr"] == 0.02
    record_resume(tmp_path, newer, [], 30, messages.append)  # no change: nothing written or said
    assert len(messages) == 2 and not (tmp_path / "recipe-step30.yaml").exists()
