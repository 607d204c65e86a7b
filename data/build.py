"""From the recipe's `data` section to packed datasets and loaders (what the trainer calls).

Keys read from `data` (a DictConfig or any mapping; a missing key takes the default shown):

| key | default | meaning |
|---|---|---|
| source | embedded | `embedded` (the interpreter's standard library) or `files` |
| paths | [] | files/folders for `source=files` (text, jsonl/json, parquet, arrow) |
| text_field | text | the column holding the text in jsonl/parquet/arrow files |
| streaming | false | read files through datasets' streaming mode (no Arrow cache) |
| max_doc_chars | 1000000 | longer documents are cut into pieces of this size |
| heldout_percent | 1 | for `source=files`: share of documents (by content hash) held out |
| packing | concat | `concat` (no padding but at the end) or `pad` (whole documents, padded) |
| reset_position_ids | false | restart position ids after each eos inside a sample |
| cache_dir | runs/.cache | where the tokenizer and the token arrays are cached |
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from twinpipe.data.loader import PackedDataset, PackedLoader, eval_batches
from twinpipe.data.packing import PACKING_MODES
from twinpipe.data.sources import DEFAULT_MAX_DOC_CHARS, TextSource
from twinpipe.data.tokenizer import TextTokenizer

SOURCES = ("embedded", "files")
DEFAULTS: dict[str, Any] = {
    "source": "embedded", "paths": [], "text_field": "text", "streaming": False,
    "max_doc_chars": DEFAULT_MAX_DOC_CHARS, "heldout_percent": 1, "packing": "concat",
    "reset_position_ids": False, "cache_dir": "runs/.cache",
}


def _get(data: Mapping[str, Any], key: str) -> Any:
    value = data.get(key, DEFAULTS[key]) if data is not None else DEFAULTS[key]
    return DEFAULTS[key] if value is None else value


def packed_dataset(data: Mapping[str, Any], tokenizer: TextTokenizer, split: str,
                   seq_len: int) -> PackedDataset:
    """The packed `split` ("train" | "heldout") of the source that `data` describes."""
    source = _get(data, "source")
    packing = _get(data, "packing")
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r}: allowed {SOURCES}")
    if packing not in PACKING_MODES:
        raise ValueError(f"data.packing={packing!r}: allowed {PACKING_MODES}")
    common = {"packing": packing, "reset_position_ids": bool(_get(data, "reset_position_ids"))}
    cache_dir = _get(data, "cache_dir")
    if source == "embedded":
        return PackedDataset.from_embedded(tokenizer, split, seq_len, cache_dir, **common)
    paths = _get(data, "paths")
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("data.source=files needs data.paths (a list of files or folders)")
    for folder in map(Path, paths):
        if folder.is_dir() and Path(cache_dir).resolve().is_relative_to(folder.resolve()):
            raise ValueError(f"data.cache_dir={cache_dir} lies inside the data folder {folder}: its "
                             "cache files would be read as data; put the cache elsewhere")
    text_source = TextSource(paths, text_field=_get(data, "text_field"),
                             streaming=bool(_get(data, "streaming")),
                             max_doc_chars=int(_get(data, "max_doc_chars")),
                             cache_dir=f"{cache_dir}/hf-datasets")
    return PackedDataset.from_files(text_source, tokenizer, split, seq_len, cache_dir,
                                    heldout_percent=int(_get(data, "heldout_percent")), **common)


def train_loader(data: Mapping[str, Any], tokenizer: TextTokenizer, seq_len: int, global_batch: int,
                 micro_batch: int, dp_rank: int, dp_size: int, seed: int) -> PackedLoader:
    """The resumable loader over the training split: `next_step()` gives this rank's micro-batches."""
    dataset = packed_dataset(data, tokenizer, "train", seq_len)
    return PackedLoader(dataset, global_batch, micro_batch, dp_rank=dp_rank, dp_size=dp_size,
                        seed=seed)


def heldout_batches(data: Mapping[str, Any], tokenizer: TextTokenizer, seq_len: int,
                    micro_batch: int, dp_rank: int = 0, dp_size: int = 1,
                    max_samples: int | None = None):
    """One ordered pass over this rank's share of the held-out split (see `eval_batches`)."""
    dataset = packed_dataset(data, tokenizer, "heldout", seq_len)
    return eval_batches(dataset, micro_batch, dp_rank, dp_size, max_samples)
