"""The two greedy steps of EPLB, vectorized over rows (layers, or layers × nodes).

Both greedies are sequential in the number of items they place, but every step is one batch of torch
ops over all rows at once, so planning 61 layers costs about as much as planning one.

Tie-breaking follows DeepSeek's EPLB exactly (docs/reference.md §5), because the published example
depends on it:
- replication picks the expert with the highest load per replica, the lowest expert id on ties;
- packing visits items heaviest first (a stable sort, so equal weights keep their index order) and
  puts each on the lightest pack that still has room, the lowest pack id on ties; pack loads are
  accumulated in fp32 in visiting order, as the reference does.
"""

from __future__ import annotations

import torch


def replicate_experts(
    weight: torch.Tensor, num_physical: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give each row's experts `num_physical` slots in all: one each, then the extra slots one at a
    time to the expert with the highest load per replica.

    weight: [X, n] fp32 loads. Returns phy2log [X, num_physical] (slot -> expert; slots 0..n-1 are the
    experts themselves, in order), rank [X, num_physical] (replica index of the slot among its expert's
    replicas) and logcnt [X, n] (replicas per expert).
    """
    num_rows, num_log = weight.shape
    phy2log = torch.arange(num_physical, dtype=torch.int64).repeat(num_rows, 1)  # [X, P]
    rank = torch.zeros(num_rows, num_physical, dtype=torch.int64)  # [X, P]
    logcnt = torch.ones(num_rows, num_log, dtype=torch.int64)  # [X, n]
    rows = torch.arange(num_rows)
    for slot in range(num_log, num_physical):
        heaviest = (weight / logcnt).max(dim=-1).indices  # [X], first index on ties
        phy2log[:, slot] = heaviest
        rank[:, slot] = logcnt[rows, heaviest]
        logcnt[rows, heaviest] += 1
    return phy2log, rank, logcnt


def balanced_packing(
    weight: torch.Tensor,
    num_packs: int,
    labels: torch.Tensor | None = None,
    *,
    separate: bool = False,
    home: torch.Tensor | None = None,
    home_cap: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put each row's n items into `num_packs` packs of exactly n / num_packs items, heaviest item
    first onto the lightest pack with room.

    weight: [X, n] fp32. labels: [X, n] int64 in [0, n), the expert of each item; needed by:
    - separate=True: an item avoids packs already holding its label (a second replica of the same
      expert) as long as some pack with room does not; pairs left at the end are swapped apart;
    - home [X, packs, n] (copies of each label each pack holds now) and home_cap [X]: an item goes to
      the lightest pack that still has an unused copy of its label, room, and stays within home_cap
      with it; if none, the rule above applies.
    Returns pack_index [X, n] and rank_in_pack [X, n] (position of the item in its pack, in the order
    items were placed).
    """
    num_rows, num_items = weight.shape
    per_pack = num_items // num_packs
    if per_pack == 1:
        # One item per pack: item i goes to pack i (the reference's shortcut; no label can repeat).
        pack_index = torch.arange(num_items, dtype=torch.int64).expand(num_rows, num_items).clone()
        return pack_index, torch.zeros_like(pack_index)

    order = weight.sort(dim=-1, descending=True, stable=True).indices  # [X, n]
    sorted_weight = weight.gather(-1, order)  # [X, n]
    loads = torch.zeros(num_rows, num_packs, dtype=weight.dtype)  # [X, packs]
    counts = torch.zeros(num_rows, num_packs, dtype=torch.int64)  # [X, packs]
    sorted_pack = torch.empty(num_rows, num_items, dtype=torch.int64)  # [X, n]
    sorted_rank = torch.empty(num_rows, num_items, dtype=torch.int64)  # [X, n]
    rows = torch.arange(num_rows)
    packs = torch.arange(num_packs)
    inf = torch.tensor(float("inf"), dtype=weight.dtype)
    if labels is not None:
        sorted_labels = labels.gather(-1, order)  # [X, n]
    if separate:
        holds = torch.zeros(num_rows, num_packs, num_items, dtype=torch.bool)  # [X, packs, labels]
    if home is not None:
        home = home.clone()
    for j in range(num_items):
        full = counts >= per_pack  # [X, packs]
        key = torch.where(full, inf, loads)  # [X, packs]
        if labels is not None:
            label = sorted_labels[:, j]  # [X]
        if separate:
            clash = holds[rows[:, None], packs[None, :], label[:, None]]  # [X, packs]
            avoidable = (~full & ~clash).any(dim=-1, keepdim=True)  # [X, 1]
            key = torch.where(avoidable & clash, inf, key)
        if home is not None:
            at_home = home[rows[:, None], packs[None, :], label[:, None]] > 0  # [X, packs]
            fits = loads + sorted_weight[:, j : j + 1] <= home_cap[:, None]  # [X, packs]
            stay = at_home & fits & torch.isfinite(key)  # [X, packs]
            key = torch.where(stay.any(-1, keepdim=True) & ~stay, inf, key)
        pack = key.argmin(dim=-1)  # [X], first index on ties
        sorted_pack[:, j] = pack
        sorted_rank[:, j] = counts[rows, pack]
        counts[rows, pack] += 1
        loads[rows, pack] += sorted_weight[:, j]
        if separate:
            holds[rows, pack, label] = True
        if home is not None:
            home[rows, pack, label] = (home[rows, pack, label] - 1).clamp(min=0)
    pack_index = torch.empty_like(sorted_pack).scatter_(-1, order, sorted_pack)  # [X, n]
    rank_in_pack = torch.empty_like(sorted_rank).scatter_(-1, order, sorted_rank)  # [X, n]
    if separate:
        _separate_labels(weight, labels, pack_index, rank_in_pack, num_packs)
    return pack_index, rank_in_pack


def _separate_labels(
    weight: torch.Tensor,
    labels: torch.Tensor,
    pack_index: torch.Tensor,
    rank_in_pack: torch.Tensor,
    num_packs: int,
) -> None:
    """Swap away the same-label pairs the greedy could not avoid (it ran out of room late), in place.

    Packs are visited in order; while a pack holds a label twice, its duplicate placed last swaps with
    the item of closest weight (then lowest pack, then lowest rank) among items whose label the pack
    lacks, sitting in a pack that lacks the duplicate's label. Items keep their slots' ranks. Rows
    needing this are rare, so it runs in Python over those rows only.
    """
    per_pack = labels.size(-1) // num_packs
    slots = torch.full((labels.size(0), num_packs, per_pack), -1, dtype=torch.int64)
    items = torch.arange(labels.size(-1)).expand_as(labels)
    slots.view(labels.size(0), -1).scatter_(-1, pack_index * per_pack + rank_in_pack, items)
    slot_labels = labels.gather(-1, slots.view(labels.size(0), -1)).view_as(slots)  # [X, packs, per]
    sorted_labels = slot_labels.sort(-1).values
    clashing = (sorted_labels[..., 1:] == sorted_labels[..., :-1]).flatten(1).any(-1)  # [X]
    for row in clashing.nonzero().flatten().tolist():
        held = slots[row].tolist()  # held[p][r] = item
        label = labels[row].tolist()
        w = weight[row].tolist()
        for p in range(num_packs):
            for r in range(per_pack - 1, -1, -1):
                dup = held[p][r]
                if sum(label[i] == label[dup] for i in held[p]) < 2:
                    continue
                pack_labels = {label[i] for i in held[p]}
                best = None
                for q in range(num_packs):
                    if q == p or label[dup] in {label[i] for i in held[q]}:
                        continue
                    for s, other in enumerate(held[q]):
                        if label[other] in pack_labels:
                            continue
                        key = (abs(w[other] - w[dup]), q, s)
                        if best is None or key < best[0]:
                            best = (key, q, s)
                if best is None:
                    continue
                _, q, s = best
                other = held[q][s]
                held[p][r], held[q][s] = other, dup
                pack_index[row, other], rank_in_pack[row, other] = p, r
                pack_index[row, dup], rank_in_pack[row, dup] = q, s


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of permutations perm [X, n]: out[x, perm[x, i]] = i."""
    positions = torch.arange(perm.size(-1), dtype=torch.int64).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm, positions)
