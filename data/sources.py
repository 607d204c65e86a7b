"""Documents from local files: text, jsonl/json (both also .gz/.bz2/.xz), parquet and arrow, read
with HF `datasets`.

`TextSource(paths, text_field, streaming)` yields documents (strings) file by file, in sorted path
order, so the stream is deterministic and every problem can name its file:

- a missing path, a folder with no readable files, or a jsonl/parquet/arrow file without the
  `text_field` column -> an error naming the file (before training starts, not mid-run);
- an empty file (or one whose records carry no text) -> skipped with a warning; all empty -> error;
- invalid UTF-8 in a text or jsonl file -> **the whole file is skipped** with a warning naming the file
  and the byte offset (datasets cannot resume a file after a decode error, and a half-read file would
  make the token stream depend on where the error sat); a record whose text field is null or missing
  is skipped and counted in one warning per file; a non-string text field is an error naming the file;
- a malformed JSON line -> an error naming the file and the line (`first_bad_json_line`);
- a huge document is cut into pieces of at most `max_doc_chars` characters, at a line break when one
  is near, so the tokenizer never sees a gigabyte string.

`streaming=True` (recipe key `data.streaming`) reads each file lazily through datasets' streaming mode
(no Arrow cache is written; use it for large corpora); `False` materializes each file in datasets'
cache first, which is faster to re-read.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import hashlib
import json
import logging
import lzma
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

log = logging.getLogger(__name__)

BUILDERS = {  # suffix -> datasets builder
    ".txt": "text", ".text": "text", ".md": "text", ".py": "text",
    ".jsonl": "json", ".json": "json", ".ndjson": "json",
    ".parquet": "parquet", ".arrow": "arrow",
}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # text/jsonl may be compressed
DEFAULT_MAX_DOC_CHARS = 1_000_000
_UTF8_CHECKED = ("text", "json")  # builders that decode raw bytes; parquet/arrow strings are UTF-8 already


class DataFieldError(KeyError, ValueError):
    """A data file without the text field: a KeyError, and a ValueError so the CLIs say it in one line."""

    __str__ = Exception.__str__


class DataTypeError(TypeError, ValueError):
    """A text field of another type than str (a TypeError, and a ValueError for the CLIs)."""


def builder_for(path: Path) -> str | None:
    """The datasets builder for `path` by suffix (`a.jsonl.gz` -> json), None when unknown."""
    suffixes = [x.lower() for x in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
        builder = BUILDERS.get(suffixes[-1]) if suffixes else None
        return builder if builder in _UTF8_CHECKED else None  # parquet/arrow compress inside
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def _known_suffixes() -> str:
    return ", ".join(sorted(BUILDERS)) + f" (text/json also with {', '.join(sorted(COMPRESSIONS))})"


def resolve_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (recursively, known suffixes only) into a sorted list of files."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ValueError("data.paths is empty: give at least one file or folder")
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"data path {p} does not exist")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and builder_for(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise FileNotFoundError(f"data folder {p} holds no files with a known suffix "
                                        f"({_known_suffixes()})")
            files.extend(found)
        elif builder_for(p):
            files.append(p)
        else:
            raise ValueError(f"data file {p}: unknown suffix {''.join(p.suffixes)!r}; known: "
                             f"{_known_suffixes()}")
    return files


def first_invalid_utf8(path: Path, chunk_bytes: int = 1 << 24) -> int | None:
    """Byte offset (in the decompressed stream for .gz/.bz2/.xz) of the first invalid UTF-8
    sequence in `path`, or None if it is valid."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    opener = COMPRESSIONS.get(path.suffix.lower(), open)
    with opener(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                return offset + err.start - len(decoder.getstate()[0])
            if not chunk:
                return None
            offset += len(chunk)


def first_bad_json_line(path: Path) -> str | None:
    """`line N: <what>` for the first non-blank line of a JSON-lines file (also .gz/.bz2/.xz) that is
    not valid JSON, or None when every line parses (a one-document .json file spread over lines is
    reported by its whole-document error's line instead)."""
    opener = COMPRESSIONS.get(path.suffix.lower(), open)
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                if number == 1 and line.lstrip()[:1] in "[{":
                    break  # perhaps one JSON document over many lines
                return f"line {number}: {err.msg} (column {err.colno})"
        else:
            return None
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        try:
            json.load(f)
        except json.JSONDecodeError as err:
            return f"line {err.lineno}: {err.msg} (column {err.colno})"
    return None


def _unreadable(f: Path, builder: str, err: Exception) -> ValueError:
    """The error for a file datasets could not read, naming the file and, for JSON, the bad line."""
    where = first_bad_json_line(f) if builder == "json" else None
    if where is not None:
        return ValueError(f"data file {f} {where}: not valid JSON")
    return ValueError(f"data file {f}: unreadable as {builder} ({type(err).__name__}: {err})".splitlines()[0])


def split_document(text: str, max_chars: int) -> Iterator[str]:
    """Cut `text` into pieces of at most `max_chars`, preferring a line break in the last quarter."""
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = text.rfind("\n", start + (3 * max_chars) // 4, end)
        end = cut + 1 if cut >= 0 else end
        yield text[start:end]
        start = end
    if start < len(text):
        yield text[start:]


class TextSource:
    """A deterministic stream of documents from local files (see the module docstring)."""

    def __init__(self, paths: str | Path | Sequence[str | Path], text_field: str = "text",
                 streaming: bool = False, max_doc_chars: int = DEFAULT_MAX_DOC_CHARS,
                 cache_dir: str | Path | None = None):
        if max_doc_chars < 1:
            raise ValueError(f"data.max_doc_chars={max_doc_chars}: must be positive")
        self.files = resolve_files(paths)
        self.text_field, self.streaming = text_field, streaming
        self.max_doc_chars = max_doc_chars
        self.cache_dir = str(cache_dir) if cache_dir is not None else None

    def fingerprint(self) -> str:
        """Changes when a file, its size or mtime, or the reading options change (no full read)."""
        h = hashlib.sha256(json.dumps(["source-v1", self.text_field, self.max_doc_chars]).encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        return h.hexdigest()

    def __iter__(self) -> Iterator[str]:
        return self.documents()

    def documents(self, keep: Callable[[str], bool] | None = None) -> Iterator[str]:
        """All documents (cut to `max_doc_chars` pieces); `keep(whole_document)` filters before the
        cut, so the pieces of one document always land in the same split."""
        yielded = 0
        for f in self.files:
            for doc in self._file_documents(f):
                yielded += 1
                if keep is None or keep(doc):
                    yield from split_document(doc, self.max_doc_chars)
        if yielded == 0:
            raise ValueError(f"no documents in any of the {len(self.files)} data files "
                             f"({self.files[0]}{' ...' if len(self.files) > 1 else ''}): all empty "
                             "or skipped (see the warnings above)")

    def _file_documents(self, f: Path) -> Iterator[str]:
        builder = builder_for(f)
        if f.stat().st_size == 0:
            log.warning("skipping empty data file %s", f)
            return
        if builder in _UTF8_CHECKED:
            bad = first_invalid_utf8(f)
            if bad is not None:
                log.warning("skipping data file %s: invalid UTF-8 at byte %d", f, bad)
                return
        count = missing = 0
        try:
            for record in self._records(f, builder):
                text = record.get(self.text_field) if builder != "text" else record["text"]
                if text is None:
                    missing += 1
                    continue
                if not isinstance(text, str):
                    raise DataTypeError(f"data file {f}: field {self.text_field!r} holds "
                                    f"{type(text).__name__}, expected a string")
                if text:
                    count += 1
                    yield text
        except (TypeError, KeyError):
            raise
        except Exception as err:  # pyarrow / json errors do not say which file they were reading
            raise _unreadable(f, builder, err) from err
        if missing and count == 0 and builder != "text":
            raise DataFieldError(f"data file {f}: no record has a {self.text_field!r} value; set "
                           "data.text_field to the field holding the text")
        if missing:
            log.warning("data file %s: skipped %d records with no %r value", f, missing,
                        self.text_field)
        if count == 0:
            log.warning("data file %s holds no non-empty documents; skipped", f)

    def _records(self, f: Path, builder: str) -> Iterable[dict]:
        import datasets  # heavy import, only when user data is read

        kwargs = {"sample_by": "document"} if builder == "text" else {}
        bars_were_off = datasets.is_progress_bar_enabled() is False
        datasets.disable_progress_bars()  # one bar per file is noise; the tokenizer pass has one
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f)], split="train",
                                       streaming=self.streaming, cache_dir=self.cache_dir, **kwargs)
        except Exception as err:
            raise _unreadable(f, builder, err) from err
        finally:
            if not bars_were_off:
                datasets.enable_progress_bars()
        columns = ds.column_names
        if builder != "text" and columns is not None and self.text_field not in columns:
            raise DataFieldError(f"data file {f}: no field {self.text_field!r} (fields: {columns}); set "
                           "data.text_field")
        return ds
