"""Resume under another parallel layout (parallel.pp, parallel.schedule, parallel.ep, parallel.dp).

Each case trains layout A for 4 steps with a checkpoint at step 2, then resumes that step-2
checkpoint in layout B for steps 3-4. Two checks:

1. Exact state. Both runs snapshot their optimizer state at the start of step 3's update (the state
   the step-2 checkpoint holds): every parameter's fp32 master, exp_avg, exp_avg_sq and AdamW step,
   taken from the optimizer's own buffers (ZeRO shards all-gathered over dp, expert slots mapped to
   logical experts through each rank's placement, every replica and pipeline copy checked equal),
   plus the router biases. A's and B's snapshots must be bit-identical (dtype included).
2. The continuation. B's steps 3-4 must follow A's own steps 3-4. From the same state the two
   layouts differ only in the order of fp32 additions (pipeline and data-parallel reductions,
   expert rows grouped by other slots): measured over steps 3-4 of these cases (fp32 and bf16
   moments alike; the same-layout case continues bit for bit), at most 6e-8 relative on the loss
   and 2.5e-7 on the gradient norm, expert loads equal (the 20-step bounds of
   tests/parallel/test_pipeline_trainer.py include a router tie flipping late). So
   `one_process.assert_matches_one_process` (step 3 exactly routed, losses and grad norm rel 1e-6, step
   4 rel 1e-5 while the routing agrees). Measured faults: experts taken from the
   wrong slots (placement ignored) move step 3's loss by 2.9e-5 and its grad norm by 4.5e-3 and
   change the expert loads; fresh AdamW moments move step 4's loss by 2.2e-3 (and fail check 1).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from twinpipe.parallel.local import run_local
from one_process import assert_matches_one_process
from trainer_recipe import make_cfg

STEPS, SAVED = 4, 2
COMMON = [f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=2", "model.num_hidden_layers=4",
          "train.micro_batch=1"]
EPLB = ["eplb.every=1", "eplb.replicas=12"]  # 12 slots for 8 experts, re-planned after every step


def _gather_flat(bucket, shard: torch.Tensor) -> torch.Tensor:
    """[shard] of the bucket's flat vector on this rank -> [N], all-gathered over its dp group."""
    import torch.distributed as dist

    if bucket.size == 1:
        return shard.clone()
    padded = torch.zeros(bucket.chunk, dtype=torch.float32)  # bf16 -> fp32 is exact
    padded[:bucket.hi - bucket.lo] = shard
    parts = [torch.empty_like(padded) for _ in range(bucket.size)]
    dist.all_gather(parts, padded, group=bucket.group)
    return torch.cat(parts)[:bucket.numel].to(shard.dtype)


def _snapshot(model, opt) -> dict:
    """name -> (kind, value): dense parameters {moment: tensor} whole, expert slots per logical expert
    {expert: [{moment: row}, ...] one entry per slot}, router biases as tensors."""
    out = {}
    for b in opt.buckets:
        full = {k: _gather_flat(b, getattr(b, k)) for k in ("master", "exp_avg", "exp_avg_sq")}
        for s in b.segments:
            out[s.name] = ("dense", {k: v[s.start:s.start + s.param.numel()].view(s.param.shape)
                                     for k, v in full.items()}, float(opt.step_count))
    for p, name in opt.expert_names.items():
        layer_name, param = name.split(".local.")
        layer = model.get_submodule(layer_name)
        st = opt.expert_opt.state[p]
        rows = {}
        for i, expert in enumerate(layer.local_logical_ids().tolist()):
            rows.setdefault(expert, []).append({"master": p[i].detach().clone(),
                                                "exp_avg": st["exp_avg"][i].clone(),
                                                "exp_avg_sq": st["exp_avg_sq"][i].clone()})
        out[f"{layer_name}.{param}"] = ("slots", rows, float(st["step"]))
    for key, value in model.state_dict().items():
        if key.endswith(("e_score_correction_bias", "phy2log")) and not value.is_meta:
            out[key] = ("buffer", value.clone(), None)
    return out


def _rank(rank, world, data_dir, run_dir, overrides):
    """Train (or resume) with `overrides`; return the state snapshot taken when the optimizer is about
    to apply the update of step SAVED + 1."""
    from twinpipe.trainer import loop

    snap = {}
    build = loop.build_optimizer

    def build_and_watch(model, *args, **kwargs):
        opt = build(model, *args, **kwargs)
        step = opt.step

        def step_watched(lr, clip_coef=1.0):
            if opt.step_count == SAVED and not snap:
                snap.update(_snapshot(model, opt))
            step(lr, clip_coef)

        opt.step = step_watched
        return opt

    loop.build_optimizer = build_and_watch
    loop.train(make_cfg(data_dir, run_dir, *COMMON, *overrides))
    return snap


