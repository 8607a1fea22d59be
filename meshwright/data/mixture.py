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
from meshwright.data.fingerprint import data_fingerprint, digest
from meshwright.data.loader import SequenceLoader, TokenDataset, check_same_stream, check_vocabulary, resolve_data_path
from meshwright.data.stream import WindowOrder
from meshwright.data.token_file import FileArray
from meshwright.errors import ConfigError, invalid

Source = tuple[Any, Any]  # (tokens, loss mask or None) of one split of one data set


class MixtureData:
    """The prepared data sets of a mixture, for the start line and the fingerprint."""

    def __init__(self, datasets: list[TokenDataset], weights: list[float], labels: list[str]) -> None:
        self.datasets, self.weights, self.labels = datasets, weights, labels
        self._fingerprints: list[dict[str, Any]] | None = None

    def source_fingerprints(self) -> list[dict[str, Any]]:
        """Each source's own fingerprint (read once: about 1 MiB of each source)."""
        if self._fingerprints is None:
            self._fingerprints = [data_fingerprint(ds) for ds in self.datasets]
        return self._fingerprints

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
            return self.source_fingerprints()[0]
        total = sum(self.weights)
        fp: dict[str, Any] = {"sources": len(self.datasets)}
        for i, (one, w) in enumerate(zip(self.source_fingerprints(), self.weights)):
            fp[f"mixture[{i}].weight"] = round(w / total, 12)
            fp.update({f"mixture[{i}].{k}": v for k, v in one.items()})
        return fp


