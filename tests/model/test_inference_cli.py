"""twinpipe-generate / twinpipe-eval: the pure functions, and the Hydra CLIs on an HF folder and on a
twinpipe run dir (overrides, errors that name the key, the held-out split, nothing written to the cwd)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from twinpipe.data.corpus import embedded_corpus_files
from twinpipe.data.tokenizer import train_bpe
from twinpipe.model import ModelConfig, Transformer, generate, save_hf
from twinpipe.trainer.cli import evaluate as eval_cli
from twinpipe.trainer.cli import generate as gen_cli

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n    y = 0\n" * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(iter([TEXT]), vocab_size=300)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", vocab_size=300, initializer_range=0.05)).eval()


@pytest.fixture(scope="module")
def hf_folder(model, tokenizer, tmp_path_factory):
    folder = save_hf(model, tmp_path_factory.mktemp("ckpt") / "hf", dtype=None)  # fp32: loads as `model` exactly
    tokenizer.save(folder)
    return folder


@pytest.fixture(scope="module")
def run_dir(model, tokenizer, tmp_path_factory):
    """A twinpipe run dir holding one checkpoint of `model` (what `make train` leaves behind)."""
    from omegaconf import OmegaConf

    from twinpipe.trainer.checkpoint.io import save_checkpoint

    run = tmp_path_factory.mktemp("run")
    model_yaml = OmegaConf.to_yaml({"model": {"preset": "tiny", "vocab_size": 300, "extra": {}}})
    save_checkpoint(run, 5, {"model": model.state_dict()}, {}, {"step": 5}, model_yaml, tokenizer, keep=1)
    return run


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """An empty working directory: the CLIs must leave it empty (no .hydra/, outputs/, log files)."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    yield folder
    assert sorted(p.name for p in folder.iterdir()) == []


def test_perplexity_matches_direct_cross_entropy(model):
    ids = torch.randint(0, 300, (40,)).tolist()
    with torch.no_grad():
        direct = F.cross_entropy(model(torch.tensor([ids]))[0, :-1], torch.tensor(ids[1:]))
    one_window = eval_cli.perplexity(model, ids, seq_len=64)
    assert one_window["tokens"] == 39
    assert one_window["nll"] == pytest.approx(direct.item(), rel=1e-5)
    windows = eval_cli.perplexity(model, ids, seq_len=8, batch_size=2)  # 5 windows, every token once
    assert windows["tokens"] == 39 and windows["ppl"] == pytest.approx(math.exp(windows["nll"]))


def test_uniform_model_has_vocab_perplexity(model):
    uniform = Transformer(model.config).eval()
    torch.nn.init.zeros_(uniform.lm_head.weight)
    result = eval_cli.perplexity(uniform, list(range(30)), seq_len=7)
    assert result["ppl"] == pytest.approx(300, rel=1e-5)


def test_generate_text_decodes_the_continuation(model, tokenizer):
    texts = gen_cli.generate_text(model, tokenizer, ["def add(", "class"], 5, stop_at_eos=False)
    ids = generate(model, [tokenizer.encode("def add("), tokenizer.encode("class")], 5)
    assert texts == [tokenizer.decode(t, skip_special_tokens=True) for t in ids]
    assert gen_cli.generate_text(model, tokenizer, ["def add(", "class"], 5, stop_at_eos=False,
                                 speculative=True) == texts  # greedy: MTP drafts change nothing


def test_generate_cli(model, tokenizer, hf_folder, run_dir, cwd, capsys):
    expected = gen_cli.generate_text(model, tokenizer, ["def add(", "class"], 4, stop_at_eos=False)
    want = ["def add(" + expected[0], "class" + expected[1]]
    for checkpoint in (hf_folder, run_dir):  # an HF folder; a run dir (its newest checkpoint)
        gen_cli.main([f"checkpoint={checkpoint}", 'prompts=["def add(", "class"]', "max_new_tokens=4",
                      "stop_at_eos=false", "device=cpu"])
        assert capsys.readouterr().out.splitlines() == want
    gen_cli.main([f"checkpoint={hf_folder}", "prompts=[class]", "max_new_tokens=4", "stop_at_eos=false",
                  "speculative=true"])  # greedy: the MTP drafts change nothing
    assert capsys.readouterr().out.splitlines() == want[1:]


