"""Packed datasets and the resumable, data-parallel loader.

`PackedDataset` = a cached token array + packing spans: `dataset[i]` is one sample
(`input_ids[T]`, `labels[T]`, `position_ids[T]`). `PackedLoader` walks the *global* sample sequence
`g = 0, 1, 2, ...`: sample g is `dataset[perm_e[g mod N]]` with `e = g // N` the epoch and `perm_e` a
permutation seeded by (seed, e), computed per index (`twinpipe.data.shuffle`, no O(N) table). An
optimizer step takes `global_batch` consecutive global samples; data-parallel rank r gets the r-th
contiguous slice of them, cut into micro-batches. So the ranks'
micro-batches, concatenated in rank order, are exactly the dp = 1 global batch, and the state is a
single global sample index: a resume continues at the next sample whatever the new dp size or
micro-batch size.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from twinpipe.data.corpus import embedded_corpus_files, embedded_corpus_fingerprint
from twinpipe.data.packing import EmptySourceError, TokenArray, make_sample, tokenize_to_cache
from twinpipe.data.shuffle import permute
from twinpipe.data.sources import TextSource, first_invalid_utf8
from twinpipe.data.tokenizer import PAD_TOKEN, TextTokenizer

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
_STATE_VERSION = 2


def embedded_documents(split: str) -> Iterator[str]:
    """The embedded corpus files of `split` as documents (files that are not UTF-8 are skipped)."""
    for f in embedded_corpus_files(split):
        bad = first_invalid_utf8(f)
        if bad is not None:
            log.warning("embedded corpus: skipping %s (invalid UTF-8 at byte %d)", f, bad)
            continue
        text = f.read_text(encoding="utf-8")
        if text:
            yield text


def heldout_document(text: str, percent: int) -> bool:
    """Whether a user document belongs to the held-out split (by content hash, order-free)."""
    digest = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little") % 100 < percent


class PackedDataset:
    """Fixed-length samples packed from a token array (see `twinpipe.data.packing`)."""

    def __init__(self, tokens: TokenArray, seq_len: int, pad_id: int, eos_id: int,
                 packing: str = "concat", reset_position_ids: bool = False):
        self.tokens, self.seq_len = tokens, seq_len
        self.pad_id, self.eos_id = pad_id, eos_id
        self.packing, self.reset_position_ids = packing, reset_position_ids
        self.spans = tokens.spans(seq_len, packing)  # [num_samples, 2]
        self.fingerprint = hashlib.sha256(json.dumps(
            [tokens.fingerprint, seq_len, packing, reset_position_ids]).encode()).hexdigest()[:24]
        log.info("%d documents, %d tokens -> %d samples of %d tokens (%s packing)",
                 len(tokens.doc_ends), len(tokens.tokens), len(self.spans), seq_len, packing)

    @classmethod
    def from_documents(cls, documents: Iterable[str], source_fingerprint: str,
                       tokenizer: TextTokenizer, seq_len: int, cache_dir: str | Path,
                       packing: str = "concat", reset_position_ids: bool = False) -> "PackedDataset":
        tokens = tokenize_to_cache(documents, tokenizer, source_fingerprint, cache_dir)
        pad = tokenizer.tokenizer.token_to_id(PAD_TOKEN)
        return cls(tokens, seq_len, pad if pad is not None else tokenizer.eos_id, tokenizer.eos_id,
                   packing, reset_position_ids)

    @classmethod
    def from_embedded(cls, tokenizer: TextTokenizer, split: str, seq_len: int,
                      cache_dir: str | Path, **kwargs) -> "PackedDataset":
        """The embedded standard-library corpus, `split` = "train" | "heldout"."""
        fp = f"embedded-{split}-{embedded_corpus_fingerprint(split)}"
        return cls.from_documents(embedded_documents(split), fp, tokenizer, seq_len, cache_dir,
                                  **kwargs)

    @classmethod
    def from_files(cls, source: TextSource, tokenizer: TextTokenizer, split: str, seq_len: int,
                   cache_dir: str | Path, heldout_percent: int = 1, **kwargs) -> "PackedDataset":
        """User files; documents go to "heldout" when their content hash falls in the first
        `heldout_percent` of 100 buckets, otherwise to "train"."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split={split!r}: allowed 'train', 'heldout'")
        if not 0 <= heldout_percent < 100:
            raise ValueError(f"data.heldout_percent={heldout_percent}: allowed 0..99")
        if split == "heldout" and heldout_percent == 0:
            raise ValueError("a held-out split was asked for but data.heldout_percent=0")
        want = split == "heldout"
        docs = source.documents(keep=lambda d: heldout_document(d, heldout_percent) == want)
        fp = f"files-{split}-{heldout_percent}-{source.fingerprint()}"
        try:
            return cls.from_documents(docs, fp, tokenizer, seq_len, cache_dir, **kwargs)
        except EmptySourceError as err:
            raise EmptySourceError(
                f"the {split!r} split of {len(source.files)} data files ({source.files[0]} ...) has "
                f"no documents with data.heldout_percent={heldout_percent}; change it or add data"
            ) from err

    def __len__(self) -> int:
        return self.spans.shape[0]

    def sample(self, index: int) -> dict[str, np.ndarray]:
        start, end = self.spans[index]
        return make_sample(np.asarray(self.tokens.tokens[start:end]), self.seq_len, self.pad_id,
                           self.eos_id, self.reset_position_ids)

    def batch(self, indices: Sequence[int]) -> Batch:
        """Stack samples into `input_ids[B, T]`, `labels[B, T]` and, when some row's positions restart
        (`reset_position_ids`), `position_ids[B, T]` (int64; see `plain_positions_dropped`)."""
        samples = [self.sample(i) for i in indices]
        stacked = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
        return {k: torch.from_numpy(v) for k, v in plain_positions_dropped(stacked).items()}


