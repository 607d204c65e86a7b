"""A checkpoint of an expert-parallel run (EP=2, EPLB re-plans with redundant slots) loads offline, in
one process without a process group, into one plain `Transformer` and converts to HF.

The loaded model must hold exactly the weights the EP ranks trained (dense tensors as the ranks hold
them, expert e from the first slot serving it; bit for bit) and give the EP model's logits on a batch.
The EP forward computes every (token, expert) row with the same fp32 arithmetic as `Experts.forward`
and sums each token's picks in
the same logical-expert order, but its per-expert matmuls run over other row counts (rows from both
ranks, replicas splitting an expert's rows), and CPU BLAS may block a matmul differently by row
count: logits are compared at rtol 1e-5 / atol 1e-6 (measured: max abs difference 1.5e-8), while
expert rows taken from the wrong slots (slot e for expert e, placement ignored) fail both the logits
and the per-slot weight checks. The weights themselves are checked exactly, every slot of every rank
against its expert's row, independently of the merge the library uses. A pp=2 x ep=2 run checks the
merge of the pipeline ranks' layers, and a checkpoint lacking an EP rank's slots or a placement is
refused with the key named (a resume under another parallel.ep: tests/trainer/test_reshard.py).
"""

import pytest
import torch

from twinpipe.parallel.local import run_local
from trainer_recipe import make_cfg

STEPS = 2
EP_RECIPE = ["parallel.dp=2", "parallel.ep=2", "eplb.every=1", "eplb.replicas=12", f"train.steps={STEPS}",
             "checkpoint.every=0", "checkpoint.at_end=true", "resume=never"]


def _batch() -> torch.Tensor:
    return torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(7))  # [B, T]


def _ep_rank(rank, world, data_dir, run_dir):
    """Train, then return the placements, the dense and slot tensors and the EP model's logits."""
    from twinpipe.parallel.experts.layer import expert_parallel_layers
    from twinpipe.trainer.loop import train

    summary = train(make_cfg(data_dir, run_dir, *EP_RECIPE))
    model = summary["model"].eval()
    placements = {name: layer.phy2log.clone() for name, layer in model.named_modules()
                  if layer in set(expert_parallel_layers(model))}
    slots = {k: v.clone() for k, v in model.state_dict().items() if ".local." in k}  # [S, ...] each
    dense = {k: v.clone() for k, v in model.state_dict().items()
             if ".local." not in k and not k.endswith(".phy2log")}
    with torch.no_grad():
        logits = model(_batch())                                                    # [B, T, V]
    return {"placements": placements, "slots": slots, "dense": dense, "logits": logits,
            "slots_received": summary["last"]["eplb/slots_received"]}


def _plain_state(out) -> dict[str, torch.Tensor]:
    """The unsharded model's state dict from what the EP ranks returned: dense tensors as rank 0 holds
    them, expert e's rows from the first slot serving it (replicas are checked slot by slot below)."""
    state = dict(out[0]["dense"])
    for key in out[0]["slots"]:
        layer, param = key.split(".local.")
        slots = torch.cat([rank["slots"][key] for rank in out])                     # [R, ...]
        placement = out[0]["placements"][layer].tolist()
        state[f"{layer}.{param}"] = slots[[placement.index(e) for e in range(max(placement) + 1)]]
    return state


