"""Load the consumers' own config code from the pinned copies in tests/consumers (see refresh.sh and PIN).

Megatron-LM's training package is not on PyPI: its arguments.py (pinned at core_v0.16.1, matching the
megatron-core wheel in the venv) runs on top of the installed megatron.core; only megatron.training.utils,
which pulls in the whole trainer, is replaced by the five helpers arguments.py calls."""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any
from unittest import mock

HERE = Path(__file__).resolve().parent
MEGATRON_MODULES = ("argument_utils", "training_config", "common_config", "resilience_config", "arguments")


def _load(name: str, path: Path) -> Any:
    """Import a pinned ``*.py.pinned`` file as module ``name`` (the suffix keeps upstream code out of lint)."""
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    loader.exec_module(mod)
    return mod


def megatron_arguments() -> Any:
    """The pinned ``megatron.training.arguments`` module (skips the test without megatron-core)."""
    import pytest

    pytest.importorskip("megatron.core")
    if "megatron.training.arguments" in sys.modules:
        return sys.modules["megatron.training.arguments"]
    pkg = types.ModuleType("megatron.training")
    root = HERE / "megatron_lm" / "megatron" / "training"
    pkg.__path__ = [str(root)]
    sys.modules["megatron.training"] = pkg
    utils = types.ModuleType("megatron.training.utils")
    utils.get_device_arch_version = lambda: 9  # Hopper: the CUDA_DEVICE_MAX_CONNECTIONS rule applies
    utils.update_use_dist_ckpt = lambda args: setattr(args, "use_dist_ckpt", args.ckpt_format != "torch")  # upstream body
    utils.print_rank_0 = lambda *a, **k: None
    utils.warn_rank_0 = lambda *a, **k: None
    utils.is_rank0 = lambda: True
    sys.modules["megatron.training.utils"] = utils
    for name in MEGATRON_MODULES:
        mod = _load(f"megatron.training.{name}", root / f"{name}.py.pinned")
    return mod


def megatron_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False)
    return megatron_arguments().add_megatron_arguments(p)


def megatron_validate(argv: list[str], world_size: int, env: dict[str, str]) -> argparse.Namespace:
    """Parse with Megatron's parser and run its validate_args as ``world_size`` ranks with ``env`` set."""
    mod = megatron_arguments()
    args = megatron_parser().parse_args(argv)
    args.rank, args.world_size = 0, world_size
    with mock.patch.dict(os.environ):  # restored whole afterwards, the popped key included
        os.environ.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)
        os.environ.update(env)
        mod.validate_args(args)
    return args


def torchtitan_configs() -> Any:
    """The pinned ``torchtitan/config/configs.py`` (ParallelismConfig, TrainingConfig: kw_only, slots)."""
    name = "pinned_torchtitan_configs"
    return sys.modules.get(name) or _load(name, HERE / "torchtitan" / "torchtitan" / "config" / "configs.py.pinned")


def torchtitan_rope() -> Any:
    """The pinned ``torchtitan/models/common/rope.py`` (ComplexRoPE, CosSinRoPE: their caches are torchtitan's rotary
    frequencies). Its two imports beyond torch are stood in for while it loads, and removed after: ``spmd_types``
    (decorators that only type-check SPMD layouts: identity here) and ``torchtitan.protocols.module.Module`` (an
    ``nn.Module`` with a ``Config`` dataclass, all RoPE needs of it); whatever those names held before is put back."""
    name = "pinned_torchtitan_rope"
    if name in sys.modules:
        return sys.modules[name]
    import dataclasses

    import torch.nn as nn

    spmd = types.ModuleType("spmd_types")
    spmd.no_typecheck = lambda *a, **k: (lambda f: f)
    spmd.local_map = lambda *a, **k: (lambda f: f)
    spmd.V = spmd.R = object()
    spmd.PartitionSpec = lambda *a, **k: None

    class Module(nn.Module):
        @dataclasses.dataclass(kw_only=True, slots=True)
        class Config:
            param_init: dict | None = None

    module = types.ModuleType("torchtitan.protocols.module")
    module.Module = Module
    stubs = {"spmd_types": spmd, "torchtitan": types.ModuleType("torchtitan"),
             "torchtitan.protocols": types.ModuleType("torchtitan.protocols"), "torchtitan.protocols.module": module}
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        return _load(name, HERE / "torchtitan" / "torchtitan" / "models" / "common" / "rope.py.pinned")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
