"""fetch_npm / fetch_deb / fetch_apt_translations without network: npm and apt-get are fakes that
write tiny packages in the real formats (npm tarball, .deb built by dpkg-deb, Debian index files)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from lmforge.data import fetch

REAL_RUN = subprocess.run
DPKG_DEB = shutil.which("dpkg-deb")
needs_dpkg_deb = pytest.mark.skipif(DPKG_DEB is None, reason="dpkg-deb is not installed (not a Debian machine)")

TRANSLATION_DE = """\
Package: tiny
Description-md5: 0123456789abcdef0123456789abcdef
Description-de: winziges Paket
 Ein Absatz.

"""


def npm_tarball(files: dict[str, str]) -> bytes:
    """An npm pack tarball: gzip'd tar with every file under `package/`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def build_deb(tmp_path: Path, package: str = "tiny-doc", version: str = "1:2.0-1") -> Path:
    """A real .deb built with `dpkg-deb --build` from a folder."""
    root = tmp_path / "debroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: T <t@example.org>\n"
        "Description: tiny docs\n a test package\n"
    )
    doc = root / "usr" / "share" / "doc" / package
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("PSF-2.0\n")
    (doc / "page.rst.txt").write_text("Hello docs\n")
    deb = tmp_path / f"{package}.deb"
    REAL_RUN([DPKG_DEB, "--build", "--root-owner-group", str(root), str(deb)], check=True, capture_output=True)
    return deb


class FakeTools:
    """Stands in for subprocess.run of npm / apt-get (dpkg-deb runs for real); records the calls."""

    def __init__(self, npm_files=None, deb: Path | None = None, translations=None, fail=()):
        self.npm_files = npm_files or {"package.json": '{"version": "0.2.3"}', "data/a.txt": "A"}
        self.deb, self.translations, self.fail = deb, translations or {}, set(fail)
        self.calls: list[list[str]] = []
        self.confs: list[str] = []

    def __call__(self, cmd, cwd=None, **kwargs):
        cmd = [str(c) for c in cmd]
        tool = Path(cmd[0]).name
        if tool == "dpkg-deb":
            return REAL_RUN(cmd, cwd=cwd, **kwargs)
        self.calls.append(cmd)
        if tool == "npm":
            return self._npm(cmd, Path(cwd))
        if tool == "apt-get":
            return self._apt(cmd, Path(cwd) if cwd else None)
        raise AssertionError(f"unexpected command {cmd}")

    def _npm(self, cmd, cwd):
        assert cmd[1:4] == ["pack", "--json", "--ignore-scripts"], cmd
        if "npm" in self.fail:
            return subprocess.CompletedProcess(cmd, 1, "", "npm error code E404\nnpm error 404 Not Found")
        (cwd / "stdlib-tiny-0.2.3.tgz").write_bytes(npm_tarball(self.npm_files))
        out = json.dumps([{"name": cmd[-1], "version": "0.2.3", "filename": "stdlib-tiny-0.2.3.tgz"}])
        return subprocess.CompletedProcess(cmd, 0, out, "")

    def _apt(self, cmd, cwd):
        conf = None
        if cmd[1] == "-c":
            conf = Path(cmd[2]).read_text()
            self.confs.append(conf)
            cmd = [cmd[0], *cmd[3:]]
        if cmd[1] == "update":
            lists = Path(re.search(r'Dir::State::Lists "([^"]+)"', conf).group(1))
            for name, text in self.translations.items():
                (lists / f"deb.example.org_debian_dists_stable_main_i18n_{name}").write_text(text)
            (lists / "deb.example.org_debian_dists_stable_InRelease").write_text(
                "Origin: Debian\nCodename: stable\nDate: Sat, 01 Jan 2000 00:00:00 UTC\n"
            )
            return subprocess.CompletedProcess(cmd, 0, "Reading package lists...", "")
        assert cmd[1] == "download", cmd
        if "download" in self.fail and conf is None:  # only the system lists lack the package
            return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package tiny-doc")
        shutil.copy(self.deb, cwd / "tiny-doc_2.0-1_all.deb")
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.fixture
def tools(monkeypatch):
    """Install a FakeTools (configure it through the returned object) and pretend npm/apt-get exist."""
    fake = FakeTools()
    monkeypatch.setattr(fetch.subprocess, "run", fake)
    monkeypatch.setattr(fetch.shutil, "which", lambda tool: DPKG_DEB if tool == "dpkg-deb" else f"/fake/{tool}")
    return fake


def test_fetch_npm_unpacks_the_tarball_once(tmp_path, tools):
    out = fetch.fetch_npm("@stdlib/tiny", cache_dir=tmp_path)
    assert out == tmp_path / "npm" / "stdlib-tiny-0.2.3"
    assert (out / "package" / "data" / "a.txt").read_text() == "A"
    sha, archive = (out / fetch.MARKER).read_text().split()
    assert archive == "stdlib-tiny-0.2.3.tgz"
    assert sha == hashlib.sha256(npm_tarball(tools.npm_files)).hexdigest()
    assert tools.calls[0][-1] == "@stdlib/tiny"
    assert fetch.fetch_npm("@stdlib/tiny", cache_dir=tmp_path) == out
    assert fetch.fetch_npm("@stdlib/tiny", "0.2.3", cache_dir=tmp_path) == out
    assert len(tools.calls) == 1, "a cached package must not call npm again"
    assert sorted(p.name for p in (tmp_path / "npm").iterdir()) == ["stdlib-tiny-0.2.3"], "temp dirs must go"
    fetch.fetch_npm("@stdlib/tiny", cache_dir=tmp_path, force=True)
    assert len(tools.calls) == 2 and (out / fetch.MARKER).is_file(), "force downloads again"


