"""lm-evaluation-harness on a twinpipe model, offline: task YAMLs with local JSONL files (multiple
choice and generation), run through lm-eval's `simple_evaluate` on `TwinpipeLM`, and through
`twinpipe-eval harness=true`; lm-eval's numbers must equal our own scoring of the same documents
(the full forward's log-softmax summed over each choice's tokens; greedy `generate` cut at the stop
string). Exact: both sides are fp32 and a choice's rank would only flip on a tie below 1e-5."""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'twinpipe[eval]')")

from twinpipe.data.tokenizer import train_bpe  # noqa: E402
from twinpipe.model import ModelConfig, Transformer, generate, save_hf  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from twinpipe.trainer.cli import evaluate as eval_cli  # noqa: E402
from twinpipe.trainer.cli.harness import TwinpipeLM, check_tasks  # noqa: E402

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n    y = 0\n" * 20
MC = [{"question": "def add(a, b):", "choices": ["return a + b", "class Point", "x = 0"], "answer": 0},
      {"question": "class", "choices": ["Point:", "add", "y"], "answer": 0},
      {"question": "x =", "choices": ["0", "b", "return"], "answer": 0},
      {"question": "return", "choices": ["a + b", "Point", "x"], "answer": 0}]
GEN = [{"prompt": "def add(a, b):", "answer": "return"}, {"prompt": "class Point:", "answer": "x = 0"},
       {"prompt": "y =", "answer": "0"}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = train_bpe(iter([TEXT]), vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=300, initializer_range=0.05)).eval()
    root = tmp_path_factory.mktemp("tasks")
    for name, docs in (("mc", MC), ("gen", GEN)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = f"dataset_path: json\ntest_split: test\n"
    (root / "mc.yaml").write_text(
        f"task: tp_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (root / "gen.yaml").write_text(
        f"task: tp_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return model, tokenizer, root


def our_scores(model, tokenizer):
    """Accuracy and exact match computed without lm-eval."""
    correct = 0
    for doc in MC:
        lls = []
        for choice in doc["choices"]:
            ctx = tokenizer.encode(doc["question"])
            whole = tokenizer.encode(doc["question"] + " " + choice)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole]))[0, :-1], -1)
            lls.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        correct += max(range(len(lls)), key=lls.__getitem__) == doc["answer"]
    outs = generate(model, [tokenizer.encode(d["prompt"]) for d in GEN], 6, eos_id=tokenizer.eos_id)
    texts = [tokenizer.decode(o, skip_special_tokens=True).split("\n")[0] for o in outs]
    matches = sum(t == d["answer"] for t, d in zip(texts, GEN))
    return correct / len(MC), matches / len(GEN)


def test_lm_eval_numbers_equal_our_scoring(setup):
    model, tokenizer, root = setup
    out = lm_eval.simple_evaluate(model=TwinpipeLM(model, tokenizer, batch_size=5), tasks=["tp_mc", "tp_gen"],
                                  task_manager=TaskManager(include_path=str(root), include_defaults=False),
                                  log_samples=False)
    acc, exact = our_scores(model, tokenizer)
    assert out["results"]["tp_mc"]["acc,none"] == pytest.approx(acc, abs=1e-12)
    assert out["results"]["tp_gen"]["exact_match,none"] == pytest.approx(exact, abs=1e-12)


def test_rolling_loglikelihood_is_the_perplexity_sum(setup):
    model, tokenizer, _ = setup

    class Request:
        args = (TEXT[:200],)

    got, = TwinpipeLM(model, tokenizer).loglikelihood_rolling([Request()])
    ids = [tokenizer.eos_id] + tokenizer.encode(TEXT[:200])
    ppl = eval_cli.perplexity(model, ids, seq_len=2048)
    assert got == pytest.approx(-ppl["nll"] * ppl["tokens"], rel=1e-6)


def test_twinpipe_eval_harness_cli(setup, tmp_path, capsys, fails):
    model, tokenizer, root = setup
    folder = save_hf(model, tmp_path / "hf", dtype=None)
    tokenizer.save(folder)
    eval_cli.main([f"checkpoint={folder}", "harness=true", "tasks=[tp_mc]", f"include_path={root}", "device=cpu"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["tp_mc"]["acc,none"] == pytest.approx(our_scores(model, tokenizer)[0], abs=1e-12)
    assert "tasks=[]: harness=true needs lm-eval task names" in fails(eval_cli.main, [f"checkpoint={folder}",
                                                                                      "harness=true"])
    with pytest.raises(ValueError, match="unknown task 'no_such': not in lm-eval's task registry nor in include_path="):
        check_tasks(["tp_mc", "no_such"], TaskManager(include_path=str(root), include_defaults=False), str(root))
