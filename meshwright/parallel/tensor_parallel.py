"""Tensor (+ sequence) parallelism for one Decoder block with DTensor ``parallelize_module``.

Megatron's layout, written as a torchtitan-style plan: wq/wk/wv and w1/w3 column-parallel, wo and
w2 row-parallel, so each block needs one all-reduce in attention and one in the MLP. With ``sp`` the
norms run sequence-parallel (activations split on the sequence dim between the matmuls) and the
all-reduces become all-gather + reduce-scatter pairs. The block takes and returns a plain,
tp-replicated tensor so neighbouring layers with other layouts need not know about DTensor.

LoRA adapters (``memory/lora.py``) are sharded with their base linear as PEFT/Megatron shard them
(``LoraColwiseParallel``/``LoraRowwiseParallel``; plain linears are sharded exactly as torch's styles do), and a frozen
base stays frozen through ``SequenceParallel``, which re-registers the norms' weights.

Qwen3's q/k head norms stay plain, tp-replicated weights applied to each rank's own heads (the local output of
the column-parallel wq/wk, with or without ``sp``): their gradients are partial sums over those heads, summed over
the tp group in backward (``HeadNorm.grad_group``, set by ``share_head_norm_grads``).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from meshwright.errors import invalid
from meshwright.memory.lora import LoRALinear
from meshwright.models.layers import HeadNorm
from meshwright.models.moe import MoE
from meshwright.parallel.expert_tp import apply_expert_tp


def _distribute(module: nn.Module, mesh: DeviceMesh, placements: dict[str, Placement]) -> None:
    """Replace ``module``'s own parameters by DTensors with the named placements (requires_grad kept)."""
    for name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(name, nn.Parameter(distribute_tensor(param, mesh, [placements[name]]),
                                                     requires_grad=param.requires_grad))


class LoraColwiseParallel(ColwiseParallel):
    """``ColwiseParallel`` that also shards a LoRA adapter as PEFT/Megatron do for a column-parallel base: B
    column-sharded with the weight (Shard(0) of out x r), A replicated (r x in, the input is replicated), so the
    adapter's output is sharded like the base's and needs no communication. A's gradient comes out of backward as a
    Partial DTensor (a sum over the tp ranks' output columns), summed by ``runtime.reduce_partial_grads``."""

    def _partition_linear_fn(self, name, module, device_mesh):  # type: ignore[no-untyped-def]
        if not isinstance(module, LoRALinear):
            return super()._partition_linear_fn(name, module, device_mesh)
        _distribute(module, device_mesh, {"weight": Shard(0), "bias": Shard(0), "lora_A": Replicate(),
                                          "lora_B": Shard(0)})


class LoraRowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` with a LoRA adapter sharded for a row-parallel base: A row-sharded on the input dim
    (Shard(1) of r x in, like the weight), B replicated; the adapter's output is then a partial sum like the base's
    and both are reduced by the base's one all-reduce (or reduce-scatter under sp). B's gradient is Partial like
    A's above (``runtime.reduce_partial_grads``)."""

    def _partition_linear_fn(self, name, module, device_mesh):  # type: ignore[no-untyped-def]
        if not isinstance(module, LoRALinear):
            return super()._partition_linear_fn(name, module, device_mesh)
        _distribute(module, device_mesh, {"weight": Shard(1), "bias": Replicate(), "lora_A": Shard(1),
                                          "lora_B": Replicate()})


def share_head_norm_grads(block: nn.Module, group: object) -> None:
    """Sum the gradients of ``block``'s q/k head norms (if any) over the tp ``group``: each rank normalises only its
    heads with the whole, replicated weight, so its gradient covers only those heads."""
    for module in block.modules():
        if isinstance(module, HeadNorm):
            module.grad_group = group


def apply_tp(block: nn.Module, tp_mesh: DeviceMesh, sp: bool = False) -> nn.Module:
    """Shard ``block`` (a models.decoder.Block) over ``tp_mesh``; parameter names are unchanged.

    An MoE block keeps its router tp-replicated (a plain tensor): every tp rank holds the same tokens and routes
    them identically; its experts are split over tp (``expert_tp.apply_expert_tp``: w1/w3 by columns, w2 by rows),
    their partial outputs summed once over tp. That needs tp-replicated tokens, hence no ``sp`` on MoE blocks.
    """
    frozen = [name for name, p in block.named_parameters() if not p.requires_grad]
    block = _apply_tp(block, tp_mesh, sp)
    for name in frozen:  # SequenceParallel re-registers the norms' weights as trainable: a frozen base stays frozen
        block.get_parameter(name).requires_grad_(False)
    return block


def _apply_tp(block: nn.Module, tp_mesh: DeviceMesh, sp: bool) -> nn.Module:
    share_head_norm_grads(block, tp_mesh.get_group())
    mlp = block.feed_forward
    if isinstance(mlp, MoE):
        if sp:
            raise invalid("sp", True, "false on MoE layers (experts need tp-replicated tokens)")
        apply_expert_tp(mlp, tp_mesh)
        return parallelize_module(block, tp_mesh, {"attention.wq": LoraColwiseParallel(),
                                                   "attention.wk": LoraColwiseParallel(),
                                                   "attention.wv": LoraColwiseParallel(),
                                                   "attention.wo": LoraRowwiseParallel()})
    has_w3 = hasattr(mlp, "w3")
    if not sp:
        plan: dict[str, object] = {
            "attention.wq": LoraColwiseParallel(),
            "attention.wk": LoraColwiseParallel(),
            "attention.wv": LoraColwiseParallel(),
            "attention.wo": LoraRowwiseParallel(),
            "feed_forward.w1": LoraColwiseParallel(),
            "feed_forward.w2": LoraRowwiseParallel(),
        }
        if has_w3:
            plan["feed_forward.w3"] = LoraColwiseParallel()
        return parallelize_module(block, tp_mesh, plan)
    # the block's input is replicated over tp: split the sequence locally (no communication)
    parallelize_module(block, tp_mesh, PrepareModuleInput(input_layouts=(Replicate(), None),
                                                          desired_input_layouts=(Shard(1), None),
                                                          use_local_output=False))
    plan = {
        "attention_norm": SequenceParallel(use_local_output=False),
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attention.wq": LoraColwiseParallel(),
        "attention.wk": LoraColwiseParallel(),
        "attention.wv": LoraColwiseParallel(),
        "attention.wo": LoraRowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "ffn_norm": SequenceParallel(use_local_output=False),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": LoraColwiseParallel(),
        "feed_forward.w2": LoraRowwiseParallel(output_layouts=Shard(1), use_local_output=False),
    }
    if has_w3:
        plan["feed_forward.w3"] = LoraColwiseParallel()
    for post in ("attention_post_norm", "ffn_post_norm"):  # Gemma 2/3: on the sequence-split outputs of wo and w2
        if getattr(block, post, None) is not None:
            plan[post] = SequenceParallel(use_local_output=False)
    block = parallelize_module(block, tp_mesh, plan)
    # gather the sequence back so the next layer (any layout) sees a plain replicated tensor
    parallelize_module(block, tp_mesh, PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate(),
                                                           use_local_output=True))
    return block
