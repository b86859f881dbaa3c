"""Sources already on the machine: the Python standard library and gettext message catalogs.

No network at all, so `python-code` (the standard library) always works offline.

A gettext `.mo` file is a little binary table (GNU gettext manual, "The Format of GNU MO
Files"): a magic number that also gives the byte order, a revision, the number of strings N,
and the offsets of two tables of N (length, offset) pairs, one for the original strings
(msgid) and one for the translations (msgstr). A msgid may carry a context (`ctx\\x04id`) and
plural forms (`singular\\x00plural`, translations `form0\\x00form1...`); the header is the
translation of the empty msgid and names the charset.
"""

from __future__ import annotations

import hashlib
import re
import struct
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.sources import Source

LOCALE_DIR = Path("/usr/share/locale")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_CHARSET = re.compile(rb"charset=([-\w.:]+)", re.IGNORECASE)


def python_stdlib(stdlib: Path | None = None) -> Source:
    """The running Python's standard library modules (tests and installed packages left out)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])

    def records() -> Iterator[dict]:
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if _SKIP_DIRS.intersection(rel.parts[:-1]):
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:  # a few modules declare another source encoding on purpose
                continue
            if text.strip():
                yield {"text": text, "origin": "python-stdlib", "id": str(rel)}

    version = ".".join(map(str, sys.version_info[:3]))
    return Source(
        name="python-stdlib",
        title=f"Python {version} standard library sources (without test suites), from {root}",
        license="PSF-2.0 (Python Software Foundation License Version 2)",
        attribution="Python Software Foundation and the CPython contributors",
        how=f"read from the local Python installation ({root}); no network",
        records=records,
        license_files=tuple(p for p in (root / "LICENSE.txt",) if p.is_file()),
    )


def gettext_catalogs(lang: str, locale_dir: Path = LOCALE_DIR) -> Source:
    """English -> `lang` message pairs from the `.mo` catalogs installed on this machine."""
    files = sorted((Path(locale_dir) / lang / "LC_MESSAGES").glob("*.mo"))

    def records() -> Iterator[dict]:
        for path in files:
            for msgid, msgstr in read_mo(path):
                if msgstr != msgid and any(c.isalpha() for c in msgid):
                    yield {"source": msgid, "target": msgstr, "origin": f"gettext:{path.stem}"}

    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return Source(
        name=f"gettext-{lang}",
        title=f"gettext message catalogs installed on this machine ({len(files)} files in "
        f"{Path(locale_dir) / lang / 'LC_MESSAGES'})",
        license="each catalog shares its package's license (mostly GPL/LGPL); see /usr/share/doc/<package>/copyright",
        attribution="the translation teams of each package (Translation Project and upstream teams)",
        how="read from the local .mo files; no network",
        records=records,
        checksum=f"{digest.hexdigest()}  (sha256 over the catalogs' names and sha256s)",
    )


def read_mo(path: Path) -> Iterator[tuple[str, str]]:
    """(msgid, msgstr) pairs of a gettext `.mo` file: context dropped, plurals as their first form.

    Raises:
        ValueError: `path` is not a `.mo` file (bad magic number or truncated tables).
    """
    data = Path(path).read_bytes()
    magic = data[:4]
    order = {b"\xde\x12\x04\x95": "<", b"\x95\x04\x12\xde": ">"}.get(magic)
    if order is None or len(data) < 20:
        raise ValueError(f"{path} is not a gettext .mo file (magic {magic.hex()}, expected 950412de)")
    _revision, n, originals, translations = struct.unpack(order + "4I", data[4:20])

    def string(table: int, i: int) -> bytes:
        length, offset = struct.unpack_from(order + "2I", data, table + 8 * i)
        if offset + length > len(data):
            raise ValueError(f"{path}: string {i} runs past the end of the file (truncated .mo file?)")
        return data[offset : offset + length]

    charset = "utf-8"
    for i in range(n):
        msgid, msgstr = string(originals, i), string(translations, i)
        if not msgid:  # the header: "Content-Type: text/plain; charset=UTF-8\n..."
            found = _CHARSET.search(msgstr)
            charset = found.group(1).decode() if found else charset
            continue
        msgid = msgid.split(b"\x04", 1)[-1].split(b"\x00", 1)[0]
        msgstr = msgstr.split(b"\x00", 1)[0]
        try:
            pair = msgid.decode(charset), msgstr.decode(charset)
        except (UnicodeDecodeError, LookupError):
            continue
        if pair[1]:
            yield pair
