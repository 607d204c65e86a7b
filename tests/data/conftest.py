"""Fixtures for the data tests: one small BPE (vocab 512, trained on 300 kB in ~0.2 s) per session."""

import pytest

from twinpipe.data.tokenizer import default_tokenizer

SMALL_VOCAB = 512


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer-cache")


@pytest.fixture(scope="session")
def small_tokenizer(tokenizer_cache):
    return default_tokenizer(SMALL_VOCAB, tokenizer_cache, sample_bytes=300_000)
