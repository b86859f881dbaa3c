"""The `lmforge` command: argparse derived from signatures, verbs, exit codes."""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal, Optional

import pytest

from lmforge import _argparse
from lmforge.cli import VERBS, main

REPO = Path(__file__).resolve().parents[1]


def toy(
    name: str,
    files: list[str],
    steps: int = 10,
    lr: float = 3e-4,
    out: Path | None = None,
    tag: Optional[str] = None,  # noqa: UP045 (the old spelling must keep working)
    compile_model: bool = True,
    mode: Literal["fast", "exact"] = "exact",
) -> dict:
    """Train a toy thing quickly.

    More description that only `toy --help` shows.

    Args:
        name: run name.
        files: input files, one or more.
        steps: number of optimizer steps; a long help text
            that continues on the next line.
        lr (float): peak learning rate, 100% of it after warmup.
        out: where to write.
        tag: optional tag.
        compile_model: whether to torch.compile.
        mode: which path to take.

    Returns:
        The parsed values.
    """
    return dict(locals())


def _parser(fn=toy, name="toy") -> argparse.ArgumentParser:
    return _argparse.build_parser({name: fn}, prog="prog")


def _help(parser: argparse.ArgumentParser, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_parse_docstring_splits_summary_description_and_args():
    summary, description, params = _argparse.parse_docstring(toy.__doc__)
    assert summary == "Train a toy thing quickly."
    assert description == "Train a toy thing quickly.\n\nMore description that only `toy --help` shows."
    assert params["steps"] == "number of optimizer steps; a long help text that continues on the next line."
    assert params["lr"] == "peak learning rate, 100% of it after warmup."
    assert set(params) == {"name", "files", "steps", "lr", "out", "tag", "compile_model", "mode"}


def test_defaults_and_types_are_derived_from_the_signature():
    args = _parser().parse_args(["toy", "run1", "a.txt"])
    values = _argparse.call(args)
    assert values == {
        "name": "run1",
        "files": ["a.txt"],
        "steps": 10,
        "lr": 3e-4,
        "out": None,
        "tag": None,
        "compile_model": True,
        "mode": "exact",
    }


def test_options_are_kebab_case_and_converted():
    argv = [
        "toy",
        "run1",
        "a.txt",
        "b.txt",
        "--steps",
        "5",
        "--lr",
        "0.1",
        "--out",
        "x/y",
        "--tag",
        "t",
        "--no-compile-model",
        "--mode",
        "fast",
    ]
    values = _argparse.call(_parser().parse_args(argv))
    assert values["files"] == ["a.txt", "b.txt"]
    assert values["steps"] == 5 and isinstance(values["steps"], int)
    assert values["lr"] == 0.1
    assert values["out"] == Path("x/y")
    assert values["tag"] == "t"
    assert values["compile_model"] is False
    assert values["mode"] == "fast"


@pytest.mark.parametrize(
    "argv",
    [
        ["toy", "run1"],  # list positional needs one or more values
        ["toy", "run1", "a", "--steps", "many"],  # int conversion
        ["toy", "run1", "a", "--mode", "slow"],  # Literal choices
    ],
)
def test_bad_values_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_verb_help_shows_docstring_help_and_defaults(capsys):
    out = _help(_parser(), ["toy", "--help"], capsys)
    assert "More description that only `toy --help` shows." in out
    assert "--compile-model, --no-compile-model" in out
    assert "{fast,exact}" in out
    assert "number of optimizer steps" in out
    assert "100% of it after warmup" in out
    assert "default: 10" in out
    assert "Returns" not in out, "docstring sections other than Args must stay out of --help"


def test_top_level_help_lists_verbs_with_summary(capsys):
    out = _help(_parser(), ["--help"], capsys)
    assert "toy" in out and "Train a toy thing quickly." in out
    assert "More description" not in out


def test_unsupported_annotations_fail_when_the_parser_is_built():
    def untyped(x):
        """No annotation."""

    def positional_bool(flag: bool):
        """A bool needs a default."""

    def odd_type(x: dict | None = None):
        """dict is not a command-line type."""

    for fn in (untyped, positional_bool, odd_type):
        with pytest.raises(TypeError, match=fn.__name__):
            _parser(fn, "verb")


def test_run_maps_user_errors_to_exit_code_2(capsys, monkeypatch):
    def fails(value: str):
        """Always fails."""
        raise ValueError(f"bad value {value!r}")

    monkeypatch.delenv("LMFORGE_DEBUG", raising=False)
    assert _argparse.run({"fails": fails}, ["fails", "x"], prog="prog") == 2
    err = capsys.readouterr().err
    assert err.strip() == "prog fails: error: bad value 'x'"

    monkeypatch.setenv("LMFORGE_DEBUG", "1")
    with pytest.raises(ValueError, match="bad value"):
        _argparse.run({"fails": fails}, ["fails", "x"], prog="prog")


def test_verb_groups_nest(capsys, monkeypatch):
    def fetch(name: str, force: bool = False):
        """Fetch something."""
        print(f"fetch {name} {force}")

    def fails():
        """Fails."""
        raise ValueError("nope")

    verbs = {"toy": toy, "data": {"fetch": fetch, "fails": fails}}
    assert _argparse.run(verbs, ["data", "fetch", "x", "--force"], prog="prog") == 0
    assert capsys.readouterr().out.strip() == "fetch x True"
    monkeypatch.delenv("LMFORGE_DEBUG", raising=False)
    assert _argparse.run(verbs, ["data", "fails"], prog="prog") == 2
    assert capsys.readouterr().err.strip() == "prog data fails: error: nope"
    with pytest.raises(SystemExit):
        _argparse.run(verbs, ["data"], prog="prog")  # a group alone is a usage error


def test_run_returns_int_results_and_zero_otherwise():
    def code(n: int):
        """Return n."""
        return n

    assert _argparse.run({"code": code}, ["code", "3"], prog="prog") == 3
    assert _argparse.run({"toy": toy}, ["toy", "n", "f"], prog="prog") == 0


def _flat(verbs, prefix=()):
    for name, entry in verbs.items():
        if isinstance(entry, dict):
            yield from _flat(entry, (*prefix, name))
        else:
            yield (*prefix, name), entry


def test_every_verb_builds_a_parser_with_help(capsys):
    parser = _argparse.build_parser(VERBS, prog="lmforge")
    for path, fn in _flat(VERBS):
        summary, _, params = _argparse.parse_docstring(fn.__doc__)
        verb = " ".join(path)
        assert summary, f"verb {verb!r} needs a docstring: its first paragraph is the help line"
        out = _help(parser, [*path[:-1], "--help"], capsys)
        assert path[-1] in out
        missing = set(inspect.signature(fn).parameters) - set(params)
        assert not missing, f"verb {verb!r}: document {sorted(missing)} in the docstring's Args: section"


def test_lmforge_help_lists_verbs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out


def test_lmforge_info_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "MODEL" in out and "--seq-len" in out and "--seed" in out


def test_info_runs_a_debug_preset(capsys):
    assert main(["info", "debug-llama", "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "logits: (2, 8, " in out, out
    assert "parameters:" in out
    assert "log(V)" in out


def test_info_unknown_model_is_a_user_error(capsys, monkeypatch):
    monkeypatch.delenv("LMFORGE_DEBUG", raising=False)
    assert main(["info", "no-such-model-xyz"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge info: error:")
    assert "no-such-model-xyz" in err and "debug-llama" in err


def test_presets_verb_lists_debug_llama(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == [
        "name",
        "arch",
        "n_layer",
        "d_model",
        "n_head",
        "n_kv_head",
        "vocab",
    ]
    assert "debug-llama" in out


def test_python_dash_m_lmforge_help():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "info" in proc.stdout
