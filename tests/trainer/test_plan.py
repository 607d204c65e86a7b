"""`twinpipe-plan` (trainer/cli/plan.py) against what real ranks allocate on CPU, and at DeepSeek-V3 scale.

Tolerance 10% (issue 16): the plan counts shapes, the measurement counts the tensors the trainer
really allocates (weights, gradients after a backward: ZeRO-1's bucket, which the dense parameters'
`p.grad` view, and the expert slots' `p.grad`; ZeRO-1 shards and expert moments) on gloo ranks, and the autograd
graph's saved tensors of one forward; they differ only by small tensors the plan leaves out (RoPE
tables, placement tables, the loss's scalars)."""

from __future__ import annotations

import time

import pytest
import torch
from hydra import compose, initialize_config_module

from twinpipe.parallel.local import run_local
from twinpipe.trainer import config as recipe_config
from twinpipe.trainer.cli import plan as planner

recipe_config.register()

TINY = ["model=tiny", "model.vocab_size=512", "model.hidden_size=64", "model.num_hidden_layers=4",
        "model.intermediate_size=128", "model.moe_intermediate_size=32", "model.num_attention_heads=2",
        "train.seq_len=32", "train.micro_batch=2", "run.dir=plan"]
# mid-size: ~35M parameters, 16 experts top-4, wider attention
MID = ["model=tiny", "model.vocab_size=2048", "model.hidden_size=256", "model.num_hidden_layers=4",
       "model.intermediate_size=768", "model.moe_intermediate_size=128", "model.num_attention_heads=8",
       "model.n_routed_experts=16", "model.num_experts_per_tok=4",
       "+model.extra={q_lora_rank:128,kv_lora_rank:64}", "train.seq_len=64", "train.micro_batch=2", "run.dir=plan"]
LAYOUTS = {"pp2": ["parallel.pp=2", "parallel.schedule=dualpipe", "train.global_batch=8"],
           "dp2ep2": ["parallel.dp=2", "parallel.ep=2", "train.global_batch=8"],
           "pp2dp2ep2": ["parallel.pp=2", "parallel.dp=2", "parallel.ep=2", "parallel.schedule=dualpipev",
                         "train.global_batch=16"],
           "dp2ep2_bf16_params": ["parallel.dp=2", "parallel.ep=2", "train.global_batch=8", "train.dtype=bf16",
                                  "optim.param_dtype=bf16"],
           # the expert slots' moments and FP32 master sharded over edp = 2
           "dp4ep2_shard_experts": ["parallel.dp=4", "parallel.ep=2", "train.global_batch=16", "train.dtype=bf16",
                                    "optim.param_dtype=bf16", "optim.shard_experts=true"]}


def recipe(*overrides: str, name: str = "pretrain"):
    with initialize_config_module("twinpipe.recipes", version_base=None):
        cfg = compose(name, overrides=list(overrides))
    recipe_config.validate(cfg)
    return cfg


def _allocated(rank: int, world: int, cfg) -> dict[str, int]:
    from twinpipe.parallel.grid import build_grid
    from twinpipe.trainer.build import build_model
    from twinpipe.trainer.optim.optimizer import build_optimizer

    p = cfg.parallel
    grid = build_grid(p.pp, p.dp, p.ep)
    model = build_model(cfg, torch.device("cpu"), grid)
    opt = build_optimizer(model, cfg.optim, grid, schedule=p.schedule)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    moments = nbytes(b.master for b in opt.buckets) + nbytes(b.exp_avg for b in opt.buckets) \
        + nbytes(b.exp_avg_sq for b in opt.buckets)
    if opt.expert_opt is not None:
        moments += nbytes(t for st in opt.expert_opt.state.values() for k, t in st.items() if k != "step")
    held = [q for q in model.parameters() if not q.is_meta]
    trainable = [q for q in held if q.requires_grad]
    torch.autograd.backward([q.sum() for q in trainable])  # a gradient into every parameter, via AccumulateGrad
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # p.grad that are bucket views count once
                for t in [*(getattr(q, "main_grad", q.grad) for q in trainable), *(b.grad for b in opt.buckets)]}
    return dict(weights=nbytes(held), grads=sum(storages.values()), optimizer=moments)


