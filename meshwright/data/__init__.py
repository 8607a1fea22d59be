"""Token data: the embedded default corpus, tokenizers, ``data prepare`` and the sequence loader.

The loader's names load on first use (PEP 562 ``__getattr__``): the loader imports torch, ``data prepare``
(:mod:`meshwright.data.prepare`, numpy only) does not need it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshwright.data.loader import SequenceLoader, TokenDataset, build_loaders  # noqa: F401
    from meshwright.data.prepare import prepare, prepare_default_corpus  # noqa: F401

_LAZY = {"SequenceLoader": "loader", "TokenDataset": "loader", "build_loaders": "loader", "prepare": "prepare",
         "prepare_default_corpus": "prepare"}


def __getattr__(name: str) -> Any:
    """Load a name from its submodule on first use (then cached in this module)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


__all__ = ["SequenceLoader", "TokenDataset", "build_loaders", "prepare", "prepare_default_corpus"]
