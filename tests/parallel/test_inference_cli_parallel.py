"""twinpipe-generate and twinpipe-eval on several ranks (run_local's gloo ranks, as torchrun starts
them): a run dir saved by one process, loaded under pp=2 (DualPipeV) and pp=1 x dp=2 x ep=2; rank 0
prints the one-process continuations and perplexity. Tokens equal (see test_inference_generate); the
perplexity agrees to 1e-6 relative (fp32 rounding of other batch shapes, summed over ~600 tokens)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from omegaconf import OmegaConf

from twinpipe.data.tokenizer import train_bpe
from twinpipe.model import ModelConfig, Transformer
from twinpipe.parallel.local import run_local
from twinpipe.trainer.cli import evaluate as eval_cli
from twinpipe.trainer.cli import generate as gen_cli
from twinpipe.trainer.checkpoint.io import save_checkpoint

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n    y = 0\n" * 20
PROMPTS = 'prompts=["def add(", "class", "x", "return a"]'


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = train_bpe(iter([TEXT]), vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=300, initializer_range=0.05)).eval()
    run = tmp_path_factory.mktemp("run")
    model_yaml = OmegaConf.to_yaml({"model": {"preset": "tiny", "vocab_size": 300, "extra": {}}})
    save_checkpoint(run, 5, {"model": model.state_dict()}, {}, {"step": 5}, model_yaml, tokenizer, keep=1)
    return run, model, tokenizer


def _tools(rank, world, args, out):
    torch.set_num_threads(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        gen_cli.main([*args, PROMPTS, "max_new_tokens=5", "device=cpu"])
        eval_cli.main([*args, "max_tokens=600", "seq_len=64", "batch_size=2", "device=cpu", f"output={out}"])
    return printed.getvalue()


@pytest.mark.parametrize("layout", [["parallel.pp=2", "parallel.schedule=dualpipev"], ["parallel.ep=2"]])
def test_tools_on_two_ranks_print_the_one_process_result(setup, layout, tmp_path):
    run, model, tokenizer = setup
    prompts = ["def add(", "class", "x", "return a"]
    texts = gen_cli.generate_text(model, tokenizer, prompts, 5)
    ids = eval_cli.heldout_ids(tokenizer, 600)
    ppl = eval_cli.perplexity(model, ids, 64)
    printed = run_local(_tools, 2, [f"checkpoint={run}", *layout], tmp_path / "ppl.json")
    assert printed[1] == ""  # rank 0 writes
    lines = printed[0].splitlines()
    assert lines[:4] == [p + t for p, t in zip(prompts, texts)]
    result = json.loads(lines[4])
    assert result == json.loads((tmp_path / "ppl.json").read_text())
    assert result["tokens"] == 599 and result["nll"] == pytest.approx(ppl["nll"], rel=1e-6)

