"""twinpipe.model: the DeepSeek-V3 architecture (config, MLA, MoE, MTP, transformer, KV cache).

    cfg = ModelConfig.preset("tiny")                 # or "small", "v3_671b", with field overrides
    model = Transformer(cfg)                         # build under torch.device("meta") for big ones
    logits = model(tokens)                           # [B, T] -> [B, T, V], main head
    out = model.forward_train(tokens)                # + MTP logits, expert counts, balance loss
    new = generate(model, [[1, 2, 3], [4]], 16)      # batched, latent KV cache, greedy / top-p
    spec = speculative_generate(model, prompts, 16)  # greedy with MTP drafts, spec.acceptance_rate

Files in data-flow order: config, norm, rope, attention (MLA), mlp, gate, experts, moe, block, mtp,
transformer; kv_cache, generation, speculative; hf (+ safetensors_io, fp8_format) for HF checkpoint
folders.
"""

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
