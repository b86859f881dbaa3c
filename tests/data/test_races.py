"""Several processes on one folder: `prepare` into the same --out (one writes, the others are refused
at once, a SIGKILLed writer blocks nobody and its temp files are cleaned up) and the first
`fetch_corpus` of one corpus by several processes (all succeed and read the same published folder).
Workers are fresh Python processes started together behind a file barrier; nothing touches the network."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge import _files
from lmforge.data import corpora, fetch, shard_io
from lmforge.data.shards import TokenShards, prepare_documents
from lmforge.data.sources import Source
from lmforge.tokenizer import Tokenizer
from tests.data.test_shards import bpe_tokenizer, make_docs

N_WORKERS = 3

# Each worker: announce itself (a file in `ready/`), wait for the test's `go` file, then run; it
# prints one JSON line. The tokenizer and the documents come from files the test wrote.
PREPARE_WORKER = """
import json, sys, time
from pathlib import Path
from lmforge.data.shards import prepare_documents
from lmforge.tokenizer import Tokenizer

work, out, name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
tok = Tokenizer.load(work / "tok")
docs = json.loads((work / "docs.json").read_text())
(work / "ready" / name).touch()
while not (work / "go").exists():
    time.sleep(0.001)

def held():  # with `hold`, stop after the first documents, holding the lock until killed
    yield from docs[:3]
    (work / "holding").touch()
    while True:
        time.sleep(0.05)

try:
    prepare_documents(held() if name == "hold" else docs, tok, out, shard_tokens=97, val_fraction=0.2,
                      progress=False)
    print(json.dumps({"result": "ok"}))
except ValueError as err:
    print(json.dumps({"result": "refused", "message": str(err)}))
"""

# Registers corpus `race`, whose source waits until every worker has started building it, so all
# of them publish within milliseconds of each other.
FETCH_WORKER = """
import hashlib, json, sys, time
from pathlib import Path
from lmforge.data import corpora
from lmforge.data.sources import Source

work, cache, name, n = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])

def records():
    (work / "building" / name).touch()
    while len(list((work / "building").iterdir())) < n:
        time.sleep(0.001)
    yield from ({"text": f"document {i}"} for i in range(300))

source = Source(name="race", title="t", license="CC0-1.0", attribution="the test", how="test", records=records)
corpora.CORPORA["race"] = corpora.Corpus("race test", "CC0-1.0", "documents", (lambda cache, force: source,))
(work / "ready" / name).touch()
while not (work / "go").exists():
    time.sleep(0.001)
folder = corpora.fetch_corpus("race", cache_dir=cache)
docs = list(corpora.iter_documents("race", cache_dir=cache))
manifest = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
print(json.dumps({"result": "ok", "documents": docs, "manifest": manifest}))
"""


def start_workers(code: str, work: Path, names: list[str], *args: str) -> list[subprocess.Popen]:
    """Start one worker per name and release them together once all are ready (imports done)."""
    (work / "ready").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(work), *args[:1], name, *args[1:]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in names]
    deadline = time.monotonic() + 60
    while len(list((work / "ready").iterdir())) < len(names):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() < deadline, "workers did not start within 60 s"
        time.sleep(0.01)
    (work / "go").touch()
    return procs


def results(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, f"worker crashed:\n{stderr}"
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def shard_files(folder: Path) -> dict[str, bytes]:
    """The prepared folder's contents, the (empty) lock file included."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return bpe_tokenizer()


@pytest.fixture
def work(tmp_path, tok) -> Path:
    """A folder with the tokenizer and the documents the prepare workers read."""
    tok.save(tmp_path / "tok")
    (tmp_path / "docs.json").write_text(json.dumps(make_docs(1500)))
    return tmp_path


def reference(work: Path, tok: Tokenizer) -> dict[str, bytes]:
    out = prepare_documents(json.loads((work / "docs.json").read_text()), tok, work / "reference",
                            shard_tokens=97, val_fraction=0.2, progress=False)
    return shard_files(out)


