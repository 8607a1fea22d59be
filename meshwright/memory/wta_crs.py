"""WTA-CRS: unbiased sampled weight gradients that keep only k of the n token rows for backward.

Liu et al., NeurIPS 2023 ("Winner-Take-All Column Row Sampling"). For a linear layer y = x W^T + b
the forward and grad_input = G W stay exact; only grad_W = G^T X = sum_i g_i x_i^T is estimated from
k of the n token rows of the whole (flattened) batch, so autograd keeps k rows of X instead of n.

Estimator (given row probabilities q, sum q = 1, k = max(floor(keep_ratio * n), min_rows)):
  * a deterministic winner set C = the |C| rows with the highest q, |C| chosen to minimise the variance
    bound (1 - sum_C q)^2 / (k - |C|) (|C| = 0 is allowed and is plain column-row sampling);
  * k - |C| rows sampled with replacement from the residual distribution q_j / (1 - sum_C q), each
    weighted (1 - sum_C q) / ((k - |C|) q_j).
  E[estimate] = sum_C g_i x_i^T + sum_{j not in C} g_j x_j^T = G^T X for ANY q that is positive wherever
  x_j != 0, so the estimate is unbiased whatever proposal q we use.

Why a proposal, and which: the variance-optimal q_i is proportional to ||x_i|| ||g_i||, but the rows
to keep must be chosen in forward, before g exists. The reference implementation caches per-example
gradient norms from the previous epoch and is biased until then. Here q is a *proposal* known in
forward and the weights use the same q, so every step (the first included) is unbiased:
  * ``proposal="x"``: q_i proportional to ||x_i||.
  * ``proposal="cached"``: q_i = (1 - a) * ||x_i|| c_pos(i) / Z + a * ||x_i|| / Z', where c_pos is the
    mean gradient-row norm at each sequence position from this layer's previous backward and the
    defensive share a keeps q > 0 wherever x != 0. The first step (no cache) uses ||x_i|| alone.
Tensor parallelism: row norms of a feature-sharded X (and of a feature-sharded G) are all-reduced over
the tp group taken from the weight's DeviceMesh, and every rank uses the same seeded generator, so all
ranks of a tp group sample the same rows.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from meshwright.errors import ConfigError, invalid

DEFAULT_TARGETS: tuple[str, ...] = ("attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
PROPOSALS = ("x", "cached")
ALLOW_FLAG = "wta-crs"  # the planner may only switch WTA-CRS on with `--allow wta-crs`: it changes gradients
INDEX_BYTES = 8  # int64 row indices saved per kept row
WEIGHT_BYTES = 4  # fp32 estimator weight saved per kept row


# ---- validation and sizes --------------------------------------------------------------------------
def check_keep_ratio(keep_ratio: object, field: str = "wta_crs.keep_ratio") -> float:
    """A keep ratio must be a real number in (0, 1]; anything else is a one-line ConfigError."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not math.isfinite(keep_ratio) \
            or not 0.0 < keep_ratio <= 1.0:
        raise invalid(field, keep_ratio, "a number in (0, 1], e.g. 0.3 keeps 30% of the token rows")
    return float(keep_ratio)


def kept_rows(n: int, keep_ratio: float, min_rows: int = 8) -> int:
    """k = max(floor(keep_ratio * n), min_rows), never more than n."""
    return min(n, max(int(math.floor(keep_ratio * n + 1e-9)), min_rows))


def wta_crs_saved_bytes(n_tokens: int, in_features: int, keep_ratio: float, dtype_bytes: int = 4,
                        min_rows: int = 8) -> int:
    """Planner memory term: bytes one WTA-CRS linear keeps for backward (k rows + indices + weights).

    Exact when more than k rows are non-zero (always, in practice); an upper bound otherwise.
    keep_ratio=1 keeps the whole input (n_tokens * in_features * dtype_bytes) and nothing else.
    """
    keep_ratio = check_keep_ratio(keep_ratio)
    k = kept_rows(n_tokens, keep_ratio, min_rows)
    if k >= n_tokens:
        return n_tokens * in_features * dtype_bytes
    return k * (in_features * dtype_bytes + INDEX_BYTES + WEIGHT_BYTES)


