"""Meta-device initialisation: build the model on ``meta``, apply the layout, then materialise each rank's
shards on its device, with the SAME values as the one-process ``build_model(cfg, seed=seed)``.

Why replay instead of per-parameter seeds: the one-process model draws every value from one CPU RNG
stream (the constructors' default inits, then ``Decoder.init_weights``); seeding each parameter by name
would change the one-process weights too (and every fp32 CPU trajectory). So the stream is replayed module
by module: for each module, in the one-process order, a CPU copy of just that module is materialised, drawn,
and the slice this rank owns (``compute_local_shape_and_global_offset`` of its DTensor, or the whole tensor
where it is replicated) is copied into the sharded parameter; the copy is dropped. The host holds one
module's full tensors at a time (the largest: the embedding or the head), never the whole model, and the
device holds only its shards. The cost is CPU time: every value of the model is drawn on every rank.

Supported: dense models with the DTensor TP backend and no per-layer savers (the other paths build the full
model on the host first, as before): megatron-core copies plain-Linear slices at wrap time, expert
parallelism slices experts by hand, and the savers swap modules with their own RNG draws.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from meshwright.config import ModelConfig
from meshwright.models import build_model
from meshwright.models.layers import rope_tables
from meshwright.plan import Plan


def supports_meta_init(cfg: ModelConfig, plan: Plan, tp_backend: str) -> bool:
    """Whether this model and layout materialise from ``meta`` (see the module docstring)."""
    savers = any(s.savers.fp8_act or s.savers.wta_crs or s.savers.lemo for s in plan.layer_strategies())
    return tp_backend == "dtensor" and not cfg.n_experts and not savers


def _cpu_twin(module: nn.Module) -> nn.Module:
    """A CPU copy of a (meta) module with uninitialised storage: the values are drawn next."""
    return copy.deepcopy(module).to_empty(device="cpu")


@torch.no_grad()
def _copy_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
        local = param.to_local()
        local.copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
    else:
        param.copy_(full)


@torch.no_grad()
def materialize(chunks: Iterable[nn.Module], cfg: ModelConfig, seed: int,
                device: torch.device) -> dict[nn.Parameter, nn.Parameter]:
    """Allocate ``chunks`` (stages cut from a meta Decoder, already sharded) on ``device`` and fill them with
    the one-process model's initial values for ``seed``. ``to_empty`` replaces Parameter objects, so this
    returns {meta parameter: its materialised replacement} for lists built before (gradient buckets)."""
    chunks = list(chunks)
    before = {n: p for chunk in chunks for n, p in chunk.named_parameters()}
    live: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        chunk.to_empty(device=device)
        live.update(dict(chunk.named_parameters()))
    ref = build_model(cfg, device="meta")
    torch.manual_seed(seed)
    for module in ref.modules():  # the constructors' default inits: drawn, then overwritten, as in one process
        if isinstance(module, (nn.Linear, nn.Embedding)):
            _cpu_twin(module).reset_parameters()
    for path, init in ref.init_steps():
        twin = _cpu_twin(ref.get_submodule(path))
        init(twin)
        for name, full in twin.named_parameters():
            target = live.get(f"{path}.{name}")
            if target is not None:
                _copy_shard(target, full)
    for chunk in chunks:  # non-persistent buffers (RoPE tables) are computed, not drawn
        if getattr(chunk, "rope_cos", None) is not None:
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=device)
            chunk.rope_cos.copy_(cos)
            chunk.rope_sin.copy_(sin)
    return {old: live[n] for n, old in before.items()}
