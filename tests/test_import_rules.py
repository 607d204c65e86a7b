"""Which folder may import which (DESIGN.md "Layout"), read from the source with `ast`, not by importing.

`model/` is the architecture only: it imports nothing from `fp8/`, `parallel/` or `trainer/` (FP8,
expert parallelism and the pipeline are applied to a model from outside and may import it). `parallel/`
never imports `trainer/`. Every import counts, also one inside a function (a lazy import is still a
dependency), and relative imports are resolved against the folder's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RULES = {
    "model": ("twinpipe.fp8", "twinpipe.parallel", "twinpipe.trainer"),
    "parallel": ("twinpipe.trainer",),
}


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in `source`, a module of `package`
    (e.g. "twinpipe.model"); `from x import y` gives x and x.y, since y may be a submodule."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def violations(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        sub = path.relative_to(ROOT / folder).parent.parts
        package = ".".join(("twinpipe", folder) + sub)
        for line, name in imported_modules(path.read_text(), package):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return sorted(set(bad))


@pytest.mark.parametrize("folder", sorted(RULES))
def test_folder_imports_only_what_it_may(folder):
    assert violations(folder, RULES[folder]) == []


def test_every_kind_of_import_is_seen():
    source = """
import twinpipe.fp8.quant
from twinpipe.parallel import grid
from . import hf
from ..fp8 import convert

def lazy():
    from twinpipe.trainer.loop import train
"""
    names = {name for _, name in imported_modules(source, "twinpipe.model")}
    assert {"twinpipe.fp8.quant", "twinpipe.parallel.grid", "twinpipe.model.hf", "twinpipe.fp8.convert",
            "twinpipe.trainer.loop.train"} <= names
    assert sum(n.startswith(RULES["model"]) for n in names) >= 4
