"""LoRA adapters on megatron-core's ``ColumnParallelLinear``/``RowParallelLinear`` (``tp_backend: megatron``).

The adapters are sharded with their base as the DTensor backend shards them (``tensor_parallel.LoraColwiseParallel``
/``LoraRowwiseParallel``), and they ride on the base's own collective instead of paying their own:

- column-parallel base (wq/wk/wv, w1/w3): A replicated (rank x in), B column-sharded like the weight (out/tp x rank),
  so the adapter's output is sharded like the base's. Both send a partial input gradient back (a sum over this rank's
  output columns); megatron's layer is built with ``disable_grad_reduce`` and the block's input goes through one
  ``copy_to_tensor_model_parallel_region`` shared by base and adapter, whose backward all-reduce sums both at once.
  PEFT's ``LoraParallelLinear`` and NeMo's ``ParallelLinearAdapter`` instead put A/B in parallel linears of their
  own, which all-reduce a rank-wide tensor of their own.
- row-parallel base (wo, w2): A row-sharded on the input dim like the weight (rank x in/tp), B replicated (out x
  rank); the adapter's output is a partial sum like the base's matmul, added before megatron's one all-reduce.

The replicated parts (A of a column base, B of a row base) get tp-partial gradients (each rank's share of the sum
over the sharded dim): they are marked ``tp_partial_grad`` and the runtime sums them over the tp group once per step
(``DistributedRuntime._finish_grads``), as megatron's ``finalize_model_grads`` sums its ``sequence_parallel`` norms.
Sharded parts carry megatron's ``tensor_model_parallel``/``partition_dim`` attributes. The parameters keep
``memory.lora.LoRALinear``'s names (``weight``, ``bias``, ``lora_A``, ``lora_B``), so state dicts, adapter-only
checkpoints and exports see the plain model's keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PARTIAL_GRAD = "tp_partial_grad"  # a replicated adapter part whose gradient is a sum over the tp ranks' shares


def lora_shard_dims(column: bool) -> dict[str, int]:
    """{adapter parameter: its shard dim} of a column (B on dim 0) or row (A on dim 1) parallel base; the other
    one is replicated."""
    return {"lora_B": 0} if column else {"lora_A": 1}


def _mark(param: nn.Parameter, dim: int | None) -> None:
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    if dim is None:
        setattr(param, PARTIAL_GRAD, True)
    else:
        set_tensor_model_parallel_attributes(param, True, dim, 1)


class _Adapter:
    """What both LoRA layers add to megatron's: the adapter parameters ``attach_adapters`` sets, and their output."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_scale: float
    lora_dropout: float
    training: bool

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        """``B(A(dropout(x))) * scale``: sharded like the base's output (column) or a partial sum like it (row)."""
        dropped = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return F.linear(F.linear(dropped, self.lora_A), self.lora_B) * self.lora_scale


def lora_classes(column_cls: type, row_cls: type) -> tuple[type, type]:
    """LoRA subclasses of megatron_tp's ``Column``/``Row`` (which return the output only)."""
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    class LoraColumn(_Adapter, column_cls):  # type: ignore[misc, valid-type]
        """Built with ``disable_grad_reduce=True``: the input-gradient all-reduce happens here, once for both."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            x = copy_to_tensor_model_parallel_region(x, group=self.tp_group)
            return super().forward(x) + self.adapter(x)

    class LoraRow(_Adapter, row_cls):  # type: ignore[misc, valid-type]
        """megatron's ``RowParallelLinear.forward`` with the adapter's partial output added before its all-reduce."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            partial = self._forward_impl(input=x, weight=self.weight, bias=None,
                                         gradient_accumulation_fusion=self.gradient_accumulation_fusion,
                                         allreduce_dgrad=False, sequence_parallel=False, tp_group=None,
                                         grad_output_buffer=None)
            partial = partial + self.adapter(x)
            out = reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
            return out + self.bias if self.bias is not None else out

    return LoraColumn, LoraRow


def attach_adapters(new: nn.Module, lin: nn.Module, column: bool, tp: int, rank: int) -> dict[str, int]:
    """Give the megatron layer ``new`` this rank's part of ``lin``'s (a ``LoRALinear``) adapters: their slices of
    the plain adapters, or meta tensors of the local shape on meta (``memory.lora.init_adapters`` fills them).
    Returns {adapter parameter: shard dim} of the sharded part."""
    from meshwright.parallel.meta_init import box_index, shard_box

    dims = lora_shard_dims(column)
    for attr in ("lora_A", "lora_B"):
        full = getattr(lin, attr)
        dim = dims.get(attr)
        shape = list(full.shape)
        if dim is not None:  # the base's own dim, which megatron-core already cut into tp equal parts
            shape[dim] //= tp
        if full.device.type == "meta":
            value = torch.empty(shape, device="meta", dtype=full.dtype)
        else:
            box = shard_box(shape, dim, tp, rank) if dim is not None else None
            value = full.detach()[box_index(box, shape)].clone() if box is not None else full.detach().clone()
        param = nn.Parameter(value.to(new.weight.device), requires_grad=full.requires_grad)
        _mark(param, dim)
        setattr(new, attr, param)
    new.lora_scale = lin.lora_scale
    new.lora_dropout = lin.lora_dropout
    return dims


def partial_grad_params(module: nn.Module) -> list[nn.Parameter]:
    """``module``'s replicated adapter parts whose gradients the tp group must sum."""
    return [p for p in module.parameters() if getattr(p, PARTIAL_GRAD, False)]
