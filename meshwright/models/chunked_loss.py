"""Next-token cross entropy without the whole batch's logits: head matmul + loss per chunk of tokens.

The plain loss (``lm_loss``) materialises ``tokens x vocab`` logits and an fp32 copy of them, and autograd
keeps both for backward: at gpt2-small with batch 16 x 1024 that is 16k x 50k x (2 + 4 + 4) bytes, most of
the step's memory. Here each chunk's logits are computed, reduced to a summed loss and dropped; the chunk
runs under non-reentrant activation checkpointing, so backward recomputes one chunk's logits at a time
and nothing of size ``tokens x vocab`` is ever saved. Numerics equal the plain loss (the mean is the sum
of the chunk sums over the same token count) up to fp32 summation order.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # F.cross_entropy's default, as lm_loss uses it


def chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum", ignore_index=IGNORE_INDEX)


def chunked_lm_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_tokens: int,
                    chunk_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Mean cross entropy of ``head(hidden)`` against ``targets``, ``chunk_tokens`` tokens at a time.

    ``hidden`` is (batch, seq, d_model) after the final norm, ``targets`` (batch, seq); equals
    ``lm_loss(head(hidden), targets)``. ``chunk_fn`` replaces the per-chunk head + summed loss (a compiled
    ``chunk_loss_sum`` under ``compile: true``, which fuses the fp32 upcast into the loss kernel).
    """
    chunk_fn = chunk_fn or chunk_loss_sum
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} is invalid; valid: a positive number of tokens")
    h, t = hidden.flatten(0, 1), targets.flatten()
    count = (t != IGNORE_INDEX).sum().clamp_min(1)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, t.numel(), chunk_tokens):
        part = checkpoint(chunk_fn, head, h[start:start + chunk_tokens], t[start:start + chunk_tokens],
                          use_reentrant=False)
        total = total + part
    return total / count
