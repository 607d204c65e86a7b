"""Speculative decoding with the MTP layer as the drafter (DeepSeek-V3 section 5.4.3).

Each step feeds the main model two tokens per sequence: x (the last emitted token) and d (the MTP
draft for the token after x). Greedy: the main model's argmax after x is emitted; if it equals d, the
draft is accepted and the argmax after d is emitted too (two tokens for one forward). Sampling
(temperature > 0): d is accepted with probability min(1, p(d) / q(d)) (p: main model, q: MTP, both
with the same temperature and top-p); on rejection the token comes from norm(max(p - q, 0)), so every
emitted token follows the main model's distribution exactly (Leviathan et al. 2023). The noise of
every draw is keyed by (seed, the prompt's row, the draw's index) as in `generation.py`, so a prompt
gets the same tokens in any batch or data-parallel rank.

A rejected draft's cache slot is marked invalid for that sequence only, so sequences accept
independently in one batch. The MTP layer then runs on the new positions (main hidden state +
embedding of the next token) and drafts the next d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .generation import chosen_logprobs, keyed_uniform, pad_prompts, sampling_keys, sampling_probs
from .kv_cache import LatentKVCache


@dataclass
class SpeculativeResult:
    tokens: list[list[int]]   # new tokens per prompt (eos included when reached)
    drafted: int              # drafts checked (one per running sequence per step)
    accepted: int             # drafts the main model accepted
    forwards: int             # main-model forwards, prefill included
    logprobs: list[list[float]] | None = None  # per new token its `chosen_logprobs` under the main model

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class _Sampler:
    """Token choice from logits: argmax (temperature 0) or draws from sampling_probs. The noise of draw
    n is `keyed_uniform(keys, n)`: a function of (seed, the prompt's row, n) only, and every step makes
    the same draws whatever the batch holds, so a prompt gets the same tokens in any batch or
    data-parallel rank (as with `generation.generate`)."""

    def __init__(self, temperature: float, top_p: float, keys: torch.Tensor):
        self.greedy = temperature <= 0
        self.temperature, self.top_p, self.keys = temperature, top_p, keys       # keys [B] int64
        self.draws = 0

    def _noise(self, size: int) -> torch.Tensor:
        """Fresh uniforms [B, size] float64 in (0, 1)."""
        self.draws += 1
        return keyed_uniform(self.keys, self.draws - 1, size)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] -> normalized distribution (one-hot at the argmax when greedy)."""
        if self.greedy:
            return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = sampling_probs(logits, self.temperature, self.top_p)
        return probs / probs.sum(-1, keepdim=True)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [B, V] -> ids [B] (exponential race: v with probability p_v / sum p)."""
        if self.greedy:
            return probs.argmax(-1)
        return (probs.double() / -torch.log(self._noise(probs.shape[-1]))).argmax(-1)

    def uniform(self) -> torch.Tensor:
        """[B] float64 in (0, 1)."""
        return self._noise(1)[:, 0]


def _mtp_logits(model, h: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor,
                cache: LatentKVCache) -> torch.Tensor:
    """MTP depth 1 on the open cache step: h [B, T, H], next_tokens [B, T] -> logits [B, T, V]."""
    h_mtp = model.mtp[0](h, model.embed(next_tokens), positions, cache)
    return model.mtp_head(1, h_mtp)


@torch.no_grad()
def speculative_generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                         top_p: float = 1.0, eos_id: int | None = None, seed: int = 0,
                         logprobs: bool = False, rows: list[int] | None = None) -> SpeculativeResult:
    """Decode left-padded prompts with MTP drafts; see the module docstring. `logprobs`: also each new
    token's `chosen_logprobs` from the main model's logits that verified it (an RL rollout's pi_old).
    `rows`: the prompts' indices for the sampling noise (default 0..B-1), as in `generate`."""
    if not len(model.mtp):
        raise ValueError("speculative decoding needs an MTP layer (num_nextn_predict_layers >= 1)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    device = model.embed_tokens.weight.device
    tokens, valid = pad_prompts(prompts, "left")
    rows_t = torch.arange(len(prompts)) if rows is None else torch.tensor(rows, dtype=torch.long)
    sampler = _Sampler(temperature, top_p, sampling_keys(seed, rows_t).to(device))
    tokens, valid = tokens.to(device), valid.to(device)
    B, P = tokens.shape
    idx = torch.arange(B, device=device)
    cache = LatentKVCache.for_model(model, B, P + 2 * max_new_tokens)
    out: list[list[int]] = [[] for _ in range(B)]
    logps: list[list[float]] = [[] for _ in range(B)]
    running = torch.ones(B, dtype=torch.bool, device=device)

    def emit(mask: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor) -> None:
        """Append ids [B] where mask [B]; logits [B, V]: the main model's that chose them."""
        lp = chosen_logprobs(logits, ids, temperature).tolist() if logprobs else None  # [B]
        for b in mask.nonzero().flatten().tolist():
            out[b].append(int(ids[b]))
            if lp is not None:
                logps[b].append(lp[b])
            if (eos_id is not None and out[b][-1] == eos_id) or len(out[b]) == max_new_tokens:
                running[b] = False

    # Prefill: the main model over the prompt, then MTP over it (the next token of the last one is x).
    positions = cache.begin(P, valid)
    h = model.hidden(tokens, positions, cache)                                      # [B, P, H]
    first = model.head(h[:, -1])                                                    # [B, V]
    x = sampler.draw(sampler.probs(first))                                          # [B]
    q = sampler.probs(_mtp_logits(model, h, torch.cat([tokens[:, 1:], x[:, None]], 1), positions,
                                  cache)[:, -1])                                    # [B, V] draft dist
    draft = sampler.draw(q)
    cache.commit()
    drafted = accepted = 0
    forwards = 1
    emit(running.clone(), x, first)
    while bool(running.any()):
        start = cache.length
        positions = cache.begin(2, running[:, None].expand(B, 2))
        h = model.hidden(torch.stack([x, draft], 1), positions, cache)              # [B, 2, H]
        logits = model.head(h)                                                      # [B, 2, V]
        p = sampler.probs(logits)
        forwards += 1
        p_draft, q_draft = p[idx, 0, draft], q[idx, draft]                          # [B]
        ok = running & (sampler.uniform() * q_draft < p_draft)                      # u < p/q
        residual = (p[:, 0] - q).clamp(min=0)                                       # [B, V]
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, 0])
        y0 = torch.where(ok, draft, sampler.draw(residual))                         # token after x
        y1 = sampler.draw(p[:, 1])                                                  # after the draft
        drafted += int(running.sum())
        accepted += int(ok.sum())
        q_next = sampler.probs(_mtp_logits(model, h, torch.stack([y0, y1], 1), positions, cache))
        cache.valid[running & ~ok, start + 1] = False                               # drop rejected drafts
        cache.commit()
        emit(running.clone(), y0, logits[:, 0])
        emit(ok & running, y1, logits[:, 1])
        x = torch.where(ok, y1, y0)
        q = torch.where(ok[:, None], q_next[:, 1], q_next[:, 0])
        draft = sampler.draw(q)
    return SpeculativeResult(out, drafted, accepted, forwards, logps if logprobs else None)
