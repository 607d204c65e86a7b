"""twinpipe-generate / twinpipe-eval: the pure functions and the CLIs on an HF-format folder."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from twinpipe.data.tokenizer import train_bpe
from twinpipe.model import ModelConfig, Transformer, generate, save_hf
from twinpipe.trainer import evaluate as eval_cli
from twinpipe.trainer import generate as gen_cli

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n    y = 0\n" * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(iter([TEXT]), vocab_size=300)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", vocab_size=300, initializer_range=0.05)).eval()


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


def test_clis_on_an_hf_folder(model, tokenizer, tmp_path, capsys):
    folder = tmp_path / "hf"
    save_hf(model, folder, dtype=None)  # keep fp32, so the loaded model is this one exactly
    tokenizer.save(folder)
    gen_cli.main(["--checkpoint", str(folder), "--prompt", "def add(", "--prompt", "class",
                  "--max-new-tokens", "4", "--no-eos-stop"])
    lines = capsys.readouterr().out.splitlines()
    expected = gen_cli.generate_text(model, tokenizer, ["def add(", "class"], 4, stop_at_eos=False)
    assert "\n".join(lines) == "\n".join(["def add(" + expected[0], "class" + expected[1]])
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT[:300])
    assert eval_cli.main(["--checkpoint", str(folder), "--text-file", str(text_file)]) is None
    capsys.readouterr()
    result = eval_cli.run(["--checkpoint", str(folder), "--text-file", str(text_file), "--seq-len", "32"])
    assert json.loads(capsys.readouterr().out) == result
    assert result == pytest.approx(eval_cli.evaluate_text(model, tokenizer, TEXT[:300], 32))
    with pytest.raises(SystemExit, match="no such file"):
        eval_cli.main(["--checkpoint", str(folder), "--text-file", str(tmp_path / "missing.txt")])
