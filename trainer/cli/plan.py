"""`twinpipe-plan`: a dry run of a training job of any size, one rank at a time, on the meta device.

    twinpipe-plan --config-name pretrain_v3 --gpu H800 --json plan.json    # DeepSeek-V3 as the report trains it
    twinpipe-plan model=small parallel.pp=8 parallel.dp=8 parallel.ep=8 ... --gpu H100 --world 64

Same recipe and overrides as `twinpipe-train`. For each planned rank (default: dp rank 0 of every
pipeline rank: the other dp ranks hold the same shapes) it joins torch.distributed's *fake* process
group (`world = parallel.pp x parallel.dp`; collectives are no-ops), builds the model on meta, runs
`parallelize` without materialising (pipeline placement and expert slots cut exactly as in the run),
and counts, per rank, in bytes:

- weights: every parameter the rank holds, fp32 (master weights are the parameters; bf16 runs autocast),
  or with optim.param_dtype=bf16 the trainable ones in bf16 (their fp32 master is optimizer state);
  with fp8.backend on, the FP8 copies of the FP8 weights and their transposes (`fp8_weight_parts`);
- gradients: fp32, once per trainable parameter: the expert slots' `p.grad`, and ZeRO-1's flat
  gradient bucket of the replicated (non-expert) ones, whose segments are their `p.grad`
  (`trainer/optim/zero.py`); with bf16 parameters the same fp32 buffers as their `main_grad` (a
  parameter's bf16 `p.grad` lives only until its hook adds it in: not counted);
- optimizer: ZeRO-1 shard over dp of the replicated parameters (fp32 master copy + two moments in
  optim.moment_dtype), and the local AdamW moments of the expert slots (not sharded again; with
  optim.shard_experts sharded over the dp / ep ranks holding the same slots), plus, with
  bf16 parameters, the slots' fp32 master (sharded with them);
- activations saved for backward, per micro-batch and stage (`activation_bytes`, MLA + MoE as
  `model/` computes them, with train.recompute and, under FP8, the Linears' and experts' inputs cached
  in FP8), times the micro-batches in flight: DualPipe / DualPipeV pp + 1, 1F1B pp - pp_rank, no
  pipeline 1. train.dtype=fp32 is checked against the autograd graph on CPU (FP8 emulated included);
  bf16 counts 2 bytes per saved element (the GPU target, fused attention): CPU autocast saves more
  (RMSNorm's fp32 intermediates, fp32 attention), and autocast's bf16 copies of the weights that stay
  out of FP8 (router, MTP eh_proj, head) are not counted;
- the latent KV cache of rollouts (GRPO): (kv_lora_rank + qk_rope_head_dim) per token and layer, in
  the weights' dtype (fp32: `LatentKVCache.for_model`), for this rank's rollouts (`--rollout`; default
  a GRPO recipe's global_batch / dp sequences of train.seq_len, else one micro-batch);
- all-to-all bytes per step sent by the rank (dispatch + combine, forward and backward, every top-k pick
  sent as its own row, as `parallel/experts/dispatch.py` does);
- the backward's working memory (`working_bytes`): what the largest block's backward holds at its peak
  above the rest, in the total (at V3's shape the routed experts' FP8 backward, two [T x top-k, H]
  fp32 tensors and the incoming gradient at once, `fp8_experts_backward_bytes`). Checked against
  LiveBytes on CPU (tests/trainer/test_plan.py). Not in it: under DualPipe the forward chunk run
  beside the backward (its own transients), the loss head's backward (chunked cross-entropy), the
  allocator's fragmentation and CUDA/NCCL workspaces.

Then a roofline step time with a stated GPU (`GPUS`): per micro-batch and stage, the forward takes
max(FLOPs / peak, bytes / HBM bandwidth), backward twice that plus what it recomputes
(train.recompute, `recompute_flops`) and, without fp8.cache_transposed, the FP8 weight transposes it
makes (read and written at HBM speed); all-to-all at NVLink speed inside a node
and IB between nodes, hidden behind compute under DualPipe (its point) and added under 1F1B; the bubble
of the schedule (DualPipe paper, Table 2, with B = 2F + that, W = F, no F&B overlap gain); the ZeRO-1 gradient
all-reduce and master all-gather over dp after the backward. Out: tokens/s per GPU, MFU and GPU-hours
per trillion tokens. It is a bound, not a prediction: kernels at 100% of peak, no stragglers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from omegaconf import DictConfig

log = logging.getLogger(__name__)

GIB = 1024 ** 3


@dataclass(frozen=True)
class GPUSpec:
    """Dense peak FLOP/s, HBM and per-GPU link bandwidths (one direction), as the vendors/DeepSeek state."""

    name: str
    bf16_tflops: float
    fp8_tflops: float
    hbm_gb: float  # decimal GB, as sold
    hbm_tb_s: float
    nvlink_gb_s: float  # per GPU, one direction, inside a node
    ib_gb_s: float  # per GPU, one direction, between nodes (one 400 Gb/s NIC per GPU)
    gpus_per_node: int = 8


# H100/H200 SXM datasheets; H800: DeepSeek-V3 report §3.1 (NVLink 160 GB/s, IB 50 GB/s per GPU).
GPUS = {
    "H100": GPUSpec("H100 SXM", 989.0, 1979.0, 80.0, 3.35, 450.0, 50.0),
    "H200": GPUSpec("H200 SXM", 989.0, 1979.0, 141.0, 4.8, 450.0, 50.0),
    "H800": GPUSpec("H800 SXM", 989.0, 1979.0, 80.0, 3.35, 160.0, 50.0),
}


def fp8_input_bytes(width: int) -> int:
    """Bytes per token of a Linear input saved in FP8 (`fp8/linear.py`, `fp8/experts.py`): E4M3 values
    and one fp32 scale per 1x128 tile (`fp8.quant.act_quant` pads the row to whole tiles and returns a
    view, so a width under 128 keeps a whole tile)."""
    return (128 + 4) * math.ceil(width / 128)


def activation_bytes(c: Any, layer: int, tokens: int, seq_len: int, attention: str,
                     recompute: tuple[str, ...] = (), dtype_bytes: int = 4, fp8: bool = False) -> float:
    """Bytes saved for backward by block `layer` for `tokens` tokens in sequences of `seq_len`: elements
    kept in the compute dtype (`dtype_bytes` each; int64 indices count 2) plus, with `fp8`, the FP8
    inputs of the FP8 Linears and experts (`fp8_input_bytes`). Read off the autograd graph of `model/`:
    RMSNorm saves its input, 1/rms and the normalised x, its output is the next Linears' input; each
    Linear its input; SwiGLU gate, up, silu(gate) and the product; MLA the q/kv latents, RoPE's cos/sin,
    k and q after the cat, v and the attention output; attention="math" (CPU) also the [heads, T, T]
    probabilities, "fused" (flash/efficient kernels) only a logsumexp per head; the router's scores and
    indices; the routed experts their gathered rows and the gate weights, not their outputs (the weight
    is applied inside the experts' function, which recomputes the down GEMM for the weight's gradient
    from what it keeps, `model.experts.scaled_rows`; the scatter back, `sum_rows`, keeps only its index).

    Under FP8 (`fp8/convert.py`: every Linear but embedding, head, router and eh_proj, and the routed
    experts) a Linear saves its input quantised, one copy for the Linears reading the same input
    (`fp8.linear.quantized_input`: q_a and kv_a, gate and up); the routed experts save
    their input, the SwiGLU input (gate and up) and the down GEMM's input in FP8 and recompute SwiGLU
    (DeepSeek-V3 §3.3.3).
    `recompute` (train.recompute's options, parallel/recompute.py) keeps only the recomputed parts'
    inputs, in the compute dtype: `attention` the block input for the whole attention sublayer, `router`
    the residual for the feed-forward's norm and the router (what is read outside it stays: the scores
    for the balance loss, the picks, the shared experts' x unless they keep it in FP8); `full` keeps the
    block input (the block rerun in the backward is added by the caller)."""
    h, nh, r, dr = c.hidden_size, c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
    qk, dv = c.qk_nope_head_dim + dr, c.v_head_dim
    if "full" in recompute:
        return float(tokens) * h * dtype_bytes
    q8 = fp8_input_bytes
    norm = (lambda w: w) if "norms" in recompute else (lambda w: 2 * w + 1)
    plain = quant = 0.0  # per token: elements in the compute dtype, bytes in FP8
    # attention: its norm, the kv latent (kv_a output, its norm, k_pe after RoPE)
    plain += norm(h) + (r + dr) + 1 + r + dr
    if "mla_up" in recompute:  # `MLA.attend` (query path, q's RoPE, core) keeps x, c_kv, k_pe
        plain += h + dr
        quant += q8(h) if fp8 else 0  # kv_a's own FP8 copy of x
    else:
        q_path = 0 if c.q_lora_rank is None else norm(c.q_lora_rank)  # q_a output through its norm
        core = 2 * nh * qk + nh * dv + (nh * seq_len if attention == "math" else nh)  # q, k, v, softmax
        plain += q_path + core
        if fp8:  # x into q_a (or q) and kv_a (one FP8 copy, shared), q_b's and kv_b's inputs
            quant += q8(h) + (0 if c.q_lora_rank is None else q8(c.q_lora_rank)) + q8(r)
        else:
            plain += h + (h if c.q_lora_rank is None else c.q_lora_rank) + r
    plain, quant = (plain, quant + q8(nh * dv)) if fp8 else (plain + nh * dv, quant)  # o_proj's input
    if "attention" in recompute:  # `Block.attention` (its norm, MLA, o_proj) keeps only the block input
        plain, quant = float(h), 0.0
    # feed-forward: its norm, then a dense SwiGLU MLP or the MoE
    plain += norm(h)

    def swiglu(width: int) -> tuple[float, float]:  # (plain, FP8) of an MLP given x, not recomputed
        if "moe" in recompute:
            return 0.0, 0.0
        return (3.0 * width, q8(h) + q8(width)) if fp8 else (4.0 * width, 0.0)  # x: gate and up share its FP8

    if c.is_moe_layer(layer):
        k, e, i = c.num_experts_per_tok, c.n_routed_experts, c.moe_intermediate_size
        router = h + e + 4 * c.n_group + 2 * c.topk_group + e / 4 + 3 * k + 1  # router (its input x)
        if "router" in recompute:  # `Block.route` (norm + router) keeps h; out of it stay the scores (balance
            # loss), the picks (dispatch) and, without FP8, the gate weights (combine); x if the shared experts keep it
            x_kept = c.n_shared_experts and (not fp8 or "moe" in recompute)
            router = h - norm(h) + (e if c.aux_loss_alpha > 0 else 0) + (2 if fp8 else 3) * k + (h if x_kept else 0)
        plain += router
        if fp8 and "moe" not in recompute:  # rows, SwiGLU input and the down GEMM's input in FP8
            plain, quant = plain + 3 * k, quant + k * (q8(h) + 3 * q8(i))
        else:
            plain += k * h + (0 if "moe" in recompute else 4 * k * i) + 3 * k
        if c.n_shared_experts:
            more, more8 = swiglu(c.n_shared_experts * i)
            plain, quant = plain + more, quant + more8
    else:
        more, more8 = swiglu(c.intermediate_size)
        if not fp8 or "moe" in recompute:
            more += h  # x itself (the MLP's, or its checkpoint's, input)
        plain, quant = plain + more, quant + more8
    return float(tokens) * (plain * dtype_bytes + quant)


def forward_flops(c: Any, layer: int, seq_len: int) -> float:
    """Forward FLOPs per token of block `layer` (trainer/flops.py's count, one block)."""
    from twinpipe.trainer.flops import active_matmul_params

    attn_core = c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len  # 2 x causal half
    return 2.0 * active_matmul_params(c, layer) + attn_core


def recompute_flops(c: Any, layer: int, seq_len: int, recompute: tuple[str, ...]) -> float:
    """Forward FLOPs per token of block `layer` that train.recompute runs again in the backward (as
    `forward_flops` counts them: matmuls and the attention core; norms and elementwise ops free)."""
    if "full" in recompute:
        return forward_flops(c, layer, seq_len)
    from twinpipe.trainer.flops import _attention_weights

    h, nh = c.hidden_size, c.num_attention_heads
    core = nh * (c.qk_head_dim + c.v_head_dim) * seq_len
    flops = 0.0
    if "attention" in recompute:
        flops += 2.0 * _attention_weights(c) + core
    elif "mla_up" in recompute:  # q's projections and kv_b with the core
        q = h * nh * c.qk_head_dim if c.q_lora_rank is None else (h + nh * c.qk_head_dim) * c.q_lora_rank
        flops += 2.0 * (q + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim)) + core
    if c.is_moe_layer(layer):
        flops += 2.0 * c.n_routed_experts * h if "router" in recompute else 0.0
        width = c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts)
    else:
        width = c.intermediate_size
    return flops + (6.0 * h * width if "moe" in recompute else 0.0)


