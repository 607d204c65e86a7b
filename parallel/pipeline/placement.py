"""Where each pipeline schedule puts the model's stages, declared once.

A schedule splits the model into `num_stages` stages of consecutive blocks (the first also holds the
embedding; the last the final norm, the output head and the MTP layers, whose embedding of the next
tokens is the first stage's) and gives each pipeline rank a tuple of them, in the order its engine
takes its modules:

    1F1B      (N ranks, N stages)   rank r: (r,)
    DualPipe  (N ranks, N stages)   rank r: (r, N-1-r)       every stage twice: on r and on N-1-r
    DualPipeV (N ranks, 2N stages)  rank r: (r, 2N-1-r)      the V: rank 0 holds both ends

Everything else is read from that table (`StagePlacement`):
- which modules a rank holds (`stages.local_module_names`; the others go to meta),
- where micro-batches enter and where their losses are computed (`entries`, `exits`): at the ranks
  holding stage 0 and the last stage; DualPipe's two directions take half of the micro-batches each,
- which held modules have a copy on the mirror rank N-1-r, whose gradients are summed over the pair
  (`Grid.pp_mirror_group`): a module is copied when both ranks hold it (DualPipe: all; 1F1B with MTP:
  the embedding, held by the first and the last stage; DualPipeV: none),
- which copy counts in the global gradient norm (`counted_stages`): the copy of a stage on the rank
  where it comes first; a module shared by stages counts with its lowest stage.
The engine's per-rank wiring (which neighbour sends each phase its inputs) is the schedule's own
geometry and lives with the schedule (`dualpipe.py`, `one_f_one_b.py`), in deepseek-ai/DualPipe's API.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("dualpipe", "dualpipev", "1f1b")


@dataclass(frozen=True)
class StagePlacement:
    schedule: str
    pp: int

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"parallel.schedule={self.schedule!r}: allowed {', '.join(SCHEDULES)}")
        if self.schedule == "dualpipe" and self.pp % 2:
            raise ValueError(f"parallel.pp={self.pp}: DualPipe needs an even number of pipeline ranks")

    @property
    def num_stages(self) -> int:
        """Stages of the model: 2 per rank for DualPipeV's V, 1 per rank otherwise."""
        return 2 * self.pp if self.schedule == "dualpipev" else self.pp

    def stages(self, rank: int) -> tuple[int, ...]:
        """The stages pipeline rank `rank` holds, in the order its schedule takes its modules."""
        n = self.pp
        if self.schedule == "dualpipe":
            return (rank, n - 1 - rank)
        if self.schedule == "dualpipev":
            return (rank, 2 * n - 1 - rank)
        return (rank,)

    def owner(self, stage: int) -> int:
        """The rank whose copy of `stage` counts (the one where the stage comes first)."""
        first = [r for r in range(self.pp) if self.stages(r)[0] == stage]
        return first[0] if first else min(r for r in range(self.pp) if stage in self.stages(r))

    def counted_stages(self, rank: int) -> tuple[int, ...]:
        return tuple(s for s in self.stages(rank) if self.owner(s) == rank)

    def mirror(self, rank: int) -> int:
        return self.pp - 1 - rank

    def entries(self, rank: int, num_chunks: int) -> range:
        """Micro-batches (indices of the step's list) whose inputs enter the pipeline at `rank`."""
        return self._ends(rank, num_chunks, first=True)

    def exits(self, rank: int, num_chunks: int) -> range:
        """Micro-batches whose loss is computed at `rank` (the criterion runs here for them)."""
        return self._ends(rank, num_chunks, first=False)

    def micro_batch(self, module: int, chunk: int, num_chunks: int) -> int:
        """The index in the step's list of the `chunk`-th micro-batch through this rank's `module`-th
        stage (the order of `stages(rank)`): DualPipe's second stage carries the second half (the
        direction entering at rank N-1), every other stage all micro-batches in order."""
        return chunk + (num_chunks // 2 if self.schedule == "dualpipe" and module == 1 else 0)

    def _ends(self, rank: int, num_chunks: int, first: bool) -> range:
        end = 0 if first else self.num_stages - 1
        if self.schedule == "dualpipe":
            # direction 0 enters at rank 0 (stage 0 there) and leaves at rank N-1; direction 1 the
            # other way; the first half of the micro-batches takes direction 0
            half = num_chunks // 2
            if end not in self.stages(rank):
                return range(0)
            direction_0 = (rank == 0) == first  # enters at rank 0 or leaves at rank N-1
            return range(0, half) if direction_0 else range(half, num_chunks)
        return range(num_chunks) if end in self.stages(rank) else range(0)
