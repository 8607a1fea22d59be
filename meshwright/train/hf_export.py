"""A meshwright training checkpoint -> a Hugging Face model directory (``meshwright export CKPT --hf OUT``).

The checkpoint is read with DCP into the plain model of the run's own config (``config.yaml`` of the
run directory), whatever layout wrote it; the weights are then renamed/permuted back to transformers'
layout by ``meshwright.models.hf_weights``. A LoRA run (``lora:``) is read into the adapted model and exported
merged (W + scale * B @ A: the plain architecture, which transformers and vLLM load as any model), or, with
``export_peft`` (``--peft OUT``), as a PEFT adapter directory (``train/peft_export.py``). MEFT runs are refused in
one line: their reversible blocks have no place in the plain architecture.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from meshwright.config import ModelConfig, TrainConfig, load_model_config, load_train_config
from meshwright.config.io import check_output_path
from meshwright.errors import ConfigError, invalid
from meshwright.memory.lora import apply_lora_config, merge_lora
from meshwright.models import build_model
from meshwright.models.hf_weights import check_export_dir, save_hf
from meshwright.train.build import resolve_model_config
from meshwright.train.hf_companions import COMPANIONS_DIR, companion_token_ids, export_companions
from meshwright.train.checkpoint import STATE_FILE, _first_failure, _quiet_dcp, follow_pointer, latest_checkpoint
from meshwright.train.checkpoint_io import (MANIFEST, SafeFileSystemReader, SafeLoadPlanner, read_metadata_file,
                                           verify_manifest, verify_sizes)


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


def export_hf(ckpt: str | Path, out: str | Path, writer: Callable[[Path, Path, Any], Path] | None = None) -> Path:
    """Write ``out`` (config.json + model.safetensors) from the model weights of checkpoint ``ckpt``.

    Given a run directory whose training is still running, the checkpoint ``latest`` named may be pruned while it is
    read (at the next checkpoint with keep_checkpoints=1, sooner with ckpt_async): a failure after which that
    checkpoint is gone is retried on the new ``latest``, not reported as a damaged or foreign checkpoint."""
    for attempt in range(PRUNED_RETRIES):
        step_dir, run_dir = find_run(ckpt)
        try:
            return (writer or _export)(step_dir, run_dir, out)
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


def _export(step_dir: Path, run_dir: Path, out: str | Path) -> Path:
    check_output_path(out, "--hf", directory=True)  # before the checkpoint is read
    check_outside_run(out, run_dir, "--hf")
    earlier_export = check_export_dir(out, "--hf")  # never another model's config.json/weights
    model, model_cfg, _ = load_run_model(step_dir, run_dir)
    merge_lora(model)  # a LoRA run: the adapters folded into the base weights; nothing otherwise
    save_hf(model, model_cfg, out, companion_token_ids(run_dir, model_cfg.vocab_size))
    export_companions(run_dir, out, earlier_export)  # the tokenizer and generation config the run kept
    return Path(out)


def load_run_model(step_dir: Path, run_dir: Path) -> tuple[nn.Module, ModelConfig, TrainConfig]:
    """The run's plain model (with its LoRA adapters where the run had ``lora:``) holding checkpoint ``step_dir``'s
    weights, its model config and its train config."""
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
    model = build_model(model_cfg, device="cpu")
    if cfg.lora is not None:  # the adapters' keys join the state the checkpoint fills
        apply_lora_config(model, cfg.lora, cfg.seed)
    state = {k: v for k, v in model.state_dict().items() if not (model_cfg.tie_embeddings and k == "output.weight")}
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
