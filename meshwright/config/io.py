"""Typed dataclass <-> YAML/JSON round-tripping with one-line validation errors.

Every config and the Plan go through here so unknown keys, wrong types and impossible values are
reported the same way everywhere ("model.n_heads='x' is invalid; valid: an integer").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from meshwright.errors import ConfigError

T = TypeVar("T")
MAX_INT = 2**53  # no size, count or seed in meshwright is larger; beyond it a value is a typo or an attack


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice (line {key_node.start_mark.line + 1}); valid: each key once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


MAX_NODES = 1_000_000  # values in a config once aliases are expanded; a real plan of 10,000 layers has ~200k


def _expanded_size(obj: Any, memo: dict[int, int | None]) -> int:
    """Values ``obj`` holds once YAML aliases are expanded (shared objects counted once per use); cycles refused."""
    if not isinstance(obj, (dict, list)):
        return 1
    key = id(obj)
    if key in memo:
        if memo[key] is None:
            raise ConfigError("a YAML alias refers to a mapping or list that contains it; valid: a config without cycles")
        return memo[key]  # type: ignore[return-value]
    memo[key] = None
    items = [x for kv in obj.items() for x in kv] if isinstance(obj, dict) else obj
    n = 1
    for item in items:
        n += _expanded_size(item, memo)
        if n > MAX_NODES:
            break
    memo[key] = n
    return n


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with duplicate keys, alias bombs and alias cycles refused (one-line ConfigError): nine
    nested aliases of nine items expand to 10^9 values when a config is copied or written (a plan's
    ``predicted`` hung `train` that way)."""
    data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    if _expanded_size(data, {}) > MAX_NODES:
        raise ConfigError(f"the YAML expands to more than {MAX_NODES:,} values through aliases (*name); valid: a "
                          f"config without alias expansion bombs")
    return data


def _no_duplicate_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ConfigError(f"key {k!r} appears twice; valid: each key once")
        out[k] = v
    return out


def load_json(text: str) -> Any:
    """``json.loads`` with duplicate keys refused (one-line ConfigError)."""
    return json.loads(text, object_pairs_hook=_no_duplicate_pairs)


