"""LoRA-style low-rank adapters: y = x W^T + scale * (dropout(x) A^T) B^T with the base frozen.

Applied to a plain model by one function, like every memory saver. The adapted ``nn.Linear`` keeps
its class hierarchy and parameter names (``wq.weight`` stays ``wq.weight``; adapters add
``wq.lora_A``/``wq.lora_B``), so checkpoints of the base weights load unchanged and other savers'
benchmarks can reuse it for "dense LoRA fine-tuning" baselines.

With ``seed`` the A matrices are drawn from a generator keyed by (seed, module name), not from the global
stream: the trainer's one-process model and every distributed layout (built on ``meta``, materialised per
rank; ``init_adapters``) then start from the same adapters, and the global RNG (dropout) is left untouched.
``merge_lora`` folds the adapters back into plain ``nn.Linear`` weights (W + scale * B @ A) for export.
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from meshwright.errors import invalid

if TYPE_CHECKING:
    from meshwright.config import LoraConfig, ModelConfig
    from meshwright.models.hf_weights import Box

ADAPTER_NAMES = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` plus a rank-r update; B starts at zero so the adapted model equals the base."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_scale: float
    lora_dropout: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return base + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.lora_scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.lora_A.shape[0]}"


def is_adapter_param(name: str) -> bool:
    """Whether a parameter name (``layers.0.attention.wq.lora_A``) is a LoRA adapter's."""
    return name.rsplit(".", 1)[-1] in ADAPTER_NAMES