@pytest.mark.parametrize("size", ["tiny", "mid"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_plan_bytes_match_allocations_on_ranks(size, layout):
    cfg = recipe(*(TINY if size == "tiny" else MID), *LAYOUTS[layout])
    world = cfg.parallel.pp * cfg.parallel.dp
    measured = run_local(_allocated, world, cfg, timeout_s=300)
    result = planner.plan(cfg, ranks=list(range(world)), attention="math", check_fit=False)
    for rank, (got, planned) in enumerate(zip(measured, result["ranks"])):
        for key, want in (("weights", planned["weights_bytes"]), ("optimizer", planned["optimizer_bytes"]),
                          ("grads", planned["grad_bytes"])):
            assert got[key] == pytest.approx(want, rel=0.10), (layout, rank, key, got[key], want)


@pytest.mark.parametrize("size,recompute,fp8", [
    ("tiny", "none", "off"), ("mid", "none", "off"), ("mid", "[norms,mla_up,moe]", "off"), ("mid", "full", "off"),
    ("tiny", "none", "emulate"), ("mid", "[norms,mla_up]", "emulate"), ("mid", "moe", "emulate"),
    ("mid", "[norms,mla_up,attention,router]", "emulate"), ("mid", "[attention,router,moe]", "off")])
def test_plan_activations_and_grads_match_one_forward(size, recompute, fp8):
    """Saved-for-backward bytes of the blocks in one micro-batch's forward (fp32, CPU math attention,
    with and without train.recompute, FP8 emulated or not) and the gradients its backward leaves, and
    under FP8 the weights' FP8 copies it leaves in the caches, against the plan. Measured at the time
    of writing: activations within 0.5% (FP8 cases 0.05-0.5%: small tensors the plan leaves out), the
    FP8 weight copies byte for byte; 10% is far from both."""
    from twinpipe.trainer.build import build_model

    cfg = recipe(*(TINY if size == "tiny" else MID), "train.global_batch=2", f"train.recompute={recompute}",
                 f"fp8.backend={fp8}")
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    seen: dict[int, int] = {}
    inside = [0]

    def pack(t):
        s = t.untyped_storage()
        if inside[0] and s.data_ptr() not in params:
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    blocks = [*model.layers, *(m.block for m in model.mtp)] if hasattr(model.mtp[0], "block") else list(model.layers)
    for b in blocks:
        b.register_forward_pre_hook(lambda *a: inside.__setitem__(0, 1))
        b.register_forward_hook(lambda *a: inside.__setitem__(0, 0))
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.train.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.forward_train(tokens)
    (out.hidden.float().square().mean() + sum(h.float().square().mean() for h in out.mtp_hidden)).backward()
    [planned] = planner.plan(cfg, attention="math", check_fit=False)["ranks"]
    assert sum(seen.values()) == pytest.approx(planned["activation_bytes_per_micro_batch"], rel=0.10)
    grads = sum(q.grad.numel() * q.grad.element_size() for q in model.parameters() if q.grad is not None)
    assert grads == pytest.approx(planned["weights_bytes"], rel=0.10)  # p.grad: fp32, one per weight
    caches = [w for m in model.modules() for c in getattr(m, "fp8_weight_caches", {}).values()
              for w in (c._w, c._w_t) if w is not None]
    cached = sum(w.q.untyped_storage().nbytes() + w.s.untyped_storage().nbytes() for w in caches)
    assert cached == pytest.approx(planned["fp8_weight_cache_bytes"], rel=0.10)
    assert (cached > 0) == (fp8 != "off")


def test_plan_fp8_weight_copies_without_transposes(monkeypatch):
    """fp8.cache_transposed=false: after a step's backward the caches hold each FP8 weight, not its
    transpose; during it one transpose at a time exists (measured: the largest live sum
    of the transposes handed out, through weak references, so what a backward still holds counts). The
    plan counts both byte for byte; 1% leaves room for nothing else."""
    import weakref

    from twinpipe.fp8.weight_cache import WeightCache
    from twinpipe.trainer.build import build_model

    live, peak = [], [0]
    original = WeightCache.get_transposed

    def tracked(self, weight, backend):
        w_t = original(self, weight, backend)
        live.append((weakref.ref(w_t.q), w_t.q.untyped_storage().nbytes() + w_t.s.untyped_storage().nbytes()))
        peak[0] = max(peak[0], sum(n for ref, n in live if ref() is not None))
        return w_t

    monkeypatch.setattr(WeightCache, "get_transposed", tracked)
    cfg = recipe(*MID, "train.global_batch=2", "fp8.backend=emulate", "fp8.cache_transposed=false")
    model = build_model(cfg, torch.device("cpu"))
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.train.seq_len))
    out = model.forward_train(tokens)
    (out.hidden.float().square().mean() + sum(h.float().square().mean() for h in out.mtp_hidden)).backward()
    caches = [c for m in model.modules() for c in getattr(m, "fp8_weight_caches", {}).values()]
    assert caches and all(c._w is not None and c._w_t is None for c in caches)
    kept = sum(c._w.q.untyped_storage().nbytes() + c._w.s.untyped_storage().nbytes() for c in caches)
    [planned] = planner.plan(cfg, attention="math", check_fit=False)["ranks"]
    [with_transposes] = planner.plan(recipe(*MID, "train.global_batch=2", "fp8.backend=emulate"), attention="math",
                                     check_fit=False)["ranks"]
    assert kept + peak[0] == pytest.approx(planned["fp8_weight_cache_bytes"], rel=0.01)
    assert planned["fp8_weight_cache_bytes"] < 0.75 * with_transposes["fp8_weight_cache_bytes"]


