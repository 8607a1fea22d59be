"""Which path soft-capped attention takes (compiled flex_attention or materialised scores): the rule alone.

Why a module of its own: the planner (``cost_model.capped_scores``) asks the same rule as the runtime
(:mod:`meshwright.models.capped_flex`, which re-exports it) without importing torch and flex_attention.
"""

from __future__ import annotations


def flex_capped_reason(compiled: bool, device_type: str, needs_grad: bool, dropout: float) -> str | None:
    """Why capped attention must take the materialised path, or None where the flex path runs. Flex runs when the
    attention is compiled (torch.compile traces it: the trainer's ``compile: true``), without attention dropout
    (flex has none), on CUDA, or on CPU without gradients (torch's CPU flex kernel has no backward: it raises
    "FlexAttention does not support backward on CPU", torch 2.11-2.13)."""
    if not compiled:
        return "not compiled (eager flex_attention materialises the scores too)"
    if dropout > 0:
        return f"attention dropout {dropout} (flex_attention has no dropout)"
    if device_type == "cpu" and needs_grad:
        return "CPU training (torch's CPU flex_attention has no backward)"
    if device_type not in ("cuda", "cpu"):
        return f"device {device_type!r} (flex path used on cuda and cpu only)"
    return None


def flex_capped(compiled: bool, device_type: str, needs_grad: bool, dropout: float) -> bool:
    """``flex_capped_reason(...) is None``: whether capped attention runs as compiled flex_attention."""
    return flex_capped_reason(compiled, device_type, needs_grad, dropout) is None


def capped_path_note(compiled: bool, device_type: str, needs_grad: bool, dropout: float) -> str:
    """The one line a run prints about its capped-attention path."""
    reason = flex_capped_reason(compiled, device_type, needs_grad, dropout)
    if reason is None:
        return "attention: soft-capped scores via compiled flex_attention (no seq x seq scores in memory)"
    return f"attention: soft-capped scores materialised (seq x seq per head): {reason}"
