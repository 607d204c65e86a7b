"""SFT records from local files through HF `datasets`, each one named by file and line when it is bad.

Files: jsonl/json (also .gz/.bz2/.xz), parquet and arrow files or folders of them (`sources.resolve_files`),
and folders written by `datasets.save_to_disk` (read with `load_from_disk`; a `DatasetDict` gives its
"train" split, or its only one). With `streaming=True` files are read through datasets' streaming mode.

A record becomes a `Record`: a conversation (`messages`, list of {"role", "content"}) or a plain `text`,
and optionally a reference `answer`. Formats (`data.format`), field names configurable (`Fields`):
- `messages`: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`;
- `prompt_completion`: `{"prompt": ..., "completion": ...}` read as TRL reads them: two message lists
  (concatenated into one conversation), or two strings, trained as plain text `prompt + completion + eos`
  with the loss on the completion and eos (no chat template, as TRL does for non-conversational data);
- `text`: `{"text": str}`, every token trained (continued pretraining);
- `auto`: the first of these whose fields the record has.

Bad input (`on_bad_record`): a line that is not JSON, a record without the format's fields, a field of the
wrong type or an unknown role raises `BadRecord("data file <file> line <n>: <what>")` (`error`), or is skipped and
counted (`skip`). A jsonl line number is found only when something is wrong (a scan of the file up to it);
parquet/arrow records are named by row.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from twinpipe.data.sources import COMPRESSIONS, builder_for, resolve_files

log = logging.getLogger(__name__)

FORMATS = ("auto", "messages", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
ON_BAD_RECORD = ("error", "skip")


class BadRecord(ValueError):
    """A record the SFT reader cannot use; the message starts with `data file <file> line <n>:`."""


@dataclass(frozen=True)
class Fields:
    """Record field names (recipe keys `data.messages_field`, `data.prompt_field`, ...)."""

    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    text: str = "text"
    answer: str = "answer"


@dataclass
class Record:
    """One usable record: `messages` (a chat) or `text` (raw), or `prompt` + `completion` strings."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    answer: str | None = None


