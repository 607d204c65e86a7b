"""twinpipe-convert: HF -> HF-FP8 -> BF16 tensor by tensor, and a twinpipe training checkpoint -> HF."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from twinpipe.model.config import ModelConfig
from twinpipe.model.hf import load_hf, save_hf
from twinpipe.model.transformer import Transformer
from twinpipe.trainer.convert import main

SIZES = dict(vocab_size=160, hidden_size=144, intermediate_size=200, moe_intermediate_size=72,
             num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=136,
             kv_lora_rank=40, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
             max_position_embeddings=64, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
             n_group=2, topk_group=1, num_nextn_predict_layers=1)


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def model_and_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SIZES).validate()).eval()
    with torch.no_grad():
        model.layers[1].mlp.gate.e_score_correction_bias.copy_(torch.randn(4) * 0.05)
    folder = save_hf(model, tmp_path_factory.mktemp("src") / "fp32", dtype=None)
    (folder / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')  # a side file to carry along
    return model, folder


def test_hf_to_fp8_matches_save_hf_fp8_and_back_to_bf16(model_and_folder, tmp_path):
    model, folder = model_and_folder
    assert main(["--from", "hf", "--to", "hf-fp8", str(folder), str(tmp_path / "fp8")]) == 0
    fp8 = tmp_path / "fp8"
    cfg = json.loads((fp8 / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128] and cfg["torch_dtype"] == "bfloat16"
    assert (fp8 / "tokenizer_config.json").read_text() == '{"eos_token": "<eos>"}'
    # Converting the fp32 folder gives exactly what save_hf(fp8=True) writes from the fp32 model.
    direct = _tensors(save_hf(model, tmp_path / "direct", fp8=True))
    converted = _tensors(fp8)
    assert converted.keys() == direct.keys()
    for name in direct:
        assert converted[name].dtype == direct[name].dtype, name
        assert torch.equal(converted[name].view(torch.uint8) if converted[name].dtype == torch.float8_e4m3fn
                           else converted[name],
                           direct[name].view(torch.uint8) if direct[name].dtype == torch.float8_e4m3fn
                           else direct[name]), name

    # FP8 -> BF16: the dequantized weights, the same numbers load_hf gets from the FP8 folder.
    assert main(["--from", "hf", "--to", "hf", str(fp8), str(tmp_path / "bf16")]) == 0
    bf16 = tmp_path / "bf16"
    assert "quantization_config" not in json.loads((bf16 / "config.json").read_text())
    t = _tensors(bf16)
    assert all(v.dtype == torch.bfloat16 for k, v in t.items() if not k.endswith("e_score_correction_bias"))
    assert not any(k.endswith("_scale_inv") for k in t)
    from_fp8 = load_hf(fp8, dtype=torch.bfloat16).state_dict()
    from_bf16 = load_hf(bf16, dtype=torch.bfloat16).state_dict()
    for name in from_fp8:
        assert torch.equal(from_fp8[name], from_bf16[name]), name

    # FP8 -> FP8 copies q and s unchanged.
    assert main(["--from", "hf", "--to", "hf-fp8", str(fp8), str(tmp_path / "fp8b")]) == 0
    again = _tensors(tmp_path / "fp8b")
    assert all(torch.equal(again[k].view(torch.uint8), converted[k].view(torch.uint8))
               for k in converted if converted[k].dtype == torch.float8_e4m3fn)


def test_convert_errors_exit_nonzero_and_name_the_problem(model_and_folder, tmp_path, caplog):
    _, folder = model_and_folder
    assert main(["--from", "hf", "--to", "hf", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
    assert "nowhere" in caplog.text and "config.json" in caplog.text
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert main(["--from", "hf", "--to", "hf", str(folder), str(tmp_path / "taken")]) == 1
    assert "taken exists" in caplog.text
    with pytest.raises(SystemExit):
        main(["--from", "hf", "--to", "gguf", str(folder), str(tmp_path / "o")])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp in one process, on purpose
def test_twinpipe_checkpoint_to_hf(tmp_path):
    checkpoint = pytest.importorskip("twinpipe.trainer.checkpoint")
    tokenizer_mod = pytest.importorskip("twinpipe.data.tokenizer")
    if not hasattr(checkpoint, "load_model_for_inference"):
        pytest.skip("twinpipe.trainer.checkpoint.load_model_for_inference is not there yet")
    torch.manual_seed(1)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    with torch.no_grad():
        model.layers[2].mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.05)
    tok = tokenizer_mod.train_bpe(iter(["def f(x):\n    return x + 1\n"] * 50), vocab_size=300)
    ckpt = checkpoint.save_checkpoint(tmp_path / "run", 3, {"model": model.state_dict()}, {}, {"step": 3},
                                      "model:\n  preset: tiny\n  extra: {}\n", tok, keep=1)
    assert main(["--from", "twinpipe", "--to", "hf", str(ckpt), str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    loaded = load_hf(tmp_path / "hf", dtype=torch.float32)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert tokenizer_mod.load_tokenizer(tmp_path / "hf").encode("return x") == tok.encode("return x")