def exact_saved_bytes(n_tokens: int, in_features: int, dtype_bytes: int = 4) -> int:
    """What an ``nn.Linear`` with a trainable weight keeps for backward: its whole input."""
    return n_tokens * in_features * dtype_bytes


# ---- the estimator ---------------------------------------------------------------------------------
@dataclass
class RowSample:
    """Which rows a step keeps and how each is weighted; ``n_winners`` rows are deterministic."""

    indices: torch.Tensor  # int64 (<= k,)
    weights: torch.Tensor  # float32 (<= k,)
    n_winners: int  # a 0-d device tensor from the sync-free sampler


def choose_winners(sorted_probs: torch.Tensor, k: int, total: float = 1.0) -> int:
    """|C| in [0, k-1] minimising the variance bound (total - sum_C q)^2 / (k - |C|).

    ``sorted_probs`` are the k largest probabilities in descending order.
    """
    c = torch.arange(k, device=sorted_probs.device, dtype=torch.float64)
    head = torch.cat([sorted_probs.new_zeros(1, dtype=torch.float64), sorted_probs[: k - 1].double().cumsum(0)])
    residual = (total - head).clamp_min(0.0)
    return int(torch.argmin(residual.pow(2) / (k - c)).item())


def wta_crs_sample(probs: torch.Tensor, k: int, generator: torch.Generator | None = None,
                   winners: bool = True) -> RowSample:
    """Draw the WTA-CRS row sample for probabilities ``probs`` (n,), summing to 1.

    ``winners=False`` forces |C| = 0: plain column-row sampling (k draws with replacement, weight
    1/(k q_j)), the baseline the paper improves on. Rows with q = 0 are never drawn; when at most k rows
    have q > 0 they are all kept with weight 1 and the estimate is exact.
    """
    probs = probs.float()
    positive = probs > 0
    n_pos = int(positive.sum().item())
    if n_pos <= k:
        idx = positive.nonzero().flatten()
        return RowSample(idx, torch.ones(idx.numel(), dtype=torch.float32, device=probs.device), idx.numel())
    top = torch.topk(probs, k)
    c = choose_winners(top.values, k, float(probs.double().sum().item())) if winners else 0
    win_idx = top.indices[:c]
    residual = probs.clone()
    residual[win_idx] = 0.0
    mass = residual.double().sum()
    drawn = torch.multinomial(residual, k - c, replacement=True, generator=generator)
    w = (mass / ((k - c) * residual[drawn].double())).float()
    idx = torch.cat([win_idx, drawn])
    weights = torch.cat([torch.ones(c, dtype=torch.float32, device=probs.device), w])
    return RowSample(idx, weights, c)


def wta_crs_sample_static(probs: torch.Tensor, k: int, generator: torch.Generator | None = None,
                          winners: bool = True) -> RowSample:
    """The same estimator as :func:`wta_crs_sample` with fixed shapes and no host synchronisation (GPUs).

    Always k rows: position p < |C| holds the p-th winner (weight 1), positions >= |C| hold draws with
    replacement from the residual distribution (weight (1 - sum_C q) / ((k - |C|) q_j)). |C| stays a device
    tensor: k draws are made and the first |C| are replaced by winners (the draws are i.i.d., so any k - |C|
    of them form the same estimator). When the winners hold all the mass (at most k rows have q > 0, or
    none do) the draws get weight 0 and the estimate is exact. ``n_winners`` is a 0-d device tensor.
    """
    probs = probs.float()
    top = torch.topk(probs, k)
    if winners:
        c = choose_winners_tensor(top.values, k, probs.double().sum())
    else:
        c = torch.zeros((), dtype=torch.int64, device=probs.device)
    is_win = torch.arange(k, device=probs.device) < c
    win_mask = torch.zeros_like(probs, dtype=torch.bool).scatter(0, top.indices, is_win)
    residual = probs.masked_fill(win_mask, 0.0)
    mass = residual.double().sum()
    has_mass = mass > 0
    safe = torch.where(has_mass, residual, torch.ones_like(residual))  # multinomial needs some mass
    drawn = torch.multinomial(safe, k, replacement=True, generator=generator)
    w = torch.where(has_mass, mass / ((k - c).double() * safe[drawn].double()), torch.zeros((), dtype=torch.float64,
                                                                                             device=probs.device))
    idx = torch.where(is_win, top.indices, drawn)
    weights = torch.where(is_win, torch.ones_like(w), w).float()
    return RowSample(idx, weights, c)  # type: ignore[arg-type]


