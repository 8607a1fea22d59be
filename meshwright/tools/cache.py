"""Where meshwright keeps what it can rebuild: one root for every cache, so one variable moves them all."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$MESHWRIGHT_CACHE`` or ``~/.cache/meshwright``: tokenized corpora at the top, profiles under ``profiles/``."""
    env = os.environ.get("MESHWRIGHT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "meshwright"


def profile_cache() -> Path:
    """Cached hardware and model profiles: ``$MESHWRIGHT_CACHE_DIR`` where set (the older, profiles-only
    variable, still honoured), else ``cache_root()/profiles``."""
    old = os.environ.get("MESHWRIGHT_CACHE_DIR")
    return Path(old).expanduser() if old else cache_root() / "profiles"
