"""MLA: absorbed == naive over the same latent cache, cached == uncached, packed-document mask."""

import torch

from twinpipe.model import MLA, LatentKVCache, ModelConfig, Transformer

# fp32: the absorbed form multiplies W_kvb into the query/output instead of into the keys/values, so
# sums run in another order; differences are a few ulps of values of size ~1 (1e-5 leaves 100x room).
TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_mla(**overrides):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", **overrides)
    mla = MLA(cfg, layer_idx=0)
    mla.reset_parameters(0.05)
    return cfg, mla


def run_cached(cfg, mla, x, chunks, absorb, valid=None):
    cache = LatentKVCache(cfg, x.shape[0], x.shape[1], absorb=absorb)
    outs, start = [], 0
    for n in chunks:
        v = None if valid is None else valid[:, start:start + n]
        pos = cache.begin(n, v)
        outs.append(mla(x[:, start:start + n], pos, cache))
        cache.commit()
        start += n
    return torch.cat(outs, dim=1)


def test_absorbed_equals_naive_and_uncached():
    yarn = {"type": "yarn", "factor": 8, "original_max_position_embeddings": 64, "mscale": 1.0,
            "mscale_all_dim": 1.0}
    for overrides in ({}, {"q_lora_rank": None, "rope_interleave": False, "rope_scaling": yarn}):
        cfg, mla = tiny_mla(**overrides)
        x = torch.randn(3, 11, cfg.hidden_size)
        full = mla(x)                                                 # causal, no cache
        naive = run_cached(cfg, mla, x, [6, 1, 1, 3], absorb=False)
        absorbed = run_cached(cfg, mla, x, [6, 1, 1, 3], absorb=True)
        torch.testing.assert_close(naive, full, **TOL)
        torch.testing.assert_close(absorbed, naive, **TOL)


def test_padding_is_invisible():
    cfg, mla = tiny_mla()
    x = torch.randn(1, 5, cfg.hidden_size)
    alone = mla(x)
    # same tokens with two pads in front and a pad in the middle of the decode steps
    padded = torch.cat([torch.randn(1, 2, cfg.hidden_size), x[:, :3], torch.randn(1, 1, cfg.hidden_size),
                        x[:, 3:]], dim=1)
    valid = torch.tensor([[False, False, True, True, True, False, True, True]])
    for absorb in (False, True):
        out = run_cached(cfg, mla, padded, [5, 1, 1, 1], absorb, valid)
        torch.testing.assert_close(out[:, valid[0]], alone, **TOL)


def test_packed_documents_do_not_see_each_other():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    a, b = torch.randint(0, 4096, (1, 6)), torch.randint(0, 4096, (1, 4))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(6), torch.arange(4)])[None]
    with torch.no_grad():
        out = model(packed, positions)
        torch.testing.assert_close(out[:, :6], model(a), **TOL)
        torch.testing.assert_close(out[:, 6:], model(b), **TOL)


def count_mask_calls(monkeypatch) -> list:
    """Count document_causal_mask calls from every module that could make one (one entry per call)."""
    import twinpipe.model.attention as attention
    import twinpipe.model.transformer as transformer
    import twinpipe.parallel.pipeline.stages as stages

    calls, real = [], attention.document_causal_mask

    def counted(position_ids):
        calls.append(position_ids.shape)
        return real(position_ids)

    for module in (attention, transformer, stages):
        monkeypatch.setattr(module, "document_causal_mask", counted)
    return calls


def test_document_mask_is_computed_once_per_forward(monkeypatch):
    """4 blocks + 1 MTP block share one mask (MTP takes its prefix); packed MTP logits still equal
    each document's own (the MTP position before a document break sees the next document's token
    embedding, so it is left out)."""
    from twinpipe.model.attention import document_causal_mask

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    a, b = torch.randint(0, 4096, (1, 6)), torch.randint(0, 4096, (1, 4))
    positions = torch.cat([torch.arange(6), torch.arange(4)])[None]
    mask = document_causal_mask(positions)
    assert mask[0, 0, 7].tolist() == [False] * 6 + [True, True, False, False]  # b's 2nd token: b[:2]
    calls = count_mask_calls(monkeypatch)
    with torch.no_grad():
        packed = model.forward_train(torch.cat([a, b], dim=1), positions)
        assert len(calls) == 1
        model(torch.cat([a, b], dim=1), positions)
        assert len(calls) == 2
        model.forward_train(a)  # no position_ids: causal, nothing to compute
        assert len(calls) == 2
        alone_a, alone_b = model.forward_train(a), model.forward_train(b)
    torch.testing.assert_close(packed.logits[:, :6], alone_a.logits, **TOL)
    torch.testing.assert_close(packed.logits[:, 6:], alone_b.logits, **TOL)
    mtp = packed.mtp_logits[0]                                                  # [1, 9, V]
    torch.testing.assert_close(mtp[:, :5], alone_a.mtp_logits[0], **TOL)
    torch.testing.assert_close(mtp[:, 6:9], alone_b.mtp_logits[0][:, :3], **TOL)


def test_auto_form_picks_absorbed_for_decoding_only():
    # DeepSeek-V3: absorbed while T * (2*512 - 128 - 128) < 512 * (128 + 128), i.e. T <= 170.
    with torch.device("meta"):
        mla = MLA(ModelConfig.preset("v3_671b"), layer_idx=0)
    assert mla.use_absorbed(1) and mla.use_absorbed(170) and not mla.use_absorbed(171)
    cfg, mla = tiny_mla(kv_lora_rank=64)  # tiny with r = 64: absorbed while T * 64 < 4096
    assert mla.use_absorbed(63) and not mla.use_absorbed(64)
    x = torch.randn(2, 70, cfg.hidden_size)
    torch.testing.assert_close(run_cached(cfg, mla, x, [66, 1, 3], absorb=None), mla(x), **TOL)
