"""Optimizers: COAT FP8 AdamW (and its group FP8 quantizer)."""

from meshwright.optim.coat import CoatAdamW, coat_state_bytes_per_param

__all__ = ["CoatAdamW", "coat_state_bytes_per_param"]
