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

With ``init="keyed"`` (models/init.py; the default on CUDA) nothing is replayed: each rank draws only the
tiles of its own shards, on its device, from generators keyed by (seed, parameter name, tile), and the
one-process ``build_model(cfg, seed=seed, init="keyed")`` holds the same values. The host allocates nothing
but the (meta) module tree; the device holds its shards plus one tile at a time.

Supported: every layout of the torch runtime, dense or MoE, under both schemes and both tp backends:

- Expert-parallel shards and megatron-core tp shards are plain tensors cut by hand: the runtime records each one's
  place in the full tensor at the cut (its ``shard_boxes``: ``shard_box`` for megatron-core, ``ep_boxes`` for the
  experts, expert tp and their adapters included), and both schemes fill that box.
- megatron-core tp: ``apply_megatron_tp`` builds its ``ColumnParallelLinear``/``RowParallelLinear`` on meta
  too (``use_cpu_initialization`` allocates with the default device, here meta; ``perform_initialization`` is
  off) and skips the copy of the plain weights' slices; the parameters keep the plain names (``weight``,
  ``bias``) and their local shape, so their values are the slices the copy would have taken. The attributes
  megatron-core sets on its Parameter objects survive ``to_empty`` (``_to_empty``).
- ``init_from`` (a Hugging Face checkpoint), under both tp backends: the runtime allocates the shards as above but
  draws nothing (``init="pretrained"``), then ``load_pretrained_into`` reads each rank's slices straight from the
  safetensors files (strict: every parameter gets its slice, or the run is refused): a DTensor shard's
  from its placements, a megatron-core shard's from the same ``shard_box`` the initialisation filled, an expert
  shard's from its ``ep_boxes`` entry. No rank
  holds the whole model, whatever the backend.
- Per-layer memory savers the distributed runtime applies (``apply_plan_savers``): they go onto the meta model
  like onto a full one because they neither add parameters nor draw from the RNG when applied. FP8
  activations and FP8 GEMMs change the classes of existing modules; WTA-CRS changes the class of existing
  linears and keeps only a seed (its generator is created, seeded by that seed alone, at its first forward).
  So parameter names, shapes and the stream the one-process model draws are those of the saver-free model;
  the replay (on a fresh saver-free meta reference) and the keyed specs hold for them unchanged, and the
  values equal the one-process model with the same savers and seed, under ``stream`` and ``keyed`` alike.
  The savers that do add parameters never reach this runtime: MEFT (reversible blocks, adapters drawn from
  the global stream at conversion, a probing forward to pick the reversible depth) and LeMo are refused by it
  (``train/build.py``, ``parallel/support.py``) and run in one process on a fully built model.

LoRA adapters (``lora:`` of the trainer: dp, tp of both backends, pp) are added to the meta model before the layout
and skipped here: ``memory.lora.init_adapters`` fills them after the base, with the values the one-process
``apply_lora(seed=...)`` draws (keyed by seed and module name, not from the stream); a tp-sharded A or B receives its
slice of the full tensor like any other shard (a DTensor's from its placements, a megatron-core one's from its
``shard_box``, an ep shard of the expert adapters' from its ``ep_boxes`` entry: all passed in the runtime's boxes).

A parameter the one-process model does not initialise (a future saver or layout adding one) is an error under
both schemes (``init_keyed``: no spec; the replay: no step), never left with ``to_empty``'s garbage: such a
module must first get its ``init_specs`` entry and ``init_steps`` place in the one-process model. DeepSpeed
(``parallel/deepspeed_backend.py``) builds the full model first (on the host with ``stream``, on the device
with ``keyed``).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from meshwright.config import ModelConfig
from meshwright.memory.lora import is_adapter_param
from meshwright.models import build_model
from meshwright.models.hf_weights import Box  # (global shape, offset of the local tensor in it)
from meshwright.models.init import init_keyed
from meshwright.models.moe import GroupedExperts
from meshwright.parallel.expert_parallel import ExpertParallelExperts
from meshwright.plan import Plan



