"""Routing replay for RL on MoE: the experts each token was routed to during the rollout are recorded
(logical expert ids, before any EPLB slot mapping) and the training forward routes the same way.

Routers flip on ulp-level differences (the rollout decodes with the latent cache; training runs the
full sequence), and a token sent to other experts in training than in the rollout makes the
importance ratio meaningless. With replay the training forward keeps the rollout's picks and only
their gate values are recomputed from the live router (`Gate.pick_weights`), so the router still
gets gradients. Both sides are forward hooks on the main layers' `Gate`s, from outside the model.

Layout of `routes` [B, L, T, K] int64 (L MoE layers of the main stack, in order): the experts of the
token at position t of the training row; -1 where the rollout did not run that token (padding, and
the last sampled token, which is never fed back), i.e. live routing.

Under pipeline parallelism each rank holds only some layers. Recording: `generate_parallel` tells the
recorder which prompts each group's batch rows hold (`on_stage`), each rank records its layers for
the groups it ran, and one all-reduce (max over -1) over the pipeline group gives every rank every
layer. Replay: the step runners mark which micro-batch a forward (or a backward, whose recomputed
forward belongs to it) computes (`parallel/pipeline/in_flight.py`: the plain runner, and the pipeline
engine's chunk of a stage mapped to the step's micro-batch by `StagePlacement.micro_batch`), so a
layer's hook, on whichever rank holds it, takes that micro-batch's routes of its own layer: the
routes travel with the micro-batch as its index, every pipeline rank holding the step's batches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from twinpipe.model.moe import MoE
from twinpipe.parallel.pipeline import in_flight
from twinpipe.parallel.recompute import recomputing


def main_gates(model: nn.Module) -> list[nn.Module]:
    """The gates of the main stack's MoE layers (MTP blocks excluded: generation never runs them);
    under pp also those of the blocks on other ranks (on meta; their hooks never fire)."""
    return [layer.mlp.gate for layer in model.layers if isinstance(layer.mlp, MoE)]


class RouteRecorder:
    """`with RouteRecorder(model, rows) as rec: generate(...)`; then `rec.routes(...)`.

    Each gate call is filed under the prompts of the batch running (`rows`, or what `on_stage` was
    last told); per batch the calls are one prefill [B * P] (left-padded to width P) then one [B] per
    decoding step, as `model.generation.generate` and each group of `generate_parallel` make them."""

    def __init__(self, model: nn.Module, rows: list[int] | None = None):
        self.gates = main_gates(model)
        self.top_k = self.gates[0].top_k if self.gates else 0
        self.rows: tuple[int, ...] = tuple(rows or ())
        self.calls: dict[tuple[int, ...], list[list[torch.Tensor]]] = {}  # rows -> per layer, per call
        self.handles: list = []

    def on_stage(self, rows: list[int]) -> None:
        """`generate_parallel`'s hook: the batch rows of the group whose stage runs next."""
        self.rows = tuple(rows)

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, out: tuple) -> None:
            if self.rows:  # () : EP filler rows
                per_layer = self.calls.setdefault(self.rows, [[] for _ in self.gates])
                per_layer[layer].append(out[1].detach())
        return hook

    def __enter__(self) -> "RouteRecorder":
        self.handles = [gate.register_forward_hook(self._hook(i)) for i, gate in enumerate(self.gates)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def routes(self, rows: list[int], prompt_lens: list[int], new_lens: list[int], seq_len: int,
               group: dist.ProcessGroup | None = None, device: torch.device | None = None) -> torch.Tensor:
        """[n, L, seq_len, K] of the prompts `rows` (in this order): row b's prompt then its new tokens.
        `group`: the pipeline group whose ranks recorded the other layers (merged by a max on `device`)."""
        at = {r: b for b, r in enumerate(rows)}
        out = torch.full((len(rows), len(self.gates), seq_len, self.top_k), -1, dtype=torch.long)
        for batch, per_layer in self.calls.items():
            for layer, calls in enumerate(per_layer):
                if not calls:
                    continue
                B, K = len(batch), calls[0].shape[-1]
                recorded = torch.cat([c.view(B, -1, K) for c in calls], dim=1).cpu()      # [B, P + S, K]
                P = calls[0].shape[0] // B
                for j, r in enumerate(batch):
                    if r not in at:
                        continue
                    b = at[r]
                    a, m = prompt_lens[b], new_lens[b]
                    fed = a + m - 1  # prompt tokens and every new token but the last went through the model
                    out[b, layer, :fed] = recorded[j, P - a: P - a + fed]
        if group is not None and dist.get_world_size(group) > 1:
            merged = out.to(device)
            dist.all_reduce(merged, op=dist.ReduceOp.MAX, group=group)  # each entry recorded on one rank
            out = merged.cpu()
        return out


class RouteReplay:
    """While installed, each training-mode forward of the main gates takes its picks from the routes
    [B, L, T, K] of the micro-batch in flight (`expect`: one entry per micro-batch of the step, in the
    step's order; `in_flight` says which one runs). Counts, per step, how many replayed tokens'
    live routes differ from the rollout's (`take_flips`: what replay corrected)."""

    def __init__(self, model: nn.Module):
        self.gates = main_gates(model)
        self.routes: list[torch.Tensor] = []
        self.flips = self.replayed = 0
        self.handles = [gate.register_forward_hook(self._hook(i)) for i, gate in enumerate(self.gates)]

    def expect(self, routes: list[torch.Tensor]) -> None:
        """The routes of the step's micro-batches, in order."""
        self.routes = list(routes)

    def take_flips(self) -> tuple[int, int]:
        """(tokens x layers whose live route differed from the rollout's, tokens x layers replayed)
        since the last call, outside recomputation."""
        counts, (self.flips, self.replayed) = (int(self.flips), int(self.replayed)), (0, 0)
        return counts

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, out: tuple) -> tuple | None:
            if not module.training:
                return None
            again = recomputing()  # a forward rerun in the backward: the backward's micro-batch
            index = in_flight.micro_batch(backward=again)
            if index is None or index >= len(self.routes):
                raise RuntimeError(f"routing replay: a training forward of micro-batch {index} with routes "
                                   f"for {len(self.routes)} (run it through a step runner, after expect())")
            weights, live_idx, scores = out                                         # [N, K], [N, K], [N, E]
            routes = self.routes[index][:, layer].to(live_idx.device)               # [B, T, K]
            if routes.numel() != live_idx.numel():
                raise RuntimeError(f"routing replay: routes for {routes.numel()} picks, the forward has "
                                   f"{live_idx.numel()}")
            replayed = routes.reshape(live_idx.shape)                               # [N, K]
            used = replayed[:, 0] >= 0                                              # [N]
            if not again:  # counted on the device: no host sync per layer
                differ = (live_idx.sort(-1).values != replayed.sort(-1).values).any(-1)
                self.flips = self.flips + (differ & used).sum()
                self.replayed = self.replayed + used.sum()
            idx = torch.where(used[:, None], replayed, live_idx)
            return module.pick_weights(scores, idx), idx, scores
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
