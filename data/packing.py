"""Tokenize documents once into a cached token array, then pack it into fixed-length samples.

Token cache (`<dir>/<key>.tokens.bin` + `.docs.npy` + `.meta.json`): every document's tokens followed
by eos, concatenated (uint16 when the vocabulary fits, else uint32), and the end offset of each
document. Special-token text inside a document is encoded as plain text: only the pipeline places
eos. It is written in chunks (never the whole corpus in memory), read back as a numpy memmap, and
keyed by the tokenizer's and the source's fingerprints. `.meta.json` is renamed into place last,
so a cache without it is incomplete and is rebuilt.

Packing turns the documents into *spans* `[start, end)` of the token array, each at most `seq_len + 1`
tokens (inputs `x[:-1]`, targets `x[1:]`):
- `concat`: the array cut every `seq_len` tokens with one token of overlap, so every token but the
  first is a target exactly once; documents run across sample boundaries; only the last span is short.
- `pad`: whole documents laid next to each other until the next one does not fit, then the rest of the
  sample is padding; a document longer than a sample is cut into `seq_len`-strided pieces as above.
Padding is never a target: labels are -100 there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from twinpipe.data.tokenizer import TextTokenizer, file_lock

log = logging.getLogger(__name__)

PACKING_MODES = ("concat", "pad")
IGNORE_INDEX = -100
_CACHE_VERSION = "tokens-v2"
_ENCODE_BATCH = 64  # documents per tokenizer call


class EmptySourceError(ValueError):
    """The documents to tokenize were none at all."""


@dataclass
class TokenArray:
    """All documents' tokens (each followed by eos) and where each document ends."""

    tokens: np.ndarray  # [num_tokens] uint16/uint32 (memmap when loaded from the cache)
    doc_ends: np.ndarray  # [num_docs] int64, exclusive end offset of each document in `tokens`
    fingerprint: str
    cache_prefix: Path | None = None  # where it was loaded from; packings are cached beside it

    def spans(self, seq_len: int, mode: str) -> np.ndarray:
        """`pack_spans` of these documents; `pad` spans (a Python pass over the documents, ~1 s per
        million) are saved beside the token cache and reused."""
        if mode != "pad" or self.cache_prefix is None:
            return pack_spans(self.doc_ends, seq_len, mode)
        path = self.cache_prefix.with_name(f"{self.cache_prefix.name}.spans-{mode}-{seq_len}.npy")
        if path.is_file():
            return np.load(path)
        spans = pack_spans(self.doc_ends, seq_len, mode)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, spans)
        os.replace(tmp, path)
        return spans


def _cache_key(tokenizer: TextTokenizer, source_fingerprint: str) -> str:
    blob = json.dumps([_CACHE_VERSION, tokenizer.fingerprint(), source_fingerprint])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def tokenize_to_cache(documents: Iterable[str], tokenizer: TextTokenizer, source_fingerprint: str,
                      cache_dir: str | Path) -> TokenArray:
    """Tokenize `documents` into the cache (once; ranks sharing `cache_dir` wait for one another)
    and return the memmapped token array."""
    cache_dir = Path(cache_dir)
    key = _cache_key(tokenizer, source_fingerprint)
    prefix = cache_dir / key
    meta_path = prefix.with_suffix(".meta.json")
    with file_lock(cache_dir / f".{key}.lock"):
        if not meta_path.is_file():
            _write_cache(documents, tokenizer, prefix, key)
    return load_token_cache(prefix)


def _write_cache(documents: Iterable[str], tokenizer: TextTokenizer, prefix: Path, key: str) -> None:
    dtype = _token_dtype(tokenizer.vocab_size)
    tmp_bin = prefix.with_name(f".{prefix.name}.tokens.bin.tmp")
    doc_ends = array("q")  # int64, compact even for many millions of documents
    total = 0

    def flush(batch: list[str], out) -> None:
        nonlocal total
        for ids in tokenizer.encode_batch(batch, literal_specials=True):
            ids.append(tokenizer.eos_id)
            out.write(np.asarray(ids, dtype=dtype).tobytes())
            total += len(ids)
            doc_ends.append(total)

    with open(tmp_bin, "wb") as out:
        batch: list[str] = []
        for doc in tqdm(documents, desc=f"tokenizing -> {prefix.name}", unit="doc", disable=None):
            batch.append(doc)
            if len(batch) == _ENCODE_BATCH:
                flush(batch, out)
                batch = []
        if batch:
            flush(batch, out)
    if total == 0:
        tmp_bin.unlink()
        raise EmptySourceError("no documents to tokenize: the data source yielded nothing")
    np.save(prefix.with_suffix(".docs.npy"), np.frombuffer(doc_ends, dtype=np.int64))
    os.replace(tmp_bin, prefix.with_suffix(".tokens.bin"))
    meta = {"num_tokens": total, "num_docs": len(doc_ends), "dtype": dtype.name, "key": key}
    tmp_meta = prefix.with_name(f".{prefix.name}.meta.json.tmp")
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, prefix.with_suffix(".meta.json"))
    log.info("tokenized %d documents into %d tokens -> %s", len(doc_ends), total, prefix)


