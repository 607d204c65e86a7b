"""ModelConfig: presets, validation errors, HF dict round trip, the 671B parameter count on meta."""

import pytest
import torch

from twinpipe.model import ModelConfig, Transformer


def test_unknown_preset_lists_allowed():
    with pytest.raises(ValueError, match=r"'huge'.*\['small', 'tiny', 'v3_671b'\]"):
        ModelConfig.preset("huge")


def test_unknown_override_named():
    with pytest.raises(ValueError, match="num_layers"):
        ModelConfig.preset("tiny", num_layers=3)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_routed_experts=10, n_group=4), "n_routed_experts=10 is not divisible by n_group=4"),
    (dict(topk_group=5), "topk_group=5: must be <= n_group=4"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok=5: at most topk_group"),
    (dict(n_group=8), "each group needs >= 2 experts"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim=15: must be even"),
    (dict(hidden_size=0), "hidden_size=0"),
    (dict(q_lora_rank=-1), "q_lora_rank=-1"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace=9"),
    (dict(scoring_func="softmax"), "only 'sigmoid'"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "only 'yarn'"),
    (dict(rope_scaling={"type": "yarn", "factr": 2}), "unknown keys \\['factr'\\]"),
])
def test_validation_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.preset("tiny", **overrides)


def test_hf_dict_round_trip_and_rope_parameters_form():
    cfg = ModelConfig.preset("v3_671b")
    d = cfg.to_hf_dict()
    assert d["model_type"] == "deepseek_v3" and d["architectures"] == ["DeepseekV3ForCausalLM"]
    assert d["rope_scaling"]["factor"] == 40 and d["num_nextn_predict_layers"] == 1
    assert ModelConfig.from_hf_dict(d) == cfg
    # transformers>=5 writes rope_parameters (theta inside) and num_mtp_layers; q_lora_rank may be null.
    d2 = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_theta", "num_nextn_predict_layers")}
    d2.update(rope_parameters={"rope_type": "yarn", "rope_theta": 5e4, "factor": 4.0,
                               "original_max_position_embeddings": 1024}, num_mtp_layers=0,
              q_lora_rank=None, eos_token_id=[1, 2], use_cache=True)
    cfg2 = ModelConfig.from_hf_dict(d2)
    assert cfg2.rope_theta == 5e4 and cfg2.rope_scaling["factor"] == 4.0
    assert cfg2.num_nextn_predict_layers == 0 and cfg2.q_lora_rank is None and cfg2.eos_token_id == 1
    assert cfg2.to_hf_dict()["use_cache"] is True  # unknown keys survive


def expected_v3_params(include_mtp: bool) -> int:
    """DeepSeek-V3 parameter count written out from the architecture (independent of the code)."""
    h, v, heads = 7168, 129280, 128
    attn = (h * 1536 + 1536 + 1536 * heads * (128 + 64)           # q_a, q_a_norm, q_b
            + h * (512 + 64) + 512 + 512 * heads * (128 + 128)    # kv_a, kv_a_norm, kv_b
            + heads * 128 * h)                                    # o_proj
    dense_mlp = 3 * h * 18432
    moe = 256 * h + 3 * 256 * h * 2048 + 3 * h * 2048             # router, 256 experts, 1 shared
    block_norms = 2 * h
    main = 2 * v * h + h + 3 * (attn + dense_mlp + block_norms) + 58 * (attn + moe + block_norms)
    mtp = 3 * h + 2 * h * h + attn + moe + block_norms            # enorm, hnorm, norm, eh_proj, block
    return main + mtp if include_mtp else main


def test_v3_671b_on_meta_parameter_count():
    cfg = ModelConfig.preset("v3_671b")
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    main = total - sum(p.numel() for p in model.mtp.parameters())
    assert main == expected_v3_params(False) == cfg.num_parameters(include_mtp=False)
    assert total == expected_v3_params(True) == cfg.num_parameters()
    # Published: 671B main model. The HF checkpoint's 685B also stores the MTP layer's own copies of
    # the embedding and head (2 * 129280 * 7168 = 1.85B), which we share instead of copying.
    assert abs(main / 1e9 - 671) < 0.5
    assert abs((total + 2 * 129280 * 7168) / 1e9 - 685) < 1.0
    assert model.layers[5].mlp.gate.e_score_correction_bias.dtype == torch.float32
