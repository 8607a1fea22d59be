"""Growing a GPT-2 model's learned position table (``grow_positions``): a resume or an ``init_from`` fine-tune at a
``model.max_seq_len`` above the table the weights were trained with.

A RoPE model (llama arch) computes its rotary tables from ``max_seq_len``, so its context can be raised freely; a
learned table (``pos_embeddings``, GPT-2's ``wpe``) has one trained row per position and nothing for the rest. Without
an opt-in that is one line naming ``model.max_seq_len`` and the fix. Two rules, the two that people use:

* ``copy``: the trained rows stay where they are and each new row repeats the table from its start (row ``i`` =
  row ``i mod n``). Longformer grew RoBERTa's 512 positions to 4096 this way ("copying the 512 position embeddings
  multiple times"), which kept the local structure attention had learned and started far closer to RoBERTa's loss
  than random rows (what transformers' ``ignore_mismatched_sizes=True`` gives). Short sequences see exactly the
  table they saw before.
* ``interpolate``: the whole table is resampled linearly to the new length (row ``i`` reads position
  ``i * (n - 1) / (N - 1)``), as vision transformers resize theirs for another resolution: every position moves, so
  the model starts a little off even on short sequences, but no two positions share a vector.

nanoGPT can only crop its table (``crop_block_size``); a shorter table is not needed for a shorter ``seq_len`` (any
prefix of positions is read), so a smaller ``max_seq_len`` than the weights' is refused, not cropped. Which rule
trains better is measured, not assumed: benchmarks/results/grow_positions.md (on a small GPT-2 grown 64 -> 256
positions, ``interpolate`` reached the lower loss at 256; ``copy`` alone kept short sequences exact).
The optimizer state of the table grows with it by the same rule (AdamW's ``exp_avg``/``exp_avg_sq``: a copied row
takes the moments of the row it copies, an interpolated one the interpolated moments, never negative), so the first
update of a new row is sized like its source's, not an unscaled ``g / |g|`` step of zero moments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meshwright.errors import ConfigError, invalid

GROW_RULES = ("copy", "interpolate")
TABLE = "pos_embeddings.weight"  # the table's name in the plain model (checkpoints, optimizer state)


def grow_table(table: torch.Tensor, rows: int, rule: str) -> torch.Tensor:
    """``table`` (positions x d) grown to ``rows`` positions by ``rule`` (module docstring); a new tensor."""
    old = table.shape[0]
    if rule == "copy":
        return table[torch.arange(rows, device=table.device) % old].clone()
    if rule == "interpolate":
        if old == 1:
            return table.expand(rows, *table.shape[1:]).clone()
        grown = F.interpolate(table.detach().float().t().unsqueeze(0), size=rows, mode="linear", align_corners=True)
        return grown.squeeze(0).t().to(table.dtype).contiguous()
    raise invalid("grow_positions", rule, "null, " + " or ".join(GROW_RULES))


def check_growth(rows_now: int, rows_saved: int, rule: str | None, where: str) -> None:
    """One line unless a table of ``rows_saved`` positions (in ``where``: a checkpoint, a config.json) may become one
    of ``rows_now``: a larger one needs ``grow_positions``; a smaller one is refused."""
    if rows_now < rows_saved:
        raise invalid("model.max_seq_len", rows_now, f"at least {rows_saved}, the learned position table of {where} "
                      f"(a shorter seq_len needs no smaller table: it reads the first positions)")
    if rows_now > rows_saved and rule is None:
        raise invalid("model.max_seq_len", rows_now, f"{rows_saved} as the learned position table of {where}, or "
                      f"grow_positions=copy (new rows repeat the trained table, as Longformer grew RoBERTa's) or "
                      f"grow_positions=interpolate (the table resampled to {rows_now} rows) to grow it")


def check_rule_applies(rule: str | None, arch: str) -> None:
    """``grow_positions`` names a rule for a learned table: a model without one (RoPE) refuses it in one line."""
    if rule is not None and arch != "gpt2":
        raise ConfigError(f"grow_positions={rule!r} is invalid; valid: null for a {arch} model (it has no learned "
                          f"position table: its rotary tables follow model.max_seq_len)")
