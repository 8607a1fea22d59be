"""Optimizers: COAT FP8 AdamW (and its group FP8 quantizer).

``CoatAdamW`` loads on first use (PEP 562 ``__getattr__``): the planner imports the torch-free
:mod:`meshwright.optim.coat_bytes` through this package without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshwright.lazy import lazy_names
from meshwright.optim.coat_bytes import coat_state_bytes_per_param

if TYPE_CHECKING:
    from meshwright.optim.coat import CoatAdamW  # noqa: F401

__getattr__ = lazy_names(__name__, {"CoatAdamW": "coat"}, globals())


__all__ = ["CoatAdamW", "coat_state_bytes_per_param"]
