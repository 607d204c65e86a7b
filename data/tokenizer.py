"""Tokenizers: load a `tokenizer.json` / HF tokenizer folder, or train the default byte-level BPE.

`TextTokenizer` is a thin wrapper over `tokenizers.Tokenizer` that knows its bos/eos ids. The default
tokenizer is a byte-level BPE trained on a bounded, deterministic sample of the embedded corpus, with
DeepSeek-V3's special tokens reserved first so bos = 0 and eos = 1 (docs/reference.md §1). It is trained once
per (vocab_size, corpus fingerprint, sample size) and cached as `tokenizer.json`; concurrent ranks
serialize on a file lock, so they all load the very same file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from twinpipe.data.corpus import embedded_corpus_files, embedded_corpus_fingerprint, stdlib_root

log = logging.getLogger(__name__)

BOS_TOKEN = "<｜begin▁of▁sentence｜>"  # DeepSeek-V3's names
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2
USER_TOKEN = "<｜User｜>"  # DeepSeek-V3's chat turns (`data.chat`), ids 3, 4 in a chat BPE
ASSISTANT_TOKEN = "<｜Assistant｜>"
CHAT_TOKENS = (USER_TOKEN, ASSISTANT_TOKEN)
DEFAULT_SAMPLE_BYTES = 3_000_000  # ~3 MB of the corpus: a few seconds of BPE training on 2 cores
_BYTE_ALPHABET = 256
# Names other tokenizers use, tried in order when a bare tokenizer.json does not say.
_BOS_CANDIDATES = (BOS_TOKEN, "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>")
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>")


class TextTokenizer:
    """A `tokenizers.Tokenizer` with known bos/eos ids and, when it has one, its Jinja
    `chat_template` (HF's). `encode` adds no special tokens."""

    def __init__(self, tokenizer: Tokenizer, bos_token: str | None, eos_token: str,
                 chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = self._token_id(bos_token) if bos_token is not None else None
        self.eos_id = self._token_id(eos_token)

    def _token_id(self, token: str) -> int:
        idx = self.tokenizer.token_to_id(token)
        if idx is None:
            raise ValueError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return idx

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], literal_specials: bool = False) -> list[list[int]]:
        """With `literal_specials`, a special token's text inside a document (say a literal
        "<｜end▁of▁sentence｜>") is encoded as plain text, so raw data cannot inject control ids."""
        previous = self.tokenizer.encode_special_tokens
        self.tokenizer.encode_special_tokens = literal_specials
        try:
            encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        finally:
            self.tokenizer.encode_special_tokens = previous
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer and its bos/eos choice (keys token caches)."""
        blob = json.dumps([self.to_json(), self.bos_token, self.eos_token]
                          + ([self.chat_template] if self.chat_template is not None else []))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` (+ `tokenizer_config.json` naming bos/eos) into the folder `path`,
        or to `path` itself when it ends in `.json`. Returns the tokenizer.json path."""
        path = Path(path)
        if path.suffix == ".json":
            folder, target = path.parent, path
        else:
            folder, target = path, path / "tokenizer.json"
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(target, self.to_json())
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                  "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        _atomic_write(folder / "tokenizer_config.json", json.dumps(config, indent=2))
        return target


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _token_name(entry) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(entry, dict):
        return entry.get("content")
    return entry


