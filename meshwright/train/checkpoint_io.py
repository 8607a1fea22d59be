"""Reading a checkpoint directory without trusting it: nothing in it is executed, every byte is checksummed.

torch's ``FileSystemReader`` reads ``.metadata`` with a plain ``pickle.load`` and DCP's default load planner
reads byte items with ``torch.load(weights_only=False)``: a crafted checkpoint runs code on ``--resume``.
``SafeFileSystemReader`` unpickles the metadata with an allow-list of DCP's own metadata classes and
``SafeLoadPlanner`` loads byte items with ``weights_only=True``; anything else is refused with one line.
``write_manifest``/``verify_manifest`` keep a SHA-256 per file (``checksums.json``), so a truncated, zeroed
or garbled file is named in one line before DCP reads it; without the manifest, ``verify_sizes`` still finds a
truncated or missing shard from ``.metadata``'s offsets and lengths.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # DCP's own helper, as its planner uses
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from meshwright.errors import ConfigError

MANIFEST = "checksums.json"
_CHUNK = 1 << 20

# (module, name) pairs a DCP .metadata pickle may name; everything else is refused.
_DCP_METADATA = {"Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING"}
_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": _DCP_METADATA,
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # maps a layout name to a torch.layout, nothing else
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "pathlib._local": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class CheckpointCorrupt(ConfigError):
    """A checkpoint file is missing, damaged or not what a meshwright checkpoint holds: one line, the damage and what
    the user can do (``damage`` alone for the resume's fall-back warning)."""

    VALID = ("valid: an intact checkpoint (a resume falls back to the newest intact step_*; --resume-from and "
             "export can name another)")

    def __init__(self, damage: str) -> None:
        self.damage = damage
        super().__init__(f"{damage}; {self.VALID}")


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the classes a DCP metadata file legitimately names (and torch dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata class")


def read_metadata_file(path: str | Path) -> Metadata:
    """Unpickle a DCP ``.metadata`` file through the allow-list; one-line ``CheckpointCorrupt`` otherwise."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except OSError as exc:
        raise CheckpointCorrupt(f"checkpoint file {path} is unreadable: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a damaged or hostile file
        raise CheckpointCorrupt(f"checkpoint file {path} is refused: {_one_line(exc)} "
                                f"(truncated, garbled or not written by DCP; nothing in it was run)") from None
    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise CheckpointCorrupt(f"checkpoint file {path} is refused: it holds {type(metadata).__name__}, not DCP Metadata")
    return metadata


def verify_sizes(directory: Path, metadata: Metadata) -> None:
    """The check a checkpoint without ``checksums.json`` (an older meshwright, another tool's DCP save) still gets:
    ``.metadata`` records each item's file, offset and length, so every file it names must exist and reach the end
    of its last item. A stat per file, no reading: a truncated or missing shard is one-line ``CheckpointCorrupt``
    before DCP fails on it deep inside torch (and a resume falls back to the previous checkpoint)."""
    ends: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name, offset, length = (getattr(info, k, None) for k in ("relative_path", "offset", "length"))
        if not (isinstance(name, str) and isinstance(offset, int) and isinstance(length, int)):
            raise CheckpointCorrupt(f"checkpoint file {directory / '.metadata'} is refused: a storage entry without "
                                    f"a file name, offset and length ({type(info).__name__})")
        if not name or "/" in name or "\\" in name or name.startswith(".."):
            raise CheckpointCorrupt(f"checkpoint file {directory / '.metadata'} is refused: storage file {name!r} is "
                                    f"not a file name in the checkpoint directory")
        ends[name] = max(ends.get(name, 0), offset + length)
    for name, end in sorted(ends.items()):
        f = directory / name
        if not f.is_file():
            raise CheckpointCorrupt(f"checkpoint file {f} is missing (its .metadata places data in it)")
        size = f.stat().st_size
        if size < end:
            raise CheckpointCorrupt(f"checkpoint file {f} is truncated: {size} bytes, its .metadata places data up to "
                                    f"byte {end}")


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` goes through the allow-listed unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        metadata = read_metadata_file(self._get_metadata_path(rank))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that loads byte items (optimizer hyper-parameters, ...) with ``weights_only=True``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointCorrupt(f"checkpoint item {read_item.dest_index.fqn!r} is refused: {_one_line(exc)}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()[:300]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    """SHA-256 of each file, on up to 8 threads (hashlib releases the GIL: ~0.8 GB/s per core measured here)."""
    if len(paths) <= 1:
        return [file_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(file_sha256, paths))


def write_manifest(directory: Path, names: list[str] | None = None) -> None:
    """Record size and SHA-256 of every file in ``directory`` (or ``names``) in ``checksums.json``, fsynced."""
    files = sorted(names if names is not None else (p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST))
    digests = _hash_all([directory / n for n in files])
    entries = {n: {"bytes": (directory / n).stat().st_size, "sha256": d} for n, d in zip(files, digests)}
    tmp = directory / (MANIFEST + ".tmp")
    with tmp.open("w") as fh:
        json.dump({"version": 1, "files": entries}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    path = directory / MANIFEST
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and "sha256" in v and "bytes" in v for v in files.values()):
            raise ValueError("malformed entries")
        return files
    except FileNotFoundError:
        raise CheckpointCorrupt(f"checkpoint {directory} has no {MANIFEST} (incomplete or not written by meshwright)") from None
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointCorrupt(f"checkpoint file {path} is garbled: {_one_line(exc)}") from None


def verify_manifest(directory: Path, part: tuple[int, int] = (0, 1)) -> None:
    """Check the files the manifest lists: present, same size (all of them), same SHA-256 (the ``part=(i, n)``
    share: files i, i+n, ... so n ranks split the hashing). One-line ``CheckpointCorrupt`` otherwise."""
    entries = sorted(read_manifest(directory).items())
    for name, entry in entries:
        if "/" in name or name.startswith(".."):
            raise CheckpointCorrupt(f"checkpoint file {directory / MANIFEST} is garbled: entry {name!r} is not a file name")
        f = directory / name
        if not f.is_file():
            raise CheckpointCorrupt(f"checkpoint file {f} is missing")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointCorrupt(f"checkpoint file {f} is truncated or grown: {size} bytes, expected {entry['bytes']}")
    mine = entries[part[0]::max(part[1], 1)]
    for (name, entry), digest in zip(mine, _hash_all([directory / n for n, _ in mine])):
        if digest != entry["sha256"]:
            raise CheckpointCorrupt(f"checkpoint file {directory / name} is corrupt: its SHA-256 does not match {MANIFEST}")
