"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3.

q = W_qb(RMSNorm(W_qa x)) (or W_q x when q_lora_rank is None); [c_kv, k_pe] = W_kva x;
k_nope, v = W_kvb(RMSNorm(c_kv)); RoPE only on the decoupled q_pe / k_pe (k_pe shared by all heads).

Two forms of the same arithmetic:
- naive (training and reference): expand the latent into per-head keys/values, then attention;
- absorbed (cached decoding): fold W_kvb's key half into the query and its value half into the
  output, so attention runs directly on the cached latent c_kv and k_pe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .norm import RMSNorm
from .rope import RotaryEmbedding, apply_rope

if TYPE_CHECKING:
    from .kv_cache import LatentKVCache

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the default eps


def document_causal_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Block-causal mask [B, 1, T, T] (True = attend) when positions restart inside a row (packed
    documents); None when every row counts up by one, so plain causal attention applies.

    The check costs a host sync: the model computes it once per forward, where position_ids enter
    (`Transformer`, pipeline stages), and hands it to every block."""
    breaks = position_ids[:, 1:] != position_ids[:, :-1] + 1                    # [B, T-1]
    if not bool(breaks.any()):
        return None
    doc = F.pad(breaks.long().cumsum(1), (1, 0))                               # [B, T]
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    same_doc = doc[:, :, None] == doc[:, None, :]                              # [B, T, T]
    return (same_doc & causal).unsqueeze(1)


def prefix_mask(mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The document mask of the first `length` positions (MTP depth k runs on T - k of them):
    [B, 1, T, T] -> [B, 1, length, length]; None (causal) stays None."""
    return None if mask is None else mask[:, :, :length, :length]