def test_recomputed_flops_are_the_regions_forward():
    """`recompute_flops` (the roofline's rerun in the backward) against torch's FLOP counter on the
    recomputed regions' forwards (mid config): `attention` (Block.attention) and `router` (Block.route)
    exactly, once the counter's full-square SDPA is halved for the causal mask as the plan counts it;
    `full` is the block's forward; `mla_up` the attention's without kv_a and o_proj."""
    from torch.utils.flop_counter import FlopCounterMode

    from twinpipe.model.transformer import Transformer
    from twinpipe.trainer.build import model_config

    c = model_config(recipe(*MID).model)
    B, T = 2, 64
    torch.manual_seed(0)
    block = Transformer(c).layers[1]  # a MoE block
    h, positions = torch.randn(B, T, c.hidden_size), torch.arange(T).expand(B, T)
    counted = {}
    for option, region in (("attention", lambda: block.attention(h, positions, None, None)),
                           ("router", lambda: block.route(h))):
        with FlopCounterMode(display=False) as counter:
            region()
        counted[option] = counter.get_total_flops()
    causal_half = c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * T * B * T  # of 2 x nh (qk + dv) T^2 B
    flops = {o: planner.recompute_flops(c, 1, T, (o,)) * B * T for o in ("attention", "router", "mla_up", "full")}
    assert flops["attention"] == counted["attention"] - causal_half > 0
    assert flops["router"] == counted["router"] > 0
    assert flops["full"] == planner.forward_flops(c, 1, T) * B * T
    kv_a_o = 2 * c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim + c.num_attention_heads * c.v_head_dim) * B * T
    assert flops["mla_up"] == flops["attention"] - kv_a_o


def test_plan_kv_cache_is_the_rollout_cache():
    from twinpipe.model.kv_cache import LatentKVCache
    from twinpipe.trainer.build import model_config

    cfg = recipe(*MID, "parallel.pp=2", "parallel.schedule=1f1b", "train.global_batch=4")
    result = planner.plan(cfg, rollout=(3, 40), check_fit=False)
    c = model_config(cfg.model)
    for r in result["ranks"]:  # 1F1B: pp rank 0 holds layers 0-1, rank 1 layers 2-3 (+ MTP: no cache)
        layers = [b for b in r["blocks"] if b < c.num_hidden_layers]
        cache = LatentKVCache(c, 3, 40, torch.float32, layers=layers)
        assert r["kv_cache_bytes"] == cache.c_kv.nbytes + cache.k_pe.nbytes