def _merge(ranks: list[dict]) -> dict:
    """The ranks' snapshots -> name -> {moment: full tensor, "step": float}; pipeline copies, dp ranks
    and expert replicas must hold identical values."""
    merged, experts = {}, {}
    for snap in ranks:
        for name, (kind, value, step) in snap.items():
            if kind == "slots":
                for expert, rows in value.items():
                    experts.setdefault(name, {}).setdefault(expert, []).extend((row, step) for row in rows)
                continue
            entry = {"value": value} if kind == "buffer" else {**value, "step": step}
            if name in merged:
                for k, v in entry.items():
                    assert v == merged[name][k] if k == "step" else torch.equal(v, merged[name][k]), (name, k)
            merged[name] = entry
    for name, by_expert in experts.items():
        assert sorted(by_expert) == list(range(len(by_expert))), name  # every logical expert held
        entry = {}
        for k in ("master", "exp_avg", "exp_avg_sq"):
            rows = []
            for expert in sorted(by_expert):
                (first, _), *replicas = by_expert[expert]
                assert all(torch.equal(r[k], first[k]) for r, _ in replicas), (name, expert, k)
                rows.append(first[k])
            entry[k] = torch.stack(rows)                                               # [E, ...]
        steps = {s for rows in by_expert.values() for _, s in rows}
        assert len(steps) == 1, (name, steps)
        merged[name] = {**entry, "step": steps.pop()}
    return merged


def _resume_case(data_dir, tmp_path, world_a, layout_a, world_b, layout_b, same_placement=False):
    """Run A, resume its step-2 checkpoint as B, check both. `same_placement`: ep and the slot count
    stay, so B must keep A's EPLB placement (else B starts from its own fresh one)."""
    from twinpipe.trainer.metrics import read_metrics

    run_a, run_b = tmp_path / "a", tmp_path / "b"
    snap_a = _merge(run_local(_rank, world_a, data_dir, run_a, [*layout_a, "resume=never"]))
    saved = run_a / "checkpoints" / f"step_{SAVED}"
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["segments"] and all(isinstance(k, str) for k in meta["segments"])
    snap_b = _merge(run_local(_rank, world_b, data_dir, run_b, [*layout_b, f"resume={saved}"]))
    placements = [{k: snap.pop(k)["value"] for k in [k for k in snap if k.endswith("phy2log")]}
                  for snap in (snap_a, snap_b)]
    if same_placement:
        assert placements[0] and set(placements[0]) == set(placements[1])
        assert any(not torch.equal(p, torch.arange(12) % 8) for p in placements[0].values())  # EPLB moved
        for name, p in placements[0].items():
            assert torch.equal(placements[1][name], p), name
    assert set(snap_a) == set(snap_b)
    for name, entry in snap_a.items():
        for k, v in entry.items():
            got = snap_b[name][k]
            if k == "step":
                assert got == v == float(SAVED), name
            else:
                assert got.dtype == v.dtype and torch.equal(got, v), (name, k)
    want, got = read_metrics(run_a), read_metrics(run_b)
    assert [r["step"] for r in got] == list(range(SAVED + 1, STEPS + 1))
    assert_matches_one_process(want[SAVED:], got, later_grad=1e-5)  # from bitwise-equal state (checked above)
    for a, b in zip(want[SAVED:], got):
        assert b["lr"] == a["lr"] and b["tokens"] == a["tokens"]
    return snap_a, saved


PP2_DUALPIPEV = ["parallel.pp=2", "parallel.schedule=dualpipev"]