def fp8_experts_backward_bytes(rows: int, hidden: int, inter: int, experts: int, x_bytes: int, w_bytes: int,
                               chunk: int = 4096) -> float:
    """Peak bytes the FP8 routed experts' backward (`fp8.experts.FP8GroupedSwiGLU.backward`, every input
    needing a gradient) holds above what it saved, its incoming gradient [M, H] included, for `rows`
    (M) routed rows over `experts` local experts. Each FP8 kernel's output counts, not a kernel's
    scratch. Its phases, in order: the weights' gradient (y recomputed, the product written over it),
    y's gradient quantised for the down Dgrad and along the tokens for its Wgrad (a zero-padded
    [H, L] fp32 buffer, L = the rows with each expert's segment padded to 128), the SwiGLU recomputed
    (gate, up, sigmoid, silu: four [M, I] fp32) and h along the tokens, dh and the SwiGLU gradients
    (six [M, I] fp32 at most), their FP8 copies, the two Dgrad GEMMs (two [M, H] fp32 at once), x along
    the tokens (dequantised `chunk` rows at a time: `act_dequant`'s three fp32 tensors of a chunk), the
    three Wgrad outputs ([E, I, H] in the weights' dtype) together."""
    m, h, i, e = rows, hidden, inter, experts
    length = math.ceil(m / 128) * 128 + 128 * e
    q8 = fp8_input_bytes
    t8 = lambda n: n * length * 33 / 32  # noqa: E731  (along the tokens: E4M3 + a scale per 128)
    tf = lambda n: 4 * n * length  # noqa: E731  (its fp32 buffer)
    c = min(m, chunk)
    deq = lambda k: 4 * c * (2 * k + 128 * math.ceil(k / 128))  # noqa: E731  (q.float(), the scales, the product)
    cast = x_bytes != 4  # bf16 rows: fp32 copies of the gradient's chunks and of the product
    grad_in = m * h * x_bytes
    phases = [
        grad_in + m * h * x_bytes + cast * 4 * m * h,                                  # weight's gradient
        grad_in + m * h * x_bytes + m * q8(h) + tf(h) + cast * 4 * c * h + t8(h),      # y's, quantised
        grad_in + m * q8(h) + t8(h) + 16 * m * i + max(4 * m * i + m * q8(i),         # SwiGLU, h's
                                                      m * q8(i) + tf(i) + max(deq(i), t8(i))),
        grad_in + t8(h) + t8(i) + max(m * q8(h) + 20 * m * i, 24 * m * i),             # dh, d_gate, d_up
        grad_in + t8(h) + 3 * t8(i) + 8 * m * i + tf(i),                               # along the tokens
        grad_in + t8(h) + 3 * t8(i) + m * q8(i) + 8 * m * h,                           # the Dgrad GEMMs
        grad_in + m * h * x_bytes + t8(h) + 3 * t8(i) + tf(h) + max(deq(h), t8(h)),  # x along the tokens
        grad_in + m * h * x_bytes + 2 * t8(h) + 3 * t8(i) + 3 * e * i * h * w_bytes,   # the Wgrad outputs
    ]
    return max(phases)


