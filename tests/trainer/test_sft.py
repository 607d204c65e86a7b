"""The SFT recipe end to end: init_from (twinpipe checkpoint, HF folder, FP8 HF folder) and mismatches,
the first step's loss from the initial weights, freeze_router, evaluation, exact resume after SIGKILL,
pp=2 x dp=2 x ep=2 against one process, and bad input as one line naming file and line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from one_process import assert_matches_one_process
from trainer_recipe import TINY, killed_run
from twinpipe.parallel.local import run_local
from twinpipe.trainer.checkpoint import io as ckpt
from twinpipe.trainer import config as recipe_config
from twinpipe.trainer.metrics import read_metrics
from twinpipe.trainer.train import run

recipe_config.register()


def chat(i: int) -> dict:
    q = f"{i % 13} plus {i % 5}"
    a = str(i % 13 + i % 5)
    return {"messages": [{"role": "user", "content": f"{q}?"}, {"role": "assistant", "content": a},
                         {"role": "user", "content": "Twice?"},
                         {"role": "assistant", "content": str(2 * int(a))}], "answer": str(2 * int(a))}


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    """A 512-token BPE with DeepSeek-V3's chat tokens and 200 two-turn chats (held out: 10)."""
    from twinpipe.data.tokenizer import CHAT_TOKENS, SPECIAL_TOKENS, corpus_sample, train_bpe

    d = tmp_path_factory.mktemp("sft-data")
    train_bpe(corpus_sample(200_000), 512, SPECIAL_TOKENS + CHAT_TOKENS).save(d / "tok")
    (d / "chats.jsonl").write_text("".join(json.dumps(chat(i)) + "\n" for i in range(200)))
    (d / "held.jsonl").write_text("".join(json.dumps(chat(i)) + "\n" for i in range(200, 210)))
    return d


def sft_cfg(data: Path, run_dir: Path, *overrides: str):
    with initialize_config_module("twinpipe.recipes", version_base=None):
        cfg = compose("sft", overrides=[*TINY, f"data.tokenizer={data / 'tok'}", f"data.paths=[{data / 'chats.jsonl'}]",
                                        f"eval.paths=[{data / 'held.jsonl'}]", f"data.cache_dir={data / 'cache'}",
                                        f"run.dir={run_dir}", "train.seq_len=64", "eval.every=0",
                                        "checkpoint.every=0", *overrides])
    return cfg


def _hf_folder(data: Path, name: str, fp8: bool) -> Path:
    """The recipe's model at another seed, saved as an HF folder with the run's tokenizer."""
    from twinpipe.model import save_hf
    from twinpipe.model.transformer import Transformer
    from twinpipe.trainer.build import model_config

    torch.manual_seed(7)
    model = Transformer(model_config(sft_cfg(data, data / "x").model))
    folder = save_hf(model, data / name, fp8=fp8, dtype=torch.float32, overwrite=True)
    for f in (data / "tok").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.mark.parametrize("fp8", [False, True])
