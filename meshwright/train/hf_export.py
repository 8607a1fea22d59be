"""A meshwright training checkpoint -> a Hugging Face model directory (``meshwright export CKPT --hf OUT``).

The checkpoint is read with DCP into the plain model of the run's own config (``config.yaml`` of the
run directory), whatever layout wrote it; the weights are then renamed/permuted back to transformers'
layout by ``meshwright.models.hf_weights``. A LoRA run (``lora:``) is read into the adapted model and exported
merged (W + scale * B @ A: the plain architecture, which transformers and vLLM load as any model), or, with
``export_peft`` (``--peft OUT``), as a PEFT adapter directory (``train/peft_export.py``). An adapter-only LoRA
checkpoint has no base in it: ``rebuild_base`` makes it from its recorded source and checks its fingerprint first.
MEFT runs are refused in one line: their reversible blocks have no place in the plain architecture.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from meshwright.config import ModelConfig, TrainConfig, load_model_config, load_train_config
from meshwright.config.io import check_output_path
from meshwright.errors import ConfigError, invalid
from meshwright.memory.lora import apply_lora_config, merge_lora
from meshwright.models import build_model, from_pretrained
from meshwright.models.hf_weights import check_export_dir, save_hf
from meshwright.train.build import resolve_model_config
from meshwright.train.hf_companions import COMPANIONS_DIR, companion_token_ids, export_companions
from meshwright.train.checkpoint import STATE_FILE, _first_failure, _quiet_dcp, follow_pointer, latest_checkpoint
from meshwright.train.checkpoint_io import (MANIFEST, SafeFileSystemReader, SafeLoadPlanner, read_metadata_file,
                                           verify_manifest, verify_sizes)
from meshwright.train.lora_base import BASE_KEY, AdapterScope, base_reference, check_base, describe


def find_run(ckpt: str | Path) -> tuple[Path, Path]:
    """(checkpoint dir, run dir) for a run directory (its latest checkpoint) or a ``step_*`` directory."""
    path = Path(follow_pointer(ckpt))
    if (path / "config.yaml").is_file():
        found = latest_checkpoint(path / "ckpt")
        if found is None:
            raise invalid("CKPT", str(ckpt), "a run directory with at least one checkpoint under ckpt/")
        return found, path
    if (path / STATE_FILE).is_file() and (path.parent.parent / "config.yaml").is_file():
        return path, path.parent.parent
    raise invalid("CKPT", str(ckpt), "a run directory (with config.yaml) or one of its ckpt/step_* directories")


PRUNED_RETRIES = 3  # a run directory whose training prunes each checkpoint at the next (keep_checkpoints=1)


def export_hf(ckpt: str | Path, out: str | Path, writer: Callable[..., Path] | None = None,
              base: str | Path | None = None) -> Path:
    """Write ``out`` (config.json + model.safetensors) from the model weights of checkpoint ``ckpt``.

    Given a run directory whose training is still running, the checkpoint ``latest`` named may be pruned while it is
    read (at the next checkpoint with keep_checkpoints=1, sooner with ckpt_async): a failure after which that
    checkpoint is gone is retried on the new ``latest``, not reported as a damaged or foreign checkpoint. ``base``:
    where the base of an adapter-only LoRA checkpoint is now, when not where training read it (``rebuild_base``)."""
    for attempt in range(PRUNED_RETRIES):
        step_dir, run_dir = find_run(ckpt)
        try:
            return (writer or _export)(step_dir, run_dir, out, base)
        except ConfigError:
            if step_dir.exists() or step_dir == Path(ckpt) or attempt == PRUNED_RETRIES - 1:
                if not step_dir.exists():
                    raise ConfigError(f"CKPT={str(ckpt)!r}: checkpoint {step_dir.name} was removed while it was read "
                                      f"(pruned by the run's training); valid: a checkpoint that is kept (a larger "
                                      f"keep_checkpoints) or the export once the run has finished") from None
                raise
    raise AssertionError("unreachable")


def check_outside_run(out: str | Path, run_dir: Path, label: str) -> None:
    """An export is the user's, so it is kept out of the places the run deletes: anything under ``RUN/ckpt`` (a
    step directory goes whole when the run prunes it or ``--overwrite`` clears it, an export written into it with
    it) and the run's own ``RUN/hf`` (its tokenizer and token-id files, which ``--overwrite`` removes by name)."""
    o, run = Path(os.path.abspath(out)), Path(os.path.abspath(run_dir))
    ckpt, companions = run / "ckpt", run / COMPANIONS_DIR
    if o == ckpt or ckpt in o.parents:
        raise invalid(label, str(out), f"a directory outside {ckpt} (the run's pruning and --overwrite delete its step "
                      f"directories whole, with anything exported into them), e.g. {run / 'export'}")
    if o == companions:
        raise invalid(label, str(out), f"a directory other than the run's own {companions} (it keeps the files saved "
                      f"for export, which --overwrite deletes by name), e.g. {run / 'export'}")


def _export(step_dir: Path, run_dir: Path, out: str | Path, base: str | Path | None = None) -> Path:
    check_output_path(out, "--hf", directory=True)  # before the checkpoint is read
    check_outside_run(out, run_dir, "--hf")
    earlier_export = check_export_dir(out, "--hf")  # never another model's config.json/weights
    model, model_cfg, _ = load_run_model(step_dir, run_dir, base)
    merge_lora(model)  # a LoRA run: the adapters folded into the base weights; nothing otherwise
    save_hf(model, model_cfg, out, companion_token_ids(run_dir, model_cfg.vocab_size))
    export_companions(run_dir, out, earlier_export)  # the tokenizer and generation config the run kept
    return Path(out)


