"""Expert parallelism (EP): the experts of every MoE layer sharded across an ``ep`` group.

Layout. EP is carved out of data parallelism: the dp ranks of one pipeline stage / tp coordinate
are split into groups of ``ep`` consecutive ranks (the *ep group*, which together hold all experts,
``n_experts/ep`` each) and the ranks holding the same experts form the *expert-data-parallel*
(edp) group of size ``dp/ep``. Each rank still reads its own data shard; routing and the capacity
decision happen on the rank's own tokens (exactly as the one-process model routes that shard),
then tokens travel to the rank that owns their expert with an autograd-aware ``all_to_all_single``
(uneven splits) and come back the same way after the expert MLP.

Gradients. Backward through the all-to-all brings every ep peer's contribution to the local experts,
so after ``backward`` an expert weight holds the *sum* over its ep group of d(loss_r)/dw. Data
parallelism averages per-rank losses over all ``dp`` ranks, so expert grads are summed over the edp
group and divided by ``dp`` (``reduce_expert_grads``); every other parameter is averaged over the
full dp group as usual (DDP/FSDP over the dp group, with expert parameters excluded). At ZeRO-2/3 the experts are
FSDP-sharded over the edp group instead, the same sum and division done by the reduce-scatter (``expert_fsdp.py``).

Tensor parallelism. With tp > 1 (no sequence parallelism) all tp ranks of a group see the same tokens and
route them identically; the experts were split over tp first (``expert_tp.py``: w1/w3 by hidden columns, w2 by
hidden rows), so each rank ships its tokens to the ep peer of its own tp coordinate, which runs its hidden slice of
the local experts; the MoE block sums the partial outputs over tp after the return trip. The ep/edp groups are
formed per tp coordinate (``ep_groups_from_mesh`` does this for any mesh with a dp dimension). Pipeline stages each
form their own ep groups the same way.

Expert parameters stay plain (local) tensors of shape (n_experts/ep, hidden/tp, ...) under their original
names, so the optimiser and gradient clipping treat them like any other parameter (``tp_index`` says which
hidden slice; the runtime shows them to checkpoints as DTensors sharded over ep x tp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from meshwright.config import ModelConfig, divisors
from meshwright.errors import invalid
from meshwright.models.moe import ExpertMLP, GroupedExperts, expert_adapters, expert_swiglu, local_tensor, moe_layers


def check_ep(n_experts: int, ep: int, dp: int, field_name: str = "ep") -> None:
    """One-line errors for ep degrees that cannot work (same rules as ``plan.validate_plan``)."""
    if not isinstance(ep, int) or ep < 1:
        raise invalid(field_name, ep, "a positive integer")
    if n_experts < 1 and ep > 1:
        raise invalid(field_name, ep, "1 (the model has no experts)")
    if ep > 1 and n_experts % ep:
        raise invalid(field_name, ep, f"a divisor of n_experts={n_experts}: {divisors(n_experts)}")
    if dp % ep:
        raise invalid(field_name, ep, f"a divisor of dp={dp} (experts are sharded across data-parallel ranks): {divisors(dp)}")


# ---- communication -----------------------------------------------------------------------------

@dataclass
class A2AMeter:
    """Counts what this rank sends through the token all-to-alls (forward and backward)."""

    calls: int = 0
    elements: int = 0  # all rows x hidden sent, including the share a rank keeps for itself
    bytes_total: int = 0
    bytes_remote: int = 0  # bytes that actually leave the rank

    def add(self, t: torch.Tensor, send_splits: list[int], self_index: int) -> None:
        row = t.shape[1] * t.element_size() if t.dim() > 1 else t.element_size()
        self.calls += 1
        self.elements += t.numel()
        self.bytes_total += sum(send_splits) * row
        self.bytes_remote += (sum(send_splits) - send_splits[self_index]) * row

    def reset(self) -> None:
        self.calls = self.elements = self.bytes_total = self.bytes_remote = 0


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the reverse all_to_all (splits swapped)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any,
                meter: A2AMeter | None) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.meter = out_splits, in_splits, group, meter
        return _a2a(x.contiguous(), out_splits, in_splits, group, meter)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        g = _a2a(grad.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group, ctx.meter)
        return g, None, None, None, None


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any, meter: A2AMeter | None) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    if meter is not None:
        meter.add(x, in_splits, dist.get_rank(group))
    return out


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any,
               meter: A2AMeter | None = None) -> torch.Tensor:
    """Autograd-aware all_to_all_single along dim 0 with uneven splits."""
    return _AllToAll.apply(x, out_splits, in_splits, group, meter)


# ---- the expert-parallel experts module ------------------------------------------------------------

class ExpertParallelExperts(nn.Module):
    """Holds experts [rank*n_local, (rank+1)*n_local) of a layer; called like ``GroupedExperts``.

    ``forward(x, counts)`` takes this rank's tokens grouped by *global* expert and returns their
    outputs in the same order, after a round trip through the ep group.
    """

    def __init__(self, experts: GroupedExperts, group: Any, meter: A2AMeter | None = None) -> None:
        super().__init__()
        self.group = group
        self.ep = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.n_experts = experts.n_experts
        check_ep(self.n_experts, self.ep, self.ep)
        self.n_local = self.n_experts // self.ep
        lo, hi = self.ep_rank * self.n_local, (self.ep_rank + 1) * self.n_local
        self.first_expert = lo
        self.std, self.out_std = experts.std, experts.out_std
        # the shards keep the full weights' requires_grad: under LoRA the experts stay frozen (no grads, no
        # optimizer state), as the one-process model leaves them
        # under expert tp (experts.tp_index) the weights are DTensors: this rank's experts of its hidden slice
        self.tp_index = experts.tp_index
        for w in ("w1", "w3", "w2"):
            full = getattr(experts, w)
            setattr(self, w, nn.Parameter(local_tensor(full.detach())[lo:hi].clone(), requires_grad=full.requires_grad))
        self.meter = meter if meter is not None else A2AMeter()
        self.mlp = ExpertMLP()  # the local experts' math: compiled under compile: true, the all-to-alls stay eager
        # LoRA on the experts (memory/lora.py ExpertAdapter): this rank's experts' A and B rows, sharded and reduced
        # (over edp) with the experts they adapt
        gate_up, down = expert_adapters(experts)
        self.gate_up_proj = gate_up.shard(lo, hi) if gate_up is not None else None
        self.down_proj = down.shard(lo, hi) if down is not None else None
        for p in (self.w1, self.w3, self.w2, *(q for a in (self.gate_up_proj, self.down_proj) if a is not None
                                              for q in (a.lora_A, a.lora_B))):
            p._meshwright_expert = True  # type: ignore[attr-defined]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Re-initialisation is a no-op: the shard was cut from an initialised full layer."""

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ep, nl = self.ep, self.n_local
        counts = counts.to(torch.int64)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # [src, local expert]
        send = counts.view(ep, nl).sum(1).tolist()
        recv_grid = recv_counts.view(ep, nl)
        recv = recv_grid.sum(1).tolist()
        got = all_to_all(x, recv, send, self.group, self.meter)
        # Arrived ordered by (source rank, local expert); the experts want (local expert, source rank).
        chunk_sizes = recv_grid.flatten().tolist()
        chunks = torch.split(got, chunk_sizes)
        by_expert = [src * nl + e for e in range(nl) for src in range(ep)]
        grouped = torch.cat([chunks[i] for i in by_expert]) if chunks else got
        out = expert_swiglu(grouped, recv_grid.sum(0), self.w1, self.w3, self.w2, self.mlp, expert_adapters(self),
                            self.tp_index)
        if grouped.shape[0] == 0 and grouped.requires_grad:
            # No token reached this rank's experts: without this the dispatch all-to-all's output is used by
            # nothing, so backward skips its all-to-all here (an input-only backward, as pipelining computes a
            # stage's input gradients, skips the combine one too) while every peer runs it and waits for this
            # rank (a hang, or a peer's all-to-all paired with this rank's next collective).
            out = out + 0.0 * grouped.sum()
        out_chunks = torch.split(out, [chunk_sizes[i] for i in by_expert])
        back_order = [0] * len(by_expert)
        for pos, i in enumerate(by_expert):
            back_order[i] = pos
        ordered = torch.cat([out_chunks[p] for p in back_order]) if out_chunks else out
        return all_to_all(ordered, send, recv, self.group, self.meter)


