"""Second tensor-parallel backend: megatron-core ``ColumnParallelLinear``/``RowParallelLinear``.

The block's Linear layers are swapped for megatron-core's parallel layers, driven by *our* tp
process group (``tp_group=``), so megatron's global ``parallel_state`` is never initialised and the
meshes stay explicit. Weights are copied from the plain model's slices (or, on a meta block, left for
``parallel/meta_init.py`` to fill with those slices' values, and for ``init_from`` to read from the checkpoint),
all placed by ``meta_init.shard_box``, so this backend gives the same numbers as the DTensor one. Parameters stay plain local shards; ``to_dtensor_state`` /
``load_dtensor_state`` expose them as DTensors so distributed checkpoints still reshard. Qwen3's q/k head norms stay
whole on every rank, their gradients summed over the tp group (``tensor_parallel.share_head_norm_grads``). LoRA-adapted
linears get megatron layers that carry their adapters (``megatron_lora``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from meshwright.parallel.meta_init import box_index, shard_box
from meshwright.parallel.tensor_parallel import share_head_norm_grads

_COLUMN = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
_ROW = ("attention.wo", "feed_forward.w2")


def _classes():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    class Column(ColumnParallelLinear):
        """Returns the output only (our blocks expect nn.Linear's interface)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x)[0]

    class Row(RowParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x)[0]

    return Column, Row


def _config(tp: int, dtype: torch.dtype):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True, perform_initialization=False,
                               gradient_accumulation_fusion=False, sequence_parallel=False, params_dtype=dtype)


def _noop_init(_: torch.Tensor) -> None:
    return None


def apply_megatron_tp(block: nn.Module, tp_group: dist.ProcessGroup) -> dict[str, int]:
    """Swap ``block``'s Linears for megatron-core parallel layers; returns {param name: shard dim}. A LoRA-adapted
    linear (``memory.lora.LoRALinear``) becomes a LoRA parallel layer (``megatron_lora``) with its adapters' shards;
    every parameter keeps its ``requires_grad`` (a frozen base stays frozen: megatron then runs its frozen-weight
    matmul, no weight gradient)."""
    from meshwright.memory.lora import LoRALinear
    from meshwright.parallel.megatron_lora import attach_adapters, lora_classes

    Column, Row = _classes()
    LoraColumn, LoraRow = lora_classes(Column, Row)
    tp, r = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    share_head_norm_grads(block, tp_group)
    shard_dims: dict[str, int] = {}
    for path in _COLUMN + _ROW:
        parent_name, attr = path.rsplit(".", 1)
        parent = block.get_submodule(parent_name)
        lin = getattr(parent, attr, None)
        if lin is None:
            continue
        column = path in _COLUMN
        lora = isinstance(lin, LoRALinear)
        dev, dtype = lin.weight.device, lin.weight.dtype
        cfg = _config(tp, dtype)
        bias = lin.bias is not None
        # on meta (parallel/meta_init.py) the layers are built there too: no host copy of the shard, nothing to copy
        with torch.device("meta") if dev.type == "meta" else contextlib.nullcontext():
            if column:  # with LoRA the input-gradient all-reduce moves into LoraColumn.forward (one for both)
                new = (LoraColumn if lora else Column)(lin.in_features, lin.out_features, config=cfg,
                                                       init_method=_noop_init, bias=bias, gather_output=False,
                                                       tp_group=tp_group, disable_grad_reduce=lora)
            else:
                new = (LoraRow if lora else Row)(lin.in_features, lin.out_features, config=cfg, init_method=_noop_init,
                                                 bias=bias, input_is_parallel=True, skip_bias_add=False,
                                                 tp_group=tp_group)
        new = new.to(dev)
        new.weight.requires_grad_(lin.weight.requires_grad)
        if bias:
            new.bias.requires_grad_(lin.bias.requires_grad)
        if dev.type != "meta":  # the slices of the plain weights; on meta, materialize fills these shards later
            with torch.no_grad():
                box = shard_box(new.weight.shape, 0 if column else 1, tp, r)
                new.weight.copy_(lin.weight.detach()[box_index(box, new.weight.shape)])
                if bias:
                    new.bias.copy_(lin.bias.detach()[box_index(shard_box(new.bias.shape, 0, tp, r), new.bias.shape)]
                                   if column else lin.bias.detach())
        if lora:
            for name, dim in attach_adapters(new, lin, column, tp, r).items():
                shard_dims[f"{path}.{name}"] = dim
        setattr(parent, attr, new)
        shard_dims[f"{path}.weight"] = 0 if column else 1
        if bias and column:
            shard_dims[f"{path}.bias"] = 0
    return shard_dims


