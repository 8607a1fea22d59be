"""Per-layer activation recomputation without renaming parameters.

``full`` keeps only the block input and recomputes the whole block in backward; ``selective``
(torchtitan's op-level SAC) keeps matmul and attention outputs and recomputes the cheap
element-wise ops (norms, activations, RoPE). The block's ``forward`` is wrapped in place rather than
with ``checkpoint_wrapper`` so state-dict keys stay those of the plain model and checkpoints reshard.

Compiled, ``full`` goes through selective checkpointing too, with a policy that recomputes every op. Why: torch
2.11's dynamo tags only the checkpointed region's own graph nodes for recomputation, not the ops inside a custom
``autograd.Function`` it traces there (COAT's FP8 norm, casts and linears, memory/fp8_activations.py), so the
partitioner kept their outputs: a compiled FP8 block under ``full`` saved 5x the planner's bytes (which are the fp32
block input; it kept 90% of its no-recompute bytes, llama d_model 128, tests/unit/test_compiled_memory.py) and never
reran its norms. Selective checkpointing's dispatch mode tags every op it sees, those included; torch 2.13 runs plain
compiled checkpointing that way itself (``tag_activation_checkpoint_impl``), so there this changes nothing. Eager
``full`` stays plain checkpointing (no dispatch mode over every op).
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


def _recompute_all(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.PREFER_RECOMPUTE


def _full_context() -> Any:
    """``full`` while dynamo traces the block: every op, custom autograd Functions' included, tagged to recompute."""
    return create_selective_checkpoint_contexts(_recompute_all)


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

    traced = {**kwargs, "context_fn": _full_context} if mode == "full" else kwargs

    @functools.wraps(inner)
    def forward(*args: Any, **kw: Any) -> Any:
        return checkpoint(inner, *args, **kw, **(traced if torch.compiler.is_compiling() else kwargs))

    block.forward = forward  # instance attribute: nn.Module.__call__ (and its hooks) still run
    return block
