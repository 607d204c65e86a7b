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


def _token_major(backend: Backend, rows: Callable[[int, int], torch.Tensor], num_tokens: int, width: int,
                 pos: torch.Tensor, length: int, amax_floor: float | None = None, chunk: int = 4096
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A [M, N] operand of the Wgrad GEMM (dW[e] = grad_segᵀ · x_seg, one k-grouped GEMM over the
    aligned offsets) requantized 1×128 along the tokens with tiles that never cross an expert:
    rows(a, b) [b - a, N] fp32 (rows a..b) go to their block-aligned positions `pos` (`_aligned_layout`)
    of a zero-padded [N, L] buffer, quantized in one call -> (q [N, L], s [N, L/128]). Written `chunk`
    rows at a time, so an operand made on the fly (dequantised) exists a chunk at a time; every
    element lands where it would in one go."""
    buf = torch.zeros(width, length, dtype=torch.float32, device=pos.device)   # [N, L]
    for a in range(0, num_tokens, chunk):
        b = min(a + chunk, num_tokens)
        buf[:, pos[a:b]] = rows(a, b).t()
    kwargs = {} if amax_floor is None else {"amax_floor": amax_floor}
    return backend.act_quant(buf, **kwargs)                                     # [N, L], [N, L/128]


def _grad_token_major(backend: Backend, grad: torch.Tensor, pos: torch.Tensor, length: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A gradient [M, N] as the Wgrad GEMM's left operand (`_token_major`, gradients' amax floor)."""
    return _token_major(backend, lambda a, b: grad[a:b].float(), grad.shape[0], grad.shape[1], pos, length,
                        GRAD_AMAX_FLOOR)


def _x_token_major(backend: Backend, x_q: torch.Tensor, x_s: torch.Tensor, pos: torch.Tensor, length: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 input (q, s) [M, K] as the Wgrad GEMM's right operand, dequantised a chunk at a time."""
    return _token_major(backend, lambda a, b: act_dequant(x_q[a:b], x_s[a:b]), x_q.shape[0], x_q.shape[1],
                        pos, length)


def _rows_weight_grad(grad: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The weight's gradient of `scale_rows(y, weight, ·)`, (g * y).sum(-1) as `scale_rows_grads` computes
    it, with the product written over a tensor made for it (grad's copy in the product's dtype, else the
    recomputed y): the same elementwise products, one [M, H] buffer fewer."""
    dtype = torch.promote_types(y.dtype, weight.dtype)
    g = grad.to(dtype)
    if g is not grad:
        product = g.mul_(y)
    elif y.dtype == dtype:
        product = y.mul_(g)
    else:
        product = g * y
    return product.sum(-1).to(weight.dtype)                                     # [M]


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
        """Each [M, ·] tensor is dropped once read (gradient operands kept in FP8, quantized as the Wgrad
        GEMMs read them) so the working memory stays near three [M, H] fp32 tensors: grad_y, grad_x and
        one more (the recomputed y, its scaled gradient, the second Dgrad GEMM's output). Same operations
        on the same operands as computing them in one expression, so the values are the same bits."""
        x_q, x_s, g_q, g_s, u_q, u_s, w_gate, w_up, w_down, offsets, *weighted = ctx.saved_tensors
        backend: Backend = ctx.backend
        caches = ctx.caches
        need = ctx.needs_input_grad
        grad_weight = None
        if weighted:  # grad_y is the scaled rows' gradient: the weight's from it and y, then y's
            weight, h_q, h_s = weighted
            if need[8]:
                wd = caches["down_proj"].get(w_down, backend)
                y = backend.grouped_gemm(h_q, h_s, wd.q, wd.s, offsets, ctx.x_dtype)  # [M, H] as in forward
                grad_weight = _rows_weight_grad(grad_y, weight, y)
                del y, wd
            grad_y = scale_rows_grads(grad_y, weight, ctx.x_dtype)[0]
            del weighted, weight, h_q, h_s
        pos, aligned, length = _aligned_layout(offsets, grad_y.shape[0], 128)
        dy_q, dy_s = backend.act_quant(grad_y, amax_floor=GRAD_AMAX_FLOOR)  # [M, H]
        dy_t = _grad_token_major(backend, grad_y, pos, length) if need[3] else None  # down's Wgrad operand
        del grad_y  # (the caller's still holds the unscaled one)

        gate, up = act_dequant(g_q, g_s), act_dequant(u_q, u_s)            # [M, I] fp32 each
        sig = torch.sigmoid(gate)
        silu = gate * sig                                                   # recomputed SwiGLU
        h_t = None
        if need[3]:  # down's Wgrad operand: h [M, I] in FP8 as the down GEMM reads it, along the tokens
            h_t = _x_token_major(backend, *backend.act_quant(silu * up), pos, length)
        tail = (1 - sig).mul_(gate).add_(1)                                 # 1 + gate * (1 - sig)
        del gate
        wd_t = caches["down_proj"].get_transposed(w_down, backend)          # [E, I, H]
        dh = backend.grouped_gemm(dy_q, dy_s, wd_t.q, wd_t.s, offsets, torch.float32)  # [M, I]
        del dy_q, dy_s, wd_t
        d_up = dh * silu                                                    # [M, I]
        del silu
        d_gate = dh.mul_(up).mul_(sig).mul_(tail)                           # dh * up * sig * tail
        del dh, up, sig, tail

        dgate_t = _grad_token_major(backend, d_gate, pos, length) if need[1] else None
        dup_t = _grad_token_major(backend, d_up, pos, length) if need[2] else None
        grad_x = None
        if need[0]:  # the two Dgrad GEMMs' sum, the first output taking the second
            dg_q, dg_s = backend.act_quant(d_gate, amax_floor=GRAD_AMAX_FLOOR)
            du_q, du_s = backend.act_quant(d_up, amax_floor=GRAD_AMAX_FLOOR)
            del d_gate, d_up
            wg_t = caches["gate_proj"].get_transposed(w_gate, backend)      # [E, H, I]
            grad_x = backend.grouped_gemm(dg_q, dg_s, wg_t.q, wg_t.s, offsets, torch.float32)  # [M, H]
            del dg_q, dg_s, wg_t
            wu_t = caches["up_proj"].get_transposed(w_up, backend)
            grad_x = grad_x.add_(backend.grouped_gemm(du_q, du_s, wu_t.q, wu_t.s, offsets, torch.float32)
                                 ).to(ctx.x_dtype)                          # [M, H]
            del du_q, du_s, wu_t
        else:
            del d_gate, d_up
        x_t: list = []  # x along the tokens for gate's and up's Wgrad: made once, when the first runs

        def x_token_major() -> tuple[torch.Tensor, torch.Tensor]:
            if not x_t:
                x_t.append(_x_token_major(backend, x_q, x_s, pos, length))
            return x_t[0]

        p_gate, p_up, p_down = ctx.params
        k_gemm = backend.k_grouped_gemm
        wgrads = {  # [E, I, H], [E, I, H], [E, H, I]
            1: (p_gate, lambda: k_gemm(*dgate_t, *x_token_major(), aligned, w_gate.dtype, 128)),
            2: (p_up, lambda: k_gemm(*dup_t, *x_token_major(), aligned, w_up.dtype, 128)),
            3: (p_down, lambda: k_gemm(*dy_t, *h_t, aligned, w_down.dtype, 128)),
        }
        grad_w = {i: compute() for i, (w, compute) in wgrads.items()
                  if need[i] and not deferred(ctx.defer, w, compute)}
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
        for name, cache in new.fp8_weight_caches.items():  # as this module's keep their transposes or not
            cache.keep_transposed = self.fp8_weight_caches[name].keep_transposed
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
