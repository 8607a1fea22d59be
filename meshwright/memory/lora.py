"""LoRA-style low-rank adapters: y = x W^T + scale * (x A^T) B^T with the base frozen.

Applied to a plain model by one function, like every memory saver. The adapted ``nn.Linear`` keeps
its class hierarchy and parameter names (``wq.weight`` stays ``wq.weight``; adapters add
``wq.lora_A``/``wq.lora_B``), so checkpoints of the base weights load unchanged and other savers'
benchmarks can reuse it for "dense LoRA fine-tuning" baselines.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from meshwright.errors import invalid


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` plus a rank-r update; B starts at zero so the adapted model equals the base."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_scale: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        return base + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.lora_scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.lora_A.shape[0]}"


def _adapt(module: nn.Linear, rank: int, alpha: float) -> None:
    w = module.weight
    module.__class__ = LoRALinear  # keep names and the isinstance(nn.Linear) contract
    module.lora_A = nn.Parameter(torch.empty(rank, module.in_features, device=w.device, dtype=w.dtype))
    module.lora_B = nn.Parameter(torch.zeros(module.out_features, rank, device=w.device, dtype=w.dtype))
    nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
    module.lora_scale = alpha / rank


def apply_lora(model: nn.Module, rank: int, targets: Sequence[str] = ("wq", "wk", "wv", "wo"),
               alpha: float | None = None, freeze_base: bool = True) -> list[str]:
    """Add rank-``rank`` adapters to every ``nn.Linear`` whose own name is in ``targets``.

    Freezes every other parameter (the base) when ``freeze_base``; returns the adapted module names.
    ``alpha`` defaults to ``rank`` (scale 1), as in the LoRA paper's common setting.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise invalid("lora.rank", rank, "a positive integer")
    targets = tuple(targets)
    if not targets:
        raise invalid("lora.targets", list(targets), "a non-empty list of linear-layer names such as wq, wk, wv, wo")
    scale_alpha = float(rank if alpha is None else alpha)
    if scale_alpha <= 0:
        raise invalid("lora.alpha", alpha, "a positive number or null (= rank)")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    adapted = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear) and not isinstance(module, LoRALinear):
            if rank > min(module.in_features, module.out_features):
                raise invalid("lora.rank", rank, f"at most min(in, out)={min(module.in_features, module.out_features)} for {name}")
            _adapt(module, rank, scale_alpha)
            adapted.append(name)
    if not adapted:
        names = sorted({n.rsplit('.', 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise invalid("lora.targets", list(targets), f"names of linear layers in the model: {names}")
    return adapted


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (what the optimizer should see in LoRA fine-tuning)."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


__all__ = ["LoRALinear", "apply_lora", "lora_parameters"]
