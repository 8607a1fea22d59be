"""Mixture-of-Experts feed-forward block: top-k softmax router, capacity dropping, SwiGLU experts.

The block is split into three stages so expert parallelism can replace only the middle one:

1. ``route``   -- router logits -> top-k experts and gate weights per token, the capacity decision
   (which token-expert assignments are kept), the auxiliary losses and router statistics;
2. ``experts`` -- a module called as ``experts(tokens_sorted_by_expert, counts_per_expert)``;
   ``GroupedExperts`` runs all experts locally, ``meshwright.parallel.expert_parallel`` swaps in a
   module that ships tokens to the rank holding their expert with an all-to-all and back;
3. ``combine`` -- weighted scatter-add of expert outputs back onto their tokens.

Semantics (all deterministic given the inputs):

- gating: softmax over all experts, then top-k. With top_k > 1 the k weights are renormalised to
  sum to 1 (Mixtral); with top_k = 1 the raw probability is the gate (Switch), so the router gets a
  gradient from the language-model loss.
- capacity: with ``capacity_factor`` c each expert takes at most C = ceil(c * T * top_k / E) of the T
  tokens of one forward call. Priority follows GShard: every token's first choice before any second
  choice, and within one choice slot, earlier tokens first. A dropped assignment contributes zero
  (the block's residual connection carries the token through). ``capacity_factor=None`` drops nothing.
- load-balancing loss (Switch / GShard form): E * sum_e f_e * P_e, where f_e is the fraction of the
  T*top_k assignments (before dropping) that chose expert e and P_e the mean router probability of e.
  It equals 1 for perfectly uniform routing.
- router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.
- ``last_aux_loss`` = aux_loss_coef * balance + z_loss_coef * z; ``Decoder.aux_loss()`` sums it
  over layers. Routing statistics of the last forward are kept (detached) in ``last_stats``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from meshwright.config import ModelConfig
from meshwright.errors import invalid


@dataclass
class Routing:
    """Result of routing T tokens: the kept assignments sorted by expert, plus losses and counts."""

    token_idx: torch.Tensor  # (A,) token of each kept assignment, sorted by expert (stable)
    expert_idx: torch.Tensor  # (A,) expert of each kept assignment (non-decreasing)
    weights: torch.Tensor  # (A,) gate weight of each kept assignment (differentiable)
    counts: torch.Tensor  # (E,) kept assignments per expert (int64)
    routed_counts: torch.Tensor  # (E,) assignments per expert before capacity dropping
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    dropped: int  # assignments dropped by the capacity limit
    capacity: int | None


def expert_capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float | None) -> int | None:
    """Per-expert capacity C = ceil(c * T * k / E), or None (no dropping)."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


