"""One run per output directory, and nothing in it lost: the lock, the fresh-run/resume/overwrite rules, the
saved-config check on resume, and the crash-safe rewrite of ``log.jsonl``.

Without these, two runs into one ``out_dir`` garbled each other's log, a fresh run's keep-last-K pruning
deleted its own new checkpoints next to an older run's higher-numbered ones, and a kill during the resume
rewrite of ``log.jsonl`` emptied it. Only the main rank calls these.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, TextIO

from meshwright.config import TrainConfig
from meshwright.config.io import to_dict
from meshwright.errors import ConfigError, invalid
from meshwright.train.checkpoint import LATEST, STATE_FILE, STEP_RE, latest_checkpoint, list_checkpoints
from meshwright.train.faults import fault_point
from meshwright.train.hf_companions import remove_companions

LOCK_FILE = ".meshwright.lock"
# what meshwright writes into out_dir: the only names --overwrite removes
OUTPUTS = ("log.jsonl", "log.jsonl.tmp", "summary.json", "summary.json.tmp", "config.yaml", "config.yaml.tmp",
           "model.yaml", "model.yaml.tmp", "plan.yaml", "plan.yaml.tmp")
# fields that change the trajectory: a resume with other values is refused unless told (steps may grow; the
# layout may change, as checkpoints reshard)
RESUME_FIELDS = ("model", "data", "seq_len", "global_batch", "seed", "optimizer", "lr", "min_lr", "warmup_steps",
                 "weight_decay", "beta1", "beta2", "eps", "grad_clip", "dtype", "meft", "lora")


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` or say in one line why it cannot be used (a file, no permission, disk full)."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise invalid("out_dir", str(path), "a directory (this path is a file)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".meshwright.write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise invalid("out_dir", str(path), f"a writable directory ({exc.strerror or exc})") from None
    return path


def dirs_to_create(out_dir: str | Path) -> list[Path]:
    """``out_dir`` and those of its parents that do not exist yet, deepest first (what ``prepare_out_dir`` makes)."""
    out: list[Path] = []
    path = Path(out_dir).absolute()
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


def remove_unused(created: list[Path]) -> None:
    """After a run refused its input: remove the directories it created that hold nothing but its lock file, so
    bad input leaves nothing behind."""
    for i, path in enumerate(created):
        try:
            if i == 0 and [p.name for p in path.iterdir()] == [LOCK_FILE]:
                (path / LOCK_FILE).unlink()
            path.rmdir()
        except OSError:
            return


class RunLock:
    """An exclusive ``flock`` on ``out_dir/.meshwright.lock`` for the life of the run. The kernel drops it when the
    process dies (kill -9 included), so a stale lock file never blocks a resume."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self._fh: TextIO | None = None

    def acquire(self) -> "RunLock":
        fh = self.path.open("a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise invalid("out_dir", str(self.path.parent), f"a directory no other run is using (it is locked "
                              f"by a running meshwright process, pid {holder}); wait for it or pick another out_dir") from None
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_fresh_or_overwrite(out_dir: str | Path, resume: bool | str, overwrite: bool) -> None:
    """A fresh run into a directory that holds another run's checkpoints is refused unless it resumes or
    ``overwrite`` is set; ``overwrite`` removes only what meshwright wrote (ckpt/ step directories, the
    ``latest`` pointer, the log, summary, config, model and plan), never other files."""
    out = Path(out_dir)
    ckpt = out / "ckpt"
    found = list_checkpoints(ckpt)
    if resume or not (found or (out / "log.jsonl").is_file()):
        return
    if not overwrite:
        what = f"checkpoints up to {found[-1].name}" if found else "log.jsonl"
        raise invalid("out_dir", str(out), f"an empty directory or one to continue: it holds another run's {what}; "
                      f"use --resume to continue it, --overwrite to replace it, or another out_dir")
    remove_outputs(out)


def remove_outputs(out: Path) -> None:
    """Delete meshwright's own files in ``out`` (see ``check_fresh_or_overwrite``). One that cannot be deleted (a
    read-only ckpt/) is one line naming it; an empty ckpt/ that cannot go (a mount point) stays, as it holds nothing."""
    ckpt = out / "ckpt"
    try:
        if ckpt.is_dir():
            for p in ckpt.iterdir():
                base = p.name.removesuffix(".tmp").removesuffix(".old")
                if p.is_dir() and STEP_RE.match(base):
                    shutil.rmtree(p)
                elif p.is_file() and p.name in (LATEST, f"{LATEST}.tmp"):
                    p.unlink()
            if not any(ckpt.iterdir()):
                with contextlib.suppress(OSError):
                    ckpt.rmdir()
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
        remove_companions(out)
    except OSError as exc:
        raise ConfigError(f"--overwrite: out_dir={str(out)!r} could not be cleared: {exc.strerror or exc} "
                          f"({exc.filename}); valid: an out_dir whose previous run's files can be deleted, or another "
                          f"out_dir") from None


def check_resume_config(cfg: TrainConfig, resume: bool | str, allow_change: bool) -> None:
    """Refuse, in one line, a resume whose trajectory-defining fields differ from the checkpoint's saved config
    (the LoRA adapters' shape even with ``allow_change``: the checkpoint cannot load into other adapters)."""
    if not resume:
        return
    target = Path(resume) if isinstance(resume, str) else latest_checkpoint(Path(cfg.out_dir) / "ckpt")
    if target is None:
        return
    try:
        saved = json.loads((target / STATE_FILE).read_bytes().decode("utf-8")).get("config")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return  # the checkpoint loader names the damage (and may fall back to an intact checkpoint)
    if not isinstance(saved, dict):
        return
    _check_lora(saved.get("lora"), to_dict(cfg).get("lora"), target)
    if allow_change:
        return
    now, default = to_dict(cfg), to_dict(type(cfg)())
    saved = {**saved, "data": _trajectory_data(one_source_as_path(saved.get("data")))}
    now["data"] = _same_proportions(saved["data"], _trajectory_data(one_source_as_path(now.get("data"))))
    for name in RESUME_FIELDS:
        if name in saved:
            found = _mixture_switch(saved[name], now.get(name)) if name == "data" else None
            if found is None and (found := _difference(saved[name], now.get(name), name, default.get(name))):
                found = (found[0], repr(found[1]), found[2])
            if found is not None:
                key, was, is_now = found
                raise invalid(key, is_now, f"{was} as in the checkpoint {target} (resume continues that run; pass "
                              f"--allow-config-change to resume with a different {name})")


LORA_SHAPE = ("rank", "targets", "modules_to_save")  # what the checkpoint's tensors are shaped by


def _check_lora(was: Any, now: Any, target: Path) -> None:
    """A LoRA run resumed without its ``lora:`` section, with another rank, targets or modules_to_save, or a full
    run resumed with one: named as the lora field, before anything is built (it was a checkpoint-fit error about an
    optimizer state such as 'state.tok_embeddings.weight.step', after the model was loaded). alpha and dropout may
    change with --allow-config-change (RESUME_FIELDS)."""
    if was is None and now is None:
        return
    if was is None:
        raise invalid("lora", now, f"null as in the checkpoint {target}: a full training run, whose checkpoint holds "
                      f"no adapters (fine-tune it with LoRA from an `export --hf` of it, as init_from, in another "
                      f"out_dir)")
    if now is None:
        raise invalid("lora", None, f"{was} as in the checkpoint {target}: a LoRA run resumes with its adapters (the "
                      f"lora: section it was started with)")
    if not (isinstance(was, dict) and isinstance(now, dict)):
        return
    for name in LORA_SHAPE:
        if name in was and was[name] != now.get(name):
            raise invalid(f"lora.{name}", now.get(name), f"{was[name]!r} as in the checkpoint {target} (its "
                          f"adapters have that shape, whatever --allow-config-change says; a new LoRA run needs "
                          f"another out_dir)")


# data fields that only add evaluations: no step reads them, so a resume may change them (as eval_every)
EVAL_ONLY_DATA_FIELDS = ("eval_per_source",)


def _trajectory_data(data: Any) -> Any:
    """``data`` without the fields that do not change the trajectory (``EVAL_ONLY_DATA_FIELDS``)."""
    if not isinstance(data, dict):
        return data
    return {k: v for k, v in data.items() if k not in EVAL_ONLY_DATA_FIELDS}


def _same_proportions(saved: Any, now: Any) -> Any:
    """``now`` with the checkpoint's mixture weights where they are the same blend (weights are relative: 7/3 blends
    exactly as 0.7/0.3, one schedule of integer shares), so that only other proportions are named."""
    from meshwright.data.blend import integer_weights

    was, is_now = (d.get("mixture") if isinstance(d, dict) else None for d in (saved, now))
    if not (isinstance(was, list) and isinstance(is_now, list) and len(was) == len(is_now)
            and all(isinstance(s, dict) and isinstance(n, dict) for s, n in zip(was, is_now))):
        return now
    try:
        same = (integer_weights([float(s["weight"]) for s in was])
                == integer_weights([float(n["weight"]) for n in is_now]))
    except (ConfigError, KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError):
        return now  # not weights a blend takes: compared as they are
    if not same:
        return now
    return {**now, "mixture": [{**n, "weight": s["weight"]} for s, n in zip(was, is_now)]}


def one_source_as_path(data: Any) -> Any:
    """``data.mixture`` of one source as the ``data.path`` it reads (its weight means nothing alone): a one-source
    mixture reads exactly the batches of ``data.path``, so a resume from one to the other continues the same run.
    Whether it is really the same data is the fingerprint's check, once the data is open (fingerprint.py)."""
    if not isinstance(data, dict) or not isinstance(data.get("mixture"), list) or len(data["mixture"]) != 1:
        return data
    source = data["mixture"][0]
    if not isinstance(source, dict) or "path" not in source:
        return data
    return {**data, "path": source["path"], "mixture": None}


def _mixture_switch(saved: Any, now: Any) -> tuple[str, str, Any] | None:
    """A data.path run resumed with a mixture of several sources, or back: named as ``data.mixture`` (the first
    leaf that differs was data.path, 'default' on the mixture's side, which the user never set)."""
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return None
    was, is_now = saved.get("mixture"), now.get("mixture")
    if (was is None) == (is_now is None):
        return None
    return "data.mixture", repr(was) if was is not None else f"no mixture (data.path={saved.get('path')!r})", is_now


def _difference(saved: Any, now: Any, key: str, default: Any = None) -> tuple[str, Any, Any] | None:
    """The first leaf where ``now`` differs from ``saved`` (``data.mixture[1].weight``, not the whole ``data``), as
    (key, saved, now); None when equal. A key the checkpoint lacks that ``now`` holds at its ``default`` is a field
    added since the checkpoint was written (data.mixture, data.eval_per_source): equal."""
    if isinstance(saved, dict) and isinstance(now, dict):
        default = default if isinstance(default, dict) else {}
        for k in list(saved) + [k for k in now if k not in saved]:
            if k not in saved and k in default and now[k] == default[k]:
                continue
            found = _difference(saved.get(k), now.get(k), f"{key}.{k}", default.get(k))
            if found is not None:
                return found
        return None
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        for i, (a, b) in enumerate(zip(saved, now)):
            found = _difference(a, b, f"{key}[{i}]")
            if found is not None:
                return found
        return None
    return None if saved == now else (key, saved, now)


def read_log(path: Path, max_step: int) -> list[str]:
    """The records of ``log.jsonl`` up to ``max_step``; torn or garbled lines (a kill mid-write) are dropped."""
    kept = []
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step", 0), int) and rec.get("step", 0) <= max_step:
            kept.append(line)
    return kept


def reopen_log(path: Path, max_step: int | None) -> tuple[TextIO, list[dict[str, Any]]]:
    """Open ``log.jsonl`` for this session: fresh (``max_step`` None) or keeping the records up to ``max_step``.
    The rewrite goes to ``log.jsonl.tmp``, fsynced, then renamed: a kill at any point leaves either the old or
    the new log, never an empty one. Returns the handle (positioned for appending) and the kept records."""
    kept = read_log(path, max_step) if max_step is not None else []
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w") as fh:
            fh.writelines(line + "\n" for line in kept)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: the old log stays as it was
        raise
    fault_point("log_rewrite")
    os.replace(tmp, path)
    return path.open("a"), [json.loads(line) for line in kept]


def nospace(exc: BaseException) -> ConfigError | None:
    """The one-line error for a full disk, or None when ``exc`` is something else."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return ConfigError(f"{exc.filename or 'out_dir'}: no space left on device; valid: free space on that disk, a "
                           f"smaller keep_checkpoints, or another out_dir")
    return None
