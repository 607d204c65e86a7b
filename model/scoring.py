"""Log-likelihood of given tokens: what evaluation (perplexity, lm-evaluation-harness) reads off one
forward. Works on the last block's output, so a pipeline's last stage can call it."""

from __future__ import annotations

import torch


def token_logprobs(model: torch.nn.Module, h: torch.Tensor, tokens: torch.Tensor,
                   valid: torch.Tensor) -> list[tuple[list[float], list[bool]]]:
    """h [B, T, H] (last block's output), tokens [B, T], valid [B, T] (left-padded rows) -> per row,
    for each of its tokens after the first: log p(token | the tokens before it) and whether it is
    the main head's argmax there."""
    logp = torch.log_softmax(model.head(h[:, :-1]).float(), dim=-1)                 # [B, T-1, V]
    target = tokens[:, 1:]                                                          # [B, T-1]
    picked = logp.gather(-1, target[..., None]).squeeze(-1)                         # [B, T-1]
    greedy = logp.argmax(-1) == target                                              # [B, T-1]
    out = []
    for row, n in enumerate(valid.sum(1).tolist()):
        keep = slice(valid.shape[1] - n, None)  # a row's n tokens sit at the right end: n - 1 targets
        out.append((picked[row, keep].tolist(), greedy[row, keep].tolist()))
    return out
