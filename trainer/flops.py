"""Model FLOPs per token and MFU, counted from the model config (no profiler).

Training FLOPs per token = 3 x forward (backward costs twice the forward):

    forward = 2 · N_active  +  2 · L_attn · n_heads · (d_qk + d_v) · T / 2

- N_active: the weights one token multiplies (each weight = one multiply-add = 2 FLOPs): per layer the
  MLA projections (q_a, q_b or q_proj, kv_a, kv_b, o), the dense MLP or the router (E x H) + shared
  experts + the K activated routed experts; the output head (V x H, for the main head and once more
  per MTP layer) and each MTP layer's eh_proj and block. The embedding lookup is free.
- attention core: QKᵀ (d_qk = qk_nope + qk_rope per head) and AV (d_v) over the T positions of the
  sequence, halved for the causal mask; L_attn = main layers + MTP layers.
MFU = tokens/s x FLOPs per token / peak FLOP/s.
"""

from __future__ import annotations

from typing import Any, Optional

# dense BF16 peak (TFLOP/s) by GPU name fragment; FP8 doubles it on Hopper
_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}


def _attention_weights(c: Any) -> int:
    h, nh = c.hidden_size, c.num_attention_heads
    if c.q_lora_rank is None:
        q = h * nh * c.qk_head_dim
    else:
        q = h * c.q_lora_rank + c.q_lora_rank * nh * c.qk_head_dim
    kv = h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim)
    return q + kv + nh * c.v_head_dim * h


def active_matmul_params(c: Any, layer: int) -> int:
    """Weights one token multiplies in block `layer` (MTP blocks numbered from num_hidden_layers)."""
    h = c.hidden_size
    if c.is_moe_layer(layer):
        ffn = (c.n_routed_experts * h  # router
               + 3 * h * c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts))
    else:
        ffn = 3 * h * c.intermediate_size
    return _attention_weights(c) + ffn


def flops_per_token(c: Any, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) for sequences of `seq_len` tokens."""
    d = c.num_nextn_predict_layers
    layers = c.num_hidden_layers + d
    n_active = sum(active_matmul_params(c, i) for i in range(layers))
    n_active += (1 + d) * c.vocab_size * c.hidden_size  # output head, main + each MTP
    n_active += d * 2 * c.hidden_size * c.hidden_size  # eh_proj
    attn = 2 * layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len / 2
    return 3.0 * (2.0 * n_active + attn)


def peak_flops(user_tflops: Optional[float], fp8: bool = False) -> Optional[float]:
    """Peak FLOP/s: the user's number, else the detected GPU's dense BF16 (x2 for FP8), else None."""
    if user_tflops:
        return user_tflops * 1e12
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12 * (2 if fp8 else 1)
    return None
