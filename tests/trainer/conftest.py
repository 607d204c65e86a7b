"""Trainer test fixtures: a small BPE and a token cache shared by the session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A 512-token BPE trained on 200 KB of the embedded corpus, and the cache folder its packed
    corpus is written to (once per session)."""
    from twinpipe.data.tokenizer import corpus_sample, train_bpe

    d = tmp_path_factory.mktemp("trainer-data")
    train_bpe(corpus_sample(200_000), 512).save(d / "tok")
    return d
