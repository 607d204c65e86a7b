"""MTP speculative decoding: always the greedy output; drafts accepted per sequence."""

import pytest
import torch

from twinpipe.model import ModelConfig, Transformer, generate
from twinpipe.model.speculative import speculative_generate

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]


def markov_model(mtp_noise: float, vocab_size: int = 4096, std: float = 0.006):
    """A model whose next token depends on the current token only (every block's output projection
    is zero, so h = embedding), with an MTP layer that sees just the next token's embedding
    (eh_proj = [I, 0]) plus `mtp_noise`: noise 0 drafts perfectly, more noise drafts worse."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=vocab_size, initializer_range=std)).eval()
    H = model.config.hidden_size
    with torch.no_grad():
        for block in list(model.layers) + [model.mtp[0].block]:
            block.self_attn.o_proj.weight.zero_()
            if hasattr(block.mlp, "experts"):
                block.mlp.experts.down_proj.zero_()
                block.mlp.shared_experts.down_proj.weight.zero_()
            else:
                block.mlp.down_proj.weight.zero_()
        eh = model.mtp[0].eh_proj.weight
        eh.zero_()
        eh[:, :H].copy_(torch.eye(H))
        eh.add_(torch.randn(H, 2 * H, generator=torch.Generator().manual_seed(1)) * mtp_noise)
    return model


def test_random_model_matches_greedy():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    result = speculative_generate(model, PROMPTS, 8)
    assert result.tokens == generate(model, PROMPTS, 8)
    assert result.forwards == 8  # nothing accepted: one token per forward


@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_drafts_accepted_and_output_unchanged(noise):
    model = markov_model(noise)
    result = speculative_generate(model, PROMPTS, 12)
    assert result.tokens == generate(model, PROMPTS, 12)
    if noise == 0:
        assert result.acceptance_rate == 1.0 and result.forwards == 7  # prefill + 6 steps of 2 tokens
    else:  # sequences accept or reject independently in one batch
        assert 0 < result.acceptance_rate < 1 and 7 < result.forwards < 12


def test_eos_and_errors():
    model = markov_model(0.0)
    free = generate(model, PROMPTS, 10)
    eos = free[0][3]
    assert speculative_generate(model, PROMPTS, 10, eos_id=eos).tokens == generate(model, PROMPTS, 10, eos_id=eos)
    no_mtp = Transformer(ModelConfig.preset("tiny", num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="needs an MTP layer"):
        speculative_generate(no_mtp, PROMPTS, 4)


def test_sampled_tokens_follow_the_main_model():
    """With temperature > 0 the first two new tokens must be distributed as the main model says,
    p(x | prompt) p(y | prompt, x), whether the draft for y is accepted or replaced from the residual."""
    from twinpipe.model.generation import sampling_probs

    V, T, N = 16, 1.0, 4000
    model = markov_model(0.05, vocab_size=V, std=0.2)
    prompt = [3, 7, 1]
    with torch.no_grad():
        p1 = sampling_probs(model(torch.tensor([prompt]))[0, -1], T, 1.0)
        p2 = sampling_probs(model(torch.tensor([prompt + [x] for x in range(V)]))[:, -1], T, 1.0)
        h = model.hidden(torch.tensor([prompt] * V))
        q = sampling_probs(model.mtp_head(1, model.mtp[0](h, model.embed(
            torch.tensor([prompt[1:] + [x] for x in range(V)]))))[:, -1], T, 1.0)   # draft after x
    exact = p1[:, None] * p2                                                     # [x, y]
    # Sampling noise of the empirical joint over 256 cells at N = 4000: E[TV] ~ 0.045 (computed
    # sum 0.5 * sqrt(2 p (1 - p) / (pi N))); a sampler that kept every draft would sit at
    # TV(p1 q, exact) > 0.3. 0.08 separates the two by far.
    assert 0.5 * (p1[:, None] * q - exact).abs().sum() > 0.3
    result = speculative_generate(model, [prompt] * N, 2, temperature=T, seed=5)
    assert 0.2 < result.acceptance_rate < 0.6  # both the accept and the residual path are exercised
    counts = torch.zeros(V, V)
    for x, y in result.tokens:
        counts[x, y] += 1
    assert 0.5 * (counts / N - exact).abs().sum() < 0.08


def test_logprobs_are_the_main_models():
    """`logprobs=True` gives each new token's log-probability under the main model at the sampling
    temperature, accepted draft or not: the full forward's over prompt + new tokens, within fp32
    rounding of the latent-cache decode (1e-5, the bound GRPO's logprob_diff_max is held to)."""
    from twinpipe.model.generation import chosen_logprobs

    model = markov_model(0.05, vocab_size=16, std=0.2)
    result = speculative_generate(model, PROMPTS, 6, temperature=0.7, seed=3, logprobs=True)
    assert 0 < result.acceptance_rate < 1
    for prompt, new, logps in zip(PROMPTS, result.tokens, result.logprobs):
        assert len(logps) == len(new) == 6
        with torch.no_grad():
            logits = model(torch.tensor([prompt + new]))[0, len(prompt) - 1: -1]  # [6, V]
        torch.testing.assert_close(torch.tensor(logps), chosen_logprobs(logits, torch.tensor(new), 0.7),
                                   rtol=0, atol=1e-5)


def test_sampled_tokens_do_not_depend_on_the_batch():
    """The noise is keyed by (seed, row, draw): each prompt decoded alone with its row index gets the
    tokens it got in the batch (the batch's padding moves logits by ulps only)."""
    model = markov_model(0.05, vocab_size=16, std=0.2)
    batch = speculative_generate(model, PROMPTS, 8, temperature=1.0, seed=11).tokens
    alone = [speculative_generate(model, [p], 8, temperature=1.0, seed=11, rows=[i]).tokens[0]
             for i, p in enumerate(PROMPTS)]
    assert alone == batch
    assert speculative_generate(model, PROMPTS, 8, temperature=1.0, seed=12).tokens != batch