def to_dtensor_state(params: dict[str, torch.Tensor], shard_dims: dict[str, int], tp_mesh: DeviceMesh) -> dict[str, torch.Tensor]:
    """View local megatron shards as DTensors (sharing storage) so DCP can reshard them."""
    return {k: DTensor.from_local(v.detach(), tp_mesh, [Shard(shard_dims[k])], run_check=False) if k in shard_dims else v
            for k, v in params.items()}


def _shard_of(v: torch.Tensor, dim: int, tp: int, rank: int, like: torch.Tensor) -> torch.Tensor:
    """This rank's local shard from a DTensor (any layout) or a full/local plain tensor."""
    if isinstance(v, DTensor):
        return v.to_local() if v.to_local().shape == like.shape else v.full_tensor().chunk(tp, dim=dim)[rank]
    return v if v.shape == like.shape else v.chunk(tp, dim=dim)[rank]


def shard_placements(dims: int | tuple[int, ...]) -> list[Shard]:
    """``Shard`` placements of a plain shard cut on ``dims``: one dim over a 1-D mesh, or one per mesh dimension."""
    return [Shard(d) for d in dims] if isinstance(dims, tuple) else [Shard(dims)]


def local_shard(v: torch.Tensor, dims: int | tuple[int, ...], mesh: DeviceMesh, like: torch.Tensor) -> torch.Tensor:
    """This rank's local shard, cut on ``dims`` over ``mesh``, from a DTensor (any layout) or a full/local tensor."""
    if isinstance(dims, int) and mesh.ndim == 1:
        return _shard_of(v, dims, mesh.size(), mesh.get_local_rank(), like)
    if isinstance(v, DTensor):
        if v.to_local().shape == like.shape and list(v.placements) == shard_placements(dims):
            return v.to_local()
        v = v.full_tensor()
    if v.shape == like.shape:
        return v
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(v.shape, mesh, shard_placements(dims))
    return v[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def install_state_hooks(module: nn.Module, shards: dict[str, tuple[int | tuple[int, ...], DeviceMesh]]) -> None:
    """Make ``module.state_dict()`` show megatron shards as DTensors and ``load_state_dict`` accept
    DTensors or full tensors, so ``torch.distributed.checkpoint`` (and the trainer's checkpoints)
    reshard megatron layouts like any other. ``shards`` maps a parameter name to (dim, tp mesh), or to
    (dims, mesh) with one dim per mesh dimension (expert-parallel x expert-tp shards)."""

    def post(_: nn.Module, state: dict, prefix: str, __: dict) -> None:
        for name, (dim, mesh) in shards.items():
            k = prefix + name
            if k in state and not isinstance(state[k], DTensor):
                state[k] = DTensor.from_local(state[k], mesh, shard_placements(dim), run_check=False)

    def pre(mod: nn.Module, state: dict, prefix: str, *_: object) -> None:
        params = dict(mod.named_parameters())
        for name, (dim, mesh) in shards.items():
            k = prefix + name
            if k in state:
                state[k] = local_shard(state[k], dim, mesh, params[name])

    module.register_state_dict_post_hook(post)
    module.register_load_state_dict_pre_hook(pre)