def _base_reference(step_dir: Path) -> dict[str, Any] | None:
    """The ``lora_base`` of an adapter-only checkpoint's trainer_state.json; None for a checkpoint of every weight."""
    from meshwright.train.checkpoint import _read_json

    return _read_json(step_dir / STATE_FILE).get(BASE_KEY)


def rebuild_base(ref: Any, cfg: TrainConfig, model_cfg: ModelConfig, step_dir: Path, base: str | Path | None = None
                 ) -> nn.Module:
    """The frozen base an adapter-only checkpoint was trained on, rebuilt from its source and checked against its
    fingerprint (one line otherwise): ``init_from`` (or ``base``, a copy of it elsewhere), or the seed's draw."""
    source = ref.get("source") if isinstance(ref, dict) else None
    if source == "init_from":
        saved, configured = Path(str(ref.get("init_from") or "")), Path(cfg.init_from or "")
        # where training found it (absolute), else config.yaml's init_from (relative to here), else --base
        where = Path(base) if base is not None else (saved if (saved / "config.json").is_file() else configured)
        field = "--base" if base is not None else "init_from"
        if not (where / "config.json").is_file():
            raise invalid(field, str(where), f"the Hugging Face directory of the base checkpoint {step_dir} was "
                          f"trained on ({describe(ref)}); it is missing: restore it, or name a copy with "
                          f"`meshwright export ... --base DIR`")
        run_cfg = replace(cfg, init_from=str(where))
        check_base(ref, base_reference(run_cfg, model_cfg, None), step_dir)
        return from_pretrained(where, device="cpu", cfg=model_cfg, grow_positions=ref.get("grow_positions"))
    if base is not None:
        raise invalid("--base", str(base), f"unset: checkpoint {step_dir}'s base was {describe(ref)}, not a directory")
    if source != "seed":
        check_base(ref, {}, step_dir)  # names the garbled reference
    import torch

    device = ref.get("device", "cpu")
    if ref.get("init") == "keyed" and device == "cuda" and not torch.cuda.is_available():
        raise invalid("export", "on a host without CUDA", f"a host with a GPU: checkpoint {step_dir}'s base was "
                      f"{describe(ref)} (CUDA draws differ from the CPU's)")
    check_base(ref, base_reference(cfg, model_cfg, ref.get("init"), device), step_dir)
    model = build_model(model_cfg, seed=cfg.seed, init=ref.get("init", "stream"), device=device)
    return model.to("cpu")


def load_run_model(step_dir: Path, run_dir: Path, base: str | Path | None = None
                   ) -> tuple[nn.Module, ModelConfig, TrainConfig]:
    """The run's plain model (with its LoRA adapters where the run had ``lora:``) holding checkpoint ``step_dir``'s
    weights, its model config and its train config. An adapter-only LoRA checkpoint: its base rebuilt first
    (``rebuild_base``; ``base``: a copy of init_from's directory elsewhere), the trained tensors read over it."""
    cfg = load_train_config(str(run_dir / "config.yaml"))
    if cfg.meft is not None:
        raise invalid("meft", "set", "a run without MEFT (its reversible blocks and adapters are not a Hugging Face architecture)")
    resolved = run_dir / "model.yaml"  # written by run_training: independent of init_from's directory
    source = resolved if resolved.is_file() else run_dir / "config.yaml"
    model_cfg = load_model_config(str(resolved)) if resolved.is_file() else resolve_model_config(cfg)
    manifest = (step_dir / MANIFEST).is_file()
    if manifest:  # a damaged checkpoint is refused, not exported half-read
        verify_manifest(step_dir)
    metadata = read_metadata_file(step_dir / ".metadata")  # allow-listed unpickling, as a resume reads it
    if not manifest:  # no checksums: a short or missing shard is still named, not "does not hold the model"
        verify_sizes(step_dir, metadata)
    base_ref = _base_reference(step_dir)
    if base_ref is not None and cfg.lora is None:
        raise invalid("lora", None, f"the lora: section of the run (checkpoint {step_dir} holds LoRA adapters only; "
                      f"its config.yaml has none)")
    if base_ref is None:  # every weight is in the checkpoint: nothing to rebuild
        if base is not None:
            raise invalid("--base", str(base), f"unset: checkpoint {step_dir} holds every weight (--base is for a "
                          f"LoRA run's adapter-only checkpoints)")
        model = build_model(model_cfg, device="cpu")
    else:
        model = rebuild_base(base_ref, cfg, model_cfg, step_dir, base)
    if cfg.lora is not None:  # the adapters' keys join the state the checkpoint fills
        apply_lora_config(model, cfg.lora, cfg.seed)
    state = {k: v for k, v in model.state_dict().items() if not (model_cfg.tie_embeddings and k == "output.weight")}
    if base_ref is not None:  # adapter-only: the rebuilt base stays, the trained tensors are read over it
        scope = AdapterScope(tuple(cfg.lora.modules_to_save), bool(model_cfg.tie_embeddings), base_ref)
        state = {k: v for k, v in state.items() if scope.carries(k)}
    try:
        with _quiet_dcp():
            dcp.load({"model": state}, storage_reader=SafeFileSystemReader(str(step_dir)), planner=SafeLoadPlanner())
    except ConfigError:
        raise
    except (CheckpointException, Exception) as exc:  # DCP's CheckpointException is a BaseException, named apart
        if isinstance(exc, CheckpointException):
            reason = _first_failure(exc)
        else:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = "the LoRA-adapted model" if cfg.lora is not None else "the plain model"
        raise ConfigError(f"CKPT={str(step_dir)!r} does not hold {what} of {source} ({reason}); "
                          f"valid: a checkpoint of this run's model") from None
    model.load_state_dict(state, strict=False)
    return model, model_cfg, cfg
