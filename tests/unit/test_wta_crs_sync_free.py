"""The sync-free WTA-CRS sampler (fixed shapes, winner count on the device): unbiased like the reference
sampler, exact in the degenerate cases, and free of host synchronisation in a training step (checked on CPU
by making every tensor->Python conversion raise; on CUDA ``torch.cuda.set_sync_debug_mode('error')``)."""

from __future__ import annotations

import pytest
import torch

from meshwright.memory.wta_crs import (WTACRSLinear, apply_wta_crs, estimate_grad_weight, wta_crs_sample,
                                       wta_crs_sample_static)
from meshwright.models import build_model, lm_loss


def _data(n=64, d=6, o=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.1, 3.0, n)[:, None]  # skewed row norms, so winners exist
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale, torch.randn(n, o, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("winners", [True, False])
def test_static_sampler_is_unbiased(winners):
    x, g = _data()
    q = x.norm(dim=1) / x.norm(dim=1).sum()
    want = g.t() @ x
    gen = torch.Generator().manual_seed(1)
    draws = 4000
    total = torch.zeros_like(want)
    for _ in range(draws):
        s = wta_crs_sample_static(q, 16, gen, winners=winners)
        assert s.indices.shape == (16,) and s.weights.shape == (16,)
        total += estimate_grad_weight(g, x[s.indices], s)
    rel = float((total / draws - want).norm() / want.norm())
    assert rel < 0.03, rel
    ref = wta_crs_sample(q, 16, torch.Generator().manual_seed(1), winners=winners)
    got = wta_crs_sample_static(q, 16, torch.Generator().manual_seed(1), winners=winners)
    assert int(got.n_winners) == ref.n_winners  # the same winner rule
    assert torch.equal(got.indices[: ref.n_winners], ref.indices[: ref.n_winners])


def test_static_sampler_exact_when_few_rows_or_none():
    x, g = _data(n=20)
    x[5:] = 0.0  # only 5 rows carry input: all kept with weight 1, draws weighted 0
    q = x.norm(dim=1) / x.norm(dim=1).sum()
    s = wta_crs_sample_static(q, 8, torch.Generator().manual_seed(0))
    assert torch.allclose(estimate_grad_weight(g, x[s.indices], s), g.t() @ x)
    zero = torch.zeros(20, dtype=torch.float32)
    s = wta_crs_sample_static(zero, 8, torch.Generator().manual_seed(0))
    assert float(s.weights.abs().sum()) == 0.0 and torch.isfinite(s.weights).all()


class _NoHostSync:
    """Make every tensor -> Python conversion raise while active (what a CUDA host sync would be)."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def boom(*_a, **_k):
            raise AssertionError("host synchronisation")

        for n in self.NAMES:
            setattr(torch.Tensor, n, boom)
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("proposal", ["x", "cached"])
def test_training_step_has_no_host_sync(proposal):
    lin = torch.nn.Linear(16, 8)
    WTACRSLinear.convert(lin, 0.25, min_rows=4, proposal=proposal, sync_free=True)
    x = torch.randn(2, 32, 16, requires_grad=True)
    for _ in range(2):  # the second step uses the cached gradient norms
        with _NoHostSync():
            lin(x).pow(2).sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    ref = torch.nn.Linear(16, 8)
    WTACRSLinear.convert(ref, 0.25, min_rows=4, proposal=proposal, sync_free=False)
    with pytest.raises(AssertionError, match="host synchronisation"), _NoHostSync():
        ref(x).pow(2).sum().backward()  # the reference sampler does sync (n_pos, |C| on the host)


def test_decoder_trains_with_the_sync_free_sampler():
    torch.manual_seed(0)
    m = build_model(dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32), seed=0)
    apply_wta_crs(m, 0.3, sync_free=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    tok = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = lm_loss(m(tok[:, :-1]), tok[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_has_no_sync():
    lin = torch.nn.Linear(64, 64).cuda()
    WTACRSLinear.convert(lin, 0.3)  # auto: sync-free on CUDA
    x = torch.randn(4, 128, 64, device="cuda", requires_grad=True)
    lin(x).sum().backward()  # warm-up (generator creation)
    torch.cuda.set_sync_debug_mode("error")
    try:
        lin(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
