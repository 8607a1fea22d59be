"""A cheap fingerprint of a prepared data set, recorded with the loader's position in every checkpoint.

Why: the loader's state is one number (sequences consumed), which means something only on the data it was
counted on. A directory re-prepared with other inputs or another tokenizer used to resume silently at a position
in other data. The fingerprint is what tells data sets apart without reading all of ``tokens.bin``: the index's
num_tokens, dtype and tokenizer, the bytes of tokenizer.json, the document offsets, the file sizes and a SHA-256
of 17 evenly spaced 64 KiB samples of tokens.bin (and mask.bin): about 1 MiB read, whatever the data's size.
Paths are left out (the index's ``sources``): the same inputs prepared from elsewhere are the same data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from meshwright.errors import ConfigError

SAMPLES = 16  # evenly spaced samples, plus the file's last bytes
SAMPLE_BYTES = 1 << 16


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _sample_sha(read: Any, size: int) -> str:
    """SHA-256 of evenly spaced samples of a file of ``size`` bytes (all of it when small)."""
    h = hashlib.sha256()
    if size <= (SAMPLES + 1) * SAMPLE_BYTES:
        h.update(read(0, size))
    else:
        step = (size - SAMPLE_BYTES) // SAMPLES
        for k in range(SAMPLES):
            h.update(read(k * step, SAMPLE_BYTES))
        h.update(read(size - SAMPLE_BYTES, SAMPLE_BYTES))
    return h.hexdigest()[:16]


def data_fingerprint(ds: Any) -> dict[str, Any]:
    """The fingerprint of a ``TokenDataset`` (JSON-ready, stored in trainer_state.json)."""
    index = ds.index
    tok_file = Path(ds.path) / "tokenizer.json"
    fp: dict[str, Any] = {
        "num_tokens": int(index["num_tokens"]), "dtype": index["dtype"],
        "tokenizer": json.dumps(index["tokenizer"], sort_keys=True),
        "tokenizer_json_sha256": _sha(tok_file.read_bytes()) if tok_file.is_file() else None,
        "doc_offsets_sha256": _sha(ds.doc_offsets.astype("<i8").tobytes()),
        "tokens_bin_bytes": ds.token_file.size,
        "tokens_bin_sample_sha256": _sample_sha(ds.token_file.pread, ds.token_file.size),
        "loss_mask": index.get("loss_mask"),
    }
    if ds.mask_file is not None:
        fp["mask_bin_sample_sha256"] = _sample_sha(ds.mask_file.pread, ds.mask_file.size)
    return fp


def digest(fingerprint: dict[str, Any] | None) -> str | None:
    """A short name of one data set's fingerprint: how a resume finds a mixture's source again (mixture.py), and a
    ``data.path`` run finds its data among a mixture checkpoint's sources (loader.py)."""
    if not isinstance(fingerprint, dict):
        return None
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key saved -> now`` for every field that differs (a field only one side has counts)."""
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


def data_label(data_cfg: Any) -> str:
    """How messages name the run's data: ``data.path='x'``, or ``data.mixture=[x (0.7), y (0.3)]``."""
    mixture = getattr(data_cfg, "mixture", None)
    if not mixture:
        return f"data.path={data_cfg.path!r}"
    return "data.mixture=[" + ", ".join(f"{s.path} ({s.weight:g})" for s in mixture) + "]"


def check_resume_data(saved: Any, now: dict[str, Any] | None, label: str, ckpt: str,
                      allow_change: bool) -> str | None:
    """Refuse (one line) a resume onto data other than the checkpoint's; returns a note to print, or None.
    A checkpoint from before fingerprints (none saved) resumes with a note; ``allow_change``
    (``--allow-config-change``) makes a difference a note, for a resume onto new data on purpose. ``label``: how
    messages name the data (``data_label``: ``data.path='x'``, or a mixture's sources and weights)."""
    if now is None:
        return None
    if not isinstance(saved, dict):
        return (f"note: checkpoint {ckpt} records no data fingerprint (written before they were); {label} could not "
                f"be checked against the data it was trained on")
    diff = differences(saved, now)
    if not diff:
        return None
    what = ", ".join(diff)
    if allow_change:
        return f"note: {label} differs from checkpoint {ckpt}'s data ({what}); resuming on it as asked"
    raise ConfigError(f"resume: {label} is not the data set checkpoint {ckpt} was trained on ({what}); "
                      f"valid: that data set back (prepared again from the same inputs and tokenizer), a new run "
                      f"(another out_dir or --overwrite), or --allow-config-change to continue on this data on purpose")
