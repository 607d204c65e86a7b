"""Launch test fixtures: the trainer tests' tiny BPE (tests/trainer/conftest.py) for the runs here."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A 512-token BPE trained on 100 KB of the embedded corpus, and its cache folder."""
    from twinpipe.data.tokenizer import corpus_sample, train_bpe

    d = tmp_path_factory.mktemp("launch-data")
    train_bpe(corpus_sample(100_000), 512).save(d / "tok")
    return d
