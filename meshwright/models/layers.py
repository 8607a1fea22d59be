"""Building blocks shared by the decoders: norms, rotary embeddings, attention, MLPs.

Module and parameter names follow torchtitan (attention.wq/wk/wv/wo, feed_forward.w1/w2/w3) so that
tensor-parallel plans, memory savers and checkpoints address the same names for every architecture.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from meshwright.config import ModelConfig
from meshwright.models.capped_flex import capped_flex_attention, flex_capped


class RMSNorm(nn.Module):
    """RMSNorm; ``unit_offset`` (Gemma) scales by ``1 + weight`` in fp32 and casts after (weights start at 0), where
    Llama casts the normalised input and then scales by ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-5, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (out * (1.0 + self.weight.float())).type_as(x)
        return out.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        (nn.init.zeros_ if self.unit_offset else nn.init.ones_)(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", unit_offset=True" if self.unit_offset else "")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None,
                  device: torch.device | None = None, long: bool = False) -> torch.Tensor:
    """Rotary frequencies, with the checkpoint's scaling: ``linear`` divides them by ``factor``; ``llama3``
    (Llama 3.1) divides only the low frequencies and blends the middle band, as Meta's reference does; ``longrope``
    (Phi-3) divides each by its ``short_factor``, or its ``long_factor`` for the tables of sequences longer than
    ``original_max_position_embeddings`` (``long``)."""
    wavelength = theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if is_longrope(scaling):
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32, device=device)
        return 1.0 / (ext * wavelength)
    inv = 1.0 / wavelength
    if scaling is None:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind != "llama3":
        raise ValueError(f"rope_scaling.rope_type={kind!r} is invalid; valid: linear, llama3")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None,
                scaling: dict | None = None, long: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_seq_len, head_dim/2) for rotary position embeddings (longrope: scaled by its
    ``attention_factor``, as transformers scales them; ``long``: the long factors' tables)."""
    inv = rope_inv_freq(head_dim, theta, scaling, device, long)
    pos = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(pos, inv)
    if is_longrope(scaling):
        scale = float(scaling["attention_factor"])
        return angles.cos() * scale, angles.sin() * scale
    return angles.cos(), angles.sin()


def is_longrope(scaling: dict | None) -> bool:
    return scaling is not None and scaling.get("rope_type", scaling.get("type")) == "longrope"


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., 2i], x[..., 2i+1]) of x with shape (batch, seq, heads, head_dim).

    ``cos``/``sin`` are (seq, head_dim/2) for contiguous positions or (batch, seq, head_dim/2) when
    tokens carry their own positions (LeMo keeps the original positions of the kept tokens).
    """
    rotated = 2 * cos.shape[-1]
    if rotated < x.shape[-1]:  # partial rotary (Phi-4-mini): the first ``rotated`` dimensions of each head only
        return torch.cat([apply_rope(x[..., :rotated], cos, sin), x[..., rotated:]], dim=-1)
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


def sliding_window_mask(seq_len: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (seq, seq) mask, True where query i may attend key j: j <= i and i - j < window (Mistral)."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (i - j < window)


class AttentionCore(nn.Module):
    """What runs between the projections: RoPE, the GQA repeat and SDPA. A module of its own (no parameters) so a
    tensor-parallel backend whose projections run collectives in custom autograd functions (megatron-core) can
    compile it apart from them (train/compile.py); eager, the ops are Attention's, in its order."""

    def __init__(self, head_dim: int, n_rep: int, use_rope: bool, dropout: float, sliding_window: int | None,
                 scale: float | None = None, softcap: float | None = None) -> None:
        super().__init__()
        self.head_dim, self.n_rep, self.use_rope = head_dim, n_rep, use_rope
        self.dropout, self.sliding_window = dropout, sliding_window
        self.scale, self.softcap = scale, softcap  # None: SDPA's 1/sqrt(head_dim); no capping (Gemma sets them)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """q (batch, seq, heads * head_dim), k/v (batch, seq, kv_heads * head_dim) -> (batch, seq, heads * head_dim)."""
        b, s, _ = q.shape
        q, k, v = (t.view(b, s, -1, self.head_dim) for t in (q, k, v))
        if self.use_rope and rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        drop = self.dropout if self.training else 0.0
        if self.softcap is not None and attn_mask is None and self.flex_path(q, k, v, drop):
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # GQA inside the kernel: k/v not repeated
            out = capped_flex_attention(q, k, v, self.softcap, self.scale, self.sliding_window)
            return out.transpose(1, 2).reshape(b, s, -1)
        if self.n_rep > 1:
            k = k.repeat_interleave(self.n_rep, dim=2)
            v = v.repeat_interleave(self.n_rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if attn_mask is None and self.sliding_window is not None and s > self.sliding_window:
            attn_mask = sliding_window_mask(s, self.sliding_window, q.device)
        if self.softcap is not None:
            out = capped_attention(q, k, v, self.softcap, self.scale, attn_mask, drop)
        elif attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, scale=self.scale)
        return out.transpose(1, 2).reshape(b, s, -1)

    @staticmethod
    def flex_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> bool:
        """Whether capped scores run as compiled flex_attention here (``capped_flex.flex_capped``, the planner's rule
        too): traced by torch.compile, no dropout, on CUDA or without gradients on CPU."""
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        return flex_capped(torch.compiler.is_compiling(), q.device.type, needs_grad, dropout)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2's attention scores and logits): smooth, bounded by +-cap."""
    return torch.tanh(x / cap) * cap


def capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cap: float, scale: float | None = None,
                     attn_mask: torch.Tensor | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Causal attention with soft-capped scores, (batch, heads, seq, head_dim) each, as transformers' Gemma 2 eager
    path computes it: scores * scale, capped, masked, softmax in fp32, cast back. SDPA has no capping, so the scores
    exist here (seq x seq per head): only models with ``attn_softcap`` take this path, where the compiled flex path
    (models/capped_flex.py) does not apply."""
    s = q.shape[-2]
    scores = softcap(torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5), cap)
    if attn_mask is None:
        attn_mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v)


class _SumGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ``group`` (Megatron's copy-to-tensor-parallel-region)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: object) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed._functional_collectives as funcol

        out = funcol.all_reduce(grad.contiguous(), "sum", ctx.group)
        return (out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out), None


class HeadNorm(RMSNorm):
    """RMSNorm over each head of a (batch, seq, heads * head_dim) projection, one weight shared by the heads
    (Qwen3's q_norm/k_norm). Under tensor parallelism a rank holds only its heads but the whole weight, so the
    weight's gradient is partial there: ``grad_group`` (set by the tp backends) sums it over the tp ranks."""

    def __init__(self, head_dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__(head_dim, eps, unit_offset)
        self.grad_group: object | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = x.unflatten(-1, (-1, self.weight.shape[0]))
        xf = heads.float()
        weight = self.weight if self.grad_group is None else _SumGrad.apply(self.weight, self.grad_group)
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma 3: (1 + w) in fp32, then the cast
            return (normed * (1.0 + weight.float())).type_as(x).flatten(-2)
        return (normed.type_as(x) * weight).flatten(-2)


class Attention(nn.Module):
    """Causal self-attention with optional GQA, RoPE, q/k/v biases (Qwen2), q/k head norms (Qwen3) and a sliding
    window (Mistral).

    Head counts are inferred from tensor shapes at run time, so the same code runs on a
    tensor-parallel shard that holds only n_heads/tp query heads and n_kv_heads/tp KV heads.
    """

    def __init__(self, cfg: ModelConfig, bias: bool = False, use_rope: bool = True, layer_id: int = 0) -> None:
        super().__init__()
        qkv_bias = bias or cfg.qkv_bias
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        # Qwen3/Gemma 3: normalise each q/k head before RoPE (absent otherwise, so other checkpoints keep their names)
        unit = cfg.norm_unit_offset
        self.q_norm = HeadNorm(cfg.head_dim, cfg.norm_eps, unit) if cfg.qk_norm else None
        self.k_norm = HeadNorm(cfg.head_dim, cfg.norm_eps, unit) if cfg.qk_norm else None
        window = cfg.layer_window(layer_id)
        # Gemma 3: the windowed blocks turn with their own rope base (the decoder's LocalRope carries both tables)
        self.local_rope = cfg.rope_local_theta is not None and window is not None
        self.core = AttentionCore(cfg.head_dim, cfg.n_heads // cfg.kv_heads, use_rope, cfg.dropout, window,
                                  cfg.attn_scale, cfg.attn_softcap)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=bias)

    # the core's settings, read by the savers that recompute attention scores (memory/lemo.py)
    @property
    def head_dim(self) -> int:
        return self.core.head_dim

    @property
    def n_rep(self) -> int:
        return self.core.n_rep

    @property
    def use_rope(self) -> bool:
        return self.core.use_rope

    @property
    def dropout(self) -> float:
        return self.core.dropout

    @property
    def sliding_window(self) -> int | None:
        return self.core.sliding_window

    def project_qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k before RoPE, (batch, seq, heads * head_dim): the projections, head-normed where the model has
        q/k norms. Also what the savers that recompute attention scores read (memory/lemo.py)."""
        q, k = self.wq(x), self.wk(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | LocalRope | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k = self.project_qk(x)
        if isinstance(rope, LocalRope):
            rope = rope.local if self.local_rope else rope.full
        return self.wo(self.core(q, k, self.wv(x), rope, attn_mask))


class LocalRope(NamedTuple):
    """The rope tables of a model whose windowed blocks turn with another base (Gemma 3's ``rope_local_theta``):
    what the decoder hands every block; each Attention takes its own pair."""

    full: tuple[torch.Tensor, torch.Tensor]
    local: tuple[torch.Tensor, torch.Tensor]


class SiluGate(nn.Module):
    """SwiGLU's gating, silu(a) * b: a module (no parameters) so it compiles apart from the linears around it."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.silu(a) * b


class GeluTanh(nn.Module):
    """GPT-2's activation, gelu with the tanh approximation: a module for the same reason as ``SiluGate``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class GeluGate(nn.Module):
    """GeGLU's gating, gelu_tanh(a) * b (Gemma's ``gelu_pytorch_tanh``): a module for the same reason as ``SiluGate``."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.gelu(a, approximate="tanh") * b


class SwiGLU(nn.Module):
    """Llama MLP: w2(silu(w1 x) * w3 x); ``gelu_tanh``: Gemma's GeGLU, w2(gelu_tanh(w1 x) * w3 x)."""

    def __init__(self, d_model: int, hidden: int, act: str = "silu") -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.act = GeluGate() if act == "gelu_tanh" else SiluGate()
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x), self.w3(x)))


class GeluMLP(nn.Module):
    """GPT-2 MLP: w2(gelu(w1 x)) with biases."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden)
        self.act = GeluTanh()
        self.w2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))


class SoftcapLinear(nn.Linear):
    """The output head with Gemma 2's final-logit soft-capping, ``cap * tanh(logits / cap)``: every consumer that
    calls the head (the decoder, the chunked and compiled losses) gets capped logits; the weight stays ``output``'s."""

    def __init__(self, d_model: int, vocab: int, cap: float) -> None:
        super().__init__(d_model, vocab, bias=False)
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softcap(super().forward(x), self.cap)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cap={self.cap}"


def init_linear(module: nn.Linear, std: float) -> None:
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def residual_std(cfg: ModelConfig) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)