def load_token_cache(prefix: str | Path) -> TokenArray:
    prefix = Path(prefix)
    meta_path = prefix.with_suffix(".meta.json")
    meta = json.loads(meta_path.read_text())
    tokens = np.memmap(prefix.with_suffix(".tokens.bin"), dtype=np.dtype(meta["dtype"]), mode="r")
    doc_ends = np.load(prefix.with_suffix(".docs.npy"))
    if tokens.shape[0] != meta["num_tokens"] or doc_ends.shape[0] != meta["num_docs"]:
        raise ValueError(f"token cache {prefix}.*: sizes disagree with {meta_path}; delete these "
                         "files to rebuild")
    return TokenArray(tokens, doc_ends, meta["key"], prefix)


def pack_spans(doc_ends: np.ndarray, seq_len: int, mode: str = "concat") -> np.ndarray:
    """Spans `[start, end)` of at most `seq_len + 1` tokens, each with at least one target.
    Returns `[num_samples, 2]` int64."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: must be at least 1")
    if mode not in PACKING_MODES:
        raise ValueError(f"data.packing={mode!r}: allowed {PACKING_MODES}")
    num_tokens = int(doc_ends[-1]) if len(doc_ends) else 0
    if num_tokens < 2:
        raise ValueError(f"{num_tokens} tokens: too few to make one (input, target) pair")
    if mode == "concat":
        starts = np.arange(0, num_tokens - 1, seq_len, dtype=np.int64)  # [num_samples]
        return np.stack([starts, np.minimum(starts + seq_len + 1, num_tokens)], axis=1)
    spans: list[tuple[int, int]] = []
    capacity = seq_len + 1
    open_start, open_end = -1, -1  # the sample being filled, [open_start, open_end)
    doc_start = 0
    for doc_end in doc_ends.tolist():
        length = doc_end - doc_start
        if open_start >= 0 and (open_end - open_start) + length <= capacity:
            open_end = doc_end  # the next document is contiguous with the open sample
        else:
            if open_start >= 0:
                spans.append((open_start, open_end))
            piece = doc_start
            while doc_end - piece > capacity:  # a document longer than one sample
                spans.append((piece, piece + capacity))
                piece += seq_len
            open_start, open_end = piece, doc_end
        doc_start = doc_end
    spans.append((open_start, open_end))
    out = np.asarray(spans, dtype=np.int64)
    return out[out[:, 1] - out[:, 0] >= 2]  # a lone trailing token has no target


def make_sample(window: np.ndarray, seq_len: int, pad_id: int, eos_id: int,
                reset_position_ids: bool) -> dict[str, np.ndarray]:
    """One sample from `window` (the span's tokens, 2..seq_len+1 of them): `input_ids[T]`,
    `labels[T]` (-100 on padding) and `position_ids[T]`. Positions count from 0 at the sample's start
    (also when it begins inside a document, so they never exceed seq_len - 1) and, with
    `reset_position_ids`, restart after each eos."""
    n = window.shape[0] - 1  # real (input, target) pairs
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)  # [T]
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)  # [T]
    input_ids[:n] = window[:-1]
    labels[:n] = window[1:]
    arange = np.arange(seq_len, dtype=np.int64)  # [T]
    if reset_position_ids:
        starts = np.zeros(seq_len, dtype=bool)  # [T] True where a document begins
        starts[0] = True
        starts[1:n] = window[: n - 1] == eos_id
        position_ids = arange - np.maximum.accumulate(np.where(starts, arange, 0))
    else:
        position_ids = arange
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