class PackedLoader:
    """Per optimizer step, this data-parallel rank's micro-batches (a list of `Batch`)."""

    def __init__(self, dataset: PackedDataset, global_batch: int, micro_batch: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True):
        check_batch_sizes(global_batch, micro_batch, dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}: must be in [0, {dp_size})")
        self.dataset, self._global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.next_sample = 0  # global index of the first sample of the next step

    @property
    def global_batch(self) -> int:
        return self._global_batch

    @global_batch.setter
    def global_batch(self, value: int) -> None:
        """A batch-size schedule may change it between steps; the sample stream stays the same."""
        check_batch_sizes(value, self.micro_batch, self.dp_size)
        self._global_batch = value

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch // (self.dp_size * self.micro_batch)

    @property
    def epoch(self) -> int:
        return self.next_sample // len(self.dataset)

    def sample_indices(self, first: int, count: int) -> list[int]:
        """Dataset indices of global samples `first .. first + count - 1`."""
        n = len(self.dataset)
        g = np.arange(first, first + count, dtype=np.int64)  # [count] global sample indices
        epochs, positions = g // n, g % n
        if not self.shuffle:
            return positions.tolist()
        out = np.empty_like(positions)
        for epoch in np.unique(epochs).tolist():  # a step spans one epoch, rarely two
            here = epochs == epoch
            out[here] = permute(positions[here], n, self.seed, epoch)
        return out.tolist()

    def next_step(self) -> list[Batch]:
        per_rank = self.global_batch // self.dp_size
        first = self.next_sample + self.dp_rank * per_rank
        indices = self.sample_indices(first, per_rank)
        self.next_sample += self.global_batch
        mb = self.micro_batch
        return [self.dataset.batch(indices[i:i + mb]) for i in range(0, per_rank, mb)]

    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict:
        return {"version": _STATE_VERSION, "next_sample": self.next_sample, "seed": self.seed,
                "shuffle": self.shuffle, "num_samples": len(self.dataset),
                "dataset": self.dataset.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue at `state["next_sample"]`; the data, seed and shuffling must be the same (dp
        size, global and micro-batch size may change)."""
        expected = (("version", _STATE_VERSION), ("seed", self.seed), ("shuffle", self.shuffle),
                    ("num_samples", len(self.dataset)), ("dataset", self.dataset.fingerprint))
        for key, mine in expected:
            if state.get(key) != mine:
                raise ValueError(f"data loader state: {key}={state.get(key)!r} in the checkpoint "
                                 f"but {mine!r} now; resuming would not continue the same sample "
                                 "sequence (same data, tokenizer, seq_len, packing and seed needed)")
        self.next_sample = int(state["next_sample"])


def plain_positions_dropped(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`batch` without its `position_ids [B, T]` when every row counts 0, 1, ..., T-1: the model then
    takes the causal path, with no document mask and no host sync (checked here, on the host)."""
    positions = batch.get("position_ids")
    if positions is None or not (positions == np.arange(positions.shape[1])).all():
        return batch
    return {k: v for k, v in batch.items() if k != "position_ids"}


def check_batch_sizes(global_batch: int, micro_batch: int, dp_size: int) -> None:
    if min(global_batch, micro_batch, dp_size) < 1:
        raise ValueError(f"train.global_batch={global_batch}, train.micro_batch={micro_batch}, "
                         f"dp={dp_size}: all must be positive")
    if global_batch % (micro_batch * dp_size):
        raise ValueError(f"train.global_batch={global_batch} must be a multiple of "
                         f"train.micro_batch × dp = {micro_batch} × {dp_size}")


def eval_batches(dataset: PackedDataset, micro_batch: int, dp_rank: int = 0, dp_size: int = 1,
                 max_samples: int | None = None) -> Iterator[Batch]:
    """One ordered pass over (the first `max_samples` of) `dataset`, this rank's share: rank r takes
    samples r, r + dp, r + 2dp, ... The last micro-batch may be smaller; a rank may get none."""
    total = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    mine = list(range(dp_rank, total, dp_size))
    for i in range(0, len(mine), micro_batch):
        yield dataset.batch(mine[i:i + micro_batch])
