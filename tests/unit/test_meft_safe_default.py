"""MEFT's safe default keeps the documented 1e-3 reconstruction bound: measured at conversion (the analytic
1/(λβ)-per-layer bound is not), and guarded in training (a layer leaves the reversible set while the measured
error exceeds the tolerance)."""

from __future__ import annotations

import torch

from meshwright.memory.meft import (DEFAULT_TOLERANCE, last_reconstruction_error, layers_within_tolerance, log_fields,
                                    make_reversible, safe_reversible_layers)
from meshwright.models import build_model, lm_loss


def base(std: float = 0.1, layers: int = 12):
    return build_model(dict(vocab_size=256, d_model=64, n_layers=layers, n_heads=4, ffn_hidden=128, max_seq_len=64,
                            init_std=std), seed=0).double()


def test_analytic_default_breaks_the_bound_and_the_measured_default_keeps_it():
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    assert safe_reversible_layers(12, torch.float64) == 12
    old = make_reversible(base(), variant="meft1", adapter_dim=8, reversible_layers=12)
    assert old.reconstruction_error(tokens)["input"] > DEFAULT_TOLERANCE  # the analytic default, measured
    new = make_reversible(base(), variant="meft1", adapter_dim=8)
    assert 0 < new.stack.n_reversible < 12
    assert new.calibration["n_reversible"] == new.stack.n_reversible
    assert new.reconstruction_error(tokens)["input"] <= DEFAULT_TOLERANCE  # other tokens than the probe's


def test_layers_within_tolerance_counts_from_the_top():
    assert layers_within_tolerance([1e-1, 1e-4, 1e-6], 1e-3) == 2
    assert layers_within_tolerance([1e-4, 1e-2, 1e-6], 1e-3) == 1  # stops at the first violation from the top
    assert layers_within_tolerance([float("nan"), 1e-6], 1e-3) == 1
    assert layers_within_tolerance([], 1e-3) == 0


def _train(model, steps: int, lr: float) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tok = torch.randint(0, 256, (2, 33), generator=g)
        lm_loss(model(tok[:, :-1]), tok[:, 1:]).backward()
        opt.step()
        opt.zero_grad()


def test_guard_falls_back_while_the_error_exceeds_the_tolerance():
    m = make_reversible(base(std=0.02, layers=6), variant="meft1", adapter_dim=8, tolerance=1e-12, guard_every=1)
    # calibration at 1e-13 leaves only the layers whose inversion is that exact; training then has to fall back
    start = m.stack.n_reversible
    m.stack.n_reversible = 6  # as if the conversion had been optimistic
    _train(m, 3, 1.0)
    assert m.stack.n_reversible < 6 and m.stack.fallbacks
    assert all(f["error"] > 1e-12 for f in m.stack.fallbacks)
    assert last_reconstruction_error(m) is not None
    assert log_fields(m)["meft_reversible_layers"] == m.stack.n_reversible
    assert start <= 6


def test_guard_is_quiet_within_the_tolerance_and_off_with_zero():
    m = make_reversible(base(std=0.02, layers=4), variant="meft1", adapter_dim=8, guard_every=1)
    n = m.stack.n_reversible
    _train(m, 2, 1e-3)
    assert m.stack.n_reversible == n and not m.stack.fallbacks
    assert last_reconstruction_error(m) <= DEFAULT_TOLERANCE  # measured by the guard, not tracked by request
    off = make_reversible(base(std=0.02, layers=4), variant="meft1", adapter_dim=8, guard_every=0)
    _train(off, 2, 1e-3)
    assert last_reconstruction_error(off) is None