@pytest.fixture(scope="module")
def ep_run(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ep2-eplb")
    out = run_local(_ep_rank, 2, data_dir, run_dir)
    return run_dir / "checkpoints" / f"step_{STEPS}", out


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp in one process, on purpose
def test_ep_checkpoint_loads_for_inference(ep_run):
    from twinpipe.trainer.checkpoint.io import load_model_for_inference

    ckpt, out = ep_run
    placements = out[0]["placements"]
    assert placements and all(torch.equal(p, out[1]["placements"][n]) for n, p in placements.items())
    # the re-plans really moved slots: not the initial slot p -> expert p % 8 any more
    assert any(not torch.equal(p, torch.arange(12) % 8) for p in placements.values())
    assert out[0]["slots_received"] + out[1]["slots_received"] > 0

    model, tokenizer = load_model_for_inference(ckpt)
    assert tokenizer.vocab_size == 512
    loaded = model.state_dict()
    want = _plain_state(out)
    assert set(loaded) == set(want)
    for name, value in want.items():
        assert torch.equal(loaded[name], value), name
    # every slot of every rank (replicas included) holds its expert's loaded row
    checked = 0
    for key in out[0]["slots"]:
        layer, param = key.split(".local.")
        slots = torch.cat([rank["slots"][key] for rank in out])                     # [R, ...]
        for p, expert in enumerate(placements[layer].tolist()):
            assert torch.equal(loaded[f"{layer}.{param}"][expert], slots[p]), (key, p, expert)
            checked += 1
    assert checked == 12 * 3 * len(placements)
    with torch.no_grad():
        logits = model(_batch())                                                    # [B, T, V]
    for rank in out:
        torch.testing.assert_close(logits, rank["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_ep_checkpoint_converts_to_hf(ep_run, tmp_path):
    from twinpipe.model import load_hf
    from twinpipe.trainer.cli.convert import main

    ckpt, out = ep_run
    main([f"src={ckpt}", f"dst={tmp_path / 'hf'}", "dtype=fp32"])
    got = load_hf(tmp_path / "hf", dtype=torch.float32).state_dict()
    want = _plain_state(out)
    assert set(got) == set(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_ep_checkpoint_converts_by_ranges_as_the_whole_model_did(ep_run, tmp_path):
    """twinpipe-convert reads one tensor (one expert) at a time; to BF16 and to FP8 it writes what
    building the whole model and `save_hf` wrote (the same casts and block quantisation of the same
    values; the router bias fp32 as saved)."""
    from safetensors.torch import load_file

    from twinpipe.model.hf import save_hf
    from twinpipe.trainer.checkpoint.io import load_model_for_inference
    from twinpipe.trainer.cli.convert import convert_twinpipe

    ckpt, _ = ep_run
    plain = load_model_for_inference(ckpt, torch.float32)[0].state_dict()
    model = load_model_for_inference(ckpt, torch.bfloat16)[0]
    for fp8 in (False, True):
        new = convert_twinpipe(ckpt, tmp_path / f"new{fp8}", fp8=fp8, max_shard_bytes=1 << 16)
        old = save_hf(model, tmp_path / f"old{fp8}", fp8=fp8, max_shard_bytes=1 << 16)
        got, want = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}
                     for d in (new, old))
        assert set(got) == set(want) and len(got) > 90
        for name, value in want.items():
            assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
        biases = [k for k in got if k.endswith("e_score_correction_bias")]
        assert biases and all(got[k].dtype == torch.float32 for k in biases)
        layer = int(biases[0].split(".")[2])  # fp32 as saved, not rounded through BF16
        assert torch.equal(got[biases[0]], plain[f"layers.{layer}.mlp.gate.e_score_correction_bias"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_ep_checkpoint_missing_pieces_are_named(ep_run, data_dir, tmp_path):
    """A checkpoint lacking an EP rank's slots or a layer's placement is refused, naming the key
    (twinpipe-convert reports it and exits 1); the untouched checkpoint resumes under parallel.ep=1."""
    import shutil

    import torch.distributed.checkpoint as dcp

    from twinpipe.trainer.checkpoint import io as ckpt_mod
    from twinpipe.trainer.cli.convert import main
    from twinpipe.trainer.loop import train

    ckpt, _ = ep_run
    full = {}
    reader_meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    for flat, meta in reader_meta.items():
        top, name = flat.split(".", 1)
        if top.startswith("model"):
            full.setdefault(top, {})[name] = torch.empty(meta.size, dtype=meta.properties.dtype)
    dcp.load(full, checkpoint_id=ckpt, no_dist=True)
    placement = next(k for k in full["model"] if k.endswith(".phy2log"))

    def rewrite(name, state):
        folder = tmp_path / name
        folder.mkdir()
        for f in ("config.yaml", "tokenizer.json", "meta.json", "COMPLETE"):
            shutil.copy(ckpt / f, folder / f)
        dcp.save(state, checkpoint_id=folder, no_dist=True)
        return folder

    no_rank1 = rewrite("no-rank1", {k: v for k, v in full.items() if k != "model_experts_ep1_of2"})
    with pytest.raises(ValueError, match="no-rank1.*no key model_experts_ep1_of2"):
        ckpt_mod.load_model_for_inference(no_rank1)
    no_placement = rewrite("no-placement", {**full, "model": {k: v for k, v in full["model"].items()
                                                              if k != placement}})
    with pytest.raises(ValueError, match=f"no-placement.*no key model.{placement}"):
        ckpt_mod.load_model_for_inference(no_placement)
    with pytest.raises(SystemExit, match="twinpipe-convert: .*model_experts_ep1_of2"):
        main([f"src={no_rank1}", f"dst={tmp_path / 'hf'}"])
    assert not (tmp_path / "hf").exists()

    # a resume under another parallel.ep re-splits the experts' state (tests/trainer/test_reshard.py)
    assert train(make_cfg(data_dir, tmp_path / "ep1", f"train.steps={STEPS + 1}", f"resume={ckpt}"))["step"] == STEPS + 1


def _pp_ep_rank(rank, world, data_dir, run_dir):
    """pp=2 x dp=2 x ep=2: return what this rank holds (its stages) and its layers' placements."""
    from twinpipe.parallel.experts.layer import expert_parallel_layers
    from twinpipe.trainer.loop import train

    cfg = make_cfg(data_dir, run_dir, *EP_RECIPE, "parallel.pp=2", "parallel.schedule=dualpipev",
                   "model.num_hidden_layers=4", "train.micro_batch=1")
    model = train(cfg)["model"]
    layers = set(expert_parallel_layers(model))
    placements = {name: (m.ep_rank, m.slots_per_rank, m.phy2log.clone())
                  for name, m in model.named_modules() if m in layers}
    held = {k: v.clone() for k, v in model.state_dict().items() if not v.is_meta}
    return {"placements": placements, "held": held}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_pipeline_ep_checkpoint_loads_for_inference(data_dir, tmp_path):
    """A pp=2 x ep=2 run (each pipeline rank saved its stages' layers, each EP rank its slots, EPLB
    re-planned twice) loads into one model holding exactly every rank's trained weights."""
    from twinpipe.model.experts import Experts
    from twinpipe.parallel.experts.layer import ExpertParallelExperts
    from twinpipe.trainer.checkpoint.io import load_model_for_inference

    out = run_local(_pp_ep_rank, 4, data_dir, tmp_path)
    model, _ = load_model_for_inference(tmp_path / "checkpoints" / f"step_{STEPS}")
    loaded = model.state_dict()
    placements = [phy2log for rank in out for _, _, phy2log in rank["placements"].values()]
    assert any(not torch.equal(p, torch.arange(12) % 8) for p in placements)  # EPLB moved slots
    covered = set()
    for rank in out:
        for key, value in rank["held"].items():
            layer, sep, param = key.partition(".local.")
            if sep:  # this rank's slots: slot ep_rank * S + i serves expert phy2log[ep_rank * S + i]
                ep_rank, per_rank, phy2log = rank["placements"][layer]
                for i in range(per_rank):
                    expert = int(phy2log[ep_rank * per_rank + i])
                    assert torch.equal(loaded[f"{layer}.{param}"][expert], value[i]), (key, i)
                    covered.add((layer, param, expert))
            elif not key.endswith(".phy2log"):
                assert torch.equal(loaded[key], value), key
    moe_layers = [n for n, m in model.named_modules() if isinstance(m, Experts)]
    assert not any(isinstance(m, ExpertParallelExperts) for m in model.modules())
    assert len(moe_layers) == 4  # layers 1..3 and the MTP block
    assert covered == {(n, p, e) for n in moe_layers for p in ("gate_proj", "up_proj", "down_proj")
                       for e in range(8)}
