"""Tensor (+ sequence) parallelism for one Decoder block with DTensor ``parallelize_module``.

Megatron's layout, written as a torchtitan-style plan: wq/wk/wv and w1/w3 column-parallel, wo and
w2 row-parallel, so each block needs one all-reduce in attention and one in the MLP. With ``sp`` the
norms run sequence-parallel (activations split on the sequence dim between the matmuls) and the
all-reduces become all-gather + reduce-scatter pairs. The block takes and returns a plain,
tp-replicated tensor so neighbouring layers with other layouts need not know about DTensor.

Qwen3's q/k head norms stay plain, tp-replicated weights applied to each rank's own heads (the local output of
the column-parallel wq/wk, with or without ``sp``): their gradients are partial sums over those heads, summed over
the tp group in backward (``HeadNorm.grad_group``, set by ``share_head_norm_grads``).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from meshwright.errors import invalid
from meshwright.models.layers import HeadNorm
from meshwright.models.moe import MoE


def share_head_norm_grads(block: nn.Module, group: object) -> None:
    """Sum the gradients of ``block``'s q/k head norms (if any) over the tp ``group``: each rank normalises only its
    heads with the whole, replicated weight, so its gradient covers only those heads."""
    for module in block.modules():
        if isinstance(module, HeadNorm):
            module.grad_group = group


def apply_tp(block: nn.Module, tp_mesh: DeviceMesh, sp: bool = False) -> nn.Module:
    """Shard ``block`` (a models.decoder.Block) over ``tp_mesh``; parameter names are unchanged.

    An MoE block keeps its router and experts tp-replicated (plain tensors): every tp rank holds the
    same tokens, routes them identically and runs the experts redundantly, so the block's output stays
    replicated without communication. That needs tp-replicated tokens, hence no ``sp`` on MoE blocks.
    """
    share_head_norm_grads(block, tp_mesh.get_group())
    mlp = block.feed_forward
    if isinstance(mlp, MoE):
        if sp:
            raise invalid("sp", True, "false on MoE layers (experts need tp-replicated tokens)")
        return parallelize_module(block, tp_mesh, {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                                                   "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel()})
    has_w3 = hasattr(mlp, "w3")
    if not sp:
        plan: dict[str, object] = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(),
        }
        if has_w3:
            plan["feed_forward.w3"] = ColwiseParallel()
        return parallelize_module(block, tp_mesh, plan)
    # the block's input is replicated over tp: split the sequence locally (no communication)
    parallelize_module(block, tp_mesh, PrepareModuleInput(input_layouts=(Replicate(), None),
                                                          desired_input_layouts=(Shard(1), None),
                                                          use_local_output=False))
    plan = {
        "attention_norm": SequenceParallel(use_local_output=False),
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "ffn_norm": SequenceParallel(use_local_output=False),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
    }
    if has_w3:
        plan["feed_forward.w3"] = ColwiseParallel()
    for post in ("attention_post_norm", "ffn_post_norm"):  # Gemma 2/3: on the sequence-split outputs of wo and w2
        if getattr(block, post, None) is not None:
            plan[post] = SequenceParallel(use_local_output=False)
    block = parallelize_module(block, tp_mesh, plan)
    # gather the sequence back so the next layer (any layout) sees a plain replicated tensor
    parallelize_module(block, tp_mesh, PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate(),
                                                           use_local_output=True))
    return block