def supports_meta_init(cfg: ModelConfig, plan: Plan, tp_backend: str, init_from: str | None = None) -> bool:
    """Whether this model and layout materialise from ``meta`` (see the module docstring): every layout of both tp
    backends, per-layer savers included (they change module classes, not parameters or the RNG stream), with or
    without ``init_from`` (pretrained weights are read per shard after the layout, megatron-core's by box)."""
    return tp_backend in ("dtensor", "megatron")


def shard_box(local_shape: Iterable[int], dim: int, parts: int, index: int) -> Box:
    """The box of a plain tensor shard cut by hand: part ``index`` of ``parts`` equal parts along ``dim``
    (megatron-core's tp partitions). The one definition of a megatron shard's place: the copy from a plain
    weight (``megatron_tp``), the initialisation (``materialize``) and ``init_from`` (``load_pretrained_into``) use it."""
    shape = list(local_shape)
    offset = [0] * len(shape)
    offset[dim] = index * shape[dim]
    shape[dim] *= parts
    return tuple(shape), tuple(offset)


def ep_boxes(experts: ExpertParallelExperts, prefix: str) -> dict[str, Box]:
    """The boxes of one expert-parallel cut: {``prefix.w1`` ...: (global shape, offset)} of each plain shard the
    module holds -- its experts (dim 0) of w1/w3/w2, under expert tp only its hidden slice of them
    (``expert_tp.EXPERT_TP_DIMS``: w1/w3 by hidden columns, w2 by hidden rows), and its experts' rows of the expert
    LoRA adapters (``gate_up_proj``/``down_proj``'s ``lora_A``/``lora_B``, whole over tp).

    The runtime calls this once, at the cut (``DistributedRuntime._apply_layers``, right after ``apply_ep``), and
    records the result in its ``shard_boxes`` next to megatron-core's ``shard_box``es; random init (``materialize``),
    ``init_from``, ``lora.init_adapter`` and the adapters' draw read those, and the checkpoints' DTensor view of each
    shard is checked against them (``check_placement_box``). Nothing else derives an expert shard's place: at
    ZeRO-2/3 the experts are then FSDP'd over edp (``expert_fsdp.py``) and keep this box, each rank's DTensor piece
    placed inside it by its placements (``_copy_shard``, ``init_keyed``, ``init_from``; ``check_piece_box``)."""
    from meshwright.parallel.expert_tp import EXPERT_TP_DIMS

    out = {f"{prefix}.{w}": expert_box(experts, w, dim) for w, dim in EXPERT_TP_DIMS.items()}
    for attr in ("gate_up_proj", "down_proj"):
        adapter = getattr(experts, attr, None)
        if adapter is None:
            continue
        for w in ("lora_A", "lora_B"):
            local = getattr(adapter, w)
            out[f"{prefix}.{attr}.{w}"] = ((adapter.total_experts, *local.shape[1:]),
                                            (experts.first_expert,) + (0,) * (local.dim() - 1))
    return out


def expert_box(module: ExpertParallelExperts, w: str, tp_dim: int) -> Box:
    """The (global shape, offset) of an expert-parallel shard ``w`` of ``module``: its experts, its tp hidden slice."""
    local = getattr(module, w)
    r, t = module.tp_index
    shape, offset = [module.n_experts, *local.shape[1:]], [module.first_expert] + [0] * (local.dim() - 1)
    shape[tp_dim] *= t
    offset[tp_dim] = r * local.shape[tp_dim]
    return tuple(shape), tuple(offset)


