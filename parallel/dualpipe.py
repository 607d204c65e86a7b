"""The public import path of deepseek-ai/DualPipe's API: `from twinpipe.parallel.dualpipe import
DualPipe, DualPipeV, WeightGradStore, set_p2p_tensor_shapes, set_p2p_tensor_dtype` (the schedules live
in `twinpipe.parallel.pipeline.dualpipe`)."""

from twinpipe.parallel.pipeline.dualpipe import (DualPipe, DualPipeV, WeightGradStore, set_p2p_tensor_dtype,
                                                 set_p2p_tensor_shapes)

__all__ = ["DualPipe", "DualPipeV", "WeightGradStore", "set_p2p_tensor_shapes", "set_p2p_tensor_dtype"]
