"""Schedules over training progress: learning rate, batch-size ramp, MTP weight λ, bias speed γ.

The LR follows DeepSeek-V3 (report §4.2): linear warmup from 0 over `warmup_steps` *steps*, then
phases measured in `unit` (steps or tokens) counted from the end of warmup:

    constant at lr  ->  cosine from lr to min_lr over `decay`  ->  tail phases [length, lr] ...

and after the last phase the last value holds. With unit=tokens the V3 recipe reads
`constant: 10e12, decay: 4.3e12, tail: [[333e9, 2.2e-5], [167e9, 7.3e-6]]`. (The report counts the
constant phase "until 10T tokens" from the start; the warmup's tokens are a rounding error there.)
"""

from __future__ import annotations

import math

from omegaconf import DictConfig


def lr_at(optim: DictConfig, step: int, tokens: float) -> float:
    """Learning rate for optimizer step `step` (0-based) after `tokens` tokens were consumed."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    # progress past warmup, in the schedule's unit
    t = float(step - optim.warmup_steps) if optim.unit == "steps" else float(tokens)
    if t < optim.constant:
        return optim.lr
    t -= optim.constant
    if t < optim.decay:
        cos = 0.5 * (1.0 + math.cos(math.pi * t / optim.decay))
        return optim.min_lr + (optim.lr - optim.min_lr) * cos
    t -= optim.decay
    last = optim.min_lr if optim.decay > 0 else optim.lr
    for length, lr in optim.tail:
        if t < length:
            return float(lr)
        t -= length
        last = float(lr)
    return last


def batch_size_at(optim: DictConfig, global_batch: int, tokens: float, multiple: int) -> int:
    """Sequences in the next global batch: ramp_start -> global_batch linearly over ramp_tokens,
    rounded down to `multiple` (= micro_batch x dp). Without a ramp it is always global_batch."""
    if not optim.ramp_start or optim.ramp_tokens <= 0 or tokens >= optim.ramp_tokens:
        return global_batch
    size = optim.ramp_start + (global_batch - optim.ramp_start) * tokens / optim.ramp_tokens
    return max(multiple, int(size) // multiple * multiple)


def mtp_lambda_at(loss: DictConfig, tokens: float) -> float:
    """MTP loss weight λ: 0.3 for the first 10T tokens, then 0.1 (report §4.2)."""
    return loss.mtp_lambda if tokens < loss.mtp_switch_tokens else loss.mtp_lambda_late


def gamma_at(balance: DictConfig, tokens: float) -> float:
    """Router-bias update speed γ: 0.001 for the first 14.3T tokens, then 0 (report §4.2)."""
    return balance.gamma if tokens < balance.gamma_until_tokens else 0.0
