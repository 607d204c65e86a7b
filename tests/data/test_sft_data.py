"""SFT data end to end: records -> cached examples -> packed rows -> the resumable loader; packing
equivalence with the model, over-long samples, every bad-input case naming file and line."""

import json

import numpy as np
import pytest
import torch

from twinpipe.data import sft as sft_module
from twinpipe.data.build import answer_prompts, sft_dataset, sft_train_loader
from twinpipe.data.loader import PackedLoader
from twinpipe.data.packing import IGNORE_INDEX, EmptySourceError
from twinpipe.data.records import BadRecord, Fields, RecordReader
from twinpipe.data.tokenizer import default_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_cache):
    return default_tokenizer(512, tokenizer_cache, sample_bytes=300_000, chat=True)


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} + {i % 7}?" + " please" * (i % 5)},
                         {"role": "assistant", "content": str(i + i % 7)}], "answer": str(i + i % 7)}


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def data_cfg(tmp_path, paths, **kw):
    return {"paths": [str(p) for p in paths], "cache_dir": str(tmp_path / "cache"), **kw}


def test_rows_labels_positions_and_packing_equivalence(tok, tmp_path):
    from twinpipe.model.config import ModelConfig
    from twinpipe.model.transformer import Transformer

    path = write_jsonl(tmp_path / "chats.jsonl", [chat(i) for i in range(40)])
    ds = sft_dataset(data_cfg(tmp_path, [path]), tok, "train", seq_len=64)
    examples = ds.examples
    assert len(examples) == 40 and len(ds) < 40  # several conversations share a row
    row = ds.sample(0)
    starts = np.flatnonzero(row["position_ids"] == 0)
    assert len(starts) >= 2 and starts[0] == 0
    for k, start in enumerate(starts[:-1]):  # each conversation: its tokens, targets only on the answer
        tokens, targets = examples.example(k)
        n = len(tokens)
        assert row["input_ids"][start:start + n].tolist() == tokens.tolist()
        labels = row["labels"][start:start + n]
        assert labels[-1] == IGNORE_INDEX  # the last position predicts nothing of the next conversation
        want = [t if m else IGNORE_INDEX for t, m in zip(tokens[1:].tolist(), targets[1:])]
        assert labels[:-1].tolist() == want
        assert tok.decode(labels[labels != IGNORE_INDEX].tolist()) == chat(k)["answer"] + tok.eos_token
    batch = ds.batch([0, 1])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=512)).eval()
    with torch.no_grad():
        packed = model(batch["input_ids"][:1], batch["position_ids"][:1])
        for k, start in enumerate(starts.tolist()):  # row 0 holds examples 0, 1, ... in order
            end = start + len(examples.example(k)[0])
            alone = model(batch["input_ids"][:1, start:end])
            # the same arithmetic on fewer keys: only the softmax's summation order differs
            torch.testing.assert_close(packed[:, start:end], alone, atol=2e-5, rtol=1e-5)
    padded = sft_dataset(data_cfg(tmp_path, [path], packing="pad"), tok, "train", seq_len=64)
    assert len(padded) == 40
    batch = padded.batch([0, 1, 2])  # one conversation per row: positions never restart
    assert set(batch) == {"input_ids", "labels"}


def test_overlong_truncated_or_dropped_and_counted(tok, tmp_path):
    long = {"messages": [{"role": "user", "content": "long " * 40}, {"role": "assistant", "content": "ok"}]}
    long_answer = {"messages": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "yes " * 40}]}
    path = write_jsonl(tmp_path / "c.jsonl", [chat(1), long, long_answer, chat(2)])
    cut = sft_dataset(data_cfg(tmp_path, [path]), tok, "train", seq_len=24)
    assert cut.counts == {"examples": 4, "over seq_len": 2, "dropped": 1}  # `long` has no target left
    assert len(cut.kept) == 3
    rows = cut.batch(list(range(len(cut))))
    assert (rows["labels"] != IGNORE_INDEX).sum() > 0
    dropped = sft_dataset(data_cfg(tmp_path, [path], overlong="drop"), tok, "train", seq_len=24)
    assert dropped.counts["dropped"] == 2 and len(dropped.kept) == 2
    with pytest.raises(ValueError, match="data.overlong='cut'"):
        sft_dataset(data_cfg(tmp_path, [path], overlong="cut"), tok, "train", seq_len=24)
    with pytest.raises(ValueError, match="data.packing='concat': SFT allows pack, pad"):
        sft_dataset(data_cfg(tmp_path, [path], packing="concat"), tok, "train", seq_len=24)


