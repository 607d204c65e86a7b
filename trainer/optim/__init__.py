"""The optimizer: AdamW with ZeRO-1 (`optimizer` builds it; `zero`, `deepspeed_zero`) and the LR / batch / λ / γ schedules (`schedule`)."""