def _saved_sources(state: dict[str, Any]) -> list[dict[str, Any]]:
    """A checkpoint's sources with their stream positions: saved per source (BlendedLoader.state_dict), or derived
    from a ``data.path`` checkpoint (one source) or from a mixture's from before they were saved (its fingerprint
    holds each source's fields and weight; positions by the blend's closed form from 0)."""
    if isinstance(state.get("sources"), list):
        return state["sources"]
    consumed, seq_len, seed = int(state["consumed"]), int(state["seq_len"]), int(state["seed"])
    fp = state.get("data")
    base = {"seq_len": seq_len, "seed": seed, "base": 0, "tokens_base": 0, "label": None}
    if not (isinstance(fp, dict) and isinstance(fp.get("sources"), int)):  # one data set
        return [{**base, "fingerprint": digest(fp), "salt": 0, "position": consumed,
                 "transition": state.get("transition"), "tokens": int(state.get("tokens", consumed * seq_len))}]
    n = fp["sources"]
    weights = [float(fp[f"mixture[{i}].weight"]) for i in range(n)]
    counts = BlendSchedule(weights).counts(consumed)
    out = []
    for i in range(n):
        prefix = f"mixture[{i}]."
        own = {k[len(prefix):]: v for k, v in fp.items() if k.startswith(prefix) and k != f"{prefix}weight"}
        out.append({**base, "fingerprint": digest(own), "salt": i, "position": counts[i], "transition": None,
                    "tokens": counts[i] * seq_len})
    return out



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
        self.orders = [WindowOrder(n, seq_len, seed, shuffle, salt=j) for j, n in enumerate(self.source_windows)]
        # position p >= origin reads index base[j] + (its index in the blend from origin) of source j; tokens_base[j]:
        # source j's tokens before origin. All 0 unless a resume changed the mixture (load_state_dict)
        self.origin = 0
        self.base = np.zeros(len(sources), dtype=np.int64)
        self.source_tokens_base = [0] * len(sources)
        self.source_fingerprints: list[dict[str, Any]] | None = None  # build_mixture_loaders: finds sources on resume

    def _source_window(self, j: int, index: np.ndarray) -> np.ndarray:
        """Windows of source ``j`` at positions ``index`` of its own stream (its own epochs and permutations)."""
        epoch, i = np.divmod(index, self.source_windows[j])
        if not self.shuffle:
            return i
        out = np.empty_like(i)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = self.orders[j].permutation(int(e))[i[sel]]
        return out

    def _read(self, array: Any, starts: list[int]) -> np.ndarray:
        if isinstance(array, FileArray):
            return array.read_rows(starts, self.seq_len + 1)
        return np.stack([np.asarray(array[s: s + self.seq_len + 1]) for s in starts])

    def _rows(self, positions: range) -> tuple[torch.Tensor, torch.Tensor | None]:
        src, index = self.schedule.locate(np.arange(positions.start, positions.stop) - self.origin)
        index = index + self.base[src]
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

    def positions(self, consumed: int) -> list[int]:
        """Each source's position in its own stream once the blend is at ``consumed`` (closed form, no replay)."""
        return [int(b) + n for b, n in zip(self.base, self.schedule.counts(consumed - self.origin))]

    def sequences_per_source(self, consumed: int) -> dict[str, int]:
        """Sequences each source contributed to the first ``consumed`` positions of a run that kept its mixture."""
        return dict(zip(self.labels, self.schedule.counts(consumed)))

    def tokens_per_source(self, consumed: int) -> dict[str, int]:
        """Tokens each source has given the run by position ``consumed``, those of sessions before a resume that
        changed the mixture or seq_len included (a source the mixture dropped is no longer listed)."""
        counts = self.schedule.counts(consumed - self.origin)
        return {label: t + n * self.seq_len for label, t, n in zip(self.labels, self.source_tokens_base, counts)}

    def state_dict(self) -> dict[str, Any]:
        """The position, and each source's: where its stream is, so a resume onto a changed mixture finds it."""
        state = super().state_dict()
        state.pop("transition", None)  # each source has its own
        total = sum(self.schedule.shares)
        positions, tokens = self.positions(self.consumed), self.tokens_per_source(self.consumed)
        state["origin"] = self.origin
        state["sources"] = [
            {"label": label, "fingerprint": digest(fp), "weight": round(share / total, 12), "salt": order.salt,
             "seq_len": self.seq_len, "seed": self.seed, "position": pos, "tokens": tokens[label], "base": int(base),
             "tokens_base": tb, "transition": order.state(pos)}
            for label, fp, share, order, pos, base, tb in zip(
                self.labels, self.source_fingerprints or [None] * len(self.labels), self.schedule.shares, self.orders,
                positions, self.base, self.source_tokens_base)]
        return state

    def load_state_dict(self, state: dict[str, Any], data_changed: bool = False) -> str | None:
        """Restore the position. The same mixture, seq_len and seed resume exactly. With ``--allow-config-change``
        a changed mixture (weights, sources added or dropped) keeps each source where its stream was (found by
        its fingerprint) and blends by the new weights from here; a new source, and other data at a source's path
        (its tokens so far still counted for that path), start at their beginning; a changed seq_len or seed
        carries each source's tokens over as a single data set does (stream.py). A ``data.path`` checkpoint resumes as a one-source mixture reading the same batches."""
        check_same_stream(state, self, data_changed)
        consumed = int(state["consumed"])
        self.tokens_base = int(state.get("tokens", consumed * int(state["seq_len"])))
        saved = _saved_sources(state)
        same_data = state.get("data") is None or self.data_fingerprint is None or state["data"] == self.data_fingerprint
        same_stream = (state["seq_len"], state["seed"]) == (self.seq_len, self.seed)
        if same_data and same_stream and len(saved) == len(self.sources):
            if isinstance(state.get("sources"), list):  # exactly as saved
                self.origin = int(state.get("origin", 0))
                for j, src in enumerate(saved):
                    self.base[j], self.source_tokens_base[j] = int(src["base"]), int(src["tokens_base"])
                    self.orders[j].reset(int(src["salt"]), src.get("transition"))
            elif len(saved) == 1:  # a data.path checkpoint: the one source's stream is that data set's
                self.origin, self.base[0], self.source_tokens_base[0] = consumed, consumed, self.tokens_base
                self.orders[0].reset(0, state.get("transition"))
            self.consumed = self.consumed_base = consumed
            return None
        note = self._remap(saved, consumed)
        self.consumed = self.consumed_base = consumed
        return note

    def _remap(self, saved: list[dict[str, Any]], consumed: int) -> str:
        """Each source continues where its stream was; the new blend starts at ``consumed`` (load_state_dict)."""
        digests = [digest(fp) for fp in (self.source_fingerprints or [None] * len(self.sources))]
        unused = list(range(len(saved)))
        match: list[int | None] = []
        for j, d in enumerate(digests):  # the same data first, then the same path (that source's data changed)
            i = next((i for i in unused if d is not None and saved[i]["fingerprint"] == d), None)
            if i is None:
                i = next((i for i in unused if saved[i].get("label") == self.labels[j]), None)
            if i is not None:
                unused.remove(i)
            match.append(i)
        taken = {int(x["salt"]) for x in saved}  # a new source's permutations are unlike any source's so far
        fresh = (s for s in range(len(saved) + len(self.sources) + 1) if s not in taken)
        said = []
        for j, i in enumerate(match):
            order, label = self.orders[j], f"data.mixture[{j}]={self.labels[j]}"
            same = i is not None and saved[i]["fingerprint"] == digests[j]
            order.reset(int(saved[i]["salt"]) if same else next(fresh), None)
            if i is None:
                self.base[j], self.source_tokens_base[j] = 0, 0
                said.append(f"{label} new, from its start")
                continue
            old = saved[i]
            self.source_tokens_base[j] = int(old["tokens"])
            if not same:  # other data at the same path: from its start (the old position counted other windows)
                self.base[j] = 0
                said.append(f"{label} other data, from its start")
            elif (int(old["seq_len"]), int(old["seed"])) == (self.seq_len, self.seed):
                self.base[j] = int(old["position"])
                order.reset(order.salt, old.get("transition"))
                said.append(f"{label} at sequence {self.base[j]:,} of its stream")
            else:
                tokens = self.sources[j][0]
                earlier = WindowOrder((len(tokens) - 1) // int(old["seq_len"]), int(old["seq_len"]), int(old["seed"]),
                                      self.shuffle, int(old["salt"]), old.get("transition"))
                self.base[j] = order.carry(earlier, int(old["position"]))
                epoch = int(old["position"]) // earlier.n_windows
                said.append(f"{label} {old['tokens']:,} tokens carried over, epoch {epoch} goes on with "
                            f"{order.n_windows - order.skipped(epoch):,} unread of {order.n_windows:,} windows")
        dropped = [str(saved[i].get("label") or f"source {i}") for i in unused]
        self.origin = consumed
        return ("note: resuming the mixture with each source where its stream was: " + "; ".join(said)
                + (f"; dropped: {', '.join(dropped)}" if dropped else "") + "; the new weights blend from here")

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
    loaders[0].source_fingerprints = data.source_fingerprints()
    return loaders[0], loaders[1], data
