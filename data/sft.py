"""SFT examples: tokenized once into a cache, then packed into fixed-length rows for `PackedLoader`.

Cache (`<dir>/<key>.sft-*`, written like the pretraining token cache: chunks, memmapped, `.meta.json`
renamed into place last; nothing is left behind when reading or tokenizing fails): every example's
token ids, its target mask (`data.chat`) and where each example ends, plus the reader's counts. The
key covers the tokenizer, the chat template, the files (size, mtime), the reading options and the split:
"train" / "heldout" by a hash of each record's content (`data.heldout_percent`), or "all".

Rows (`SFTDataset`), never cutting an example in two:
- `pack`: examples laid next to each other in order while they fit (next fit), `position_ids` restarting
  at 0 for each, so attention stays inside each example (`model.attention.document_causal_mask`) and the
  packed logits of an example are its unpacked logits;
- `pad`: one example per row.
The rest of a row is padding (`pad_id`, label -100, positions counting on, so no restart). Example
`x[0..n)` gives inputs `x` and labels `x[i + 1]` where that token is a target, -100 elsewhere and at its
last position. An example longer than `seq_len` is cut to `seq_len` tokens (`overlong=truncate`; dropped
when no target is left) or dropped (`overlong=drop`); both are counted and logged.
A batch whose rows all count 0, 1, 2, ... carries no `position_ids` (the model then takes its causal path
with no host sync); `dataset.batch` is what `PackedLoader` calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from twinpipe.data.chat import ChatTemplate, tokenize_record
from twinpipe.data.loader import Batch, heldout_document, plain_positions_dropped
from twinpipe.data.packing import IGNORE_INDEX, EmptySourceError
from twinpipe.data.records import Record, RecordReader
from twinpipe.data.tokenizer import TextTokenizer, file_lock

log = logging.getLogger(__name__)

SFT_PACKING = ("pack", "pad")
OVERLONG = ("truncate", "drop")
SPLITS = ("train", "heldout", "all")
_CACHE_VERSION = "sft-v1"


def record_heldout(record: Record, percent: int) -> bool:
    """Whether a record belongs to the held-out split (by a hash of its content; order-free)."""
    return heldout_document(json.dumps(dataclasses.asdict(record), sort_keys=True), percent)


@dataclass
class SFTExamples:
    """Tokenized examples: `tokens[ends[i-1]:ends[i]]` is example i, `targets` marks its trained tokens."""

    tokens: np.ndarray  # [num_tokens] uint16/uint32
    targets: np.ndarray  # [num_tokens] uint8 (1 = a target)
    ends: np.ndarray  # [num_examples] int64, exclusive end of each example
    fingerprint: str
    counts: dict

    def __len__(self) -> int:
        return self.ends.shape[0]

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start = int(self.ends[i - 1]) if i else 0
        return self.tokens[start:self.ends[i]], self.targets[start:self.ends[i]]


def _selected(reader: RecordReader, split: str, heldout_percent: int) -> Iterator[Record]:
    for _, record in reader:
        if split == "all" or record_heldout(record, heldout_percent) == (split == "heldout"):
            yield record


def tokenize_examples(reader: RecordReader, template: ChatTemplate, tokenizer: TextTokenizer,
                      cache_dir: str | Path, split: str = "train", heldout_percent: int = 0,
                      train_on_prompt: bool = False) -> SFTExamples:
    """The examples of `split` from `reader`'s records, tokenized once into the cache."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed {', '.join(SPLITS)}")
    if not 0 <= heldout_percent < 100:
        raise ValueError(f"data.heldout_percent={heldout_percent}: allowed 0..99")
    if split == "heldout" and heldout_percent == 0:
        raise ValueError("a held-out split was asked for but data.heldout_percent=0 (or give eval.paths)")
    blob = json.dumps([_CACHE_VERSION, tokenizer.fingerprint(), template.source, reader.fingerprint(),
                       split, heldout_percent if split != "all" else None, train_on_prompt])
    key = hashlib.sha256(blob.encode()).hexdigest()[:24]
    prefix = Path(cache_dir) / f"{key}.sft"
    with file_lock(Path(cache_dir) / f".{key}.lock"):
        if not prefix.with_suffix(".meta.json").is_file():
            records = _selected(reader, split, heldout_percent)
            _write_examples(records, reader, template, tokenizer, train_on_prompt, prefix)
    meta = json.loads(prefix.with_suffix(".meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    examples = SFTExamples(np.memmap(prefix.with_suffix(".tokens.bin"), dtype=dtype, mode="r"),
                           np.memmap(prefix.with_suffix(".targets.bin"), dtype=np.uint8, mode="r"),
                           np.load(prefix.with_suffix(".ends.npy")), key, meta["counts"])
    log.info("%s split of %d data files: %d examples (%s)", split, len(reader.inputs), len(examples),
             ", ".join(f"{k} {v}" for k, v in sorted(meta["counts"].items())))
    return examples


def _write_examples(records: Iterator[Record], reader: RecordReader, template: ChatTemplate,
                    tokenizer: TextTokenizer, train_on_prompt: bool, prefix: Path) -> None:
    dtype = np.dtype(np.uint16) if tokenizer.vocab_size <= 1 << 16 else np.dtype(np.uint32)
    tmp = {name: prefix.with_name(f".{prefix.name}.{name}.{os.getpid()}.tmp")
           for name in ("tokens", "targets")}
    ends, total, no_assistant = array("q"), 0, 0
    try:
        with open(tmp["tokens"], "wb") as tokens_out, open(tmp["targets"], "wb") as targets_out:
            for record in tqdm(records, desc=f"tokenizing -> {prefix.name}", unit="record", disable=None):
                example = tokenize_record(record, template, tokenizer, train_on_prompt)
                if example is None:
                    no_assistant += 1
                    continue
                ids, targets = example
                tokens_out.write(ids.astype(dtype).tobytes())
                targets_out.write(targets.astype(np.uint8).tobytes())
                total += len(ids)
                ends.append(total)
        counts = dict(reader.stats.counts)
        if no_assistant:
            counts["no assistant turn (skipped)"] = no_assistant
        if not ends:
            raise EmptySourceError(f"no SFT examples in {len(reader.inputs)} data files "
                                   f"({reader.inputs[0]} ...): {reader.stats.summary()}"
                                   + (f", {no_assistant} without an assistant turn" if no_assistant else ""))
        np.save(prefix.with_suffix(".ends.npy"), np.frombuffer(ends, dtype=np.int64))
        for name in ("tokens", "targets"):
            os.replace(tmp[name], prefix.with_suffix(f".{name}.bin"))
        meta = {"num_tokens": total, "num_examples": len(ends), "dtype": dtype.name, "counts": counts}
        tmp_meta = prefix.with_name(f".{prefix.name}.meta.json.tmp")
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, prefix.with_suffix(".meta.json"))
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)