def test_generate_cli_errors_name_the_key(hf_folder, cwd, tmp_path, fails):
    ok = [f"checkpoint={hf_folder}", "prompts=[x]"]
    said = fails(gen_cli.main, [*ok, "max_new_token=4"])  # misspelt: max_new_tokens
    assert "Key 'max_new_token' not in 'GenerateSchema'" in said
    said = fails(gen_cli.main, ["prompts=[x]"])
    assert "checkpoint not set" in said and "required" in said
    said = fails(gen_cli.main, [*ok, "dtype=fp16"])
    assert "dtype='fp16': allowed values are fp32, bf16" in said
    assert "top_p=1.5: allowed values are in (0, 1]" in fails(gen_cli.main, [*ok, "top_p=1.5"])
    assert "max_new_tokens" in fails(gen_cli.main, [*ok, "max_new_tokens=lots"])
    assert "seeds: not a key of twinpipe-generate" in fails(gen_cli.main, [*ok, "+seeds=1"])
    said = fails(gen_cli.main, [f"checkpoint={tmp_path}", "prompts=[x]"])  # a folder, not a checkpoint
    assert f"checkpoint={tmp_path}: not a complete checkpoint folder" in said and "resume" not in said


def test_eval_cli_on_a_text_file(model, tokenizer, hf_folder, cwd, tmp_path, capsys, fails):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT[:300])
    out = tmp_path / "res" / "ppl.json"
    assert eval_cli.main([f"checkpoint={hf_folder}", f"text_file={text_file}", "seq_len=32",
                          f"output={out}"]) is None  # a console script: None, so the exit status is 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert printed["checkpoint"] == str(hf_folder) and printed["text"] == str(text_file)
    expected = eval_cli.evaluate_text(model, tokenizer, TEXT[:300], 32)  # the same model, fp32: equal
    assert {k: printed[k] for k in expected} == pytest.approx(expected, rel=1e-12)
    said = fails(eval_cli.main, [f"checkpoint={hf_folder}", f"text_file={tmp_path / 'missing.txt'}"])
    assert "text_file=" in said and "missing.txt: no such file" in said
    assert "seq_len=0: must be > 0" in fails(eval_cli.main, [f"checkpoint={hf_folder}", "seq_len=0"])
    assert "Key 'text-file' not in 'EvalSchema'" in fails(eval_cli.main, [f"checkpoint={hf_folder}", "text-file=x"])
    assert "checkpoint=nowhere: no such folder" in fails(eval_cli.main, ["checkpoint=nowhere"])


def test_eval_cli_scores_the_heldout_split(model, tokenizer, run_dir, cwd, capsys):
    """No text_file: the embedded corpus's held-out files, in order, each followed by eos (pretraining's
    form). The reference reads those files itself and scores the same windows with the same weights in
    batches of 8, not 4: padding is causally masked and MoE drops no tokens, so only rounding differs."""
    eval_cli.main([f"checkpoint={run_dir}", "max_tokens=600", "seq_len=64", "batch_size=4"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["text"] == "embedded:heldout" and printed["tokens"] == 599
    ids: list[int] = []
    for f in embedded_corpus_files("heldout"):
        text = f.read_text(encoding="utf-8")
        if text:  # an empty file is no document
            ids += tokenizer.encode(text) + [tokenizer.eos_id]
        if len(ids) >= 600:
            break
    expected = eval_cli.perplexity(model, ids[:600], seq_len=64)
    assert printed["nll"] == pytest.approx(expected["nll"], rel=1e-6)


def test_layout_and_context_errors_are_one_line(run_dir, cwd, fails):
    ok = [f"checkpoint={run_dir}", "prompts=[x]"]
    assert "world size 1 != parallel.pp x parallel.dp" in fails(gen_cli.main, [*ok, "parallel.pp=2"])
    said = fails(gen_cli.main, [*ok, "parallel.schedule=gpipe"])
    assert "parallel.schedule='gpipe': allowed values are dualpipe, dualpipev, 1f1b" in said
    said = fails(gen_cli.main, [*ok, "max_new_tokens=5000"])
    assert "prompt 0 has 1 tokens + max_new_tokens=5000 > the model's context max_position_embeddings=2048" in said
