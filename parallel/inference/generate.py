"""Generation on a model spread over ranks: pipeline stages, expert parallelism, data parallelism.

    new = generate_parallel(model, grid, prompts, 64, eos_id=tok.eos_id, schedule="dualpipev")

Every rank gets the whole prompt list and returns the whole result, equal token for token to
`twinpipe.model.generate` in one process (sampling too: its noise is keyed by prompt index).

- data parallelism: replica r decodes its contiguous share of the prompts (`lockstep.shard_rows`);
- pipeline parallelism: a replica's prompts are cut into micro-batches (groups); each stage of the
  schedule's placement (`StagePlacement`: 1F1B, DualPipe, DualPipeV) runs on the rank that holds it,
  with its own latent cache of its blocks only. Stage s sends stage s+1 a header [1 + B] int64
  (go-on flag, running rows) and the hidden states [B, T, H]; the rank of the last stage applies the
  head, chooses the tokens (`model.generation.Decoding`) and sends them back to stage 0. Under
  DualPipe every stage has two copies: even groups go down ranks 0 -> N-1, odd groups up N-1 -> 0,
  so both copies work. DualPipeV's V goes down and back up, ending on rank 0;
- expert parallelism: the EP ranks of a stage run the same (step, stage, group) items in the same
  order (`lockstep`): the same number of groups (filler rows where a replica has fewer prompts) and a
  group stops only when the sampling ranks agree that no EP rank has a row of it running.

Each rank works through its items in one global order, (step, stage, group): every receive waits for
a send issued at an earlier item and every collective is reached by all its ranks at the same item,
so nothing deadlocks, and while stage s works on group g, stage s-1 already works on group g+1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from twinpipe.model.generation import (ContinuousDecoding, Decoding, check_context, check_sampling,
                                       decode_continuous, last_valid_index, pad_prompts, sampling_keys)
from twinpipe.model.kv_cache import LatentKVCache
from twinpipe.parallel.grid import Grid
from twinpipe.parallel.inference.lockstep import any_across, gather_rows, max_across, shard_rows, split_groups
from twinpipe.parallel.pipeline.placement import StagePlacement
from twinpipe.parallel.pipeline.stages import stage_ranges


def stage_routes(placement: StagePlacement) -> list[tuple[int, ...]]:
    """The pipeline rank running each stage, per direction: the rank where the stage comes first
    (`owner`), and under DualPipe also its mirror copy (stage s on rank N-1-s)."""
    down = tuple(placement.owner(s) for s in range(placement.num_stages))
    if placement.schedule != "dualpipe":
        return [down]
    return [down, tuple(placement.mirror(r) for r in down)]


@dataclass
class _Group:
    """One micro-batch of prompts on this rank."""

    rows: list[int]                       # prompt indices (empty: filler rows for EP lockstep)
    tokens: torch.Tensor                  # [B, P] left-padded prompts
    valid: torch.Tensor                   # [B, P]
    route: tuple[int, ...]                # pp rank of each stage
    caches: dict[int, LatentKVCache] = field(default_factory=dict)
    decoding: Decoding | None = None      # on the rank running the last stage, when generating
    finish: Callable | None = None        # on that rank, when scoring
    results: list | None = None           # per row: new tokens or finish's result (that rank)
    alive: bool = True
    inbox: dict[int, tuple] = field(default_factory=dict)  # stage -> message from this same rank
    start: int | None = 0                 # global step of its prefill (None: waits for a free lane)
    done: bool = False


class _Wire:
    """Messages between the pp ranks of one replica: (go, running [B] bool, payload), payload the
    hidden states [B, T, H] (into stage s > 0) or the chosen tokens [B] (into stage 0)."""

    def __init__(self, grid: Grid, device: torch.device, hidden: int, dtype: torch.dtype):
        self.grid, self.device, self.hidden, self.dtype = grid, device, hidden, dtype
        self.pending: list = []   # (work, tensor kept alive until sent) of this step
        self.previous: list = []  # ... of the step before

    def peer(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.grid.pp_group, pp_rank)

    def send(self, pp_rank: int, go: bool, running: torch.Tensor, payload: torch.Tensor | None) -> None:
        header = torch.cat([torch.tensor([int(go)], device=self.device), running.long()])  # [1 + B]
        tensors = [header] + ([payload.contiguous()] if go else [])
        self.pending += [(dist.isend(t, self.peer(pp_rank)), t) for t in tensors]

    def recv(self, pp_rank: int, batch: int, shape: tuple[int, ...] | None) -> tuple:
        """shape None: the payload is tokens [batch]; else hidden states of that shape."""
        header = torch.empty(1 + batch, dtype=torch.long, device=self.device)
        dist.recv(header, self.peer(pp_rank))
        go, running = bool(header[0]), header[1:].bool()
        if not go:
            return False, running, None
        payload = (torch.empty(batch, dtype=torch.long, device=self.device) if shape is None
                   else torch.empty(shape, dtype=self.dtype, device=self.device))
        dist.recv(payload, self.peer(pp_rank))
        return True, running, payload

    def end_step(self, last: bool = False) -> None:
        """Wait for the sends of the step before (a step's last sends are received in the next one);
        `last`: for all."""
        for work, _ in self.previous + (self.pending if last else []):
            work.wait()
        self.previous, self.pending = ([], []) if last else (self.pending, [])


def _run_stage(model: nn.Module, layers: range, first: bool, x: torch.Tensor, valid: torch.Tensor,
               cache: LatentKVCache) -> torch.Tensor:
    """Stage blocks `layers` on tokens [B, T] (first stage) or hidden states [B, T, H] -> [B, T, H]."""
    positions = cache.begin(x.shape[1], valid)                                      # [B, T]
    h = model.embed(x) if first else x
    for i in layers:
        h = model.layers[i](h, positions, cache)
    cache.commit()
    return h


@torch.no_grad()
def generate_parallel(model: nn.Module, grid: Grid, prompts: list[list[int]], max_new_tokens: int,
                      temperature: float = 0.0, top_p: float = 1.0, eos_id: int | None = None, seed: int = 0,
                      schedule: str = "1f1b", micro_batches: int | None = None, logprobs: bool = False,
                      on_stage: Callable[[list[int]], None] | None = None, slots: int | None = None) -> Any:
    """The new tokens of every prompt (eos included when reached), on every rank; see the module
    docstring. `model` is this rank's part (`parallelize`d under `grid` and `schedule`);
    `micro_batches`: groups per replica (default: one per pipeline stage, two per rank for DualPipe).
    `logprobs`: return (new tokens, their `chosen_logprobs`) per prompt, as `generate(logprobs=True)`.
    `on_stage(rows)`: called on this rank before each stage forward of a group, with the prompt index
    of each of its batch rows ([] for EP filler rows), so module hooks know whose tokens they see
    (the GRPO route recorder: trainer/grpo/routing_replay.py).
    `slots`: continuous batching, at most that many sequences per replica at once. pp = 1: per row
    (`generate(slots=)`; the expert-parallel group agrees on each refill and step,
    `decode_continuous`); pp > 1: per micro-batch group of `slots` rows, a group taking its lane's
    caches in the step after the lane's previous group ended."""
    check_sampling(max_new_tokens, top_p)
    check_context(prompts, max_new_tokens, model.config.max_position_embeddings)
    if max_new_tokens == 0:
        return ([[] for _ in prompts], [[] for _ in prompts]) if logprobs else [[] for _ in prompts]
    if slots is not None:
        if slots < 1:
            raise ValueError(f"slots={slots}: must be >= 1 (sequences decoded at once)")
        if on_stage is not None:
            raise ValueError(f"slots={slots}: continuous batching moves prompts between batch rows; "
                             "on_stage (a route recorder) needs fixed rows: leave slots unset")
    sampling = (max_new_tokens, temperature, top_p, eos_id, seed, logprobs)
    if slots is not None and grid.pp == 1:
        results = _continuous(model, grid, prompts, max_new_tokens, temperature, top_p, eos_id, seed, logprobs,
                              slots)
    else:
        results = _drive(model, grid, prompts, max_new_tokens, schedule, micro_batches, sampling=sampling,
                         on_stage=on_stage, slots=slots)
    if not logprobs:
        return results
    return [new for new, _ in results], [lp for _, lp in results]


@torch.no_grad()
def score_parallel(model: nn.Module, grid: Grid, sequences: list[list[int]], finish: Callable,
                   schedule: str = "1f1b", micro_batches: int | None = None) -> list[Any]:
    """One forward of every sequence through the stages (left-padded into micro-batches, the same
    placement and lockstep as `generate_parallel`), then on the last stage's rank
    `finish(model, h [B, T, H] last block's output, tokens [B, T], valid [B, T]) -> one result per row`
    (e.g. log-likelihoods); returns every sequence's result, on every rank."""
    check_context(sequences, 0, model.config.max_position_embeddings)
    return _drive(model, grid, sequences, 1, schedule, micro_batches, finish=finish)


def _continuous(model: nn.Module, grid: Grid, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                top_p: float, eos_id: int | None, seed: int, logprobs: bool, slots: int) -> list[Any]:
    """Continuous batching of this replica's share; the EP group agrees on every forward (a replica
    with no prompt left steps idle rows or runs filler prefills until all are done)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("need at least one sequence and every sequence needs >= 1 token")
    device = next(p for p in model.parameters() if not p.is_meta and p.is_floating_point()).device
    rows = list(shard_rows(len(prompts), grid.dp, grid.dp_rank))
    decoding = ContinuousDecoding(len(rows), max(1, min(slots, len(rows))), max_new_tokens, temperature, top_p,
                                  eos_id, sampling_keys(seed, torch.tensor(rows, dtype=torch.long)), device,
                                  record_logprobs=logprobs)
    decode_continuous(model, [prompts[r] for r in rows], decoding,
                      agree=lambda level: max_across(level, grid.ep_group, device))
    new = decoding.tokens()
    if logprobs:
        new = list(zip(new, [lp[:len(t)] for lp, t in zip(decoding.logprobs.tolist(), new)]))
    gathered = gather_rows(dict(zip(rows, new)))
    return [gathered[i] for i in range(len(prompts))]


def _drive(model: nn.Module, grid: Grid, prompts: list[list[int]], steps: int, schedule: str,
           micro_batches: int | None, sampling: tuple | None = None, finish: Callable | None = None,
           on_stage: Callable[[list[int]], None] | None = None, slots: int | None = None) -> list[Any]:
    """Run up to `steps` forwards of every micro-batch through its route; the last stage samples
    (`sampling`: max_new_tokens, temperature, top_p, eos_id, seed, logprobs) or applies `finish` once.
    `slots`: continuous batching per micro-batch group (see the groups below)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("need at least one sequence and every sequence needs >= 1 token")
    placement = StagePlacement(schedule if grid.pp > 1 else "1f1b", grid.pp)
    routes = stage_routes(placement)
    num_stages = placement.num_stages
    layers = stage_ranges(model, num_stages)  # parallel.layer_split as the model was partitioned
    weight = next(p for p in model.parameters() if not p.is_meta and p.is_floating_point())
    device, dtype, me = weight.device, weight.dtype, grid.pp_rank
    wire = _Wire(grid, device, model.config.hidden_size, dtype)

    # groups: the same count on every replica (ep lockstep needs it); `wanted` lanes run at once.
    # Static: one group per lane, at most the largest share. Continuous (`slots`): groups of `slots`
    # rows (padded with filler rows); a group starts in the step after its lane's previous one ended,
    # in that group's caches.
    shares = [len(shard_rows(len(prompts), grid.dp, r)) for r in range(grid.dp)]
    wanted = micro_batches or num_stages * len(routes)
    mine = shard_rows(len(prompts), grid.dp, grid.dp_rank)
    if slots is None:
        chunks = split_groups(mine, min(wanted, max(shares)))
    else:
        chunks = [list(mine[i:i + slots]) for i in range(0, -(-max(shares) // slots) * slots, slots)]
    max_len = max(len(p) for p in prompts) + steps
    groups: list[_Group] = []
    for g, rows in enumerate(chunks):
        if not rows and grid.ep == 1:
            continue
        batch = [prompts[r] for r in rows] or [[0]]
        tokens, valid = pad_prompts(batch + [[0]] * (0 if slots is None else slots - len(batch)), "left")
        lane = len(groups) % wanted
        group = _Group(rows, tokens.to(device), valid.to(device), routes[lane % len(routes)],
                       start=0 if lane == len(groups) else None)
        for s in range(num_stages):
            if group.route[s] == me and group.start == 0:
                group.caches[s] = LatentKVCache.for_model(model, len(tokens), max_len if slots else
                                                          tokens.shape[1] + steps, layers=layers[s])
        if group.route[-1] == me:
            group.finish = finish
            if sampling is not None:
                max_new_tokens, temperature, top_p, eos_id, seed, logprobs = sampling
                live = torch.tensor([True] * len(rows) + [False] * (len(tokens) - len(rows)))
                keys = sampling_keys(seed, torch.tensor(rows + [0] * (len(tokens) - len(rows))))
                group.decoding = Decoding(len(tokens), max_new_tokens, temperature, top_p, eos_id, keys, device,
                                          live, record_logprobs=logprobs)
        groups.append(group)

    step = 0
    while True:
        for s in range(num_stages):
            for group in groups:
                if group.start is not None and group.alive and group.route[s] == me:
                    if on_stage is not None:
                        on_stage(group.rows)
                    _stage_item(model, group, s, step - group.start, layers, wire, grid)
        # every rank learns a group's end in the same step: a stop travels the whole chain in the
        # step after the last stage chose it, and all count the steps
        for g, group in enumerate(groups):
            if group.start is not None and not group.done and (not group.alive or step - group.start == steps - 1):
                group.done, group.alive = True, False
                if g + wanted < len(groups):
                    successor = groups[g + wanted]
                    successor.start, successor.caches = step + 1, group.caches
                    for cache in successor.caches.values():
                        cache.reset()
        more = not all(group.done for group in groups)
        wire.end_step(last=not more)
        if not more:
            break
        step += 1
    for group in groups:
        if group.decoding is not None:
            group.results = group.decoding.tokens()
            if group.decoding.logprobs is not None:  # (tokens, their logprobs) per row
                group.results = [(new, row[:len(new)]) for new, row in
                                 zip(group.results, group.decoding.logprobs.tolist())]
    results = {row: value for group in groups if group.results is not None
               for row, value in zip(group.rows, group.results)}
    gathered = gather_rows(results)
    return [gathered[i] for i in range(len(prompts))]


def _stage_item(model: nn.Module, group: _Group, s: int, step: int, layers: list[range], wire: _Wire,
                grid: Grid) -> None:
    """Stage `s` of `group` at decoding step `step` on this rank: take its input (prompt, local
    message or receive), run it, pass the output on (or choose the tokens at the last stage)."""
    me, last = grid.pp_rank, len(group.route) - 1
    batch = len(group.tokens)
    if s == 0 and step == 0:
        go, running, x, valid = True, None, group.tokens, group.valid
    else:
        src = group.route[s - 1] if s > 0 else group.route[last]
        if src == me:
            go, running, x = group.inbox.pop(s)
        else:
            width = group.tokens.shape[1] if step == 0 else 1
            go, running, x = wire.recv(src, batch, None if s == 0 else (batch, width, wire.hidden))
        valid = group.valid if step == 0 else running[:, None]
        if s == 0 and go:
            x = x[:, None]                                                          # tokens [B, 1]
    if not go:  # the group has ended: tell the next stage and stop
        group.alive = False
        if s < last:
            _deliver(group, s + 1, wire, me, False, running, None)
        return
    h = _run_stage(model, layers[s], s == 0, x, valid, group.caches[s])             # [B, T, H]
    if s < last:
        _deliver(group, s + 1, wire, me, True, valid[:, -1], h)
        return
    if group.finish is not None:
        group.results, group.alive = group.finish(model, h, group.tokens, group.valid), False
        return
    decoding = group.decoding
    at = last_valid_index(valid) if step == 0 else torch.full((batch,), h.shape[1] - 1, device=h.device)
    nxt = decoding.choose(model.head(h[torch.arange(batch, device=h.device), at]))  # [B]
    if decoding.step == decoding.max_new_tokens:
        group.alive = False  # every rank counts the steps: nothing to say
        return
    # a stop also travels the whole chain (stage 0 .. last at the next step), so that every rank
    # holding a stage of this group hears it
    go = True if decoding.eos_id is None else any_across(decoding.any_running(), grid.ep_group, h.device)
    _deliver(group, 0, wire, me, go, decoding.running, nxt)


def _deliver(group: _Group, s: int, wire: _Wire, me: int, go: bool, running: torch.Tensor,
             payload: torch.Tensor | None) -> None:
    dst = group.route[s]
    if dst == me:
        group.inbox[s] = (go, running, payload)
    else:
        wire.send(dst, go, running, payload)
