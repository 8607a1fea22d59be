"""Per-layer activation recomputation without renaming parameters.

``full`` keeps only the block input and recomputes the whole block in backward; ``selective``
(torchtitan's op-level SAC) keeps matmul and attention outputs and recomputes the cheap
element-wise ops (norms, activations, RoPE). The block's ``forward`` is wrapped in place rather than
with ``checkpoint_wrapper`` so state-dict keys stay those of the plain model and checkpoints reshard.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from meshwright.errors import invalid

_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.higher_order.flex_attention,  # Gemma 2's capped attention, compiled (models/capped_flex.py)
}


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context() -> Any:
    return create_selective_checkpoint_contexts(_policy)


def apply_recompute(block: nn.Module, mode: str) -> nn.Module:
    """Wrap ``block.forward`` with activation checkpointing; ``mode`` is none/selective/full."""
    if mode == "none":
        return block
    if mode not in ("selective", "full"):
        raise invalid("recompute", mode, "none, selective or full")
    inner = block.forward
    kwargs: dict[str, Any] = {"use_reentrant": False, "preserve_rng_state": True}
    if mode == "selective":
        kwargs["context_fn"] = _selective_context

    @functools.wraps(inner)
    def forward(*args: Any, **kw: Any) -> Any:
        return checkpoint(inner, *args, **kw, **kwargs)

    block.forward = forward  # instance attribute: nn.Module.__call__ (and its hooks) still run
    return block
