"""Optimizer-state bytes of COAT's FP8 AdamW: the planner's ``optimizer.states`` term.

Why a module of its own: the planner counts these bytes without importing torch;
:mod:`meshwright.optim.coat` (the optimizer) and :mod:`meshwright.optim.fp8_quant` re-export them.
"""

from __future__ import annotations

from meshwright.errors import invalid

META_BYTES_PER_GROUP = 12  # fp32 scale, centre and exponent per group and per moment


def groups_of(numel: int, group_size: int = 128) -> int:
    """Groups of ``group_size`` elements that cover ``numel`` (the last one may be partial)."""
    return -(-numel // group_size)


def coat_state_bytes_per_param(group_size: int = 128, quantized: bool = True, numel: int | None = None) -> float:
    """Optimizer-state bytes per parameter: the planner's cost-model term for ``optimizer.states``.

    fp32 AdamW: 8. COAT: 2 FP8 moments + 2 x 12 bytes of group metadata per ``group_size`` elements
    (2.1875 at 128). With ``numel`` the partial last group is counted exactly (matches
    :meth:`CoatAdamW.state_bytes`).
    """
    if not quantized:
        return 8.0
    if group_size < 1:
        raise invalid("group_size", group_size, "a positive integer")
    if numel is None:
        return 2.0 + 2 * META_BYTES_PER_GROUP / group_size
    return (2 * numel + 2 * META_BYTES_PER_GROUP * groups_of(numel, group_size)) / numel
