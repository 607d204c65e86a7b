"""The tokenizer a checkpoint was trained with, and the check that a run continuing from it (`resume`) or
starting its weights from it (`init_from`) turns text into the same ids.

A tokenizer that fits `model.vocab_size` but is not the checkpoint's would otherwise train on silently:
every id then means another token to the embedding, and a resumed loader's saved position points into
differently tokenized data. Each checkpoint's meta.json records `tokenizer_sha256` (`fingerprint`);
an older checkpoint, or an HF folder, is fingerprinted from its tokenizer files. A mismatch is one line
naming both tokenizers; `data.accept_tokenizer=true` goes on with a warning instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from twinpipe.trainer.checkpoint import format as fmt

log = logging.getLogger(__name__)

KEY = fmt.TOKENIZER_SHA  # in a checkpoint's meta.json


def fingerprint(tokenizer: Any) -> str:
    """sha256 of what turns text into ids and separates documents: the serialized tokenizer (vocabulary,
    merges, normalizer, pre-tokenizer, added tokens) and its bos/eos tokens. Not the chat template: the
    SFT recipe sets its own on the tokenizer of a pretraining checkpoint."""
    blob = json.dumps([tokenizer.to_json(), tokenizer.bos_token, tokenizer.eos_token])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _tokenizer_folder(path: Path) -> Path | None:
    """The folder holding the tokenizer files of a checkpoint folder, a run dir (its newest complete
    checkpoint, as `resolve_resume` picks for a path) or an HF folder; None if there is none."""
    from twinpipe.trainer.checkpoint.io import complete_checkpoints

    if (path / fmt.COMPLETE).is_file() or (path / "config.json").is_file():
        return path
    found = complete_checkpoints(path)
    return found[-1][1] if found else None


def saved_fingerprint(folder: Path) -> str | None:
    """The fingerprint of the tokenizer saved with `folder` (meta.json's, else from its tokenizer files);
    None when it has no tokenizer."""
    meta = folder / fmt.META
    if meta.is_file():
        saved = json.loads(meta.read_text()).get(KEY)
        if saved:
            return saved
    if not (folder / fmt.TOKENIZER).is_file():
        return None
    from twinpipe.data.tokenizer import load_tokenizer

    return fingerprint(load_tokenizer(folder))


def check(key: str, value: str, tokenizer: Any, data_tokenizer: str, accept: bool) -> None:
    """Stop with one line (ValueError) when the checkpoint or HF folder `key=value` was trained with
    another tokenizer than this run's (`data.tokenizer=data_tokenizer`), unless `accept`."""
    folder = _tokenizer_folder(Path(value))
    saved = saved_fingerprint(folder) if folder is not None else None
    if saved is None:
        return
    mine = fingerprint(tokenizer)
    if saved == mine:
        return
    what = (f"{key}={value} was trained with the tokenizer in {folder} (sha256 {saved[:12]}) but "
            f"data.tokenizer={data_tokenizer} is another one (sha256 {mine[:12]}): the same ids would mean "
            f"other tokens")
    if accept:
        log.warning("%s; going on (data.accept_tokenizer=true)", what)
        return
    raise ValueError(f"{what}; set data.tokenizer={folder}, or data.accept_tokenizer=true to train on anyway")
