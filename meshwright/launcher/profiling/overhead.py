"""Framework overhead of the runtime's parallel layers, measured under torchrun.

The cost model's terms are compute (FLOPs / achieved rate) and communication (alpha-beta). What a
real runtime adds on top, per layer and microbatch, is neither: DTensor's per-op dispatch and
redistribution in a tensor-parallel block, FSDP2's pre/post hooks, copy-in/copy-out and gradient
bookkeeping. On GPUs it is a launch-bound tail; on a CPU with gloo it dominates small models (a tp=2
block of ``tiny`` costs 2x the unsharded block here). So ``meshwright profile model`` run under
torchrun times the very modules the runtime builds (``apply_tp`` with and without SP, ``apply_fsdp``
at ZeRO-2/3) next to the plain block holding the same shard, at every (batch, seq) point of the
profile, and times the collectives the cost model counts for that layout on their own (same groups,
same sizes). The planner keeps runtime - plain - collectives as a fitted per-layer overhead
(``overhead_fits``); the communication itself is re-predicted from the plan's links, so a profile taken
on one node still serves a plan for many.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from meshwright.config import ModelConfig
from meshwright.launcher.planner import cost_model as cm
from meshwright.launcher.profiling.blocks import rope_for, shard_block
from meshwright.launcher.profiling.hardware import _sync as sync  # GPU kernels and NCCL collectives are async
from meshwright.models.decoder import Block
from meshwright.parallel.data_parallel import apply_fsdp
from meshwright.parallel.tensor_parallel import apply_tp


def _fwd_bwd(block: nn.Module, x: torch.Tensor, rope: Any) -> Callable[[], None]:
    def run() -> None:
        block(x, rope).sum().backward()
    return run


def _time_pair(first: Callable[[], None], second: Callable[[], None], iters: int, device: torch.device) -> tuple[float, float]:
    """Median seconds of two functions timed alternately (so drifting load hits both alike), every rank
    starting each sample together, after one warm-up call of each."""
    import time


    first()
    second()
    sync(device)
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(iters):
        for fn, out in ((first, samples[0]), (second, samples[1])):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - t0)
    return tuple(sorted(s)[len(s) // 2] for s in samples)  # type: ignore[return-value]


def _layouts(cfg: ModelConfig, index: int, tps: list[int], zeros: list[int], world: int) -> list[dict[str, Any]]:
    """The (tp, sp, zero) layouts to time: every profiled tp > 1 that divides the world (with and without
    SP on dense blocks), and ZeRO-2/3 over all ranks at tp 1."""
    out = []
    for tp in sorted(set(tps)):
        if tp > 1 and world % tp == 0:
            for sp in ((False,) if cfg.is_moe_layer(index) else (False, True)):
                out.append({"tp": tp, "sp": sp, "zero": 0, "group_size": tp})
    for z in zeros:
        out.append({"tp": 1, "sp": False, "zero": z, "group_size": world})
    return out


def _build(cfg: ModelConfig, index: int, layout: dict[str, Any], device: torch.device) -> tuple[nn.Module, nn.Module, Any]:
    """(runtime module, plain module holding the same local shard, its process group) for one layout."""
    from torch.distributed.device_mesh import init_device_mesh


    torch.manual_seed(0)
    world = dist.get_world_size()
    if layout["zero"] >= 2:
        mesh = init_device_mesh(device.type, (world,))
        return apply_fsdp(Block(cfg, index).to(device), mesh, layout["zero"]), Block(cfg, index).to(device), mesh.get_group()
    tp = layout["tp"]
    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))["tp"]
    return (apply_tp(Block(cfg, index).to(device), mesh, layout["sp"]), shard_block(cfg, index, tp).to(device),
            mesh.get_group())


def _reduce_scatter(out: torch.Tensor, full: torch.Tensor, group: Any) -> None:
    try:
        dist.reduce_scatter_tensor(out, full, group=group)
    except (RuntimeError, NotImplementedError):  # backends without it (older gloo): all-reduce, an upper bound
        dist.all_reduce(full, group=group)


def counted_collectives(cfg: ModelConfig, index: int, layout: dict[str, Any], tokens: int, group: Any,
                        device: torch.device) -> Callable[[], None]:
    """The collectives the cost model counts for one fwd+bwd of the layout, run on their own: tp without SP
    4 all-reduces of the activation, with SP 4 all-gather + reduce-scatter pairs (``tp_comm_s``); ZeRO-2
    one all-gather of the layer + one reduce-scatter of its gradients, ZeRO-3 two gathers + one scatter
    (``dp_comm_s``, one microbatch per step as in the profile loop)."""
    n = dist.get_world_size(group)
    if layout["zero"] >= 2:
        numel = -(-cfg.layer_params(index) // n) * n
        gathers, scatters = (1 if layout["zero"] == 2 else 2), 1
    else:
        numel = -(-tokens * cfg.d_model // n) * n
        gathers, scatters = (4, 4) if layout["sp"] else (0, 0)
    full = torch.zeros(numel, device=device)
    part = torch.zeros(numel // n, device=device)

    def run() -> None:
        if layout["zero"] < 2 and not layout["sp"]:
            for _ in range(4):
                dist.all_reduce(full, group=group)
            return
        for _ in range(gathers):
            dist.all_gather_into_tensor(full, part, group=group)
        for _ in range(scatters):
            _reduce_scatter(part, full, group)
    return run


def profile_runtime_overheads(cfg: ModelConfig, batch_sizes: list[int], seq_lens: list[int], tps: list[int],
                              device: torch.device, iters: int = 3, zeros: tuple[int, ...] = (2, 3)) -> list[dict[str, Any]]:
    """Collective (every rank calls it): fwd+bwd seconds of the runtime's TP / FSDP blocks and of the
    plain block with the same shard, per (batch, seq) point, for each layout of ``_layouts``."""

    world = dist.get_world_size()
    out = []
    for kind, index in (("dense", next((i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)), None)),
                        ("moe", next((i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)), None))):
        if index is None:
            continue
        for layout in _layouts(cfg, index, tps, list(zeros) if kind == "dense" else [], world):
            runtime_block, plain, group = _build(cfg, index, layout, device)
            points = []
            for b in batch_sizes:
                for s in seq_lens:
                    torch.manual_seed(1)  # the same input on every rank: tp blocks expect it replicated
                    x = torch.randn(b, s, cfg.d_model, device=device, requires_grad=True)
                    rope = rope_for(cfg, s, device)
                    runtime_s, plain_s = _time_pair(_fwd_bwd(runtime_block, x, rope), _fwd_bwd(plain, x, rope), iters, device)
                    comm = counted_collectives(cfg, index, layout, b * s, group, device)
                    comm_s = _time_pair(comm, comm, iters, device)[0]
                    points.append({"batch": b, "seq": s, "tokens": b * s, "runtime_s": runtime_s, "plain_s": plain_s,
                                   "comm_s": comm_s})
            out.append({"kind": kind, "layer_index": index, **layout, "points": points})
    return out


def overhead_key(tp: int, sp: bool, zero: int) -> str:
    """Name of a layout's overhead in ``Hardware.strategy_overheads``: tp2, tp2sp, zero2, zero3."""
    return f"zero{zero}" if zero >= 2 else f"tp{tp}{'sp' if sp else ''}"


