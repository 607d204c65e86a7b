"""Recipe and data errors fail at start-up naming the key (or file) and what is allowed."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from twinpipe.parallel.grid import grid_shape_error

from trainer_recipe import make_cfg


def test_recipe_composes_with_public_keys(data_dir, tmp_path):
    cfg = make_cfg(data_dir, tmp_path, "train.steps=7", "train.seed=3", "resume=never", "checkpoint.every=5",
                   "checkpoint.keep=1", "parallel.pp=1", "parallel.dp=1", "parallel.ep=1",
                   "parallel.schedule=dualpipev", "fp8=off", "eplb.every=0", "logging.wandb=offline")
    assert (cfg.train.steps, cfg.train.seed, cfg.fp8.backend, cfg.parallel.schedule) == (7, 3, "off", "dualpipev")
    assert make_cfg(data_dir, tmp_path, "fp8=emulate").fp8.backend == "emulate"


@pytest.mark.parametrize("override, words", [
    ("train.stepz=3", ["stepz"]),
    ("parallel.dp=two", ["parallel.dp", "two"]),
    ("fp8=fp16", ["fp8", "fp16"]),
])
def test_hydra_rejects_unknown_keys_and_types(data_dir, tmp_path, override, words):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as err:
        make_cfg(data_dir, tmp_path, override)
    text = str(err.value) + str(err.value.__cause__)
    assert all(w in text for w in words), text


@pytest.mark.parametrize("overrides, unknown", [
    (["+foo=1"], "foo"),
    (["+train.stepz=3"], "train.stepz"),
    (["+model.extra.rope_theta=5e4", "+optim.warmup=3", "+parallel.tp=2"], "optim.warmup, parallel.tp"),
])
def test_plus_keys_outside_the_schema_are_rejected(data_dir, tmp_path, overrides, unknown):
    """Hydra's `+` adds keys past the schema; validate names them (model.extra takes any key)."""
    with pytest.raises(ValueError) as err:
        make_cfg(data_dir, tmp_path, *overrides)
    assert str(err.value).startswith(f"{unknown}: not a key of twinpipe-train")
    assert "`twinpipe-train --cfg job` prints every key" in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("train.dtype=fp16", "train.dtype='fp16': allowed values are fp32, bf16"),
    ("logging.wandb=maybe", "logging.wandb='maybe'"),
    ("train.global_batch=7", "train.global_batch=7: must be a multiple of train.micro_batch x parallel.dp"),
    ("parallel.ep=3", "parallel.ep=3: must divide parallel.dp=1"),
    ("train.steps=0", "train.steps=0: must be > 0"),
    ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5]"),
])
def test_validate_names_key_and_allowed(data_dir, tmp_path, override, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        make_cfg(data_dir, tmp_path, override)


def test_world_size_must_equal_pp_times_dp():
    msg = grid_shape_error(4, 1, 2, 1)
    assert "world size 4 != parallel.pp x parallel.dp = 1 x 2 = 2" in msg
    assert grid_shape_error(4, 2, 2, 1) is None


def test_data_and_model_errors_name_the_key(data_dir, tmp_path):
    from twinpipe.trainer.build import build_tokenizer, model_config

    cfg = make_cfg(data_dir, tmp_path, "data.tokenizer=/nonexistent/tok.json")
    with pytest.raises(FileNotFoundError, match="data.tokenizer=/nonexistent/tok.json"):
        build_tokenizer(cfg, 512)
    cfg = make_cfg(data_dir, tmp_path, "+model.extra.not_a_field=1")
    with pytest.raises(ValueError, match="not_a_field"):
        model_config(cfg.model)
    cfg = make_cfg(data_dir, tmp_path, "model.n_group=3")
    with pytest.raises(ValueError, match="model.n_routed_experts=8 is not divisible by n_group=3"):
        model_config(cfg.model)
    with pytest.raises(ValueError, match="has 512 tokens but model.vocab_size=100"):
        build_tokenizer(make_cfg(data_dir, tmp_path, "model.vocab_size=100"), 100)


def test_train_on_user_files(data_dir, tmp_path):
    from twinpipe.trainer.loop import train
    from twinpipe.trainer.metrics import read_metrics

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 30)
    with pytest.raises(ValueError, match=r"data.paths=\[\]"):
        make_cfg(data_dir, tmp_path, "data.source=files")
    cfg = make_cfg(data_dir, tmp_path / "run", "data.source=files", f"data.paths=[{corpus}]",
                   "data.heldout_percent=0", "train.steps=2", "checkpoint.every=0")
    train(cfg)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
