"""The LM loss taken from the final hidden states: output projection and cross entropy as one piece.

Why one piece: ``compile: true`` then compiles the head with the loss (an eager head is an unaligned cuBLAS
GEMM at gpt2's vocab, train/compile.py), and ``loss_chunk_tokens`` runs head + loss per chunk of tokens so
the batch's logits never exist (models/chunked_loss.py). Both runtimes take it from here: LocalRuntime on
the whole model, DistributedRuntime on the last pipeline stage's head (replicated or FSDP2-wrapped; never
tensor-parallel: parallel/support.py requires ``embedding.tp == 1``).
"""

from __future__ import annotations

import torch
from torch import nn

from meshwright.models.chunked_loss import chunked_lm_loss
from meshwright.train.compile import compiled_chunk_loss, compiled_head_loss


class HeadLoss:
    """``(head, hidden, targets) -> lm_loss(head(hidden), targets)``: chunked when ``loss_chunk_tokens`` > 0
    (each chunk's head + loss compiled with ``compile_backend`` if given), else head + loss in one compiled graph."""

    def __init__(self, compile_backend: str | None, loss_chunk_tokens: int = 0) -> None:
        if compile_backend is None and not loss_chunk_tokens:
            raise ValueError("HeadLoss needs compile_backend or loss_chunk_tokens > 0 (eager and unchunked: lm_loss)")
        self.chunk_tokens = loss_chunk_tokens
        chunked, compiled = bool(loss_chunk_tokens), compile_backend is not None
        self.chunk_fn = compiled_chunk_loss(compile_backend) if chunked and compiled else None  # None: eager chunks
        self.fused_fn = compiled_head_loss(compile_backend) if compiled and not chunked else None

    def __call__(self, head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.chunk_tokens:
            return chunked_lm_loss(hidden, head, targets, self.chunk_tokens, self.chunk_fn)
        return self.fused_fn(head, hidden, targets)


def head_loss(compile_backend: str | None, loss_chunk_tokens: int = 0) -> HeadLoss | None:
    """The runtime's loss from hidden states, or None when eager and unchunked: the caller keeps the plain
    path (the model's logits, then ``lm_loss``), bitwise as before."""
    if compile_backend is None and not loss_chunk_tokens:
        return None
    return HeadLoss(compile_backend, loss_chunk_tokens)