@dataclass
class RecordStats:
    """What the reader kept and skipped (logged, and kept with the token cache)."""

    counts: Counter = field(default_factory=Counter)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def summary(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "nothing"


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets` `save_to_disk` (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def resolve_inputs(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files (folders expanded, sorted) and `save_to_disk` folders, in the order given."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("data.paths is empty: give at least one file or folder")
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend([p] if is_saved_dataset(p) else resolve_files([p]))
    return out


def inputs_fingerprint(inputs: Sequence[Path]) -> str:
    """Changes when an input file (or a saved dataset's files) changes size or mtime (no full read)."""
    h = hashlib.sha256(b"records-v1")
    for p in inputs:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def _open_text(path: Path):
    return COMPRESSIONS.get(path.suffix.lower(), open)(path, "rt", encoding="utf-8", errors="replace")


def jsonl_line_of(path: Path, index: int) -> int:
    """The 1-based line number of record `index` of a jsonl file (blank lines hold no record)."""
    seen = -1
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                seen += 1
                if seen == index:
                    return number
    return number + 1


def _jsonl_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record or the JSONDecodeError) of every non-blank line."""
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, err


class RecordReader:
    """Records of `paths` in order, as (`where`, Record) pairs; see the module docstring."""

    def __init__(self, paths: str | Path | Sequence[str | Path], fmt: str = "auto",
                 fields: Fields = Fields(), on_bad_record: str = "error", streaming: bool = False,
                 cache_dir: str | Path | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"data.format={fmt!r}: allowed {', '.join(FORMATS)}")
        if on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"data.on_bad_record={on_bad_record!r}: allowed {', '.join(ON_BAD_RECORD)}")
        self.inputs = resolve_inputs(paths)
        self.fmt, self.fields, self.on_bad_record = fmt, fields, on_bad_record
        self.streaming = streaming
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.stats = RecordStats()

    def fingerprint(self) -> str:
        blob = json.dumps(["reader-v1", self.fmt, vars(self.fields), self.on_bad_record])
        return hashlib.sha256((blob + inputs_fingerprint(self.inputs)).encode()).hexdigest()

    def __iter__(self) -> Iterator[tuple[str, Record]]:
        for path in self.inputs:
            for where, raw in self._raw_records(path):
                try:
                    if isinstance(raw, Exception):
                        raise BadRecord(f"{where()}: not valid JSON: {raw.msg} (column {raw.colno})")
                    record = to_record(raw, self.fmt, self.fields, where)
                except BadRecord as err:
                    if self.on_bad_record == "error":
                        raise
                    self.stats.add("bad records skipped")
                    log.warning("skipping %s", err)
                    continue
                self.stats.add("records")
                yield where(), record

    def _raw_records(self, path: Path) -> Iterator[tuple[Any, Any]]:
        """(where() -> "data file <path> line <n>", raw dict or a JSONDecodeError) per record of `path`."""
        if is_saved_dataset(path):
            yield from self._rows(path, self._load_from_disk(path))
            return
        builder = builder_for(path)
        if builder != "json":
            yield from self._rows(path, self._load(path, builder))
            return
        done = 0
        try:
            for raw in self._load(path, builder):
                yield (lambda i=done: f"data file {path} line {jsonl_line_of(path, i)}"), raw
                done += 1
        except BadRecord:
            raise
        except Exception as err:  # datasets / pyarrow do not say which line broke them
            if _first_char(path) == "[":
                raise BadRecord(f"data file {path}: datasets could not read this JSON array ({err})") from err
            bad = 0
            for number, raw in _jsonl_lines(path):  # find the bad line; in skip mode, read on by hand
                bad += isinstance(raw, Exception)
                if done and not isinstance(raw, Exception):  # datasets gave these records already
                    done -= 1
                    continue
                yield (lambda n=number: f"data file {path} line {n}"), raw
            if bad == 0:
                log.warning("%s: datasets could not read it (%s); read line by line instead", path, err)

    def _rows(self, path: Path, ds: Any) -> Iterator[tuple[Any, Any]]:
        for i, raw in enumerate(ds):
            yield (lambda i=i: f"data file {path} row {i + 1}"), raw

    def _load(self, path: Path, builder: str) -> Any:
        import datasets  # heavy import, only when user data is read

        datasets.disable_progress_bars()
        try:
            return datasets.load_dataset(builder, data_files=[str(path)], split="train",
                                         streaming=self.streaming, cache_dir=self.cache_dir)
        except Exception as err:
            if builder == "json":  # a syntax error: the caller finds its line
                raise
            raise BadRecord(f"data file {path}: datasets could not read it as {builder} ({err})") from err

    def _load_from_disk(self, path: Path) -> Any:
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds and len(ds) != 1:
                raise BadRecord(f"data folder {path}: a saved DatasetDict with splits {list(ds)}; give one split's "
                                "folder or name one 'train'")
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return ds.to_iterable_dataset() if self.streaming else ds


def _first_char(path: Path) -> str:
    with _open_text(path) as f:
        return f.read(4096).lstrip()[:1]


def _messages(value: Any, where: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(value, (list, tuple)) or not value:
        got = "an empty list" if isinstance(value, (list, tuple)) else type(value).__name__
        raise BadRecord(f"{where()}: {key!r} must be a non-empty list of messages, got {got}")
    out = []
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRecord(f"{where()}: {key}[{j}] is {type(message).__name__}, expected "
                            "{'role': ..., 'content': ...}")
        message = {k: v for k, v in message.items() if v is not None}  # as transformers drops them
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRecord(f"{where()}: {key}[{j}] has role {role!r}; allowed {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadRecord(f"{where()}: {key}[{j}] ({role}) content is {type(content).__name__}, "
                            "expected a string")
        out.append(message)
    return out


def _string(value: Any, where: Any, key: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{where()}: {key!r} is {type(value).__name__}, expected a string")
    return value


def to_record(raw: Any, fmt: str, fields: Fields, where: Any) -> Record:
    """One raw record (a dict) as a `Record` under `fmt`; `where()` names it in errors."""
    if not isinstance(raw, dict):
        raise BadRecord(f"{where()}: a record must be a JSON object, got {type(raw).__name__}")
    present = {k for k, v in raw.items() if v is not None}
    if fmt == "auto":
        if fields.messages in present:
            fmt = "messages"
        elif {fields.prompt, fields.completion} <= present:
            fmt = "prompt_completion"
        elif fields.text in present:
            fmt = "text"
        else:
            raise BadRecord(f"{where()}: no {fields.messages!r}, {fields.prompt!r}+{fields.completion!r} "
                            f"or {fields.text!r} field (record has {sorted(raw)}); set data.format and "
                            "the data.*_field names")
    answer = raw.get(fields.answer)
    answer = None if answer is None else str(answer)
    if fmt == "messages":
        if fields.messages not in present:
            raise BadRecord(f"{where()}: no {fields.messages!r} field (record has {sorted(raw)})")
        return Record(messages=_messages(raw[fields.messages], where, fields.messages), answer=answer)
    if fmt == "text":
        if fields.text not in present:
            raise BadRecord(f"{where()}: no {fields.text!r} field (record has {sorted(raw)})")
        return Record(text=_string(raw[fields.text], where, fields.text), answer=answer)
    missing = [k for k in (fields.prompt, fields.completion) if k not in present]
    if missing:
        raise BadRecord(f"{where()}: no {missing[0]!r} field (record has {sorted(raw)})")
    prompt, completion = raw[fields.prompt], raw[fields.completion]
    if isinstance(prompt, str) and isinstance(completion, str):
        return Record(prompt=prompt, completion=completion, answer=answer)
    messages = (_messages(prompt, where, fields.prompt)
                + _messages(completion, where, fields.completion))
    return Record(messages=messages, answer=answer)
