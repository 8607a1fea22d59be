"""Optimizers: COAT FP8 AdamW (and its group FP8 quantizer).

``CoatAdamW`` loads on first use (PEP 562 ``__getattr__``): the planner imports the torch-free
:mod:`meshwright.optim.coat_bytes` through this package without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from meshwright.optim.coat_bytes import coat_state_bytes_per_param

if TYPE_CHECKING:
    from meshwright.optim.coat import CoatAdamW  # noqa: F401


def __getattr__(name: str) -> Any:
    """Load ``CoatAdamW`` (torch) on first use."""
    if name != "CoatAdamW":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from meshwright.optim.coat import CoatAdamW

    globals()[name] = CoatAdamW
    return CoatAdamW


__all__ = ["CoatAdamW", "coat_state_bytes_per_param"]
