"""twinpipe.fp8: FP8 E4M3 block-scaled quantization, GEMMs and layers (DeepSeek-V3 report §3.3)."""

from twinpipe.fp8.backend import BACKENDS, fp8_gemm, fp8_grouped_gemm, get_backend
from twinpipe.fp8.convert import convert_model
from twinpipe.fp8.experts import FP8Experts
from twinpipe.fp8.linear import FP8Linear
from twinpipe.fp8.quant import act_dequant, act_quant
from twinpipe.fp8.weight_cache import attach_to_optimizer, invalidate_weight_caches
from twinpipe.model.fp8_format import weight_dequant, weight_quant

__all__ = ["BACKENDS", "FP8Experts", "FP8Linear", "act_dequant", "act_quant", "attach_to_optimizer",
           "convert_model", "fp8_gemm", "fp8_grouped_gemm", "get_backend", "invalidate_weight_caches",
           "weight_dequant", "weight_quant"]
