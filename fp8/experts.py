"""FP8 routed experts: `Experts.grouped_swiglu` as grouped FP8 GEMMs over contiguous expert segments.

Forward, per segment e (tokens sorted by expert):  g = x·Wgᵀ, u = x·Wuᵀ, h = silu(g)·u, y = h·Wdᵀ,
every GEMM in E4M3 with 1×128 activation tiles and 128×128 weight blocks. Saved for backward, all in
FP8: the expert input x and the SwiGLU input (g, u); SwiGLU is recomputed in backward (DeepSeek-V3
§3.3). Dgrad runs as grouped GEMMs on the transposed weight blocks; Wgrad as one k-grouped FP8 GEMM
with both operands tiled 1×128 along each expert's own tokens; a zero-bubble pipeline may defer those
Wgrad GEMMs (`defer_weight_grad`, as in `twinpipe.fp8.linear`).

With the gate weights (one per row) the output rows come out scaled by them (`model.experts.scale_rows`,
the combine's product); for the weights' gradient the backward recomputes y from the down GEMM's FP8
input, kept for that (h_q, h_s: I bytes and I/128 scales per row instead of y's 2H bytes), and the
same cached weight, so y is the forward's to the bit.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from twinpipe.fp8.backend import BACKENDS, Backend, get_backend
from twinpipe.fp8.linear import deferred
from twinpipe.fp8.quant import GRAD_AMAX_FLOOR, act_dequant
from twinpipe.fp8.weight_cache import WeightCache
from twinpipe.model.experts import Experts, scale_rows, scale_rows_grads

_PROJS = ("gate_proj", "up_proj", "down_proj")


def _aligned_layout(offsets: torch.Tensor, num_tokens: int, block_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token positions when every expert segment starts on a block_size boundary.

    offsets [E+1] -> (position of each sorted token [M], aligned offsets [E+1], padded length). The
    length is an upper bound known without reading the counts on the host (no GPU sync).
    """
    counts = offsets.diff()                                                     # [E]
    num_experts = counts.numel()
    aligned = F.pad(((counts + block_size - 1) // block_size * block_size).cumsum(0), (1, 0))  # [E+1]
    expert = torch.repeat_interleave(torch.arange(num_experts, device=offsets.device), counts,
                                     output_size=num_tokens)                    # [M]
    pos = torch.arange(num_tokens, device=offsets.device) - offsets[:-1][expert] + aligned[:-1][expert]
    length = (num_tokens + block_size - 1) // block_size * block_size + block_size * num_experts
    return pos, aligned, length


def _grouped_wgrad(backend: Backend, grad: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor,
                   offsets: torch.Tensor, out_dtype: torch.dtype, block_size: int = 128) -> torch.Tensor:
    """dW[e] = grad_segᵀ · x_seg for every expert: grad [M, N], x (q, s) [M, K] -> [E, N, K].

    Both operands are requantized 1×128 along the tokens with tiles that never cross an expert: each
    segment is moved to a block-aligned start of a zero-padded buffer, quantized in one call, and one
    k-grouped GEMM reduces every expert's own segment.
    """
    pos, aligned, length = _aligned_layout(offsets, grad.shape[0], block_size)
    n, k = grad.shape[1], x_q.shape[1]
    grad_t = grad.new_zeros(n, length, dtype=torch.float32)                     # [N, L]
    grad_t[:, pos] = grad.float().t()
    x_t = grad.new_zeros(k, length, dtype=torch.float32)                        # [K, L]
    x_t[:, pos] = act_dequant(x_q, x_s).t()
    g_q, g_s = backend.act_quant(grad_t, amax_floor=GRAD_AMAX_FLOOR)            # [N, L], [N, L/128]
    xt_q, xt_s = backend.act_quant(x_t)                                         # [K, L], [K, L/128]
    return backend.k_grouped_gemm(g_q, g_s, xt_q, xt_s, aligned, out_dtype, block_size)   # [E, N, K]


class FP8GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                offsets: torch.Tensor, caches: dict[str, WeightCache], backend: Backend,
                defer: Callable | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
        x_q, x_s = backend.act_quant(x)                                     # [M, H] fp8, [M, nbh]
        wg, wu, wd = (caches[n].get(w, backend) for n, w in zip(_PROJS, (w_gate, w_up, w_down)))
        gate = backend.grouped_gemm(x_q, x_s, wg.q, wg.s, offsets, torch.float32)   # [M, I]
        up = backend.grouped_gemm(x_q, x_s, wu.q, wu.s, offsets, torch.float32)     # [M, I]
        g_q, g_s = backend.act_quant(gate)                                  # SwiGLU input, cached in FP8
        u_q, u_s = backend.act_quant(up)
        h_q, h_s = backend.act_quant(F.silu(gate) * up)                     # [M, I]
        y = backend.grouped_gemm(h_q, h_s, wd.q, wd.s, offsets, x.dtype)    # [M, H]
        weighted = () if weight is None else (weight, h_q, h_s)             # h for y again in backward
        ctx.save_for_backward(x_q, x_s, g_q, g_s, u_q, u_s, w_gate, w_up, w_down, offsets, *weighted)
        ctx.caches, ctx.backend, ctx.x_dtype, ctx.defer = caches, backend, x.dtype, defer
        ctx.params = (w_gate, w_up, w_down)  # the Parameters themselves for a deferred Wgrad
        return y if weight is None else scale_rows(y, weight, x.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x_q, x_s, g_q, g_s, u_q, u_s, w_gate, w_up, w_down, offsets, *weighted = ctx.saved_tensors
        backend: Backend = ctx.backend
        caches = ctx.caches
        grad_weight = None
        if weighted:  # grad_y is the scaled rows' gradient: y's and the weight's from it
            weight, h_q, h_s = weighted
            y = None
            if ctx.needs_input_grad[8]:
                wd = caches["down_proj"].get(w_down, backend)
                y = backend.grouped_gemm(h_q, h_s, wd.q, wd.s, offsets, ctx.x_dtype)  # [M, H] as in forward
            grad_y, grad_weight = scale_rows_grads(grad_y, weight, ctx.x_dtype, y)
        gate, up = act_dequant(g_q, g_s), act_dequant(u_q, u_s)            # [M, I] fp32 each
        sig = torch.sigmoid(gate)
        silu = gate * sig                                                   # recomputed SwiGLU
        h = silu * up                                                       # [M, I]

        dy_q, dy_s = backend.act_quant(grad_y, amax_floor=GRAD_AMAX_FLOOR)  # [M, H]
        wd_t = caches["down_proj"].get_transposed(w_down, backend)          # [E, I, H]
        dh = backend.grouped_gemm(dy_q, dy_s, wd_t.q, wd_t.s, offsets, torch.float32)  # [M, I]
        d_gate = dh * up * sig * (1 + gate * (1 - sig))                     # [M, I]
        d_up = dh * silu                                                    # [M, I]

        grad_x = None
        if ctx.needs_input_grad[0]:
            dg_q, dg_s = backend.act_quant(d_gate, amax_floor=GRAD_AMAX_FLOOR)
            du_q, du_s = backend.act_quant(d_up, amax_floor=GRAD_AMAX_FLOOR)
            wg_t = caches["gate_proj"].get_transposed(w_gate, backend)      # [E, H, I]
            wu_t = caches["up_proj"].get_transposed(w_up, backend)
            grad_x = (backend.grouped_gemm(dg_q, dg_s, wg_t.q, wg_t.s, offsets, torch.float32)
                      + backend.grouped_gemm(du_q, du_s, wu_t.q, wu_t.s, offsets, torch.float32)
                      ).to(ctx.x_dtype)                                     # [M, H]
        p_gate, p_up, p_down = ctx.params
        wgrads = {  # [E, I, H], [E, I, H], [E, H, I]
            1: (p_gate, lambda: _grouped_wgrad(backend, d_gate, x_q, x_s, offsets, w_gate.dtype)),
            2: (p_up, lambda: _grouped_wgrad(backend, d_up, x_q, x_s, offsets, w_up.dtype)),
            3: (p_down, lambda: _grouped_wgrad(backend, grad_y, *backend.act_quant(h), offsets, w_down.dtype)),
        }
        grad_w = {i: compute() for i, (w, compute) in wgrads.items()
                  if ctx.needs_input_grad[i] and not deferred(ctx.defer, w, compute)}
        return grad_x, grad_w.get(1), grad_w.get(2), grad_w.get(3), None, None, None, None, grad_weight


class FP8Experts(Experts):
    """`Experts` with `grouped_swiglu` in FP8; parameters and state-dict names unchanged."""

    defer_weight_grad: Callable | None = None  # see the module docstring

    def _init_fp8(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"fp8 backend {backend!r}: allowed values are {', '.join(BACKENDS)}")
        self.fp8_backend = backend
        self.fp8_weight_caches = {name: WeightCache() for name in _PROJS}

    @classmethod
    def from_experts(cls, experts: Experts, backend: str) -> "FP8Experts":
        """Turn `experts` into FP8Experts in place (parameters kept)."""
        experts.__class__ = cls
        experts._init_fp8(backend)
        return experts

    def select(self, ids) -> "FP8Experts":
        new = super().select(ids)
        new._init_fp8(self.fp8_backend)       # fresh caches: the copies are new parameters
        return new

    def grouped_swiglu(self, x_sorted: torch.Tensor, counts: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
        """[M, H] tokens sorted by expert, counts [E] -> [M, H]; with `weight` [M] each row times its
        gate weight (as `Experts.grouped_swiglu`)."""
        offsets = F.pad(counts.cumsum(0), (1, 0))                           # [E + 1]
        backend = get_backend(self.fp8_backend, x_sorted.device)
        return FP8GroupedSwiGLU.apply(x_sorted, self.gate_proj, self.up_proj, self.down_proj, offsets,
                                      self.fp8_weight_caches, backend, self.defer_weight_grad, weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8_backend={self.fp8_backend}"
