"""Generation under pipeline, expert and data parallelism against one process, token for token.

Every rank builds the same tiny model (same seed, fp32), `parallelize`s it for its place in the grid
and calls `generate_parallel` on the whole prompt list; the one-process reference is
`twinpipe.model.generate` on the unsplit model. Tokens must be equal, not close: the arithmetic differs
only in rounding (a stage boundary changes nothing; an expert's GEMM under ep sees another number of
rows, padding differs when a replica's batch holds other prompts), which moves logits by ~1e-6 while
the top two logits of this model are ~1e-2 apart. Sampling uses noise keyed by prompt index
(`model.generation.keyed_uniform`), so sampled tokens must be equal as well.

The eos is a token the reference emits early for one prompt, so sequences end at different steps on
different ranks: under ep the ranks whose prompts ended keep stepping (lockstep) or the all-to-alls
would hang (run_local's timeout would fail the test).
"""

from __future__ import annotations

import pytest
import torch

from twinpipe.model import ModelConfig, Transformer, generate
from twinpipe.parallel.grid import build_grid
from twinpipe.model.scoring import token_logprobs
from twinpipe.parallel.inference import generate_parallel, score_parallel
from twinpipe.parallel.local import run_local
from twinpipe.parallel.parallelize import parallelize

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15], [16] * 7, [17, 18, 19, 20], [21]]
NEW = 7


def build() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", initializer_range=0.05)).eval()


def reference_eos() -> int:
    """A token that prompt 1 emits third (not emitted first by any prompt), so rows stop apart."""
    return generate(build(), PROMPTS, NEW)[1][2]


def _rank(rank, world, pp, ep, schedule, kwargs):
    torch.set_num_threads(1)
    grid = build_grid(pp, world // pp, ep)
    model = parallelize(build(), grid, torch.device("cpu"), schedule)
    return generate_parallel(model, grid, PROMPTS, NEW, schedule=schedule, **kwargs)


@pytest.mark.parametrize("pp, dp, ep, schedule", [(2, 1, 1, "1f1b"), (2, 1, 1, "dualpipe"), (2, 1, 1, "dualpipev"),
                                                  (1, 2, 2, "1f1b"), (2, 2, 2, "dualpipev")])
def test_greedy_equals_one_process(pp, dp, ep, schedule):
    eos = reference_eos()
    want = generate(build(), PROMPTS, NEW, eos_id=eos)
    assert len({len(t) for t in want}) > 1  # the rows really stop at different steps
    for got in run_local(_rank, pp * dp, pp, ep, schedule, {"eos_id": eos}):
        assert got == want


def test_sampling_equals_one_process():
    """Sampled tokens equal; their logprobs (`logprobs=True`, the rollout's pi_old) within fp32
    rounding of the same logits computed on other row counts and paddings: 1e-5 on values of order 1."""
    kwargs = {"temperature": 1.0, "top_p": 0.9, "seed": 7, "logprobs": True}
    want, want_logps = generate(build(), PROMPTS, NEW, **kwargs)
    assert want != generate(build(), PROMPTS, NEW)
    for got, logps in run_local(_rank, 4, 2, 2, "1f1b", kwargs):
        assert got == want
        assert [len(lp) for lp in logps] == [len(t) for t in want]
        torch.testing.assert_close(torch.tensor(sum(logps, [])), torch.tensor(sum(want_logps, [])), rtol=0, atol=1e-5)


def test_continuous_batching_under_ep_equals_one_process():
    """slots=2 per replica (pp=1, dp=2, ep=2): rows refill at different steps on the two EP ranks, which
    agree on every prefill and step (a hang would fail run_local's timeout); greedy and sampled
    tokens equal one process, as in test_greedy_equals_one_process."""
    eos = reference_eos()
    for kwargs in ({"eos_id": eos}, {"eos_id": eos, "temperature": 1.0, "top_p": 0.9, "seed": 7}):
        want = generate(build(), PROMPTS, NEW, **kwargs)
        for got in run_local(_rank, 2, 1, 2, "1f1b", {**kwargs, "slots": 2}):
            assert got == want


@pytest.mark.parametrize("pp, dp, ep, schedule", [(2, 1, 1, "dualpipev"), (2, 2, 2, "dualpipe")])
def test_continuous_groups_under_pp_equal_one_process(pp, dp, ep, schedule):
    """pp > 1: groups of `slots` rows, one lane per stage (two per rank under DualPipe); a group waiting
    for a lane starts in the step after the lane's group ended, in its caches. With slots=1 and 6
    prompts (3 per replica under dp=2) groups wait and start at different steps on every rank."""
    eos = reference_eos()
    want = generate(build(), PROMPTS, NEW, eos_id=eos)
    for got in run_local(_rank, pp * dp, pp, ep, schedule, {"eos_id": eos, "slots": 1}):
        assert got == want


def test_dp_alone_and_more_micro_batches_than_prompts():
    want = generate(build(), PROMPTS[:3], NEW)
    got = run_local(_dp_rank, 2)
    assert got == [want, want]


def _dp_rank(rank, world):
    grid = build_grid(1, world, 1)
    model = parallelize(build(), grid, torch.device("cpu"))
    return generate_parallel(model, grid, PROMPTS[:3], NEW, micro_batches=4)


def _score_rank(rank, world, pp, ep, schedule):
    torch.set_num_threads(1)
    grid = build_grid(pp, world // pp, ep)
    model = parallelize(build(), grid, torch.device("cpu"), schedule)
    return score_parallel(model, grid, PROMPTS, token_logprobs, schedule=schedule)


def test_scores_equal_one_process_forward():
    """Log-likelihoods through the stages equal the full forward's log-softmax; fp32 rounding only
    (an expert's GEMM sees other row counts, padded batches): 1e-5 on values of order 10."""
    model = build()
    with torch.no_grad():
        want = [torch.log_softmax(model(torch.tensor([p]))[0, :-1], -1).gather(-1, torch.tensor(p[1:])[:, None])
                .squeeze(-1) for p in PROMPTS]
    for got in run_local(_score_rank, 4, 2, 2, "dualpipe"):
        for (logps, greedy), ref, p in zip(got, want, PROMPTS):
            assert len(logps) == len(greedy) == len(p) - 1
            torch.testing.assert_close(torch.tensor(logps), ref, rtol=0, atol=1e-5)


def _rank_split(rank, world, schedule, split):
    torch.set_num_threads(1)
    grid = build_grid(world, 1, 1)
    model = parallelize(build(), grid, torch.device("cpu"), schedule, layer_split=split)
    held = sorted(int(n.split(".")[1]) for n, p in model.named_parameters()
                  if n.startswith("layers.") and n.endswith("input_layernorm.weight") and not p.is_meta)
    return held, generate_parallel(model, grid, PROMPTS, NEW, schedule=schedule, eos_id=reference_eos())


@pytest.mark.parametrize("schedule, split, held", [
    ("1f1b", [3, 1], [[0, 1, 2], [3]]),
    ("1f1b", [1, 3], [[0], [1, 2, 3]]),
    ("dualpipe", [3, 1], [[0, 1, 2, 3], [0, 1, 2, 3]]),  # both ranks hold both stages, cut at 3
])
def test_uneven_layer_split_equals_one_process(schedule, split, held):
    """parallel.layer_split: `parallelize` keeps each rank's blocks by the given counts and records them
    on the model, so generation cuts the same stages (without being told again) and equals one process."""
    want = generate(build(), PROMPTS, NEW, eos_id=reference_eos())
    for rank, (blocks, got) in enumerate(run_local(_rank_split, 2, schedule, split)):
        assert blocks == held[rank]
        assert got == want
