"""LoRA-style low-rank adapters: y = x W^T + scale * (dropout(x) A^T) B^T with the base frozen.

Applied to a plain model by one function, like every memory saver. The adapted ``nn.Linear`` keeps
its class hierarchy and parameter names (``wq.weight`` stays ``wq.weight``; adapters add
``wq.lora_A``/``wq.lora_B``), so checkpoints of the base weights load unchanged and other savers'
benchmarks can reuse it for "dense LoRA fine-tuning" baselines.

With ``seed`` the A matrices are drawn from a generator keyed by (seed, module name), not from the global
stream: the trainer's one-process model and every distributed layout (built on ``meta``, materialised per
rank; ``init_adapters``) then start from the same adapters, and the global RNG (dropout) is left untouched.
``merge_lora`` folds the adapters back into plain ``nn.Linear`` weights (W + scale * B @ A) for export.

MoE experts are stacked weights, not linears: the targets ``experts.gate_up_proj`` / ``experts.down_proj`` (PEFT's
``target_parameters`` spelling on transformers' fused experts) put an ``ExpertAdapter`` beside them with PEFT
ParamWrapper's math, one rank-r update per expert: gate_up has ONE A per expert shared by w1 (gate) and w3 (up) and a
B whose rows are gate's then up's, as PEFT adapts transformers' ``gate_up_proj``; down_proj adapts w2. Their A and B
are stacked over experts (dim 0), so expert parallelism shards them with the experts (parallel/expert_parallel.py).
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


class ExpertAdapter(nn.Module):
    """LoRA on one stacked expert weight (PEFT's ``ParamWrapper`` on a 3-D parameter): expert e's weight acts as
    W[e] + scale * B[e] @ A[e], A (experts, r, in), B (experts, out, r), B zero at first. An expert-parallel shard holds
    experts [first_expert, first_expert + n) of ``total_experts``; its A is that slice of the full model's draw."""

    def __init__(self, n_experts: int, rank: int, in_features: int, out_features: int, scale: float,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 first_expert: int = 0, total_experts: int | None = None) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(n_experts, rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(n_experts, out_features, rank, device=device, dtype=dtype))
        self.lora_scale = float(scale)
        self.first_expert = first_expert
        self.total_experts = n_experts if total_experts is None else total_experts

    def shard(self, lo: int, hi: int) -> "ExpertAdapter":
        """Experts [lo, hi) of this adapter (their A and B rows), as a new adapter with the same requires_grad."""
        _, rank, fan_in = self.lora_A.shape
        out = ExpertAdapter(hi - lo, rank, fan_in, self.lora_B.shape[1], self.lora_scale, device="meta",
                            first_expert=self.first_expert + lo, total_experts=self.total_experts)
        for attr in ADAPTER_NAMES:
            full = getattr(self, attr)
            setattr(out, attr, nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))
        return out

    @torch.no_grad()
    def reset(self, name: str, seed: int, box: "Box | None" = None) -> None:
        """A as the one-process model draws it for module ``name`` (PEFT's nn.Linear(in, r * experts) init, rows
        expert-major, keyed by (seed, name)) -- this shard's rows of it: an ep shard's ``box`` (the runtime's
        ``shard_boxes``), a DTensor's placements -- and B zero."""
        from meshwright.parallel.meta_init import _copy_shard

        _, rank, fan_in = self.lora_A.shape
        full = adapter_a(name, self.total_experts * rank, fan_in, seed).view(self.total_experts, rank, fan_in)
        if box is None and not hasattr(self.lora_A, "to_local") and self.lora_A.shape[0] != self.total_experts:
            raise RuntimeError(f"{name}.lora_A: an expert shard ({self.lora_A.shape[0]} of {self.total_experts} "
                               f"experts) with no box (the runtime's shard_boxes)")
        _copy_shard(self.lora_A, full.to(self.lora_A.device), box)
        self.lora_B.zero_()

    def delta(self) -> torch.Tensor:
        """scale * B @ A per expert, (experts, out, in), in fp32 (merging)."""
        return torch.einsum("eor,eri->eoi", self.lora_B.float(), self.lora_A.float()) * self.lora_scale

    def extra_repr(self) -> str:
        n, rank, fan_in = self.lora_A.shape
        return (f"experts={n} of {self.total_experts} from {self.first_expert}, in={fan_in}, "
                f"out={self.lora_B.shape[1]}, lora_rank={rank}")


