"""Training on several prepared data sets blended by weight (``data.mixture``, Megatron's ``--data-path 0.7 web
0.3 code``).

The loader contract is unchanged: global batch ``k`` is positions ``[k*G, (k+1)*G)`` of one stream and rank
``r`` reads its contiguous slice, so a batch is the same for any ``dp_size`` and the state is one number. Each
position goes to a source by ``blend.BlendSchedule`` (O(1), periodic), then to a window of that source's own
stream: each source has its own per-``(seed, epoch)`` permutation and epochs independently, so a small source
repeats while a large one is still in its first pass (a note at start says which). Source 0 draws its
permutation from ``(seed, epoch)`` exactly as a single data set does, so a one-source mixture reads the same
batches as ``data.path``; source ``j > 0`` from ``(seed, epoch, j)``, so equal-sized sources are not shuffled
alike. Validation blends each source's own validation split the same way, unshuffled. Instruction sources keep
their loss mask with their windows; plain-text sources in the same batch train on every target.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meshwright.data.blend import BlendSchedule
from meshwright.data.fingerprint import data_fingerprint
from meshwright.data.loader import SequenceLoader, TokenDataset, check_vocabulary, resolve_data_path
from meshwright.data.token_file import FileArray
from meshwright.errors import ConfigError, invalid

Source = tuple[Any, Any]  # (tokens, loss mask or None) of one split of one data set


class MixtureData:
    """The prepared data sets of a mixture, for the start line and the fingerprint."""

    def __init__(self, datasets: list[TokenDataset], weights: list[float], labels: list[str]) -> None:
        self.datasets, self.weights, self.labels = datasets, weights, labels

    @property
    def path(self) -> str:
        total = sum(self.weights)
        return "mixture of " + ", ".join(f"{p} ({w / total:.3g})" for p, w in zip(self.labels, self.weights))

    def __len__(self) -> int:
        return sum(len(ds) for ds in self.datasets)

    def fingerprint(self) -> dict[str, Any]:
        """One source: the data set's own fingerprint (a one-source mixture resumes a ``data.path`` run and back).
        Several: every source's fields under ``mixture[i].``, with its normalised weight, flat so that a refused
        resume names exactly what changed (``mixture[1].weight 0.3 -> 0.5``)."""
        if len(self.datasets) == 1:
            return data_fingerprint(self.datasets[0])
        total = sum(self.weights)
        fp: dict[str, Any] = {"sources": len(self.datasets)}
        for i, (ds, w) in enumerate(zip(self.datasets, self.weights)):
            fp[f"mixture[{i}].weight"] = round(w / total, 12)
            fp.update({f"mixture[{i}].{k}": v for k, v in data_fingerprint(ds).items()})
        return fp


def _tokenizer_key(ds: TokenDataset) -> tuple[str, str | None]:
    tok_file = ds.path / "tokenizer.json"
    sha = hashlib.sha256(tok_file.read_bytes()).hexdigest() if tok_file.is_file() else None
    return json.dumps(ds.index["tokenizer"], sort_keys=True), sha


def open_mixture(data_cfg: Any, vocab_size: int, pretrained: bool, progress: bool = True) -> MixtureData:
    """Every source opened and checked: prepared, fits the model, and the same tokenizer as source 0 (ids of
    different tokenizers mean different text: a blend of them is meaningless)."""
    datasets, labels = [], []
    for i, src in enumerate(data_cfg.mixture):
        key = f"data.mixture[{i}].path"
        if src.path != "default" and not Path(src.path).exists():
            raise invalid(key, src.path, "an existing prepared data directory ('meshwright data prepare'), 'default' "
                          "or an instruction .jsonl file")
        ds = TokenDataset(resolve_data_path(data_cfg, vocab_size, progress, path=src.path), key=key)
        check_vocabulary(ds, vocab_size, pretrained)
        if datasets and _tokenizer_key(ds) != _tokenizer_key(datasets[0]):
            tok, tok0 = ds.index["tokenizer"], datasets[0].index["tokenizer"]
            raise ConfigError(f"{key}={src.path!r} is prepared with tokenizer {tok.get('name')!r} (vocab "
                              f"{tok.get('vocab_size')}, eos {tok.get('eos_id')}"
                              f"{', another tokenizer.json' if tok == tok0 else ''}), data.mixture[0] with "
                              f"{tok0.get('name')!r} (vocab {tok0.get('vocab_size')}, eos {tok0.get('eos_id')}); valid: "
                              f"every source prepared with the same tokenizer")
        datasets.append(ds)
        labels.append(src.path)
    return MixtureData(datasets, [float(s.weight) for s in data_cfg.mixture], labels)


class BlendedLoader(SequenceLoader):
    """A ``SequenceLoader`` whose stream interleaves several sources by weight (module docstring)."""

    def __init__(self, sources: list[Source], weights: list[float], labels: list[str], seq_len: int,
                 global_batch: int, micro_batch: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle: bool = True, name: str = "train") -> None:
        self.source_windows = []
        for i, (tokens, _) in enumerate(sources):
            n = (len(tokens) - 1) // seq_len
            if n < 1:
                raise invalid("seq_len", seq_len, f"less than the {name} split's {len(tokens)} tokens of "
                              f"data.mixture[{i}].path={labels[i]!r}")
            self.source_windows.append(n)
        super().__init__(sources[0][0], seq_len, global_batch, micro_batch, dp_rank, dp_size, seed, shuffle, name)
        self.sources, self.labels = sources, labels
        self.schedule = BlendSchedule(weights)
        self.n_windows = sum(self.source_windows)  # one pass over every source: batches_per_pass, resume check
        self.masked = any(mask is not None for _, mask in sources)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def _source_window(self, j: int, index: np.ndarray) -> np.ndarray:
        """Windows of source ``j`` at positions ``index`` of its own stream (its own epochs and permutations)."""
        epoch, i = np.divmod(index, self.source_windows[j])
        if not self.shuffle:
            return i
        out = np.empty_like(i)
        for e in np.unique(epoch):
            cached = self._perms.get(j)
            if cached is None or cached[0] != e:
                key = [self.seed, int(e)] if j == 0 else [self.seed, int(e), j]
                cached = (int(e), np.random.default_rng(key).permutation(self.source_windows[j]))
                self._perms[j] = cached
            sel = epoch == e
            out[sel] = cached[1][i[sel]]
        return out

    def _read(self, array: Any, starts: list[int]) -> np.ndarray:
        if isinstance(array, FileArray):
            return array.read_rows(starts, self.seq_len + 1)
        return np.stack([np.asarray(array[s: s + self.seq_len + 1]) for s in starts])

    def _rows(self, positions: range) -> tuple[torch.Tensor, torch.Tensor | None]:
        src, index = self.schedule.locate(np.arange(positions.start, positions.stop))
        seqs = np.empty((len(src), self.seq_len + 1), dtype=np.int64)
        keep = np.ones_like(seqs, dtype=np.uint8) if self.masked else None
        for j in np.unique(src):
            rows = np.flatnonzero(src == j)
            starts = [int(w) * self.seq_len for w in self._source_window(int(j), index[rows])]
            tokens, mask = self.sources[j]
            seqs[rows] = self._read(tokens, starts)
            if mask is not None and keep is not None:
                keep[rows] = self._read(mask, starts)
        return torch.from_numpy(seqs), None if keep is None else torch.from_numpy(keep)

    def alone(self, j: int) -> "BlendedLoader":
        """Source ``j`` on its own, with this loader's layout (per-source evaluation: the same shapes on every rank)."""
        return BlendedLoader([self.sources[j]], [1.0], [self.labels[j]], self.seq_len, self.global_batch,
                             self.micro_batch, self.dp_rank, self.dp_size, self.seed, self.shuffle,
                             f"{self.name} split of data.mixture[{j}]")

    def sequences_per_source(self, consumed: int) -> dict[str, int]:
        """Sequences each source contributed to the first ``consumed`` positions (closed form, no replay)."""
        return dict(zip(self.labels, self.schedule.counts(consumed)))

    def repeat_notes(self, consumed: int) -> list[str]:
        """A note for every source that the first ``consumed`` positions visit more than once."""
        out = []
        for i, (label, n, windows) in enumerate(zip(self.labels, self.schedule.counts(consumed), self.source_windows)):
            if n > windows:
                out.append(f"note: data.mixture[{i}].path={label!r} repeats: this run draws {n:,} sequences of it, "
                           f"its {self.name} split holds {windows:,} ({n / windows:.1f} epochs)")
        return out


def build_mixture_loaders(cfg: Any, vocab_size: int, dp_rank: int = 0, dp_size: int = 1,
                          progress: bool = True) -> tuple[BlendedLoader, BlendedLoader, MixtureData]:
    """Train and validation loaders blending ``cfg.data.mixture``; each source split by ``data.val_fraction``."""
    data = open_mixture(cfg.data, vocab_size, getattr(cfg, "init_from", None) is not None, progress)
    common = dict(weights=data.weights, labels=data.labels, seq_len=cfg.seq_len, global_batch=cfg.global_batch,
                  micro_batch=cfg.micro_batch, dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed)
    f = cfg.data.val_fraction
    loaders = [BlendedLoader([(ds.split(split, f), ds.split_mask(split, f)) for ds in data.datasets],
                             shuffle=split == "train", name=split, **common) for split in ("train", "val")]
    loaders[0].data_fingerprint = data.fingerprint()
    return loaders[0], loaders[1], data