class SFTDataset:
    """Rows of `seq_len` tokens made of whole examples (see the module docstring)."""

    def __init__(self, examples: SFTExamples, seq_len: int, pad_id: int, packing: str = "pack",
                 overlong: str = "truncate"):
        if packing not in SFT_PACKING:
            raise ValueError(f"data.packing={packing!r}: SFT allows {', '.join(SFT_PACKING)}")
        if overlong not in OVERLONG:
            raise ValueError(f"data.overlong={overlong!r}: allowed {', '.join(OVERLONG)}")
        self.examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
        lengths = np.diff(examples.ends, prepend=0)  # [num_examples]
        keep = lengths <= seq_len
        over = np.flatnonzero(~keep)
        self.counts = {"examples": len(examples), "over seq_len": len(over)}
        if overlong == "truncate":  # keep those with a target left among their first seq_len tokens
            starts = examples.ends[over] - lengths[over]
            left = [bool(examples.targets[s + 1:s + seq_len].any()) for s in starts.tolist()]
            keep[over[np.asarray(left, dtype=bool)]] = True
        self.counts["dropped"] = int((~keep).sum())
        self.kept = np.flatnonzero(keep)  # [num_rows_examples] example indices
        if len(self.kept) == 0:
            raise EmptySourceError(f"every one of {len(examples)} SFT examples is longer than "
                                   f"train.seq_len={seq_len} tokens and data.overlong={overlong}")
        used = np.minimum(lengths[self.kept], seq_len)  # [num_kept] tokens each example takes
        self.row_starts = pack_rows(used, seq_len) if packing == "pack" else np.arange(len(used))
        self.row_ends = np.append(self.row_starts[1:], len(used))  # [num_rows] exclusive
        self.fingerprint = hashlib.sha256(json.dumps(
            [examples.fingerprint, seq_len, pad_id, packing, overlong]).encode()).hexdigest()[:24]
        fill = used.sum() / (len(self.row_starts) * seq_len)
        log.info("%d SFT examples -> %d rows of %d tokens (%s, %.0f%% filled); %d longer than seq_len "
                 "(%s), %d dropped", len(self.kept), len(self), seq_len, packing, 100 * fill,
                 self.counts["over seq_len"], overlong, self.counts["dropped"])

    def __len__(self) -> int:
        return self.row_starts.shape[0]

    def sample(self, row: int) -> dict[str, np.ndarray]:
        """`input_ids[T]`, `labels[T]`, `position_ids[T]` of one row."""
        T = self.seq_len
        input_ids = np.full(T, self.pad_id, dtype=np.int64)  # [T]
        labels = np.full(T, IGNORE_INDEX, dtype=np.int64)  # [T]
        position_ids = np.arange(T, dtype=np.int64)  # [T]
        at = 0
        for i in self.kept[self.row_starts[row]:self.row_ends[row]].tolist():
            tokens, targets = self.examples.example(i)
            tokens = tokens.astype(np.int64)  # uint16 in the cache: -100 must not wrap
            n = min(len(tokens), T)
            input_ids[at:at + n] = tokens[:n]
            labels[at:at + n - 1] = np.where(targets[1:n] != 0, tokens[1:n], IGNORE_INDEX)
            position_ids[at:] = np.arange(T - at)  # the padding after the last example counts on
            at += n
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}

    def batch(self, indices: list[int]) -> Batch:
        """Rows stacked: `input_ids[B, T]`, `labels[B, T]`, and `position_ids[B, T]` when a row restarts."""
        import torch

        samples = [self.sample(i) for i in indices]
        stacked = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
        return {k: torch.from_numpy(v) for k, v in plain_positions_dropped(stacked).items()}


def pack_rows(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Next-fit packing of items of `lengths` (each <= capacity) in order: the first item of each row."""
    starts, used = [0], 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > capacity:
            starts.append(i)
            used = 0
        used += n
    return np.asarray(starts, dtype=np.int64)