def experts_backward_bytes(rows: int, hidden: int, inter: int, experts: int, x_bytes: int, w_bytes: int) -> float:
    """Peak bytes of the routed experts' backward through autograd (`model.experts`, no FP8) above what
    they saved, the incoming gradient [M, H] included: the larger of the gate weights' product
    (`_ScaledRows`: the incoming gradient, y recomputed, y's gradient and the product, four [M, H]) and
    the down GEMM's (y's gradient, dh [M, I], down's gradient [E, H, I]); the SwiGLU's and the input
    GEMMs' come after the SwiGLU's saved tensors are released and stay below."""
    m, h, i, e = rows, hidden, inter, experts
    a = m * h * x_bytes
    return max(4 * a, a + m * i * x_bytes + e * i * h * w_bytes)


def working_bytes(c: Any, layer: int, tokens: int, seq_len: int, attention: str, recompute: tuple[str, ...] = (),
                  dtype_bytes: int = 4, fp8: bool = False, local_experts: int | None = None,
                  param_bytes: int = 4) -> float:
    """Bytes block `layer`'s backward holds at its peak above what persists and what its forward saved
    (`activation_bytes`): the gradient flowing in (the residual's, [T, H]) and the larger of the
    feed-forward's backward and the attention's. Feed-forward: the routed experts'
    (`fp8_experts_backward_bytes` or `experts_backward_bytes`) for the T x top-k rows a rank receives
    on average over its `local_experts`; a dense MLP's down projection (the gradient of its input
    [T, I], its weight's [H, I]; under FP8 the input dequantised for the weight's gradient instead).
    Attention: what a recomputed attention sublayer (`attention`, `full`) saves again (everything, no
    region being recomputed inside another), the gradients of the core's q, k, v and of the output
    projection's weight. The all-to-all buffers of expert parallelism are not in it: the combine's and
    the dispatch's backward each hold two [T x top-k, H] buffers, below the experts' peak between them
    (`parallel/experts/dispatch.py`)."""
    h, nh = c.hidden_size, c.num_attention_heads
    if c.is_moe_layer(layer):
        rows, e, i = tokens * c.num_experts_per_tok, local_experts or c.n_routed_experts, c.moe_intermediate_size
        experts = fp8_experts_backward_bytes if fp8 else experts_backward_bytes
        ffn = experts(rows, h, i, e, dtype_bytes, param_bytes)
    else:
        i = c.intermediate_size
        weight = h * i * param_bytes
        ffn = tokens * i * dtype_bytes + (4 * tokens * (2 * i + 128 * math.ceil(i / 128)) if fp8 else weight)
    attn = tokens * nh * (2 * (c.qk_nope_head_dim + c.qk_rope_head_dim) + c.v_head_dim) * dtype_bytes
    attn += h * nh * c.v_head_dim * param_bytes
    if "attention" in recompute or "full" in recompute:
        act = dict(attention=attention, dtype_bytes=dtype_bytes, fp8=fp8)
        attn += (activation_bytes(c, layer, tokens, seq_len, recompute=(), **act)
                 - activation_bytes(c, layer, tokens, seq_len, recompute=("attention",), **act) + tokens * h * dtype_bytes)
    return tokens * h * dtype_bytes + max(ffn, attn)


