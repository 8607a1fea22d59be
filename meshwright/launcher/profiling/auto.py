"""Profiles for ``meshwright train --plan auto``: measured on the machines the run uses, once, then reused.

The first ``--plan auto`` run for a (host, world size, device, torch, model shape, sequence length,
micro-batch) profiles the hardware and the model's blocks, under torchrun on every rank (so the
runtime's TP/ZeRO overheads and the ranks' shared cores are measured too), and caches both JSON
files under ``$MESHWRIGHT_CACHE_DIR`` (default ``~/.cache/meshwright/profiles``). Later runs load
them. Rank 0 decides whether the cache is complete and tells the others, so every rank takes part
in the same collective measurements.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from meshwright.config import ModelConfig
from meshwright.config.io import to_dict
from meshwright.errors import ConfigError
from meshwright.launcher.profiling.hardware import (
    load_hardware_profile,
    profile_hardware,
    rank_and_world,
    save_hardware_profile,
)
from meshwright.launcher.profiling.model import default_tps, load_model_profile, profile_model, save_model_profile
from meshwright.tools.cache import profile_cache

PROFILE_ITERS = 3


def cache_dir() -> Path:
    """Where cached profiles live (``tools/cache.py``): ``$MESHWRIGHT_CACHE/profiles``, default
    ``~/.cache/meshwright/profiles``; ``$MESHWRIGHT_CACHE_DIR`` still overrides it."""
    return profile_cache()


def _device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu-{os.cpu_count()}"


def profile_key(kind: str, world_size: int, **extra: Any) -> str:
    """A stable file name for one profile: what it was measured on and for."""
    facts = {"kind": kind, "host": platform.node(), "world": world_size, "local_world": os.environ.get("LOCAL_WORLD_SIZE"),
             "device": _device_name(), "torch": torch.__version__, "threads": torch.get_num_threads(), **extra}
    digest = hashlib.sha1(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{kind}-w{world_size}-{digest}.json"


def profile_grid(seq_len: int, micro_batch: int) -> tuple[list[int], list[int]]:
    """Batch sizes and sequence lengths around the run's own shape (4 points for the 3-term fit)."""
    batches = sorted({max(1, micro_batch // 2), micro_batch})
    seqs = sorted({max(8, seq_len // 2), seq_len})
    if len(batches) * len(seqs) < 3:
        batches = sorted({micro_batch, micro_batch + 1})
    return batches, seqs


STALE_FACTOR = 2.0  # a cached matmul rate this many times below today's probe was measured on a busy machine


def matmul_drift(hw_path: Path, device: torch.device) -> float:
    """Today's matmul rate over the cached profile's, at the profile's largest size and first dtype
    (a ~millisecond probe). Profiles are cached per machine for good; one measured while the machine was
    busy (other jobs, a test suite) would mislead every later plan, so ``auto_profiles`` re-measures when
    this exceeds ``STALE_FACTOR``. 1.0 where the profile holds no usable matmul entry."""
    from meshwright.launcher.profiling.hardware import DTYPES, _time

    rows = [r for r in load_hardware_profile(hw_path).get("matmul", []) if not r.get("concurrent") and r.get("tflops")]
    if not rows or rows[0]["dtype"] not in DTYPES:
        return 1.0
    dtype = rows[0]["dtype"]
    row = max((r for r in rows if r["dtype"] == dtype), key=lambda r: r["n"])
    n = int(row["n"])
    a = torch.randn(n, n, device=device).to(DTYPES[dtype])
    b = torch.randn(n, n, device=device).to(DTYPES[dtype])
    seconds = _time(lambda: a @ b, device, iters=3, warmup=1, best=True)
    return (2 * n**3 / seconds / 1e12) / row["tflops"]


def _usable(model_path: Path) -> bool:
    """A cached model profile that loads; a damaged one (a kill mid-write predates atomic writes) is re-measured."""
    if not model_path.is_file():
        return False
    try:
        load_model_profile(model_path)
    except ConfigError as exc:
        print(f"plan auto: re-profiling: the cached model profile is unusable ({exc})", file=sys.stderr)
        return False
    return True


def _decide(missing: bool) -> bool:
    """Rank 0's answer to "must we profile?", shared with every rank."""
    import torch.distributed as dist

    if rank_and_world()[1] == 1:
        return missing
    box = [missing]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def auto_profiles(cfg: ModelConfig, world_size: int, seq_len: int, micro_batch: int,
                  progress: bool = False, dtype: str = "fp32", lora: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(hardware profile, model profile) for this run's machines, the model timed in the run's ``dtype``
    (TrainConfig.dtype; fp32 on CPU, as the runtime trains there) and, with ``lora`` (a LoraConfig), its blocks
    as the LoRA run runs them (adapters on, base frozen); collective under torchrun."""
    import torch.distributed as dist

    rank, world = rank_and_world()
    batches, seqs = profile_grid(seq_len, micro_batch)
    tps = default_tps(cfg, limit=world_size)
    root = profile_cache(create=True)  # before any measurement: an unusable cache is one line naming its variable
    hw_path = root / profile_key("hardware", world_size)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = dtype if device.type == "cuda" else "fp32"
    lora_key = {"lora": to_dict(lora)} if lora is not None else {}  # a plain run's profile keeps its old name
    model_path = root / profile_key("model", world_size, model=to_dict(cfg), batches=batches, seqs=seqs, tps=tps, dtype=dtype,
                                    **lora_key)
    stale = False
    if rank == 0 and hw_path.is_file():
        try:
            drift = matmul_drift(hw_path, device)
        except ConfigError as exc:  # a damaged cache file is measured again, not a dead end (or a hang of the other ranks)
            print(f"plan auto: re-profiling: the cached hardware profile is unusable ({exc})", file=sys.stderr)
            drift = math.inf
        stale = drift > STALE_FACTOR
        if stale and math.isfinite(drift):
            print(f"plan auto: the cached hardware profile's matmul rate is {drift:.1f}x below today's; re-profiling "
                  f"({hw_path})", file=sys.stderr)
    if _decide(stale or not hw_path.is_file()):
        hw = profile_hardware(["bf16", "fp32"] if device.type == "cuda" else ["fp32"],
                              [2048, 4096] if device.type == "cuda" else [128, 256], iters=PROFILE_ITERS, progress=progress)
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            save_hardware_profile(hw, hw_path)
    if _decide(not (rank == 0 and _usable(model_path))):
        prof = profile_model(cfg, batches, seqs, tps, device, PROFILE_ITERS, progress=progress, dtype=dtype, lora=lora)
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            save_model_profile(prof, model_path)
    if world > 1:
        dist.barrier()  # rank 0 has written both files
    return load_hardware_profile(hw_path), load_model_profile(model_path)


def describe(hw_profile: Optional[dict[str, Any]], model_profile: Optional[dict[str, Any]]) -> str:
    """One line for the run's log: what the auto plan was calibrated with."""
    if not hw_profile or not model_profile:
        return "plan auto: cluster preset figures (no profile)"
    peak = max(hw_profile["derived"]["peak_tflops"].values())
    over = ", ".join(f"{e['tp']}/{e['sp']}/{e['zero']}" for e in model_profile.get("runtime_overheads", []))
    return (f"plan auto: calibrated with profiles of {hw_profile['world_size']} rank(s) (matmul {peak:.3g} TFLOP/s per rank"
            f"{'; runtime layouts tp/sp/zero ' + over if over else ''}) from {cache_dir()}")