def load_balancing_loss(probs: torch.Tensor, topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch/GShard balance loss E * sum_e f_e * P_e (f from the top-k choices, P mean probability)."""
    counts = torch.bincount(topk_idx.flatten(), minlength=n_experts).to(probs.dtype)
    f = counts / topk_idx.numel()
    p = probs.mean(dim=0)
    return n_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean_t logsumexp(logits_t)^2 (keeps router logits small and stable)."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def route(logits: torch.Tensor, top_k: int, capacity_factor: float | None) -> Routing:
    """Turn router logits (T, E) into kept, expert-sorted assignments; see the module docstring."""
    n_tokens, n_experts = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_i = torch.topk(probs, top_k, dim=-1)  # (T, k)
    weights = top_p / top_p.sum(dim=-1, keepdim=True) if top_k > 1 else top_p
    balance = load_balancing_loss(probs, top_i, n_experts)
    z = router_z_loss(logits)
    # Assignment a = slot * T + token: all first choices come before any second choice (GShard priority).
    flat_e = top_i.t().reshape(-1)
    flat_t = torch.arange(n_tokens, device=logits.device).repeat(top_k)
    flat_w = weights.t().reshape(-1)
    routed = torch.bincount(flat_e, minlength=n_experts)
    cap = expert_capacity(n_tokens, n_experts, top_k, capacity_factor)
    if cap is not None:
        onehot = F.one_hot(flat_e, n_experts)
        position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # rank of a among its expert's assignments
        keep = position < cap
        flat_e, flat_t, flat_w = flat_e[keep], flat_t[keep], flat_w[keep]
    order = torch.sort(flat_e, stable=True).indices
    counts = torch.bincount(flat_e, minlength=n_experts)
    return Routing(token_idx=flat_t[order], expert_idx=flat_e[order], weights=flat_w[order], counts=counts,
                   routed_counts=routed, balance_loss=balance, z_loss=z,
                   dropped=int(routed.sum() - counts.sum()), capacity=cap)


class GroupedExperts(nn.Module):
    """``n`` SwiGLU experts with stacked weights, so expert parallelism can slice them along dim 0.

    Layout per expert follows nn.Linear (out, in): w1, w3 are (n, hidden, d_model) and w2 is
    (n, d_model, hidden); expert tensor parallelism (``parallel/expert_tp.py``) shards w1/w3 on dim 1 and w2 on
    dim 2 (DTensors; the math runs on the local shards) and sets ``tp_index`` = (tp rank, tp size).
    """

    def __init__(self, n_experts: int, d_model: int, hidden: int, std: float = 0.02, out_std: float = 0.02) -> None:
        super().__init__()
        self.n_experts, self.d_model, self.hidden = n_experts, d_model, hidden
        self.std, self.out_std = std, out_std
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        # the experts' math as a parameter-free module (state-dict keys unchanged): under compile: true it is
        # compiled apart when the block cannot be compiled whole (train/compile.py, compile_moe_block)
        self.mlp = ExpertMLP()
        # LoRA on the stacked weights (memory/lora.py ``ExpertAdapter``, PEFT's target_parameters): None unless adapted
        self.gate_up_proj: nn.Module | None = None
        self.down_proj: nn.Module | None = None
        self.tp_index = (0, 1)  # (rank, size) of the tp group the hidden dim is split over (parallel/expert_tp.py)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.w1, std=self.std)
        nn.init.normal_(self.w3, std=self.std)
        nn.init.normal_(self.w2, std=self.out_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (A, d_model) tokens grouped by expert (counts[e] rows for expert e, in order). Under expert tensor
        parallelism the weights are DTensors: the local shards compute this rank's partial output."""
        return expert_swiglu(x, counts, local_tensor(self.w1), local_tensor(self.w3), local_tensor(self.w2), self.mlp,
                             expert_adapters(self), self.tp_index)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (differentiable: its gradient comes back with the DTensor's placements), or ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


# one expert's low-rank update: (A (r, in), B (out, r), scale), or None where that weight is not adapted
LowRank = Optional[tuple[torch.Tensor, torch.Tensor, float]]


def expert_adapters(experts: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The (gate_up, down) adapters of an experts module (``GroupedExperts`` or its ep shard): PEFT's
    ``experts.gate_up_proj`` (one A shared by w1 and w3, B's rows gate then up) and ``experts.down_proj`` (w2)."""
    return getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)


def _low_rank(adapter: nn.Module | None, e: int, tp_index: tuple[int, int] = (0, 1), gate_up: bool = True) -> LowRank:
    """Expert ``e``'s (A, B, scale) as this tp rank's shard of the expert uses it: the adapters stay whole on every
    tp rank (they are small); under expert tp (rank r of t) the gate/up B keeps the rows of r's hidden slice of
    w1 and of w3, the down A the columns of r's slice of w2's input. Gradients of the other rows are zero here and
    summed over the tp group by the runtime."""
    if adapter is None:
        return None
    a, b = adapter.lora_A[e], adapter.lora_B[e]
    r, t = tp_index
    if t > 1 and gate_up:  # B (2 * hidden, rank): w1's rows, then w3's
        h = b.shape[0] // (2 * t)
        b = torch.cat([b[r * h:(r + 1) * h], b[t * h + r * h:t * h + (r + 1) * h]])
    elif t > 1:  # A (rank, hidden)
        h = a.shape[1] // t
        a = a[:, r * h:(r + 1) * h]
    return a, b, adapter.lora_scale


def swiglu_rows(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                gate_up: LowRank = None, down: LowRank = None) -> torch.Tensor:
    """One expert's SwiGLU on its rows: w2(silu(w1 x) * w3 x); with adapters each weight W acts as
    W + scale * B A (PEFT's ParamWrapper), computed low-rank: x W^T + scale * (x A^T) B^T."""
    if gate_up is None and down is None:
        return (F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()
    g, u = x @ w1.t(), x @ w3.t()
    if gate_up is not None:
        a, b, scale = gate_up
        d = ((x @ a.t()) @ b.t()) * scale
        g, u = g + d[:, :w1.shape[0]], u + d[:, w1.shape[0]:]
    y = F.silu(g) * u
    out = y @ w2.t()
    if down is not None:
        a, b, scale = down
        out = out + ((y @ a.t()) @ b.t()) * scale
    return out


class ExpertMLP(nn.Module):
    """``swiglu_rows`` as a parameter-free module (the weights are passed in). Why a module: under ``compile: true``
    expert parallelism compiles the experts' math alone (``nn.Module.compile``, dynamic row counts) while the
    token all-to-alls around it stay eager (train/compile.py), and hooks can see where it ran."""

    def forward(self, x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                gate_up: LowRank = None, down: LowRank = None) -> torch.Tensor:
        return swiglu_rows(x, w1, w3, w2, gate_up, down)


def expert_swiglu(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                  w2: torch.Tensor, mlp: Callable[..., torch.Tensor] = swiglu_rows,
                  adapters: tuple[nn.Module | None, nn.Module | None] = (None, None),
                  tp_index: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Apply expert e's SwiGLU (``mlp``) to its contiguous block of rows (a loop: CPU has no grouped GEMM);
    ``adapters``: the (gate_up, down) ``ExpertAdapter``s holding the same experts as w1/w3/w2, or None;
    ``tp_index``: (rank, size) when w1/w3/w2 are this rank's expert-tp shards (the output is then a partial sum)."""
    sizes = [int(c) for c in counts.tolist()]
    if len(sizes) != w1.shape[0]:
        raise ValueError(f"counts has {len(sizes)} entries for {w1.shape[0]} experts")
    outs = []
    for e, chunk in enumerate(torch.split(x, sizes)):
        if chunk.shape[0] == 0:
            outs.append(chunk.new_zeros(0, w2.shape[1]))
            continue
        gate_up, down = (_low_rank(a, e, tp_index, i == 0) for i, a in enumerate(adapters))
        outs.append(mlp(chunk, w1[e], w3[e], w2[e]) if gate_up is None and down is None
                    else mlp(chunk, w1[e], w3[e], w2[e], gate_up, down))
    out = torch.cat(outs) if outs else x.new_zeros(0, w2.shape[1])
    if sum(sizes) == 0 and torch.is_grad_enabled():
        # No token reached these experts (possible on an EP rank): keep the weights in the graph so
        # they get zero gradients rather than None, and gradient all-reduces stay aligned across ranks.
        out = out + 0.0 * (w1.sum() + w3.sum() + w2.sum())
        for a in adapters:
            if a is not None:
                out = out + 0.0 * (a.lora_A.sum() + a.lora_B.sum())
    return out


class MoE(nn.Module):
    """Drop-in replacement for a block's MLP: ``feed_forward`` of every ``moe_every``-th block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.n_experts < 1:
            raise invalid("n_experts", cfg.n_experts, "a positive integer for an MoE layer")
        if not 1 <= cfg.top_k <= cfg.n_experts:
            raise invalid("top_k", cfg.top_k, f"an integer in [1, n_experts={cfg.n_experts}]")
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.aux_loss_coef = cfg.aux_loss_coef
        self.z_loss_coef = cfg.z_loss_coef
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.experts: nn.Module = GroupedExperts(cfg.n_experts, cfg.d_model, cfg.expert_ffn_dim, cfg.init_std, out_std)
        self.last_aux_loss: torch.Tensor | None = None
        self.last_stats: dict[str, Any] | None = None
        self.init_std = cfg.init_std
        self.aux_loss_in_backward: float | None = None  # set by attach_aux_loss_to_backward
        # expert tensor parallelism (parallel/expert_tp.py): the tp group the experts' hidden dim is split over
        self.tp_group: Any = None

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.router.weight, std=self.init_std)
        if hasattr(self.experts, "init_weights"):
            self.experts.init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "meta":  # shape inference (pipelining) and meta-device planning: no routing
            return torch.zeros_like(x)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        r = route(self.router(flat), self.top_k, self.capacity_factor)
        tp = self.tp_group
        # under expert tp the experts return partial sums over the tp group (Megatron's f/g pair around them): their
        # input's gradient and the gate weights' (a product with partial outputs) are summed in backward, and the
        # combined output once in forward; routing and the router's gradient stay identical on every tp rank
        x_e = flat if tp is None else _SumGradOverTP.apply(flat, tp)
        # the gate weights' gradient is summed in a fixed (experts x tokens) layout: the collective's size must not
        # depend on the routing (torch.distributed.pipelining infers backward metadata from uninitialised inputs,
        # which the tp ranks may route differently; real tokens route identically)
        weights = r.weights if tp is None else _SumGradOverTPAt.apply(
            r.weights, r.expert_idx * flat.shape[0] + r.token_idx, self.n_experts * flat.shape[0], tp)
        expert_out = self.experts(x_e[r.token_idx], r.counts)
        gated = expert_out * weights.unsqueeze(-1).to(expert_out.dtype)
        # in the experts' dtype, as a dense MLP's output projection returns it (bf16 under autocast: index_add
        # wants one dtype, and the block's residual add upcasts it again)
        out = torch.zeros_like(flat, dtype=gated.dtype).index_add(0, r.token_idx, gated)
        if tp is not None:
            out = _SumOverTP.apply(out, tp)
        aux = self.aux_loss_coef * r.balance_loss + self.z_loss_coef * r.z_loss
        if self.aux_loss_in_backward is not None:
            # Pipeline stages never see the loss: inject d(aux) into backward instead (then
            # Decoder.aux_loss() returns None so the trainer does not count it twice).
            out = _AuxLossInBackward.apply(out, aux, self.aux_loss_in_backward)
            self.last_aux_loss = None
        else:
            self.last_aux_loss = aux
        self.last_stats = {
            "tokens": flat.shape[0],
            "tokens_per_expert": r.counts.detach().cpu(),
            "routed_per_expert": r.routed_counts.detach().cpu(),
            "dropped": r.dropped,
            "dropped_frac": r.dropped / max(1, flat.shape[0] * self.top_k),
            "capacity": r.capacity,
            "balance_loss": float(r.balance_loss.detach()),
            "z_loss": float(r.z_loss.detach()),
            "aux_loss": float(aux.detach()),
        }
        return out.reshape(shape)


class _SumGradOverTP(torch.autograd.Function):
    """Megatron's ``f``: identity in forward, the gradient summed over the tp group in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumGradOverTPAt(torch.autograd.Function):
    """``_SumGradOverTP`` for a 1-D tensor whose entries sit at distinct positions ``index`` of a fixed-size
    (``size``) layout: the gradient is placed there, summed over the tp group, and read back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor, size: int, group: Any) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.size, ctx.group = size, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        import torch.distributed as dist

        (index,) = ctx.saved_tensors
        buf = grad.new_zeros(ctx.size).index_copy_(0, index, grad.contiguous())
        dist.all_reduce(buf, group=ctx.group)
        return buf[index], None, None, None


class _SumOverTP(torch.autograd.Function):
    """Megatron's ``g``: the partial outputs summed over the tp group in forward, identity in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad, None


class _AuxLossInBackward(torch.autograd.Function):
    """Identity on the block output whose backward also seeds d(aux)/d(aux) = scale.

    Megatron-Core's MoEAuxLossAutoScaler trick: the auxiliary loss reaches the router through the
    block's own backward, so it works where the loss function cannot see it (pipeline stages).
    """

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


def attach_aux_loss_to_backward(model: nn.Module, scale: float = 1.0) -> int:
    """Make every MoE block add ``scale * aux_loss`` to the objective through backward; returns the
    number of blocks. Use under pipeline parallelism (loss_fn sees only the last stage's output);
    ``scale`` is the aux loss's weight in the loss being differentiated (1.0 when the schedule
    averages micro-batches itself, as torch.distributed.pipelining does with scale_grads=True).
    Logged values stay in ``last_stats['aux_loss']``."""
    blocks = moe_layers(model)
    for m in blocks.values():
        m.aux_loss_in_backward = float(scale)
    return len(blocks)


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """Name -> MoE block for every MoE layer in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def router_stats(model: nn.Module, group: Any = None) -> dict[str, Any]:
    """Router statistics of the last forward for the run log (JSON-friendly).

    With a process group, token counts are summed over it first (e.g. the data-parallel group, to
    log the global picture rather than one rank's shard).
    """
    layers = moe_layers(model)
    per_layer: dict[str, Any] = {}
    tot_tokens = tot_dropped = 0
    balance = []
    for name, m in layers.items():
        s = m.last_stats
        if s is None:
            continue
        counts = s["tokens_per_expert"].clone().to(torch.float64)
        nums = torch.tensor([float(s["tokens"]), float(s["dropped"]), s["balance_loss"], s["z_loss"]], dtype=torch.float64)
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(counts, group=group)
            dist.all_reduce(nums, group=group)
            nums[2:] /= dist.get_world_size(group)
        tokens, dropped = int(nums[0]), int(nums[1])
        per_layer[name] = {"tokens_per_expert": [int(c) for c in counts.tolist()],
                           "dropped_frac": dropped / max(1, tokens * m.top_k),
                           "balance_loss": float(nums[2]), "z_loss": float(nums[3])}
        tot_tokens += tokens * m.top_k
        tot_dropped += dropped
        balance.append(float(nums[2]))
    return {"moe_layers": per_layer,
            "moe_dropped_frac": tot_dropped / max(1, tot_tokens),
            "moe_balance_loss": sum(balance) / len(balance) if balance else None}