@dataclass
class RankPlan:
    rank: int
    pp_rank: int
    blocks: list[int]  # block indices held (MTP blocks numbered from num_hidden_layers)
    holds_head: bool  # the output head (the main one and the MTP heads' shared weight)
    params: int
    expert_params: int
    weights_bytes: int
    fp8_weight_cache_bytes: int
    fp8_transpose_bytes_per_step: int  # FP8 weight transposes made per step (once, or in every backward)
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes_per_micro_batch: int
    micro_batches_in_flight: int
    activation_bytes: int
    kv_cache_bytes: int
    all_to_all_bytes_per_step: int
    working_bytes: int  # the largest block's backward transient peak (`working_bytes`)
    total_bytes: int


def fake_grid(world: int, rank: int, pp: int, dp: int, ep: int) -> Any:
    """Join torch.distributed's fake process group as `rank` of `world` and build the run's grid."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from twinpipe.parallel.grid import build_grid

    if dist.is_initialized():
        raise ValueError("twinpipe-plan: a process group is already joined; the plan runs in a plain process "
                         "(it joins a fake one per planned rank)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    return build_grid(pp, dp, ep)


def held_parameters(cfg: DictConfig, grid: Any) -> tuple[Any, set[str]]:
    """This rank's model on meta, parallelised as the trainer would (no FP8 swap: same parameters), and
    the names of the modules it holds."""
    from twinpipe.model.transformer import Transformer
    from twinpipe.parallel.parallelize import local_modules, parallelize
    from twinpipe.trainer.build import model_config

    with torch.device("meta"):
        model = Transformer(model_config(cfg.model))
    split = cfg.parallel.get("layer_split")
    local = local_modules(model, grid, cfg.parallel.schedule, split)
    model = parallelize(model, grid, torch.device("cpu"), cfg.parallel.schedule, "off",
                        num_replicas=cfg.eplb.replicas or None, materialize_meta=False, layer_split=split)
    return model, local


def plan_rank(cfg: DictConfig, rank: int, attention: str, rollout: tuple[int, int]) -> RankPlan:
    """Everything `RankPlan` lists for `rank` of the recipe's layout (see the module docstring)."""
    from twinpipe.model.experts import Experts
    from twinpipe.parallel.experts.layer import is_expert_param
    from twinpipe.parallel.parallelize import is_under
    from twinpipe.parallel.recompute import parse_options
    from twinpipe.trainer.build import model_config

    p, t, c = cfg.parallel, cfg.train, model_config(cfg.model)
    grid = fake_grid(p.pp * p.dp, rank, p.pp, p.dp, p.ep)
    try:
        model, local = held_parameters(cfg, grid)
    finally:
        dist.destroy_process_group()
    if cfg.model.get("freeze_router"):
        from twinpipe.model.gate import Gate

        for m in model.modules():
            if isinstance(m, Gate):
                m.weight.requires_grad_(False)
    dense = experts = frozen = 0
    for name, param in model.named_parameters():
        if not is_under(name.rsplit(".", 1)[0], local):
            continue
        n = param.numel()
        if not param.requires_grad:
            frozen += n
        elif is_expert_param(param):
            experts += n
        else:
            dense += n
    fp8 = cfg.fp8.backend != "off"
    kept_t = cfg.fp8.get("cache_transposed", True)  # else each stage's transposes made in each backward
    fp8_w, fp8_t, fp8_t_largest = fp8_weight_parts(model, local) if fp8 else (0, 0, 0)
    moment = 2 if cfg.optim.moment_dtype == "bf16" else 4
    blocks = sorted(range(c.num_hidden_layers) if "layers" in local else
                    {int(n.split(".")[1]) for n in local if n.startswith("layers.")})
    blocks += [c.num_hidden_layers + k for k in range(c.num_nextn_predict_layers) if "mtp" in local]
    stages = stages_held(cfg)
    tokens = t.micro_batch * t.seq_len
    recompute = tuple(parse_options(t.recompute))
    act = dict(attention=attention, dtype_bytes=4 if t.dtype == "fp32" else 2, fp8=fp8)
    per_micro = int(sum(activation_bytes(c, b, tokens, t.seq_len, recompute=recompute, **act) for b in blocks)
                    / stages)
    in_flight = micro_batches_in_flight(p.pp, grid.pp_rank, p.schedule, chunks(cfg))
    rerun = 0  # `full`: one block's activations exist again while its backward runs
    if "full" in recompute and blocks:
        rerun = int(max(activation_bytes(c, b, tokens, t.seq_len, **act) for b in blocks))
    moe_passes = sum(c.is_moe_layer(b) for b in blocks) / stages * chunks(cfg)
    dispatch = 1 if fp8 else 2
    a2a = moe_passes * tokens * c.num_experts_per_tok * c.hidden_size * (p.ep - 1) / p.ep * (dispatch + 2 + 4)
    batch, length = rollout
    kv = sum(b < c.num_hidden_layers for b in blocks) * batch * length * (c.kv_lora_rank + c.qk_rope_head_dim) * 4
    params = dense + experts + frozen
    bf16_params = cfg.optim.param_dtype == "bf16"  # trainable weights in bf16, experts' fp32 master in the optimizer
    # optim.shard_experts: the slots' state split over edp = dp / ep (each slot's dim 1, which divides)
    expert_shards = p.dp // p.ep if cfg.optim.get("shard_experts", False) else 1
    out = RankPlan(rank=rank, pp_rank=grid.pp_rank, blocks=blocks, holds_head="lm_head" in local, params=params,
                   expert_params=experts,
                   weights_bytes=(2 if bf16_params else 4) * (dense + experts) + 4 * frozen,
                   fp8_weight_cache_bytes=fp8_w + (fp8_t if kept_t else fp8_t_largest),
                   fp8_transpose_bytes_per_step=fp8_t if kept_t else fp8_t * chunks(cfg) // stages_held(cfg),
                   grad_bytes=4 * (dense + experts),
                   optimizer_bytes=math.ceil(dense / p.dp) * (4 + 2 * moment)
                   + experts // expert_shards * (2 * moment + 4 * bf16_params),
                   activation_bytes_per_micro_batch=per_micro, micro_batches_in_flight=in_flight,
                   activation_bytes=per_micro * in_flight + rerun, kv_cache_bytes=kv,
                   all_to_all_bytes_per_step=int(a2a), working_bytes=0, total_bytes=0)
    slots = max((m.gate_proj.shape[0] for n, m in model.named_modules()  # this rank's expert slots
                 if isinstance(m, Experts) and is_under(n, local)), default=None)
    out.working_bytes = int(max((working_bytes(c, b, tokens, t.seq_len, recompute=recompute, local_experts=slots,
                                               param_bytes=2 if bf16_params else 4, **act) for b in blocks), default=0))
    out.total_bytes = (out.weights_bytes + out.fp8_weight_cache_bytes + out.grad_bytes + out.optimizer_bytes
                       + out.activation_bytes + out.working_bytes)
    return out