def test_npm_failure_names_the_registry(tmp_path, tools):
    tools.fail = {"npm"}
    with pytest.raises(RuntimeError, match=r"(?s)'@stdlib/tiny@9' from the npm registry.*E404.*LMFORGE_CACHE"):
        fetch.fetch_npm("@stdlib/tiny", "9", cache_dir=tmp_path)
    assert list((tmp_path / "npm").iterdir()) == [], "a failed fetch must leave nothing behind"


@pytest.mark.parametrize("tool", ["npm", "apt-get"])
def test_missing_tool_is_a_clear_error(tmp_path, monkeypatch, tool):
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    fetcher = {
        "npm": lambda: fetch.fetch_npm("x", cache_dir=tmp_path),
        "apt-get": lambda: fetch.fetch_deb("x", tmp_path),
    }
    with pytest.raises(fetch.ToolNotFoundError, match=f"{tool} is not installed"):
        fetcher[tool]()
    assert issubclass(fetch.ToolNotFoundError, RuntimeError)


@needs_dpkg_deb
def test_fetch_deb_extracts_with_dpkg_deb(tmp_path, tools):
    tools.deb = build_deb(tmp_path)
    out = fetch.fetch_deb("tiny-doc", cache_dir=tmp_path / "cache")
    assert out.name == "tiny-doc_1%3a2.0-1", "the version comes from the control file, ':' escaped"
    assert (out / "usr/share/doc/tiny-doc/page.rst.txt").read_text() == "Hello docs\n"
    assert (out / fetch.MARKER).read_text().split()[0] == hashlib.sha256(tools.deb.read_bytes()).hexdigest()
    assert [c[1] for c in tools.calls] == ["download"] and not tools.confs, "the system's lists suffice"
    assert fetch.fetch_deb("tiny-doc", cache_dir=tmp_path / "cache") == out
    assert len(tools.calls) == 1


@needs_dpkg_deb
def test_fetch_deb_falls_back_to_private_lists(tmp_path, tools):
    tools.deb, tools.fail = build_deb(tmp_path), {"download"}
    out = fetch.fetch_deb("tiny-doc", cache_dir=tmp_path / "cache")
    assert (out / "usr/share/doc/tiny-doc/copyright").is_file()
    assert [c[1] for c in tools.calls] == ["download", "-c", "-c"], "download, private update, download"
    update_conf = tools.confs[0]
    assert "Acquire::IndexTargets::deb::Packages::DefaultEnabled" not in update_conf, "package lists are needed"
    assert str(tmp_path / "cache") in update_conf and "/var/lib/apt" not in update_conf


def test_fetch_apt_translations_uses_a_private_lists_folder(tmp_path, tools):
    tools.translations = {"Translation-en": "en\n", "Translation-de": TRANSLATION_DE, "Translation-fr": "fr\n"}
    out = fetch.fetch_apt_translations(("en", "de", "fr"), cache_dir=tmp_path)
    assert out == tmp_path / "apt" / "translations-de-en-fr"
    conf = tools.confs[0]
    assert "#clear Acquire::Languages;" in conf and 'Acquire::Languages { "de"; "en"; "fr"; };' in conf
    assert 'Acquire::IndexTargets::deb::Packages::DefaultEnabled "false";' in conf, "only translations"
    lists = re.search(r'Dir::State::Lists "([^"]+)"', conf).group(1)
    assert lists.startswith(str(tmp_path / "apt")), "never the system's /var/lib/apt/lists"
    assert "#clear APT::Update::Post-Invoke-Success;" in conf, "no system update hooks"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [fetch.MARKER, "deb.example.org_debian_dists_stable_InRelease"]
        + [f"deb.example.org_debian_dists_stable_main_i18n_Translation-{lang}" for lang in ("de", "en", "fr")]
    )
    marker = dict(line.split()[::-1] for line in (out / fetch.MARKER).read_text().splitlines())
    de = "deb.example.org_debian_dists_stable_main_i18n_Translation-de"
    assert marker[de] == hashlib.sha256(TRANSLATION_DE.encode()).hexdigest()
    assert fetch.fetch_apt_translations(("fr", "de", "en"), cache_dir=tmp_path) == out
    assert len(tools.calls) == 1, "a cached index must not call apt-get again"


def test_apt_update_without_the_translations_is_an_error(tmp_path, tools):
    tools.translations = {"Translation-en": "en\n"}  # e.g. a mirror without Translation-de
    with pytest.raises(RuntimeError, match=r"fetched no Translation-de, Translation-fr index.*reachable"):
        fetch.fetch_apt_translations(("en", "de", "fr"), cache_dir=tmp_path)
    assert list((tmp_path / "apt").iterdir()) == []
