"""Fixed-length sequence loader over a prepared token file.

Sequences are non-overlapping windows of ``seq_len + 1`` tokens (inputs and shifted targets). Each
epoch visits every window once in an order drawn from ``(seed, epoch)``. Global batch ``k`` is the
sequences at positions ``[k*global_batch, (k+1)*global_batch)`` of that stream, and data-parallel rank
``r`` reads the ``r``-th contiguous slice of it, so a global batch is the same set of sequences for any
``dp_size``. The loader's state is the number of sequences consumed, which makes resume exact, plus the tokens
read (a resume onto another ``seq_len`` carries those, ``stream.py``).
Instruction data carries a loss mask (``mask.bin``): targets outside the responses become ``IGNORE_INDEX``.
The files are read with positional reads on a descriptor held open, not memory-mapped (``token_file.py``: a
file truncated under a memory map kills the run with SIGBUS), and the train loader's state carries the data
set's fingerprint (``fingerprint.py``) so a resume onto other data is refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meshwright.data.fingerprint import data_fingerprint, digest
from meshwright.data.prepare import DOC_OFFSETS, READABLE_VERSIONS, prepare_default_corpus, prepare_instruct_cached
from meshwright.data.stream import WindowOrder
from meshwright.data.token_file import FileArray, OpenFile
from meshwright.errors import ConfigError, invalid

Batch = tuple[torch.Tensor, torch.Tensor]
IGNORE_INDEX = -100  # F.cross_entropy's default: lm_loss skips these targets
LARGE_VOCAB = 1024  # from scratch, bytes on a vocabulary this large leave most embeddings unused: warn


def _read_index(index_file: Path, key: str = "data.path") -> dict[str, Any]:
    """index.json, checked field by field: a damaged one is one line naming the field, never a traceback."""
    label = f"{key}={str(index_file.parent)!r}"
    try:
        index = json.loads(index_file.read_bytes().decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label} has a malformed index.json ({type(exc).__name__}); valid: re-run `meshwright data prepare`") from None
    problems = []
    if not isinstance(index, dict):
        problems.append("not a mapping")
    else:
        if index.get("dtype") not in ("uint16", "uint32"):
            problems.append(f"dtype={index.get('dtype')!r}")
        n = index.get("num_tokens")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            problems.append(f"num_tokens={n!r}")
        top = index.get("max_token_id", -1)  # absent in data sets prepared before it was recorded
        if not isinstance(top, int) or isinstance(top, bool) or top < -1:
            problems.append(f"max_token_id={top!r}")
        tok = index.get("tokenizer")
        if not isinstance(tok, dict) or not isinstance(tok.get("vocab_size"), int) or tok["vocab_size"] < 1:
            problems.append("tokenizer.vocab_size")
        if index.get("version") not in READABLE_VERSIONS:
            problems.append(f"version={index.get('version')!r}")
        elif index["version"] == 1 and not (isinstance(index.get("doc_offsets"), list) and index["doc_offsets"]
                                            and all(isinstance(o, int) for o in index["doc_offsets"])):
            problems.append("doc_offsets")
        elif index["version"] > 1 and index.get("doc_offsets_file") != DOC_OFFSETS:
            problems.append(f"doc_offsets_file={index.get('doc_offsets_file')!r}")
    if problems:
        raise ConfigError(f"{label} has a malformed index.json ({', '.join(problems)}); valid: re-run `meshwright data prepare`")
    return index


def _doc_offsets(path: Path, index: dict[str, Any], key: str = "data.path") -> np.ndarray:
    """The D+1 document offsets (int64), from doc_offsets.bin or a version-1 index's list, checked to run from 0 to
    num_tokens without decreasing (the train/validation split cuts at them)."""
    label = f"{key}={str(path)!r}"
    if index["version"] == 1:
        offsets = np.asarray(index["doc_offsets"], dtype=np.int64)
    else:
        try:
            offsets = np.fromfile(path / DOC_OFFSETS, dtype="<i8")
        except OSError as exc:
            raise ConfigError(f"{label} has no readable {DOC_OFFSETS} ({type(exc).__name__}); valid: re-run "
                              "`meshwright data prepare`") from None
    n, docs = index["num_tokens"], index.get("num_documents")
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != n or (isinstance(docs, int) and len(offsets) != docs + 1) \
            or bool((np.diff(offsets) < 0).any()):
        raise ConfigError(f"{label} has damaged document offsets ({len(offsets)} of them, from "
                          f"{offsets[0] if len(offsets) else None} to {offsets[-1] if len(offsets) else None}; expected "
                          f"num_documents+1 = {docs!r}+1 from 0 to num_tokens={n}, not decreasing); valid: re-run "
                          "`meshwright data prepare`")
    return offsets


class TokenDataset:
    """A prepared data directory: ``tokens.bin`` (held open, read with ``pread``) plus ``index.json``."""

    def __init__(self, path: str | Path, key: str = "data.path") -> None:
        self.path, self.key = Path(path), key  # key: the config field named in errors (data.mixture[1].path)
        index_file = self.path / "index.json"
        if not index_file.is_file():
            raise invalid(key, str(path), "'default' or a directory made by `meshwright data prepare` (with index.json)")
        self.index: dict[str, Any] = _read_index(index_file, key)
        self.doc_offsets = _doc_offsets(self.path, self.index, key)
        dtype = np.dtype(self.index["dtype"])
        n = int(self.index["num_tokens"])
        tokens_file = self.path / "tokens.bin"
        if not tokens_file.is_file():
            raise invalid(key, str(path), "a prepared data directory with tokens.bin; re-run `meshwright data prepare`")
        self.token_file = OpenFile(tokens_file, f"{key}={str(path)!r}")  # its size: the open file's, not the path's
        size = self.token_file.size
        if size != n * dtype.itemsize:
            raise ConfigError(f"{key}={str(path)!r} is inconsistent: tokens.bin has {size} bytes, index says {n} x {dtype.itemsize}; valid: re-run `meshwright data prepare`")
        # every read is checked against the vocabulary (FileArray.below); index.json's max_token_id (recorded by
        # `data prepare`) refuses a data set at start without reading all of tokens.bin on every rank
        self.tokens = FileArray(self.token_file, dtype, 0, n, below=self.vocab_size)
        top = self.index.get("max_token_id")
        if top is not None and top >= self.vocab_size:
            raise ConfigError(f"{key}={str(path)!r} holds token id {top}, outside its tokenizer's vocabulary of "
                              f"{self.vocab_size}; valid: re-run `meshwright data prepare`")
        self.mask: FileArray | None = None
        self.mask_file: OpenFile | None = None
        if self.index.get("loss_mask"):
            self.mask = self._loss_mask(n)

    def _loss_mask(self, n: int) -> FileArray:
        """mask.bin, one byte per token: a missing, truncated or grown one was numpy's "mmap length is greater than
        file size" traceback (or a mask misaligned with the tokens)."""
        name = self.index["loss_mask"]
        mask_file = self.path / name if isinstance(name, str) and Path(name).name == name else None
        opened = OpenFile(mask_file, f"{self.key}={str(self.path)!r}") if mask_file is not None and mask_file.is_file() else None
        size = opened.size if opened is not None else None
        if size != n:
            if opened is not None:
                opened.close()
            got = "missing" if size is None else f"{size} bytes"
            raise ConfigError(f"{self.key}={str(self.path)!r} has a damaged loss mask: index.json's loss_mask={name!r} "
                              f"is {got}, expected a file of {n} bytes beside tokens.bin; valid: re-run `meshwright data prepare`")
        assert opened is not None
        self.mask_file = opened
        return FileArray(self.mask_file, np.dtype(np.uint8), 0, n)

    @property
    def vocab_size(self) -> int:
        return int(self.index["tokenizer"]["vocab_size"])

    def __len__(self) -> int:
        return len(self.tokens)

    def split_point(self, val_fraction: float) -> int:
        """Token offset where validation starts: the first document boundary at or after (1-f)*N."""
        n = len(self.tokens)
        target = int(round((1.0 - val_fraction) * n))
        offsets = self.doc_offsets
        cut = int(np.searchsorted(offsets, target))
        point = int(offsets[cut]) if cut < len(offsets) else n
        if point <= 0 or point >= n or (n - point) < 0.25 * val_fraction * n:
            point = target  # one huge document (or a final one) - cut inside it
        return point

    def split(self, name: str, val_fraction: float, array: FileArray | None = None) -> FileArray:
        """The train or validation part of the tokens (or of ``array``), unread until the loader asks."""
        point = self.split_point(val_fraction)
        array = self.tokens if array is None else array
        if name == "train":
            return array.window(0, point)
        if name == "val":
            return array.window(point, len(array))
        raise invalid("split", name, "'train' or 'val'")

    def split_mask(self, name: str, val_fraction: float) -> FileArray | None:
        """The loss mask of a split (instruction data), or None (every target counts)."""
        return None if self.mask is None else self.split(name, val_fraction, self.mask)