V3 = ["--config-name", "pretrain_v3", "run.dir=plan"]


def test_v3_671b_at_deepseek_layout_dry_runs_in_a_minute():
    """recipes/pretrain_v3.yaml: DeepSeek's layout and settings (PP16 DualPipe, DP128, EP64, 4096-token
    sequences, 15360 per batch, FP8, BF16 parameters with FP32 master weights, ZeRO-1 over the expert
    slots too), recomputing norms, MLA up-projections, the attention sublayer and the router: every
    rank fits an 80 GB H800 (the plan's fit check passes)."""
    cfg = recipe("run.dir=plan", name="pretrain_v3")
    p, t = cfg.parallel, cfg.train
    assert (p.pp, p.dp, p.ep, p.schedule, t.seq_len, t.global_batch, t.micro_batch) == \
        (16, 128, 64, "dualpipe", 4096, 15360, 1)
    assert cfg.fp8.backend != "off" and list(t.recompute) == ["norms", "mla_up", "attention", "router"]
    assert (cfg.optim.param_dtype, cfg.optim.shard_experts, cfg.fp8.cache_transposed) == ("bf16", True, False)
    start = time.monotonic()
    result = planner.plan(cfg, gpu="H800", check_fit=True)
    assert time.monotonic() - start < 60
    assert result["world"] == 2048 and len(result["ranks"]) == 16
    total = sum(r["params"] for r in result["ranks"])
    # DualPipe: every rank holds two stages, so the pp ranks' sum counts the model twice over; experts
    # are 1/64 of each layer's
    assert [r["micro_batches_in_flight"] for r in result["ranks"]] == [17] * 16
    assert 5e9 < total < 1e11
    for r in result["ranks"]:  # weights, their FP8 copies, gradients and ZeRO-1 state fit an 80 GB H800
        assert r["weights_bytes"] + r["fp8_weight_cache_bytes"] + r["grad_bytes"] + r["optimizer_bytes"] < 80e9
    step = result["step"]
    assert 0 < step["bubble_fraction"] < 0.1 and 100 < step["tokens_per_s_per_gpu"] < 1e5


@pytest.mark.parametrize("args,needle", [
    (["--world", "2047", *V3], "--world 2047 != parallel.pp x parallel.dp = 16 x 128 = 2048"),
    ([*TINY, "parallel.dp=2", "parallel.ep=2", "train.global_batch=8", "model.n_routed_experts=7",
      "model.n_group=1", "model.topk_group=1"], "model.n_routed_experts=7 is not divisible by parallel.ep=2"),
    ([*TINY, "parallel.dp=3", "parallel.ep=2", "train.global_batch=6"], "parallel.ep=2: must divide parallel.dp=3"),
    (["--rank", "384", *V3, "train.recompute=[norms,mla_up]"],
     "GB of the H800 SXM (activations 56.2 GiB for 17 micro-batches in flight"),
    (["--rank", "384", "--reserve", "4", *V3], "needs 71.3 GiB > 80 GB of the H800 SXM less --reserve 4 GiB"),
    (["--rank", "384", "--reserve", "-1", *V3], "--reserve -1: must be >= 0 GiB"),
])
def test_bad_layouts_are_one_line(args, needle, capsys):
    assert planner.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err


def _measured_working(cfg) -> int:
    """The largest block's working memory of one micro-batch's backward (`bench.working_memory.working_peak`:
    LiveBytes peak above what the forward left, FP8 kernels counted as one each), over the model's main blocks."""
    from bench.working_memory import working_peak
    from twinpipe.trainer.build import build_model

    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    return max(working_peak(model, layer, cfg.train.micro_batch, cfg.train.seq_len)["working"]
               for layer in range(len(model.layers)))


@pytest.mark.parametrize("size,recompute,fp8", [
    ("tiny", "[norms,mla_up,attention,router]", "emulate"), ("mid", "[norms,mla_up,attention,router]", "emulate"),
    ("mid", "[norms,mla_up]", "emulate"), ("tiny", "[norms,mla_up]", "off"), ("mid", "none", "off")])