def expert_target_names() -> tuple[str, ...]:
    from meshwright.config.schema import LORA_EXPERT_TARGETS

    return tuple(LORA_EXPERT_TARGETS)


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
    experts = [t for t in targets if t in expert_target_names()]
    if experts and dropout:
        raise invalid("lora.dropout", dropout, f"0 with expert targets ({', '.join(experts)}): PEFT's "
                      f"target_parameters adapters take no dropout, and neither do ours")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear) and not isinstance(module, LoRALinear):
            if rank > min(module.in_features, module.out_features):
                raise invalid("lora.rank", rank, f"at most min(in, out)={min(module.in_features, module.out_features)} for {name}")
            _adapt(module, rank, scale_alpha, dropout, name, seed)
            adapted.append(name)
        elif experts:
            adapted += _adapt_experts(module, name, experts, rank, scale_alpha, seed)
    for i, t in enumerate(targets):
        if t in experts and not any(n.endswith(f".{t}") for n in adapted):
            raise invalid(f"lora.targets[{i}]", t, "a target of this model: it has no MoE block whose stacked experts "
                          "it could adapt (for dense MLPs: w1, w2, w3)")
    if not adapted:
        names = sorted({n.rsplit('.', 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise invalid("lora.targets", list(targets), f"names of linear layers in the model: {names}")
    return adapted


def _adapt_experts(module: nn.Module, name: str, targets: Sequence[str], rank: int, alpha: float,
                   seed: int | None) -> list[str]:
    """``ExpertAdapter``s on an unsharded ``GroupedExperts`` for the expert ``targets``; their module names."""
    from meshwright.models.moe import GroupedExperts

    if not isinstance(module, GroupedExperts):
        return []
    n, hidden, d = module.w1.shape
    shapes = {"gate_up_proj": (d, 2 * hidden), "down_proj": (hidden, d)}  # (in, out) per expert
    done = []
    for t in targets:
        attr = t.rsplit(".", 1)[-1]
        if getattr(module, attr, None) is not None:
            continue
        fan_in, fan_out = shapes[attr]
        if rank > min(fan_in, fan_out):
            raise invalid("lora.rank", rank,
                          f"at most min(in, out)={min(fan_in, fan_out)} for {name}.{attr} (per expert)")
        w = module.w1
        adapter = ExpertAdapter(n, rank, fan_in, fan_out, alpha / rank, device=w.device, dtype=w.dtype)
        setattr(module, attr, adapter)
        if w.device.type != "meta":  # on meta: drawn when materialised (init_adapters)
            if seed is None:
                with torch.no_grad():
                    nn.init.kaiming_uniform_(adapter.lora_A.view(n * rank, fan_in), a=math.sqrt(5))
            else:
                adapter.reset(f"{name}.{attr}", seed)
        done.append(f"{name}.{attr}")
    return done


@torch.no_grad()
def init_adapters(chunks: Iterable[nn.Module], seed: int, boxes: "dict[str, Box] | None" = None) -> None:
    """Fill the adapters of materialised (``to_empty``) chunks: A keyed by (seed, module name) as the one-process
    ``apply_lora(seed=seed)`` draws it, B zero. A DTensor (FSDP2, DTensor tp) shard receives its own slice of the
    full A, and so does a plain shard cut by hand whose (global shape, offset) is in ``boxes`` (megatron-core tp's
    adapter layers, parallel/megatron_lora.py: any module with ``lora_A``/``lora_B`` parameters; an expert-parallel
    ``ExpertAdapter``'s experts' rows, ``meta_init.ep_boxes``)."""
    from meshwright.parallel.meta_init import _copy_shard

    boxes = boxes or {}
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, ExpertAdapter):  # stacked over experts; an ep shard draws its box's rows
                module.reset(name, seed, boxes.get(f"{name}.lora_A"))
            elif isinstance(getattr(module, "lora_A", None), nn.Parameter):
                box_a, box_b = boxes.get(f"{name}.lora_A"), boxes.get(f"{name}.lora_B")
                rank, fan_in = box_a[0] if box_a is not None else module.lora_A.shape
                out = box_b[0][0] if box_b is not None else module.lora_B.shape[0]
                _copy_shard(module.lora_A, adapter_a(name, rank, fan_in, seed).to(module.lora_A.device), box_a)
                _copy_shard(module.lora_B, torch.zeros((out, rank), device=module.lora_B.device), box_b)


_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.")  # recompute's and compile's wrappers: not in the names


@torch.no_grad()
def load_adapters(chunks: Iterable[nn.Module], values: "dict[str, torch.Tensor]",
                  boxes: "dict[str, Box] | None" = None) -> list[str]:
    """Set the adapters (and ``modules_to_save`` weights) of materialised chunks from ``values``: whole tensors in the
    one-process model's names and layout (a PEFT adapter read by train/peft_import.py ``peft_adapter_values``). Each
    shard takes its slice as ``init_adapters`` draws it: a DTensor (FSDP2, DTensor tp) its own, a megatron-core shard
    its ``boxes`` entry, an expert-parallel ``ExpertAdapter`` its experts' rows (its ``boxes`` entry too). Every
    adapter parameter of the chunks must have a value (one line otherwise). Returns the names set."""
    from meshwright.parallel.meta_init import _copy_shard

    boxes = boxes or {}
    done = []
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            key = name
            for w in _WRAPPERS:
                key = key.replace(w, "")
            if key not in values:
                if is_adapter_param(key):
                    raise invalid("lora.init_adapter", key, "an adapter holding every adapter of the lora section "
                                  "(this one has none for that parameter)")
                continue
            full = values[key].to(p.device)
            box = boxes.get(name, boxes.get(key))
            if box is None and not hasattr(p, "to_local") and tuple(p.shape) != tuple(full.shape):
                raise RuntimeError(f"{key}: a shard {tuple(p.shape)} of the adapter's {tuple(full.shape)} with no box "
                                   "(the runtime's shard_boxes)")
            _copy_shard(p, full, box)
            done.append(key)
    return done


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight (W + scale * B @ A, in fp32) and turn the module back into a plain
    ``nn.Linear``: the model is then the plain architecture, as ``meshwright export --hf`` writes it. Returns the
    merged module names."""
    merged = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            delta = (module.lora_B.float() @ module.lora_A.float()) * module.lora_scale
            module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
            for attr in ADAPTER_NAMES:
                delattr(module, attr)
            for attr in ("lora_scale", "lora_dropout"):
                module.__dict__.pop(attr, None)
            module.__class__ = nn.Linear
            merged.append(name)
        for attr, weights in (("gate_up_proj", ("w1", "w3")), ("down_proj", ("w2",))):
            adapter = getattr(module, attr, None)
            if isinstance(adapter, ExpertAdapter):  # W[e] + scale * B[e] @ A[e]; gate_up's B rows: w1's, then w3's
                if adapter.lora_A.shape[0] != adapter.total_experts:
                    raise invalid(name, f"experts {adapter.first_expert}.. of {adapter.total_experts}",
                                  "the whole experts to merge (an expert-parallel shard holds only its own)")
                delta = adapter.delta()
                rows = 0
                for w in weights:
                    p = getattr(module, w)
                    p.copy_((p.float() + delta[:, rows:rows + p.shape[1]]).to(p.dtype))
                    rows += p.shape[1]
                setattr(module, attr, None)
                merged.append(f"{name}.{attr}")
    return merged


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (what the optimizer should see in LoRA fine-tuning)."""
    return [p for m in model.modules() if isinstance(m, (LoRALinear, ExpertAdapter)) for p in (m.lora_A, m.lora_B)]


__all__ = ["ExpertAdapter", "LoRALinear", "apply_lora", "apply_lora_config", "init_adapters", "is_adapter_param",
           "load_adapters", "lora_adapter_params", "lora_parameters", "lora_state_bytes", "merge_lora"]


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
                          "the experts' stacked weights (target them as experts.gate_up_proj for w1 and w3, "
                          "experts.down_proj for w2, as PEFT's target_parameters do; or the attention: wq, wk, wv, wo)")


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


_ADAPTER_COUNTS: dict[str, tuple[dict[int, int], dict[int, int], int]] = {}


def lora_adapter_params(model_cfg: "ModelConfig", cfg: "LoraConfig", ep: int = 1,
                        layers: Iterable[int] | None = None, experts_only: bool = False) -> int:
    """Adapter parameters (A and B) one rank holds under expert parallelism ``ep``: each block's linear adapters
    whole (replicated over ep, like the attention they sit on) plus its expert adapters / ep (each rank holds its
    n_experts / ep experts' A and B rows). ``layers``: the block indices to count (a pipeline stage's), default all;
    ``experts_only``: the expert adapters alone (the planner's ``lora_cost.LoraStep.expert_on_rank``; ``on_rank``
    splits the linear ones over tp, the experts are not split by tp). The ``modules_to_save`` (trained in full, not adapters) are not
    counted. Counted once per config on a ``meta`` model."""
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        raise invalid("ep", ep, "a positive integer")
    if ep > 1 and (model_cfg.n_experts < 1 or model_cfg.n_experts % ep):
        from meshwright.config import divisors

        raise invalid("ep", ep, f"a divisor of n_experts={model_cfg.n_experts}: {divisors(model_cfg.n_experts)}"
                      if model_cfg.n_experts else "1 (the model has no experts)")
    key = repr((model_cfg, cfg))
    if key not in _ADAPTER_COUNTS:
        from meshwright.models import build_model

        model = build_model(model_cfg, device="meta")
        apply_lora_config(model, cfg, seed=0)
        dense: dict[int, int] = {}
        expert: dict[int, int] = {}
        outside = 0
        for name, module in model.named_modules():
            if not isinstance(module, (LoRALinear, ExpertAdapter)):
                continue
            n = module.lora_A.numel() + module.lora_B.numel()
            if not name.startswith("layers."):
                outside += n
                continue
            i = int(name.split(".")[1])
            into = expert if isinstance(module, ExpertAdapter) else dense
            into[i] = into.get(i, 0) + n
        _ADAPTER_COUNTS[key] = (dense, expert, outside)
    dense, expert, outside = _ADAPTER_COUNTS[key]
    wanted = range(model_cfg.n_layers) if layers is None else list(layers)
    if experts_only:
        return sum(expert.get(i, 0) // ep for i in wanted)
    return sum(dense.get(i, 0) + expert.get(i, 0) // ep for i in wanted) + (outside if layers is None else 0)