def choose_winners_tensor(sorted_probs: torch.Tensor, k: int, total: torch.Tensor) -> torch.Tensor:
    """:func:`choose_winners` as a 0-d device tensor (no ``.item()``)."""
    c = torch.arange(k, device=sorted_probs.device, dtype=torch.float64)
    head = torch.cat([sorted_probs.new_zeros(1, dtype=torch.float64), sorted_probs[: k - 1].double().cumsum(0)])
    residual = (total - head).clamp_min(0.0)
    return torch.argmin(residual.pow(2) / (k - c))


def estimate_grad_weight(g2d: torch.Tensor, x2d_rows: torch.Tensor, sample: RowSample) -> torch.Tensor:
    """sum_s w_s g_{i_s} x_{i_s}^T from the kept rows ``x2d_rows`` (already gathered by the sample)."""
    gs = g2d.index_select(0, sample.indices) * sample.weights.to(g2d.dtype)[:, None]
    return gs.t() @ x2d_rows


def estimator_variance(x2d: torch.Tensor, g2d: torch.Tensor, probs: torch.Tensor, k: int, winners: bool = True) -> float:
    """Exact E||estimate - G^T X||_F^2 of the sampler with probabilities ``probs`` (deterministic).

    With C the winners, R = 1 - sum_C q and a_j = ||g_j|| ||x_j||:
    Var = (R * sum_{j not in C} a_j^2 / q_j - ||sum_{j not in C} g_j x_j^T||_F^2) / (k - |C|).
    """
    x, g, q = x2d.double(), g2d.double(), probs.double() / probs.double().sum()
    positive = q > 0
    if int(positive.sum()) <= k:
        return 0.0
    top = torch.topk(q, k)
    c = choose_winners(top.values, k, 1.0) if winners else 0
    rest = positive.clone()
    rest[top.indices[:c]] = False
    a2 = x[rest].pow(2).sum(1) * g[rest].pow(2).sum(1)
    mass = q[rest].sum()
    m = g[rest].t() @ x[rest]
    return float((mass * (a2 / q[rest]).sum() - m.pow(2).sum()) / (k - c))


