"""GRPO in one process: rewards (built-ins, dotted path, weights, errors naming function and record),
group advantages, the clipped-ratio loss and its aggregations over the global batch, a run that
learns a tiny task with every metric logged, exact rollout logprobs (fp32) and the KL reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_recipe import grpo_cfg, make_data
from trainer_recipe import TINY
from twinpipe.trainer.grpo.loss import GRPOLoss
from twinpipe.trainer.metrics import read_metrics
from twinpipe.trainer.grpo.rewards import Rewards
from twinpipe.trainer.grpo.rollout import group_advantages
from twinpipe.trainer.step import add_global_counts
from twinpipe.trainer.train import run


@pytest.fixture(scope="module")
def grpo_data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("grpo-data"))


def raises(prompt, completion, answer):
    raise KeyError("boom")


def not_a_number(prompt, completion):
    return "high"


def test_rewards():
    rewards = Rewards.from_config(["exact_match", "numeric_match", r"regex:\d+", "grpo_recipe:common_letters"],
                                  [1.0, 0.5, 0.25, 2.0])
    assert rewards.score("q", " 12 ", {"answer": "12", "id": 3}, "r") == [1.0, 1.0, 1.0, 0.0]
    assert rewards.score("q", "it is 12.0.", {"answer": "12"}, "r") == [0.0, 1.0, 0.0, pytest.approx(3 / 11)]
    assert rewards.total([1.0, 1.0, 1.0, 0.5]) == 2.75 and rewards.correctness == 0
    assert Rewards.from_config("test_grpo.not_a_number").names == ["test_grpo.not_a_number"]
    with pytest.raises(ValueError, match="grpo.reward=nope.mod:fn: cannot import it"):
        Rewards.from_config("nope.mod:fn")
    with pytest.raises(ValueError, match="grpo.reward=magic: allowed exact_match"):
        Rewards.from_config("magic")
    with pytest.raises(ValueError, match=r"grpo.reward_weights=\[1.0\]: one weight per grpo.reward \(2\)"):
        Rewards.from_config(["exact_match", "numeric_match"], [1.0])
    with pytest.raises(ValueError, match="f.jsonl line 2: grpo.reward exact_match needs the field 'answer'"):
        Rewards.from_config("exact_match").check_fields("f.jsonl line 2", {"id": 1})
    with pytest.raises(ValueError, match=r"grpo.reward test_grpo:raises raised KeyError: 'boom' \(on f line 1"):
        Rewards.from_config("test_grpo:raises").score("q", "c", {"answer": "1"}, "f line 1")
    with pytest.raises(ValueError, match="grpo.reward test_grpo:not_a_number returned 'high' on f line 1"):
        Rewards.from_config("test_grpo:not_a_number").score("q", "c", {}, "f line 1")


def test_math_verify_reward():
    pytest.importorskip("math_verify")
    rewards = Rewards.from_config("math_verify")
    assert rewards.score("q", r"so the answer is $\frac{1}{2}$", {"answer": "0.5"}, "r") == [1.0]
    assert rewards.score("q", "the answer is $3$", {"answer": "0.5"}, "r") == [0.0]


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    adv, zero = group_advantages(r, "group", eps=0.0)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    torch.testing.assert_close(adv[0], (r[0] - 0.5) / std)
    assert zero.tolist() == [False, True] and adv[1].abs().sum() == 0
    none, _ = group_advantages(r, "none")
    torch.testing.assert_close(none[0], r[0] - 0.5)
    batch, _ = group_advantages(r, "batch", eps=0.0)
    torch.testing.assert_close(batch[0], (r[0] - 0.5) / r.std())
    loo, _ = group_advantages(r, "none", leave_one_out=True)
    torch.testing.assert_close(loo[0], r[0] - (r[0].sum() - r[0]) / 3)
    with pytest.raises(ValueError, match="grpo.scale_rewards='mean': allowed group, batch, none"):
        group_advantages(r, "mean")


def _loss_batch(seed: int, B: int = 4, T: int = 6, V: int = 11):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100
    labels[0, 4:] = -100  # sequences of different lengths
    batch = {"labels": labels, "loss_mask": (labels != -100).float(),
             "old_logprobs": -3 + 0.3 * torch.randn(B, T, generator=g), "ref_logprobs": -3 + 0.3 * torch.randn(B, T, generator=g),
             "advantages": torch.randn(B, generator=g), "first_update": torch.tensor(False)}
    return batch, torch.randn(B, T, V, generator=g)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_loss_formula_and_global_normalisation(agg):
    """The loss equals the formula written out, and two micro-batches' shares (global counts) sum to
    the loss of the whole batch in one piece (float32 sums in another order: 1e-6)."""
    batch, logits = _loss_batch(0)
    loss_fn = GRPOLoss(clip_low=0.1, clip_high=0.3, beta=0.05, loss_agg=agg, temperature=0.7, max_new_tokens=5)
    out = type("Out", (), {"logits": logits})
    whole = add_global_counts(loss_fn, [batch], None, torch.device("cpu"))[0]
    got, metrics = loss_fn(out, whole)
    logp = torch.log_softmax(logits / 0.7, -1).gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]
    ratio, adv, mask = (logp - batch["old_logprobs"]).exp(), batch["advantages"][:, None], batch["loss_mask"]
    pg = -torch.minimum(ratio * adv, ratio.clamp(0.9, 1.3) * adv)
    d = batch["ref_logprobs"] - logp
    per = pg + 0.05 * (d.exp() - d - 1)
    want = {"token_mean": (per * mask).sum() / mask.sum(),
            "seq_mean_token_mean": ((per * mask).sum(1) / mask.sum(1)).mean(),
            "seq_mean_token_sum_norm": (per * mask).sum() / (4 * 5)}[agg]
    torch.testing.assert_close(got, want)
    assert float(metrics["clip_fraction"]) == pytest.approx(float((((ratio < 0.9) | (ratio > 1.3)) * mask).sum() / mask.sum()))
    halves = [{k: v[i:i + 2] if v.dim() else v for k, v in batch.items()} for i in (0, 2)]
    halves = add_global_counts(loss_fn, halves, None, torch.device("cpu"))
    split = sum(loss_fn(type("Out", (), {"logits": logits[i:i + 2]}), mb)[0] for i, mb in zip((0, 2), halves))
    torch.testing.assert_close(split, got, rtol=1e-6, atol=1e-7)


STEPS = 16


def test_learns_with_exact_logprobs(grpo_data, tmp_path):
    """Reward rises on a tiny task (the share of common letters: mean of the last 4 steps over the
    first 4, seen +0.1 or more; asserted +0.04). Rollout logprobs (latent-cache decode) equal the
    training forward's to 1e-5 in fp32 on every rollout."""
    run(grpo_cfg(grpo_data, tmp_path / "run", f"train.steps={STEPS}", "optim.lr=1e-2"))
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("reward_mean", "reward_std", "accuracy", "frac_zero_std_groups", "kl", "clip_fraction",
                "entropy", "response_length_mean", "response_length_max", "rollout_tokens_per_s",
                "logprob_diff_max", "rollout_s", "update_s", "reward_grpo_recipe_common_letters",
                "reward_exact_match"):
        assert key in records[-1], key
    assert all(0 < r["logprob_diff_max"] <= 1e-5 for r in records)
    assert all(r["clip_fraction"] == 0 and r["kl"] == 0 for r in records)  # mu = 1, beta = 0
    assert all(r["response_length_max"] <= 6 for r in records)
    first = sum(r["reward_mean"] for r in records[:4]) / 4
    last = sum(r["reward_mean"] for r in records[-4:]) / 4
    assert last > first + 0.04, (first, last)


