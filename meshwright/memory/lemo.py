"""LeMo contextual token sparsity for long-context fine-tuning (Wang et al., USENIX ATC'25 "Jenga").

``apply_lemo(model, cfg)`` switches chosen blocks of a plain meshwright ``Decoder`` to token
elimination. At every such layer and every forward pass:

1. the block's input is scored block-wise (blocks of ``block_size`` tokens) by informativeness
   I(T_j) = sum_{i > j} relu(q_i . k_j / sqrt(head_dim)) summed over heads and over the tokens j of a
   block (causal: only later queries i see key j; by default averaged over those later queries,
   see ``aggregate_blocks``), either exactly from the block's own q/k
   projections (no grad, chunked so no seq x seq matrix exists) or from a small learned predictor;
2. the top blocks by ``keep_ratio`` (or the fewest top blocks holding ``threshold`` of the score
   mass) are kept, in their original order, with their original RoPE positions;
3. only kept tokens run through the block (attention + MLP). Kept queries attend causally to kept
   keys only (the paper's choice): eliminated tokens are absent from this layer, as keys too;
4. eliminated tokens pass unchanged along the residual stream and are re-scored at the next layer.

Autograd therefore saves activations for kept tokens only (plus one int64 index per kept token).
Batch size > 1 is supported: each sequence picks its own blocks, all sequences keep the same count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from meshwright.config.io import from_dict
from meshwright.config.schema import MAX_SIZES
from meshwright.errors import ConfigError, invalid
from meshwright.models.decoder import Block, Decoder
from meshwright.models.layers import Attention, apply_rope

MAX_TOKENS = MAX_SIZES["max_seq_len"]  # a scoring block is at most one sequence
MAX_RANK = MAX_SIZES["d_model"]  # a low-rank predictor is at most as wide as the model


@dataclass
class LemoConfig:
    """Which layers eliminate tokens and how many they keep. Round-trips through YAML (yamlio)."""

    keep_ratio: Union[float, list[float]] = 0.5  # one ratio for every chosen layer, or one per chosen layer
    block_size: int = 64  # tokens per scoring block; the sequence length must be a multiple of it
    threshold: Optional[float] = None  # if set: keep the fewest top blocks holding this share of the score mass
    layers: Optional[list[int]] = None  # None = every layer
    scorer: str = "attention"  # "attention" (exact scores) or "predictor" (learned low-rank predictors)
    aggregate: str = "mean"  # "mean": per later query (default); "sum": the paper's raw sum (favours early tokens)
    predictor_rank: int = 16

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else "lemo."
        ratios = self.keep_ratio if isinstance(self.keep_ratio, list) else [self.keep_ratio]
        for r in ratios:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
                raise invalid(f"{p}keep_ratio", self.keep_ratio, "a keep ratio in (0, 1] or a list of them, one per chosen layer")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or not 1 <= self.block_size <= MAX_TOKENS:
            raise invalid(f"{p}block_size", self.block_size, f"a positive integer number of tokens (e.g. 64), at most {MAX_TOKENS:,}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise invalid(f"{p}threshold", self.threshold, "null or a share of the score mass in (0, 1]")
        if self.layers is not None and (len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers)):
            raise invalid(f"{p}layers", self.layers, "null (all layers) or distinct non-negative layer indices")
        if isinstance(self.keep_ratio, list) and self.layers is not None and len(self.keep_ratio) != len(self.layers):
            raise invalid(f"{p}keep_ratio", self.keep_ratio, f"one ratio or {len(self.layers)} ratios (one per entry of layers)")
        if self.scorer not in ("attention", "predictor"):
            raise invalid(f"{p}scorer", self.scorer, "'attention' or 'predictor'")
        if self.aggregate not in ("mean", "sum"):
            raise invalid(f"{p}aggregate", self.aggregate, "'mean' (average over the later queries) or 'sum'")
        if isinstance(self.predictor_rank, bool) or not isinstance(self.predictor_rank, int) \
                or not 1 <= self.predictor_rank <= MAX_RANK:  # the predictors' weights are d_model x rank
            raise invalid(f"{p}predictor_rank", self.predictor_rank, f"a positive integer, at most {MAX_RANK:,}")


@dataclass
class LayerLemo:
    """Per-layer LeMo state kept on the block (plain data, not a module)."""

    keep_ratio: float
    block_size: int
    threshold: Optional[float] = None
    scorer: str = "attention"
    aggregate: str = "mean"
    enabled: bool = True
    record: Optional[list] = None  # when a list: (layer input after attention_norm, true block scores) per forward
    last_kept: Optional[torch.Tensor] = field(default=None, repr=False)  # (batch, kept blocks) of the last forward


# ---- scoring and selection (pure functions, tested on their own) ----------------------------------


@torch.no_grad()
def attention_block_scores(attn: Attention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                           block_size: int, aggregate: str = "mean", query_chunk: int = 512) -> torch.Tensor:
    """Exact block informativeness (batch, seq/block_size) from the block's own q/k projections.

    I(T_j) = sum over heads and queries i > j of relu(q_i . k_j / sqrt(d)); block score = sum over its
    tokens. With ``aggregate="mean"`` each I(T_j) is divided by the number of later queries (s-1-j,
    at least 1) so that a block is not ranked high merely for being early: under a causal mask the raw
    sum grows with the number of queries that can see a key. Queries are processed ``query_chunk``
    at a time so no seq x seq matrix is held.
    """
    b, s, _ = x.shape
    hd = attn.head_dim
    q, k = attn.project_qk(x)
    q, k = q.view(b, s, -1, hd), k.view(b, s, -1, hd)
    if attn.use_rope and rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q = q.float().transpose(1, 2) / math.sqrt(hd)  # (b, H, s, hd)
    k = k.float().transpose(1, 2)
    if attn.n_rep > 1:
        k = k.repeat_interleave(attn.n_rep, dim=1)
    tok = torch.zeros(b, s, dtype=torch.float32, device=x.device)
    keys = torch.arange(s, device=x.device)
    for start in range(0, s, query_chunk):
        end = min(start + query_chunk, s)
        sc = torch.relu(q[:, :, start:end] @ k[:, :, :end].transpose(-1, -2))  # (b, H, c, end)
        later = keys[start:end, None] > keys[None, :end]  # query i strictly after key j
        tok[:, :end] += (sc * later).sum(dim=(1, 2))
    return aggregate_blocks(tok, block_size, aggregate)


def aggregate_blocks(tok: torch.Tensor, block_size: int, aggregate: str = "mean") -> torch.Tensor:
    """Token scores summed over later queries (batch, seq) -> block scores (batch, seq/block_size)."""
    b, s = tok.shape
    if aggregate == "mean":
        tok = tok / (s - 1 - torch.arange(s, device=tok.device)).clamp_min(1)
    return tok.view(b, s // block_size, block_size).sum(-1)


def select_blocks(scores: torch.Tensor, keep_ratio: float, threshold: float | None = None) -> torch.Tensor:
    """Indices (batch, k) of the kept blocks, ascending. Every sequence keeps the same number k.

    keep_ratio: k = ceil(keep_ratio * n_blocks). threshold: per sequence the fewest top blocks whose
    scores hold >= threshold of the total; the batch keeps the largest such count (extra blocks only
    add accuracy and keep the tensors rectangular).
    """
    n_blocks = scores.shape[-1]
    if threshold is None:
        k = max(1, math.ceil(keep_ratio * n_blocks - 1e-9))
    else:
        ordered = scores.sort(dim=-1, descending=True).values
        share = ordered.cumsum(-1) / ordered.sum(-1, keepdim=True).clamp_min(torch.finfo(ordered.dtype).tiny)
        k = int(((share < threshold - 1e-7).sum(-1) + 1).clamp(max=n_blocks).max())
    k = min(k, n_blocks)
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def token_index(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Kept blocks (batch, k) -> kept token positions (batch, k*block_size), ascending."""
    offs = torch.arange(block_size, device=blocks.device)
    return (blocks[..., None] * block_size + offs).flatten(1)