def read_text(path: Path, label: str) -> str:
    """A text file's contents; binary or non-UTF-8 content is one line naming ``label`` and the path."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{label}={str(path)!r} is unreadable ({exc.strerror or exc})") from None
    if b"\x00" in raw:
        raise ConfigError(f"{label}={str(path)!r} is a binary file; valid: a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}={str(path)!r} is not UTF-8 text (byte {exc.start}); valid: a UTF-8 text file") from None


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, field: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert containers; raise ConfigError on mismatch."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{field}={value!r} is invalid; valid: {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        if len(inner) == 1 and isinstance(value, (list, tuple, dict)):  # Optional[list/mapping]: the item's own error
            return _coerce(value, inner[0], field)  # (data.mixture[1].weight), not "a list or null" for the whole
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, field)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{field}={value!r} is invalid; valid: {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{field}={value!r} is invalid; valid: {_type_name(tp)}")
        return from_dict(tp, value, prefix=field)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{field}={value!r} is invalid; valid: a list")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{field}={value!r} is invalid; valid: a list of {len(args)} items")
            return tuple(_coerce(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{field}={value!r} is invalid; valid: a mapping")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, f"{field}.key"): _coerce(v, vt, f"{field}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{field}={value!r} is invalid; valid: true or false")
    if tp is int:
        out = None
        if isinstance(value, int) and not isinstance(value, bool):
            out = value
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
        if out is None:
            raise ConfigError(f"{field}={value!r} is invalid; valid: an integer")
        if abs(out) > MAX_INT:
            raise ConfigError(f"{field}={value!r} is invalid; valid: an integer of magnitude at most 2**53")
        return out
    if tp is float:
        out_f = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out_f = float(value) if abs(value) < 1e308 or isinstance(value, float) else math.inf
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                out_f = float(value)
            except ValueError:
                pass
        if out_f is None:
            raise ConfigError(f"{field}={value!r} is invalid; valid: a number")
        if not math.isfinite(out_f):  # NaN/inf in lr, eps, betas, peaks, ... poison a run silently
            raise ConfigError(f"{field}={value!r} is invalid; valid: a finite number (not NaN or infinity)")
        return out_f
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{field}={value!r} is invalid; valid: a string")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types, then validate."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}={data!r} is invalid; valid: a mapping of {cls.__name__} fields")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dot = f"{prefix}." if prefix else ""
    for key in data:
        if key not in fields:
            raise ConfigError(f"{dot}{key} is not a known key; valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{dot}{name}")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{dot}{missing[0]} is required; valid: {_type_name(hints[missing[0]])}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data form of a dataclass tree (tuples become lists) for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a mapping, with a one-line error for missing, binary, empty, duplicated-key
    or malformed files."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config path={str(p)!r} does not exist; valid: an existing YAML or JSON file")
    text = read_text(p, "config path")
    try:
        data = load_json(text) if p.suffix == ".json" else load_yaml(text)
    except ConfigError as exc:
        raise ConfigError(f"config path={str(p)!r}: {exc}") from None
    except (yaml.YAMLError, json.JSONDecodeError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"config path={str(p)!r} is not valid YAML/JSON ({first})") from None
    if data is None or data == {}:
        raise ConfigError(f"config path={str(p)!r} is empty; valid: a mapping of fields (an empty file is a mistake, "
                          f"not a request for defaults)")
    if not isinstance(data, dict):
        raise ConfigError(f"config path={str(p)!r} holds {type(data).__name__}; valid: a mapping at the top level")
    return data


def check_output_path(path: str | Path, label: str, directory: bool,
                      inputs: dict[str, str | Path | None] | None = None) -> None:
    """Before any work: ``path`` can become the output (a ``directory`` or a file) — not the other kind already,
    not one of the command's ``inputs`` (flag -> path: `plan --model m.yaml --out m.yaml` replaced the user's model
    config with the plan), and its nearest existing parent is a writable directory. Creates nothing."""
    p = Path(path)
    what = "a directory" if directory else "a file path"
    if not str(path).strip():  # Path("") is ".": an export or report went into the working directory
        raise ConfigError(f"{label}={str(path)!r} is invalid; valid: {what} (a non-empty path)")
    if p.exists() and p.is_dir() != directory:
        raise ConfigError(f"{label}={str(path)!r} is invalid; valid: {what} (this path is {'a file' if directory else 'a directory'})")
    for flag, source in (inputs or {}).items():
        if p.exists() and source is not None and Path(source).exists() and os.path.samefile(p, source):
            raise ConfigError(f"{label}={str(path)!r} is invalid; valid: {what} other than the {flag} input "
                              f"{str(source)!r} (writing it would replace that file)")
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if parent is not None and not (parent.is_dir() and os.access(parent, os.W_OK)):
        raise ConfigError(f"{label}={str(path)!r} is invalid; valid: {what} in a writable directory ({parent} is not one)")


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def write_json_atomic(data: Any, path: str | Path, indent: int = 2) -> None:
    """Write JSON to a temp file and rename it into place, so readers never see half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, sort_keys=True))
    tmp.replace(p)


def read_versioned_json(path: str | Path, label: str, kind: str, version: int, command: str) -> dict[str, Any]:
    """Load a profile-style JSON and check its ``kind`` and ``version`` (one-line errors naming ``label``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{label}={str(p)!r} does not exist; valid: a JSON file from `{command}`")
    try:
        data = json.loads(read_text(p, label))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{label}={str(p)!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        found = data.get("kind") if isinstance(data, dict) else None
        raise ConfigError(f"{label}.kind={found!r} is invalid; valid: {kind!r}")
    if data.get("version") != version:
        raise ConfigError(f"{label}.version={data.get('version')!r} is invalid; valid: {version} (re-run `{command}`)")
    return data


def write_yaml(obj: Any, path: str | Path) -> None:
    """Write atomically so a crash never leaves half a config behind."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(dump_yaml(obj))
    tmp.replace(p)


__all__ = ["check_output_path", "dump_yaml", "from_dict", "load_json", "load_yaml", "read_mapping", "read_text", "read_versioned_json", "to_dict", "write_json_atomic", "write_yaml"]
