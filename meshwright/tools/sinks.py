"""Logging sinks beside log.jsonl: TensorBoard event files and Weights & Biases runs.

The trainer hands every log record to ``Sinks.write``; each sink turns the record's numbers into scalars
(per-rank lists become their max plus one scalar per rank). Both packages are optional extras imported
only when switched on (``tensorboard: true``, ``wandb: offline|online`` in the TrainConfig), so
``meshwright train`` runs where neither is installed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Protocol

from meshwright.errors import ConfigError


class Sink(Protocol):
    def write(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers, named for dashboards (per-rank lists: the max and one per rank)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                out[key] = float(value)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            out[key] = float(max(value))
            if len(value) > 1:
                out.update({f"{key}/rank{i}": float(v) for i, v in enumerate(value)})
        elif isinstance(value, dict):  # tokens_per_source: one scalar per source
            out.update({f"{key}/{k}": float(v) for k, v in value.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
    return out


def check_sink_packages(tensorboard: bool, wandb: str | None) -> None:
    """The sinks a config switches on must be importable: checked when the run starts, before the model is built."""
    import importlib.util

    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise _missing("tensorboard", True, "tensorboard")
    if wandb is not None and importlib.util.find_spec("wandb") is None:
        raise _missing("wandb", wandb, "wandb")


def _missing(field: str, value: Any, package: str) -> ConfigError:
    return ConfigError(f"{field}={value!r} needs the {package} package; valid: pip install 'meshwright[{package}]', "
                       f"or {field}: {'false' if isinstance(value, bool) else 'null'}")


class TensorBoardSink:
    """Event files under ``out_dir/tensorboard`` (``tensorboard --logdir OUT_DIR``)."""

    def __init__(self, out_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", True, "tensorboard") from None
        self.log_dir = out_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def write(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run: ``offline`` writes ``out_dir/wandb`` (upload later with ``wandb sync``); ``online`` uploads."""

    def __init__(self, out_dir: Path, mode: str, project: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", mode, "wandb") from None
        self.wandb = wandb
        self.run = wandb.init(project=project, dir=str(out_dir), mode=mode, config=config, name=out_dir.name,
                              reinit="finish_previous")

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Sinks:
    """Every sink the TrainConfig switches on (none: a no-op)."""

    def __init__(self, sinks: Optional[list[Sink]] = None) -> None:
        self.sinks: list[Sink] = sinks or []

    def write(self, record: dict[str, Any]) -> None:
        if self.sinks and "step" in record:
            values = scalars(record)
            for s in self.sinks:
                s.write(int(record["step"]), values)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
        self.sinks = []


def open_sinks(cfg: Any, out_dir: Path, config: Optional[dict[str, Any]] = None) -> Sinks:
    """The sinks ``cfg`` (a TrainConfig) asks for, writing under ``out_dir``; call on the main rank only."""
    sinks: list[Sink] = []
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(out_dir))
    if cfg.wandb:
        sinks.append(WandbSink(out_dir, cfg.wandb, cfg.wandb_project, config or {}))
    return Sinks(sinks)