# ---- applying EP and reducing gradients ------------------------------------------------------------

@dataclass
class EPGroups:
    """The two groups EP needs on this rank: experts are sharded over ``ep`` and replicated over ``edp``."""

    ep: Any
    edp: Any
    dp_size: int


def _group(g: Any) -> Any:
    """Accept a ProcessGroup or a 1-D DeviceMesh."""
    get = getattr(g, "get_group", None)
    return get() if callable(get) else g


def apply_ep(model: nn.Module, ep_group: Any, meter: A2AMeter | None = None,
             layers: Iterable[str] | None = None) -> A2AMeter:
    """Shard the experts of ``model``'s MoE layers over ``ep_group`` (a ProcessGroup or 1-D DeviceMesh).

    Call on the full plain model (after building it identically on every rank, before wrapping it
    for data parallelism); ``layers`` limits EP to some MoE blocks by module name. Returns the
    all-to-all meter shared by the layers (bytes sent, for the run log and the benchmark).
    """
    group = _group(ep_group)
    meter = meter if meter is not None else A2AMeter()
    blocks = moe_layers(model)
    wanted = set(layers) if layers is not None else None
    ep = dist.get_world_size(group)
    for name, block in blocks.items():
        if wanted is not None and name not in wanted:
            continue
        if not isinstance(block.experts, GroupedExperts):
            raise invalid(f"{name}.experts", type(block.experts).__name__, "GroupedExperts (EP applied twice?)")
        check_ep(block.n_experts, ep, ep, field_name=f"{name}.ep")
        block.experts = ExpertParallelExperts(block.experts, group, meter)
    return meter