def _chat_template(config: dict, folder: Path) -> str | None:
    """An HF folder's chat template: `chat_template.jinja`, else tokenizer_config.json's
    `chat_template` (a string, or named templates of which "default" is the one)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def load_tokenizer(path: str | Path, bos_token: str | None = None,
                   eos_token: str | None = None) -> TextTokenizer:
    """Load a `tokenizer.json` file or an HF tokenizer folder (offline; no hub access).

    bos/eos come from the arguments, else the folder's `tokenizer_config.json`, else the first known
    special-token name present in the vocabulary (DeepSeek's, `<s>`/`</s>`, `<|endoftext|>`, ...).
    The chat template, when there is one, comes from the folder (`_chat_template`).
    """
    path = Path(path)
    if path.is_dir():
        file = path / "tokenizer.json"
        config_file = path / "tokenizer_config.json"
    else:
        file, config_file = path, path.with_name("tokenizer_config.json")
    if not file.is_file():
        hint = (" (slow tokenizers such as sentencepiece-only folders are not supported: convert "
                "them with transformers' `save_pretrained` to get a tokenizer.json)")
        raise FileNotFoundError(f"no tokenizer.json at {file}{hint if path.is_dir() else ''}")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as err:
        raise ValueError(f"{file}: not a valid tokenizers JSON file ({err})") from err
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    if bos_token is None or eos_token is None:
        bos_token = bos_token or _token_name(config.get("bos_token"))
        eos_token = eos_token or _token_name(config.get("eos_token"))
    vocab = tok.get_vocab(with_added_tokens=True)
    if bos_token is None:
        bos_token = next((t for t in _BOS_CANDIDATES if t in vocab), None)
    if eos_token is None:
        eos_token = next((t for t in _EOS_CANDIDATES if t in vocab), None)
    if eos_token is None:
        raise ValueError(f"{file}: cannot tell the end-of-sequence token (none of {_EOS_CANDIDATES} "
                         "is in the vocabulary and no tokenizer_config.json names one); pass eos_token=")
    for name in (bos_token, eos_token):
        if name is not None and name not in vocab:
            raise ValueError(f"{file}: special token {name!r} is not in the vocabulary")
    return TextTokenizer(tok, bos_token, eos_token, _chat_template(config, file.parent))


def corpus_sample(max_bytes: int) -> Iterator[str]:
    """A deterministic sample of about `max_bytes` of the embedded train split, spread over the
    whole standard library (files visited in path-hash order, not alphabetically)."""
    root = stdlib_root()
    files = embedded_corpus_files("train")
    order = sorted(files, key=lambda f: hashlib.sha256(f.relative_to(root).as_posix().encode()).digest())
    taken = 0
    for f in order:
        if taken >= max_bytes:
            return
        text = f.read_bytes()[: max_bytes - taken].decode("utf-8", errors="ignore")
        taken += len(text.encode("utf-8"))
        yield text


def train_bpe(texts: Iterator[str], vocab_size: int,
              special_tokens: Sequence[str] = SPECIAL_TOKENS) -> TextTokenizer:
    """Train a byte-level BPE with DeepSeek-V3's special tokens first (bos 0, eos 1, pad 2, ...)."""
    minimum = len(special_tokens) + _BYTE_ALPHABET
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least {minimum} "
                         f"({_BYTE_ALPHABET} bytes + {len(special_tokens)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok, BOS_TOKEN, EOS_TOKEN)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive POSIX lock on `path` (created if missing); ranks sharing a cache take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def default_tokenizer(vocab_size: int, cache_dir: str | Path, sample_bytes: int = DEFAULT_SAMPLE_BYTES,
                      chat: bool = False) -> TextTokenizer:
    """The byte-level BPE of `vocab_size` trained on the embedded corpus, cached under `cache_dir`;
    `chat=True` also reserves DeepSeek-V3's chat tokens (ids 3, 4) for SFT from scratch."""
    special = SPECIAL_TOKENS + (CHAT_TOKENS if chat else ())
    parts = ["bpe-v1", vocab_size, sample_bytes, embedded_corpus_fingerprint("train")]
    key = hashlib.sha256(json.dumps(parts + ([list(special)] if chat else [])).encode()).hexdigest()
    folder = Path(cache_dir) / f"tokenizer-bpe{vocab_size}-{key[:16]}"
    with file_lock(Path(cache_dir) / f".tokenizer-{key[:16]}.lock"):
        if not (folder / "tokenizer.json").is_file():
            log.info("training a byte-level BPE (vocab %d) on %.1f MB of the embedded corpus -> %s",
                     vocab_size, sample_bytes / 1e6, folder)
            train_bpe(corpus_sample(sample_bytes), vocab_size, special).save(folder)
    return load_tokenizer(folder)
