"""Soft-capped attention (Gemma 2's ``attn_softcap``) without seq x seq scores: FlexAttention.

SDPA has no soft cap, so ``layers.capped_attention`` materialises the scores (seq x seq per head) and autograd keeps
them for backward. ``torch.nn.attention.flex_attention`` applies the cap as a ``score_mod`` inside a fused kernel
and the causal + sliding-window mask as a ``block_mask`` (windowed blocks skip whole tiles), saving only the output
and the log-sum-exp, as flash SDPA does. It is fused only when compiled: eager, flex_attention runs a reference that
materialises the scores anyway (and warns), so the eager model keeps ``capped_attention``.

The rule for which path runs is ``flex_capped_reason``: the runtime (``AttentionCore``, at trace time) and the
planner (``cost_model.capped_scores``) both call it, so what the planner counts is what the trainer runs.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from meshwright.models.capped_flex_rule import capped_path_note, flex_capped, flex_capped_reason  # noqa: F401


def capped_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cap: float, scale: float | None = None,
                          window: int | None = None) -> torch.Tensor:
    """``layers.capped_attention`` (causal, scores * scale capped to ``cap * tanh(s / cap)``, a sliding ``window``
    where given) as flex_attention: q (batch, heads, seq, head_dim), k/v (batch, kv_heads, seq, head_dim), kv_heads
    dividing heads (GQA without repeating k/v). Call it from compiled code: eager, flex materialises the scores."""
    s = q.shape[-2]
    if not torch.is_grad_enabled():  # flex's device check reads requires_grad even under no_grad (CPU refuses it)
        q, k, v = q.detach(), k.detach(), v.detach()
    if q.device.type == "cpu":  # inductor's CPU flex template reads a 4-d layout: a transposed view fails to lower
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()

    def score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor,
                  ki: torch.Tensor) -> torch.Tensor:
        return torch.tanh(score / cap) * cap

    if window is None:
        def mask_mod(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
            return ki <= qi
    else:
        def mask_mod(b: torch.Tensor, h: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
            return (ki <= qi) & (qi - ki < window)

    # positional B, H, Q_LEN, KV_LEN, device: the signature every torch since 2.5 shares (2.13 adds keywords)
    block_mask = create_block_mask(mask_mod, None, None, s, s, q.device)
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                          enable_gqa=k.shape[1] != q.shape[1])
