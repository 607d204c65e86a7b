"""twinpipe-convert (Hydra overrides): HF -> HF-FP8 -> BF16 tensor by tensor, a twinpipe training
checkpoint or run dir -> HF, and errors that name the key or the file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from twinpipe.model.config import ModelConfig
from twinpipe.model.hf import load_hf, save_hf
from twinpipe.model.transformer import Transformer
from twinpipe.trainer.cli.convert import main

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
    assert main([f"src={folder}", f"dst={tmp_path / 'fp8'}", "to=hf-fp8"]) is None  # exit status 0
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
    main([f"src={fp8}", f"dst={tmp_path / 'bf16'}"])  # to=hf, dtype=bf16 by default
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
    main([f"src={fp8}", f"dst={tmp_path / 'fp8b'}", "to=hf-fp8"])
    again = _tensors(tmp_path / "fp8b")
    assert all(torch.equal(again[k].view(torch.uint8), converted[k].view(torch.uint8))
               for k in converted if converted[k].dtype == torch.float8_e4m3fn)


def test_convert_errors_exit_nonzero_and_name_the_problem(model_and_folder, tmp_path, fails):
    _, folder = model_and_folder
    said = fails(main, [f"src={tmp_path / 'nowhere'}", f"dst={tmp_path / 'out'}"])
    assert "nowhere: no such folder" in said and "config.json" in said
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert "taken exists" in fails(main, [f"src={folder}", f"dst={tmp_path / 'taken'}"])
    said = fails(main, [f"src={folder}", f"dst={tmp_path / 'o'}", "to=gguf"])
    assert "to='gguf': allowed values are hf, hf-fp8" in said
    # the source format is read from src
    assert "Key 'from' not in 'ConvertSchema'" in fails(main, [f"src={folder}", f"dst={tmp_path / 'o'}", "from=hf"])
    assert "dst not set" in fails(main, [f"src={folder}"])
    (tmp_path / "plain").mkdir()  # exists, but neither an HF folder nor a checkpoint: named by its key
    assert f"src={tmp_path / 'plain'}: not a complete checkpoint" in fails(main, [f"src={tmp_path / 'plain'}",
                                                                                 f"dst={tmp_path / 'o'}"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp in one process, on purpose
def test_twinpipe_checkpoint_to_hf(tmp_path):
    from twinpipe.data.tokenizer import load_tokenizer, train_bpe
    from twinpipe.trainer.checkpoint.io import save_checkpoint

    torch.manual_seed(1)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    with torch.no_grad():
        model.layers[2].mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.05)
    tok = train_bpe(iter(["def f(x):\n    return x + 1\n"] * 50), vocab_size=300)
    ckpt = save_checkpoint(tmp_path / "run", 3, {"model": model.state_dict()}, {}, {"step": 3},
                           "model:\n  preset: tiny\n  extra: {}\n", tok, keep=1)
    want = model.state_dict()
    for src, dst in ((ckpt, tmp_path / "hf"), (tmp_path / "run", tmp_path / "hf-from-run-dir")):
        main([f"src={src}", f"dst={dst}", "dtype=fp32"])
        got = load_hf(dst, dtype=torch.float32).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want)
        assert load_tokenizer(dst).encode("return x") == tok.encode("return x")