def modelled_comm_s(cfg: ModelConfig, entry: dict[str, Any], tokens: float, hw: cm.Hardware) -> float:
    """The cost model's own communication estimate for one profiled point (what the overhead excludes)."""
    if entry["zero"] >= 2:
        params = cfg.layer_params(entry["layer_index"])
        per_mb, per_step = cm.dp_comm_s(params, entry["group_size"], entry["zero"], 1, hw)
        return per_mb + per_step  # one microbatch per step in the profile loop
    return cm.tp_comm_s(tokens, cfg, entry["tp"], entry["sp"], "none", hw)


def overhead_fits(profile: dict[str, Any], cfg: ModelConfig, hw: cm.Hardware, speed_ratio: float = 1.0
                  ) -> tuple[tuple[str, float, float], ...]:
    """Per-layer, per-microbatch overhead ``a + b*tokens`` (seconds) of each profiled layout: measured
    runtime block - plain block - its counted collectives timed on their own (profiles without that
    timing fall back to the modelled communication on ``hw``), least-squares over the points, clamped
    at 0 and divided by ``speed_ratio`` like the block times. Dense entries only (MoE layers reuse them)."""
    fits = []
    for e in profile.get("runtime_overheads", []):
        if e["kind"] != "dense":
            continue
        tok = np.array([p["tokens"] for p in e["points"]], dtype=float)
        extra = np.array([p["runtime_s"] - p["plain_s"] - (p["comm_s"] if "comm_s" in p else modelled_comm_s(cfg, e, p["tokens"], hw))
                          for p in e["points"]])
        A = np.stack([np.ones_like(tok), tok], axis=1)
        (a, b), *_ = np.linalg.lstsq(A, extra, rcond=None)
        if b < 0:  # no growth with size: a constant
            a, b = float(np.mean(extra)), 0.0
        fits.append((overhead_key(e["tp"], e["sp"], e["zero"]), max(float(a), 0.0) / speed_ratio, max(float(b), 0.0) / speed_ratio))
    return tuple(fits)
