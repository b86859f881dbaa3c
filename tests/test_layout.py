"""The package layout follows the data: a stage imports only from stages to its left.

text -> tokenizer -> data shards -> model -> train -> finetune / align -> generate / serve -> eval

Rules (STYLE.md, "The shape of the package follows the data"):
- a stage imports only itself, stages to its left, `config`, `presets`, `nn`, the package's
  own `__init__` and top-level helper modules (e.g. `_argparse.py`);
- `nn` imports only `config`; `config` and `presets` import no stage;
- top-level helper modules import only `config`, `presets`, `nn` and each other;
- nothing imports `cli` (only `__main__` runs it): it is the top.
Every `lmforge.*` import counts, absolute or relative, at module level or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "lmforge"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

STAGES = [
    "tokenizer",
    "data",
    "models",
    "train",
    "finetune",
    "align",
    "generate",
    "serve",
    "eval",
    "analysis",
]
CORE = ["config", "presets", "nn"]
TOP = ["cli", "__main__"]  # entry points: may import anything, imported by nothing
INIT = "__init__"  # the package facade (`from lmforge import load`): may import anything but the top


def unit_of(module: str) -> str:
    """`lmforge.models.hf.llama` -> `models`; `lmforge` -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else INIT


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every `lmforge...` module that `path` imports, relative imports resolved."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    known = {p.stem for p in root.iterdir() if p.suffix == ".py" or (p.is_dir() and p.name != "__pycache__")}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == PACKAGE:  # `from lmforge import x`: x may be a submodule or a re-export
                found.update(
                    f"{PACKAGE}.{alias.name}" if alias.name in known else PACKAGE for alias in node.names
                )
            else:
                found.add(source)
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def allowed(importer: str, imported: str, helpers: set[str]) -> bool:
    """May unit `importer` import unit `imported`? (Units are stages, core parts, helpers...)"""
    if importer == imported or importer in TOP:
        return True
    if imported in TOP:
        return False
    if importer == INIT:
        return True
    if importer == "nn":
        return imported == "config"
    if importer in ("config", "presets"):
        return imported in ("config", "presets")
    if importer in helpers:
        return imported in CORE or imported in helpers
    if importer in STAGES:
        left = STAGES[: STAGES.index(importer)]
        return imported in left or imported in CORE or imported in helpers or imported == INIT
    raise AssertionError(f"unreachable: {importer}")


def violations(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(units not in the layout, offending (module, imported module) pairs) for package `root`."""
    subpackages = {p.name for p in root.iterdir() if p.is_dir() and p.name != "__pycache__"}
    modules = {p.stem for p in root.glob("*.py")} - {INIT}
    unknown = sorted(subpackages - set(STAGES) - set(CORE))
    helpers = modules - set(STAGES) - set(CORE) - set(TOP)
    bad = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        for imported in sorted(imported_modules(path, root)):
            if not allowed(unit_of(importer), unit_of(imported), helpers):
                bad.append((importer, imported))
    return unknown, bad


def test_import_direction_follows_the_data_flow():
    unknown, bad = violations(ROOT)
    assert not unknown, (
        f"subpackages {unknown} are not placed in the data flow: add each to STAGES (in data-flow "
        "order) or CORE in tests/test_layout.py, and to README's Architecture section"
    )
    assert not bad, (
        "imports against the data flow ("
        + " -> ".join(STAGES)
        + "):\n"
        + "\n".join(f"  {importer} imports {imported}" for importer, imported in bad)
    )


def test_checker_catches_violations(tmp_path):
    """The checker itself: a fake package with one allowed and several forbidden imports."""
    pkg = tmp_path / PACKAGE
    files = {
        "__init__.py": "from lmforge.models import build\n",
        "cli.py": "from lmforge import train\n",
        "config.py": "",
        "_util.py": "from . import config\n",
        "nn/__init__.py": "from ..config import X\nfrom lmforge import data\n",
        "data/__init__.py": "from lmforge.config import X\nfrom lmforge import _util\n",
        "models/__init__.py": "def f():\n    from lmforge.train import loop\n    from .. import cli\n",
        "models/decoder.py": "from . import layers\nfrom ..data import shards\nimport lmforge.nn\n",
        "train/loop.py": "from lmforge import load\nfrom lmforge.models.decoder import Decoder\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    unknown, bad = violations(pkg)
    assert unknown == []
    assert bad == [
        ("lmforge.models", "lmforge.cli"),
        ("lmforge.models", "lmforge.train"),
        ("lmforge.nn", "lmforge.data"),
    ]
    (pkg / "misc").mkdir()
    assert violations(pkg)[0] == ["misc"]