def test_init_from_hf_folder_gives_the_first_step_loss(sft_data, tmp_path, fp8):
    """Step 1's loss is the loss of the HF folder's weights (read back by load_hf, FP8 dequantised) on
    the loader's first batch: the same ops on the same rows, summed in the same order (rel 1e-6)."""
    from twinpipe.data.tokenizer import load_tokenizer
    from twinpipe.model import load_hf
    from twinpipe.trainer.sft.recipe import SFTLoss, batch_source
    from twinpipe.trainer.step import add_global_counts

    folder = _hf_folder(sft_data, f"hf-fp8-{fp8}", fp8)
    cfg = sft_cfg(sft_data, tmp_path / "run", f"init_from={folder}", "train.steps=2",
                  "model.freeze_router=true", "data.tokenizer=default")
    summary = run(cfg)
    assert cfg.data.tokenizer == str(folder)  # the tokenizer came from init_from
    reference = load_hf(folder, dtype=torch.float32)
    loss_fn = SFTLoss(cfg.loss.mtp_lambda, 1)
    batches = add_global_counts(loss_fn, batch_source(cfg, load_tokenizer(folder), 0, 1).next_step(), None,
                                torch.device("cpu"))
    with torch.no_grad():
        expected = sum(float(loss_fn(reference.forward_train(mb["input_ids"], mb.get("position_ids")), mb)[0])
                       for mb in batches)
    first = read_metrics(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(expected, rel=1e-6)
    trained = summary["model"].state_dict()
    gates = [n for n in trained if n.endswith("mlp.gate.weight")]
    assert gates and all(torch.equal(trained[n], reference.state_dict()[n]) for n in gates)  # frozen
    assert not torch.equal(trained["embed_tokens.weight"], reference.state_dict()["embed_tokens.weight"])


def test_init_from_checkpoint_and_mismatch(sft_data, tmp_path):
    """init_from through the trainer's per-rank path (`build_model` -> `init_from.local_fill`) gives the
    checkpoint's weights exactly (the same fp32 values copied); another architecture is one line."""
    from twinpipe.trainer.build import build_model

    run_dir = tmp_path / "first"
    run(sft_cfg(sft_data, run_dir, "train.steps=1", "checkpoint.at_end=true"))
    saved, _ = ckpt.load_model_for_inference(run_dir, torch.float32)
    cfg = sft_cfg(sft_data, tmp_path / "second", f"init_from={run_dir}", "train.steps=1")
    fresh = build_model(cfg, torch.device("cpu")).state_dict()
    assert set(fresh) == set(saved.state_dict())
    for name, value in saved.state_dict().items():
        assert torch.equal(fresh[name], value), name
    wider = sft_cfg(sft_data, tmp_path / "wider", f"init_from={run_dir}", "model.hidden_size=96")
    with pytest.raises(ValueError, match=r"model.hidden_size=96 in the recipe but 64 in the checkpoint"):
        build_model(wider, torch.device("cpu"))
    assert run(cfg)["step"] == 1
    with pytest.raises(ValueError, match="init_from=/nope: no such"):
        recipe_config.validate(sft_cfg(sft_data, tmp_path / "x", "init_from=/nope"))


def test_eval_metrics_are_logged(sft_data, tmp_path):
    run(sft_cfg(sft_data, tmp_path / "run", "train.steps=2", "eval.every=2", "eval.answers=4",
                "eval.max_new_tokens=4"))
    first, second = read_metrics(tmp_path / "run")
    assert "eval_loss" in first and "eval_loss" in second  # after step 1 and every eval.every steps
    assert 0 < second["eval_loss"] < 10 and second["eval_exact_match"] in (0.0, 0.25, 0.5, 0.75, 1.0)


STEPS = 4
RESUME = [f"train.steps={STEPS}", "checkpoint.every=2", "eval.every=2", "eval.answers=0"]


def test_kill_and_resume_is_exact(sft_data, tmp_path):
    run(sft_cfg(sft_data, tmp_path / "straight", *RESUME, "resume=never"))
    assert killed_run(run, sft_cfg(sft_data, tmp_path / "killed", *RESUME), "step:3") == -9
    run(sft_cfg(sft_data, tmp_path / "killed", *RESUME, "resume=auto"))
    ref, got = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "expert_load", "eval_loss"):
            assert a.get(key) == b.get(key), (key, a["step"])


GRID = ["parallel.pp=2", "parallel.dp=2", "parallel.ep=2", "parallel.schedule=dualpipe"]
PARALLEL = ["train.steps=3", "train.micro_batch=1", "train.global_batch=8", "resume=never"]


def _parallel_rank(rank: int, world: int, data: Path, run_dir: Path) -> None:
    run(sft_cfg(data, run_dir, *PARALLEL, *GRID))


@pytest.mark.slow
def test_pp2_dp2_ep2_equals_one_process(sft_data, tmp_path):
    """Packed rows (position_ids restarting) through DualPipe, ZeRO-1 over dp and expert all-to-alls
    against one process. Tolerances: `assert_matches_one_process` (the same sums in another order)."""
    run(sft_cfg(sft_data, tmp_path / "one", *PARALLEL))
    run_local(_parallel_rank, 4, sft_data, tmp_path / "four")
    ref, got = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "four")
    assert_matches_one_process(ref, got, later_grad=2e-5)


def _train_cli(data: Path, run_dir: Path, *overrides: str):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    cfg_args = [*TINY, f"data.tokenizer={data / 'tok'}", f"data.cache_dir={run_dir / 'cache'}",
                f"run.dir={run_dir}", "train.steps=1", "eval.every=0", *overrides]
    return subprocess.run([sys.executable, "-m", "twinpipe.trainer", "--config-name", "sft", *cfg_args],
                          env=env, capture_output=True, text=True, timeout=120)


