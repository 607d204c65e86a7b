"""Cross-entropy, per-token log-probabilities and entropy from the hidden states and the output head,
in chunks of tokens, so fp32 logits [tokens, vocab] never exist at once (DeepSeek-V3's vocabulary of
129,280 and 4,096 tokens is ~2.1 GB of fp32 logits per head, before the softmax's own copy).

    hidden [N, H] (the head's input: after the final norm), weight [V, H] (lm_head), labels [N]
    for each chunk of rows:  logits_c = hidden_c @ weight^T   [rows, V], fp32 for the softmax
                             logprob = logits_c[label] - logsumexp(logits_c)
                             entropy = logsumexp - sum softmax * logits_c
    backward: the chunk's logits are computed again (one more [rows, H] x [H, V] GEMM per chunk) and
    d logits = g_logprob * (onehot - p) - g_entropy * p * (log p + entropy), folded into
    d hidden_c = d logits @ weight and d weight += d logits^T @ hidden_c (fp32 accumulator).

The GEMMs run in the compute dtype (the autocast dtype under `train.dtype=bf16`, as `lm_head` would,
else the hidden states'); softmax and sums in fp32. A chunk works in at most `CHUNK_BUFFERS` fp32
[rows, V] buffers: the logits, turned in place into log-probabilities, probabilities and their
gradient, and one more (logsumexp's exponentials in the forward; the probabilities beside the
log-probabilities when the entropy has a gradient). The weight gradient accumulates in place.
Rows per chunk come from a budget in MiB for those buffers (`rows_for_budget`, `loss.ce_chunk_mib`),
so the loss's working memory is bounded whatever the vocabulary (measured: bench/memory.py, the `ce`
section).

`token_logprobs_and_entropy(hidden, weight, labels, chunk_rows)` is the kernel (GRPO's per-token
logprobs and entropy call it too); `linear_cross_entropy_sum` is the pretraining / SFT form.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


CHUNK_BUFFERS = 2  # fp32 [rows, vocab] buffers a chunk holds at once


def rows_for_budget(budget_mib: float, vocab: int) -> int:
    """Rows per chunk so that a chunk's fp32 [rows, vocab] buffers (`CHUNK_BUFFERS` of them) take at
    most `budget_mib` MiB (at least 1 row)."""
    return max(1, int(budget_mib * 2**20) // (CHUNK_BUFFERS * 4 * vocab))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _chunk_stats(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor):
    """One chunk: h [R, H], w [V, H] (compute dtype), labels [R] -> logits [R, V] fp32, lse [R],
    logprob [R] (0 where the label is ignored), valid [R] bool."""
    logits = (h @ w.t()).float()                                                # [R, V]
    top = logits.amax(dim=-1, keepdim=True)                                     # [R, 1]
    # logsumexp with its one [R, V] scratch buffer in the open (the second of CHUNK_BUFFERS)
    lse = (logits - top).exp_().sum(dim=-1).log_().add_(top.squeeze(1))         # [R]
    valid = labels != IGNORE_INDEX
    picked = logits.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)      # [R]
    return logits, lse, torch.where(valid, picked - lse, torch.zeros_like(lse)), valid


class _LinearLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows: int, with_entropy: bool):
        dtype = _compute_dtype(hidden)
        N = hidden.shape[0]
        logprob = torch.empty(N, dtype=torch.float32, device=hidden.device)    # [N]
        entropy = torch.zeros(N if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for a in range(0, N, chunk_rows):
                b = min(a + chunk_rows, N)
                logits, lse, logprob[a:b], _ = _chunk_stats(hidden[a:b].to(dtype), w, labels[a:b])
                if with_entropy:  # H = lse - sum p * logits, p = exp(logits - lse)
                    p = (logits - lse.unsqueeze(1)).exp_()                      # [R, V]
                    entropy[a:b] = lse - p.mul_(logits).sum(-1)
                    del p
                del logits
        ctx.save_for_backward(hidden, weight, labels, entropy)
        ctx.chunk_rows, ctx.dtype, ctx.with_entropy = chunk_rows, dtype, with_entropy
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, labels, entropy = ctx.saved_tensors
        dtype, rows, N = ctx.dtype, ctx.chunk_rows, hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None                  # [N, H]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for a in range(0, N, rows):
                b = min(a + rows, N)
                h = hidden[a:b].to(dtype)
                logits, lse, _, valid = _chunk_stats(h, w, labels[a:b])
                logp = logits.sub_(lse.unsqueeze(1))                            # [R, V], in place
                del logits
                g_lp = torch.where(valid, grad_logprob[a:b], torch.zeros_like(lse)).unsqueeze(1)  # [R, 1]
                # d logits = g_lp * onehot - p * (g_lp + g_H * (logp + H)); g_H = 0 without the entropy's
                if ctx.with_entropy and grad_entropy is not None:
                    p = logp.exp()
                    d = logp.add_(entropy[a:b].unsqueeze(1)).mul_(grad_entropy[a:b].unsqueeze(1)).add_(g_lp)
                    d.mul_(p).neg_()
                    del p
                else:
                    d = logp.exp_().mul_(-g_lp)
                del logp
                d.scatter_add_(1, labels[a:b].clamp(min=0).unsqueeze(1), g_lp)
                d = d.to(dtype)
                if need_h:
                    grad_h[a:b] = (d @ w).to(hidden.dtype)                      # [R, H]
                if need_w:
                    if d.dtype == torch.float32:
                        grad_w.addmm_(d.t(), h)                                 # [V, H], in place
                    else:
                        grad_w.add_(d.t() @ h)
                del d
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None


def token_logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk_rows: int, with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(hidden @ weight^T)[label] and the softmax's entropy per token, both fp32 and both
    differentiable, without the [tokens, vocab] logits. hidden [..., H], weight [V, H], labels [...]
    (-100: logprob 0, no gradient) -> (logprob [...], entropy [...]; empty when not with_entropy)."""
    lead = labels.shape
    logprob, entropy = _LinearLogprobEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                                   labels.reshape(-1), int(chunk_rows), with_entropy)
    return logprob.view(lead), entropy.view(lead) if with_entropy else entropy


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk_rows: int) -> torch.Tensor:
    """Σ over tokens with a label (not -100) of -log softmax(hidden @ weight^T)[label]; hidden [B, T, H],
    weight [V, H], labels [B, T]: `loss.cross_entropy_sum(lm_head(hidden), labels)` in chunks."""
    logprob, _ = token_logprobs_and_entropy(hidden, weight, labels, chunk_rows, with_entropy=False)
    return -logprob.sum()