def test_speculative_rollouts_have_exact_logprobs(grpo_data, tmp_path):
    """grpo.speculative=true: the MTP layer drafts, the main model verifies (the sampling distribution's
    exactness is tested in tests/model/test_speculative.py); the logprobs recorded from the verifying
    logits equal the training forward's to 1e-5 in fp32 (mu = 1: nothing moved) on every rollout, and
    the acceptance rate is logged."""
    run(grpo_cfg(grpo_data, tmp_path / "run", "train.steps=3", "grpo.speculative=true"))
    records = read_metrics(tmp_path / "run")
    assert all(0 < r["logprob_diff_max"] <= 1e-5 for r in records)
    assert all(0 < r["speculative_acceptance"] <= 1 for r in records)
    assert all(r["response_length_max"] <= 6 for r in records)
    with pytest.raises(ValueError, match="grpo.speculative=true with parallel.pp=1, parallel.ep=2, "
                                         "grpo.routing_replay=False: MTP-drafted rollouts run with pp=1, ep=1"):
        grpo_cfg(grpo_data, tmp_path, "grpo.speculative=true", "parallel.ep=2", "parallel.dp=2")


def test_continuous_batching_rollouts_equal_the_static_batch(grpo_data, tmp_path):
    """grpo.rollout_slots=3 (3 of a rank's 8 sequences decoded at once, a finished row refilled): the
    same sampled completions as the static batch (noise keyed per sequence and token), so the same
    rewards and lengths exactly. The rollout logprobs (pi_old) are the same softmax of rows decoded
    beside other rows, each within 1e-5 of the training forward's (asserted), so the ratios differ by at
    most ~2e-5 and the loss, -mean(A * ratio) with |A| <= sqrt(G - 1) = 1.7 here, by at most ~4e-5
    (the loss itself is ~1e-8: ratios are ~1 on a first update and a group's advantages sum to 0);
    refused with routing replay."""
    run(grpo_cfg(grpo_data, tmp_path / "static", "train.steps=3"))
    run(grpo_cfg(grpo_data, tmp_path / "slots", "train.steps=3", "grpo.rollout_slots=3"))
    a, b = read_metrics(tmp_path / "static"), read_metrics(tmp_path / "slots")
    for ra, rb in zip(a, b):
        for key in ("reward_mean", "reward_std", "response_length_mean", "response_length_max"):
            assert ra[key] == rb[key], key
        assert abs(rb["loss"] - ra["loss"]) <= 5e-5
        assert rb["logprob_diff_max"] <= 1e-5
    with pytest.raises(ValueError, match="grpo.rollout_slots=3 with grpo.routing_replay=True"):
        grpo_cfg(grpo_data, tmp_path, "grpo.rollout_slots=3", "grpo.routing_replay=true")


