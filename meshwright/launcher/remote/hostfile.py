"""Hostfiles: DeepSpeed's ``host slots=N`` format or a cluster YAML, with strict host-name checks.

Host names end up in SSH commands and rendezvous endpoints, so anything that is not a plain DNS name
or IPv4 address is rejected here, once, with a one-line error, before any command is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meshwright.config.io import load_yaml, read_text
from meshwright.config.schema import MAX_DEVICES
from meshwright.errors import ConfigError, invalid

HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    user: str | None = None
    port: int | None = None

    @property
    def address(self) -> str:
        return f"{self.user}@{self.name}" if self.user else self.name


def check_host_name(name: str, field: str = "host") -> str:
    if not isinstance(name, str) or not HOST_RE.match(name) or ".." in name:
        raise invalid(field, name, "a DNS name or IPv4 address (letters, digits, '.', '-')")
    return name


def _make_host(name: Any, slots: Any, where: str, user: Any = None, port: Any = None, keys: bool = False) -> Host:
    """``keys``: name the YAML keys (``hosts[0].slots``, ``hosts[0].name``), else the hostfile's words."""
    label = (lambda key, word: f"{where}.{key}") if keys else (lambda key, word: f"{where} {word}")
    check_host_name(name, label("name", "host"))
    if not isinstance(slots, int) or isinstance(slots, bool) or not 1 <= slots <= MAX_DEVICES:
        raise invalid(label("slots", "slots"), slots, f"a positive integer, at most {MAX_DEVICES:,}")
    if user is not None and (not isinstance(user, str) or not USER_RE.match(user)):
        raise invalid(label("user", "user"), user, "a POSIX user name")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536):
        raise invalid(label("port", "port"), port, "an integer in 1..65535")  # `port: true` was port 1
    return Host(name, slots, user, port)


def parse_hostfile_text(text: str, source: str = "hostfile") -> list[Host]:
    """Parse DeepSpeed's format: one ``hostname slots=N`` per line, ``#`` comments."""
    hosts: list[Host] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        where = f"{source}:{lineno}"
        if len(parts) != 2 or not parts[1].startswith("slots="):
            raise ConfigError(f"{where} line={raw.strip()!r} is invalid; valid: 'HOSTNAME slots=N'")
        try:
            slots = int(parts[1][len("slots="):])
        except ValueError:
            raise invalid(f"{where} slots", parts[1][len("slots="):], "a positive integer") from None
        hosts.append(_make_host(parts[0], slots, where))
    return _check_hosts(hosts, source)


def _check_hosts(hosts: list[Host], source: str) -> list[Host]:
    if not hosts:
        raise ConfigError(f"{source} is empty; valid: at least one 'HOSTNAME slots=N' line")
    names = [h.name for h in hosts]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise invalid(f"{source} host", dup, "each host listed once")
    slots = {h.slots for h in hosts}
    if len(slots) > 1:
        raise invalid(f"{source} slots", sorted(slots), "the same number of slots on every host (torchrun --nproc-per-node)")
    return hosts


HOST_KEYS = ("name", "slots", "user", "port")


def load_hosts(path: str | Path) -> list[Host]:
    """A DeepSpeed hostfile, or a YAML with ``hosts: [{name, slots, user?, port?}]``."""
    p = Path(path)
    if not p.is_file():
        raise invalid("hosts", str(p), "an existing hostfile ('HOST slots=N' lines) or cluster YAML")
    text = read_text(p, "hosts")  # binary or non-UTF-8 is one line
    if p.suffix in (".yaml", ".yml"):
        try:
            data = load_yaml(text) or {}
        except yaml.YAMLError as exc:
            raise invalid("hosts", str(p), f"valid YAML ({str(exc).splitlines()[0]})") from None
        entries = data.get("hosts") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise invalid(f"{p} hosts", entries, "a list of {name, slots} mappings")
        hosts = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or "name" not in e:
                raise invalid(f"{p} hosts[{i}]", e, "a mapping with name and slots")
            unknown = [k for k in e if k not in HOST_KEYS]
            if unknown:  # a typo such as `slot: 8` silently meant 1 slot
                raise invalid(f"{p} hosts[{i}].{unknown[0]}", e[unknown[0]], f"keys among {', '.join(HOST_KEYS)}")
            hosts.append(_make_host(e["name"], e.get("slots", 1), f"{p} hosts[{i}]", e.get("user"), e.get("port"),
                                    keys=True))
        return _check_hosts(hosts, str(p))
    return parse_hostfile_text(text, str(p))