def test_bad_input_is_one_line_and_nothing_is_written(sft_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat(0)) + "\n" + '{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    proc = _train_cli(sft_data, tmp_path / "run", f"data.paths=[{bad}]")
    said = [line for line in proc.stderr.splitlines() if line.startswith("twinpipe-train:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert said == [f"twinpipe-train: data file {bad} line 2: messages[0] has role 'wizard'; allowed "
                    "system, user, assistant"]
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not [p for p in (tmp_path / "run" / "cache").rglob("*") if p.suffix in (".bin", ".npy")]
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "hello?"}]}) + "\n")
    proc = _train_cli(sft_data, tmp_path / "run2", f"data.paths=[{empty}]")
    assert proc.returncode == 1 and "no SFT examples in 1 data files" in proc.stderr
    assert "1 without an assistant turn" in proc.stderr


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_packed_loss_equals_unpacked(sft_data, tmp_path, train_on_prompt):
    """SFTLoss (CE + MTP) over packed rows equals the loss over the same conversations one per row:
    the document mask keeps the logits apart and the MTP targets that lie in the next conversation are
    ignored (with sft.train_on_prompt the next conversation's first tokens are targets, which
    PretrainLoss would count: checked). Only summation order differs (rel 1e-5)."""
    from twinpipe.data.build import sft_dataset
    from twinpipe.data.tokenizer import load_tokenizer
    from twinpipe.model.transformer import Transformer
    from twinpipe.trainer.build import model_config
    from twinpipe.trainer.loss import PretrainLoss
    from twinpipe.trainer.sft.recipe import SFTLoss
    from twinpipe.trainer.step import add_global_counts

    tok = load_tokenizer(sft_data / "tok")
    data = {"paths": [str(sft_data / "chats.jsonl")], "cache_dir": str(tmp_path)}
    packed = sft_dataset({**data, "packing": "pack"}, tok, "train", 64, train_on_prompt)
    padded = sft_dataset({**data, "packing": "pad"}, tok, "train", 64, train_on_prompt)
    rows = packed.batch([0, 1])
    n = int(packed.row_ends[1])  # the conversations in packed rows 0 and 1 are padded rows 0 .. n-1
    alone = padded.batch(list(range(n)))
    assert "position_ids" in rows and "position_ids" not in alone
    torch.manual_seed(0)
    model = Transformer(model_config(sft_cfg(sft_data, tmp_path).model)).eval()

    def loss(loss_fn, batch):
        batch = add_global_counts(loss_fn, [batch], None, torch.device("cpu"))[0]
        with torch.no_grad():
            return loss_fn(model.forward_train(batch["input_ids"], batch.get("position_ids")), batch)[1]

    sft = SFTLoss(0.3, 1)
    got, want = loss(sft, rows), loss(sft, alone)
    for key in ("lm_loss", "mtp_loss"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=0)
    if train_on_prompt:
        assert not torch.isclose(loss(PretrainLoss(0.3, 1), rows)["mtp_loss"], want["mtp_loss"], rtol=1e-4)


def test_pretraining_data_keys_reach_the_loader(data_dir, tmp_path):
    """Issue 10's data item: the trainer's loader is data/build.py's, so data.packing and
    data.reset_position_ids act; without restarts a micro-batch has no position_ids (no mask sync)."""
    from trainer_recipe import make_cfg

    from twinpipe.data.tokenizer import load_tokenizer
    from twinpipe.trainer.build import build_loader

    tok = load_tokenizer(data_dir / "tok")
    plain = build_loader(make_cfg(data_dir, tmp_path / "a"), tok, 0, 1)
    assert (plain.dataset.packing, plain.dataset.reset_position_ids) == ("concat", False)
    assert all("position_ids" not in mb for mb in plain.next_step())
    reset = build_loader(make_cfg(data_dir, tmp_path / "b", "data.reset_position_ids=true"), tok, 0, 1)
    assert reset.dataset.reset_position_ids
    across = int(reset.dataset.tokens.doc_ends[0]) // reset.dataset.seq_len  # holds the first eos
    assert "position_ids" in reset.dataset.batch([across])
    padded = build_loader(make_cfg(data_dir, tmp_path / "c", "data.packing=pad"), tok, 0, 1)
    assert padded.dataset.packing == "pad"
