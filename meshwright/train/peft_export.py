"""A LoRA run's adapters as a PEFT adapter directory (``meshwright export CKPT --peft OUT``).

``adapter_config.json`` + ``adapter_model.safetensors``, as ``peft.PeftModel.from_pretrained(base, OUT)`` and
vLLM's LoRA loader read them: keys ``base_model.model.<HF module>.lora_A.weight`` / ``.lora_B.weight`` (and
``base_model.model.<HF module>.weight`` for ``modules_to_save``), ``r``, ``lora_alpha``, ``target_modules`` in
Hugging Face names, ``base_model_name_or_path`` = the run's ``init_from``. The HF module of each adapter is the one
its base weight's ``Source`` reads (models/hf_weights.py), and B's rows take the same rotary permutation back
to transformers' rotate-half order as the base rows of q/k (A's columns are inputs: never permuted). Models whose
adapted linears are fused or transposed in the HF layout (GPT-2's c_attn, Phi-3's qkv_proj/gate_up_proj) have no
per-module PEFT equivalent: refused in one line (``--hf`` writes them merged). Adapters on MoE experts
(``experts.gate_up_proj``/``down_proj``) are written as PEFT's ``target_parameters`` adapters on transformers' fused
experts (``peft_tensors``); ``train/peft_import.py`` reads such a directory back into our model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from meshwright.config import ModelConfig, TrainConfig
from meshwright.config.io import check_output_path
from meshwright.config.schema import LORA_EXPERT_TARGETS
from meshwright.errors import invalid
from meshwright.memory.lora import ExpertAdapter, LoRALinear
from meshwright.models.hf_weights import EXPORT_MARK, Source, _KeyOnlyReader, rotate_half_to_pairs, weight_sources
from meshwright.models.moe import GroupedExperts, expert_adapters
from meshwright.train.hf_export import check_outside_run, export_hf, load_run_model

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def export_peft(ckpt: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """Write ``out`` (adapter_config.json + adapter_model.safetensors) from LoRA checkpoint ``ckpt`` (an adapter-only
    one too: its base is rebuilt and checked, from ``base`` where given, as ``export_hf`` does)."""
    return export_hf(ckpt, out, writer=_write, base=base)


def _write(step_dir: Path, run_dir: Path, out: str | Path, base: str | Path | None = None) -> Path:
    check_output_path(out, "--peft", directory=True)
    check_outside_run(out, run_dir, "--peft")
    check_peft_dir(out)
    model, model_cfg, cfg = load_run_model(step_dir, run_dir, base)
    if cfg.lora is None:
        raise invalid("--peft", str(out), "the export of a LoRA run (this run has no lora: section; use --hf)")
    tensors, targets, saved = peft_state_dict(model, model_cfg, cfg)
    config = adapter_config(cfg, targets, saved)
    _write_atomic(Path(out), tensors, config)
    return Path(out)


def check_peft_dir(out: str | Path) -> None:
    """``out`` may receive the adapter files: new, without them, or an earlier ``--peft`` export (its safetensors
    carry our mark); another adapter is never replaced."""
    d = Path(out)
    weights = d / WEIGHTS_FILE
    if not d.is_dir() or not ((d / CONFIG_FILE).exists() or weights.exists()):
        return
    from meshwright.models.hf_weights import _written_by_save_hf

    if not (weights.is_file() and _written_by_save_hf(weights)):
        raise invalid("--peft", str(out), f"a new directory, one without {CONFIG_FILE}/{WEIGHTS_FILE}, or an earlier "
                      f"`meshwright export --peft` (this one holds another adapter; it is left alone)")


@dataclass(frozen=True)
class PeftTensor:
    """One adapter tensor in both layouts: ``key`` in the PEFT file, ``param`` ours; ``to_peft`` / ``from_peft``
    convert a tensor between them (the q/k rotary rows of B; the experts' stacking)."""

    key: str
    param: torch.nn.Parameter
    to_peft: Callable[[torch.Tensor], torch.Tensor]
    from_peft: Callable[[torch.Tensor], torch.Tensor]
    target: str  # the PEFT target_modules / target_parameters entry it belongs to


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def peft_tensors(model: torch.nn.Module, model_cfg: ModelConfig) -> list[PeftTensor]:
    """Every adapter tensor of the adapted ``model`` with its PEFT key and layout (export and import share it).

    Linear adapters: ``<HF module>.lora_A.weight`` / ``.lora_B.weight``. Expert adapters sit, as PEFT's ParamWrapper
    puts them, on transformers' fused experts module (``model.layers.N.mlp.experts``): A (r * experts, in) with
    expert-major rows, B (out, r * experts) whose column j * experts + e is expert e's rank-j column; with both
    gate_up_proj and down_proj adapted PEFT nests the wrappers in the parameters' order (gate_up_proj first, inside:
    ``experts.base_layer.lora_A``) and down_proj's is the outer one (``experts.lora_A``)."""
    sources = weight_sources(model_cfg, _KeyOnlyReader(model_cfg))  # type: ignore[arg-type]
    out: list[PeftTensor] = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            src = _plain_source(sources.get(f"{name}.weight"), name, model_cfg)
            hf_module = src.key.removesuffix(".weight")
            to_b, from_b = _same, _same
            if src.rope_heads:  # our q/k rows are interleaved pairs; transformers' are rotate-half halves
                heads, rd = src.rope_heads, src.rope_dim
                to_b = lambda b, h=heads, r=rd: rotate_half_to_pairs(b, h, r, inverse=True)  # noqa: E731
                from_b = lambda b, h=heads, r=rd: rotate_half_to_pairs(b, h, r)  # noqa: E731
            target = hf_module.rsplit(".", 1)[-1]
            out.append(PeftTensor(f"{PREFIX}{hf_module}.lora_A.weight", module.lora_A, _same, _same, target))
            out.append(PeftTensor(f"{PREFIX}{hf_module}.lora_B.weight", module.lora_B, to_b, from_b, target))
        elif isinstance(module, GroupedExperts):
            out += _expert_tensors(module, name, sources, model_cfg)
        elif isinstance(module, ExpertAdapter) and module.lora_A.shape[0] != module.total_experts:
            raise invalid("--peft", name, "the whole experts (an expert-parallel shard; load the checkpoint in one "
                          "process, as export does)")
    return out


def _expert_tensors(module: GroupedExperts, name: str, sources: dict, model_cfg: ModelConfig) -> list[PeftTensor]:
    gate_up, down = expert_adapters(module)
    adapters = [(t, a) for t, a in (("gate_up_proj", gate_up), ("down_proj", down)) if a is not None]
    if not adapters:
        return []
    router = name.rsplit(".", 1)[0] + ".router.weight"  # layers.N.feed_forward.router.weight
    src = sources.get(router)
    if not isinstance(src, Source):
        raise invalid("--peft", name, f"experts of a Mixtral or Qwen3-MoE model ({model_cfg.arch} has no "
                      f"transformers experts module to adapt); export the merged model with --hf instead")
    hf_module = src.key.rsplit(".", 3)[0] + ".mlp.experts"  # model.layers.N.block_sparse_moe.gate.weight
    out = []
    for attr, adapter in adapters:
        n, rank, fan_in = adapter.lora_A.shape
        fan_out = adapter.lora_B.shape[1]
        wrapper = f"{hf_module}.base_layer" if attr == "gate_up_proj" and len(adapters) == 2 else hf_module
        out.append(PeftTensor(
            f"{PREFIX}{wrapper}.lora_A.weight", adapter.lora_A,
            lambda a, n=n, r=rank, i=fan_in: a.reshape(n * r, i),
            lambda a, n=n, r=rank, i=fan_in: a.reshape(n, r, i), f"experts.{attr}"))
        out.append(PeftTensor(
            f"{PREFIX}{wrapper}.lora_B.weight", adapter.lora_B,
            lambda b, n=n, r=rank, o=fan_out: b.permute(1, 2, 0).reshape(o, r * n),
            lambda b, n=n, r=rank, o=fan_out: b.reshape(o, r, n).permute(2, 0, 1), f"experts.{attr}"))
    return out


def peft_state_dict(model: torch.nn.Module, model_cfg: ModelConfig, cfg: TrainConfig
                    ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(PEFT tensors, target_modules and target_parameters, modules_to_save) in Hugging Face names for the adapted
    ``model``."""
    sources = weight_sources(model_cfg, _KeyOnlyReader(model_cfg))  # type: ignore[arg-type]
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for t in peft_tensors(model, model_cfg):
        tensors[t.key] = t.to_peft(t.param.detach().float().cpu()).contiguous()
        targets.add(t.target)
    saved = []
    lora = cfg.lora
    assert lora is not None
    if lora.modules_to_save and model_cfg.tie_embeddings:
        raise invalid("lora.modules_to_save", lora.modules_to_save, "[] for the --peft export of a model with tied "
                      "embeddings (PEFT would copy one of the tied modules; use --hf, which writes them merged)")
    state = model.state_dict()
    for mod in lora.modules_to_save:
        src = _plain_source(sources.get(f"{mod}.weight"), mod, model_cfg)
        tensors[PREFIX + src.key] = state[f"{mod}.weight"].detach().float().cpu().contiguous()
        saved.append(src.key.removesuffix(".weight").rsplit(".", 1)[-1])
    return tensors, sorted(targets), saved


def _plain_source(src: Any, name: str, model_cfg: ModelConfig) -> Source:
    """The HF tensor ``name``'s weight is, when it is one whole, untransposed tensor (PEFT adapts whole modules)."""
    if not isinstance(src, Source) or src.transpose or src.offset or src.fused_rows or not src.exact:
        raise invalid("--peft", name, f"a module with its own Hugging Face linear: {model_cfg.arch} "
                      f"{'(fused_proj) ' if model_cfg.fused_proj else ''}fuses or transposes it "
                      f"({getattr(src, 'key', '?')}); export the merged model with --hf instead")
    return src


def adapter_config(cfg: TrainConfig, targets: list[str], saved: list[str]) -> dict[str, Any]:
    """PEFT's LoraConfig fields for this run (those PEFT 0.x reads; the rest take PEFT's defaults). ``targets``: the
    modules (``q_proj``) and, in PEFT's ``target_parameters``, the experts' weights (``experts.gate_up_proj``)."""
    lora = cfg.lora
    assert lora is not None
    base = None
    if cfg.init_from is not None:
        p = Path(cfg.init_from)
        base = str(p.resolve()) if p.exists() else cfg.init_from
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
            "lora_alpha": float(lora.rank if lora.alpha is None else lora.alpha), "lora_dropout": float(lora.dropout),
            "target_modules": [t for t in targets if t not in LORA_EXPERT_TARGETS],
            "target_parameters": [t for t in targets if t in LORA_EXPERT_TARGETS] or None,
            "modules_to_save": saved or None, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": base, "revision": None}


def _write_atomic(out: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Each file through a temporary name and a rename: a reader never sees half an adapter."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c = out / f".{WEIGHTS_FILE}.tmp", out / f".{CONFIG_FILE}.tmp"
    save_file(tensors, str(tmp_w), metadata={"format": "pt", **EXPORT_MARK})
    tmp_c.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp_w, out / WEIGHTS_FILE)
    os.replace(tmp_c, out / CONFIG_FILE)