def check_placement_box(name: str, box: Box, local_shape: Iterable[int], mesh: Any, dims: tuple[int, ...]) -> None:
    """The checkpoints show a plain shard as a DTensor (``Shard(d)`` for each d of ``dims`` over ``mesh``'s
    dimensions, megatron_tp.install_state_hooks): refuse to build where that view would put the shard anywhere
    but its recorded ``box`` (a checkpoint written from it would scramble the shards)."""
    from meshwright.parallel.megatron_tp import shard_placements

    local_shape = tuple(local_shape)
    placements = shard_placements(tuple(dims))
    whole = list(local_shape)
    for d, size in zip(dims, mesh.shape):
        whole[d] *= size
    shape, offset = compute_local_shape_and_global_offset(tuple(whole), mesh, placements)
    if tuple(whole) != tuple(box[0]) or tuple(offset) != tuple(box[1]) or tuple(shape) != local_shape:
        raise RuntimeError(f"{name}: its checkpoint view (global {tuple(whole)}, offset {tuple(offset)}) is not its "
                           f"box (global {tuple(box[0])}, offset {tuple(box[1])})")


def check_piece_box(name: str, box: Box, piece: DTensor, mesh: Any, placements: list[Any]) -> None:
    """A DTensor over a boxed plain shard (FSDP over an ep shard, ``expert_fsdp.py``) is shown to the checkpoints as
    a DTensor of the full tensor (``placements`` over ``mesh``, ``expert_fsdp.checkpoint_layout``): refuse to build
    where that view would put this rank's piece anywhere but where init and ``init_from`` place it -- inside its
    shard's ``box``, at its own placements' offset there (``_copy_shard``)."""
    _, inner = compute_local_shape_and_global_offset(piece.shape, piece.device_mesh, piece.placements)
    want = tuple(b + i for b, i in zip(box[1], inner))
    local_shape = tuple(piece.to_local().shape)
    shape, offset = compute_local_shape_and_global_offset(tuple(box[0]), mesh, placements)
    if tuple(offset) != want or tuple(shape) != local_shape:
        raise RuntimeError(f"{name}: its checkpoint view (offset {tuple(offset)}, shape {tuple(shape)}) is not its "
                           f"piece's place in its box (offset {want}, shape {local_shape}; box global "
                           f"{tuple(box[0])}, offset {tuple(box[1])})")


def _cpu_twin(module: nn.Module) -> nn.Module:
    """A CPU copy of a (meta) module with uninitialised storage: the values are drawn next."""
    return copy.deepcopy(module).to_empty(device="cpu")


def box_index(box: Box, local_shape: Iterable[int]) -> tuple[slice, ...]:
    """The slices of the full tensor a local tensor of ``local_shape`` at ``box`` holds."""
    return tuple(slice(o, o + n) for o, n in zip(box[1], local_shape))


@torch.no_grad()
def _copy_shard(param: torch.Tensor, full: torch.Tensor, box: Box | None = None) -> None:
    """Copy this rank's part of ``full`` into ``param``: its ``box`` (a shard cut by hand), then, for a DTensor
    (over the whole tensor or over a boxed shard), its placements' part."""
    if box is not None:
        full = full[box_index(box, param.shape)]
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
        local = param.to_local()
        local.copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
    else:
        param.copy_(full)