def test_concurrent_prepares_into_one_folder_one_writes_the_others_are_refused(work, tok):
    out = work / "out"
    found = results(start_workers(PREPARE_WORKER, work, [f"w{i}" for i in range(N_WORKERS)], str(out)))
    ok = [r for r in found if r["result"] == "ok"]
    assert ok, f"no prepare finished: {found}"
    for r in found:
        if r["result"] == "refused":  # the holder may not have written its pid yet: "another process"
            assert re.fullmatch(rf"{re.escape(str(out))} is in use: (process \d+ on host .+|another process) is "
                                r"preparing token shards into it \(lock file .+\); wait for it to finish, or pass "
                                r"another --out", r["message"]), r["message"]
    assert shard_files(out) == reference(work, tok), "the folder must hold exactly what one prepare writes"
    assert shard_files(out)[shard_io.LOCK_FILE] == b"", "the lock file is emptied on release"
    for split in ("train", "val"):
        TokenShards(out, split, tok, verify=True)


def test_prepare_refuses_a_locked_folder_and_a_killed_writer_blocks_nobody(work, tok):
    out = work / "out"
    (holder,) = start_workers(PREPARE_WORKER, work, ["hold"], str(out))
    try:
        deadline = time.monotonic() + 60
        while not (work / "holding").exists():
            assert holder.poll() is None, holder.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(ValueError, match=rf"is in use: process {holder.pid} on host .* is preparing token "
                                             r"shards into it \(lock file .*\.prepare\.lock\); wait for it"):
            prepare_documents(make_docs(5), tok, out, progress=False)
        leftovers = sorted(p.name for p in out.glob("*.tmp-*"))
        assert leftovers == [f"{s}_docs.bin.tmp-{socket.gethostname()}-{holder.pid}" for s in ("train", "val")]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    prepare_documents(json.loads((work / "docs.json").read_text()), tok, out, shard_tokens=97, val_fraction=0.2,
                      progress=False)
    assert shard_files(out) == reference(work, tok), "the killed writer's temp files must be gone"


def test_lock_is_per_writer_in_one_process_too(tmp_path, tok):
    dtype = shard_io.token_dtype(tok.vocab_size)
    with shard_io.ShardFolder(tmp_path, ["train"], dtype, 10):
        with pytest.raises(ValueError, match="is in use"):
            shard_io.ShardFolder(tmp_path, ["train"], dtype, 10)
    with pytest.raises(RuntimeError, match="source broke"), shard_io.ShardFolder(tmp_path, ["train"], dtype, 10):
        raise RuntimeError("source broke")
    with shard_io.ShardFolder(tmp_path, ["train"], dtype, 10) as folder:  # released after success and failure
        folder.finish({"splits": folder.close_splits()})
    assert sorted(p.name for p in tmp_path.iterdir()) == [shard_io.LOCK_FILE, "index.json", "train_docs.bin"]


