"""A tokenizer that fits model.vocab_size but is not the checkpoint's is refused on resume and on
init_from, in one line naming both (data.accept_tokenizer=true goes on with a warning: on resume the
packed loader's own position check then stops it, the data being tokenized otherwise); the same
tokenizer resumes as before. The checkpoint's meta.json records the fingerprint of the tokenizer saved
beside it; a folder without one (an HF folder, an older checkpoint) is fingerprinted from its files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from trainer_recipe import make_cfg


@pytest.fixture(scope="module")
def texts(data_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A 100 KB text file (source=files: a second tokenizer tokenizes it in a moment) and a 500-token
    BPE of another sample: it fits model.vocab_size=512 but is not the run's."""
    from twinpipe.data.tokenizer import corpus_sample, train_bpe

    d = tmp_path_factory.mktemp("tokenizer-match")
    (d / "corpus.txt").write_text("\n".join(corpus_sample(100_000)))
    train_bpe(corpus_sample(60_000), 500).save(d / "other")
    return d / "corpus.txt", d / "other"


def _cfg(data_dir, run, corpus, *overrides):
    return make_cfg(data_dir, run, "data.source=files", f"data.paths=[{corpus}]", "logging.plots=false",
                    *overrides)


def test_resume_with_another_tokenizer_stops_in_one_line(data_dir, texts, tmp_path, caplog):
    from twinpipe.data.tokenizer import load_tokenizer
    from twinpipe.trainer.checkpoint import tokenizer_match
    from twinpipe.trainer.loop import train

    corpus, other = texts
    run = tmp_path / "run"
    train(_cfg(data_dir, run, corpus, "train.steps=2", "checkpoint.every=2"))
    ckpt = run / "checkpoints" / "step_2"
    saved = json.loads((ckpt / "meta.json").read_text())[tokenizer_match.KEY]
    assert saved == tokenizer_match.fingerprint(load_tokenizer(ckpt)) == \
        tokenizer_match.fingerprint(load_tokenizer(data_dir / "tok"))
    assert load_tokenizer(other).vocab_size <= 512  # fits: the size check alone would let it through

    with pytest.raises(ValueError) as refused:
        train(_cfg(data_dir, run, corpus, "train.steps=3", f"data.tokenizer={other}"))
    said = str(refused.value)
    assert "\n" not in said and said.startswith(f"resume={ckpt} was trained with the tokenizer in {ckpt}")
    assert f"data.tokenizer={other} is another one" in said and "data.accept_tokenizer=true" in said
    assert saved[:12] in said and tokenizer_match.fingerprint(load_tokenizer(other))[:12] in said

    # accepted, the tokenizer passes, but the packed data it makes is not the saved loader position's
    with caplog.at_level(logging.WARNING, logger="twinpipe.trainer.checkpoint.tokenizer_match"):
        with pytest.raises(ValueError, match="data loader state"):
            train(_cfg(data_dir, run, corpus, "train.steps=3", f"data.tokenizer={other}",
                       "data.accept_tokenizer=true"))
    assert "going on (data.accept_tokenizer=true)" in caplog.text
    assert train(_cfg(data_dir, run, corpus, "train.steps=3"))["step"] == 3  # its own tokenizer resumes


def test_init_from_and_a_folder_without_the_record(data_dir, texts, tmp_path):
    from twinpipe.data.tokenizer import load_tokenizer
    from twinpipe.trainer.checkpoint import tokenizer_match

    _, other = texts
    mine, theirs = load_tokenizer(data_dir / "tok"), load_tokenizer(other)
    # an HF-style folder: tokenizer files, no meta.json -> fingerprinted from the files
    hf = tmp_path / "hf"
    mine.save(hf)
    (hf / "config.json").write_text("{}")
    assert tokenizer_match.saved_fingerprint(hf) == tokenizer_match.fingerprint(mine)
    tokenizer_match.check("init_from", str(hf), mine, str(data_dir / "tok"), accept=False)  # the same: fine
    with pytest.raises(ValueError, match=rf"^init_from={hf} was trained with the tokenizer in {hf} .*"
                                         rf"data.tokenizer={other} is another one"):
        tokenizer_match.check("init_from", str(hf), theirs, str(other), accept=False)
    tokenizer_match.check("init_from", str(hf), theirs, str(other), accept=True)  # warns, goes on
    # the chat template is not part of it: SFT sets its own on a pretraining checkpoint's tokenizer
    mine.chat_template = "{{ messages }}"
    assert tokenizer_match.fingerprint(mine) == tokenizer_match.saved_fingerprint(hf)