def _to_empty(chunks: list[nn.Module], device: torch.device) -> None:
    """``to_empty`` on every chunk, keeping tied parameters tied (``to_empty`` gives each owning module its own
    tensor: a tied head would drift from its embedding) and the attributes set on the Parameter objects (our
    expert-shard mark, megatron-core's ``allreduce``/``partition_dim``...): ``to_empty`` makes new ones."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for chunk in chunks:
        for module in chunk.modules():
            for key, p in module._parameters.items():
                if p is not None:
                    owners.setdefault(id(p), []).append((module, key))
    old = {id(p): p for chunk in chunks for module in chunk.modules() for p in module._parameters.values() if p is not None}
    for chunk in chunks:
        chunk.to_empty(device=device)
    for pid, group in owners.items():
        first, key = group[0]
        new = getattr(first, key)
        for module, other in group[1:]:
            setattr(module, other, new)
        for attr, value in vars(old[pid]).items():
            setattr(new, attr, value)


@torch.no_grad()
def materialize(chunks: Iterable[nn.Module], cfg: ModelConfig, seed: int, device: torch.device,
                init: str = "stream", boxes: dict[str, Box] | None = None) -> dict[nn.Parameter, nn.Parameter]:
    """Allocate ``chunks`` (stages cut from a meta Decoder, already sharded) on ``device`` and fill them with
    the one-process model's initial values for ``seed`` under ``init`` (``stream`` or ``keyed``; ``pretrained``: drawn
    from nothing, for ``init_from``, whose strict per-shard load then fills every parameter or refuses). ``boxes``:
    {name: (global shape, offset)} of the shards cut by hand, the runtime's ``shard_boxes`` (megatron-core tp's
    ``shard_box``, expert parallelism's ``ep_boxes``): a plain parameter smaller than the full model's without one is an
    error (``check_boxes``). ``to_empty`` replaces Parameter objects, so this returns {meta parameter: its
    materialised replacement} for lists built before (gradient buckets)."""
    chunks = list(chunks)
    before = {n: p for chunk in chunks for n, p in chunk.named_parameters()}
    _to_empty(chunks, device)
    every: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        every.update(dict(chunk.named_parameters()))
    live = {n: p for n, p in every.items() if not is_adapter_param(n)}  # LoRA's: memory.lora.init_adapters
    ref = build_model(cfg, device="meta")
    boxes = boxes or {}
    check_boxes(live, dict(ref.named_parameters()), boxes)
    if init in ("keyed", "pretrained"):
        torch.manual_seed(seed)  # nothing is drawn from it here, but later consumers (dropout) start seeded as before
        if init == "keyed":
            init_keyed(live.items(), ref.init_specs(), seed, boxes)
    else:
        _replay_stream(ref, live, seed, boxes)
    for chunk in chunks:  # non-persistent buffers (RoPE tables) are computed, not drawn
        if getattr(chunk, "rope_cos", None) is not None:
            chunk.reset_rope()
    return {old: every[n] for n, old in before.items()}


def check_boxes(live: dict[str, torch.Tensor], full: dict[str, torch.Tensor], boxes: dict[str, Box]) -> None:
    """Every plain parameter that is not the full model's whole tensor has a box, and every box's global shape is the
    full model's: without a box a shard would be filled (and loaded) as the full tensor's first rows, silently."""
    for name, p in live.items():
        want = full.get(name)
        if want is None:
            continue
        box = boxes.get(name)
        if box is not None:
            if tuple(box[0]) != tuple(want.shape):
                raise RuntimeError(f"{name}: its box's global shape {tuple(box[0])} is not the model's "
                                   f"{tuple(want.shape)}")
        elif not isinstance(p, DTensor) and tuple(p.shape) != tuple(want.shape):
            raise RuntimeError(f"{name}: a shard {tuple(p.shape)} of the model's {tuple(want.shape)} with no box "
                               f"(whatever cut it must record one in the runtime's shard_boxes)")


def _replay_stream(ref: nn.Module, live: dict[str, torch.Tensor], seed: int, boxes: dict[str, Box]) -> None:
    """The one-process CPU stream, module by module; each rank keeps the slices it owns (module docstring)."""
    torch.manual_seed(seed)
    for module in ref.modules():  # the constructors' inits, in construction order: drawn, then overwritten
        if isinstance(module, (nn.Linear, nn.Embedding)):
            _cpu_twin(module).reset_parameters()
        elif isinstance(module, GroupedExperts):  # its constructor calls init_weights
            _cpu_twin(module).init_weights()
    filled: set[str] = set()
    for path, init in ref.init_steps():
        twin = _cpu_twin(ref.get_submodule(path))
        init(twin)
        for name, full in twin.named_parameters():
            target = live.get(f"{path}.{name}")
            if target is not None:
                _copy_shard(target, full, boxes.get(f"{path}.{name}"))
                filled.add(f"{path}.{name}")
    missing = sorted(set(live) - filled)
    if missing:  # a parameter the one-process model does not have (a module added by a layout or a saver)
        raise KeyError(f"no stream initialiser for parameters {missing[:5]}")
