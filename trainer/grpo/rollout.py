"""The GRPO batch source: rollouts with the current policy through the model's own generation.

Every `grpo.updates_per_rollout` (mu) steps it takes the next `train.global_batch / grpo.group_size`
prompts (shuffled per epoch from `train.seed`) and:

    each prompt x group_size -> sequences 0..N-1; dp rank r decodes its contiguous share (whole groups)
    -> `model.generation.generate` in eval mode, latent KV cache, keyed sampling noise (seed of this
       rollout, sequence index: the same tokens under any dp / ep / pp), each token's logprob recorded
       (`old_logprobs`, pi_old), EP ranks stepping in lockstep; with routing replay the routes too;
       under pp > 1 `parallel.inference.generate_parallel` through the stages of `parallel.schedule`
       (every rank gets every sequence, keeps its replica's share; with routing replay each rank
       records its layers' routes and the pipeline group merges them), and the reference's logprobs
       through `score_parallel`; with `grpo.speculative` `model.speculative.speculative_generate`
       (MTP drafts accepted with min(1, p/q), else resampled from the residual: the main model's
       distribution exactly, with noise keyed by sequence too, but not `generate`'s tokens;
       `speculative_acceptance` logged)
    -> rewards of this rank's completions, gathered over dp -> group advantages (`advantages`); with
       `grpo.resample_max` (DAPO's dynamic sampling) up to that many more draws while a group's
       rewards are all equal, group p taken from the first later draw whose group p differs
    -> rows [micro_batch, seq_len]: prompt + completion (+ eos padding), `labels` on completion tokens,
       `loss_mask` (0 for filtered zero-std groups), `old_logprobs`, `ref_logprobs` (beta > 0: the
       frozen reference, same layout), `advantages`, `routes`

and gives the same micro-batches mu times. Its state (prompt position, rollout count, the current
rollout's micro-batches while updates are left) is checkpointed, so a resume continues exactly.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from twinpipe.data.prompts import load_prompts
from twinpipe.data.records import Fields
from twinpipe.model.generation import chosen_logprobs, generate
from twinpipe.model.speculative import speculative_generate
from twinpipe.parallel.inference import generate_parallel, score_parallel
from twinpipe.parallel.inference.lockstep import max_across, shard_rows
from twinpipe.parallel.pipeline.runner import autocast_context
from twinpipe.trainer.loss import IGNORE_INDEX
from twinpipe.trainer.grpo.rewards import Rewards
from twinpipe.trainer.grpo.routing_replay import RouteRecorder, RouteReplay

log = logging.getLogger(__name__)

SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, scale: str = "group", leave_one_out: bool = False,
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards [P, G] -> (advantages [P, G], zero_std [P] bool: groups whose rewards are all equal).

    r - mean of the group (leave_one_out: of the group's *other* samples), divided by the group's std
    (`group`, DeepSeekMath), the whole batch's (`batch`) or nothing (`none`, Dr. GRPO); std unbiased."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"grpo.scale_rewards={scale!r}: allowed {', '.join(SCALE_REWARDS)}")
    G = rewards.shape[1]
    if leave_one_out:
        baseline = (rewards.sum(1, keepdim=True) - rewards) / (G - 1)               # [P, G]
    else:
        baseline = rewards.mean(1, keepdim=True)                                    # [P, 1]
    centered = rewards - baseline
    zero_std = rewards.amax(1) == rewards.amin(1)                                   # [P]
    if scale == "group":
        centered = centered / (rewards.std(1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (rewards.std() + eps)
    return centered.masked_fill(zero_std[:, None], 0.0), zero_std  # exactly 0, even with eps = 0


def _gather(values: torch.Tensor, group: Any) -> torch.Tensor:
    """values [n, C] of every rank of `group` (equal n), concatenated in rank order."""
    if group is None or dist.get_world_size(group) == 1:
        return values
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, values, group=group)
    return torch.cat(parts)


def _metric_name(name: str) -> str:
    return "reward_" + re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")[:40]


class RolloutSource:
    """A batch source (trainer seam) of GRPO rollouts; see the module docstring."""

    def __init__(self, cfg: DictConfig, tokenizer: Any, grid: Any, model: torch.nn.Module,
                 ref: torch.nn.Module | None = None, replay: RouteReplay | None = None):
        g = cfg.grpo
        self.cfg, self.g, self.tokenizer, self.grid, self.model, self.ref, self.replay = \
            cfg, g, tokenizer, grid, model, ref, replay
        self.device = next(p for p in model.parameters() if not p.is_meta).device
        fields = Fields(messages=cfg.data.messages_field, prompt=cfg.data.prompt_field)
        self.prompts = load_prompts(list(cfg.data.paths), tokenizer, cfg.train.seq_len - g.max_new_tokens, fields)
        self.rewards = Rewards.from_config(g.reward, list(g.reward_weights))
        for prompt in self.prompts:
            self.rewards.check_fields(prompt.where, prompt.fields)
        self.pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
        self.num_prompts = cfg.train.global_batch // g.group_size
        self.epoch = self.position = self.rollouts = self.updates_left = 0
        self.batches: list[dict[str, torch.Tensor]] = []
        self.metrics: dict[str, float] = {}
        self.fresh = False  # whether the last next_step rolled out
        self.handed_at = 0.0
        log.info("GRPO: %d prompts, %d per rollout x group %d, rewards %s", len(self.prompts),
                 self.num_prompts, g.group_size, ", ".join(self.rewards.names))

    @property
    def global_batch(self) -> int:
        return self.num_prompts * self.g.group_size

    @global_batch.setter
    def global_batch(self, value: int) -> None:
        if value != self.global_batch:
            raise ValueError(f"GRPO rollouts have a fixed global batch ({self.global_batch} sequences); "
                             f"got {value} (optim.ramp_start must be 0)")

    # ---- prompts ----
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.train.seed, epoch]).permutation(len(self.prompts))

    def _next_prompts(self) -> list[int]:
        out = []
        while len(out) < self.num_prompts:
            order = self._order(self.epoch)
            take = order[self.position: self.position + self.num_prompts - len(out)]
            out += take.tolist()
            self.position += len(take)
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    # ---- the seam ----
    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches; a new rollout every `grpo.updates_per_rollout` calls."""
        self.fresh = self.updates_left == 0
        if self.fresh:
            self.batches, self.metrics = self._rollout()
            self.updates_left = self.g.updates_per_rollout
        first = torch.tensor(self.updates_left == self.g.updates_per_rollout)
        self.updates_left -= 1
        if self.replay is not None:
            self.replay.expect([mb["routes"] for mb in self.batches])
        self.handed_at = time.perf_counter()  # the update's time starts here
        return [{**mb, "first_update": first} for mb in self.batches]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "rollouts": self.rollouts,
                "updates_left": self.updates_left, "metrics": dict(self.metrics),
                "batches": self.batches if self.updates_left else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self.rollouts = state["epoch"], state["position"], state["rollouts"]
        self.updates_left, self.metrics, self.batches = state["updates_left"], state["metrics"], state["batches"]

    # ---- one rollout ----
    def _rollout(self) -> tuple[list[dict[str, torch.Tensor]], dict[str, float]]:
        """A batch of P groups: one draw of P prompts, and with `grpo.resample_max` > 0 (DAPO's dynamic
        sampling) up to that many more draws while a group of the batch is zero-std: group p of the
        batch is replaced by group p of the first later draw whose rewards differ. Same position, so
        the same dp rank holds it (its rows stay where they are) and the batch is the same under any
        layout; every rank draws as often (the choice is made on the gathered rewards)."""
        g, grid, G, P = self.g, self.grid, self.g.group_size, self.num_prompts
        R = len(self.rewards.fns)
        weights = torch.tensor(self.rewards.weights, dtype=torch.float64)
        draws = [self._draw()]
        zero = [group_advantages((draws[0]["table"][:, :R] * weights).sum(1).view(-1, G))[1]]  # [P] per draw
        slots = [0] * P                                                             # the draw of each group
        while len(draws) <= g.resample_max and any(zero[d][p] for p, d in enumerate(slots)):
            draws.append(self._draw())
            zero.append(group_advantages((draws[-1]["table"][:, :R] * weights).sum(1).view(-1, G))[1])
            slots = [len(draws) - 1 if zero[d][p] and not zero[-1][p] else d for p, d in enumerate(slots)]

        table = torch.cat([draws[d]["table"][p * G:(p + 1) * G] for p, d in enumerate(slots)])  # [N, R + 2]
        total = (table[:, :R] * weights).sum(1).view(-1, G)                         # [P, G]
        adv, zero_std = group_advantages(total, g.scale_rewards, g.leave_one_out)
        keep = ~zero_std if g.filter_zero_std else torch.ones_like(zero_std)
        mine = shard_rows(P * G, grid.dp, grid.dp_rank)
        parts = []
        for p in range(mine.start // G, mine.stop // G):                          # this rank's groups
            local = slice(p * G - mine.start, (p + 1) * G - mine.start)
            parts.append({k: v[local] for k, v in draws[slots[p]]["rows"].items()})
        rows = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
        rows["advantages"] = adv.reshape(-1)[mine.start:mine.stop].float()
        rows["loss_mask"] = (rows["labels"] != IGNORE_INDEX).float() * \
            keep.repeat_interleave(G)[mine.start:mine.stop, None].float()
        batches = [{k: v[i: i + self.cfg.train.micro_batch] for k, v in rows.items()}
                   for i in range(0, len(mine), self.cfg.train.micro_batch)]
        if self.ref is not None:
            self._add_ref_logprobs(batches)

        lengths = table[:, R]
        generated = sum(float(d["table"][:, R].sum()) for d in draws)
        rollout_s = sum(float(d["table"][:, R + 1].max()) for d in draws)       # each draw's slowest rank
        metrics = {"reward_mean": float(total.mean()), "reward_std": float(total.std()),
                   "frac_zero_std_groups": float(zero_std.double().mean()),
                   "response_length_mean": float(lengths.mean()), "response_length_max": float(lengths.max()),
                   "rollout_tokens_per_s": generated / max(rollout_s, 1e-9), "rollout_s": rollout_s}
        if g.resample_max:
            metrics["resample_draws"] = float(len(draws))
        if R > 1:
            metrics.update({_metric_name(n): float(table[:, i].mean()) for i, n in enumerate(self.rewards.names)})
        if g.speculative:
            drafts = torch.tensor([d["drafts"] for d in draws], device=self.device).sum(0, keepdim=True)
            drafted, accepted = _gather(drafts, grid.dp_group).sum(0).tolist()
            metrics["speculative_acceptance"] = accepted / max(drafted, 1)
        if self.rewards.correctness is not None:
            metrics["accuracy"] = float((table[:, self.rewards.correctness] > 0).double().mean())
        return batches, metrics

    def _draw(self) -> dict[str, Any]:
        """Roll out the next P prompts x G: this rank's training rows (`_rows`; advantages and loss
        mask set by the caller), every rank's rewards, lengths and times (`table` [N, R + 2]) and,
        speculative, this rank's (drafted, accepted)."""
        g, grid, G = self.g, self.grid, self.g.group_size
        picked = self._next_prompts()
        seqs = [self.prompts[i] for i in picked for _ in range(G)]                  # N = P x G
        mine = shard_rows(len(seqs), grid.dp, grid.dp_rank)                        # whole groups
        prompts = [seqs[r].ids for r in mine]
        seed = (self.cfg.train.seed * 1_000_003 + self.rollouts) % (1 << 62)
        self.rollouts += 1
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        recorder = RouteRecorder(self.model, list(mine)) if self.replay is not None else None
        try:
            with torch.no_grad(), (recorder or contextlib.nullcontext()), \
                    autocast_context(self.cfg.train.dtype, self.device):
                drafts = None
                if g.speculative:  # MTP drafts, main-model verification (keyed noise: any dp)
                    spec = speculative_generate(self.model, prompts, g.max_new_tokens, g.temperature, g.top_p,
                                                self.tokenizer.eos_id, seed=seed, rows=list(mine), logprobs=True)
                    new, logps, drafts = spec.tokens, spec.logprobs, (spec.drafted, spec.accepted)
                elif grid.pp > 1:  # through the stages; every rank gets every sequence's tokens
                    new, logps = generate_parallel(
                        self.model, grid, [s.ids for s in seqs], g.max_new_tokens, g.temperature, g.top_p,
                        self.tokenizer.eos_id, seed=seed, schedule=self.cfg.parallel.schedule, logprobs=True,
                        on_stage=recorder.on_stage if recorder is not None else None,
                        slots=g.rollout_slots or None)
                    new, logps = new[mine.start:mine.stop], logps[mine.start:mine.stop]
                else:  # the EP group agrees on going on (static batch) or on each forward's kind (slots)
                    new, logps = generate(self.model, prompts, g.max_new_tokens, g.temperature, g.top_p,
                                          self.tokenizer.eos_id, seed=seed, rows=list(mine), logprobs=True,
                                          agree=lambda value: max_across(int(value), grid.ep_group, self.device),
                                          slots=g.rollout_slots or None)
        finally:
            self.model.train(was_training)
        rollout_s = time.perf_counter() - t0

        # rewards of this rank's completions, then everyone's: [N, R + 2] (rewards, length, time)
        scores = []
        for r, tokens in zip(mine, new):
            text = tokens[:-1] if tokens and tokens[-1] == self.tokenizer.eos_id else tokens
            scores.append(self.rewards.score(seqs[r].raw, self.tokenizer.decode(text), seqs[r].fields, seqs[r].where))
        local = torch.tensor([s + [len(t), rollout_s] for s, t in zip(scores, new)], dtype=torch.float64)
        table = _gather(local.to(self.device), grid.dp_group).cpu()                 # [N, R + 2]
        n = len(prompts)
        rows = self._rows(list(mine), prompts, new, logps, torch.zeros(n), torch.ones(n, dtype=torch.bool), recorder)
        return {"table": table, "rows": rows, "drafts": drafts}

    def _rows(self, mine: list[int], prompts: list[list[int]], new: list[list[int]], logps: list[list[float]],
              adv: torch.Tensor, keep: torch.Tensor, recorder: RouteRecorder | None) -> dict[str, torch.Tensor]:
        """The training rows of this rank's sequences `mine`, [n, seq_len] each (routes [n, L, seq_len, K])."""
        n, T = len(prompts), self.cfg.train.seq_len
        input_ids = torch.full((n, T), self.pad_id, dtype=torch.long)
        labels = torch.full((n, T), IGNORE_INDEX, dtype=torch.long)
        old = torch.zeros(n, T, dtype=torch.float32)
        for b, (p, c, lp) in enumerate(zip(prompts, new, logps)):
            a, m = len(p), len(c)
            input_ids[b, :a + m] = torch.tensor(p + c)
            labels[b, a - 1: a + m - 1] = torch.tensor(c)                           # position t predicts t + 1
            old[b, a - 1: a + m - 1] = torch.tensor(lp)
        loss_mask = (labels != IGNORE_INDEX).float() * keep[:, None].float()
        rows = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "old_logprobs": old,
                "advantages": adv.float()}
        if recorder is not None:
            rows["routes"] = recorder.routes(mine, [len(p) for p in prompts], [len(c) for c in new], T,
                                             self.grid.pp_group if self.grid.pp > 1 else None, self.device)
        return rows

    @torch.no_grad()
    def _add_ref_logprobs(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """`ref_logprobs` [B, T] of every micro-batch from the frozen reference (same count of forwards
        on every rank, so EP ranks stay in step). Under pp the rows of every dp replica go through the
        reference's stages (`score_parallel`), whose last stage gives each position's logprob of both
        label kinds: the next token (completion targets) and token 0 (where labels are -100, clamped to
        0 as the loss reads them)."""
        if self.grid.pp > 1:
            mine = torch.cat([mb["input_ids"] for mb in batches])                  # [n, T]
            rows = _gather(mine.to(self.device), self.grid.dp_group).tolist()      # [N, T]
            with autocast_context(self.cfg.train.dtype, self.device):
                scored = score_parallel(self.ref, self.grid, rows, self._next_and_zero_logprobs,
                                        self.cfg.parallel.schedule)
            start = self.grid.dp_rank * len(mine)
            both = torch.stack(scored[start: start + len(mine)])                    # [n, T, 2]
            i = 0
            for mb in batches:
                pick = (mb["labels"] == IGNORE_INDEX).long()[..., None]            # [B, T, 1]
                mb["ref_logprobs"] = both[i: i + len(pick)].gather(-1, pick).squeeze(-1)
                i += len(pick)
            return
        for mb in batches:
            with autocast_context(self.cfg.train.dtype, self.device):
                logits = self.ref(mb["input_ids"].to(self.device))                  # [B, T, V]
            mb["ref_logprobs"] = chosen_logprobs(logits, mb["labels"].to(self.device).clamp(min=0),
                                                 self.g.temperature).cpu()

    def _next_and_zero_logprobs(self, model: torch.nn.Module, h: torch.Tensor, tokens: torch.Tensor,
                                valid: torch.Tensor) -> list[torch.Tensor]:
        """`score_parallel`'s finish: h [B, T, H], tokens [B, T] -> per row [T, 2] logprobs of (the next
        token, token 0) at each position (the last position's "next token" is 0 too; it is no target)."""
        logits = model.head(h)                                                      # [B, T, V]
        nxt = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], 1)        # [B, T]
        both = torch.stack([nxt, torch.zeros_like(nxt)], -1)                        # [B, T, 2]
        logps = chosen_logprobs(logits[:, :, None].expand(-1, -1, 2, -1), both, self.g.temperature)
        return list(logps.float().cpu())
