"""twinpipe.fp8: FP8 E4M3 block-scaled quantization, GEMMs and layers (DeepSeek-V3 report §3.3)."""

from twinpipe.fp8.quant import act_dequant, act_quant, weight_dequant, weight_quant

__all__ = ["act_quant", "act_dequant", "weight_quant", "weight_dequant"]
