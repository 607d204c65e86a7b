"""`init_from` per rank (trainer/init_from.local_fill): every rank of every layout reads only the tensors
it holds, and they equal the one-process full load (`checkpoint.load_model_for_inference`) exactly:
the same file bytes converted the same way (BF16 -> fp32, FP8 blocks dequantised with the same scales),
expert slots (EPLB replicas included) row for row from their logical expert."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module

from twinpipe.parallel.local import run_local
from twinpipe.trainer import config as recipe_config

recipe_config.register()

MODEL = ["model=tiny", "model.vocab_size=512", "model.hidden_size=128", "model.num_hidden_layers=4",
         "model.intermediate_size=256", "model.moe_intermediate_size=128", "model.num_attention_heads=2",
         "train.seq_len=32", "train.micro_batch=2", "run.dir=unused", "data.paths=[unused]"]
LAYOUTS = {"one": (1, 1, 1, "1f1b", []), "pp2": (2, 1, 1, "dualpipe", ["train.global_batch=8"]),
           "dp2ep2+replicas": (1, 2, 2, "1f1b", ["train.global_batch=8", "eplb.replicas=12"]),
           "pp2dp2ep2": (2, 2, 2, "dualpipev", ["train.global_batch=16"])}


def sft_recipe(init_from: str, layout: str):
    pp, dp, ep, schedule, extra = LAYOUTS[layout]
    with initialize_config_module("twinpipe.recipes", version_base=None):
        return compose("sft", overrides=[*MODEL, f"init_from={init_from}", f"parallel.pp={pp}",
                                         f"parallel.dp={dp}", f"parallel.ep={ep}",
                                         f"parallel.schedule={schedule}", *extra])


def _held(rank: int, world: int, cfg) -> dict[str, torch.Tensor]:
    """This rank's tensors by their name in the full model; expert slots as (logical ids, rows)."""
    from twinpipe.parallel.experts.layer import ExpertParallelExperts
    from twinpipe.parallel.grid import build_grid
    from twinpipe.trainer.build import build_model

    p = cfg.parallel
    model = build_model(cfg, torch.device("cpu"), build_grid(p.pp, p.dp, p.ep))
    held = {n: t.detach().clone() for n, t in model.state_dict().items()
            if not t.is_meta and ".experts.local." not in n and not n.endswith(("phy2log", "log2phy", "logcnt"))}
    for name, layer in model.named_modules():
        if isinstance(layer, ExpertParallelExperts):
            for pname, param in layer.local.named_parameters():
                held[f"{name}.{pname}"] = (layer.local_logical_ids().clone(), param.detach().clone())
    return held


def check_layout(path: str, layout: str) -> None:
    from pathlib import Path

    from twinpipe.model import load_hf
    from twinpipe.trainer.checkpoint.io import load_model_for_inference

    if (Path(path) / "config.json").is_file():  # what load_model_for_inference loads, without a tokenizer
        full = load_hf(path, dtype=torch.float32).state_dict()
    else:
        full = load_model_for_inference(path, torch.float32)[0].state_dict()
    cfg = sft_recipe(path, layout)
    ranks = run_local(_held, cfg.parallel.pp * cfg.parallel.dp, cfg, timeout_s=300)
    seen = set()
    for held in ranks:
        for name, value in held.items():
            if isinstance(value, tuple):  # expert slots: [S, ...] rows of logical experts ids
                ids, rows = value
                assert torch.equal(rows, full[name][ids]), (layout, name)
            else:
                assert torch.equal(value, full[name].to(value.dtype)), (layout, name)
            seen.add(name)
    assert seen == set(full), sorted(set(full) ^ seen)[:5]  # the ranks together hold everything


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    from twinpipe.model.hf import save_hf
    from twinpipe.model.transformer import Transformer
    from twinpipe.trainer.build import model_config

    torch.manual_seed(0)
    model = Transformer(model_config(sft_recipe("x", "one").model))
    with torch.no_grad():
        for module in model.modules():  # a non-zero router bias, to see it read
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.normal_()
    root = tmp_path_factory.mktemp("hf")
    return {"bf16": str(save_hf(model, root / "bf16")), "fp8": str(save_hf(model, root / "fp8", fp8=True))}


# FP8 dequantisation is per tensor, the same in every layout: two layouts show it
@pytest.mark.parametrize("fmt,layout", [*(("bf16", layout) for layout in LAYOUTS), ("fp8", "one"),
                                        ("fp8", "pp2dp2ep2")])
def test_hf_folder_per_rank_equals_full_load(hf_folders, fmt, layout):
    check_layout(hf_folders[fmt], layout)


def test_twinpipe_checkpoint_per_rank_equals_full_load(data_dir, tmp_path):
    from trainer_recipe import make_cfg

    from twinpipe.trainer.loop import train

    cfg = make_cfg(data_dir, tmp_path / "run", "train.steps=1", "checkpoint.at_end=true",
                   "model.hidden_size=128", "model.moe_intermediate_size=128", "model.num_hidden_layers=4",
                   "model.intermediate_size=256")
    train(cfg)
    check_layout(str(tmp_path / "run"), "pp2dp2ep2")


def test_mismatched_architecture_is_one_line(hf_folders):
    from twinpipe.trainer.build import build_model

    cfg = sft_recipe(hf_folders["bf16"], "one")
    cfg.model.hidden_size = 96
    with pytest.raises(ValueError, match=r"model.hidden_size=96 in the recipe but 128 in the checkpoint"):
        build_model(cfg, torch.device("cpu"))
