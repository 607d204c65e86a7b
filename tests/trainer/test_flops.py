"""Model FLOPs per token, pinned against a published figure (docs/reference.md §7)."""

import pytest

from twinpipe.model.config import ModelConfig
from twinpipe.trainer.flops import active_matmul_params, flops_per_token


def test_v3_flops_per_token_matches_megatron_figure():
    # Megatron-Core: ~368 TFLOPS/GPU at ~1412 tokens/s/GPU on DeepSeek-V3 (4K sequences)
    assert flops_per_token(ModelConfig.preset("v3_671b"), 4096) == pytest.approx(368e12 / 1412, rel=0.02)


def test_activated_parameters_are_about_37b():
    c = ModelConfig.preset("v3_671b")
    layers = c.num_hidden_layers  # the report's 37B activated excludes the MTP module
    active = sum(active_matmul_params(c, i) for i in range(layers)) + 2 * c.vocab_size * c.hidden_size
    assert active == pytest.approx(37e9, rel=0.03)
