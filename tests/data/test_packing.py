"""Token cache and packing: document boundaries, padding labels, position ids, shapes."""

import numpy as np
import pytest

from twinpipe.data.packing import (IGNORE_INDEX, _token_dtype, load_token_cache, make_sample,
                                   pack_spans, tokenize_to_cache)

EOS, PAD = 1, 2


def doc_ends_of(lengths):
    return np.cumsum(np.asarray(lengths, dtype=np.int64))


def test_concat_every_token_is_a_target_once():
    ends = doc_ends_of([5, 17, 3, 40, 2])  # 67 tokens
    seq_len = 8
    spans = pack_spans(ends, seq_len, "concat")
    assert spans.shape == (9, 2)  # ceil(66 / 8)
    assert (spans[:, 1] - spans[:, 0] <= seq_len + 1).all()
    targets = np.concatenate([np.arange(s + 1, e) for s, e in spans])
    assert np.array_equal(targets, np.arange(1, 67))


def test_pad_mode_keeps_documents_whole():
    lengths = [5, 3, 9, 4, 20, 2]
    ends = doc_ends_of(lengths)
    starts = ends - np.asarray(lengths)
    spans = pack_spans(ends, 8, "pad")  # capacity 9 tokens
    expected = [(0, 8),  # docs 5 + 3
                (8, 17),  # doc 9 fills one sample exactly
                (17, 21),  # doc 4; doc 20 does not fit
                (21, 30), (29, 38),  # doc 20 in 8-strided pieces (one token of overlap)
                (37, 43)]  # its last 4 tokens + doc 2
    assert [tuple(s) for s in spans.tolist()] == expected
    # every document that fits in a sample starts and ends inside one sample
    for s, e in zip(starts, ends):
        if e - s <= 9:
            assert any(a <= s and e <= b for a, b in spans.tolist())
    # and each target is still seen at least once
    targets = set(np.concatenate([np.arange(a + 1, b) for a, b in spans]).tolist())
    assert targets >= set(range(1, 43)) - set(starts.tolist())


def test_pack_rejects_bad_arguments():
    with pytest.raises(ValueError, match="data.packing='greedy'"):
        pack_spans(doc_ends_of([4]), 8, "greedy")
    with pytest.raises(ValueError, match="seq_len=0"):
        pack_spans(doc_ends_of([4]), 0)
    with pytest.raises(ValueError, match="1 tokens"):
        pack_spans(doc_ends_of([1]), 8)


def test_sample_labels_padding_and_positions():
    window = np.array([10, 11, EOS, 20, 21, 22, EOS], dtype=np.uint16)  # two documents, 7 tokens
    s = make_sample(window, seq_len=10, pad_id=PAD, eos_id=EOS, reset_position_ids=True)
    assert all(v.shape == (10,) and v.dtype == np.int64 for v in s.values())
    assert s["input_ids"].tolist() == [10, 11, EOS, 20, 21, 22, PAD, PAD, PAD, PAD]
    assert s["labels"].tolist() == [11, EOS, 20, 21, 22, EOS] + [IGNORE_INDEX] * 4
    assert s["position_ids"][:6].tolist() == [0, 1, 2, 0, 1, 2]
    flat = make_sample(window, seq_len=10, pad_id=PAD, eos_id=EOS, reset_position_ids=False)
    assert flat["position_ids"].tolist() == list(range(10))
    full = make_sample(np.arange(3, 14), seq_len=10, pad_id=PAD, eos_id=EOS, reset_position_ids=True)
    assert (full["labels"] != IGNORE_INDEX).all()
    assert np.array_equal(full["labels"][:-1], full["input_ids"][1:])


def test_token_cache_round_trip_and_reuse(small_tokenizer, tmp_path):
    docs = ["def f():\n    return 1\n", "x = 'héllo'\n", "class A:\n    pass\n"]
    arr = tokenize_to_cache(iter(docs), small_tokenizer, "fp-1", tmp_path)
    assert arr.tokens.dtype == np.uint16  # vocab 512 fits
    assert _token_dtype(65536) == np.uint16 and _token_dtype(129280) == np.uint32  # V3's vocab
    starts = np.concatenate([[0], arr.doc_ends[:-1]])
    for doc, s, e in zip(docs, starts, arr.doc_ends):
        ids = arr.tokens[s:e].tolist()
        assert ids[-1] == small_tokenizer.eos_id
        assert small_tokenizer.decode(ids[:-1]) == doc

    def must_not_read():
        raise AssertionError("a cached token array must not re-read its source")
        yield

    again = tokenize_to_cache(must_not_read(), small_tokenizer, "fp-1", tmp_path)
    assert np.array_equal(np.asarray(again.tokens), np.asarray(arr.tokens))
    other = tokenize_to_cache(iter(docs[:1]), small_tokenizer, "fp-2", tmp_path)
    assert other.doc_ends.tolist() == arr.doc_ends[:1].tolist()
    prefix = next(tmp_path.glob("*.meta.json")).with_suffix("").with_suffix("")
    assert load_token_cache(prefix).fingerprint in {arr.fingerprint, other.fingerprint}
    with pytest.raises(ValueError, match="no documents"):
        tokenize_to_cache(iter([]), small_tokenizer, "fp-empty", tmp_path)
    # pad packings are saved beside the tokens and reused
    spans = arr.spans(4, "pad")
    assert np.array_equal(spans, pack_spans(arr.doc_ends, 4, "pad"))
    saved = list(tmp_path.glob("*.spans-pad-4.npy"))
    assert len(saved) == 1
    np.save(saved[0], spans[:1])  # a reused file is what comes back
    assert np.array_equal(again.spans(4, "pad"), spans[:1])


def test_special_token_text_in_documents_stays_text(small_tokenizer, tmp_path):
    doc = "before <｜end▁of▁sentence｜> after"
    assert small_tokenizer.encode(doc).count(small_tokenizer.eos_id) == 1  # plain encode parses it
    arr = tokenize_to_cache(iter([doc]), small_tokenizer, "fp-special", tmp_path)
    ids = arr.tokens[:].tolist()
    assert ids.count(small_tokenizer.eos_id) == 1 and ids[-1] == small_tokenizer.eos_id
    assert small_tokenizer.decode(ids[:-1]) == doc
