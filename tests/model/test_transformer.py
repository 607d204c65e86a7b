"""Transformer: forward_train shapes, MTP alignment, counts, init, meta construction."""

import torch

from twinpipe.model import ModelConfig, MoE, Transformer


def tiny_model(**overrides):
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", **overrides))


def test_forward_train_shapes_and_counts():
    model = tiny_model(num_nextn_predict_layers=2)
    tokens = torch.randint(0, 4096, (2, 12))
    out = model.forward_train(tokens)
    assert out.logits.shape == (2, 12, 4096)
    assert [t.shape for t in out.mtp_logits] == [(2, 11, 4096), (2, 10, 4096)]
    # 3 MoE layers in the main stack + 2 MTP blocks; each token counted top-k = 2 times
    assert out.expert_counts.shape == (5, 8) and out.expert_counts.dtype == torch.int64
    assert out.expert_counts.sum(1).tolist() == [48, 48, 48, 44, 40]
    assert out.balance_loss.ndim == 0 and out.balance_loss > 0 and not out.balance_loss.requires_grad
    torch.testing.assert_close(out.logits, model(tokens))


def test_mtp_alignment():
    """mtp_logits[0][:, i] uses h_i and Emb(t_{i+1}), i.e. tokens <= i+1, and predicts labels[:, i+1]."""
    model = tiny_model().eval()
    tokens = torch.randint(0, 4096, (1, 10))
    with torch.no_grad():
        out = model.forward_train(tokens)
        h = model.hidden(tokens)
        manual = model.mtp_head(1, model.mtp[0](h[:, :9], model.embed(tokens[:, 1:]),
                                                torch.arange(9)[None]))
        torch.testing.assert_close(out.mtp_logits[0], manual)
        j = 6
        changed = tokens.clone()
        changed[0, j] = (tokens[0, j] + 1) % 4096
        out2 = model.forward_train(changed)
    torch.testing.assert_close(out2.logits[:, :j], out.logits[:, :j])
    assert not torch.allclose(out2.logits[:, j], out.logits[:, j])
    torch.testing.assert_close(out2.mtp_logits[0][:, : j - 1], out.mtp_logits[0][:, : j - 1])
    assert not torch.allclose(out2.mtp_logits[0][:, j - 1], out.mtp_logits[0][:, j - 1])


def test_training_loss_gradient_reaches_every_parameter():
    model = tiny_model()
    tokens = torch.randint(0, 4096, (2, 16))
    out = model.forward_train(tokens)
    labels = tokens[:, 1:]
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 4096), labels.reshape(-1))
    loss = loss + 0.3 * torch.nn.functional.cross_entropy(out.mtp_logits[0][:, :-1].reshape(-1, 4096),
                                                          labels[:, 1:].reshape(-1))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_meta_construction_then_materialize():
    cfg = ModelConfig.preset("tiny", initializer_range=0.02)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.lm_head.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() == 0
    std = model.layers[1].mlp.experts.gate_proj.std().item()
    assert abs(std - 0.02) < 0.002
    assert model.layers[0].input_layernorm.weight.eq(1).all()
    assert torch.isfinite(model(torch.randint(0, 4096, (1, 5)))).all()
    assert len(model.moe_layers()) == 4 and all(isinstance(m, MoE) for m in model.moe_layers())