class MLA(nn.Module):
    """Multi-head latent attention with a naive and an absorbed (latent-cache) form."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.rope_interleave = config.rope_interleave
        h, nh = config.hidden_size, config.num_attention_heads
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(h, nh * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, nh * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, nh * (self.qk_nope_head_dim + self.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(nh * self.v_head_dim, h, bias=False)
        self.rotary = RotaryEmbedding(config)
        self.softmax_scale = self.qk_head_dim ** -0.5 * self.rotary.softmax_mscale

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(*x.shape[:2], self.num_heads, self.qk_head_dim)           # [B, T, nh, qk_head]

    def project(self, x: torch.Tensor, position_ids: torch.Tensor, cache: "LatentKVCache"):
        """With a cache: x [B, T, H] -> q_nope [B, T, nh, dn], q_pe [B, T, nh, dr], c_kv [B, T, r],
        k_pe [B, T, dr]; cos/sin computed once per step for all layers (`LatentKVCache.rope`)."""
        q = self._query(x)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)                                          # [B, T, r]
        # decoding: the same elementwise rotation, q's heads and k in one call
        cos, sin = cache.rope(self.rotary, position_ids, q.dtype)
        pe = apply_rope(torch.cat([q_pe, k_pe.unsqueeze(2)], dim=2), cos, sin, self.rope_interleave)
        return q_nope, pe[:, :, :-1], c_kv, pe[:, :, -1]                          # [B, T, nh + 1, dr]

    def attend(self, x: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """Without a cache: the query path from x, its RoPE and the attention core over the latents
        c_kv [B, T, r], k_pe [B, T, dr] (after RoPE) -> [B, T, nh, dv]. One method, so recomputing it
        (train.recompute mla_up) keeps x and the latents, not the per-head q."""
        q = self._query(x)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.rope_interleave)                   # [B, T, nh, dr]
        return self.naive(q_nope, q_pe, c_kv, k_pe, mask, causal)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: "LatentKVCache | None" = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]. Without a cache, `mask` [B, 1, T, T] bool is the packed-document
        mask of position_ids (`document_causal_mask`, computed once per model forward); None: causal.
        With a cache, the new latents are stored and attention covers every cached slot under the
        cache's own mask, in the form `cache.absorb` asks for (None: the cheaper, see use_absorbed)."""
        B, T, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device).expand(B, T)
        if cache is None:
            c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
            cos, sin = self.rotary(position_ids, c_kv.dtype)                      # [B, T, dr/2]
            k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.rope_interleave).squeeze(2)  # [B, T, dr]
            out = self.attend(x, self.kv_a_layernorm(c_kv), k_pe, cos, sin, mask, causal=mask is None)
        else:
            q_nope, q_pe, c_kv, k_pe = self.project(x, position_ids, cache)
            latent = cache.update(self.layer_idx, c_kv, k_pe)                     # [B, S, r + dr]
            absorb = self.use_absorbed(T) if cache.absorb is None else cache.absorb
            if absorb:
                out = self.absorbed(q_nope, q_pe, latent, cache.blocked)
            else:
                c_kv, k_pe = latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
                out = self.naive(q_nope, q_pe, c_kv, k_pe, cache.mask, causal=False)
        return self.o_proj(out.reshape(B, T, self.num_heads * self.v_head_dim))

    def use_absorbed(self, num_queries: int) -> bool:
        """Whether the absorbed form needs fewer FLOPs for `num_queries` new tokens over a long cache.

        Per cached key, naive expands the latent once (r * (dn + dv)) and then attends per query over
        dn + dr + dv; absorbed attends per query over 2r + dr but expands nothing, so it wins while
        num_queries * (2r - dn - dv) < r * (dn + dv): decoding, not long prefills (DeepSeek-V3: < 171).
        """
        r, dn, dv = self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim
        return num_queries * (2 * r - dn - dv) < r * (dn + dv)

    def naive(self, q_nope, q_pe, c_kv, k_pe, mask, causal: bool) -> torch.Tensor:
        """Expand the latent into full keys/values; returns [B, T, nh, dv]."""
        B, S, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, S, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)   # [B, S, nh, dn|dv]
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.num_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)                                      # [B, T, nh, qk_head]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=causal,
                                             scale=self.softmax_scale)            # [B, nh, T, dv]
        return out.transpose(1, 2)

    def absorbed(self, q_nope, q_pe, latent, blocked) -> torch.Tensor:
        """Attention on the latent: scores = [q_nope W_k | q_pe] [c_kv | k_pe]^T; out = (p c_kv) W_v^T.

        Every head attends to the same latent row per slot, so the heads (and new tokens) are the rows
        of one matmul per sequence (multi-query form). q_nope [B, T, nh, dn], q_pe [B, T, nh, dr],
        latent [B, S, r + dr], blocked [B, 1, T, S] bool (True = masked); returns [B, T, nh, dv].
        """
        B, T, nh, dn = q_nope.shape
        r = self.kv_lora_rank
        w = self.kv_b_proj.weight.view(nh, dn + self.v_head_dim, r)
        w_k, w_v = w.split([dn, self.v_head_dim], dim=1)                          # [nh, dn|dv, r]
        q_lat = torch.bmm(q_nope.reshape(B * T, nh, dn).transpose(0, 1), w_k)    # [nh, B*T, r]
        q = torch.cat([q_lat.transpose(0, 1).reshape(B, T, nh, r), q_pe], dim=-1)  # [B, T, nh, r + dr]
        scores = torch.bmm(q.view(B, T * nh, -1), latent.transpose(1, 2))        # [B, T*nh, S]
        scores = scores.float().mul_(self.softmax_scale).view(B, T, nh, -1)
        scores = scores.masked_fill_(blocked.view(B, T, 1, -1), float("-inf"))
        probs = scores.softmax(dim=-1).to(latent.dtype).view(B, T * nh, -1)      # [B, T*nh, S]
        out_lat = torch.bmm(probs, latent[..., :r])                               # [B, T*nh, r]
        out = torch.bmm(out_lat.view(B * T, nh, r).transpose(0, 1), w_v.transpose(1, 2))  # [nh, B*T, dv]
        return out.transpose(0, 1).reshape(B, T, nh, self.v_head_dim)

    def reset_parameters(self, std: float) -> None:
        for module in self.children():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
