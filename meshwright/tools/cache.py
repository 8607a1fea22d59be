"""Where meshwright keeps what it can rebuild: one root for every cache, so one variable moves them all."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(create: bool = False) -> Path:
    """``$MESHWRIGHT_CACHE`` or ``~/.cache/meshwright``: tokenized corpora at the top, profiles under ``profiles/``.
    ``create``: made now, or one line naming the variable (``usable``)."""
    env = os.environ.get("MESHWRIGHT_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "meshwright"
    return usable(root, "MESHWRIGHT_CACHE" if env else None) if create else root


def profile_cache(create: bool = False) -> Path:
    """Cached hardware and model profiles: ``$MESHWRIGHT_CACHE_DIR`` where set (the older, profiles-only
    variable, still honoured), else ``cache_root()/profiles``."""
    old = os.environ.get("MESHWRIGHT_CACHE_DIR")
    if old:
        return usable(Path(old).expanduser(), "MESHWRIGHT_CACHE_DIR") if create else Path(old).expanduser()
    root = cache_root() / "profiles"
    return usable(root, "MESHWRIGHT_CACHE" if os.environ.get("MESHWRIGHT_CACHE") else None) if create else root


def usable(path: Path, env: str | None) -> Path:
    """``path`` created (with its parents) and writable, or one line naming ``env``, the variable that chose it: a
    cache pointing at a file or a read-only place was `path='...' is unusable (Not a directory)`, the variable
    unnamed (under `plan: auto` only after the profiles were measured)."""
    from meshwright.errors import ConfigError

    try:
        path.mkdir(parents=True, exist_ok=True)
        problem = None if os.access(path, os.W_OK | os.X_OK) else "not writable"
    except OSError as exc:
        problem = exc.strerror or str(exc)
    if problem is None:
        return path
    if env is None:
        raise ConfigError(f"cache directory {str(path)!r} is unusable ({problem}); valid: a writable directory (set "
                          f"MESHWRIGHT_CACHE to one)")
    where = "" if Path(os.environ[env]).expanduser() == path else f" for {path}"
    raise ConfigError(f"{env}={os.environ[env]!r} is invalid ({problem}{where}); valid: a writable directory, or "
                      f"unset")
