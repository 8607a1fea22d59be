"""Token data: the embedded default corpus, tokenizers, ``data prepare`` and the sequence loader.

The loader's names load on first use (PEP 562 ``__getattr__``): the loader imports torch, ``data prepare``
(:mod:`meshwright.data.prepare`, numpy only) does not need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshwright.lazy import lazy_names

if TYPE_CHECKING:
    from meshwright.data.loader import SequenceLoader, TokenDataset, build_loaders  # noqa: F401
    from meshwright.data.prepare import prepare, prepare_default_corpus  # noqa: F401

_LAZY = {"SequenceLoader": "loader", "TokenDataset": "loader", "build_loaders": "loader", "prepare": "prepare",
         "prepare_default_corpus": "prepare"}

__getattr__ = lazy_names(__name__, _LAZY, globals())


__all__ = ["SequenceLoader", "TokenDataset", "build_loaders", "prepare", "prepare_default_corpus"]
