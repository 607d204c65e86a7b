"""Expert parallelism: each MoE layer's experts sharded over an expert-parallel (EP) group.

One MoE layer's forward under EP, file by file:
  `layer`       `apply_expert_parallel` swaps `moe.experts` for an `ExpertParallelExperts` holding
                this rank's physical slots; its forward routes each (token, pick) to a slot,
  `slots`       using the slot <-> logical expert tables (`phy2log`, `log2phy`, `logcnt`);
  `dispatch`    sends the rows to the slots' ranks and the outputs back (dispatch / combine),
  `all_to_all`  through the variable-split all-to-alls (rows in FP8 when asked),
  `overlap`     whose waits let another micro-batch compute meanwhile (overlapped forward-backward).
After the backward and between steps:
  `grad_reduction`  sums each logical expert's slot gradients over the ranks holding copies;
  `rebalance`       re-plans the slots with EPLB (`twinpipe.parallel.eplb`) and moves weights and
                    AdamW state to them;
  `logical_state`   maps slot tensors to the plain model's logical experts and back (checkpoints).
"""