def test_plan_working_bytes_match_the_largest_blocks_backward(size, recompute, fp8):
    """The plan's `working_bytes` (the backward's transient peak above the persistent and saved bytes)
    against the largest one measured over the blocks (fp32, CPU math attention). Measured at the time of
    writing: FP8 (the MoE blocks' experts backward is the peak) 1.1-3.5% over, without FP8 2.9% under
    (tiny) to 4.3% over (mid): the plan leaves out that the backward releases the saved tensors of the
    nodes it has passed (counted whole in `activation_bytes` until the block's backward ends) and
    small tensors (router, norms, index tensors). 10% (issue 16's bound) is above both; a missing phase
    or a wrong width is off by more.
    `test_plan_working_bytes_bound_the_recomputed_attention` covers the attention phase."""
    cfg = recipe(*(TINY if size == "tiny" else MID), "train.global_batch=2", f"train.recompute={recompute}",
                 f"fp8.backend={fp8}")
    [planned] = planner.plan(cfg, attention="math", check_fit=False)["ranks"]
    assert planned["working_bytes"] == pytest.approx(_measured_working(cfg), rel=0.10)
    assert planned["total_bytes"] == sum(planned[k] for k in ("weights_bytes", "fp8_weight_cache_bytes", "grad_bytes",
                                                              "optimizer_bytes", "activation_bytes", "working_bytes"))


@pytest.mark.parametrize("size", ["tiny", "mid"])
def test_plan_working_bytes_bound_the_recomputed_attention(size):
    """Without FP8 (the routed experts' backward smaller) and with train.recompute=attention, the
    attention phase is the plan's peak: it counts what the recomputed sublayer saves again, whole, while
    torch's non-reentrant checkpoint releases each tensor as the backward reads it. So it is an upper
    bound here, measured 1.10x (mid) and 1.43x (tiny) of the largest block's peak; at V3's shape it
    stays below the experts' phase (1.5 against 2.7 GiB a middle rank), which sets the figure. The
    bound: never under what is measured, and within 1.6x."""
    cfg = recipe(*(TINY if size == "tiny" else MID), "train.global_batch=2",
                 "train.recompute=[norms,mla_up,attention,router]", "fp8.backend=off")
    [planned] = planner.plan(cfg, attention="math", check_fit=False)["ranks"]
    measured = _measured_working(cfg)
    assert measured <= planned["working_bytes"] < 1.6 * measured, (measured, planned["working_bytes"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_experts_backward_bytes_match_measured(dtype):
    """`fp8_experts_backward_bytes`, phase by phase from `FP8GroupedSwiGLU.backward`, against the
    backward's LiveBytes peak (FP8 kernels counted as one each; the incoming gradient made outside, so
    taken off the plan's figure), segments not multiples of 128 and widths not multiples of 128
    included. Measured 0.2-0.3% under (scales and index tensors); 1% leaves room for nothing else."""
    from tests.fp8.test_experts import H, I, _pair, _swiglu_step
    from twinpipe.fp8.experts import FP8GroupedSwiGLU

    _, fp8 = _pair()
    fp8.to(dtype)
    for counts in ([70, 0, 130, 57], [700, 300, 1300, 570]):
        counts = torch.tensor(counts)
        m = int(counts.sum())
        g = torch.Generator().manual_seed(3)
        x, w, probe = torch.randn(m, H, generator=g).to(dtype), torch.rand(m, generator=g), torch.randn(m, H, generator=g)
        _swiglu_step(FP8GroupedSwiGLU, fp8, x, counts, w, probe, (True,) * 5)  # caches the weights' transposes
        measured = _swiglu_step(FP8GroupedSwiGLU, fp8, x, counts, w, probe, (True,) * 5)[2]
        planned = planner.fp8_experts_backward_bytes(m, H, I, 4, dtype.itemsize, dtype.itemsize) - m * H * dtype.itemsize
        assert planned == pytest.approx(measured, rel=0.01), (m, planned, measured)