def test_reference_kl_and_updates_per_rollout(grpo_data, tmp_path):
    """beta > 0: the reference is the initial policy, so the first step's KL is ~0 (same weights, two
    forwards of the same arithmetic) and grows after updates; mu = 2 reuses each rollout once, where
    the ratio moves off 1 and clip_low/clip_high start to bite."""
    run(grpo_cfg(grpo_data, tmp_path / "run", "train.steps=4", "grpo.beta=0.1", "grpo.updates_per_rollout=2",
                 "optim.lr=3e-2", "grpo.clip_low=1e-3", "grpo.clip_high=1e-3"))
    r = read_metrics(tmp_path / "run")
    assert r[0]["kl"] < 1e-9 and r[3]["kl"] > 1e-6
    assert r[0]["rollout_s"] > 0 and r[1]["rollout_s"] == 0 and "logprob_diff_max" not in r[1]
    assert r[0]["reward_mean"] == r[1]["reward_mean"] and r[2]["reward_mean"] != r[1]["reward_mean"]
    assert r[0]["clip_fraction"] == 0 and r[1]["clip_fraction"] > 0.2  # a narrow clip range: 1 +- 1e-3


def _cli(data: Path, run_dir: Path, *overrides: str):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    args = [*TINY, f"data.tokenizer={data / 'tok'}", f"data.cache_dir={run_dir / 'cache'}", f"run.dir={run_dir}",
            "train.steps=1", "train.global_batch=8", "grpo.group_size=4", "grpo.max_new_tokens=4", *overrides]
    return subprocess.run([sys.executable, "-m", "twinpipe.trainer", "--config-name", "grpo", *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent)


def test_bad_input_is_one_line_and_nothing_is_written(grpo_data, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "1 plus 1 is", "answer": "2"}) + "\n")
    proc = _cli(grpo_data, tmp_path / "run", f"data.paths=[{prompts}]", "grpo.reward=test_grpo:raises")
    said = [line for line in proc.stderr.splitlines() if line.startswith("twinpipe-train:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(said) == 1 and said[0].startswith("twinpipe-train: grpo.reward test_grpo:raises raised KeyError")
    assert f"data file {prompts} line 1" in said[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_recipe_and_records_are_named(grpo_data, tmp_path):
    from twinpipe.data.records import BadRecord
    from twinpipe.data.prompts import load_prompts
    from twinpipe.data.tokenizer import load_tokenizer

    with pytest.raises(ValueError, match="train.global_batch=16: must be a multiple of grpo.group_size x "
                                         "parallel.dp = 3 x 1"):
        grpo_cfg(grpo_data, tmp_path, "grpo.group_size=3")
    with pytest.raises(ValueError, match="grpo.loss_agg='sum': allowed values are token_mean"):
        grpo_cfg(grpo_data, tmp_path, "grpo.loss_agg=sum")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "answer": "1"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    tok = load_tokenizer(grpo_data / "tok")
    with pytest.raises(BadRecord, match=f"data file {bad} line 2: a prompt record needs 'messages' or 'prompt'"):
        load_prompts([str(bad)], tok, 32)
    bad.write_text(json.dumps({"prompt": "a long prompt " * 20}) + "\n")
    with pytest.raises(BadRecord, match=f"data file {bad} line 1: the prompt has .* tokens; allowed 1 to 8"):
        load_prompts([str(bad)], tok, 8)


def test_dynamic_sampling_refills_zero_std_groups(grpo_data, tmp_path):
    """`grpo.resample_max`: later draws' groups with unequal rewards replace the batch's zero-std ones
    (DAPO's dynamic sampling). The first draw is the plain rollout's (same prompts, same noise); after
    up to 3 more draws fewer groups are zero-std, and every row's advantage is the group advantage of
    the rewards recomputed from that row's own completion tokens (the slots' rows, rewards and
    advantages come from the same draw and group). 0 keeps the plain rollout."""
    from twinpipe.data.tokenizer import load_tokenizer
    from twinpipe.parallel.grid import Grid
    from twinpipe.trainer.build import build_model
    from twinpipe.trainer.grpo.rollout import RolloutSource
    from twinpipe.trainer.loss import IGNORE_INDEX

    tok = load_tokenizer(grpo_data / "tok")

    def rollout(*overrides):
        cfg = grpo_cfg(grpo_data, tmp_path, "grpo.reward=grpo_recipe:odd_answers_vary", "grpo.reward_weights=[]",
                       "train.global_batch=32", *overrides)
        source = RolloutSource(cfg, tok, Grid.single(), build_model(cfg, torch.device("cpu")))
        return source, source.next_step()

    plain, _ = rollout()
    source, batches = rollout("grpo.resample_max=3")
    first = plain.metrics["frac_zero_std_groups"]
    assert first >= 0.25 and "resample_draws" not in plain.metrics
    assert source.metrics["frac_zero_std_groups"] < first and source.metrics["resample_draws"] >= 2
    rewards, advantages = [], []
    for mb in batches:
        for ids, labels, mask, adv in zip(mb["input_ids"], mb["labels"], mb["loss_mask"], mb["advantages"]):
            new = labels[labels != IGNORE_INDEX].tolist()
            assert torch.equal(mask, (labels != IGNORE_INDEX).float())
            start = int((labels != IGNORE_INDEX).long().argmax()) + 1  # the prompt: the tokens before
            answers = {p.fields["answer"] for p in source.prompts if p.ids == ids[:start].tolist()}
            assert len(answers) == 1
            answer = answers.pop()
            text = tok.decode(new[:-1] if new[-1] == tok.eos_id else new)
            rewards.append(1.0 if int(answer) % 2 == 0 else float(sum(map(ord, text)) % 2))
            advantages.append(float(adv))
    want, zero = group_advantages(torch.tensor(rewards, dtype=torch.float64).view(-1, 4))
    assert torch.equal(torch.tensor(advantages), want.reshape(-1).float())
    assert float(zero.double().mean()) == source.metrics["frac_zero_std_groups"]