def is_expert_param(param: torch.Tensor) -> bool:
    return bool(getattr(param, "_meshwright_expert", False))


def expert_param_names(model: nn.Module) -> list[str]:
    """Names of the sharded expert parameters (e.g. to exclude them from DDP's all-reduce)."""
    return [n for n, p in model.named_parameters() if is_expert_param(p)]


def reduce_expert_grads(model: nn.Module, edp_group: Any, dp_size: int) -> None:
    """Sum expert grads over the edp group and divide by dp: the mean of the dp ranks' losses."""
    group = _group(edp_group) if edp_group is not None else None
    for p in model.parameters():
        if not is_expert_param(p) or not p.requires_grad:  # frozen experts (LoRA) have no gradient to reduce
            continue
        if p.grad is None:  # no token reached these experts on this rank: its gradient is zero
            p.grad = torch.zeros_like(p)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(p.grad, group=group)
        p.grad.div_(dp_size)


def reduce_dense_grads(model: nn.Module, dp_group: Any) -> None:
    """Average non-expert grads over the full dp group (what DDP does; for runtimes without DDP)."""
    group = _group(dp_group)
    n = dist.get_world_size(group)
    for p in model.parameters():
        if is_expert_param(p) or not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if n > 1:
            g = _local(p.grad)
            dist.all_reduce(g, group=group)
            g.div_(n)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (tensor-parallel weights), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    if callable(to_local):
        with torch.no_grad():
            return to_local()
    return t


