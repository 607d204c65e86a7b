"""Batched cached generation == full recomputation, per-sequence padding and eos, sampling, and
continuous batching (`slots`) == the whole batch at once == each prompt alone.

Tokens are compared exactly although batch shapes differ (one row vs eight, another cache length under
the mask): that moves logits by fp32 rounding (~1e-6) while the top two logits of these models are
~1e-2 apart, so a flip would be a bug, not rounding."""

import pytest
import torch

from twinpipe.model import ModelConfig, Transformer, generate
from twinpipe.model.generation import sample_next

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny")).eval()


def recompute_greedy(model, prompt, n, eos_id=None):
    """No cache: run the whole sequence again for every new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            if seq[-1] == eos_id:
                break
    return seq[len(prompt):]


@pytest.mark.parametrize("padding_side, absorb", [("left", True), ("right", True), ("left", False),
                                                  ("right", None)])
def test_cached_generation_equals_recomputation(model, padding_side, absorb):
    expected = [recompute_greedy(model, p, 6) for p in PROMPTS]
    assert generate(model, PROMPTS, 6, padding_side=padding_side, absorb=absorb) == expected


def test_cached_logits_match_full_forward(model):
    from twinpipe.model import LatentKVCache
    tokens = torch.randint(0, 4096, (2, 9))
    cache = LatentKVCache.for_model(model, 2, 9)
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, t:t + 1], cache=cache) for t in range(5, 9)]
    # fp32, absorbed vs expanded attention: summation order only (see test_attention.TOL)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_eos_stops_one_sequence_only(model):
    free = generate(model, PROMPTS, 6)
    eos = free[1][2]
    out = generate(model, PROMPTS, 6, eos_id=eos)
    assert out[1] == free[1][:3]
    for got, ref, prompt in zip(out, free, PROMPTS):
        assert got == recompute_greedy(model, prompt, 6, eos_id=eos)
        assert got == (ref[: ref.index(eos) + 1] if eos in ref else ref)


def test_sampling_is_seeded_and_top_p_narrows():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", initializer_range=0.05)).eval()
    a = generate(model, PROMPTS, 5, temperature=1.0, seed=3)
    assert a == generate(model, PROMPTS, 5, temperature=1.0, seed=3)
    assert a != generate(model, PROMPTS, 5, temperature=1.0, seed=4)
    # top_p so small that only the best token survives: sampling becomes greedy
    assert generate(model, PROMPTS, 5, temperature=1.0, top_p=1e-6, seed=3) == generate(model, PROMPTS, 5)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    picks = sample_next(logits.expand(4000, 4), 1.0, 0.75, torch.arange(4000), step=0)
    assert set(picks.tolist()) == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3: tokens 2 and 3 are cut
    # the kept mass 0.8 is drawn from in proportion: token 0 with 0.5 / 0.8 (binomial sd 0.008)
    assert abs(float((picks == 0).double().mean()) - 0.625) < 0.035


MANY = PROMPTS + [[16] * 7, [17, 18, 19, 20], [21], [3, 4, 5, 6, 7, 8, 9, 10, 11], [22, 23]]


def test_continuous_batching_equals_whole_batch_and_alone(model):
    """Rows freed at eos take the next waiting prompt (slots < prompts); the outputs are those of the
    whole batch, which are those of each prompt alone. The eos is one prompt 1 emits third, so rows
    end at different steps and refills happen mid-run."""
    free = generate(model, MANY, 7)
    eos = free[1][2]
    want = generate(model, MANY, 7, eos_id=eos)
    assert len({len(t) for t in want}) > 1
    assert want == [generate(model, [p], 7, eos_id=eos)[0] for p in MANY]
    for slots in (1, 3, 8, 20):
        assert generate(model, MANY, 7, eos_id=eos, slots=slots) == want
    assert generate(model, MANY, 7, slots=3) == free  # no eos: rows end by count


def test_continuous_sampling_does_not_depend_on_slots():
    """A prompt's k-th token draws the noise (seed, prompt index, k) in whatever row it decodes:
    tokens equal; logprobs within fp32 rounding of logits on other batch shapes (1e-5 on values ~1)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", initializer_range=0.05)).eval()
    kwargs = dict(temperature=1.0, top_p=0.9, seed=5, logprobs=True)
    eos = generate(model, MANY, 7)[1][2]
    want, want_lp = generate(model, MANY, 7, eos_id=eos, **kwargs)
    assert want != generate(model, MANY, 7, eos_id=eos)
    for slots in (2, 5):
        got, got_lp = generate(model, MANY, 7, eos_id=eos, slots=slots, **kwargs)
        assert got == want
        torch.testing.assert_close(torch.tensor(sum(got_lp, [])), torch.tensor(sum(want_lp, [])), rtol=0, atol=1e-5)


def test_latent_cache_bytes_per_token_at_the_671b_shape():
    """(kv_lora_rank 512 + rope 64) values x 61 main layers x 2 bytes: what the allocated BF16 cache
    holds per token, and what bench/generate.py and the README report."""
    from twinpipe.model import LatentKVCache
    cfg = ModelConfig.preset("v3_671b")
    cache = LatentKVCache(cfg, 1, 1, torch.bfloat16, layers=range(cfg.num_hidden_layers))
    assert cache.latent.nbytes == LatentKVCache.bytes_per_token(cfg, bytes_per_value=2) == 70_272


def test_argument_errors(model):
    with pytest.raises(ValueError, match="padding_side='middle'"):
        generate(model, PROMPTS, 2, padding_side="middle")
    with pytest.raises(ValueError, match="every prompt needs >= 1 token"):
        generate(model, [[1], []], 2)
    with pytest.raises(ValueError, match="top_p=0"):
        generate(model, PROMPTS, 2, top_p=0)
    with pytest.raises(ValueError, match="slots=0"):
        generate(model, PROMPTS, 2, slots=0)
