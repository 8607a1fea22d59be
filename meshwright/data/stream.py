"""The order in which one data set's windows are read, and how that order carries over a resume that changes
``seq_len`` or ``seed`` (``--allow-config-change``).

Epoch ``e`` visits every window once, in a permutation drawn from ``(seed, e)`` (``(seed, e, salt)`` for a
mixture's source with ``salt > 0``). A loader's position is one number, so a changed ``seq_len`` (context
extension: a 2k-token run continued at 8k) or ``seed`` needs a rule for where the new stream starts.

What others do: Megatron-LM carries ``consumed_train_samples`` and skips that many *samples* of the dataset rebuilt
for the new ``--seq-length`` and seed: at 4x the length it skips 4x the tokens, and its new shuffle draws windows
of text already trained on in the current epoch. torchtitan's text loader is unshuffled and carries its position
in the token stream (documents read plus the token buffer), so it continues at the next unread token.

Here, as torchtitan, the *tokens* carry over, and no window reads text an earlier step of the current epoch already
read, as far as windows of the new length allow: epoch ``e`` (the one the checkpoint was in) becomes a transition
epoch whose order puts every new window that overlaps a window already read this epoch first, in the normal
permutation's order, then the untouched ones, also in that order; the position jumps past the touched ones (a
window's last token, the next window's first, counts with the window it starts). So the rest of epoch ``e`` reads
only text this epoch has not yet trained on (the untouched parts of touched windows wait for epoch ``e + 1``), and
epoch ``e + 1`` is the new stream's normal permutation. The windows already read are a list of *segments*, one per
earlier stream of the epoch (its seed, seq_len, windows and where it stopped), kept in the checkpoint until the
epoch ends: a second change in the same epoch stacks on the first. The per-batch path is untouched: only the
permutation of the transition epoch is built differently.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def epoch_key(seed: int, epoch: int, salt: int = 0) -> list[int]:
    """The RNG key of epoch ``epoch``'s permutation (salt 0: a single data set, a mixture's first source)."""
    return [seed, epoch] if salt == 0 else [seed, epoch, salt]


def touched(n_windows: int, seq_len: int, read: np.ndarray, read_len: int) -> np.ndarray:
    """Which of ``n_windows`` windows of ``seq_len`` tokens overlap the windows ``read`` of ``read_len`` tokens."""
    mask = np.zeros(n_windows + 1, dtype=np.int64)
    if len(read):
        start = np.asarray(read, dtype=np.int64) * read_len
        first = np.minimum(start // seq_len, n_windows)
        last = np.minimum((start + read_len - 1) // seq_len + 1, n_windows)
        np.add.at(mask, first, 1)
        np.add.at(mask, last, -1)
    return np.cumsum(mask)[:n_windows] > 0


class WindowOrder:
    """Epoch -> permutation of one data set's windows; the transition epoch's after a carried-over resume."""

    def __init__(self, n_windows: int, seq_len: int, seed: int, shuffle: bool = True, salt: int = 0,
                 transition: dict[str, Any] | None = None) -> None:
        self.n_windows, self.seq_len, self.seed, self.shuffle, self.salt = n_windows, seq_len, seed, shuffle, salt
        self.transition = transition  # {"epoch": e, "segments": [{seed, seq_len, n_windows, salt, end}, ...]} or None
        self._cached: tuple[int, np.ndarray, int] | None = None

    def reset(self, salt: int, transition: dict[str, Any] | None) -> None:
        """Another salt or transition (a resume): the cached epoch no longer holds."""
        self.salt, self.transition, self._cached = salt, transition, None

    def _normal(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_windows)
        return np.random.default_rng(epoch_key(self.seed, epoch, self.salt)).permutation(self.n_windows)

    def _build(self, epoch: int) -> tuple[np.ndarray, int]:
        """(order, skipped): the epoch's permutation and how many of its first windows an earlier stream touched."""
        perm = self._normal(epoch)
        tr = self.transition
        if tr is None or tr["epoch"] != epoch:
            return perm, 0
        mask = np.zeros(self.n_windows, dtype=bool)
        segments = tr["segments"]
        for i, seg in enumerate(segments):
            earlier = WindowOrder(seg["n_windows"], seg["seq_len"], seg["seed"], self.shuffle, seg.get("salt", self.salt),
                                  {"epoch": epoch, "segments": segments[:i]} if i else None)
            order, skip = earlier._build(epoch)
            mask |= touched(self.n_windows, self.seq_len, order[skip: seg["end"]], seg["seq_len"])
        hit = mask[perm]
        return np.concatenate([perm[hit], perm[~hit]]), int(hit.sum())

    def permutation(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of windows (cached: one epoch at a time, as the loaders read)."""
        if self._cached is None or self._cached[0] != epoch:
            order, skip = self._build(epoch)
            self._cached = (epoch, order, skip)
        return self._cached[1]

    def skipped(self, epoch: int) -> int:
        self.permutation(epoch)
        assert self._cached is not None
        return self._cached[2]

    def state(self, position: int) -> dict[str, Any] | None:
        """The transition to save with ``position``: kept while the position is still in its epoch."""
        tr = self.transition
        return tr if tr is not None and position // self.n_windows == tr["epoch"] else None

    def carry(self, earlier: "WindowOrder", position: int) -> int:
        """Continue ``earlier``'s stream (other seq_len or seed, same data) from its ``position``: set this order's
        transition and return where this stream starts (module docstring)."""
        epoch, i = divmod(position, earlier.n_windows)
        segments = list(earlier.transition["segments"]) if earlier.state(position) is not None else []  # type: ignore[index]
        if i > earlier.skipped(epoch):  # it read something this epoch
            segments.append({"seed": earlier.seed, "seq_len": earlier.seq_len, "n_windows": earlier.n_windows,
                             "salt": earlier.salt, "end": i})
        self.reset(self.salt, {"epoch": epoch, "segments": segments} if segments else None)
        return epoch * self.n_windows + self.skipped(epoch)
