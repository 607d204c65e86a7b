"""Batched autoregressive generation with the latent KV cache (greedy or temperature / top-p sampling).

Prompts of different lengths share one batch: they are padded on the left or the right, padded slots
are masked in the cache and do not count as positions, so each sequence sees exactly what it would
see alone. A sequence stops at `eos_id` (kept in its output) or after `max_new_tokens`.
"""

from __future__ import annotations

import torch

from .kv_cache import LatentKVCache


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits [..., V] -> the distribution sampled from: softmax(logits / temperature), cut to the
    smallest set of top tokens whose mass reaches top_p (not renormalized; multinomial does that)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)                     # [..., V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs                             # mass ranked above
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)               # keeps the top token
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]: argmax when temperature == 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_p)                              # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def pad_prompts(prompts: list[list[int]], padding_side: str, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> tokens [B, P] and valid [B, P] bool, each prompt placed on the given side."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}: allowed 'left' or 'right'")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs >= 1 token")
    P = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), P, dtype=torch.bool)
    for b, p in enumerate(prompts):
        cols = slice(P - len(p), P) if padding_side == "left" else slice(0, len(p))
        tokens[b, cols] = torch.tensor(p, dtype=torch.long)
        valid[b, cols] = True
    return tokens, valid


def last_valid_index(valid: torch.Tensor) -> torch.Tensor:
    """valid [B, T] -> index of each row's last True [B]."""
    T = valid.shape[1]
    return T - 1 - valid.flip(1).long().argmax(dim=1)


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | None = None, seed: int = 0, padding_side: str = "left",
             absorb: bool | None = None) -> list[list[int]]:
    """Continue each prompt; returns the new tokens per prompt (eos included when reached).

    `absorb` forces MLA's absorbed (latent) attention (True) or the naive form (False) over the same
    cache; None picks the cheaper per step (see `LatentKVCache`).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    device = model.embed_tokens.weight.device
    tokens, valid = pad_prompts(prompts, padding_side)
    tokens, valid = tokens.to(device), valid.to(device)
    B = tokens.shape[0]
    generator = torch.Generator(device=device).manual_seed(seed)
    outputs: list[list[int]] = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return outputs
    cache = LatentKVCache.for_model(model, B, tokens.shape[1] + max_new_tokens, absorb=absorb)
    logits = model(tokens, cache=cache, valid=valid)                                # [B, P, V]
    last = logits[torch.arange(B, device=device), last_valid_index(valid)]          # [B, V]
    running = torch.ones(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt = sample_next(last, temperature, top_p, generator)                      # [B]
        for b in running.nonzero().flatten().tolist():
            outputs[b].append(int(nxt[b]))
        if eos_id is not None:
            running &= nxt != eos_id
        if step == max_new_tokens - 1 or not bool(running.any()):
            break
        last = model(nxt[:, None], cache=cache, valid=running[:, None])[:, -1]      # [B, V]
    return outputs
