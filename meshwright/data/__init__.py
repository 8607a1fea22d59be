"""Token data: the embedded default corpus, tokenizers, ``data prepare`` and the sequence loader."""

from meshwright.data.loader import SequenceLoader, TokenDataset, build_loaders
from meshwright.data.prepare import prepare, prepare_default_corpus

__all__ = ["SequenceLoader", "TokenDataset", "build_loaders", "prepare", "prepare_default_corpus"]