def fp8_weight_parts(model: Any, local: set[str]) -> tuple[int, int, int]:
    """(weights, their transposes, the largest transpose) in bytes: the FP8 copies of this rank's FP8
    weights (`fp8_weights`) kept through a step (`fp8/weight_cache.py`): each weight quantised in
    128x128 blocks (`weight_quant` returns a view of whole blocks: padded below 128) and its contiguous
    transpose for the input gradient, E4M3 with an fp32 scale per block (the plan's model is not
    converted, `parallelize` runs with fp8 off: same parameters). With fp8.cache_transposed=false the
    transposes are made in each backward and dropped after their GEMM: one at a time (the FP8 experts'
    backward frees each of its three before making the next)."""
    total = transposes = largest = 0
    for weights in fp8_weights(model, local):
        for w in weights:
            *batch, n, k = w.shape
            blocks = math.prod(batch) * math.ceil(n / 128) * math.ceil(k / 128)
            total += blocks * 128 * 128 + 4 * blocks  # q (a view of whole blocks), s
            transposed = w.numel() + 4 * blocks  # qᵀ, sᵀ (contiguous)
            transposes, largest = transposes + transposed, max(largest, transposed)
    return total, transposes, largest


def fp8_weights(model: Any, local: set[str]) -> Iterator[list[Any]]:
    """The weights of each module of this rank that `fp8/convert.py` converts (Linears outside its
    SKIPPED_NAMES, the routed experts' three), one list per module."""
    from torch import nn

    from twinpipe.fp8.convert import SKIPPED_NAMES
    from twinpipe.model.experts import Experts
    from twinpipe.parallel.parallelize import is_under

    for name, module in model.named_modules():
        if not is_under(name, local) or any(part in SKIPPED_NAMES for part in name.split(".")):
            continue
        if isinstance(module, nn.Linear):  # (the zero-bubble split's subclass under DualPipe)
            yield [module.weight]
        elif isinstance(module, Experts):
            yield [module.gate_proj, module.up_proj, module.down_proj]


