"""Per-rank construction: a model built on meta and `parallelize`d holds, on every rank of every layout,
exactly the one-process weights of what it owns, and memory only for that.

Exact (`torch.equal`): each parameter (each expert row) is drawn from its own generator seeded by
(seed, name[, expert]) on the CPU in every layout, the same arithmetic. Memory: the bytes of the
parameters a rank materialises are counted against what its stages and slots own, and a mid-size
model's peak RSS growth while a rank builds is measured in forked ranks (the peak is reset through
/proc/self/clear_refs after the process groups exist; the parent's pages are shared, so a rank's
growth is its own allocations; a tiny model is built first so that imports do not count).
"""

from __future__ import annotations

import pytest
import torch

from twinpipe.model.config import ModelConfig
from twinpipe.model.init import init_model_by_name
from twinpipe.model.transformer import Transformer
from twinpipe.parallel.local import run_local

SEED = 11


def config(**overrides) -> ModelConfig:
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                num_hidden_layers=4, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    return ModelConfig.preset("tiny", **{**base, **overrides})


def one_process(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    model = Transformer(cfg)
    init_model_by_name(model, SEED, cfg.initializer_range)
    return model.state_dict()


def _build(rank, world, cfg, pp, dp, ep, schedule, replicas, fp8, grid=None):
    from twinpipe.parallel.grid import build_grid
    from twinpipe.parallel.parallelize import parallelize

    grid = grid or build_grid(pp, dp, ep)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = parallelize(model, grid, torch.device("cpu"), schedule, "emulate" if fp8 else "off",
                        num_replicas=replicas, seed=SEED)
    state = {k: v.clone() for k, v in model.state_dict().items() if not v.is_meta}
    held = sum(p.numel() for p in model.parameters() if not p.is_meta)
    return grid.ep_rank, state, held


def _logical(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`...experts.local.<w>` [S, ...] -> (`...experts.<w>` name, slots, slot -> logical expert)."""
    out = {}
    for key, value in state.items():
        if ".experts.local." in key:
            layer = key.split(".experts.local.")[0]
            out[key.replace(".experts.local.", ".experts.")] = (value, state[f"{layer}.experts.phy2log"])
    return out


@pytest.mark.parametrize("pp,dp,ep,schedule,replicas,fp8", [
    (2, 1, 1, "dualpipe", None, False), (2, 1, 1, "dualpipev", None, False), (4, 1, 1, "1f1b", None, False),
    (1, 2, 2, "1f1b", None, False), (1, 4, 4, "1f1b", 12, False), (2, 2, 2, "dualpipe", None, True),
], ids=["pp2-dualpipe", "pp2-dualpipev", "pp4-1f1b", "ep2", "ep4-eplb-replicas", "pp2xdp2xep2-fp8"])
def test_every_rank_holds_the_one_process_weights(pp, dp, ep, schedule, replicas, fp8):
    cfg = config()
    ref = one_process(cfg)
    ranks = run_local(_build, pp * dp, cfg, pp, dp, ep, schedule, replicas, fp8, timeout_s=300)
    seen = set()
    for ep_rank, state, _ in ranks:
        slots = _logical(state)
        for key, value in state.items():
            if ".experts.local." in key or key.endswith(("phy2log",)):
                continue
            assert torch.equal(value, ref[key]), key
            seen.add(key)
        for key, (value, phy2log) in slots.items():
            per_rank = value.shape[0]
            mine = phy2log[ep_rank * per_rank:(ep_rank + 1) * per_rank]
            assert torch.equal(value, ref[key][mine]), key  # each slot is its logical expert's row
            seen.add(key)
    assert seen == set(ref)  # every weight of the model is held somewhere


def test_a_rank_materialises_only_what_it_owns():
    """pp=2 x dp=2 x ep=2 (DualPipeV over 4 layers: pipeline rank r holds stages r and 3-r, each module
    once): the parameters the ranks hold add up to the dense weights once per dp replica and the experts
    once in all (each ep rank materialises only its slots)."""
    cfg = config()
    full = Transformer(cfg)
    expert_numel = sum(p.numel() for n, p in full.named_parameters() if ".experts." in n)
    ranks = run_local(_build, 4, cfg, 2, 2, 2, "dualpipev", None, False, timeout_s=300)
    total_held = sum(held for _, _, held in ranks)
    dense = sum(p.numel() for p in full.parameters()) - expert_numel
    # each stage's dense weights on both dp ranks of its pipeline rank; its experts split over them (ep=2)
    assert total_held == 2 * dense + expert_numel


def _peak_growth(rank, world, cfg, pp, dp, ep):
    """Peak RSS growth (bytes) of this process while it builds its part of the model."""
    import gc

    from twinpipe.parallel.grid import build_grid

    import ctypes

    # Tensors above 128 KiB get fresh pages from mmap, so they show in the RSS: glibc's dynamic
    # threshold would otherwise serve them from heap pages the forked parent left resident, and the
    # growth would depend on what the parent process did before (M_MMAP_THRESHOLD = -3).
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
    grid = build_grid(pp, dp, ep)  # process groups first: their buffers are not the model's
    _build(rank, world, config(), pp, dp, ep, "dualpipev", None, False, grid)  # imports the code paths
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    _build(rank, world, cfg, pp, dp, ep, "dualpipev", None, False, grid)
    return (_status_kib("VmHWM") - before) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@pytest.mark.slow
def test_peak_memory_per_rank_is_proportional_to_what_it_owns():
    """A 35M-parameter config: one process vs pp=2 x dp=2 x ep=2 under DualPipeV (each rank half of the
    blocks, half of their experts; DualPipe would hold every stage twice): every rank's peak growth
    < 0.6x the one-process growth (the old build held the whole model on every rank: 1.0x)."""
    cfg = config(vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                 num_hidden_layers=4, n_routed_experts=16, num_attention_heads=8, q_lora_rank=128,
                 kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    [single] = run_local(_peak_growth, 1, cfg, 1, 1, 1, timeout_s=300)
    ranks = run_local(_peak_growth, 4, cfg, 2, 2, 2, timeout_s=300)
    assert single > 100e6  # the model is big enough that its weights dominate the growth
    assert max(ranks) < 0.6 * single, (ranks, single)
    print(f"peak growth: one process {single / 1e6:.0f} MB, ranks {[round(r / 1e6) for r in ranks]} MB")
