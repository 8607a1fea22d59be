"""COAT FP8 activations: what a block saves for backward is stored in FP8 of mixed granularity.

Why: activations saved for backward dominate training memory at long sequences. COAT keeps them in
FP8 with the granularity each consumer tolerates: inputs of linear layers get one per-tensor scale
(matmul gradients average the error away), inputs of non-linear layers (RMSNorm/LayerNorm, SiLU/GELU,
the gated product) get one scale per 1x16 group along the hidden dimension, because their backward
is elementwise and outlier channels would otherwise crush every other channel's resolution.
The residual stream and the attention core (q, k, v, softmax statistics, attention output) stay in the
compute dtype, and (without FP8 GEMMs) every forward value is computed exactly as before: only saved
copies are FP8.

Implementation: custom autograd Functions that save FP8 tensors and compute their own backward,
swapped in by changing the class of the existing modules (parameter names and checkpoints unchanged).
The three projections that read the same normed input (wq/wk/wv, w1/w3) share one quantized copy.
Backward passes run in the forward's compute dtype, so bf16 autocast over fp32 parameters, bf16
parameters and fp32 all work. Optionally (``gemm_layers``, the Plan's ``savers.fp8_gemm``) the linear
layers also compute with FP8 GEMMs on the saved FP8 copies (:mod:`meshwright.memory.fp8_gemm`):
``torch._scaled_mm`` on compute capability >= 8.9, a dequantise-and-matmul emulation elsewhere. On
DTensor tensor-parallel layers the FP8 GEMMs run on each rank's local shards with per-shard scales
(:mod:`meshwright.memory.fp8_tp`).
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from meshwright.errors import invalid
from meshwright.models.layers import GeluMLP, RMSNorm, SwiGLU
from meshwright.memory import fp8_ops
from meshwright.memory.fp8_tp import cache_key, local_operands
from meshwright.memory.fp8_bytes import (GROUP, block_linear_params, block_saved_bytes_per_token,  # noqa: F401
                                         block_saved_bytes_split, fp8_activation_saved_fraction)
from meshwright.memory.fp8_gemm import BACKENDS, GRAD_FP8, INPUT_FP8, WEIGHT_FP8, fp8_mm, gemm_backend
from meshwright.memory.fp8_cast import (dequantize_last_dim_groups, dequantize_per_tensor, quantize_last_dim_groups,
                                        quantize_per_tensor, quantize_per_tensor_t)
from meshwright.memory.fp8_fused import (fused_rmsnorm_backward, fused_rmsnorm_forward, fused_swiglu_backward,
                                         fused_swiglu_forward)
from meshwright.optim.fp8_quant import fp8_dtype

FP8 = torch.float8_e4m3fn
# wo reads the attention output, which SDPA keeps for its own backward in the compute dtype anyway
# (wo's input is a view of it): a second, FP8 copy would add bytes, not remove them.
KEEP_LINEAR = ("attention.wo",)


# ---- a one-entry cache so wq/wk/wv (and w1/w3) save one FP8 copy of their shared input ----------
class _QuantCache:
    """Remembers the FP8 copies of the last linear input while that input is alive.

    The entry (FP8 copy, scale and, for FP8 GEMMs, the transposed FP8 copy the weight gradient reads) is
    keyed by a weak reference to the input and dropped when the input is freed, so wq/wk/wv (w1/w3) cast
    their shared input once and no FP8 copy outlives its input because of the cache; autograd keeps
    what the backward needs.
    """

    def __init__(self) -> None:
        self._ref: weakref.ReferenceType | None = None
        self._entry: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self._version = -1
        self._sig: tuple = ()

    def _drop(self, ref: weakref.ReferenceType) -> None:
        if ref is self._ref:
            self._ref, self._entry = None, None

    @staticmethod
    def _signature(x: torch.Tensor) -> tuple:
        return (tuple(x.shape), x.stride(), x.storage_offset())

    def _hit(self, x: torch.Tensor, dtype: torch.dtype, transposed: bool, key: torch.Tensor) -> bool:
        e = self._entry
        return (e is not None and self._ref is not None and self._ref() is key and self._version == key._version
                and self._sig == self._signature(x) and e[0].dtype == dtype and (e[2] is not None or not transposed))

    def get(self, x: torch.Tensor, dtype: torch.dtype, key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(FP8 copy of x's shape, fp32 scale); ``key`` as in :meth:`get_t`."""
        if torch.compiler.is_compiling():  # see get_t
            return fp8_ops.quant_tensor(x, dtype) if fp8_ops.opaque(x) else quantize_per_tensor(x, dtype)
        key = x if key is None else key
        if not self._hit(x, dtype, False, key):
            q, scale = quantize_per_tensor(x, dtype)
            self._store(x, (q, scale, None), key)
        q, scale = self._entry[0], self._entry[1]
        return q.view(x.shape), scale

    def get_t(self, x: torch.Tensor, dtype: torch.dtype,
              key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(FP8 copy as (tokens, k), its contiguous transpose (k, tokens), fp32 scale), cast in one go.

        ``key`` (default x) is the tensor the entry lives as long as; a view of it with the same shape,
        strides and offset hits (tensor-parallel linears get fresh views of one activation)."""
        if torch.compiler.is_compiling():
            # traced: the weakref/version/offset checks would break the graph at every linear (24 breaks in a
            # 2-block model compiled whole); in one graph the shared input's casts are common subexpressions. On plain
            # tensors they are opaque operators, so the partitioner saves their FP8 outputs (memory/fp8_ops.py)
            return (fp8_ops.quant_tensor_t if fp8_ops.opaque(x) else quantize_per_tensor_t)(_flat2(x), dtype)
        key = x if key is None else key
        if not self._hit(x, dtype, True, key):
            q, qt, scale = quantize_per_tensor_t(_flat2(x), dtype)  # 2-D: one compiled graph for any rank
            self._store(x, (q, scale, qt), key)
        q, scale, qt = self._entry
        return q.view(-1, x.shape[-1]), qt, scale

    def _store(self, x: torch.Tensor, entry: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
               key: torch.Tensor) -> None:
        # the key's version: views share their root's counter, a fresh DTensor wrapper starts its own at 0
        self._ref, self._entry, self._version = weakref.ref(key, self._drop), entry, key._version
        self._sig = self._signature(x)


def _flat2(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _group_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x GROUP FP8 copy of x and its scales; an opaque operator while traced (memory/fp8_ops.py)."""
    return (fp8_ops.quant_groups if fp8_ops.opaque(x) else quantize_last_dim_groups)(x, GROUP)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in here: the autocast dtype where autocast is on, else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _FP8LinearFn(torch.autograd.Function):
    """y = x W^T + b, saving x as per-tensor-scaled FP8 (``gemm=None``) or computing with FP8 GEMMs.

    ``gemm=None``: the forward is the plain ``F.linear`` (bit for bit), only the saved copy of x is FP8.
    ``gemm="scaled_mm"``/``"emulate"``: COAT's FP8 linear (see :mod:`meshwright.memory.fp8_gemm`): x and
    W in E4M3 per tensor for the forward GEMM, the same FP8 copies reused by the backward GEMMs (no second
    cast), the output gradient in E5M2 per tensor. ``key``: what the shared-input cache keys x on
    (tensor parallelism hands each linear a fresh view of one activation, :func:`fp8_tp.cache_key`). The backward runs in the forward's compute dtype (the
    autocast dtype under autocast), so bf16 autocast with fp32 parameters works, and returns gradients in
    the dtypes of x, W and b.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                cache: _QuantCache, dtype: torch.dtype, gemm: str | None = None,
                key: torch.Tensor | None = None) -> torch.Tensor:
        ctx.has_bias = bias is not None
        ctx.x_dtype, ctx.gemm = x.dtype, gemm
        if gemm is None:
            q, scale = cache.get(x, dtype, key)
            if fp8_ops.opaque(x, weight):  # traced: the cast becomes part of the forward (fp8_ops.linear)
                cdt = _compute_dtype(x)  # what autocast would cast the operands to (bit for bit the same GEMM)
                out = fp8_ops.linear(x.to(cdt), q, weight.to(cdt), None if bias is None else bias.to(cdt))
            else:
                out = F.linear(x, weight, bias)
            ctx.compute_dtype, ctx.w_dtype = out.dtype, weight.dtype
            ctx.save_for_backward(q, scale, weight)
            return out
        # Layouts for _scaled_mm (row-major A, column-major B) planned so that no GEMM copies an operand:
        # forward x @ W^T reads q (row-major) and qw^T = qw viewed transposed; the backward reads the
        # transposed copies written by the casts: g @ W with B = (W^T)^T, g^T x with A = g^T, B = (x^T)^T.
        q, qt, scale = cache.get_t(x, dtype, key)
        cdt = _compute_dtype(x)
        qw, qwt, sw = (fp8_ops.quant_tensor_t if fp8_ops.opaque(weight) else quantize_per_tensor_t)(weight, WEIGHT_FP8)
        out = fp8_mm(q, scale, qw.t(), sw, cdt, gemm).view(*x.shape[:-1], weight.shape[0])
        if bias is not None:
            out = out + bias.to(cdt)
        ctx.compute_dtype, ctx.w_dtype = cdt, weight.dtype
        ctx.save_for_backward(qt, scale, qwt, sw)  # not the weight: FSDP may free its gathered copy
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cdt = ctx.compute_dtype
        grad = grad.to(cdt)
        g2 = _flat2(grad)
        gx = gw = gb = None
        if ctx.gemm is None:
            q, scale, weight = ctx.saved_tensors
            if ctx.needs_input_grad[0]:
                gx = (grad @ weight.to(cdt)).to(ctx.x_dtype)
            if ctx.needs_input_grad[1] and fp8_ops.opaque(g2, q):  # traced: backward reads the FP8 copy (fp8_ops)
                gw = fp8_ops.weight_grad(g2, q, scale, cdt).to(weight.dtype)
            elif ctx.needs_input_grad[1]:
                gw = (g2.t() @ _flat2(dequantize_per_tensor(q, scale, cdt))).to(weight.dtype)
        else:
            qt, scale, qwt, sw = ctx.saved_tensors
            qg, qgt, sg = (fp8_ops.quant_tensor_t if fp8_ops.opaque_grads(g2) else quantize_per_tensor_t)(g2, GRAD_FP8)
            mm = fp8_ops.mm if fp8_ops.opaque(g2, qt) else fp8_mm  # traced: on the saved FP8 copies (fp8_ops)
            if ctx.needs_input_grad[0]:
                gx = mm(qg, sg, qwt.t(), sw, cdt, ctx.gemm).view(grad.shape[:-1] + (qwt.shape[0],)).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                gw = mm(qgt, sg, qt.t(), scale, cdt, ctx.gemm).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(ctx.w_dtype)
        return gx, gw, gb, None, None, None, None


class _FP8RMSNormFn(torch.autograd.Function):
    """RMSNorm saving x in 1x16 FP8 groups plus the per-token fp32 1/rms (4 bytes per token).

    Forward and backward are one compiled unit each on GPUs (:mod:`meshwright.memory.fp8_fused`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        fwd = fp8_ops.rmsnorm_fwd if fp8_ops.opaque(x, weight) else fused_rmsnorm_forward
        out, rstd, q, s = fwd(x, weight, eps, GROUP)
        ctx.save_for_backward(q, s, rstd, weight)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, s, rstd, weight = ctx.saved_tensors
        gx, gw = fused_rmsnorm_backward(grad, q, s, rstd, weight, GROUP)
        return gx, gw.to(weight.dtype) if ctx.needs_input_grad[1] else None, None


class _FP8LayerNormFn(torch.autograd.Function):
    """LayerNorm saving x in 1x16 FP8 groups plus per-token fp32 mean and 1/std."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> torch.Tensor:
        xf = x.float()
        # mean, then variance: torch.var_mean has no DTensor sharding rule in torch 2.11 (sequence-parallel norms)
        mean = xf.mean(-1, keepdim=True)
        var = (xf - mean).pow(2).mean(-1, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        q, s = _group_quant(x)
        ctx.save_for_backward(q, s, mean, rstd, weight)
        ctx.has_bias = bias is not None
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, s, mean, rstd, weight = ctx.saved_tensors
        xhat = (dequantize_last_dim_groups(q, s, GROUP) - mean) * rstd
        g = grad.float()
        tokens = tuple(range(g.dim() - 1))  # summed without a flatten, which a sequence-sharded DTensor refuses (2.11)
        gw = (g * xhat).sum(tokens).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        gb = g.sum(tokens).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dxhat = g * weight.float() if weight is not None else g
        gx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return gx.to(grad.dtype), gw, gb, None


class _FP8SwiGLUProductFn(torch.autograd.Function):
    """silu(a) * b saving a and b in 1x16 FP8 groups (instead of a, silu(a) and b in full precision).

    Forward and backward are one compiled unit each on GPUs (:mod:`meshwright.memory.fp8_fused`)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out, *saved = (fp8_ops.swiglu_fwd if fp8_ops.opaque(a, b) else fused_swiglu_forward)(a, b, GROUP)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_swiglu_backward(grad, *ctx.saved_tensors, GROUP)


class _FP8GeluFn(torch.autograd.Function):
    """GELU (tanh approximation) saving its input in 1x16 FP8 groups."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor) -> torch.Tensor:
        if fp8_ops.opaque(a):
            out, qa, sa = fp8_ops.gelu_fwd(a, GROUP)
        else:
            out, (qa, sa) = F.gelu(a, approximate="tanh"), quantize_last_dim_groups(a, GROUP)
        ctx.save_for_backward(qa, sa)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        qa, sa = ctx.saved_tensors
        a = dequantize_last_dim_groups(qa, sa, GROUP, grad.dtype)
        return torch.ops.aten.gelu_backward(grad, a, approximate="tanh")


# ---- module classes swapped in place (same parameters, same names) ------------------------------
class FP8Linear(nn.Linear):
    """nn.Linear saving its input in FP8 and, with ``_fp8_gemm``, computing with FP8 GEMMs; a DTensor
    (tensor-parallel) weight runs those GEMMs on the local shards (:func:`fp8_tp.local_operands`)."""

    _fp8_cache: _QuantCache
    _fp8_dtype: torch.dtype = FP8
    _fp8_gemm: str | None = None  # None: FP8 storage only; "auto", "scaled_mm" or "emulate": FP8 GEMMs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        gemm = gemm_backend(x.device) if self._fp8_gemm == "auto" else self._fp8_gemm
        if gemm is not None and isinstance(self.weight, DTensor):  # tensor parallel: FP8 GEMMs on the local shards
            x_local, w_local, b_local, wrap = local_operands(x, self.weight, self.bias)
            return wrap(_FP8LinearFn.apply(x_local, w_local, b_local, self._fp8_cache, self._fp8_dtype, gemm,
                                           cache_key(x_local)))
        # FP8 storage only: DTensor ops (global scale); tp hooks wrap one activation in a fresh DTensor per linear
        key = cache_key(x._local_tensor) if isinstance(x, DTensor) else None
        return _FP8LinearFn.apply(x, self.weight, self.bias, self._fp8_cache, self._fp8_dtype, gemm, key)


class FP8RMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        return _FP8RMSNormFn.apply(x, self.weight, self.eps)


class FP8LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or len(self.normalized_shape) != 1:
            return super().forward(x)
        return _FP8LayerNormFn.apply(x, self.weight, self.bias, self.eps)


class FP8SwiGLU(SwiGLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        return self.w2(_FP8SwiGLUProductFn.apply(self.w1(x), self.w3(x)))


class FP8GeluMLP(GeluMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        return self.w2(_FP8GeluFn.apply(self.w1(x)))


_SWAPS: list[tuple[type, type]] = [(RMSNorm, FP8RMSNorm), (nn.LayerNorm, FP8LayerNorm), (SwiGLU, FP8SwiGLU),
                                   (GeluMLP, FP8GeluMLP), (nn.Linear, FP8Linear)]


def _swap(name: str, module: nn.Module, cache: _QuantCache, linear_dtype: torch.dtype, gemm: str | None) -> None:
    for base, fp8 in _SWAPS:
        if type(module) is base:  # exact type: leaves MoE experts, LoRA wrappers etc. untouched
            if fp8 is FP8Linear and gemm is None and name.endswith(KEEP_LINEAR):
                return  # with FP8 GEMMs wo is swapped too: its GEMM is worth the extra FP8 copy
            module.__class__ = fp8
            if fp8 is FP8Linear:
                module._fp8_cache = _QuantCache() if name.endswith(KEEP_LINEAR) else cache
                module._fp8_dtype = linear_dtype
                module._fp8_gemm = gemm
            return


def _select(n_layers: int, layers: Iterable[int] | Iterable[bool] | None, field: str = "fp8_act.layers") -> list[int]:
    if layers is None:
        return list(range(n_layers))
    chosen = list(layers)
    if chosen and all(isinstance(v, bool) for v in chosen):
        if len(chosen) != n_layers:
            raise invalid(field, chosen, f"{n_layers} booleans (one per layer) or layer indices")
        return [i for i, on in enumerate(chosen) if on]
    for i in chosen:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_layers:
            raise invalid(field, i, f"layer indices in [0, {n_layers})")
    return sorted(set(chosen))


GEMM_CHOICES = ("auto",) + BACKENDS


def apply_fp8_activations(model: nn.Module, layers: Iterable[int] | Iterable[bool] | None = None,
                          linear_format: str = "e4m3", gemm_layers: Iterable[int] | Iterable[bool] | None = (),
                          backend: str = "auto") -> list[int]:
    """Store the saved activations of the chosen blocks (default: all) in FP8; returns their indices.

    ``layers`` is a list of block indices or one boolean per block (the Plan's
    ``layers[i].savers.fp8_act``, see :func:`fp8_act_layers_from_plan`). ``gemm_layers`` (same forms,
    ``None`` = every chosen block, default none) picks the blocks whose linear layers also compute with
    FP8 GEMMs (``savers.fp8_gemm``); they must be among ``layers``. ``backend``: ``"auto"`` uses
    ``torch._scaled_mm`` on GPUs of compute capability >= 8.9 and the emulation elsewhere. Call it before
    applying FSDP/TP wrappers. Blocks not present (cut off for another pipeline stage) are skipped.
    """
    blocks = getattr(model, "layers", None)
    if not isinstance(blocks, nn.ModuleDict):
        raise invalid("model", type(model).__name__, "a meshwright Decoder with a `layers` ModuleDict")
    if backend not in GEMM_CHOICES:
        raise invalid("fp8_gemm.backend", backend, " or ".join(GEMM_CHOICES))
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", None) or len(blocks)
    dtype = fp8_dtype(linear_format)
    chosen = _select(n_layers, layers)
    if chosen and hasattr(getattr(model, "cfg", None), "refuse_gemma"):  # FP8RMSNorm/FP8SwiGLU are Llama's numerics
        model.cfg.refuse_gemma("COAT FP8 activations (its norms and gated MLP)")
    gemm = set(chosen if gemm_layers is None else _select(n_layers, gemm_layers, "fp8_gemm.layers"))
    if gemm - set(chosen):
        raise invalid("fp8_gemm.layers", sorted(gemm - set(chosen)), "layers that also have fp8_act")
    if gemm and dtype != INPUT_FP8:
        raise invalid("fp8_act.linear_format", linear_format, "'e4m3' with FP8 GEMMs (COAT's forward format)")
    done = []
    for i in chosen:
        block = blocks[str(i)] if str(i) in blocks else None
        if block is None:
            continue
        cache = _QuantCache()
        for name, sub in block.named_modules():
            _swap(name, sub, cache, dtype, backend if i in gemm else None)
        done.append(i)
    return done


def fp8_act_layers_from_plan(plan: Any) -> list[bool]:
    """One flag per block from ``plan.layers[i].savers.fp8_act`` (``repeat`` expanded)."""
    return [bool(s.savers.fp8_act) for s in plan.layer_strategies()]


def fp8_gemm_layers_from_plan(plan: Any) -> list[bool]:
    """One flag per block from ``plan.layers[i].savers.fp8_gemm`` (``repeat`` expanded)."""
    return [bool(s.savers.fp8_gemm) for s in plan.layer_strategies()]