def test_pp2_dualpipev_to_pp1_bf16_moments(data_dir, tmp_path):
    """DualPipeV over 2 ranks -> one process, with bf16 moments (kept bf16, bit for bit). What cannot
    be re-split is refused naming the key: a checkpoint without the segment table (older format), a
    resume with another model config or another optim.zero."""
    from twinpipe.trainer.checkpoint import reshard
    from twinpipe.trainer.loop import train

    snap, saved = _resume_case(data_dir, tmp_path, 2, [*PP2_DUALPIPEV, "optim.moment_dtype=bf16"],
                               1, ["optim.moment_dtype=bf16"])
    assert snap["embed_tokens.weight"]["exp_avg"].dtype == torch.bfloat16

    old = tmp_path / "old-format"
    shutil.copytree(saved, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["segments"]
    (old / "meta.json").write_text(json.dumps(meta))
    (old / "SHA256SUMS").unlink()  # checkpoints of that format had no checksums either
    with pytest.raises(ValueError, match=r"parallel.pp=2 -> 1.*no parameter segment table.*resume with"):
        train(make_cfg(data_dir, tmp_path / "c", *COMMON, f"resume={old}"))
    with pytest.raises(ValueError, match=r"model config \(model.hidden_size=64, here model.hidden_size=32"):
        train(make_cfg(data_dir, tmp_path / "d", *COMMON, "model.hidden_size=32", f"resume={saved}"))
    layout = {**meta, "zero": "deepspeed"}
    with pytest.raises(ValueError, match="saved with optim.zero=ours, resuming with optim.zero=deepspeed"):
        reshard.layout_changes(saved, meta, layout)
    assert reshard.layout_changes(saved, meta, {**meta, "dp": 4}) == []  # dp alone: the fast path


def test_pp1_dp4_to_pp2_dualpipev_dp2_same_ep(data_dir, tmp_path):
    """One stage over dp=4 -> DualPipeV pp=2 x dp=2, experts over ep=2 with EPLB slots on both sides:
    the saved placement is kept."""
    _resume_case(data_dir, tmp_path, 4, ["parallel.dp=4", "parallel.ep=2", *EPLB],
                 4, [*PP2_DUALPIPEV, "parallel.dp=2", "parallel.ep=2", *EPLB], same_placement=True)


BF16 = ["optim.moment_dtype=bf16"]


def test_ep2_eplb_same_layout_bf16_moments(data_dir, tmp_path):
    """The fast path (one DCP read) with the experts' bf16 moments (`optim.experts_ep{r}`) and EPLB slots:
    the saved placement and every moment come back bit for bit, bf16."""
    layout = ["parallel.dp=2", "parallel.ep=2", *EPLB, *BF16]
    snap, _ = _resume_case(data_dir, tmp_path, 2, layout, 2, layout, same_placement=True)
    assert snap["layers.1.mlp.experts.gate_proj"]["exp_avg"].dtype == torch.bfloat16


def test_ep2_eplb_to_ep1_bf16_moments(data_dir, tmp_path):
    """Experts over 2 EP ranks with 12 EPLB-re-planned slots -> plain experts in one process's bucket,
    their bf16 moments kept bf16 bit for bit."""
    snap, _ = _resume_case(data_dir, tmp_path, 2, ["parallel.dp=2", "parallel.ep=2", *EPLB, *BF16], 1, BF16)
    assert snap["layers.1.mlp.experts.gate_proj"]["exp_avg_sq"].dtype == torch.bfloat16


def test_ep1_to_ep2_eplb_bf16_moments(data_dir, tmp_path):
    """Plain experts (dp=2) -> 2 EP ranks with 12 slots (replicas start as copies of their expert),
    bf16 moments from bucket segments into the slots' `ExpertAdamW`."""
    _resume_case(data_dir, tmp_path, 2, ["parallel.dp=2", *BF16], 2,
                 ["parallel.dp=2", "parallel.ep=2", *EPLB, *BF16])


def test_1f1b_pp2_to_dualpipe_pp2_dp2_ep2(data_dir, tmp_path):
    """Everything at once: 1F1B pp=2 -> DualPipe pp=2 x dp=2 with the experts over ep=2 (EPLB slots)."""
    _resume_case(data_dir, tmp_path, 2, ["parallel.pp=2", "parallel.schedule=1f1b"],
                 4, ["parallel.pp=2", "parallel.schedule=dualpipe", "parallel.dp=2", "parallel.ep=2", *EPLB])


@pytest.mark.parametrize("saved_dtype,resumed_dtype", [("fp32", "bf16"), ("bf16", "fp32")])
def test_resume_with_another_moment_dtype(data_dir, tmp_path, saved_dtype, resumed_dtype):
    """optim.moment_dtype may change at a resume (here under the saved layout, dp=2 x ep=2 with EPLB
    slots, so buckets and expert slots both): the moments come back converted (rounded to the nearest
    bf16, or widened exactly), fp32 masters, steps and placements bit-equal."""
    layout = ["parallel.dp=2", "parallel.ep=2", *EPLB]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    snap_a = _merge(run_local(_rank, 2, data_dir, run_a,
                              [*layout, f"optim.moment_dtype={saved_dtype}", "resume=never"]))
    saved = run_a / "checkpoints" / f"step_{SAVED}"
    snap_b = _merge(run_local(_rank, 2, data_dir, run_b,
                              [*layout, f"optim.moment_dtype={resumed_dtype}", f"resume={saved}"]))
    want = {"fp32": torch.float32, "bf16": torch.bfloat16}[resumed_dtype]
    assert set(snap_a) == set(snap_b)
    for name, entry in snap_a.items():
        for k, v in entry.items():
            got = snap_b[name][k]
            if k in ("exp_avg", "exp_avg_sq"):
                assert got.dtype == want and torch.equal(got, v.to(want)), (name, k)
            elif k == "step":
                assert got == v == float(SAVED), name
            else:
                assert torch.equal(got, v), (name, k)