def test_without_fcntl_prepare_takes_no_lock(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(_files, "fcntl", None)  # as on Windows
    prepare_documents(make_docs(20), tok, tmp_path, shard_tokens=97, progress=False)
    assert not (tmp_path / shard_io.LOCK_FILE).exists()
    TokenShards(tmp_path, "train", tok, verify=True)


def test_remove_own_files_spares_live_writers_temp_files(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    names = {
        "train_00000.bin": True,  # kept by the caller
        "train_00001.bin": False,  # an earlier prepare's shard, not written this time
        "train_00002.bin.tmp": False,  # an older lmforge's leftover
        f"train_00003.bin.tmp-{host}-{dead.pid}": False,  # its writer has ended
        f"train_00004.bin.tmp-{host}-{os.getppid()}": True,  # a live writer's
        f"val_docs.bin.tmp-other-{host}-{dead.pid}": True,  # another host's: cannot be checked
        "notes.txt": True,  # not ours
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    shard_io.remove_own_files(tmp_path, keep={"train_00000.bin"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, stays in names.items() if stays)


def test_concurrent_first_fetch_of_a_corpus_all_read_one_published_folder(tmp_path):
    cache = tmp_path / "cache"
    (tmp_path / "building").mkdir()
    procs = start_workers(FETCH_WORKER, tmp_path, [f"w{i}" for i in range(N_WORKERS)], str(cache), str(N_WORKERS))
    found = results(procs)
    assert found[0]["documents"] == [f"document {i}" for i in range(300)]
    published = hashlib.sha256((cache / "corpora" / "race" / corpora.MANIFEST).read_bytes()).hexdigest()
    assert all(r == found[0] | {"manifest": published} for r in found), "every process reads the one published corpus"
    assert sorted(p.name for p in (cache / "corpora").iterdir()) == ["race"], "no staging or discarded folder left"


def test_fetch_corpus_keeps_a_corpus_another_process_published_meanwhile(tmp_path, monkeypatch):
    source = Source(name="s", title="t", license="CC0-1.0", attribution="a", how="h",
                    records=lambda: iter([{"text": "one"}, {"text": "two"}]))
    monkeypatch.setitem(corpora.CORPORA, "late", corpora.Corpus("d", "CC0-1.0", "documents", (lambda c, f: source,)))
    folder = corpora.corpus_dir("late", tmp_path)
    write = corpora._write_corpus

    def write_while_another_publishes(*args):
        manifest = write(*args)
        folder.mkdir(parents=True)  # the other process's finished corpus, being read by it now
        (folder / "documents.jsonl").write_text('{"text": "theirs"}\n')
        (folder / corpora.MANIFEST).write_text("{}")
        return manifest

    monkeypatch.setattr(corpora, "_write_corpus", write_while_another_publishes)
    assert corpora.fetch_corpus("late", cache_dir=tmp_path) == folder
    assert list(corpora.iter_documents("late", cache_dir=tmp_path)) == ["theirs"], "the published corpus is kept"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["late"]


def make_entry(folder: Path, content: str, complete: bool) -> Path:
    folder.mkdir(parents=True)
    (folder / "data").write_text(content)
    if complete:
        (folder / fetch.MARKER).write_text("sha  archive\n")
    return folder


@pytest.mark.parametrize("existing, force, kept", [
    (None, False, "new"),
    ("complete", False, "old"),  # published by another process: never deleted
    ("complete", True, "new"),
    ("unfinished", False, "new"),
])
def test_publish_folder(tmp_path, existing, force, kept):
    staging = make_entry(tmp_path / "staging", "new", complete=True)
    target = tmp_path / "entry"
    if existing:
        make_entry(target, "old", complete=existing == "complete")
    assert fetch.publish_folder(staging, target, fetch.MARKER, force) == target
    assert (target / "data").read_text() == kept and (target / fetch.MARKER).is_file()
    assert staging.exists() == (kept == "old"), "an unused staging folder is left to the caller"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"] + (["staging"] if kept == "old" else [])


def test_publish_folder_when_another_process_publishes_first(tmp_path, monkeypatch):
    staging = make_entry(tmp_path / "staging", "new", complete=True)
    target = tmp_path / "entry"
    replace = os.replace

    def publish_first(src, dst):  # the other process's rename lands just before ours
        make_entry(Path(dst), "theirs", complete=True)
        monkeypatch.setattr(fetch.os, "replace", replace)
        return replace(src, dst)

    monkeypatch.setattr(fetch.os, "replace", publish_first)
    assert fetch.publish_folder(staging, target, fetch.MARKER) == target
    assert (target / "data").read_text() == "theirs"


def test_publish_folder_raises_real_errors(tmp_path, monkeypatch):
    staging = make_entry(tmp_path / "staging", "new", complete=True)

    def fail(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(fetch.os, "replace", fail)
    with pytest.raises(OSError, match="cross-device"):
        fetch.publish_folder(staging, tmp_path / "entry", fetch.MARKER)