def ep_groups_from_mesh(mesh: Any, dp_dim: str, ep: int, timeout_s: float | None = None) -> EPGroups:
    """Build the ep and edp groups from a DeviceMesh that has a data-parallel dimension ``dp_dim``.

    Every rank must call this (``new_group`` is collective). Within each dp row of the mesh, ep
    groups are ``ep`` consecutive dp ranks and edp groups are the strided sets holding equal experts.
    ``timeout_s`` defaults to the run's process-group timeout (runtime.DEFAULT_TIMEOUT, MESHWRIGHT_PG_TIMEOUT_S): a
    shorter one of their own (120 s, before) failed an all-to-all whose peer a busy box had slowed, while the main
    group would have waited.
    """
    ranks = mesh.mesh
    names = list(mesh.mesh_dim_names or [])
    if dp_dim not in names:
        raise invalid("dp_dim", dp_dim, f"one of the mesh dimensions {names}")
    d = names.index(dp_dim)
    rows = ranks.movedim(d, -1).reshape(-1, ranks.shape[d]).tolist()
    dp = len(rows[0])
    if not isinstance(ep, int) or ep < 1 or dp % ep:
        raise invalid("ep", ep, f"a divisor of dp={dp} (the size of mesh dimension {dp_dim!r}): {divisors(dp)}")
    me = dist.get_rank()
    if timeout_s is None:
        from meshwright.parallel.runtime import DEFAULT_TIMEOUT  # here: runtime imports this module

        timeout = DEFAULT_TIMEOUT
    else:
        timeout = timedelta(seconds=timeout_s)
    mine_ep = mine_edp = None
    for row in rows:
        for i in range(dp // ep):
            members = row[i * ep:(i + 1) * ep]
            g = dist.new_group(members, timeout=timeout)
            if me in members:
                mine_ep = g
    for row in rows:
        for j in range(ep):
            members = row[j::ep]
            g = dist.new_group(members, timeout=timeout)
            if me in members:
                mine_edp = g
    return EPGroups(ep=mine_ep, edp=mine_edp, dp_size=dp)


# ---- cost-model terms ------------------------------------------------------------------------------

@dataclass
class EPCost:
    """Memory and communication terms of EP for one rank, per optimiser micro-step (fwd + bwd)."""

    ep: int
    n_moe_layers: int
    expert_params_per_layer: int  # full layer, all experts
    expert_params_per_rank: int  # all MoE layers, this rank's shard (/ ep)
    expert_param_bytes_per_rank: int
    a2a_bytes_per_layer: int  # sent by one rank in fwd+bwd, including its own share
    a2a_remote_bytes_per_layer: float  # expected share leaving the rank under balanced routing
    a2a_bytes_per_step: int  # all MoE layers
    a2a_seconds_per_step: float  # estimate with the given bandwidth/latency
    notes: dict[str, Any] = field(default_factory=dict)


def ep_cost_terms(cfg: ModelConfig, ep: int, tokens: int, bytes_per_elem: int = 4,
                  bw_gbps: float = 10.0, latency_us: float = 10.0, capacity_factor: float | None = None,
                  moe_layers_on_rank: int | None = None) -> EPCost:
    """EP's memory and time terms for the planner.

    ``tokens`` = tokens one rank routes per micro-batch (micro_batch * seq_len). Each token is sent
    to ``top_k`` experts: dispatch and combine each move tokens*top_k*d_model elements, and backward
    repeats both, so one rank sends 4*tokens*top_k*d_model*bytes per MoE layer, of which a fraction
    (ep-1)/ep leaves the rank under balanced routing. With a capacity factor c < 1 at most
    min(1, c) of the assignments travel. Time = remote bytes / bandwidth + 4*(ep-1) latencies.
    """
    check_ep(cfg.n_experts, ep, ep)
    n_layers = cfg.n_moe_layers if moe_layers_on_rank is None else moe_layers_on_rank
    per_layer = cfg.n_experts * 3 * cfg.d_model * cfg.expert_ffn_dim
    per_rank = n_layers * per_layer // ep
    kept = 1.0 if capacity_factor is None else min(1.0, capacity_factor)
    rows = math.floor(tokens * cfg.top_k * kept)
    a2a = 4 * rows * cfg.d_model * bytes_per_elem if ep > 1 else 0
    remote = a2a * (ep - 1) / ep
    seconds = n_layers * (remote / (bw_gbps * 1e9) + (4 * (ep - 1) * latency_us * 1e-6 if ep > 1 else 0.0))
    return EPCost(ep=ep, n_moe_layers=n_layers, expert_params_per_layer=per_layer, expert_params_per_rank=per_rank,
                  expert_param_bytes_per_rank=per_rank * bytes_per_elem, a2a_bytes_per_layer=a2a,
                  a2a_remote_bytes_per_layer=remote, a2a_bytes_per_step=a2a * n_layers,
                  a2a_seconds_per_step=seconds,
                  notes={"formula": "4 * tokens * top_k * d_model * bytes per MoE layer (dispatch+combine, fwd+bwd)"})


__all__ = ["A2AMeter", "EPCost", "EPGroups", "ExpertParallelExperts", "all_to_all", "apply_ep", "check_ep",
           "ep_cost_terms", "ep_groups_from_mesh", "expert_param_names", "is_expert_param",
           "reduce_dense_grads", "reduce_expert_grads"]