def adapter_a(name: str, rank: int, in_features: int, seed: int) -> torch.Tensor:
    """The initial A of the adapter on module ``name``: kaiming-uniform (a=sqrt(5), nn.Linear's and PEFT's),
    drawn on the CPU from a generator keyed by (seed, name) so that every layout draws the same values."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    a = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
    return a


def _adapt(module: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, name: str = "",
           seed: int | None = None) -> None:
    w = module.weight
    module.__class__ = LoRALinear  # keep names and the isinstance(nn.Linear) contract
    module.lora_A = nn.Parameter(torch.empty(rank, module.in_features, device=w.device, dtype=w.dtype))
    module.lora_B = nn.Parameter(torch.zeros(module.out_features, rank, device=w.device, dtype=w.dtype))
    if w.device.type != "meta":  # on meta: drawn when materialised (init_adapters)
        with torch.no_grad():
            if seed is None:
                nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
            else:
                module.lora_A.copy_(adapter_a(name, rank, module.in_features, seed))
    module.lora_scale = alpha / rank
    module.lora_dropout = float(dropout)


def apply_lora(model: nn.Module, rank: int, targets: Sequence[str] = ("wq", "wk", "wv", "wo"),
               alpha: float | None = None, freeze_base: bool = True, dropout: float = 0.0,
               seed: int | None = None) -> list[str]:
    """Add rank-``rank`` adapters to every ``nn.Linear`` whose own name is in ``targets``.

    Freezes every other parameter (the base) when ``freeze_base``; returns the adapted module names.
    ``alpha`` defaults to ``rank`` (scale 1), as in the LoRA paper's common setting. ``dropout`` applies to the
    adapter's input only (PEFT's ``lora_dropout``). ``seed``: A keyed by (seed, module name) (``adapter_a``);
    None draws from the global stream (the benchmarks' behaviour).
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise invalid("lora.rank", rank, "a positive integer")
    targets = tuple(targets)
    if not targets:
        raise invalid("lora.targets", list(targets), "a non-empty list of linear-layer names such as wq, wk, wv, wo")
    scale_alpha = float(rank if alpha is None else alpha)
    if scale_alpha <= 0:
        raise invalid("lora.alpha", alpha, "a positive number or null (= rank)")
    if not 0.0 <= dropout < 1.0:
        raise invalid("lora.dropout", dropout, "a number in [0, 1)")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    adapted = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear) and not isinstance(module, LoRALinear):
            if rank > min(module.in_features, module.out_features):
                raise invalid("lora.rank", rank, f"at most min(in, out)={min(module.in_features, module.out_features)} for {name}")
            _adapt(module, rank, scale_alpha, dropout, name, seed)
            adapted.append(name)
    if not adapted:
        names = sorted({n.rsplit('.', 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise invalid("lora.targets", list(targets), f"names of linear layers in the model: {names}")
    return adapted


@torch.no_grad()
def init_adapters(chunks: Iterable[nn.Module], seed: int, boxes: "dict[str, Box] | None" = None) -> None:
    """Fill the adapters of materialised (``to_empty``) chunks: A keyed by (seed, module name) as the one-process
    ``apply_lora(seed=seed)`` draws it, B zero. A DTensor (FSDP2, DTensor tp) shard receives its own slice of the
    full A, and so does a plain shard cut by hand whose (global shape, offset) is in ``boxes`` (megatron-core tp's
    adapter layers, parallel/megatron_lora.py: any module with ``lora_A``/``lora_B`` parameters)."""
    from meshwright.parallel.meta_init import _copy_shard

    boxes = boxes or {}
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if isinstance(getattr(module, "lora_A", None), nn.Parameter):
                box_a, box_b = boxes.get(f"{name}.lora_A"), boxes.get(f"{name}.lora_B")
                rank, fan_in = box_a[0] if box_a is not None else module.lora_A.shape
                out = box_b[0][0] if box_b is not None else module.lora_B.shape[0]
                _copy_shard(module.lora_A, adapter_a(name, rank, fan_in, seed).to(module.lora_A.device), box_a)
                _copy_shard(module.lora_B, torch.zeros((out, rank), device=module.lora_B.device), box_b)


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight (W + scale * B @ A, in fp32) and turn the module back into a plain
    ``nn.Linear``: the model is then the plain architecture, as ``meshwright export --hf`` writes it. Returns the
    merged module names."""
    merged = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            delta = (module.lora_B.float() @ module.lora_A.float()) * module.lora_scale
            module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
            for attr in ADAPTER_NAMES:
                delattr(module, attr)
            for attr in ("lora_scale", "lora_dropout"):
                module.__dict__.pop(attr, None)
            module.__class__ = nn.Linear
            merged.append(name)
    return merged


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (what the optimizer should see in LoRA fine-tuning)."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


__all__ = ["LoRALinear", "apply_lora", "apply_lora_config", "init_adapters", "is_adapter_param", "lora_parameters", "lora_state_bytes", "merge_lora"]


def apply_lora_config(model: nn.Module, cfg: "LoraConfig", seed: int) -> list[str]:
    """The trainer's ``lora:`` section on a built (or meta) model: adapters keyed by ``seed``, base frozen, the
    ``modules_to_save`` trained in full beside them. Returns the adapted module names."""
    adapted = apply_lora(model, cfg.rank, cfg.targets, cfg.alpha, dropout=cfg.dropout, seed=seed)
    _check_expert_targets(model, cfg.targets, adapted)
    for name in cfg.modules_to_save:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return adapted


def _check_expert_targets(model: nn.Module, targets: Sequence[str], adapted: list[str]) -> None:
    """One line where a target names only MoE experts' weights here (w1/w2/w3 of a model whose blocks are all MoE):
    stacked expert weights are not linears and carry no adapters, so the target would train nothing (it used to be
    dropped without a word). On dense blocks between MoE blocks the same names are linears and adapt."""
    from meshwright.memory.lora_cost import EXPERT_TARGETS
    from meshwright.models.moe import moe_layers

    if not moe_layers(model):
        return
    for i, t in enumerate(targets):
        if t in EXPERT_TARGETS and not any(n.rsplit(".", 1)[-1] == t for n in adapted):
            raise invalid(f"lora.targets[{i}]", t, "a module with adapters: on this model's MoE blocks w1/w2/w3 are "
                          "the experts' stacked weights, which carry none (target the attention: wq, wk, wv, wo)")


def lora_state_bytes(model_cfg: "ModelConfig", cfg: "LoraConfig") -> dict[str, int]:
    """Bytes of LoRA training state on one device (fp32, AdamW), counted on a ``meta`` model: ``weights`` (the
    frozen base and the adapters), ``grads`` and ``optimizer`` (AdamW's two moments) of the trainable parameters
    only, ``trainable`` their count. The frozen base has neither gradients nor optimizer state."""
    from meshwright.models import build_model

    model = build_model(model_cfg, device="meta")
    apply_lora_config(model, cfg, seed=0)
    params = list(dict.fromkeys(model.parameters()))  # tied weights once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"weights": 4 * sum(p.numel() for p in params), "grads": 4 * trainable, "optimizer": 8 * trainable,
            "trainable": trainable}
