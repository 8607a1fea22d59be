"""Training that starts from an existing PEFT LoRA adapter (``lora.init_adapter``): one from the Hub, or one
``meshwright export --peft`` wrote.

Before anything is built (``check_init_adapter``, every rank): the directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` (a pickled ``adapter_model.bin`` is refused: nothing is unpickled), PEFT's config is one
meshwright runs (train/peft_import.py ``lora_config_from_peft``), and it agrees with the run's ``lora:`` section on
what shapes or scales the adapters -- rank, alpha (the scale), targets and modules_to_save -- each a one-line error
naming the field, our value and the adapter's. The run's own ``dropout`` and ``checkpoint`` are training settings,
not weights: they stay the run's (PEFT's ``lora_dropout`` is ignored). The adapter only adds to the base it was
trained on: ``init_from`` is required (config validation) and, where the adapter's ``base_model_name_or_path`` names
a model directory on this machine, its weights' fingerprint (train/lora_base.py ``hf_fingerprint``: content-based, so
a copy of the base passes) must be ``init_from``'s; a Hub id or a path absent here cannot be checked and is said in one
warning line.

The values are read whole (adapters are small) into the one-process model's names (``peft_adapter_values``); the
runtimes copy them over the drawn adapters, each shard its slice (memory/lora.py ``load_adapters``). A resume from a
checkpoint takes precedence: the checkpoint's adapters are loaded over them, and a resume with a checkpoint does not
read the adapter at all (train/build.py). Each checkpoint's trainer_state.json records ``init_adapter``: the path and
a SHA-256 of the two files (``adapter_reference``), as ``lora_base`` records the base.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from meshwright.config import TrainConfig
from meshwright.errors import invalid
FIELD = "lora.init_adapter"
STATE_KEY = "init_adapter"  # trainer_state.json's field
# train/peft_export.py's file names (not imported: peft_export -> hf_export -> build -> here)
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _alpha(rank: int, alpha: float | None) -> float:
    return float(rank if alpha is None else alpha)


def check_init_adapter(cfg: TrainConfig) -> str | None:
    """One line unless ``lora.init_adapter`` is a PEFT adapter this run can start from (see the module docstring);
    returns a warning line where its base cannot be checked, else None. No-op without ``init_adapter``."""
    lora = cfg.lora
    if lora is None or lora.init_adapter is None:
        return None
    from meshwright.train.peft_import import lora_config_from_peft, read_adapter_config

    root = Path(lora.init_adapter)
    if not root.is_dir():
        raise invalid(FIELD, lora.init_adapter, f"a PEFT adapter directory ({CONFIG_FILE} + {WEIGHTS_FILE}); "
                      f"{'it is a file' if root.exists() else 'it does not exist'}")
    if not (root / CONFIG_FILE).is_file():
        raise invalid(FIELD, lora.init_adapter, f"a PEFT adapter directory: it has no {CONFIG_FILE}")
    if not (root / WEIGHTS_FILE).is_file():
        pickled = [f.name for f in (root / "adapter_model.bin", root / "adapter_model.pt") if f.is_file()]
        why = (f"it holds {pickled[0]}, a pickle meshwright never loads (re-save it with PEFT's "
               f"save_pretrained(..., safe_serialization=True))" if pickled else f"it has no {WEIGHTS_FILE}")
        raise invalid(FIELD, lora.init_adapter, f"an adapter saved as safetensors ({WEIGHTS_FILE}); {why}")
    theirs = lora_config_from_peft(root)
    where = f"{root / CONFIG_FILE}"
    checks = (("rank", lora.rank, theirs.rank, "r", theirs.rank),
              ("alpha", _alpha(lora.rank, lora.alpha), _alpha(theirs.rank, theirs.alpha), "lora_alpha", theirs.alpha),
              ("targets", sorted(lora.targets), sorted(theirs.targets), "target_modules/target_parameters",
               theirs.targets),
              ("modules_to_save", sorted(lora.modules_to_save), sorted(theirs.modules_to_save), "modules_to_save",
               theirs.modules_to_save))
    for name, ours, want, key, shown in checks:
        if ours != want:
            raise invalid(f"lora.{name}", getattr(lora, name), f"{shown!r}, the adapter's ({where} {key}; the "
                          f"lora section must describe the adapter it starts from)")
    return _check_base(cfg, read_adapter_config(root).get("base_model_name_or_path"), where)


def _check_base(cfg: TrainConfig, named: Any, where: str) -> str | None:
    """``init_from`` against the base the adapter names (``base_model_name_or_path``)."""
    from meshwright.train.lora_base import hf_fingerprint

    assert cfg.init_from is not None and cfg.lora is not None  # TrainConfig.validate: init_adapter needs init_from
    if not isinstance(named, str) or not named:
        return (f"warning: {FIELD}={cfg.lora.init_adapter!r} names no base model ({where} has no "
                f"base_model_name_or_path); init_from={cfg.init_from!r} is taken as its base unchecked")
    base = Path(named)
    if not (base / "config.json").is_file():
        return (f"warning: {FIELD}'s base {named!r} ({where}) is not a model directory here (a Hub id, or another "
                f"machine's path); init_from={cfg.init_from!r} is taken as that base unchecked")
    if base.resolve() == Path(cfg.init_from).resolve():
        return None
    try:
        same = hf_fingerprint(base) == hf_fingerprint(cfg.init_from)
    except Exception:  # noqa: BLE001 - the named base is damaged or partial: init_from's own load says what is wrong
        same = None
    if same is False:
        raise invalid("init_from", cfg.init_from, f"{named} or a copy of it: the base {FIELD} was trained on "
                      f"({where} base_model_name_or_path); this one's weights differ from it")
    return None if same else (f"warning: {FIELD}'s base {named!r} could not be read to compare with "
                              f"init_from={cfg.init_from!r}; taken as that base unchecked")


def adapter_reference(path: str | Path) -> dict[str, Any]:
    """What a checkpoint records of the adapter the run started from: its resolved path and a SHA-256 over the two
    files' names and bytes (adapters are MBs; one whose modules_to_save hold an 8B model's head is ~1 GB: ~1 s)."""
    root = Path(path)
    h = hashlib.sha256(b"meshwright-adapter-v1")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        h.update(f"{name}\0".encode())
        with (root / name).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return {"path": str(root.resolve()), "fingerprint": h.hexdigest()}
