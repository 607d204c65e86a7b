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
"""

from __future__ import annotations

import torch
from torch import nn

from twinpipe.model.moe import MoE


def main_gates(model: nn.Module) -> list[nn.Module]:
    """The gates of the main stack's MoE layers (MTP blocks excluded: generation never runs them)."""
    return [layer.mlp.gate for layer in model.layers if isinstance(layer.mlp, MoE)]


class RouteRecorder:
    """`with RouteRecorder(model) as rec: generate(...)`; then `rec.routes(...)`. Expects one prefill
    call [B * P] then one call [B] per decoding step, as `model.generation.generate` makes."""

    def __init__(self, model: nn.Module):
        self.gates = main_gates(model)
        self.calls: list[list[torch.Tensor]] = [[] for _ in self.gates]
        self.handles: list = []

    def __enter__(self) -> "RouteRecorder":
        for calls, gate in zip(self.calls, self.gates):
            self.handles.append(gate.register_forward_hook(
                lambda module, args, out, calls=calls: calls.append(out[1].detach())))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def routes(self, batch: int, prompt_lens: list[int], new_lens: list[int], seq_len: int) -> torch.Tensor:
        """[B, L, seq_len, K]: row b's prompt (left-padded to width P in the prefill) then its new tokens."""
        if not self.gates:
            return torch.full((batch, 0, seq_len, 0), -1, dtype=torch.long)
        per_layer = []
        for calls in self.calls:
            K = calls[0].shape[-1]
            steps = [c.view(batch, -1, K) for c in calls]                           # [B, P, K], [B, 1, K] ...
            per_layer.append(torch.cat(steps, dim=1).cpu())                          # [B, P + S, K]
        recorded = torch.stack(per_layer, dim=1)                                    # [B, L, P + S, K]
        P = self.calls[0][0].shape[0] // batch
        out = torch.full((batch, len(self.gates), seq_len, recorded.shape[-1]), -1, dtype=torch.long)
        for b, (a, m) in enumerate(zip(prompt_lens, new_lens)):
            fed = a + m - 1  # prompt tokens and every new token but the last went through the model
            out[b, :, :fed] = recorded[b, :, P - a: P - a + fed]
        return out


class RouteReplay:
    """While installed, each training-mode forward of the main gates takes its picks from the queued
    micro-batches' `routes` [B, L, T, K] (one entry per forward, in the order the runner runs them)."""

    def __init__(self, model: nn.Module):
        self.gates = main_gates(model)
        self.queue: list[torch.Tensor] = []
        self.current: torch.Tensor | None = None
        self.handles = [gate.register_forward_hook(self._hook(i)) for i, gate in enumerate(self.gates)]

    def expect(self, routes: list[torch.Tensor]) -> None:
        """The routes of the next training forwards, in order."""
        self.queue = list(routes)

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, out: tuple) -> tuple | None:
            if not module.training:
                return None
            if layer == 0:
                if not self.queue:
                    raise RuntimeError("routing replay: a training forward with no queued routes")
                self.current = self.queue.pop(0)
            weights, live_idx, scores = out                                         # [N, K], [N, K], [N, E]
            routes = self.current[:, layer].to(live_idx.device)                     # [B, T, K]
            if routes.numel() != live_idx.numel():
                raise RuntimeError(f"routing replay: routes for {routes.numel()} picks, the forward has "
                                   f"{live_idx.numel()}")
            replayed = routes.reshape(live_idx.shape)                               # [N, K]
            idx = torch.where(replayed >= 0, replayed, live_idx)
            return module.pick_weights(scores, idx), idx, scores
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