def stages_held(cfg: DictConfig) -> int:
    """Pipeline stages per rank: two under DualPipe / DualPipeV (a stage and its mirror), else one."""
    return 2 if cfg.parallel.pp > 1 and cfg.parallel.schedule in ("dualpipe", "dualpipev") else 1


def chunks(cfg: DictConfig) -> int:
    """Micro-batches per data-parallel rank per step."""
    return cfg.train.global_batch // (cfg.train.micro_batch * cfg.parallel.dp)


def micro_batches_in_flight(pp: int, pp_rank: int, schedule: str, num_chunks: int) -> int:
    """Micro-batches whose activations a rank holds at its peak under the schedule."""
    if pp == 1:
        return 1
    if schedule in ("dualpipe", "dualpipev"):
        return min(pp + 1, num_chunks)
    return min(pp - pp_rank, num_chunks)


def bubble_units(pp: int, schedule: str, extra: float = 0.0) -> float:
    """Idle time per step in forward-chunk units F (DualPipe paper Table 2 with B = (2 + extra)F, W = F
    and F&B = F + B; `extra`: what a backward recomputes beyond its 2F): 1F1B (PP-1)(F+B);
    DualPipe/DualPipeV (PP/2-1)(F&B + B - 3W)."""
    if pp == 1:
        return 0.0
    if schedule in ("dualpipe", "dualpipev"):
        return (pp / 2 - 1) * (2.0 + 2 * extra)
    return (pp - 1) * (3.0 + extra)


