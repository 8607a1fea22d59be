"""Read-only token arrays read with positional reads (``os.pread``) on a file held open, instead of a memory map.

Why: a memory-mapped ``tokens.bin`` that is truncated while a run reads it (an in-place copy or ``truncate``, a
disk sync that shortens it) raises SIGBUS at the first page past the new end: the process dies with "Bus error"
and no message, losing the steps since its last checkpoint. A ``pread`` past the end only returns fewer bytes,
which becomes one line naming the file. The file stays open from the start, so a data directory replaced
atomically under the run (``meshwright data prepare`` into the same path) does not change what the run reads;
its resume is then checked against the data set's fingerprint (``fingerprint.py``). After each batch an
``fstat`` of the open file compares its size and modification time with those at the start, so an in-place
rewrite of the same size is refused too. Cost: one ``pread`` per sequence and one ``fstat`` per batch
(benchmarks/results/data_loader.md).
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from meshwright.errors import ConfigError

RESTORE = "valid: restore the data the run started with and resume (checkpoints so far are intact), or start a new run"


class DataChanged(ConfigError):
    """A data file changed under a running job (truncated, grown or rewritten in place)."""


class OpenFile:
    """A data file held open with the size and modification time it had when opened."""

    def __init__(self, path: Path, label: str) -> None:
        self.path, self.label = Path(path), label
        self.fd = os.open(self.path, os.O_RDONLY)
        self._close = weakref.finalize(self, os.close, self.fd)
        st = os.fstat(self.fd)
        self.size, self.mtime_ns = st.st_size, st.st_mtime_ns

    def close(self) -> None:
        self._close()

    def _changed(self, what: str) -> DataChanged:
        return DataChanged(f"{self.label}: {self.path.name} changed while the run was reading it ({what}); {RESTORE}")

    def check(self) -> None:
        """Refuse a file whose size or modification time differs from the start's (one ``fstat``)."""
        st = os.fstat(self.fd)
        if st.st_size != self.size:
            raise self._changed(f"now {st.st_size} bytes, {self.size} when the run started")
        if st.st_mtime_ns != self.mtime_ns:
            raise self._changed("rewritten in place: its modification time moved")

    def readinto(self, offset: int, out: np.ndarray) -> None:
        """Fill ``out`` (contiguous) from byte ``offset``; fewer bytes (the file was cut) is the one-line error."""
        view = memoryview(out).cast("B")
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if not got:
                size = os.fstat(self.fd).st_size
                raise self._changed(f"now {size} bytes, {self.size} when the run started; a read at byte "
                                    f"{offset + done} found its end")
            done += got

    def pread(self, offset: int, nbytes: int) -> bytes:
        """``nbytes`` from ``offset`` (the fingerprint's samples)."""
        out = np.empty(nbytes, dtype=np.uint8)
        self.readinto(offset, out)
        return out.tobytes()


class FileArray:
    """``length`` elements of ``dtype`` from element ``start`` of an open file; slicing reads (returns ndarray),
    ``window`` does not (a lazy sub-range, as a train/validation split). With ``below``, every read is checked to
    hold values under it (token ids under the vocabulary size): a batch costs one ``max``, where checking the whole
    file at start would read it all, once per rank, before the first step."""

    CHUNK = 1 << 22  # elements per read when scanning the whole array (max, sum)

    def __init__(self, file: OpenFile, dtype: np.dtype, start: int = 0, length: int | None = None,
                 below: int | None = None) -> None:
        self.file, self.dtype, self.start, self.below = file, np.dtype(dtype), start, below
        self.length = file.size // self.dtype.itemsize - start if length is None else length

    def __len__(self) -> int:
        return self.length

    @property
    def shape(self) -> tuple[int]:
        return (self.length,)

    def window(self, start: int, stop: int) -> "FileArray":
        start, stop, _ = slice(start, stop).indices(self.length)
        return FileArray(self.file, self.dtype, self.start + start, max(stop - start, 0), self.below)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Elements ``[start, stop)`` (clipped to the array), checked against the file's start-of-run state."""
        start, stop, _ = slice(start, stop).indices(self.length)
        n = max(stop - start, 0)
        if n == 0:
            return np.zeros(0, dtype=self.dtype)
        return self._read_into(start, np.empty(n, dtype=self.dtype))

    def _read_into(self, start: int, out: np.ndarray) -> np.ndarray:
        self.file.readinto((self.start + start) * self.dtype.itemsize, out)
        self.file.check()
        return self._bounded(out)

    def _bounded(self, out: np.ndarray) -> np.ndarray:
        """``out``, refused in one line if it holds a value at or above ``below``: an id outside the vocabulary is an
        index error deep in the embedding on CPU, a device-side assert on CUDA."""
        if self.below is not None and out.size:
            top = int(out.max())
            if top >= self.below:
                raise ConfigError(f"{self.file.label} holds token id {top} in {self.file.path.name}, outside its "
                                  f"tokenizer's vocabulary of {self.below}; valid: re-run `meshwright data prepare`")
        return out

    def read_rows(self, starts: list[int], n: int) -> np.ndarray:
        """Rows of ``n`` elements from each of ``starts``: one ``pread`` each, then one ``fstat`` for all."""
        out = np.empty((len(starts), n), dtype=self.dtype)
        size = self.dtype.itemsize
        for i, s in enumerate(starts):
            if s < 0 or s + n > self.length:
                raise IndexError(f"rows [{s}, {s + n}) outside an array of {self.length}")
            self.file.readinto((self.start + s) * size, out[i])
        self.file.check()
        return self._bounded(out)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.length)
            if step == 1:
                return self.read(start, stop)
            picks = np.arange(start, stop, step)
            if not len(picks):
                return np.zeros(0, dtype=self.dtype)
            lo = int(picks.min())
            return self.read(lo, int(picks.max()) + 1)[picks - lo]
        i = int(key)
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} outside an array of {self.length}")
        i %= self.length
        return self.read(i, i + 1)[0]

    def chunks(self) -> Iterator[np.ndarray]:
        """The whole array in order, through one reused buffer (valid until the next chunk)."""
        buf = np.empty(min(self.CHUNK, self.length), dtype=self.dtype)
        for a in range(0, self.length, self.CHUNK):
            yield self._read_into(a, buf[: min(self.CHUNK, self.length - a)])

    def max(self) -> Any:
        if not self.length:
            raise ValueError("max of an empty array")
        return max(c.max() for c in self.chunks())

    def sum(self) -> int:
        return int(sum(int(c.sum(dtype=np.int64)) for c in self.chunks()))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self.read(0, self.length).copy()
        return whole if dtype is None else whole.astype(dtype)
