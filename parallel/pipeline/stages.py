"""Partition the DeepSeek-V3 `Transformer` into pipeline stage modules.

Stage s of S holds a contiguous run of blocks; the first stage also the token embedding, the last the
final norm, the output head and the MTP layers. Stage modules *reference* the model's submodules (no
copies), so gradients land in the model's own parameters and its optimizer and checkpoints see one
parameter set.

What travels between stages for one micro-batch (declare it with `set_stage_p2p_shapes`):
    h [B, T, H] (float, gradients flow back), input_ids [B, T] and position_ids [B, T] (int64)
The ids ride along because the last stage needs them: MTP embeds the tokens one step ahead.

Shared embedding and head. MTP on the last stage uses the *same* embedding as the first stage and the
main head's `lm_head`. When both stages sit on one rank (DualPipeV rank 0, one-rank pipelines) they
hold the same `nn.Embedding` and autograd sums the two uses. When they sit on different ranks, each
rank's copy gets only its own share of the gradient: as Megatron does for tied embeddings, the copies'
gradients must be summed over the ranks holding the first and the last stage before the optimizer step,
and the copies start equal (same seed / same checkpoint). The same holds for DualPipe's two copies of
every stage (stage s on ranks s and N-1-s): `pipeline_runner.PipelineRunner` sums them over the mirror
pair (`Grid.pp_mirror_group`).

Memory partitioning. `keep_local_stages` moves every module this rank's stages do not use to the meta
device, so a pipeline rank holds only its own blocks (and the embedding/head/MTP where its stages need
them) while the module tree, and so every state-dict name, stays the full model's. `owned_module_names`
names the modules whose gradient this rank *counts* in a global norm, so that each parameter is counted
once over the pipeline group although DualPipe holds two copies of every stage and the embedding sits
on both ends.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from twinpipe.model.attention import document_causal_mask
from twinpipe.model.mtp import mtp_depths
from twinpipe.parallel.pipeline.p2p import set_p2p_tensor_dtype, set_p2p_tensor_shapes
from twinpipe.parallel.pipeline.placement import StagePlacement

def split_layers(num_layers: int, stages: int, layer_split: Sequence[int] | None = None) -> list[range]:
    """Blocks of each stage. Default: as even as possible, the extra blocks on the *first* stages,
    because the last stage also carries the head and the MTP block(s). `layer_split` gives the counts."""
    if layer_split is not None:
        counts = [int(c) for c in layer_split]
        if len(counts) != stages or sum(counts) != num_layers or min(counts) < 1:
            raise ValueError(f"layer_split={counts}: need {stages} counts >= 1 summing to "
                             f"num_hidden_layers={num_layers}")
    else:
        if num_layers < stages:
            raise ValueError(f"num_hidden_layers={num_layers} < {stages} pipeline stages: every stage "
                             "needs at least one block (fewer stages, or more layers)")
        base, extra = divmod(num_layers, stages)
        counts = [base + (s < extra) for s in range(stages)]
    starts = [sum(counts[:s]) for s in range(stages)]
    return [range(a, a + c) for a, c in zip(starts, counts)]


LAYER_SPLIT_ATTR = "pipeline_layer_split"


def record_layer_split(model: nn.Module, layer_split: Sequence[int] | None) -> None:
    """Remember on `model` the blocks per stage it was partitioned with (`parallelize`, from
    parallel.layer_split), so whatever runs its stages later (the step's runner, evaluation, rollouts)
    cuts the same stages without being told again."""
    setattr(model, LAYER_SPLIT_ATTR, None if layer_split is None else [int(c) for c in layer_split])


def stage_ranges(model: nn.Module, num_stages: int, layer_split: Sequence[int] | None = None) -> list[range]:
    """`split_layers` for `model`: `layer_split`, else the one recorded on it (`record_layer_split`),
    else the even split."""
    return split_layers(len(model.layers), num_stages, _split_of(model, layer_split))


def _split_of(model: nn.Module, layer_split: Sequence[int] | None) -> Sequence[int] | None:
    """`layer_split`, else the split recorded on `model` (None: the even one)."""
    return layer_split if layer_split is not None else getattr(model, LAYER_SPLIT_ATTR, None)


class TransformerStage(nn.Module):
    """Blocks `layers` of `model`, plus the embedding (first stage) and norm/head/MTP (last stage).

    forward(input_ids, position_ids) on the first stage, forward(h, input_ids, position_ids) on the
    others; returns (h, input_ids, position_ids) except on the last stage, which returns the heads'
    inputs (hidden [B, T, H] after the final norm, *mtp_hidden) with mtp_hidden[k-1] = [B, T-k, H] after
    MTP norm k, as `Transformer.forward_train`'s output holds them: the loss applies `lm_head` itself,
    in chunks when it likes (the runner hands it the head weight), so no stage holds [B, T, V] logits.
    """

    # True: the positions are 0..T-1 in every row, so attention is plain causal (no mask) without a
    # look at the device's position_ids; the runner sets it per step from what the host knows
    causal_only = False

    def __init__(self, model: nn.Module, layers: range, is_first: bool, is_last: bool) -> None:
        super().__init__()
        self.is_first, self.is_last = is_first, is_last
        self.layer_ids = layers
        self.layers = nn.ModuleList(model.layers[i] for i in layers)
        needs_embedding = is_first or (is_last and len(model.mtp) > 0)
        self.embed_tokens = model.embed_tokens if needs_embedding else None
        if is_last:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp

    def forward(self, *inputs: torch.Tensor):
        if self.is_first:
            input_ids, position_ids = inputs
            h = self.embed_tokens(input_ids)  # [B, T, H]
        else:
            h, input_ids, position_ids = inputs
        # [B, 1, T, T] or None (causal): once per stage, a host sync unless causal_only says None
        mask = None if self.causal_only else document_causal_mask(position_ids)
        for layer in self.layers:
            h = layer(h, position_ids, mask=mask)  # [B, T, H]
        if not self.is_last:
            return h, input_ids, position_ids
        outputs = [self.norm(h)]  # [B, T, H]
        if len(self.mtp):
            depths = mtp_depths(self.mtp, h, self.embed_tokens(input_ids), position_ids, mask)  # [B, T-k, H]
            outputs += [layer.norm(h_k) for layer, h_k in zip(self.mtp, depths)]  # [B, T-k, H]
        return tuple(outputs)


def build_stages(model: nn.Module, schedule: str, pp: int, pp_rank: int,
                 layer_split: Sequence[int] | None = None) -> tuple[TransformerStage, ...]:
    """This rank's stage modules for `schedule`, in the order DualPipe/DualPipeV/OneFOneB take them."""
    placement = StagePlacement(schedule, pp)
    stages = placement.num_stages
    if _split_of(model, layer_split) is None and len(model.layers) < stages:
        raise ValueError(f"parallel.schedule={schedule} on parallel.pp={pp} ranks makes {stages} stages "
                         f"but model.num_hidden_layers={len(model.layers)}: every stage needs at least "
                         "one block (fewer pipeline ranks, 1f1b/dualpipe instead of dualpipev, or more "
                         "layers)")
    ranges = stage_ranges(model, stages, layer_split)
    return tuple(TransformerStage(model, ranges[s], s == 0, s == stages - 1) for s in placement.stages(pp_rank))


def stage_module_names(model: nn.Module, stage: int, stages: int, layers: range,
                       with_mtp_embedding: bool = True) -> list[str]:
    """Names of the model's modules stage `stage` of `stages` runs (its blocks `layers`; the embedding
    on the first stage, and on the last when MTP embeds the next tokens; norm, head and MTP on the last)."""
    names = [f"layers.{i}" for i in layers]
    if stage == 0 or (with_mtp_embedding and stage == stages - 1 and len(model.mtp) > 0):
        names.append("embed_tokens")
    if stage == stages - 1:
        names += ["norm", "lm_head", "mtp"]
    return names


def _module_names(model: nn.Module, placement: StagePlacement, stages: Sequence[int],
                  layer_split: Sequence[int] | None, with_mtp_embedding: bool = True) -> set[str]:
    ranges = stage_ranges(model, placement.num_stages, layer_split)
    return {n for s in stages for n in stage_module_names(model, s, placement.num_stages, ranges[s],
                                                          with_mtp_embedding)}


def local_module_names(model: nn.Module, schedule: str, pp: int, pp_rank: int,
                       layer_split: Sequence[int] | None = None) -> set[str]:
    """Modules pipeline rank `pp_rank` runs (and so must hold): those of its stages."""
    placement = StagePlacement(schedule, pp)
    return _module_names(model, placement, placement.stages(pp_rank), layer_split)


def copied_module_names(model: nn.Module, schedule: str, pp: int, pp_rank: int,
                        layer_split: Sequence[int] | None = None) -> set[str]:
    """The modules this rank holds that its mirror rank pp-1-r holds too (their gradients are summed
    over the pair): DualPipe's stages, the embedding of 1F1B with MTP, nothing under DualPipeV."""
    mirror = StagePlacement(schedule, pp).mirror(pp_rank)
    if mirror == pp_rank:
        return set()
    return (local_module_names(model, schedule, pp, pp_rank, layer_split)
            & local_module_names(model, schedule, pp, mirror, layer_split))


def owned_module_names(model: nn.Module, schedule: str, pp: int, pp_rank: int,
                       layer_split: Sequence[int] | None = None) -> set[str]:
    """The local modules whose (pipeline-summed) gradient this rank *counts* in a global norm, so each
    parameter counts once over the pipeline group: the stages this rank owns
    (`StagePlacement.counted_stages`), the embedding with the first stage only."""
    placement = StagePlacement(schedule, pp)
    return _module_names(model, placement, placement.counted_stages(pp_rank), layer_split,
                         with_mtp_embedding=False)


def keep_local_stages(model: nn.Module, schedule: str, pp: int, pp_rank: int,
                      layer_split: Sequence[int] | None = None) -> list[str]:
    """Move every module of `model` that this rank's stages do not run to the meta device (in place:
    its memory is freed, names and shapes stay). Returns the names of the dropped modules."""
    keep = local_module_names(model, schedule, pp, pp_rank, layer_split)
    children = [f"layers.{i}" for i in range(len(model.layers))] + ["embed_tokens", "norm", "lm_head", "mtp"]
    dropped = [n for n in children if n not in keep]
    for name in dropped:
        model.get_submodule(name).to("meta")
    return dropped


def set_stage_p2p_shapes(micro_batch: int, seq_len: int, hidden: int,
                         dtype: torch.dtype = torch.float32) -> None:
    """Declare what a transformer stage sends: h, input_ids, position_ids of one micro-batch."""
    set_p2p_tensor_shapes([(micro_batch, seq_len, hidden), (micro_batch, seq_len),
                           (micro_batch, seq_len)])
    set_p2p_tensor_dtype([dtype, torch.int64, torch.int64])
