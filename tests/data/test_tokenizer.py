"""Tokenizer: DeepSeek special ids, exact round trip, save/load, the cached default BPE."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from twinpipe.data import tokenizer as tokmod
from twinpipe.data.corpus import embedded_corpus_files
from twinpipe.data.tokenizer import (BOS_TOKEN, EOS_TOKEN, default_tokenizer, load_tokenizer,
                                     train_bpe)

TRICKY = "héllo  世界 🙂\n\tdef f(x):\r\n    return x  # trailing spaces   \n\n\x00end"


def test_special_ids_and_vocab(small_tokenizer):
    assert small_tokenizer.bos_id == 0 and small_tokenizer.eos_id == 1  # docs/reference.md §1
    assert small_tokenizer.vocab_size == 512
    assert small_tokenizer.encode(EOS_TOKEN) == [1]


def test_round_trip_is_exact(small_tokenizer):
    text = embedded_corpus_files("heldout")[0].read_text(encoding="utf-8")
    for sample in (text, TRICKY, "", " leading space"):
        ids = small_tokenizer.encode(sample)
        assert small_tokenizer.decode(ids) == sample
    ids = small_tokenizer.encode(text)
    assert len(ids) < len(text.encode("utf-8")) / 2  # the merges compress code
    assert small_tokenizer.encode_batch([text, TRICKY]) == [ids, small_tokenizer.encode(TRICKY)]


def test_save_and_load_file_and_folder(small_tokenizer, tmp_path):
    folder = tmp_path / "tok"
    small_tokenizer.save(folder)
    loaded = load_tokenizer(folder)
    assert (loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (0, 1, 512)
    assert loaded.encode(TRICKY) == small_tokenizer.encode(TRICKY)
    assert loaded.fingerprint() == small_tokenizer.fingerprint()
    file = small_tokenizer.save(tmp_path / "single" / "my.json")
    assert file.name == "my.json" and load_tokenizer(file).eos_id == 1


def test_hf_folder_with_dict_tokens_and_bare_file(tmp_path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<|myeos|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    # a bare tokenizer.json: the usual names are recognized
    bare = load_tokenizer(tmp_path / "tokenizer.json")
    assert (bare.bos_id, bare.eos_id) == (1, 2)
    # an HF folder whose tokenizer_config.json names the tokens as {"content": ...}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": {"content": "<|myeos|>"}}))
    hf = load_tokenizer(tmp_path)
    assert (hf.bos_id, hf.eos_id) == (1, 3)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    tok = Tokenizer(models.BPE())
    tok.add_special_tokens(["<weird>"])
    tok.save(str(tmp_path / "noeos.json"))
    with pytest.raises(ValueError, match="noeos.json.*end-of-sequence"):
        load_tokenizer(tmp_path / "noeos.json")


def test_default_tokenizer_is_cached(small_tokenizer, tokenizer_cache, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer must be reused, not retrained")

    monkeypatch.setattr(tokmod, "train_bpe", no_training)
    again = default_tokenizer(512, tokenizer_cache, sample_bytes=300_000)
    assert again.encode(TRICKY) == small_tokenizer.encode(TRICKY)
    with pytest.raises(AssertionError, match="retrained"):  # another vocab size is another entry
        default_tokenizer(600, tokenizer_cache, sample_bytes=300_000)


def test_training_is_deterministic_and_checks_vocab():
    sample = ["def f(x):\n    return x + 1\n" * 50, "class A:\n    pass\n" * 50]
    a, b = train_bpe(iter(sample), 300), train_bpe(iter(sample), 300)
    assert a.to_json() == b.to_json()
    assert a.tokenizer.id_to_token(0) == BOS_TOKEN
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe(iter(sample), 100)
