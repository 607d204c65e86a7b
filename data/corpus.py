"""The embedded default corpus: the Python standard library sources of the running interpreter.

Every machine that runs twinpipe has this corpus, so `make train` needs no download. The default
leaves out the standard library's own test suites (`test/`, `tests/`, `idle_test/` folders: about 60%
of the bytes, much of it generated data and deliberately odd encodings) and anything under
`site-packages`; for CPython 3.11 that leaves ~730 files, ~12 MB. `include_tests=True` keeps them.

The train / held-out split hashes each file's path *relative to the stdlib root*, so it does not
depend on where the interpreter is installed or on the order the file system lists files.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from functools import lru_cache
from pathlib import Path

SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 5  # of files, chosen by path hash
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> Path:
    """The folder holding the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def heldout_by_hash(key: str, percent: int = HELDOUT_PERCENT) -> bool:
    """Whether `key` (a relative path) falls in the held-out split: sha256-based, stable everywhere."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % 100 < percent


@lru_cache(maxsize=4)
def _all_files(root: Path, include_tests: bool) -> tuple[Path, ...]:
    skipped = _SKIPPED_DIRS if include_tests else _SKIPPED_DIRS | _TEST_DIRS
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skipped]  # prune: site-packages alone is large
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def embedded_corpus_files(split: str = "train", include_tests: bool = False,
                          root: Path | None = None) -> list[Path]:
    """The corpus files of `split` ("train" or "heldout"), sorted by relative path."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: the embedded corpus has splits {SPLITS}")
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder {root} does not exist; the embedded corpus "
                                "needs the interpreter's .py sources (is this a stripped install?)")
    files = _all_files(root, include_tests)
    want_heldout = split == "heldout"
    chosen = [f for f in files if heldout_by_hash(f.relative_to(root).as_posix()) == want_heldout]
    if not chosen:
        raise FileNotFoundError(f"no *.py files for split {split!r} under {root}")
    return chosen


def files_fingerprint(files: list[Path], root: Path | None = None) -> str:
    """sha256 over the files' relative names and contents: changes whenever the corpus does."""
    h = hashlib.sha256()
    for f in files:
        name = f.relative_to(root).as_posix() if root is not None else str(f)
        h.update(name.encode("utf-8") + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


@lru_cache(maxsize=8)
def embedded_corpus_fingerprint(split: str = "train", include_tests: bool = False) -> str:
    """Fingerprint of one split of the embedded corpus (reads it once per process, ~12 MB)."""
    root = stdlib_root()
    return files_fingerprint(embedded_corpus_files(split, include_tests), root)
