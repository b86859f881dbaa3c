"""Fetch packages from the package registries (PyPI, npm, Debian apt) into a cache.

`fetch_pypi` runs `pip download --no-deps`, `fetch_npm` runs `npm pack`, `fetch_deb` runs
`apt-get download` + `dpkg-deb -x`: each unpacks the archive and never installs, imports or
runs the package. `fetch_apt_translations` downloads Debian's translated package
descriptions with `apt-get update` into a private lists folder, so the machine's own apt
state is never touched. The cache lives in `$LMFORGE_CACHE` (default `~/.cache/lmforge`),
one directory per package version, created atomically and marked complete with the
archive's sha256, so a finished entry is reused without any network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

MARKER = ".complete"
_ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")
# Index targets that apt would fetch beside the translations; none of them is needed here.
_OTHER_APT_TARGETS = (
    "deb::Packages",
    "deb-src::Sources",
    "deb::Contents-deb",
    "deb::Contents-udeb",
    "deb::CNF",
    "deb::DEP-11",
    "deb::DEP-11-icons",
    "deb::DEP-11-icons-small",
    "deb::DEP-11-icons-large",
    "deb::DEP-11-icons-hidpi",
    "deb::DEP-11-icons-large-hidpi",
)


class ToolNotFoundError(RuntimeError):
    """A command-line tool that a fetcher runs (npm, apt-get, dpkg-deb) is not installed."""


def default_cache_dir() -> Path:
    """`$LMFORGE_CACHE` if set, else `~/.cache/lmforge`."""
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")


def normalize_name(package: str) -> str:
    """PEP 503 name normalisation: `Foo_Bar.baz` -> `foo-bar-baz`."""
    return re.sub(r"[-_.]+", "-", package).lower()


def fetch_pypi(
    package: str, version: str | None = None, cache_dir: Path | None = None, force: bool = False
) -> Path:
    """Download `package` (no dependencies) from PyPI, unpack it into the cache, return its directory.

    The directory is `cache_dir/pypi/<package>-<version>/` and holds the unpacked wheel (or
    sdist, when the package publishes no wheel) plus a `.complete` marker with the
    archive's sha256. A second call returns the cached directory without touching the
    network; with `version=None` any cached version of the package is reused.

    Args:
        package: distribution name on PyPI.
        version: exact version; None means the latest one (or any cached one).
        cache_dir: cache root; default `default_cache_dir()`.
        force: download again even when the package is cached.

    Raises:
        RuntimeError: pip could not download the package (e.g. offline).
    """
    root = _cache_root(cache_dir, "pypi")
    name = normalize_name(package)
    cached = None if force else _find_cached(root, name, version)
    if cached is not None:
        return cached
    with tempfile.TemporaryDirectory(dir=root, prefix=f".tmp-{name}-") as tmp:
        archive = _pip_download(package, version, Path(tmp) / "download")
        target = root / f"{name}-{version or _archive_version(archive)}"
        if not force and (target / MARKER).is_file():  # another process finished it meanwhile
            return target
        staging = Path(tmp) / "unpacked"
        _unpack(archive, staging)
        return _publish(staging, target, f"{_sha256(archive)}  {archive.name}\n", force)


def fetch_npm(
    package: str, version: str | None = None, cache_dir: Path | None = None, force: bool = False
) -> Path:
    """Download `package` from the npm registry with `npm pack`, unpack it, return its directory.

    The directory is `cache_dir/npm/<name>-<version>/` (`@scope/pkg` -> `scope-pkg`, npm's own
    tarball name); the tarball's files sit under its `package/` folder, as npm packs them.
    The `.complete` marker holds the tarball's sha256; npm itself checks the registry's
    integrity hash. Reuse and `version=None` work as in `fetch_pypi`.

    Raises:
        ToolNotFoundError: npm is not installed.
        RuntimeError: `npm pack` failed (unknown package, registry unreachable).
    """
    root = _cache_root(cache_dir, "npm")
    name = package.lstrip("@").replace("/", "-")
    cached = None if force else _find_cached(root, name, version)
    if cached is not None:
        return cached
    npm = _require_tool("npm", f"npm package {package!r}")
    spec = f"{package}@{version}" if version else package
    with tempfile.TemporaryDirectory(dir=root, prefix=f".tmp-{name}-") as tmp:
        proc = subprocess.run(
            [npm, "pack", "--json", "--ignore-scripts", spec], cwd=tmp, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"could not download {spec!r} from the npm registry: `npm pack` exited with code "
                f"{proc.returncode}:\n{_tail(proc)}\nOffline? Set LMFORGE_CACHE to a directory that "
                f"already holds it (as npm/{name}-<version>/)."
            )
        (packed,) = json.loads(proc.stdout)
        archive = Path(tmp) / packed["filename"]
        target = root / f"{name}-{packed['version']}"
        staging = Path(tmp) / "unpacked"
        _unpack(archive, staging)
        return _publish(staging, target, f"{_sha256(archive)}  {archive.name}\n", force)


def fetch_deb(package: str, cache_dir: Path | None = None, force: bool = False) -> Path:
    """Download a Debian package with `apt-get download`, extract it, return its directory.

    The files are extracted with `dpkg-deb -x` (nothing is installed or configured) into
    `cache_dir/apt/<package>_<version>/`, as they would lie under `/`. The machine's apt
    sources are used as they are; when its package lists do not know the package (e.g. a
    container whose lists were removed), the lists are refreshed into a private folder
    first, never into the system's. Any cached version is reused unless `force`.

    Raises:
        ToolNotFoundError: apt-get or dpkg-deb is not installed (not a Debian/Ubuntu machine).
        RuntimeError: apt could not download the package.
    """
    root = _cache_root(cache_dir, "apt")
    cached = None if force else _newest_complete(root.glob(f"{package}_*"))
    if cached is not None:
        return cached
    apt_get = _require_tool("apt-get", f"Debian package {package!r}")
    dpkg_deb = _require_tool("dpkg-deb", f"Debian package {package!r}")
    with tempfile.TemporaryDirectory(dir=root, prefix=f".tmp-{package}-") as tmp:
        download = Path(tmp) / "download"
        download.mkdir()
        proc = subprocess.run([apt_get, "download", package], cwd=download, capture_output=True, text=True)
        if proc.returncode != 0:  # the system's lists may lack it: retry with private, fresh lists
            conf = _apt_update(Path(tmp) / "apt", languages=(), packages=True)
            proc = subprocess.run(
                [apt_get, "-c", str(conf), "download", package], cwd=download, capture_output=True, text=True
            )
        debs = sorted(download.glob("*.deb"))
        if proc.returncode != 0 or len(debs) != 1:
            raise RuntimeError(
                f"could not download the Debian package {package!r}: `apt-get download` exited with code "
                f"{proc.returncode}:\n{_tail(proc)}\nOffline? Set LMFORGE_CACHE to a directory that "
                f"already holds it (as apt/{package}_<version>/)."
            )
        version = _run_checked([dpkg_deb, "-f", str(debs[0]), "Version"]).strip()
        target = root / f"{package}_{version.replace(':', '%3a')}"
        staging = Path(tmp) / "unpacked"
        _run_checked([dpkg_deb, "-x", str(debs[0]), str(staging)])
        return _publish(staging, target, f"{_sha256(debs[0])}  {debs[0].name}\n", force)


def fetch_apt_translations(
    languages: Sequence[str] = ("en", "de", "fr"), cache_dir: Path | None = None, force: bool = False
) -> Path:
    """Download Debian's translated package descriptions (`Translation-<lang>` index files).

    Runs `apt-get update` with the machine's configured sources but a private lists and
    cache folder (`-c` a config that clears `Acquire::Languages` and turns off every other
    index), so the system's apt state is untouched. apt checks the files against the signed
    `InRelease`; the files and the `InRelease` files are kept in
    `cache_dir/apt/translations-<langs>/`, and the marker lists each file's sha256.

    Raises:
        ToolNotFoundError: apt-get is not installed.
        RuntimeError: apt fetched no `Translation-<lang>` file for some language.
    """
    languages = tuple(sorted(set(languages)))
    root = _cache_root(cache_dir, "apt")
    target = root / f"translations-{'-'.join(languages)}"
    if not force and (target / MARKER).is_file():
        return target
    with tempfile.TemporaryDirectory(dir=root, prefix=".tmp-translations-") as tmp:
        conf = _apt_update(Path(tmp) / "apt", languages=languages, packages=False)
        lists = conf.parent / "lists"
        staging = Path(tmp) / "unpacked"
        staging.mkdir()
        for path in sorted(lists.glob("*_i18n_Translation-*")) + sorted(lists.glob("*Release")):
            shutil.move(path, staging / path.name)
        marker = "".join(f"{_sha256(p)}  {p.name}\n" for p in sorted(staging.iterdir()))
        return _publish(staging, target, marker, force)


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


def _cache_root(cache_dir: Path | None, registry: str) -> Path:
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / registry
    root.mkdir(parents=True, exist_ok=True)
    return root


def _find_cached(root: Path, name: str, version: str | None) -> Path | None:
    """A complete cache entry for `name` (at `version`, or the most recently fetched one)."""
    if version is not None:
        entry = root / f"{name}-{version}"
        return entry if (entry / MARKER).is_file() else None
    # A normalised name may contain "-", a version never does, so split at the last one.
    return _newest_complete(d for d in root.glob(f"{name}-*") if d.name.rsplit("-", 1)[0] == name)


def _newest_complete(entries) -> Path | None:
    complete = [d for d in entries if (d / MARKER).is_file()]
    return max(complete, key=lambda d: (d / MARKER).stat().st_mtime) if complete else None


def publish_folder(staging: Path, target: Path, complete: str, force: bool = False) -> Path:
    """Rename the finished folder `staging` to `target` (atomic); the file `complete` in it marks it finished.

    Several processes may fetch the same entry at once (every rank on first use). A finished
    `target` is never deleted unless `force`, as another process may be reading it: when one is
    there, or appears while this one publishes, `staging` is left unused (the caller deletes it)
    and `target` is returned. An unfinished `target` (older lmforge, or a folder someone else made)
    or, with `force`, the older entry is first renamed aside in one step, then deleted, so readers
    never see a half-deleted folder.
    """
    if not force and (target / complete).is_file():
        return target  # another process published it meanwhile: use that one
    if force and target.exists():
        _discard(target)
    try:
        os.replace(staging, target)  # fails when `target` is a folder that is not empty
    except OSError:
        if (target / complete).is_file():  # another process published it first: fine
            return target
        if not target.is_dir():
            raise
        _discard(target)  # unfinished
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / complete).is_file():
                raise
    return target


def _discard(folder: Path) -> None:
    """Rename `folder` into a fresh `.del-*` sibling, then delete that (another process may do the same)."""
    trash = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".del-{folder.name}-"))
    try:
        os.rename(folder, trash / folder.name)
    except FileNotFoundError:
        pass  # another process renamed it aside first
    shutil.rmtree(trash, ignore_errors=True)


def _publish(staging: Path, target: Path, marker: str, force: bool) -> Path:
    """Mark `staging` complete and publish it as cache entry `target` (see `publish_folder`)."""
    (staging / MARKER).write_text(marker)
    return publish_folder(staging, target, MARKER, force)


def _require_tool(tool: str, what: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ToolNotFoundError(
            f"{tool} is not installed (or not on PATH), so {what} cannot be fetched; install {tool}, "
            "or set LMFORGE_CACHE to a directory that already holds it"
        )
    return path


def _tail(proc: subprocess.CompletedProcess, lines: int = 15) -> str:
    return "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-lines:])


def _run_checked(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited with code {proc.returncode}:\n{_tail(proc)}")
    return proc.stdout


def _apt_update(folder: Path, languages: Sequence[str], packages: bool) -> Path:
    """`apt-get update` into `folder/lists` (private); return the config file that points there.

    The config is read after the system's (`-c`), so `#clear` can empty the system's
    `Acquire::Languages` (Debian's docker images set it to "none") and the update hooks.
    """
    apt_get = _require_tool("apt-get", "Debian's package index")
    (folder / "lists" / "partial").mkdir(parents=True)
    (folder / "cache" / "archives" / "partial").mkdir(parents=True)
    skipped = [t for t in _OTHER_APT_TARGETS if not (packages and t == "deb::Packages")]
    wanted = " ".join(f"{json.dumps(lang)};" for lang in languages) or '"none";'
    conf = folder / "apt.conf"
    conf.write_text(
        "#clear Acquire::Languages;\n"
        f"Acquire::Languages {{ {wanted} }};\n"
        "#clear APT::Update::Pre-Invoke;\n#clear APT::Update::Post-Invoke;\n"
        "#clear APT::Update::Post-Invoke-Success;\n"
        'Acquire::GzipIndexes "false";\n'
        + "".join(f'Acquire::IndexTargets::{t}::DefaultEnabled "false";\n' for t in skipped)
        + f"Dir::State::Lists {json.dumps(str(folder / 'lists'))};\n"
        f"Dir::Cache {json.dumps(str(folder / 'cache'))};\n"
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'
    )
    proc = subprocess.run([apt_get, "-c", str(conf), "update"], capture_output=True, text=True)
    got = {p.name.rsplit("-", 1)[-1] for p in (folder / "lists").glob("*_i18n_Translation-*")}
    missing = sorted(set(languages) - got)
    if proc.returncode != 0 or missing:
        raise RuntimeError(
            f"`apt-get update` (private lists in {folder}) "
            + (f"fetched no Translation-{', Translation-'.join(missing)} index" if missing else "failed")
            + f" (exit code {proc.returncode}); are the machine's apt sources (Debian/Ubuntu mirrors) "
            f"reachable?\n{_tail(proc)}"
        )
    return conf


def _pip_download(package: str, version: str | None, dest: Path) -> Path:
    """Run `pip download --no-deps` into `dest` (wheels first, then sdists); return the archive."""
    spec = f"{package}=={version}" if version else package
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check"]
    base += ["-d", str(dest)]
    for extra in (["--only-binary=:all:"], []):
        proc = subprocess.run([*base, *extra, spec], capture_output=True, text=True)
        if proc.returncode == 0:
            break
    else:
        raise RuntimeError(
            f"could not download {spec!r} from PyPI: pip exited with code {proc.returncode}:\n{_tail(proc)}\n"
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
