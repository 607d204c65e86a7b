"""twinpipe.model: the DeepSeek-V3 architecture (config, MLA, MoE, MTP, transformer, KV cache)."""

from .attention import MLA
from .block import Block
from .config import PRESETS, ModelConfig
from .experts import Experts
from .gate import Gate
from .kv_cache import LatentKVCache
from .mlp import MLP
from .moe import MoE
from .mtp import MTPLayer
from .norm import RMSNorm
from .transformer import Transformer, TransformerOutput

__all__ = ["MLA", "MLP", "PRESETS", "Block", "Experts", "Gate", "LatentKVCache", "MTPLayer", "ModelConfig",
           "MoE", "RMSNorm", "Transformer", "TransformerOutput"]

from .generation import generate  # noqa: E402  (the function, re-exported as twinpipe.model.generate)
from .hf import load_hf, save_hf  # noqa: E402
from .speculative import SpeculativeResult, speculative_generate  # noqa: E402

__all__ += ["SpeculativeResult", "generate", "load_hf", "save_hf", "speculative_generate"]