class SequenceLoader:
    """Deterministic, resumable, data-parallel-sharded loader of (inputs, targets) micro-batches."""

    def __init__(self, tokens: np.ndarray | FileArray, seq_len: int, global_batch: int, micro_batch: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True, name: str = "train",
                 loss_mask: np.ndarray | FileArray | None = None) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise invalid("dp_rank", dp_rank, f"an integer in [0, dp_size={dp_size})")
        if global_batch % dp_size:
            raise invalid("global_batch", global_batch, f"a multiple of the data-parallel size {dp_size}")
        per_rank = global_batch // dp_size
        if per_rank % micro_batch:
            raise invalid("micro_batch", micro_batch, f"a divisor of global_batch/dp_size = {global_batch}/{dp_size} = {per_rank}")
        self.tokens = tokens
        self.loss_mask = loss_mask
        self.seq_len, self.global_batch, self.micro_batch = seq_len, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed, self.shuffle, self.name = dp_rank, dp_size, seed, shuffle, name
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise invalid("seq_len", seq_len, f"less than the {name} split's {len(tokens)} tokens")
        self.consumed = 0  # global sequences handed out so far (all ranks together)
        self.data_fingerprint: dict[str, Any] | None = None  # build_loaders: saved with the position (fingerprint.py)
        self.order = WindowOrder(self.n_windows, seq_len, seed, shuffle)  # stream.py: each epoch's permutation
        # tokens handed out before ``consumed_base`` (a resume: earlier sessions may have read another seq_len)
        self.tokens_base, self.consumed_base = 0, 0
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @property
    def batches_per_pass(self) -> int:
        """Global batches that visit every window once; an unshuffled loader only repeats windows after that."""
        return -(-self.n_windows // self.global_batch)

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch // (self.dp_size * self.micro_batch)

    def _window(self, position: int) -> int:
        epoch, i = divmod(position, self.n_windows)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            self._perm = self.order.permutation(epoch)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def _sequences(self, positions: range, source: np.ndarray | FileArray | None = None) -> torch.Tensor:
        source = self.tokens if source is None else source
        starts = [self._window(p) * self.seq_len for p in positions]
        if isinstance(source, FileArray):  # one pread per sequence, one fstat for the batch
            return torch.from_numpy(source.read_rows(starts, self.seq_len + 1).astype(np.int64))
        rows = [np.asarray(source[s: s + self.seq_len + 1], dtype=np.int64) for s in starts]
        return torch.from_numpy(np.stack(rows))

    def _rows(self, positions: range) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ``seq_len + 1`` tokens at each stream position, and their loss mask (None: every target counts)."""
        keep = None if self.loss_mask is None else self._sequences(positions, self.loss_mask)
        return self._sequences(positions), keep

    def batch_at(self, start: int) -> list[Batch]:
        """This rank's micro-batches of the global batch starting at global sequence ``start``."""
        per_rank = self.global_batch // self.dp_size
        first = start + self.dp_rank * per_rank
        seqs, keep = self._rows(range(first, first + per_rank))
        targets = seqs[:, 1:]
        if keep is not None:
            targets = targets.masked_fill(~keep[:, 1:].bool(), IGNORE_INDEX)
        out = []
        for i in range(0, per_rank, self.micro_batch):
            out.append((seqs[i: i + self.micro_batch, :-1].contiguous(), targets[i: i + self.micro_batch].contiguous()))
        return out

    def next_batch(self) -> list[Batch]:
        """Micro-batches for the next optimiser step on this rank; advances the position."""
        batch = self.batch_at(self.consumed)
        self.consumed += self.global_batch
        return batch

    def fixed_batches(self, n_steps: int) -> list[Batch]:
        """The first ``n_steps`` global batches (e.g. the same validation set at every eval)."""
        out: list[Batch] = []
        for k in range(n_steps):
            out.extend(self.batch_at(k * self.global_batch))
        return out

    def tokens_at(self, consumed: int) -> int:
        """Tokens the train stream handed out by position ``consumed`` (earlier sessions' other seq_len included)."""
        return self.tokens_base + (consumed - self.consumed_base) * self.seq_len

    def state_dict(self) -> dict[str, Any]:
        state = {"consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len, "n_windows": self.n_windows,
                 "tokens": self.tokens_at(self.consumed)}
        transition = self.order.state(self.consumed)
        if transition is not None:
            state["transition"] = transition
        if self.data_fingerprint is not None:
            state["data"] = self.data_fingerprint
        return state

    def load_state_dict(self, state: dict[str, Any], data_changed: bool = False) -> str | None:
        """Restore the position; returns a note to print, or None. ``data_changed`` (``--allow-config-change``): the
        data may differ, and so may ``seq_len`` and ``seed``. Other data (another fingerprint) starts at its first
        sequence: the checkpoint's position counted windows of the old data, which mean nothing in the new one (a
        mixture checkpoint holding this data as a source continues that source's stream). On the same data the
        *tokens* carry over and the current epoch goes on with the windows no step of it has read (``stream.py``).
        Without the flag a changed seq_len or seed is one line naming it."""
        check_same_stream(state, self, data_changed)
        consumed = int(state["consumed"])
        self.tokens_base = int(state.get("tokens", consumed * int(state["seq_len"])))
        old = self._saved_stream(state, consumed)
        note = None
        if old is None:  # other data: from its beginning, the tokens read so far still counted
            self.order.reset(0, None)
            self.consumed = 0
            note = (f"note: the {self.name} data is not the checkpoint's: it starts at its first sequence (the "
                    f"checkpoint's position, {consumed:,} sequences, counted other data); the {self.tokens_base:,} "
                    f"tokens read so far carry over")
        elif (old["seq_len"], old["seed"], old["salt"]) == (self.seq_len, self.seed, 0):
            self.order.reset(0, old["transition"])  # the same stream
            self.consumed = int(old["position"])
        else:
            self.consumed = self.order.carry(WindowOrder(old["n_windows"], old["seq_len"], old["seed"], self.shuffle,
                                                         old["salt"], old["transition"]), int(old["position"]))
            note = carry_note(self, old, self.tokens_base)
        self.consumed_base, self._perm_epoch = self.consumed, -1
        return note

    def _saved_stream(self, state: dict[str, Any], consumed: int) -> dict[str, Any] | None:
        """This data's stream in the checkpoint (its seq_len, seed, salt, transition and position), or None when the
        checkpoint counted other data. A mixture checkpoint's source is found by its fingerprint (one source: the
        mixture reads exactly this data's batches)."""
        sources = state.get("sources")
        if isinstance(sources, list):
            mine = digest(self.data_fingerprint)
            if len(sources) == 1 and (mine is None or sources[0].get("fingerprint") is None):
                found = sources  # no fingerprints to compare: the one source is taken as this data
            else:
                found = [s for s in sources if mine is not None and s.get("fingerprint") == mine]
            return stream_of(found[0], self.tokens, self.shuffle) if found else None
        if state.get("data") is not None and self.data_fingerprint is not None and state["data"] != self.data_fingerprint:
            return None
        return {"n_windows": state.get("n_windows"), "seq_len": state.get("seq_len"), "seed": state.get("seed"),
                "salt": 0, "transition": state.get("transition"), "position": consumed}


def check_same_stream(state: dict[str, Any], loader: SequenceLoader, allow_change: bool) -> None:
    """A changed seq_len or seed (or number of windows) is refused in one line unless ``--allow-config-change``."""
    for key in ("seq_len", "seed") if allow_change else ("seq_len", "seed", "n_windows"):
        if key == "n_windows" and "sources" in state:
            continue  # a mixture's checkpoint: the fingerprint decides whether it is this data
        if state.get(key) != getattr(loader, key):
            if allow_change:
                continue
            what = "the same data as the checkpointed run" if key == "n_windows" else \
                f"{state.get(key)!r} as in the checkpoint, or --allow-config-change to continue the run at {key}=" \
                f"{getattr(loader, key)!r} (the tokens read carry over: data/stream.py)"
            raise ConfigError(f"resume: {loader.name} loader {key}={getattr(loader, key)!r} differs from the "
                              f"checkpoint's {state.get(key)!r}; valid: {what}")


def stream_of(source: dict[str, Any], tokens: Any, shuffle: bool) -> dict[str, Any]:
    """A mixture checkpoint's source as the stream it was: its windows counted on ``tokens`` (the same data)."""
    return {"n_windows": (len(tokens) - 1) // int(source["seq_len"]), "seq_len": int(source["seq_len"]),
            "seed": int(source["seed"]), "salt": int(source.get("salt", 0)), "transition": source.get("transition"),
            "position": int(source["position"])}


def carry_note(loader: SequenceLoader, old: dict[str, Any], tokens: int) -> str:
    """The resume note of a carried-over stream: what changed, the tokens kept, how the epoch goes on."""
    changed = ", ".join(f"{k} {old[k]} -> {getattr(loader, k)}" for k in ("seq_len", "seed")
                        if old[k] != getattr(loader, k))
    epoch = int(old["position"]) // int(old["n_windows"])
    skipped = loader.order.skipped(epoch)
    return (f"note: resuming with {changed or 'another order'}: {tokens:,} tokens read so far carry over; epoch "
            f"{epoch} goes on with the {loader.order.n_windows - skipped:,} of {loader.order.n_windows:,} windows of "
            f"{loader.seq_len} tokens that no step of it has read ({skipped:,} overlap text it read and wait for "
            f"epoch {epoch + 1})")


def resolve_data_path(data_cfg: Any, vocab_size: int, progress: bool = True, path: str | None = None) -> Path:
    """``data.path`` (or ``path``, a mixture's source) -> prepared directory; ``default`` builds (once) the cached
    stdlib corpus."""
    path = data_cfg.path if path is None else path
    if path == "default":
        return prepare_default_corpus(data_cfg.max_files, data_cfg.tokenizer, vocab_size=vocab_size, progress=progress)
    if path.endswith(".jsonl") and Path(path).is_file():  # instruction/chat examples
        return prepare_instruct_cached(path, data_cfg.tokenizer, progress=progress)
    return Path(path)


def check_vocabulary(ds: TokenDataset, vocab_size: int, pretrained: bool) -> None:
    """The data's tokenizer must fit the model; bytes fed to a large pretrained vocabulary are an error
    (its ids 0-255 are not bytes), and a warning on a large model trained from scratch."""
    if ds.vocab_size > vocab_size:
        raise invalid("model.vocab_size", vocab_size, f"at least the data's vocabulary {ds.vocab_size} ({ds.path})")
    if ds.index["tokenizer"]["name"] != "byte" or vocab_size <= 256:
        return
    msg = (f"data.tokenizer='byte' feeds a model with vocab_size={vocab_size}; valid: data.tokenizer set to the "
           f"model's tokenizer.json")
    if pretrained:  # a checkpoint with more than 256 tokens was not trained on bytes
        raise ConfigError(msg)
    if vocab_size > LARGE_VOCAB:
        print(f"warning: {msg} (bytes use only 256 of its embeddings)", file=sys.stderr, flush=True)


def build_loaders(cfg: Any, vocab_size: int, dp_rank: int = 0, dp_size: int = 1,
                  progress: bool = True) -> tuple[SequenceLoader, SequenceLoader, Any]:
    """Train and validation loaders for a TrainConfig, checked against the model's vocabulary; the data set
    (a ``TokenDataset``, or a ``mixture.MixtureData`` for ``data.mixture``)."""
    if getattr(cfg.data, "mixture", None):
        from meshwright.data.mixture import build_mixture_loaders  # imports this module

        return build_mixture_loaders(cfg, vocab_size, dp_rank, dp_size, progress)
    ds = TokenDataset(resolve_data_path(cfg.data, vocab_size, progress))
    check_vocabulary(ds, vocab_size, pretrained=getattr(cfg, "init_from", None) is not None)
    common = dict(seq_len=cfg.seq_len, global_batch=cfg.global_batch, micro_batch=cfg.micro_batch,
                  dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed)
    f = cfg.data.val_fraction
    train = SequenceLoader(ds.split("train", f), shuffle=True, name="train", loss_mask=ds.split_mask("train", f), **common)
    val = SequenceLoader(ds.split("val", f), shuffle=False, name="val", loss_mask=ds.split_mask("val", f), **common)
    train.data_fingerprint = data_fingerprint(ds)
    return train, val, ds
