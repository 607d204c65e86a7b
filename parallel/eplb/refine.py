"""Improve a balanced packing by swapping items out of the heaviest pack (vectorized over rows).

The greedy packing of EPLB places each item once and never revisits it, so the heaviest pack often
ends up one item's weight above what a swap could give. Each round, for every row at once, this looks
at all swaps between an item of the heaviest pack and an item of one of the 16 lightest packs, and makes
the one that lowers the larger of the two packs' new loads the most, provided that is below the
heaviest load. A row stops when no swap helps; every accepted swap lowers the heaviest pack's load,
so the row's maximum never rises. With labels, a swap may not put two items with the same label into
one pack.
"""

from __future__ import annotations

import torch

# Swap partners of the heaviest pack: its lightest packs (a swap with a heavier pack rarely helps more).
PARTNERS = 16


def refine_packing(
    weight: torch.Tensor,
    pack_index: torch.Tensor,
    rank_in_pack: torch.Tensor,
    num_packs: int,
    labels: torch.Tensor | None = None,
    max_rounds: int | None = None,
    good_enough: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [X, n]; pack_index, rank_in_pack [X, n] as from `balanced_packing` -> refined pair.

    max_rounds: at most this many swaps per row (default n, which is rarely reached).
    good_enough: [X] optional; a row whose heaviest pack is at most this is left alone (so a packing
    that kept items in place is only disturbed where it is too unbalanced).
    """
    num_rows, num_items = weight.shape
    per_pack = num_items // num_packs
    if num_packs == 1 or per_pack == 0:
        return pack_index, rank_in_pack
    # item held by each (pack, position): [X, P, S]
    held = torch.empty(num_rows, num_packs * per_pack, dtype=torch.int64)
    held.scatter_(-1, pack_index * per_pack + rank_in_pack, torch.arange(num_items).expand_as(pack_index))
    held = held.view(num_rows, num_packs, per_pack)
    w = weight.double()
    held_w = w.gather(-1, held.flatten(1)).view_as(held)  # [X, P, S]
    if labels is not None:
        held_l = labels.gather(-1, held.flatten(1)).view_as(held)  # [X, P, S]
    packs = torch.arange(num_packs)
    active = torch.arange(num_rows)  # rows that may still improve
    num_partners = min(num_packs, PARTNERS)
    for _ in range(num_items if max_rounds is None else max_rounds):
        all_w = held_w[active]  # [A, P, S]
        loads = all_w.sum(-1)  # [A, P]
        top_load, top = loads.max(-1)  # [A] each
        if good_enough is not None:
            unfinished = top_load > good_enough[active]
            active, all_w, loads, top, top_load = (
                x[unfinished] for x in (active, all_w, loads, top, top_load)
            )
        local = torch.arange(active.numel())
        partner = loads.topk(num_partners, dim=-1, largest=False).indices  # [A, K] lightest packs
        partner_w = all_w.gather(1, partner[..., None].expand(-1, -1, per_pack))  # [A, K, S]
        delta = all_w[local, top][:, None, :, None] - partner_w[:, :, None, :]  # [A, K, S_top, S_other]
        top_load = top_load[:, None, None, None]
        pair_max = torch.maximum(top_load - delta, loads.gather(1, partner)[..., None, None] + delta)
        # A swap must strictly lower the heaviest load (relative margin against rounding churn).
        useless = pair_max >= top_load * (1 - 1e-12)
        useless |= (partner == top[:, None])[..., None, None]
        if labels is not None:
            all_l = held_l[active]  # [A, P, S]
            top_l = all_l[local, top]  # [A, S]
            partner_l = all_l.gather(1, partner[..., None].expand(-1, -1, per_pack))  # [A, K, S]
            same = top_l[:, None, :, None] == partner_l[:, :, None, :]  # [A, K, S_top, S_other]
            # top item's label already in the partner / partner item's label already in the top pack
            useless |= same.any(-1, keepdim=True) | same.any(-2, keepdim=True)
        pair_max = pair_max.masked_fill(useless, float("inf")).flatten(1)  # [A, K*S*S]
        best = pair_max.argmin(-1)  # [A]
        helps = torch.isfinite(pair_max[local, best])
        if not helps.any():
            break
        r, best, t = active[helps], best[helps], top[helps]
        other = partner[helps].gather(1, (best // (per_pack * per_pack))[:, None]).squeeze(1)
        i = (best // per_pack) % per_pack
        j = best % per_pack
        for tensor in [held, held_w] + ([held_l] if labels is not None else []):
            a, b = tensor[r, t, i].clone(), tensor[r, other, j].clone()
            tensor[r, t, i], tensor[r, other, j] = b, a
        active = r
    positions = torch.arange(per_pack).expand(num_rows, num_packs, per_pack)
    pack_of_slot = packs[:, None].expand(num_rows, num_packs, per_pack)
    new_pack = torch.empty_like(pack_index).scatter_(-1, held.flatten(1), pack_of_slot.flatten(1))
    new_rank = torch.empty_like(rank_in_pack).scatter_(-1, held.flatten(1), positions.flatten(1))
    return new_pack, new_rank
