"""Segment-based LM loss: the output head and cross entropy run over sequence chunks.

The logits of a whole long context (batch x seq x vocab floats, 2x that with the log-softmax kept
for backward) never exist at once: forward keeps only the final hidden states, and backward
recomputes one chunk of logits at a time (LeMo's segment-based loss; Liger/Cut-Cross-Entropy do the
same). The result is the ordinary mean token cross entropy and its exact gradients; only fp32
summation order differs from the unsegmented computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshwright.errors import invalid


class SegmentedCrossEntropy(torch.autograd.Function):
    """mean CE of ``hidden @ weight.T (+ bias)`` against ``targets``, computed ``chunk`` rows at a time."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, ignore_index: int) -> torch.Tensor:
        n_valid = (targets != ignore_index).sum().clamp_min(1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[start:start + chunk], weight, bias).float()
            total += F.cross_entropy(logits, targets[start:start + chunk], ignore_index=ignore_index, reduction="sum")
        ctx.save_for_backward(hidden, weight, bias, targets, n_valid)
        ctx.chunk, ctx.ignore_index = chunk, ignore_index
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, bias, targets, n_valid = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        scale = grad_out.float() / n_valid
        for start in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[start:start + ctx.chunk]
            t = targets[start:start + ctx.chunk]
            # d(sum CE)/d logits = softmax - onehot, zero on ignored rows
            g = torch.softmax(F.linear(h, weight, bias).float(), dim=-1)
            valid = t != ctx.ignore_index
            rows = torch.arange(t.shape[0], device=t.device)[valid]
            g[rows, t[valid]] -= 1.0
            g[~valid] = 0.0
            g = (g * scale).to(hidden.dtype)
            if need_h:
                grad_h[start:start + ctx.chunk] = g @ weight
            if need_w:
                grad_w += g.t().float() @ h.float()
            if grad_b is not None:
                grad_b += g.float().sum(0)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None


def segmented_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                            chunk_size: int = 1024, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token CE of ``head(hidden)`` vs ``targets`` without materialising all logits.

    ``hidden`` is (batch, seq, d) or (tokens, d); ``targets`` matches its leading dims. ``chunk_size``
    counts token rows per chunk (flattened over batch and sequence).
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise invalid("lemo.loss_chunk", chunk_size, "a positive integer (token rows per loss segment)")
    if getattr(head, "cap", None) is not None:  # SoftcapLinear: the segments would compute uncapped logits
        raise invalid("model.final_softcap", head.cap, "null for the segmented loss (lemo.loss_chunk), which computes "
                      "the head's matmul itself, uncapped")
    if hidden.shape[:-1] != targets.shape:
        raise invalid("targets.shape", tuple(targets.shape), f"the leading shape of hidden, {tuple(hidden.shape[:-1])}")
    return SegmentedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias,
                                       targets.reshape(-1), chunk_size, ignore_index)


def decoder_hidden(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A meshwright Decoder's forward up to and including the final norm (the head is left out)."""
    h = model.embed(tokens)
    seq_len = h.shape[1]
    if seq_len > model.cfg.max_seq_len:
        raise invalid("seq_len", seq_len, f"at most model.max_seq_len={model.cfg.max_seq_len}")
    rope = model.rope(seq_len)
    for layer in model.layers.values():
        h = layer(h, rope)
    return model.norm(h) if model.norm is not None else h


def segmented_lm_loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor,
                      chunk_size: int = 1024, ignore_index: int = -100) -> torch.Tensor:
    """``lm_loss(model(tokens), targets)`` computed with the segmented head + loss."""
    return segmented_cross_entropy(decoder_hidden(model, tokens), model.output, targets, chunk_size, ignore_index)


__all__ = ["SegmentedCrossEntropy", "segmented_cross_entropy", "segmented_lm_loss", "decoder_hidden"]