def roofline(cfg: DictConfig, ranks: list[RankPlan], gpu: GPUSpec) -> dict[str, float]:
    """Step time of the slowest planned rank and what follows from it (see the module docstring)."""
    from twinpipe.parallel.recompute import parse_options
    from twinpipe.trainer.build import model_config
    from twinpipe.trainer.flops import flops_per_token

    p, t, c = cfg.parallel, cfg.train, model_config(cfg.model)
    fp8 = cfg.fp8.backend != "off"
    peak = (gpu.fp8_tflops if fp8 else gpu.bf16_tflops) * 1e12
    tokens = t.micro_batch * t.seq_len
    stages = stages_held(cfg)
    recompute = tuple(parse_options(t.recompute))
    step_times = []
    for r in ranks:
        flops = sum(forward_flops(c, b, t.seq_len) for b in r.blocks) * tokens / stages
        if r.holds_head:
            flops += 2.0 * c.vocab_size * c.hidden_size * tokens * (1 + c.num_nextn_predict_layers) / stages
        weight_read = (r.params - r.expert_params) * 2 / stages + r.expert_params * (1 if fp8 else 2) / stages
        f_time = max(flops / peak, (weight_read + r.activation_bytes_per_micro_batch) / (gpu.hbm_tb_s * 1e12))
        # inside the backwards: the recomputed forwards, and the FP8 weight transposes (read + write)
        rerun = sum(recompute_flops(c, b, t.seq_len, recompute) for b in r.blocks) * tokens / stages / peak
        transposes = 2 * r.fp8_transpose_bytes_per_step / (gpu.hbm_tb_s * 1e12)
        compute = chunks(cfg) * (3 * f_time + rerun) + transposes
        bubble = bubble_units(p.pp, p.schedule, (rerun + transposes / chunks(cfg)) / f_time) * f_time
        inside = min(p.ep, gpu.gpus_per_node)
        link = (inside / p.ep) / (gpu.nvlink_gb_s * 1e9) + (1 - inside / p.ep) / (gpu.ib_gb_s * 1e9)
        a2a = r.all_to_all_bytes_per_step * link
        overlapped = max(compute, a2a) if stages == 2 else compute + a2a
        dense = r.params - r.expert_params
        edp = p.dp // p.ep
        # ZeRO-1: fp32 gradient all-reduce (2x) + master all-gather (1x) over dp; experts all-reduced over edp
        dp_bytes = 3 * 4 * dense * (p.dp - 1) / p.dp + 2 * 4 * r.expert_params * (edp - 1) / edp
        if cfg.optim.get("shard_experts", False):  # + the updated slot chunks all-gathered over edp
            dp_bytes += (2 if cfg.optim.param_dtype == "bf16" else 4) * r.expert_params * (edp - 1) / edp
        dp_comm = dp_bytes / (gpu.ib_gb_s * 1e9)
        optimizer = 3 * (r.optimizer_bytes + r.weights_bytes) / (gpu.hbm_tb_s * 1e12)
        step_times.append(dict(rank=r.rank, compute_s=compute, recompute_s=chunks(cfg) * rerun,
                               fp8_transposes_s=transposes, all_to_all_s=a2a,
                               bubble_s=bubble, dp_comm_s=dp_comm,
                               optimizer_s=optimizer,
                               step_s=overlapped + bubble + dp_comm + optimizer))
    slowest = max(step_times, key=lambda s: s["step_s"])
    world = p.pp * p.dp
    tps = t.global_batch * t.seq_len / slowest["step_s"] / world
    model_flops = flops_per_token(c, t.seq_len)
    return dict(**slowest, bubble_fraction=slowest["bubble_s"] / slowest["step_s"], tokens_per_s_per_gpu=tps,
                mfu_bf16=tps * model_flops / (gpu.bf16_tflops * 1e12), flops_per_token=model_flops,
                gpu_hours_per_trillion_tokens=1e12 / tps / 3600)


def plan(cfg: DictConfig, gpu: str = "H800", ranks: list[int] | None = None, attention: str = "fused",
         rollout: tuple[int, int] | None = None, world: int | None = None, check_fit: bool = True) -> dict:
    """The plan of `ranks` (default: dp rank 0 of every pipeline rank) as a JSON-ready dict; raises
    ValueError in one line for an impossible layout or a rank over the GPU's memory."""
    from twinpipe.parallel.grid import grid_shape_error
    from twinpipe.trainer import preflight

    if gpu not in GPUS:
        raise ValueError(f"--gpu {gpu}: unknown; allowed: {', '.join(GPUS)}")
    p = cfg.parallel
    error = grid_shape_error(world or p.pp * p.dp, p.pp, p.dp, p.ep)
    if error:
        raise ValueError(error.replace("world size", "--world"))
    preflight.check(cfg)
    spec = GPUS[gpu]
    ranks = ranks if ranks is not None else [s * p.dp for s in range(p.pp)]
    bad = [r for r in ranks if not 0 <= r < p.pp * p.dp]
    if bad:
        raise ValueError(f"--rank {bad[0]}: outside the world of parallel.pp x parallel.dp = {p.pp * p.dp}")
    if rollout is None:
        per_rank = cfg.train.global_batch // p.dp if "grpo" in cfg else cfg.train.micro_batch
        rollout = (per_rank, cfg.train.seq_len)
    planned = [plan_rank(cfg, r, attention, rollout) for r in ranks]
    result = dict(gpu=asdict(spec), world=p.pp * p.dp, pp=p.pp, dp=p.dp, ep=p.ep, schedule=p.schedule,
                  attention=attention, ranks=[asdict(r) for r in planned], step=roofline(cfg, planned, spec))
    if check_fit:
        check_fits(result, cfg)
    return result


