"""Our model vs transformers' DeepseekV3ForCausalLM on the same HF checkpoint folder.

Checkpoints are tiny random `DeepseekV3ForCausalLM`s written with `save_pretrained` in fp32, with every
tensor (norms and router bias included) randomized so that a wrong mapping cannot hide behind a
default value. Logits are compared in fp32 with the eager attention of transformers; 1e-5 absolute is
a few hundred ulps of logits of size ~1: the two implementations run the same arithmetic in a
different order (fused expert matmuls, attention layout), nothing more.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from twinpipe.model import generate  # noqa: E402
from twinpipe.model.hf import load_hf, save_hf  # noqa: E402

log = logging.getLogger(__name__)
ATOL = 1e-5

BASE = dict(vocab_size=211, hidden_size=72, intermediate_size=100, moe_intermediate_size=24,
            num_attention_heads=4, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8,
            v_head_dim=10, max_position_embeddings=512, rms_norm_eps=1e-6, attn_implementation="eager")
CONFIGS = {
    # q_lora, dense + MoE layers, 2 groups of 4, YaRN.
    "qlora_yarn": dict(num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=28, n_routed_experts=8,
                       num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                        "original_max_position_embeddings": 128, "beta_fast": 32,
                                        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # no q_lora (q_proj), 4 groups of 3, two dense layers, no norm of top-k, half-split rope.
    "qproj_groups": dict(num_hidden_layers=3, first_k_dense_replace=2, q_lora_rank=None, n_routed_experts=12,
                         num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=2,
                         norm_topk_prob=False, routed_scaling_factor=1.5, rope_interleave=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    # all MoE, one group, 16 experts top-4.
    "all_moe": dict(num_hidden_layers=2, first_k_dense_replace=0, q_lora_rank=16, n_routed_experts=16,
                    num_experts_per_tok=4, n_group=1, topk_group=1, n_shared_experts=1,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def make_hf_model(name: str, seed: int = 0) -> DeepseekV3ForCausalLM:
    kwargs = dict(BASE, **CONFIGS[name])
    attn = kwargs.pop("attn_implementation")
    cfg = DeepseekV3Config(num_key_value_heads=kwargs["num_attention_heads"], **kwargs)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("layernorm.weight") or pname.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    out = {}
    for name in CONFIGS:
        model = make_hf_model(name)
        folder = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def _tokens(vocab: int, batch: int = 2, seq: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(hf_checkpoints, name):
    hf_model, folder = hf_checkpoints[name]
    ours = load_hf(folder, dtype=torch.float32).eval()
    tokens = _tokens(hf_model.config.vocab_size)
    with torch.no_grad():
        want = hf_model(tokens).logits                           # [B, T, V]
        got = ours(tokens)                                       # [B, T, V]
    assert got.shape == want.shape
    log.info("%s: max |ours - transformers| = %.2e (logit std %.2f)", name, float((got - want).abs().max()),
             float(want.std()))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by re-running the full sequence (no cache): the plainest reference."""
    seq = torch.tensor([prompt])
    for _ in range(steps):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)         # [1, 1]
        seq = torch.cat([seq, nxt], dim=1)
    return seq[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["qlora_yarn", "qproj_groups"])
def test_greedy_generation_matches_transformers(hf_checkpoints, name):
    hf_model, folder = hf_checkpoints[name]
    ours = load_hf(folder, dtype=torch.float32).eval()
    vocab = hf_model.config.vocab_size
    prompts = [_tokens(vocab, batch=1, seq=6, seed=3)[0].tolist(), _tokens(vocab, batch=1, seq=3, seed=4)[0].tolist()]
    steps = 8
    with torch.no_grad():
        want = []
        for p in prompts:
            out = hf_model.generate(torch.tensor([p]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                                    pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
            want.append(out[0, len(p):].tolist())
        assert [_greedy(ours, p, steps) for p in prompts] == want
    # Our cached generation, both prompts in one left-padded batch, latent (absorbed) and naive MLA.
    assert generate(ours, prompts, max_new_tokens=steps) == want
    assert generate(ours, prompts, max_new_tokens=steps, absorb=False) == want


def test_save_hf_export_loads_in_transformers(hf_checkpoints, tmp_path):
    hf_model, folder = hf_checkpoints["qlora_yarn"]
    ours = load_hf(folder, dtype=torch.float32).eval()
    out = save_hf(ours, tmp_path / "export", dtype=None, max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").is_file()   # small shards: the index path is exercised
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    reloaded = DeepseekV3ForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    tokens = _tokens(hf_model.config.vocab_size, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, hf_model(tokens).logits, atol=0, rtol=0)
        torch.testing.assert_close(load_hf(out, dtype=torch.float32)(tokens), ours(tokens), atol=0, rtol=0)
