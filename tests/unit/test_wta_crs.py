"""WTA-CRS: exact forward/grad_input, unbiased sampled grad_W, lower variance than CRS, fewer saved bytes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from meshwright.errors import ConfigError
from meshwright.memory.accounting import count_saved_bytes
from meshwright.memory.wta_crs import (
    DEFAULT_TARGETS,
    WTACRSLinear,
    apply_wta_crs,
    apply_wta_crs_per_layer,
    estimator_variance,
    kept_rows,
    wta_crs_sample,
    wta_crs_saved_bytes,
)
from meshwright.models import build_model, lm_loss


def _pair(d_in: int = 32, d_out: int = 24, bias: bool = True, keep: float = 0.25, **kw):
    ref = nn.Linear(d_in, d_out, bias=bias)
    lin = nn.Linear(d_in, d_out, bias=bias)
    lin.load_state_dict(ref.state_dict())
    return ref, WTACRSLinear.convert(lin, keep, **kw)


def _skewed(n: int = 64, d_in: int = 16, d_out: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose norms span two orders of magnitude (heavy-tailed, as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    scale_x = torch.exp(2.0 * torch.randn(n, 1, generator=g))
    scale_g = torch.exp(1.0 * torch.randn(n, 1, generator=g))
    return torch.randn(n, d_in, generator=g) * scale_x, torch.randn(n, d_out, generator=g) * scale_g


def test_forward_and_grad_input_bit_exact_with_nn_linear():
    ref, lin = _pair()
    x = torch.randn(3, 40, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), lin(xb)
    assert torch.equal(ya, yb)
    gy = torch.randn_like(ya)
    ya.backward(gy)
    yb.backward(gy)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(ref.bias.grad, lin.bias.grad)  # the bias gradient is exact too
    assert not torch.allclose(ref.weight.grad, lin.weight.grad)  # ... and grad_W really is sampled


def test_keep_ratio_one_reproduces_exact_gradient():
    ref, lin = _pair(keep=1.0)
    x = torch.randn(2, 50, 32)
    ref(x).pow(2).sum().backward()
    lin(x).pow(2).sum().backward()
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, rtol=1e-6, atol=1e-6)


def test_eval_mode_and_no_grad_are_plain_linear():
    ref, lin = _pair()
    lin.eval()
    x = torch.randn(4, 10, 32)
    with count_saved_bytes(lin) as sb:
        y = lin(x.requires_grad_())
    assert torch.equal(y, ref(x)) and lin.last_indices is None
    assert sb.total == x.numel() * 4  # eval falls back to nn.Linear, which saves its input


@pytest.mark.parametrize("proposal", ["x", "cached"])
def test_monte_carlo_unbiased(proposal):
    """Mean of N draws -> G^T X: ||mean - exact||_F^2 has expectation Var/N; we allow 3 Var/N.

    Var is the estimator's exact variance for the proposal in use. For ``cached`` the first step has no
    cache (||x|| proposal) and later steps use the cached gradient-norm proposal: both must be unbiased.
    """
    x2d, g2d = _skewed()
    x, g = x2d.view(4, 16, -1), g2d.view(4, 16, -1)
    _, lin = _pair(d_in=16, d_out=12, bias=False, keep=0.25, proposal=proposal, min_rows=1)
    exact = g2d.t() @ x2d
    n_draws, total = 800, torch.zeros_like(exact, dtype=torch.float64)
    second = torch.zeros_like(total)
    for _ in range(n_draws):
        lin.weight.grad = None
        lin(x).backward(g)
        total += lin.weight.grad.double()
        second += (lin.weight.grad.double() - exact.double()).pow(2)
    mean = total / n_draws
    probs = lin.probabilities(x2d, x.shape)
    var = estimator_variance(x2d, g2d, probs, kept_rows(64, 0.25, 1))
    err2 = float((mean - exact.double()).pow(2).sum())
    assert err2 < 3.0 * var / n_draws, (err2, var / n_draws)
    # the measured spread matches the analytic variance (checks estimator_variance itself)
    assert abs(float(second.sum()) / n_draws / var - 1.0) < 0.2
    # and the test has power: a 10% bias would be outside the bound
    assert 0.1 ** 2 * float(exact.double().pow(2).sum()) > 3.0 * var / n_draws


def test_sampler_unbiased_with_oracle_probabilities():
    x2d, g2d = _skewed(seed=3)
    a = x2d.norm(dim=1) * g2d.norm(dim=1)
    probs = a / a.sum()
    k, n_draws = 8, 2000
    gen = torch.Generator().manual_seed(0)
    exact = (g2d.t() @ x2d).double()
    total = torch.zeros_like(exact)
    for _ in range(n_draws):
        s = wta_crs_sample(probs, k, gen)
        assert s.indices.numel() == k and s.n_winners < k
        total += ((g2d[s.indices] * s.weights[:, None]).t() @ x2d[s.indices]).double()
    var = estimator_variance(x2d, g2d, probs, k)
    assert float((total / n_draws - exact).pow(2).sum()) < 3.0 * var / n_draws


def test_winner_take_all_beats_plain_crs_on_skewed_rows():
    x2d, g2d = _skewed(n=256, seed=5)
    k = 32
    oracle = x2d.norm(dim=1) * g2d.norm(dim=1)
    x_only = x2d.norm(dim=1)
    for probs in (oracle, x_only):
        wta = estimator_variance(x2d, g2d, probs, k, winners=True)
        crs = estimator_variance(x2d, g2d, probs, k, winners=False)
        assert wta < 0.8 * crs, (wta, crs)
    top = torch.topk(oracle / oracle.sum(), k)
    assert wta_crs_sample(oracle / oracle.sum(), k, torch.Generator().manual_seed(0)).n_winners > 0
    assert top.values[0] > 1.0 / k  # the skew the winner set exploits


def test_flat_rows_choose_no_winners():
    probs = torch.full((100,), 0.01)
    s = wta_crs_sample(probs, 10, torch.Generator().manual_seed(0))
    assert s.n_winners == 0  # uniform rows: the bound (1 - c/100)^2/(10 - c) is smallest at c = 0


def test_zero_rows_never_kept_and_few_rows_exact():
    x2d, g2d = _skewed(n=32)
    x2d[5:] = 0.0  # only five non-zero rows: keeping them all is exact
    _, lin = _pair(d_in=16, d_out=12, bias=False, keep=0.25, min_rows=1)
    lin(x2d).backward(g2d)
    assert sorted(lin.last_indices.tolist()) == [0, 1, 2, 3, 4]
    torch.testing.assert_close(lin.weight.grad, g2d.t() @ x2d)


def test_same_seed_same_rows_and_reset():
    _, a = _pair(keep=0.3, seed=7)
    _, b = _pair(keep=0.3, seed=7)
    x = torch.randn(2, 64, 32)
    a(x).sum().backward()
    b(x).sum().backward()
    assert torch.equal(a.last_indices, b.last_indices)
    first = a.last_indices.clone()
    a(x).sum().backward()
    assert not torch.equal(first, a.last_indices)
    a.reset_sampler()
    a(x).sum().backward()
    assert torch.equal(first, a.last_indices)


@pytest.mark.parametrize("keep", [0.1, 0.3, 0.5])
def test_saved_bytes_fall_by_keep_ratio(keep):
    ref, lin = _pair(d_in=256, d_out=64, keep=keep)
    x = torch.randn(4, 128, 256, requires_grad=True)
    with count_saved_bytes(ref) as exact:
        ref(x)
    with count_saved_bytes(lin) as sampled:
        lin(x)
    n = 4 * 128
    assert exact.total == n * 256 * 4
    assert sampled.total == wta_crs_saved_bytes(n, 256, keep)
    k = kept_rows(n, keep)
    assert sampled.total == k * (256 * 4 + 8 + 4)  # rows + int64 indices + fp32 weights
    assert abs(sampled.total / exact.total - keep) < 0.01 + 12 / (256 * 4)


def test_frozen_base_saves_nothing_and_keeps_grad_input():
    ref, lin = _pair()
    for p in (*ref.parameters(), *lin.parameters()):
        p.requires_grad_(False)
    x = torch.randn(2, 30, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with count_saved_bytes(lin) as sb:
        yb = lin(xb)
    ya = ref(xa)
    ya.sum().backward()
    yb.sum().backward()
    assert sb.total == 0 and torch.equal(xa.grad, xb.grad)


def test_composes_with_lora_frozen_base():
    """Frozen base + LoRA: the base product saves nothing; lora_A's gradient keeps k sampled rows.

    Exact byte arithmetic on the MLP (w1/w3 share one input, which the dense model saves once and
    WTA-CRS replaces by two k-row samples). The attention output projection is left out here because
    CPU SDPA saves its own output, which is wo's input, so sampling wo cannot free it.
    """
    lora = pytest.importorskip("meshwright.memory.lora")
    model = build_model("tiny", seed=0)
    lora.apply_lora(model, rank=4, targets=("wo", "w1", "w2", "w3"))
    tokens = torch.randint(0, 256, (2, 64))
    with count_saved_bytes(model) as dense:
        lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    names = apply_wta_crs(model, 0.3, targets=("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"))
    assert all(isinstance(model.get_submodule(n), lora.LoRALinear) for n in names)  # still LoRA modules
    with count_saved_bytes(model) as sampled:
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    n, d, ffn = 2 * 63, 128, 384
    k = kept_rows(n, 0.3)
    w1_w3 = n * d * 4 - 2 * wta_crs_saved_bytes(n, d, 0.3)
    w2 = n * ffn * 4 - wta_crs_saved_bytes(n, ffn, 0.3)
    assert k == 37 and dense.total - sampled.total == 4 * (w1_w3 + w2)
    assert all(p.grad is not None for p in lora.lora_parameters(model))
    assert all(p.grad is None for n_, p in model.named_parameters() if "lora" not in n_)


def test_apply_wta_crs_targets_and_layers():
    model = build_model("tiny", seed=0)
    ref = build_model("tiny", seed=0)
    names = apply_wta_crs(model, 0.5, layers=[0, 2])
    assert names == [f"layers.{i}.{t}" for i in (0, 2) for t in DEFAULT_TARGETS]
    assert not isinstance(model.layers["1"].feed_forward.w1, WTACRSLinear)
    assert not isinstance(model.layers["0"].attention.wq, WTACRSLinear)  # q/k/v stay exact (paper)
    tokens = torch.randint(0, 256, (2, 33))
    la = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    lb = lm_loss(ref(tokens[:, :-1]), tokens[:, 1:])
    assert torch.equal(la, lb)  # forward is exact
    la.backward()
    lb.backward()
    pa, pb = dict(model.named_parameters()), dict(ref.named_parameters())
    for name in pa:
        exact = name.startswith(("layers.1.", "layers.3.")) or "wq" in name or "wk" in name or "wv" in name \
            or "norm" in name or not name.startswith("layers.")
        same = torch.allclose(pa[name].grad, pb[name].grad, rtol=1e-5, atol=1e-7)
        assert same == exact, name
    gpt2 = build_model("tiny-gpt2", seed=0)
    assert len(apply_wta_crs(gpt2, 0.3)) == 4 * 3  # GPT-2 MLP has no w3


def test_sampled_training_tracks_exact_training():
    """A few SGD steps on `tiny`: the sampled run's loss stays close to the exact run's."""
    exact, sampled = build_model("tiny", seed=0), build_model("tiny", seed=0)
    apply_wta_crs(sampled, 0.3)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 64, (6, 4, 33), generator=g)  # a 64-symbol vocabulary: easy to learn
    losses = {}
    for name, model in (("exact", exact), ("sampled", sampled)):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(6):
            batch = data[step]
            loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[name] = loss.item()
    assert losses["sampled"] < math.log(256) - 0.5  # it learns
    assert abs(losses["sampled"] - losses["exact"]) < 0.15 * losses["exact"]


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), "0.3", True, None])
def test_bad_keep_ratio_one_line_error(bad):
    model = build_model("tiny", seed=0)
    with pytest.raises(ConfigError) as e:
        apply_wta_crs(model, bad)
    msg = str(e.value)
    assert "\n" not in msg and "keep_ratio" in msg and repr(bad) in msg and "(0, 1]" in msg
    with pytest.raises(ConfigError):
        wta_crs_saved_bytes(100, 8, bad)


@pytest.mark.parametrize("kwargs,field", [
    ({"layers": [9]}, "wta_crs.layers"), ({"targets": ()}, "wta_crs.targets"),
    ({"targets": ("attention",)}, "wta_crs.targets"), ({"targets": ("nope",)}, "wta_crs.targets"),
    ({"proposal": "oracle"}, "wta_crs.proposal"), ({"min_rows": 0}, "wta_crs.min_rows"),
    ({"defensive": 0.0}, "wta_crs.defensive"),
])
def test_bad_options_one_line_error(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        apply_wta_crs(build_model("tiny", seed=0), 0.3, **kwargs)


def test_per_layer_hook_for_plans():
    model = build_model("tiny", seed=0)
    del model.layers["3"]  # a pipeline stage without block 3
    names = apply_wta_crs_per_layer(model, {0: 0.3, 1: None, 2: 0.1, 3: 0.5})
    assert names == [f"layers.2.{t}" for t in DEFAULT_TARGETS] + [f"layers.0.{t}" for t in DEFAULT_TARGETS]
    assert model.layers["2"].feed_forward.w2.keep_ratio == 0.1 and model.layers["0"].attention.wo.keep_ratio == 0.3
    assert not isinstance(model.layers["1"].attention.wo, WTACRSLinear)
    with pytest.raises(ConfigError, match=r"layers\[0\]\.savers\.wta_crs=2"):
        apply_wta_crs_per_layer(model, {0: 2})


def test_planner_memory_term():
    assert wta_crs_saved_bytes(1000, 64, 1.0) == 1000 * 64 * 4
    assert wta_crs_saved_bytes(1000, 64, 0.3) == 300 * (64 * 4 + 12)
    assert wta_crs_saved_bytes(1000, 64, 0.001, min_rows=8) == 8 * (64 * 4 + 12)
    assert wta_crs_saved_bytes(1000, 64, 0.3, dtype_bytes=2) == 300 * (64 * 2 + 12)
