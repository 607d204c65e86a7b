"""The recipe-facing builders: user files end to end, train/held-out split by content, key errors."""

import json

import numpy as np
import pytest
import torch

from twinpipe.data.build import heldout_batches, packed_dataset, train_loader
from twinpipe.data.loader import heldout_document


def test_files_source_splits_documents_and_trains(small_tokenizer, tmp_path):
    docs = [f"document number {i}\n" + "word " * (i % 7) for i in range(200)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    data = {"source": "files", "paths": [str(tmp_path / "corpus.jsonl")], "text_field": "body",
            "heldout_percent": 10, "packing": "pad", "cache_dir": str(tmp_path / "cache")}
    loader = train_loader(data, small_tokenizer, seq_len=32, global_batch=4, micro_batch=2,
                          dp_rank=0, dp_size=1, seed=0)
    assert all(mb["input_ids"].shape == (2, 32) for mb in loader.next_step())
    train_ds = packed_dataset(data, small_tokenizer, "train", 32)
    held_ds = packed_dataset(data, small_tokenizer, "heldout", 32)
    held_docs = [d for d in docs if heldout_document(d, 10)]
    assert 5 <= len(held_docs) <= 40
    assert held_ds.tokens.doc_ends.shape[0] == len(held_docs)
    assert train_ds.tokens.doc_ends.shape[0] == len(docs) - len(held_docs)
    # pad packing keeps these short documents whole: each held-out sample decodes to whole documents
    rows = torch.cat([b["input_ids"] for b in heldout_batches(data, small_tokenizer, 32, 8)])
    assert rows.shape[0] == len(held_ds)
    text = "".join(small_tokenizer.decode(r[r != 2].tolist()) for r in rows)
    assert text.replace("<｜end▁of▁sentence｜>", "") == "".join(held_docs)


def test_pieces_of_a_huge_document_stay_in_one_split(small_tokenizer, tmp_path):
    docs = ["".join(f"doc {i} line {j}\n" for j in range(60)) for i in range(40)]  # ~900 chars each
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = {"source": "files", "paths": [str(tmp_path / "data")], "heldout_percent": 20,
            "max_doc_chars": 100, "cache_dir": str(tmp_path / "data" / "cache")}
    with pytest.raises(ValueError, match="data.cache_dir=.*inside the data folder"):
        packed_dataset(data, small_tokenizer, "train", 64)
    data["cache_dir"] = str(tmp_path / "cache")
    held = packed_dataset(data, small_tokenizer, "heldout", 64).tokens
    train = packed_dataset(data, small_tokenizer, "train", 64).tokens
    held_text = small_tokenizer.decode(np.asarray(held.tokens).tolist())
    train_text = small_tokenizer.decode(np.asarray(train.tokens).tolist())
    for i, d in enumerate(docs):
        inside = [f"doc {i} line {j}\n" in held_text for j in range(60)]
        assert all(inside) if heldout_document(d, 20) else not any(inside)
        assert (f"doc {i} line 0\n" in train_text) != heldout_document(d, 20)
    assert len(held.doc_ends) > 0 and len(train.doc_ends) > len(held.doc_ends)


def test_bad_keys_are_named(small_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="data.source='web'"):
        packed_dataset({"source": "web"}, small_tokenizer, "train", 16)
    with pytest.raises(ValueError, match="data.packing='best'"):
        packed_dataset({"packing": "best"}, small_tokenizer, "train", 16)
    with pytest.raises(ValueError, match="data.paths"):
        packed_dataset({"source": "files"}, small_tokenizer, "train", 16)
    (tmp_path / "one.txt").write_text("a single document")
    data = {"source": "files", "paths": str(tmp_path / "one.txt"), "heldout_percent": 0,
            "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(ValueError, match="heldout_percent=0"):
        packed_dataset(data, small_tokenizer, "heldout", 16)
    data["heldout_percent"] = 1
    assert not heldout_document("a single document", 1)  # so its held-out split is empty
    with pytest.raises(ValueError, match="'heldout' split of 1 data files.*one.txt"):
        packed_dataset(data, small_tokenizer, "heldout", 16)
