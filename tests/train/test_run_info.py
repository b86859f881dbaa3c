"""run.json's provenance: the git commit and dirty flag, and the fingerprint of the prepared data."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import lmforge
from lmforge.data.pair_shards import prepare_pairs
from lmforge.data.shard_io import sha256_file
from lmforge.data.shards import TokenShards
from lmforge.tokenizer import train_tokenizer
from lmforge.train.recipe import recipe_from_dict
from lmforge.train.run_info import data_fingerprint, git_state, write_run_info
from lmforge.train.setup import shards_for, tokenizer_for

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * i}  # doc {i}\n" * 3 for i in range(40)]


def _git(repo: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_git_commit_and_dirty_flag(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "code.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "pkg/code.py")
    _git(repo, "commit", "-q", "-m", "first")
    head = _git(repo, "rev-parse", "HEAD")
    assert git_state(repo / "pkg") == {"commit": head, "dirty": False}
    (repo / "pkg" / "notes.txt").write_text("untracked\n")
    assert git_state(repo / "pkg")["dirty"] is False, "untracked files do not change the code"
    (repo / "pkg" / "code.py").write_text("x = 2\n")
    assert git_state(repo / "pkg") == {"commit": head, "dirty": True}
    # a folder git does not track (an installed copy in a venv inside some repository): no claim either way
    (repo / "venv" / "pkg").mkdir(parents=True)
    (repo / "venv" / "pkg" / "code.py").write_text("x = 1\n")
    assert git_state(repo / "venv" / "pkg") == {"commit": None, "dirty": None}
    (tmp_path / "plain").mkdir()
    assert git_state(tmp_path / "plain") == {"commit": None, "dirty": None}


def test_git_state_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable to run
    assert git_state() == {"commit": None, "dirty": None}


def test_run_json_records_the_data_fingerprint_and_git_state(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TEXTS):
        (corpus / f"doc{i:02d}.txt").write_text(text)
    recipe = recipe_from_dict({"data": {"inputs": [str(corpus)], "tokenizer": {"kind": "bpe", "vocab_size": 300},
                                        "val_fraction": 0.2}})
    tok = tokenizer_for(recipe.data, log=lambda message: None)
    folder = shards_for(recipe.data, tok, recipe.train.seed, log=lambda message: None)
    out = tmp_path / "run"
    out.mkdir()
    write_run_info(out, recipe, lmforge.ModelConfig.from_preset("debug-llama"), tok)  # finds the cached folder
    info = json.loads((out / "run.json").read_text())
    assert (info["git_commit"], info["git_dirty"]) == tuple(git_state().values())
    data = info["data"]
    assert data["folder"] == str(folder) and data["kind"] == "documents"
    assert data["index_sha256"] == sha256_file(folder / "index.json")
    assert set(data["splits"]) == {"train", "val"}
    for split, entry in data["splits"].items():
        shards = TokenShards(folder, split, tokenizer=tok)
        counted = sum(len(s) for s in shards.shards), len(shards.documents) - 1  # from the files themselves
        assert counted[0] > 0 and (entry["n_tokens"], entry["n_documents"]) == counted
        assert f"{split}_00000.bin" in entry["sha256"] and f"{split}_docs.bin" in entry["sha256"]
        for name, sha in entry["sha256"].items():
            assert sha256_file(folder / name) == sha, f"{name}: the recorded sha256 is not the file's"
    write_run_info(out, recipe, lmforge.ModelConfig.from_preset("debug-llama"), tok, data=folder)
    assert json.loads((out / "run.json").read_text())["data"] == data


@pytest.mark.parametrize("kind", ["seq2seq", "classification"])
def test_pair_folders_fingerprint_every_file(tmp_path, kind):
    tok = train_tokenizer("bpe", TEXTS, 300)
    pairs = [(text, "yes" if i % 2 else "no") if kind == "classification" else (text, text.upper())
             for i, text in enumerate(TEXTS)]
    folder = prepare_pairs(pairs, tok, tmp_path / "pairs", kind=kind, val_fraction=0.2, progress=False)
    data = data_fingerprint(folder)
    files = {name for entry in data["splits"].values() for name in entry["sha256"]}
    on_disk = {p.name for p in folder.iterdir() if p.name not in ("index.json", ".prepare.lock")}
    assert files == on_disk, "every data file of the folder is fingerprinted"
    assert data["kind"] == kind and sum(e["n_documents"] for e in data["splits"].values()) > 0
