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
a SHA-256 of the two files (``adapter_reference``), as ``lora_base`` records the base. The hash (~1 s per GB) is taken
once per run, on rank 0 and on a fresh start only (``start_record``: every rank gets rank 0's record, or its refusal
as the same one line); a resume takes the record of the checkpoint it loads and never opens the directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from meshwright.config import TrainConfig
from meshwright.errors import ConfigError, first_line, invalid

FIELD = "lora.init_adapter"
STATE_KEY = "init_adapter"  # trainer_state.json's field
# train/peft_export.py's file names (not imported: peft_export -> hf_export -> build -> here)
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _alpha(rank: int, alpha: float | None) -> float:
    return float(rank if alpha is None else alpha)


def check_init_adapter(cfg: TrainConfig, check_base: bool = True) -> str | None:
    """One line unless ``lora.init_adapter`` is a PEFT adapter this run can start from (see the module docstring);
    returns a warning line where its base cannot be checked, else None. No-op without ``init_adapter``.
    ``check_base`` False: the adapter alone (``meshwright launch``'s preflight where ``init_from`` is on the hosts'
    disks only: the ranks compare the base there)."""
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
    if not check_base:
        return None
    return _check_base(cfg, read_adapter_config(root).get("base_model_name_or_path"), where)


def preflight_init_adapter(cfg: TrainConfig, resuming: bool) -> str | None:
    """``meshwright launch``'s check of ``lora.init_adapter`` before any host starts, on the launch host's filesystem
    (the hosts run in its directory): what ``check_init_adapter`` would refuse on every rank is refused here, once.
    A resume with a checkpoint to load never reads the adapter (train/build.py): nothing to check. A path this host
    does not have may be on the hosts' own disks: returns the one line saying the ranks check it there (a missing
    adapter is then refused by each rank, in one line, after the hosts start); otherwise None -- the base warning,
    where the adapter's base cannot be checked, is rank 0's to print, as without launch. ``init_from`` absent here:
    the adapter alone is checked, its base against ``init_from`` by the ranks."""
    lora = cfg.lora
    if lora is None or lora.init_adapter is None or resuming:
        return None
    if not Path(lora.init_adapter).exists():
        return (f"note: {FIELD}={lora.init_adapter!r} is not on this host: each host's ranks check it on their own "
                f"disks (a missing or bad adapter stops them there, in one line)")
    check_init_adapter(cfg, check_base=cfg.init_from is not None and Path(cfg.init_from).exists())
    return None


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


def start_record(path: str | Path, is_main: bool, broadcast_text: Callable[[str | None], str]) -> dict[str, Any]:
    """The ``init_adapter`` record of a fresh start, hashed once: by rank 0 (``is_main``), whose result -- or refusal,
    a directory gone or unreadable since the build read it -- reaches every rank through ``broadcast_text`` (rank 0's
    text on all ranks; collective, so every rank calls this), and every rank raises the same one line. No rank waits
    on a rank 0 that refused."""
    text = None
    if is_main:
        try:
            text = json.dumps({"record": adapter_reference(path)})
        except OSError as exc:
            text = json.dumps({"error": str(invalid(FIELD, str(path), f"a readable PEFT adapter directory "
                                                    f"({CONFIG_FILE} + {WEIGHTS_FILE}); reading it to record "
                                                    f"its fingerprint failed: {first_line(exc)}"))})
    got = json.loads(broadcast_text(text))
    if "error" in got:
        raise ConfigError(got["error"])
    return got["record"]