def topk_recall(pred_scores: torch.Tensor, true_scores: torch.Tensor, k: int) -> float:
    """Mean over sequences of |top-k(pred) ∩ top-k(true)| / k: how many truly informative blocks the
    predictor finds."""
    if not 1 <= k <= true_scores.shape[-1]:
        raise invalid("k", k, f"an integer in [1, n_blocks={true_scores.shape[-1]}]")
    pred = F.one_hot(pred_scores.topk(k, dim=-1).indices, true_scores.shape[-1]).sum(-2)
    true = F.one_hot(true_scores.topk(k, dim=-1).indices, true_scores.shape[-1]).sum(-2)
    return float(((pred * true).sum(-1).float() / k).mean())


# ---- the block ------------------------------------------------------------------------------------


class _PutRows(torch.autograd.Function):
    """``base.index_copy(0, index, rows)`` saving only the index for backward (torch's own
    index_copy also saves ``rows``, a full activation per kept token)."""

    @staticmethod
    def forward(ctx, base: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        return base.index_copy(0, index, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        grad_base = grad.index_fill(0, index, 0.0) if ctx.needs_input_grad[0] else None
        grad_rows = grad.index_select(0, index) if ctx.needs_input_grad[2] else None
        return grad_base, None, grad_rows


class LemoMixin:
    """Mixed into a Block's class by ``apply_lemo`` (parameter names stay unchanged)."""

    lemo: LayerLemo
    lemo_predictor: Optional[nn.Module]

    def lemo_scores(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        st = self.lemo
        with torch.no_grad():
            x = self.attention_norm(h)
            need_true = st.scorer == "attention" or st.record is not None
            true = attention_block_scores(self.attention, x, rope, st.block_size, st.aggregate) if need_true else None
            if st.record is not None:
                st.record.append((x.detach(), true))
            if st.scorer == "predictor":
                if self.lemo_predictor is None:
                    raise ConfigError(f"lemo.scorer='predictor' is invalid for layer {self.layer_id}; valid: train predictors first (train_predictors) or scorer='attention'")
                return self.lemo_predictor(x, st.block_size, st.aggregate)
            return true

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        st = self.lemo
        dense = super().forward  # type: ignore[misc]
        if not st.enabled or (st.threshold is None and st.keep_ratio >= 1.0):
            return dense(h, rope)
        b, s, d = h.shape
        if s % st.block_size:
            raise invalid("seq_len", s, f"a multiple of lemo.block_size={st.block_size}")
        blocks = select_blocks(self.lemo_scores(h, rope), st.keep_ratio, st.threshold)
        st.last_kept = blocks
        if blocks.shape[-1] == s // st.block_size:
            return dense(h, rope)
        idx = token_index(blocks, st.block_size)  # (b, n) original positions
        flat = (idx + torch.arange(b, device=h.device)[:, None] * s).flatten()
        # index_select and _PutRows save only the int64 index for backward, never the full h
        hk = h.reshape(b * s, d).index_select(0, flat).view(b, -1, d)
        rope_k = (rope[0][idx], rope[1][idx]) if rope is not None else None  # original RoPE positions
        hk = dense(hk, rope_k)
        return _PutRows.apply(h.reshape(b * s, d), flat, hk.reshape(-1, d)).view(b, s, d)


_CLASSES: dict[type, type] = {}


def _lemo_class(cls: type) -> type:
    if issubclass(cls, LemoMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Lemo{cls.__name__}", (LemoMixin, cls), {})
    return _CLASSES[cls]


def apply_lemo(model: Decoder, cfg: LemoConfig | dict | None = None) -> list[int]:
    """Switch the chosen blocks of ``model`` to LeMo token elimination; returns their layer ids.

    In place, parameter names unchanged. Calling it again updates the settings. Predictors (if any)
    are attached by ``train_predictors`` / ``attach_predictors`` as ``layers.<i>.lemo_predictor``.
    """
    if cfg is None:
        cfg = LemoConfig()
    elif isinstance(cfg, dict):
        cfg = from_dict(LemoConfig, cfg, prefix="lemo")
    else:
        cfg.validate("lemo")
    n = len(model.layers)
    model.cfg.refuse_gemma("LeMo (its scores and kept-token rope are Llama's)")
    ids = sorted(int(k) for k in model.layers.keys())
    chosen = list(cfg.layers) if cfg.layers is not None else ids
    for i in chosen:
        if str(i) not in model.layers:
            raise invalid("lemo.layers", cfg.layers, f"indices of this model's layers: {ids}")
    ratios = cfg.keep_ratio if isinstance(cfg.keep_ratio, list) else [cfg.keep_ratio] * len(chosen)
    if len(ratios) != len(chosen):
        raise invalid("lemo.keep_ratio", cfg.keep_ratio, f"one ratio or {len(chosen)} ratios (one per chosen layer of {n})")
    for i, r in zip(chosen, ratios):
        block = model.layers[str(i)]
        if not isinstance(block, Block):
            raise invalid("lemo.layers", cfg.layers, f"layers that are meshwright Blocks (layer {i} is {type(block).__name__})")
        block.__class__ = _lemo_class(type(block))
        if "lemo_predictor" not in block._modules:  # keep a trained predictor when settings are updated
            block.lemo_predictor = None
        block.lemo = LayerLemo(keep_ratio=float(r), block_size=cfg.block_size, threshold=cfg.threshold, scorer=cfg.scorer,
                               aggregate=cfg.aggregate)
    return chosen


def lemo_layers(model: nn.Module) -> dict[int, nn.Module]:
    """The blocks LeMo was applied to, by layer id."""
    return {int(k): b for k, b in model.layers.items() if isinstance(b, LemoMixin)}


def set_lemo_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn elimination off (dense evaluation) or back on without undoing ``apply_lemo``."""
    for b in lemo_layers(model).values():
        b.lemo.enabled = enabled


def set_scorer(model: nn.Module, scorer: str) -> None:
    if scorer not in ("attention", "predictor"):
        raise invalid("lemo.scorer", scorer, "'attention' or 'predictor'")
    for b in lemo_layers(model).values():
        b.lemo.scorer = scorer


# ---- planner hook ---------------------------------------------------------------------------------


def kept_tokens(seq_len: int, keep_ratio: float, block_size: int) -> int:
    """Tokens a LeMo layer keeps for a sequence (the same rule as ``select_blocks``)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise invalid("lemo.keep_ratio", keep_ratio, "a keep ratio in (0, 1]")
    if block_size < 1 or seq_len % block_size:
        raise invalid("lemo.block_size", block_size, f"a positive divisor of seq_len={seq_len}")
    n_blocks = seq_len // block_size
    return min(n_blocks, max(1, math.ceil(keep_ratio * n_blocks - 1e-9))) * block_size


def dense_layer_activation_bytes_per_token(cfg, lora_rank: int | None = None, elem_bytes: int = 4) -> int:
    """Bytes autograd saves per token in one meshwright Llama Block (fp32, CPU SDPA), for full
    fine-tuning (``lora_rank=None``) or LoRA on wq/wk/wv/wo with a frozen base.

    Derived from what ``Block.forward`` saves (and checked against ``count_saved_bytes`` in
    tests/unit/test_lemo.py): each RMSNorm keeps its input and rsqrt (+ the pre-weight output when
    its weight trains); the q/k/v input; SDPA keeps rotated q, k and v repeated to all heads, its
    output (which is also wo's input) and a log-sum-exp per head; the SwiGLU keeps w1 and w3
    outputs and silu(w1) (+ the gated product when w2 trains). LoRA adds its rank-r middles.
    The RoPE tables are shared buffers (a constant, not per token) and are left out.
    """
    if cfg.arch != "llama" or cfg.n_experts:
        raise invalid("model.arch", cfg.arch, "a dense 'llama' model for the analytic LeMo activation model")
    d, q_dim, heads, f = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_heads, cfg.ffn_dim
    attention = 4 * q_dim + heads  # q, k, v (all heads), out; logsumexp
    if lora_rank is None:
        floats = 2 * (2 * d + 1) + 2 * d + attention + 4 * f
    else:
        floats = 2 * (d + 1) + d + attention + 4 * lora_rank + 3 * f
    return floats * elem_bytes


def lemo_extra_bytes_per_kept_token(cfg, elem_bytes: int = 4) -> int:
    """What a LeMo layer adds per kept token: the int64 row index and the gathered RoPE cos/sin."""
    return 8 + (2 * (cfg.head_dim // 2) * elem_bytes if cfg.arch == "llama" else 0)


def lemo_activation_bytes(per_token_bytes: int, seq_len: int, micro_batch: int, keep_ratio: float | None,
                          block_size: int = 64, extra_per_kept_token: int = 8) -> int:
    """Planner hook: activation bytes one layer saves for backward under LeMo (fine-tuning only).

    ``per_token_bytes`` is the planner's dense per-token activation estimate for the layer (e.g.
    ``dense_layer_activation_bytes_per_token``, or a measured ``count_saved_bytes`` / tokens). A LeMo
    layer saves that for its kept tokens only, plus ``extra_per_kept_token`` (the int64 index and,
    with RoPE, the gathered cos/sin: ``lemo_extra_bytes_per_kept_token``); ``keep_ratio=None`` = dense.
    The planner may use LeMo only for fine-tuning and only with ``--allow lemo`` (see ``check_lemo_allowed``).
    """
    if keep_ratio is None:
        return per_token_bytes * seq_len * micro_batch
    kept = kept_tokens(seq_len, keep_ratio, block_size)
    return (per_token_bytes + extra_per_kept_token) * kept * micro_batch


def check_lemo_allowed(task: str, allow: Sequence[str]) -> None:
    """One-line error unless LeMo may be used: fine-tuning (it changes numerics) with ``--allow lemo``."""
    if "lemo" not in allow:
        raise invalid("savers.lemo", "set", "null, or pass --allow lemo to let the planner drop tokens")
    if task != "finetune":
        raise invalid("task", task, "'finetune' (LeMo drops tokens; use it for fine-tuning, not pre-training)")


__all__ = [
    "LemoConfig", "LayerLemo", "apply_lemo", "attention_block_scores", "select_blocks", "token_index",
    "topk_recall", "aggregate_blocks", "lemo_layers", "set_lemo_enabled", "set_scorer", "kept_tokens", "lemo_activation_bytes",
    "dense_layer_activation_bytes_per_token", "lemo_extra_bytes_per_kept_token",
    "check_lemo_allowed",
]