def test_loader_is_dp_independent_and_resumes(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [chat(i) for i in range(60)])
    cfg = data_cfg(tmp_path, [path])
    one = sft_train_loader(cfg, tok, 48, global_batch=4, micro_batch=2, dp_rank=0, dp_size=1, seed=3)
    whole = [torch.cat([mb["input_ids"] for mb in one.next_step()]) for _ in range(3)]
    ranks = [sft_train_loader(cfg, tok, 48, 4, 1, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    state = None
    for step in range(3):
        if step == 1:  # resume rank loaders from a dp=1 state: same continuation
            state = one.state_dict() if state is None else state
            ranks = [sft_train_loader(cfg, tok, 48, 4, 1, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
            for loader in ranks:
                loader.load_state_dict({**state, "next_sample": 4})
        parts = [torch.cat([mb["input_ids"] for mb in loader.next_step()]) for loader in ranks]
        assert torch.equal(torch.cat(parts), whole[step])


def test_cache_is_reused_and_nothing_half_written(tok, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", [chat(i) for i in range(10)])
    cfg = data_cfg(tmp_path, [path])
    first = sft_dataset(cfg, tok, "train", 32)
    monkeypatch.setattr(sft_module, "tokenize_record", lambda *a: pytest.fail("cache not reused"))
    assert sft_dataset(cfg, tok, "train", 32).fingerprint == first.fingerprint
    monkeypatch.undo()
    write_jsonl(tmp_path / "bad.jsonl", [chat(1), chat(2), '{"messages": [{"role": "robot"}]}'])
    before = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    with pytest.raises(BadRecord, match=r"bad.jsonl line 3: messages\[0\] has role 'robot'; allowed system"):
        sft_dataset(data_cfg(tmp_path, [tmp_path / "bad.jsonl"]), tok, "train", 32)
    after = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert after == before and not list((tmp_path / "cache").glob(".*.tmp"))


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', r"data file .*bad.jsonl line 3: not valid JSON: Expecting"),
    ('{"messages": "hello"}', r"bad.jsonl line 3: 'messages' must be a non-empty list of messages, got str"),
    ('{"messages": [{"role": "user", "content": 5}]}', r"bad.jsonl line 3: messages\[0\] \(user\) content is int"),
    ('{"question": "x"}', r"bad.jsonl line 3: no 'messages', 'prompt'\+'completion' or 'text' field"),
    ('[1, 2]', r"bad.jsonl line 3: a record must be a JSON object, got list"),
])
@pytest.mark.parametrize("streaming", [False, True])
def test_bad_records_name_file_and_line(tok, tmp_path, line, message, streaming):
    path = write_jsonl(tmp_path / "bad.jsonl", [chat(0), "", line, chat(1)])  # line 2 is blank
    with pytest.raises(BadRecord, match=message):
        list(RecordReader([path], streaming=streaming))
    reader = RecordReader([path], on_bad_record="skip", streaming=streaming)
    assert [r.answer for _, r in reader] == ["0", "2"]
    assert reader.stats.counts == {"records": 2, "bad records skipped": 1}


def test_skipped_counted_empty_refused(tok, tmp_path):
    no_answer = {"messages": [{"role": "user", "content": "anyone?"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [chat(0), no_answer, {"prompt": "1+1=", "completion": "2"}])
    ds = sft_dataset(data_cfg(tmp_path, [path]), tok, "train", 32)
    assert ds.examples.counts == {"records": 3, "no assistant turn (skipped)": 1}
    write_jsonl(tmp_path / "none.jsonl", [no_answer])
    with pytest.raises(EmptySourceError, match="no SFT examples in 1 data files.*1 without an assistant"):
        sft_dataset(data_cfg(tmp_path, [tmp_path / "none.jsonl"]), tok, "train", 32)
    with pytest.raises(ValueError, match="data.paths=\\[\\]"):
        sft_dataset(data_cfg(tmp_path, []), tok, "train", 32)
    with pytest.raises(ValueError, match="data.format='chatml'"):
        sft_dataset(data_cfg(tmp_path, [path], format="chatml"), tok, "train", 32)


def test_parquet_saved_dataset_streaming_and_fields(tok, tmp_path):
    import datasets

    rows = [{"conv": chat(i)["messages"], "ref": str(i)} for i in range(6)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    fields = {"messages_field": "conv", "answer_field": "ref"}
    got = {}
    for name, streaming in (("c.parquet", False), ("c.parquet", True), ("saved", False)):
        reader_cfg = data_cfg(tmp_path, [tmp_path / name], streaming=streaming, **fields)
        got[(name, streaming)] = [(p, a) for p, a in answer_prompts(reader_cfg, tok, limit=10,
                                                                    paths=[str(tmp_path / name)])]
    assert len(got[("c.parquet", False)]) == 6 and len(set(map(str, got.values()))) == 1
    bad = [{"conv": [{"role": "user", "content": "x"}, {"role": "narrator", "content": "y"}], "ref": "1"}]
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(BadRecord, match=r"bad.parquet row 1: conv\[1\] has role 'narrator'"):
        list(RecordReader([tmp_path / "bad.parquet"], fields=Fields(messages="conv")))


def test_heldout_split_and_answers(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [chat(i) for i in range(100)])
    cfg = data_cfg(tmp_path, [path], heldout_percent=20)
    train = sft_dataset(cfg, tok, "train", 32)
    held = sft_dataset(cfg, tok, "heldout", 32)
    assert len(train.examples) + len(held.examples) == 100 and 5 <= len(held.examples) <= 40
    answers = answer_prompts(cfg, tok, limit=1000)
    assert len(answers) == len(held.examples)
    prompt, answer = answers[0]
    assert tok.decode(prompt).endswith("<｜Assistant｜>") and answer.isdigit()
    loader = PackedLoader(held, 2, 2, shuffle=False)
    assert loader.next_step()[0]["input_ids"].shape == (2, 32)
