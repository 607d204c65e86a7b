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

SFT (`sft_dataset`, `sft_train_loader`, `answer_prompts`) reads `paths`, `streaming`, `heldout_percent`,
`cache_dir`, `text_field` and, with the defaults shown in `SFT_DEFAULTS`:

| key | default | meaning |
|---|---|---|
| format | auto | auto, messages, prompt_completion or text (`data.records`) |
| messages_field, prompt_field, completion_field, answer_field | messages, prompt, completion, answer | record fields |
| on_bad_record | error | error (file:line named) or skip (counted) |
| packing | pack | pack (conversations side by side, positions restarting) or pad (one per row) |
| overlong | truncate | a conversation longer than seq_len is truncated or dropped (both counted) |
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from twinpipe.data.chat import ChatTemplate, prompt_ids
from twinpipe.data.loader import PackedDataset, PackedLoader, eval_batches
from twinpipe.data.packing import PACKING_MODES
from twinpipe.data.records import Fields, RecordReader
from twinpipe.data.sft import SFTDataset, record_heldout, tokenize_examples
from twinpipe.data.sources import DEFAULT_MAX_DOC_CHARS, TextSource
from twinpipe.data.tokenizer import PAD_TOKEN, TextTokenizer

SOURCES = ("embedded", "files")
DEFAULTS: dict[str, Any] = {
    "source": "embedded", "paths": [], "text_field": "text", "streaming": False,
    "max_doc_chars": DEFAULT_MAX_DOC_CHARS, "heldout_percent": 1, "packing": "concat",
    "reset_position_ids": False, "cache_dir": "runs/.cache",
}
SFT_DEFAULTS: dict[str, Any] = {
    "format": "auto", "messages_field": "messages", "prompt_field": "prompt", "completion_field": "completion",
    "answer_field": "answer", "on_bad_record": "error", "packing": "pack", "overlong": "truncate",
    "heldout_percent": 0,
}


def _get(data: Mapping[str, Any], key: str, defaults: Mapping[str, Any] = DEFAULTS) -> Any:
    value = data.get(key, defaults[key]) if data is not None else defaults[key]
    return defaults[key] if value is None else value


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


def _sft(data: Mapping[str, Any], key: str) -> Any:
    return _get(data, key, {**DEFAULTS, **SFT_DEFAULTS})


def record_reader(data: Mapping[str, Any], paths: Any = None) -> RecordReader:
    """The SFT records of `paths` (default `data.paths`) read with the `data` keys."""
    paths = _get(data, "paths") if paths is None else paths
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("data.paths=[]: SFT needs at least one file or folder of records")
    fields = Fields(messages=_sft(data, "messages_field"), prompt=_sft(data, "prompt_field"),
                    completion=_sft(data, "completion_field"), text=_sft(data, "text_field"),
                    answer=_sft(data, "answer_field"))
    return RecordReader(paths, _sft(data, "format"), fields, _sft(data, "on_bad_record"),
                        streaming=bool(_get(data, "streaming")),
                        cache_dir=f"{_get(data, 'cache_dir')}/hf-datasets")


def _split(data: Mapping[str, Any], split: str, paths: Any) -> tuple[str, int]:
    """`split` of `data.paths` by `data.heldout_percent`, or the whole of other `paths` ("all")."""
    return ("all", 0) if paths is not None else (split, int(_sft(data, "heldout_percent")))


def sft_dataset(data: Mapping[str, Any], tokenizer: TextTokenizer, split: str, seq_len: int,
                train_on_prompt: bool = False, paths: Any = None) -> SFTDataset:
    """Packed SFT rows of the `split` ("train" | "heldout") of `data.paths`, or of all of `paths`."""
    split, percent = _split(data, split, paths)
    examples = tokenize_examples(record_reader(data, paths), ChatTemplate.for_tokenizer(tokenizer),
                                 tokenizer, _get(data, "cache_dir"), split, percent, train_on_prompt)
    pad = tokenizer.tokenizer.token_to_id(PAD_TOKEN)
    return SFTDataset(examples, seq_len, pad if pad is not None else tokenizer.eos_id,
                      _sft(data, "packing"), _sft(data, "overlong"))


def sft_train_loader(data: Mapping[str, Any], tokenizer: TextTokenizer, seq_len: int, global_batch: int,
                     micro_batch: int, dp_rank: int, dp_size: int, seed: int,
                     train_on_prompt: bool = False) -> PackedLoader:
    """The resumable loader over the SFT training rows (the same sample order and state as pretraining)."""
    dataset = sft_dataset(data, tokenizer, "train", seq_len, train_on_prompt)
    return PackedLoader(dataset, global_batch, micro_batch, dp_rank=dp_rank, dp_size=dp_size, seed=seed)


def answer_prompts(data: Mapping[str, Any], tokenizer: TextTokenizer, limit: int,
                   paths: Any = None) -> list[tuple[list[int], str]]:
    """(prompt ids, reference answer) of the first `limit` held-out records (or of `paths`) that carry
    an answer (`data.answer_field`), for greedy exact-match evaluation."""
    split, percent = _split(data, "heldout", paths)
    template = ChatTemplate.for_tokenizer(tokenizer)
    out = []
    for _, record in record_reader(data, paths):
        if record.answer is None or (split != "all" and not record_heldout(record, percent)):
            continue
        out.append((prompt_ids(record, template, tokenizer), record.answer))
        if len(out) == limit:
            break
    return out
