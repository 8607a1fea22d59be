"""One PEP 562 lazy loader for the packages whose torch-backed names must not load with the package.

The planner and ``data prepare`` import torch-free submodules through these packages; a package ``__init__`` that
imported its torch-backed names eagerly would import torch for them too.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_names(package: str, names: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``names[name]`` (a submodule of ``package``) on first
    use of ``name`` and caches the value in ``namespace`` (the package's globals)."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        namespace[name] = value
        return value

    return __getattr__