# ---- the autograd function -------------------------------------------------------------------------
class _WTACRSLinearFn(torch.autograd.Function):
    """y = F.linear(x, W, b) exactly; backward: exact grad_x and grad_b, sampled grad_W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: "WTACRSLinear"):
        y = F.linear(x, weight, bias)
        ctx.layer = layer
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        if ctx.needs_input_grad[1]:
            x2d = x.reshape(-1, x.shape[-1])
            with torch.no_grad():
                sample = layer._draw(x2d, x.shape)
            ctx.n_winners = sample.n_winners
            ctx.save_for_backward(weight, x2d.index_select(0, sample.indices), sample.indices, sample.weights)
        else:  # frozen base (LoRA): grad_input needs only W, a parameter that lives anyway
            ctx.save_for_backward(weight)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        weight = ctx.saved_tensors[0]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # (casts are no-ops in fp32; they matter under autocast)
            grad_x = gy.matmul(weight.to(gy.dtype)).to(ctx.x_dtype)
        g2d = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[1]:
            _, xs, idx, w = ctx.saved_tensors
            grad_w = estimate_grad_weight(g2d, xs.to(g2d.dtype), RowSample(idx, w, ctx.n_winners)).to(weight.dtype)
            ctx.layer._observe_grad(g2d, ctx.x_shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2d.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None


# ---- the module ------------------------------------------------------------------------------------
class WTACRSLinear(nn.Linear):
    """Drop-in ``nn.Linear`` whose weight gradient is a WTA-CRS estimate from k of the n token rows.

    Built from an existing ``nn.Linear`` by :func:`apply_wta_crs` (parameters are shared, not copied).
    In eval mode, or with ``wta_enabled=False``, it is exactly ``nn.Linear``. A LoRA-adapted linear
    (``lora_A``/``lora_B`` attributes, frozen base) keeps its exact frozen product (which saves nothing)
    and samples the rows for ``lora_A``'s gradient instead.
    """

    keep_ratio: float
    min_rows: int
    proposal: str
    defensive: float
    wta_seed: int
    wta_enabled: bool
    sync_free: bool | None  # None: the sync-free sampler on CUDA inputs, the reference sampler elsewhere

    @classmethod
    def convert(cls, linear: nn.Linear, keep_ratio: float, min_rows: int = 8, proposal: str = "x",
                defensive: float = 0.1, seed: int = 0, sync_free: bool | None = None) -> "WTACRSLinear":
        """Turn ``linear`` into a WTA-CRS linear in place (names, parameters and hooks stay)."""
        if not isinstance(linear, nn.Linear):
            raise invalid("wta_crs.target", type(linear).__name__, "an nn.Linear")
        if not isinstance(linear, WTACRSLinear):
            base = type(linear)
            linear.__class__ = cls if base is nn.Linear else _mixin(cls, base)
        linear.configure(keep_ratio, min_rows, proposal, defensive, seed, sync_free)
        return linear  # type: ignore[return-value]

    def configure(self, keep_ratio: float, min_rows: int = 8, proposal: str = "x", defensive: float = 0.1,
                  seed: int = 0, sync_free: bool | None = None) -> None:
        self.keep_ratio = check_keep_ratio(keep_ratio)
        if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 1:
            raise invalid("wta_crs.min_rows", min_rows, "a positive integer")
        if proposal not in PROPOSALS:
            raise invalid("wta_crs.proposal", proposal, " or ".join(PROPOSALS))
        if isinstance(defensive, bool) or not isinstance(defensive, (int, float)) or not 0.0 < defensive <= 1.0:
            raise invalid("wta_crs.defensive", defensive, "a number in (0, 1] (share of the ||x||-only proposal)")
        self.min_rows, self.proposal, self.defensive, self.wta_seed = min_rows, proposal, float(defensive), int(seed)
        if sync_free not in (None, True, False):
            raise invalid("wta_crs.sync_free", sync_free, "null (auto: on CUDA), true or false")
        self.sync_free = sync_free
        self.wta_enabled = True
        self._generator: torch.Generator | None = None
        self._gnorm_cache: torch.Tensor | None = None
        self._tp_group: dist.ProcessGroup | None = None
        self._x_sharded = self._g_sharded = False
        self.last_indices: torch.Tensor | None = None

    # -- sampling state ---------------------------------------------------------------------------
    def reset_sampler(self, seed: int | None = None) -> None:
        """Restart the random stream (and forget cached gradient norms), e.g. for reproducible tests."""
        if seed is not None:
            self.wta_seed = int(seed)
        self._generator = None
        self._gnorm_cache = None

    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.wta_seed)
        return self._generator

    def _row_sq_norms(self, t2d: torch.Tensor, sharded: bool) -> torch.Tensor:
        sq = t2d.float().pow(2).sum(1)
        if sharded and self._tp_group is not None:
            dist.all_reduce(sq, group=self._tp_group)  # identical on every rank of the tp group
        return sq

    def probabilities(self, x2d: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Proposal q over the n rows (known in forward); see the module docstring."""
        xn = self._row_sq_norms(x2d, self._x_sharded).sqrt()
        total = xn.sum()
        q = xn / total.clamp_min(torch.finfo(xn.dtype).tiny)  # all-zero x: q = 0 (no host branch)
        cache = self._gnorm_cache
        if self.proposal == "cached" and cache is not None and len(shape) >= 3 and cache.numel() == shape[-2]:
            est = xn * cache.to(xn.device).repeat(x2d.shape[0] // shape[-2])
            est_sum = est.sum()
            mixed = (1.0 - self.defensive) * est / est_sum.clamp_min(torch.finfo(est.dtype).tiny) + self.defensive * q
            q = torch.where(est_sum > 0, mixed, q)
        return q

    def _draw(self, x2d: torch.Tensor, shape: torch.Size) -> RowSample:
        n = x2d.shape[0]
        k = kept_rows(n, self.keep_ratio, self.min_rows)
        if k >= n:  # keep_ratio=1 (or tiny inputs): the exact gradient
            sample = RowSample(torch.arange(n, device=x2d.device), torch.ones(n, device=x2d.device), n)
        else:
            static = self.sync_free if self.sync_free is not None else x2d.is_cuda
            sampler = wta_crs_sample_static if static else wta_crs_sample
            sample = sampler(self.probabilities(x2d, shape), k, self._gen(x2d.device))
        self.last_indices = sample.indices
        return sample

    def _observe_grad(self, g2d: torch.Tensor, x_shape: torch.Size) -> None:
        if self.proposal != "cached" or len(x_shape) < 3:
            return
        with torch.no_grad():
            gn = self._row_sq_norms(g2d, self._g_sharded).sqrt()
            self._gnorm_cache = gn.view(-1, x_shape[-2]).mean(0)

    # -- forward ----------------------------------------------------------------------------------
    def _sampled_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _WTACRSLinearFn.apply(x, weight, bias, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self.wta_enabled and self.training and torch.is_grad_enabled()
        if _is_dtensor(self.weight):
            if hasattr(self, "lora_A"):
                raise ConfigError("wta_crs with LoRA adapters under tensor parallelism is not supported; valid: tp=1")
            return self._forward_tp(x, active)
        if hasattr(self, "lora_A"):  # frozen base exact (saves nothing), sampled rows for lora_A's gradient
            base = F.linear(x, self.weight, self.bias)
            down = self._sampled_linear(x, self.lora_A, None) if active else F.linear(x, self.lora_A)
            return base + F.linear(down, self.lora_B) * self.lora_scale
        if not active:
            return F.linear(x, self.weight, self.bias)
        return self._sampled_linear(x, self.weight, self.bias)

    def _forward_tp(self, x: torch.Tensor, active: bool) -> torch.Tensor:
        """Run on the local shards of a ColwiseParallel (W Shard(0)) or RowwiseParallel (W Shard(1)) layer."""
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        w: DTensor = self.weight  # type: ignore[assignment]
        mesh = w.device_mesh
        if mesh.ndim != 1 or not isinstance(x, DTensor):
            raise ConfigError(f"wta_crs under tensor parallelism needs a 1-D tp mesh and DTensor input; "
                              f"valid: ColwiseParallel/RowwiseParallel, got mesh.ndim={mesh.ndim}")
        self._tp_group = mesh.get_group()
        placement = w.placements[0]
        w_local = w.to_local()
        bias = self.bias
        if placement == Shard(0):  # colwise: replicated x, output features sharded
            self._x_sharded, self._g_sharded = False, True
            x_local = x.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
            b_local = bias.to_local() if bias is not None else None
            out = self._sampled_linear(x_local, w_local, b_local) if active else F.linear(x_local, w_local, b_local)
            return DTensor.from_local(out, mesh, [Shard(out.dim() - 1)], run_check=False)
        if placement == Shard(1):  # rowwise: x sharded on features, output a partial sum
            self._x_sharded, self._g_sharded = True, False
            x_local = x.redistribute(mesh, [Shard(x.dim() - 1)]).to_local()
            out = self._sampled_linear(x_local, w_local, None) if active else F.linear(x_local, w_local)
            y = DTensor.from_local(out, mesh, [Partial()], run_check=False, **_replicated_grad(Replicate()))
            y = y.redistribute(mesh, [Replicate()])
            return y + bias if bias is not None else y
        raise ConfigError(f"wta_crs weight placement {placement} is invalid; valid: Shard(0) (colwise) or Shard(1) (rowwise)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keep_ratio={self.keep_ratio}, proposal={self.proposal}"


_MIXINS: dict[type, type] = {}


def _mixin(cls: type, base: type) -> type:
    """A subclass of both WTACRSLinear and ``base`` (e.g. LoRALinear) so isinstance checks still hold."""
    if base not in _MIXINS:
        _MIXINS[base] = type(f"WTACRS{base.__name__}", (cls, base), {})
    return _MIXINS[base]


@functools.lru_cache(maxsize=None)
def _from_local_takes_grad_placements() -> bool:
    """``DTensor.from_local(grad_placements=)`` is in torch 2.13, not in the GPU image's torch 2.11 (TypeError there)."""
    from torch.distributed.tensor import DTensor

    return "grad_placements" in inspect.signature(DTensor.from_local).parameters


def _replicated_grad(replicate: object) -> dict[str, object]:
    """Keywords asking ``from_local`` of a Partial output for a Replicate gradient. Without the keyword (torch 2.11)
    ``from_local``'s backward already maps a Partial forward placement to a Replicate gradient, so both agree."""
    return {"grad_placements": [replicate]} if _from_local_takes_grad_placements() else {}


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


# ---- applying it to a model ------------------------------------------------------------------------
def apply_wta_crs(model: nn.Module, keep_ratio: float, layers: Iterable[int] | None = None,
                  targets: Sequence[str] = DEFAULT_TARGETS, min_rows: int = 8,
                  proposal: Literal["x", "cached"] = "x", defensive: float = 0.1, seed: int = 0,
                  sync_free: bool | None = None) -> list[str]:
    """Make the ``targets`` linears of the chosen transformer blocks WTA-CRS linears; return their names.

    ``sync_free`` picks the fixed-shape sampler that never waits on the host (None: on CUDA inputs).

    ``targets`` are names relative to a block (default: the paper's set, attention output projection and
    the MLP projections, not q/k/v). ``layers`` are block indices (default all). Layer i's target t gets
    seed ``seed + position`` so layers draw independent rows; tp ranks sharing ``seed`` sample alike.
    Apply before or after tensor parallelism; parameters are shared, so existing optimizers stay valid.
    """
    check_keep_ratio(keep_ratio)
    targets = tuple(targets)
    if not targets:
        raise invalid("wta_crs.targets", list(targets), f"a non-empty list such as {list(DEFAULT_TARGETS)}")
    blocks = getattr(model, "layers", None)
    if not isinstance(blocks, nn.ModuleDict):
        raise invalid("wta_crs.model", type(model).__name__, "a meshwright Decoder (with a `layers` ModuleDict)")
    wanted = list(blocks.keys()) if layers is None else [str(i) for i in layers]
    for key in wanted:
        if key not in blocks:
            raise invalid("wta_crs.layers", key, f"block indices present in the model: {list(blocks.keys())}")
    converted: list[str] = []
    for key in wanted:
        block = blocks[key]
        modules = dict(block.named_modules())
        for t in targets:
            mod = modules.get(t)
            if mod is None:
                continue  # e.g. w3 on a GPT-2 MLP
            if not isinstance(mod, nn.Linear):
                raise invalid("wta_crs.targets", t, "names of nn.Linear modules inside a block")
            WTACRSLinear.convert(mod, keep_ratio, min_rows, proposal, defensive, seed + len(converted), sync_free)
            converted.append(f"layers.{key}.{t}")
    if not converted:
        raise invalid("wta_crs.targets", list(targets), f"linear names inside a block such as {list(DEFAULT_TARGETS)}")
    return converted


def apply_wta_crs_per_layer(model: nn.Module, keep_by_layer: Mapping[int, float | None], **kwargs) -> list[str]:
    """The runtime's hook for a Plan: ``{layer: savers.wta_crs}``; None and layers this pipeline stage
    does not hold are skipped. Other keyword arguments go to :func:`apply_wta_crs`."""
    present = set(getattr(model, "layers", {}).keys())
    by_ratio: dict[float, list[int]] = {}
    for layer, keep in keep_by_layer.items():
        if keep is not None and str(layer) in present:
            by_ratio.setdefault(check_keep_ratio(keep, f"layers[{layer}].savers.wta_crs"), []).append(int(layer))
    names: list[str] = []
    seed = kwargs.pop("seed", 0)
    for keep, layers in sorted(by_ratio.items()):
        names += apply_wta_crs(model, keep, layers=layers, seed=seed + 1000 * len(names), **kwargs)
    return names


def remove_wta_crs(model: nn.Module) -> None:
    """Switch every WTA-CRS linear of ``model`` back to exact gradients (the modules stay)."""
    for m in model.modules():
        if isinstance(m, WTACRSLinear):
            m.wta_enabled = False


__all__ = [
    "ALLOW_FLAG", "DEFAULT_TARGETS", "RowSample", "WTACRSLinear", "apply_wta_crs", "apply_wta_crs_per_layer",
    "check_keep_ratio",
    "choose_winners", "estimator_variance", "exact_saved_bytes", "kept_rows", "remove_wta_crs",
    "wta_crs_sample", "wta_crs_saved_bytes",
]
