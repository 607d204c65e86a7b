"""The DeepSeek-V3 model configuration: one dataclass with HF `DeepseekV3Config` field names.

Presets: `tiny` (CPU tests and the default recipe), `small` (~0.74B total parameters, one GPU, the
benchmarks) and `v3_671b` (the published model, docs/reference.md §1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

_ROPE_SCALING_KEYS = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
                      "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate",
                      "rope_theta"}


@dataclass
class ModelConfig:
    """Architecture of a DeepSeek-V3-style MoE transformer (names follow HF `DeepseekV3Config`).

    Sizes
        vocab_size: number of token ids (embedding rows and output-head rows; not tied).
        hidden_size: model width H of the residual stream.
        num_hidden_layers: main transformer blocks (MTP layers come on top of these).
        first_k_dense_replace: the first k blocks use a dense SwiGLU MLP instead of MoE.
        intermediate_size: hidden width of the dense SwiGLU MLP.
        moe_intermediate_size: hidden width of one routed expert (and the unit of shared experts).
    Attention (MLA)
        num_attention_heads: query/key/value heads.
        q_lora_rank: rank of the query down-projection (q_a_proj); None = one full q_proj instead.
        kv_lora_rank: width of the compressed key/value latent c_kv (what the KV cache stores).
        qk_nope_head_dim: per-head query/key width without rotary embedding.
        qk_rope_head_dim: per-head width of the decoupled rotary part (k_pe is shared by all heads).
        v_head_dim: per-head value width.
    Position
        max_position_embeddings: longest sequence the model is meant for.
        rope_theta: RoPE base.
        rope_scaling: None, or a YaRN dict {type: yarn, factor, original_max_position_embeddings,
            beta_fast, beta_slow, mscale, mscale_all_dim}, interpreted exactly as transformers does.
        rope_interleave: the rotary dims are stored as interleaved pairs (x0, x1), (x2, x3), ...
            (DeepSeek's weights) instead of two halves.
    Mixture of experts
        n_routed_experts: routed experts E per MoE layer.
        num_experts_per_tok: experts K picked per token.
        n_shared_experts: always-on experts (one MLP of n_shared_experts * moe_intermediate_size).
        n_group / topk_group: experts are split into n_group equal groups; a token may use only its
            topk_group best groups (group score = sum of the top-2 biased scores of the group).
        norm_topk_prob: normalize the K gate values to sum 1 before scaling.
        routed_scaling_factor: multiplier of the routed experts' gate values.
        scoring_func / topk_method: only "sigmoid" / "noaux_tc" (bias-corrected selection) exist.
        aux_loss_alpha: alpha of the sequence-wise balance loss (0 turns it off).
    Multi-token prediction
        num_nextn_predict_layers: MTP depth D (0 = none); MTP layer k predicts token i+k+1.
    Other
        rms_norm_eps: epsilon of the residual-stream RMSNorms (the latent norms use 1e-6, as HF).
        hidden_act: only "silu" (SwiGLU).
        bos_token_id / eos_token_id: special ids written to config.json.
        initializer_range: std of the normal init of every weight matrix (0.006 in the report).
        tie_word_embeddings / attention_bias: must be False (DeepSeek-V3 has neither).
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    aux_loss_alpha: float = 1e-4
    num_nextn_predict_layers: int = 1
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    bos_token_id: int = 0
    eos_token_id: int = 1
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """HF config keys we do not model, kept so that to_hf_dict writes them back unchanged."""

    # ---- derived sizes ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        """MoE layers in the main stack (MTP blocks, which are MoE too, not counted)."""
        return max(self.num_hidden_layers - self.first_k_dense_replace, 0)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer `layer_idx` (MTP blocks are numbered from num_hidden_layers on) uses MoE."""
        return layer_idx >= self.first_k_dense_replace

    # ---- checks ----
    def validate(self) -> "ModelConfig":
        """Raise ValueError naming the field, its value and what is allowed; return self."""
        positive = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                    "qk_rope_head_dim", "v_head_dim", "max_position_embeddings", "n_routed_experts",
                    "num_experts_per_tok", "n_group", "topk_group"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name}={value!r}: must be a positive integer")
        for name in ["n_shared_experts", "num_nextn_predict_layers", "first_k_dense_replace"]:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"model.{name}={value!r}: must be an integer >= 0")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ValueError(f"model.q_lora_rank={self.q_lora_rank!r}: must be a positive integer or None")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"model.qk_rope_head_dim={self.qk_rope_head_dim}: must be even (rotary pairs)")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(f"model.first_k_dense_replace={self.first_k_dense_replace}: must be <= "
                             f"num_hidden_layers={self.num_hidden_layers}")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"model.n_routed_experts={self.n_routed_experts} is not divisible by "
                             f"n_group={self.n_group}: experts must split into equal groups")
        per_group = self.n_routed_experts // self.n_group
        if per_group < 2:
            raise ValueError(f"model.n_group={self.n_group}: each group needs >= 2 experts (the group "
                             f"score sums its top-2), got {per_group} with n_routed_experts="
                             f"{self.n_routed_experts}")
        if self.topk_group > self.n_group:
            raise ValueError(f"model.topk_group={self.topk_group}: must be <= n_group={self.n_group}")
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ValueError(f"model.num_experts_per_tok={self.num_experts_per_tok}: at most topk_group * "
                             f"experts per group = {self.topk_group} * {per_group} = "
                             f"{self.topk_group * per_group} experts are reachable")
        if self.scoring_func != "sigmoid":
            raise ValueError(f"model.scoring_func={self.scoring_func!r}: only 'sigmoid' is supported")
        if self.topk_method != "noaux_tc":
            raise ValueError(f"model.topk_method={self.topk_method!r}: only 'noaux_tc' is supported")
        if self.hidden_act != "silu":
            raise ValueError(f"model.hidden_act={self.hidden_act!r}: only 'silu' is supported")
        if self.tie_word_embeddings:
            raise ValueError("model.tie_word_embeddings=True: DeepSeek-V3 keeps embedding and head apart")
        if self.attention_bias:
            raise ValueError("model.attention_bias=True: MLA projections here have no bias")
        if self.rms_norm_eps <= 0 or self.initializer_range <= 0:
            raise ValueError(f"model.rms_norm_eps={self.rms_norm_eps}, initializer_range="
                             f"{self.initializer_range}: both must be > 0")
        if self.aux_loss_alpha < 0 or self.routed_scaling_factor <= 0:
            raise ValueError(f"model.aux_loss_alpha={self.aux_loss_alpha} must be >= 0 and "
                             f"routed_scaling_factor={self.routed_scaling_factor} > 0")
        self._validate_rope_scaling()
        return self

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise ValueError(f"model.rope_scaling={rs!r}: must be None or a dict")
        unknown = set(rs) - _ROPE_SCALING_KEYS
        if unknown:
            raise ValueError(f"model.rope_scaling has unknown keys {sorted(unknown)}; allowed: "
                             f"{sorted(_ROPE_SCALING_KEYS)}")
        kind = rs.get("rope_type", rs.get("type", "default"))
        if kind not in ("yarn", "default"):
            raise ValueError(f"model.rope_scaling type={kind!r}: only 'yarn' (or 'default') is supported")
        if kind == "yarn":
            factor = rs.get("factor")
            if factor is not None and factor <= 0:
                raise ValueError(f"model.rope_scaling.factor={factor}: must be > 0")

    # ---- HF config.json ----
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from an HF DeepSeek-V3 `config.json` dict (legacy `rope_scaling` or `rope_parameters`)."""
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d.pop("num_mtp_layers")
        rope_parameters = d.pop("rope_parameters", None)
        if rope_parameters:
            rp = dict(rope_parameters)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default" and not d.get("rope_scaling"):
                d["rope_scaling"] = rp
        if d.get("rope_scaling"):
            rs = dict(d["rope_scaling"])
            rs.pop("rope_theta", None)
            d["rope_scaling"] = rs
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            d["eos_token_id"] = eos[0]
        extra = {}
        for key, value in d.items():
            if key in names:
                if value is not None or key == "q_lora_rank" or key == "rope_scaling":
                    kwargs[key] = value
            else:
                extra[key] = value
        cfg = cls(**kwargs)
        cfg.extra = extra
        return cfg.validate()

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` dict for `DeepseekV3ForCausalLM` (legacy rope_theta/rope_scaling keys)."""
        out: dict[str, Any] = {k: v for k, v in self.extra.items()
                               if k not in ("rope_parameters", "num_mtp_layers")}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                value = getattr(self, f.name)
                out[f.name] = dict(value) if isinstance(value, dict) else value
        out.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                   num_key_value_heads=self.num_attention_heads)
        return out

    # ---- presets ----
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset (`tiny`, `small`, `v3_671b`) with field overrides, validated."""
        if name not in PRESETS:
            raise ValueError(f"model preset {name!r} is unknown; allowed: {sorted(PRESETS)}")
        base = dict(PRESETS[name])
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"model overrides {sorted(unknown)} are not ModelConfig fields")
        base.update(overrides)
        return cls(**base).validate()

    def num_parameters(self, include_mtp: bool = True) -> int:
        """Parameter count by formula (matches the module tree; used by tests and benchmarks)."""
        h, v = self.hidden_size, self.vocab_size
        nh = self.num_attention_heads
        if self.q_lora_rank is None:
            q = h * nh * self.qk_head_dim
        else:
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * nh * self.qk_head_dim
        kv = (h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
              + self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim))
        attn = q + kv + nh * self.v_head_dim * h
        dense = 3 * h * self.intermediate_size
        moe = (self.n_routed_experts * h + 3 * self.n_routed_experts * h * self.moe_intermediate_size
               + 3 * h * self.moe_intermediate_size * self.n_shared_experts)
        norms = 2 * h

        def block(i: int) -> int:
            return attn + norms + (moe if self.is_moe_layer(i) else dense)

        total = 2 * v * h + h + sum(block(i) for i in range(self.num_hidden_layers))
        if include_mtp:
            for k in range(self.num_nextn_predict_layers):
                total += 3 * h + 2 * h * h + block(self.num_hidden_layers + k)
        return total


def _yarn_671b() -> dict[str, Any]:
    return {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


PRESETS: dict[str, dict[str, Any]] = {
    # 4 layers (1 dense), 8 experts top-2 in 4 groups: trains in seconds on 2 CPU cores.
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                 num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64,
                 kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                 max_position_embeddings=2048, n_routed_experts=8, num_experts_per_tok=2,
                 n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                 num_nextn_predict_layers=1),
    # ~0.74B total parameters (~0.3B active per token): one GPU, the benchmarks.
    "small": dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                  num_hidden_layers=12, first_k_dense_replace=1, num_attention_heads=16,
                  q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                  v_head_dim=64, max_position_embeddings=4096, n_routed_experts=32,
                  num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
                  routed_scaling_factor=2.5, num_nextn_predict_layers=1),
    # DeepSeek-V3 as published (docs/reference.md §1).
    "v3_671b": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                    moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=3,
                    num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
                    rope_theta=10000.0, rope_scaling=_yarn_671b(), n_routed_experts=256,
                    num_experts_per_tok=8, n_shared_experts=1, n_group=8, topk_group=4,
                    routed_scaling_factor=2.5, num_nextn_predict_layers=1, rms_norm_eps=1e-6),
}

