"""The build-once cache of tokenizers and token shards: concurrent builders, lost rename races,
stale temporary folders of dead processes, failed and incomplete builds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.train import setup

ROOT = Path(__file__).resolve().parents[2]

# Each child builds the tokenizer and the shards of one data section into the shared cache. A file
# barrier inside both builds holds every child there until all have entered it, so all of them build
# and all but one lose the rename race (deterministically, not by luck of timing).
CHILD = r"""
import json, os, sys, time
from pathlib import Path
from lmforge.train import setup
from lmforge.train.recipe import DataSection, TokenizerSection

corpus, cache, barriers, n = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])

def wait_for_all(name):
    folder = barriers / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(list(folder.iterdir())) < n:
        if time.monotonic() > deadline:
            sys.exit(f"barrier {name}: only {len(list(folder.iterdir()))} of {n} builders arrived")
        time.sleep(0.01)

def at_barrier(name, fn):
    def wrapped(*args, **kwargs):
        wait_for_all(name)
        return fn(*args, **kwargs)
    return wrapped

setup.train_tokenizer = at_barrier("tokenizer", setup.train_tokenizer)
setup.prepare = at_barrier("shards", setup.prepare)
data = DataSection(inputs=[str(corpus)], tokenizer=TokenizerSection(kind="bpe", vocab_size=300), val_fraction=0.2)
tok = setup.tokenizer_for(data, cache, log=lambda message: None)
shards = setup.shards_for(data, tok, seed=0, cache_dir=cache, log=lambda message: None)
print(json.dumps({"tokenizer": tok.fingerprint, "shards": str(shards),
                  "index": (shards / "index.json").read_text()}))
"""


def _corpus(folder: Path) -> Path:
    folder.mkdir()
    for i in range(30):
        (folder / f"doc{i:02d}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}  # doc {i}\n" * 3)
    return folder


def test_three_processes_build_the_same_entries_at_once(tmp_path):
    corpus, cache, n = _corpus(tmp_path / "corpus"), tmp_path / "cache", 3
    cmd = [sys.executable, "-c", CHILD, str(corpus), str(cache), str(tmp_path / "barriers"), str(n)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, f"a concurrent builder failed (rc {p.returncode}):\n{err[-3000:]}"
    results = [json.loads(out) for out, _ in outs]
    assert all(r == results[0] for r in results), "every builder must end up with the same tokenizer and shards"
    for folder in ("tokenizers", "shards"):
        entries = sorted(p.name for p in (cache / folder).iterdir())
        assert len(entries) == 1 and ".tmp-" not in entries[0], f"{folder}: leftovers of the losers: {entries}"
    assert len(list((tmp_path / "barriers" / "shards").iterdir())) == n, "each process built its own shards"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write(folder: Path, text: str) -> None:
    folder.mkdir()
    (folder / "done.txt").write_text(text)


def _complete(path: Path) -> bool:
    return (path / "done.txt").is_file()


def test_stale_build_folders_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "bpe-300-0123abcd"
    dead, host = _dead_pid(), socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {"dead": f"{target.name}.tmp-{host}-{dead}", "old_format": f"{target.name}.tmp-{dead}",
                 "live": f"{target.name}.tmp-{host}-{live.pid}", "other_host": f"{target.name}.tmp-elsewhere-{dead}",
                 "other_entry": f"bpe-300-ffffffff.tmp-{host}-{dead}"}
        for name in names.values():
            _write(tmp_path / name, "partial")
        assert setup._build_once(target, lambda tmp: _write(tmp, "new"), _complete) == target
        left = {key for key, name in names.items() if (tmp_path / name).exists()}
    finally:
        live.kill()
        live.wait()
    assert left == {"live", "other_host", "other_entry"}, ("only this entry's folders of dead processes of this "
                                                         f"host may go; left: {left}")
    assert (target / "done.txt").read_text() == "new"


def test_losing_the_rename_race_uses_the_winners_entry(tmp_path):
    target = tmp_path / "entry"

    def build(tmp):
        _write(tmp, "mine")
        _write(target, "winner")  # another process publishes while this one builds

    assert setup._build_once(target, build, _complete) == target
    assert (target / "done.txt").read_text() == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"], "the loser's build folder must be dropped"
    assert setup._build_once(target, lambda tmp: pytest.fail("a cache hit must not build"), _complete) == target


def test_a_failed_build_leaves_nothing(tmp_path):
    def build(tmp):
        _write(tmp, "partial")
        raise RuntimeError("tokenizer training failed")

    with pytest.raises(RuntimeError, match="training failed"):
        setup._build_once(tmp_path / "entry", build, _complete)
    assert list(tmp_path.iterdir()) == []


def test_an_incomplete_cached_entry_names_the_fix(tmp_path):
    (tmp_path / "entry").mkdir()
    with pytest.raises(ValueError, match=r"entry is in the cache but incomplete .* delete it"):
        setup._build_once(tmp_path / "entry", lambda tmp: pytest.fail("must not build"), _complete)


def test_build_folder_names_carry_host_and_pid(tmp_path):
    tmp = setup._tmp_folder(tmp_path / "entry")
    assert tmp.name == f"entry.tmp-{socket.gethostname()}-{os.getpid()}"
