"""YaRN frequencies and temperatures against a hand computation; rotary pairing."""

import math

import torch

from twinpipe.model import ModelConfig
from twinpipe.model.rope import apply_rope, rope_params


def test_plain_rope_frequencies():
    cfg = ModelConfig.preset("tiny")  # qk_rope_head_dim 16, theta 1e4
    p = rope_params(cfg)
    expected = torch.tensor([1.0 / 10000 ** (2 * i / 16) for i in range(8)])
    torch.testing.assert_close(p.inv_freq, expected, rtol=1e-6, atol=0)
    assert p.attention_factor == 1.0 and p.softmax_mscale == 1.0


def test_yarn_frequencies_by_hand():
    # dim 16, base 1e4, factor 40, original 4096, beta_fast 32, beta_slow 1, mscale 0.5 / all_dim 1.
    rs = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
          "beta_slow": 1, "mscale": 0.5, "mscale_all_dim": 1.0}
    cfg = ModelConfig.preset("tiny", rope_scaling=rs)
    p = rope_params(cfg)
    # correction dims: d(r) = 16 * ln(4096 / (2 pi r)) / (2 ln 1e4)
    # d(32) = 16 * ln(20.37) / 18.42 = 2.618 -> floor 2 ; d(1) = 16 * ln(651.9) / 18.42 = 5.628 -> ceil 6
    low, high = 2, 6
    assert math.floor(16 * math.log(4096 / (2 * math.pi * 32)) / (2 * math.log(1e4))) == low
    assert math.ceil(16 * math.log(4096 / (2 * math.pi * 1)) / (2 * math.log(1e4))) == high
    expected = []
    for i in range(8):
        base_freq = 1.0 / 10000 ** (2 * i / 16)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0 -> keep, 1 -> divide by factor
        expected.append(base_freq * (1 - ramp) + base_freq / 40 * ramp)
    # i <= 2 keep the original frequency, i >= 6 are interpolated by 1/40, i = 3..5 blend.
    torch.testing.assert_close(p.inv_freq, torch.tensor(expected), rtol=1e-6, atol=0)
    m = lambda s, ms: 0.1 * ms * math.log(s) + 1  # noqa: E731
    assert math.isclose(p.attention_factor, m(40, 0.5) / m(40, 1.0), rel_tol=1e-12)
    assert math.isclose(p.softmax_mscale, m(40, 1.0) ** 2, rel_tol=1e-12)


def test_rope_rotates_pairs_and_preserves_norm():
    x = torch.randn(1, 3, 2, 8)
    angle = torch.tensor([0.3, 1.1, -0.7, 2.0])
    pos = torch.tensor([[0.0, 1.0, 5.0]])
    freqs = pos[..., None] * angle                                    # [1, 3, 4]
    out = apply_rope(x, freqs.cos(), freqs.sin(), interleave=True)
    # pair i = (x[2i], x[2i+1]) rotated by pos * angle[i]; output layout [firsts, seconds]
    for t in range(3):
        for i in range(4):
            a, b = x[0, t, :, 2 * i], x[0, t, :, 2 * i + 1]
            c, s = math.cos(freqs[0, t, i]), math.sin(freqs[0, t, i])
            torch.testing.assert_close(out[0, t, :, i], a * c - b * s)
            torch.testing.assert_close(out[0, t, :, 4 + i], b * c + a * s)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    halves = apply_rope(x, freqs.cos(), freqs.sin(), interleave=False)
    torch.testing.assert_close(halves[..., 0], x[..., 0] * freqs.cos()[..., 0, None]
                               - x[..., 4] * freqs.sin()[..., 0, None])
