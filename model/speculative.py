"""Greedy speculative decoding with the MTP layer as the drafter (DeepSeek-V3 section 5.4.3).

Each step feeds the main model two tokens per sequence: x (the last accepted token) and d (the MTP
draft for the token after x). The main model's argmax after x is always kept; if it equals d, the
draft is accepted and the argmax after d is kept too (two tokens for one forward). A rejected draft's
cache slot is marked invalid for that sequence only, so sequences accept independently in one batch.
The MTP layer then runs on the new positions (main hidden state + embedding of the next token) and
drafts the next d. The output equals plain greedy decoding; only the number of forwards changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .generation import pad_prompts
from .kv_cache import LatentKVCache


@dataclass
class SpeculativeResult:
    tokens: list[list[int]]   # new tokens per prompt (eos included when reached)
    drafted: int              # drafts checked (one per running sequence per step)
    accepted: int             # drafts the main model agreed with
    forwards: int             # main-model forwards, prefill included

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def _mtp_draft(model, h: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor,
               cache: LatentKVCache) -> torch.Tensor:
    """MTP depth 1 on the open cache step: h [B, T, H], next_tokens [B, T] -> draft ids [B, T]."""
    h_mtp = model.mtp[0](h, model.embed(next_tokens), positions, cache)
    return model.mtp_head(1, h_mtp).argmax(-1)


@torch.no_grad()
def speculative_generate(model, prompts: list[list[int]], max_new_tokens: int,
                         eos_id: int | None = None) -> SpeculativeResult:
    """Greedy decoding of left-padded prompts with MTP drafts; see the module docstring."""
    if not len(model.mtp):
        raise ValueError("speculative decoding needs an MTP layer (num_nextn_predict_layers >= 1)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    device = model.embed_tokens.weight.device
    tokens, valid = pad_prompts(prompts, "left")
    tokens, valid = tokens.to(device), valid.to(device)
    B, P = tokens.shape
    cache = LatentKVCache.for_model(model, B, P + 2 * max_new_tokens)
    out: list[list[int]] = [[] for _ in range(B)]

    # Prefill: the main model over the prompt, then MTP over it (next token of the last one = x).
    positions = cache.begin(P, valid)
    h = model.hidden(tokens, positions, cache)                                      # [B, P, H]
    x = model.head(h[:, -1]).argmax(-1)                                             # [B]
    draft = _mtp_draft(model, h, torch.cat([tokens[:, 1:], x[:, None]], 1), positions, cache)[:, -1]
    cache.commit()
    running = torch.ones(B, dtype=torch.bool, device=device)
    drafted = accepted = 0
    forwards = 1

    def emit(b_mask: torch.Tensor, ids: torch.Tensor) -> None:
        for b in b_mask.nonzero().flatten().tolist():
            if len(out[b]) < max_new_tokens:
                out[b].append(int(ids[b]))
                if (eos_id is not None and out[b][-1] == eos_id) or len(out[b]) == max_new_tokens:
                    running[b] = False

    emit(running.clone(), x)
    while bool(running.any()):
        step_tokens = torch.stack([x, draft], 1)                                    # [B, 2]
        step_valid = running[:, None].expand(B, 2)
        start = cache.length
        positions = cache.begin(2, step_valid)
        h = model.hidden(step_tokens, positions, cache)                             # [B, 2, H]
        y = model.head(h).argmax(-1)                                                # [B, 2]
        forwards += 1
        ok = (y[:, 0] == draft) & running                                           # [B]
        drafted += int(running.sum())
        accepted += int(ok.sum())
        # next token after each slot: y[:, 0] after x; y[:, 1] after the draft (if accepted)
        next_draft = _mtp_draft(model, h, y, positions, cache)                      # [B, 2]
        reject = running & ~ok
        cache.valid[reject, start + 1] = False                                      # drop the draft slot
        cache.commit()
        was_running = running.clone()
        emit(was_running, y[:, 0])
        emit(ok & running, y[:, 1])
        x = torch.where(ok, y[:, 1], y[:, 0])
        draft = torch.where(ok, next_draft[:, 1], next_draft[:, 0])
    return SpeculativeResult(out, drafted, accepted, forwards)
