"""EPLB, DeepSeek's expert-parallel load balancer (docs/reference.md §5): which logical expert each
physical slot holds, planned from measured expert loads.

`planner.rebalance_experts` is the entry (same call and meaning as DeepSeek's, exported here); it runs
the two greedy steps of `greedy.py` (replicate the heaviest experts, pack heaviest-first onto the
lightest bin), optionally the swap refinement of `refine.py`, and, given the placement in use, the
relabelling of `relabel.py` that keeps experts where they already are. Moving the weights to a new
plan during training is `twinpipe.parallel.experts.rebalance`.
"""

from twinpipe.parallel.eplb.planner import rebalance_experts

__all__ = ["rebalance_experts"]