def check_fits(result: dict, cfg: DictConfig, reserve_gib: float = 0.0) -> None:
    """ValueError naming the rank, its bytes and their parts when a planned rank needs more than the
    GPU's memory less `reserve_gib` (what the plan does not count: the CUDA context, NCCL's buffers,
    the allocator's fragmentation; `twinpipe-plan --reserve`)."""
    worst = max(result["ranks"], key=lambda r: r["total_bytes"])
    gpu = result["gpu"]
    if worst["total_bytes"] > gpu["hbm_gb"] * 1e9 - reserve_gib * GIB:
        g = lambda k: worst[k] / GIB  # noqa: E731
        moments = ", or set optim.moment_dtype=bf16" if cfg.optim.moment_dtype != "bf16" else ""
        reserved = f" less --reserve {reserve_gib:g} GiB" if reserve_gib else ""
        raise ValueError(f"rank {worst['rank']} (pp rank {worst['pp_rank']}) needs {g('total_bytes'):.1f} GiB > "
                         f"{gpu['hbm_gb']:.0f} GB of the {gpu['name']}{reserved} (activations {g('activation_bytes'):.1f} "
                         f"GiB for {worst['micro_batches_in_flight']} micro-batches in flight, backward working "
                         f"memory {g('working_bytes'):.1f}, weights "
                         f"{g('weights_bytes'):.1f} + FP8 copies {g('fp8_weight_cache_bytes'):.1f}, gradients "
                         f"{g('grad_bytes'):.1f}, optimizer {g('optimizer_bytes'):.1f}): raise parallel.pp or "
                         f"parallel.ep, lower train.micro_batch={cfg.train.micro_batch} or recompute more "
                         f"(train.recompute){moments}")


def report(result: dict) -> str:
    """The plan as a table, one line per rank, then the step estimate."""
    lines = [f"{result['world']} GPUs ({result['gpu']['name']}): pp {result['pp']} x dp {result['dp']} "
             f"(ep {result['ep']}), {result['schedule']}",
             f"{'rank':>6} {'pp':>3} {'params':>8} {'weights':>8} {'fp8 w':>6} {'grads':>8} {'optim':>8} {'act':>8} "
             f"{'(mb)':>5} {'work':>6} {'kv':>7} {'total':>8} {'a2a/step':>9}   (GiB)"]
    for r in result["ranks"]:
        g = lambda k: r[k] / GIB  # noqa: E731
        lines.append(f"{r['rank']:>6} {r['pp_rank']:>3} {r['params'] / 1e9:>7.2f}B {g('weights_bytes'):>8.2f} "
                     f"{g('fp8_weight_cache_bytes'):>6.2f} {g('grad_bytes'):>8.2f} {g('optimizer_bytes'):>8.2f} {g('activation_bytes'):>8.2f} "
                     f"{r['micro_batches_in_flight']:>5} {g('working_bytes'):>6.2f} {g('kv_cache_bytes'):>7.2f} "
                     f"{g('total_bytes'):>8.2f} "
                     f"{g('all_to_all_bytes_per_step'):>9.1f}")
    s = result["step"]
    lines.append(f"step {s['step_s']:.2f} s (compute {s['compute_s']:.2f}, all-to-all {s['all_to_all_s']:.2f}, "
                 f"bubble {s['bubble_s']:.2f}, dp {s['dp_comm_s']:.2f}, optimizer {s['optimizer_s']:.2f}): "
                 f"{s['tokens_per_s_per_gpu']:.0f} tokens/s per GPU, MFU {100 * s['mfu_bf16']:.1f}% of BF16 "
                 f"peak, {s['gpu_hours_per_trillion_tokens'] / 1e3:.0f}K GPU-hours per trillion tokens")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from hydra import compose, initialize_config_module

    from twinpipe.trainer import config

    parser = argparse.ArgumentParser(prog="twinpipe-plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="recipe overrides, as for twinpipe-train")
    parser.add_argument("--config-name", default="pretrain")
    parser.add_argument("--gpu", default="H800", help=f"one of {', '.join(GPUS)}")
    parser.add_argument("--world", type=int, default=None, help="GPUs of the job (checked = pp x dp)")
    parser.add_argument("--rank", type=int, action="append", help="plan this rank (repeatable)")
    parser.add_argument("--all-ranks", action="store_true", help="every rank of the world in turn")
    parser.add_argument("--attention", choices=("fused", "math"), default="fused")
    parser.add_argument("--rollout", type=int, nargs=2, metavar=("BATCH", "LEN"), default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--reserve", type=float, default=0.0, metavar="GIB",
                        help="GiB per GPU the plan does not count (CUDA context, NCCL buffers, fragmentation): "
                             "the fit check leaves them free")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    config.set_offline_defaults()
    config.register()
    try:
        if args.reserve < 0:
            raise ValueError(f"--reserve {args.reserve:g}: must be >= 0 GiB")
        with initialize_config_module("twinpipe.recipes", version_base=None):
            cfg = compose(args.config_name, overrides=["run.dir=plan", *args.overrides])
        config.validate(cfg)
        ranks = list(range(cfg.parallel.pp * cfg.parallel.dp)) if args.all_ranks else args.rank
        result = plan(cfg, args.gpu, ranks, args.attention, tuple(args.rollout) if args.rollout else None,
                      args.world, check_fit=False)
        print(report(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        check_fits(result, cfg, args.reserve)  # after the table and the JSON: the user sees what does not fit
    except ValueError as e:
        print(f"twinpipe-plan: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
