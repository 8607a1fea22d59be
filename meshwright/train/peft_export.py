"""A LoRA run's adapters as a PEFT adapter directory (``meshwright export CKPT --peft OUT``).

``adapter_config.json`` + ``adapter_model.safetensors``, as ``peft.PeftModel.from_pretrained(base, OUT)`` and
vLLM's LoRA loader read them: keys ``base_model.model.<HF module>.lora_A.weight`` / ``.lora_B.weight`` (and
``base_model.model.<HF module>.weight`` for ``modules_to_save``), ``r``, ``lora_alpha``, ``target_modules`` in
Hugging Face names, ``base_model_name_or_path`` = the run's ``init_from``. The HF module of each adapter is the one
its base weight's ``Source`` reads (models/hf_weights.py), and B's rows take the same rotary permutation back
to transformers' rotate-half order as the base rows of q/k (A's columns are inputs: never permuted). Models whose
adapted linears are fused or transposed in the HF layout (GPT-2's c_attn, Phi-3's qkv_proj/gate_up_proj) have no
per-module PEFT equivalent: refused in one line (``--hf`` writes them merged).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from meshwright.config import ModelConfig, TrainConfig
from meshwright.config.io import check_output_path
from meshwright.errors import invalid
from meshwright.memory.lora import LoRALinear
from meshwright.models.hf_weights import EXPORT_MARK, Source, _KeyOnlyReader, rotate_half_to_pairs, weight_sources
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


def peft_state_dict(model: torch.nn.Module, model_cfg: ModelConfig, cfg: TrainConfig
                    ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """(PEFT tensors, target_modules, modules_to_save) in Hugging Face names for the adapted ``model``."""
    sources = weight_sources(model_cfg, _KeyOnlyReader(model_cfg))  # type: ignore[arg-type]
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        src = _plain_source(sources.get(f"{name}.weight"), name, model_cfg)
        hf_module = src.key.removesuffix(".weight")
        a, b = module.lora_A.detach().float().cpu(), module.lora_B.detach().float().cpu()
        if src.rope_heads:  # our q/k rows are interleaved pairs; transformers' are rotate-half halves
            b = rotate_half_to_pairs(b, src.rope_heads, src.rope_dim, inverse=True)
        tensors[f"{PREFIX}{hf_module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{hf_module}.lora_B.weight"] = b.contiguous()
        targets.add(hf_module.rsplit(".", 1)[-1])
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
    """PEFT's LoraConfig fields for this run (those PEFT 0.x reads; the rest take PEFT's defaults)."""
    lora = cfg.lora
    assert lora is not None
    base = None
    if cfg.init_from is not None:
        p = Path(cfg.init_from)
        base = str(p.resolve()) if p.exists() else cfg.init_from
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
            "lora_alpha": float(lora.rank if lora.alpha is None else lora.alpha), "lora_dropout": float(lora.dropout),
            "target_modules": targets, "modules_to_save": saved or None, "bias": "none", "fan_in_fan_out": False,
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
