"""CoatAdamW and the group FP8 quantizer with dynamic range expansion (COAT)."""

from __future__ import annotations

import copy
import functools
import math
import os

import pytest
import torch

from meshwright.errors import ConfigError
from meshwright.models import build_model, lm_loss
from meshwright.optim import CoatAdamW, coat_state_bytes_per_param
from meshwright.optim.fp8_quant import dequantize_groups, expansion_exponent, quantize_groups

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _lognormal(n: int, sigma: float, seed: int = 0, signed: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(torch.randn(n, generator=g) * sigma)
    if not signed:
        return mag
    return torch.where(torch.rand(n, generator=g) < 0.5, -mag, mag)


def _roundtrip(x: torch.Tensor, **kw) -> torch.Tensor:
    return dequantize_groups(quantize_groups(x, **kw), x.shape)


# ---- quantizer ---------------------------------------------------------------------------------
def test_roundtrip_error_bounds():
    x = _lognormal(128 * 64, sigma=0.5)
    # Naive: every value of these groups lies in E4M3's normal range after absmax scaling -> <= 2^-4.
    naive = ((_roundtrip(x, expand=False) - x).abs() / x.abs())
    assert naive.max() <= 2 ** -4 + 1e-6
    # Expansion by k divides the relative error by about k (k ~ 4.5 here): a much tighter round trip.
    gq = quantize_groups(x)
    assert gq.expand.min() >= 2
    rel = (dequantize_groups(gq, x.shape) - x).abs() / x.abs()
    assert rel.max() <= 2 ** -4 and rel.mean() < naive.mean() / 3
    # Exponents are multiples of 1/16 and never below 1.
    assert torch.equal(gq.expand * 16, (gq.expand * 16).round()) and gq.expand.min() >= 1


def test_expansion_exponent_formula():
    amax, amin = torch.tensor([100.0, 1e6, 5.0]), torch.tensor([1.0, 1e-6, 5.0])
    k = expansion_exponent(amax, amin, E4M3)
    target = math.log2(448.0 ** 2 / 2)
    assert k[0].item() == math.floor(target / math.log2(100.0) * 16) / 16
    assert k[1].item() == math.floor(target / math.log2(1e12) * 16) / 16 == 0.375  # wider than FP8: compressed
    assert expansion_exponent(amax, amin, E4M3, k_min=1.0)[1].item() == 1.0  # expand-only variant
    assert k[2].item() >= 1.0 and math.isfinite(k[2].item())  # constant group


def test_no_nonzero_flushes_when_range_fits_after_expansion():
    g = torch.Generator().manual_seed(1)
    groups = []
    for i in range(64):  # per group, log-uniform magnitudes spanning just under fmax^2/2
        span = math.log(448.0 ** 2 / 2) * (0.2 + 0.79 * i / 63)
        mags = torch.exp(torch.rand(128, generator=g) * span - span / 2) * 10.0 ** (i % 7 - 3)
        mags[0], mags[1] = math.exp(-span / 2) * 10.0 ** (i % 7 - 3), math.exp(span / 2) * 10.0 ** (i % 7 - 3)
        groups.append(mags)
    x = torch.cat(groups)
    for dtype in (E4M3, E5M2):
        y = _roundtrip(x, dtype=dtype)
        assert (y == 0).sum() == 0 and torch.isfinite(y).all()
        assert torch.equal(torch.sign(y), torch.sign(x))
    # Without expansion the small values of these groups land on E4M3's coarse subnormals.
    rel = lambda y: ((y - x).abs() / x.abs()).mean().item()  # noqa: E731
    assert rel(_roundtrip(x, dtype=E4M3)) < 0.8 * rel(_roundtrip(x, dtype=E4M3, expand=False))


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_degenerate_groups(dtype):
    x = torch.zeros(128 * 6 + 40)
    x[128:256] = 0.37  # constant
    x[256 + 17] = -2.5e-3  # single non-zero
    x[384:512] = -1e-30  # tiny constant
    x[512:640] = torch.linspace(-3e30, 3e30, 128)  # huge, including an exact zero
    x[640:768] = 7.0
    x[768 + 3] = 1e-3  # partial last group, single non-zero
    y = _roundtrip(x, dtype=dtype)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:128], x[:128])  # all zero
    torch.testing.assert_close(y[128:256], x[128:256], rtol=1e-6, atol=0)
    torch.testing.assert_close(y[256:384], x[256:384], rtol=1e-6, atol=0)
    torch.testing.assert_close(y[384:512], x[384:512], rtol=1e-5, atol=0)
    torch.testing.assert_close(y[768:], x[768:], rtol=1e-6, atol=0)
    assert (y[512:640] == 0).sum() == (x[512:640] == 0).sum()


def _heavy_tailed_states(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments after 10 Adam steps of Student-t(3) gradients whose scale varies per element."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(n, generator=g) * 0.5)
    m, v = torch.zeros(n), torch.zeros(n)
    for _ in range(10):
        z, chi2 = torch.randn(n, generator=g), (torch.randn(3, n, generator=g) ** 2).sum(0)
        grad = z / torch.sqrt(chi2 / 3) * scale  # Student-t with 3 degrees of freedom
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
    return m, v


def test_expansion_lowers_update_error_on_heavy_tailed_states():
    m, v = _heavy_tailed_states(128 * 64)
    eps = 1e-8
    exact = m / (v.sqrt() + eps)

    def err(expand: bool) -> float:
        mq = _roundtrip(m, dtype=E4M3, expand=expand)
        vq = _roundtrip(v, dtype=E4M3, expand=expand)
        return ((mq / (vq.sqrt() + eps) - exact).abs() / exact.abs()).mean().item()

    naive, expanded = err(False), err(True)
    assert expanded < 0.8 * naive, (expanded, naive)


# ---- the optimizer -----------------------------------------------------------------------------
def _tiny_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(37, 300), torch.nn.GELU(), torch.nn.Linear(300, 5))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 37, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def test_quantization_off_equals_torch_adamw():
    a, b = _tiny_mlp(), _tiny_mlp()
    groups = lambda m: [{"params": [m[0].weight, m[0].bias]}, {"params": m[2].parameters(), "weight_decay": 0.0}]  # noqa: E731
    opt_a = CoatAdamW(groups(a), lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, quantize=False)
    opt_b = torch.optim.AdamW(groups(b), lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=False)
    _train(a, opt_a, 25)
    _train(b, opt_b, 25)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt_a.state[pa]["exp_avg_sq"], opt_b.state[pb]["exp_avg_sq"], rtol=1e-6, atol=0)


def test_quantized_update_tracks_fp32_adamw():
    a, b = _tiny_mlp(), _tiny_mlp()
    opt_a, opt_b = CoatAdamW(a.parameters(), lr=1e-3), torch.optim.AdamW(b.parameters(), lr=1e-3)
    _train(a, opt_a, 20)
    _train(b, opt_b, 20)
    init = _tiny_mlp()
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), init.parameters()):
        drift_a, drift_b = pa - p0, pb - p0
        assert ((drift_a - drift_b).norm() / drift_b.norm()).item() < 0.1
    st = opt_a.state[a[0].weight]
    assert st["exp_avg"].dtype == E4M3 and st["exp_avg_sq"].dtype == E4M3


def test_no_update_blowup_when_second_moments_span_more_than_fp8():
    """Embedding rows of tokens seen once have gradients spanning > 2^17: with plain or expand-only FP8
    the small second moments flush to zero under non-zero first moments and the update becomes m/eps."""
    lr, steps = 1e-3, 3

    def max_move(**kw) -> float:
        model, init = build_model("tiny", seed=0), build_model("tiny", seed=0)
        opt = CoatAdamW(model.parameters(), lr=lr, **kw)
        for step in range(steps):
            tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(100 + step))
            loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return max((p - q).abs().max().item() for p, q in zip(model.parameters(), init.parameters()))

    assert max_move() < 1.5 * lr * steps  # Adam moves a weight by at most ~lr per step
    assert max_move(k_min=1.0) > 100 * lr * steps  # the failure the compression (k < 1) prevents


def test_state_bytes_per_param():
    model = build_model("tiny", seed=0)
    opt = CoatAdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    expected = sum(coat_state_bytes_per_param(numel=p.numel()) * p.numel() for p in model.parameters())
    assert opt.state_bytes() == round(expected)
    assert opt.state_bytes() / n <= 2.2
    assert coat_state_bytes_per_param() == 2.0 + 24 / 128
    ref = CoatAdamW(model.parameters(), lr=1e-3, quantize=False)
    ref.step()
    assert ref.state_bytes() == 8 * n
    opt_e5 = CoatAdamW(model.parameters(), v_format="e5m2")
    opt_e5.step()
    assert opt_e5.state[model.output.weight]["exp_avg_sq"].dtype == E5M2


def test_bad_arguments_raise_one_line_config_errors():
    params = [torch.nn.Parameter(torch.zeros(3))]
    for kw, field in [({"v_format": "e3m4"}, "fp8_format"), ({"group_size": 0}, "optimizer.group_size"),
                      ({"lr": -1.0}, "optimizer.lr"), ({"betas": (0.9, 1.5)}, "optimizer.betas")]:
        with pytest.raises(ConfigError) as err:
            CoatAdamW(params, **kw)
        assert field in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_resume_is_bitwise(tmp_path):
    model = _tiny_mlp()
    opt = CoatAdamW(model.parameters(), lr=1e-3, v_format="e5m2")
    _train(model, opt, 4, seed=1)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    resumed = _tiny_mlp(seed=7)
    ropt = CoatAdamW(resumed.parameters(), lr=1e-3, v_format="e5m2")
    ckpt = torch.load(path, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    ropt.load_state_dict(ckpt["optim"])
    _train(model, opt, 4, seed=2)
    _train(resumed, ropt, 4, seed=2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        for key, t in opt.state[p].items():
            assert t.dtype == ropt.state[q][key].dtype and torch.equal(t.view(torch.uint8) if t.dtype in (E4M3, E5M2) else t,
                                                                      ropt.state[q][key].view(torch.uint8) if t.dtype in (E4M3, E5M2) else ropt.state[q][key])


def test_load_state_dict_accepts_uint8_moments():
    """FP8 crosses gloo and some checkpoint writers only as raw bytes; loading restores the dtype."""
    model = _tiny_mlp()
    opt = CoatAdamW(model.parameters(), lr=1e-3)
    _train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["exp_avg"] = st["exp_avg"].view(torch.uint8)
    other = CoatAdamW(model.parameters(), lr=1e-3)
    other.load_state_dict(sd)
    for p in model.parameters():
        assert other.state[p]["exp_avg"].dtype == E4M3
        assert torch.equal(other.state[p]["exp_avg"].view(torch.uint8), opt.state[p]["exp_avg"].view(torch.uint8))


# ---- a short real training run -----------------------------------------------------------------
def corpus_tokens(n: int) -> torch.Tensor:
    """Byte tokens of this Python's stdlib source: real text, no download."""
    data = b""
    for name in ("argparse.py", "dataclasses.py", "typing.py"):
        with open(os.path.join(os.path.dirname(os.__file__), name), "rb") as f:
            data += f.read()
    return torch.tensor(list(data[:n]), dtype=torch.long)


def train_tiny(opt_factory, steps: int, fp8_act: bool = False, seq: int = 32, batch: int = 4, seed: int = 0
               ) -> list[float]:
    """Losses of ``steps`` steps of the tiny model, its batches drawn from the corpus by ``seed``."""
    from meshwright.memory.fp8_activations import apply_fp8_activations

    model = build_model("tiny", seed=0)
    if fp8_act:
        apply_fp8_activations(model)
    opt = opt_factory(model.parameters())
    tokens = corpus_tokens(steps * batch * seq + 1 + 4096)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=g)
        chunk = torch.stack([tokens[s:s + seq + 1] for s in starts.tolist()])
        loss = lm_loss(model(chunk[:, :-1]), chunk[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@functools.lru_cache(maxsize=8)
def reference_losses(steps: int, seed: int = 0) -> tuple[float, ...]:
    """fp32 AdamW on the same run, computed once per session (both COAT training tests compare to it)."""
    return tuple(train_tiny(lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01), steps, seed=seed))


# 40 steps at lr 3e-3 are chaotic: a rounding changed in a few FP8 codes moves a run's last-10 loss by up to 3%
# (5 batch seeds, FP8 activations with division against multiplication by the inverse scale: gaps to AdamW of
# -2.6% .. +3.1%, either way). One seed cannot tell a systematic error from that; the mean of three can (its noise
# is ~1%), and each run must still learn.
TRAINING_SEEDS = (0, 1, 2)


def tail_gaps(opt_factory, steps: int = 40, fp8_act: bool = False) -> list[float]:
    """Per batch seed, the relative gap of the run's last-10 mean loss to fp32 AdamW's on the same batches."""
    gaps = []
    for seed in TRAINING_SEEDS:
        ref, run = reference_losses(steps, seed), train_tiny(opt_factory, steps, fp8_act=fp8_act, seed=seed)
        tail_ref, tail = sum(ref[-10:]) / 10, sum(run[-10:]) / 10
        assert tail_ref < ref[0] - 1.5 and tail < run[0] - 1.5, (seed, ref[0], tail_ref, run[0], tail)  # both learn
        gaps.append((tail - tail_ref) / tail_ref)
    return gaps


def test_short_training_run_stays_close_to_fp32_adamw():
    gaps = tail_gaps(lambda p: CoatAdamW(p, lr=3e-3, weight_decay=0.01))
    assert abs(sum(gaps) / len(gaps)) < 0.02 and max(map(abs, gaps)) < 0.05, gaps


# ---- the fused (compiled) step, #18 ------------------------------------------------------------
def test_fused_step_matches_the_reference_and_keeps_state_and_checkpoints(tmp_path):
    """torch.compile'd dequantise -> update -> requantise against the reference ops, on CPU.

    Stated tolerance: the fused code rounds fp32 differently in a few places (the update is
    ``p + m * (-step) / denom`` instead of addcdiv, fused pow/log2), so now and then an FP8 code lands
    one step away (measured: <= 6e-5 of the codes) and moves that weight by a fraction of one Adam step
    (measured <= 0.05 lr). Exponents agree exactly, centres and scales to 1e-4 (their inputs differ by fp32 rounding).
    """
    lr, steps = 1e-3, 4

    def run(fused: bool, model=None, opt=None, seed0=0):
        model = model or _tiny_mlp()
        opt = opt or CoatAdamW(model.parameters(), lr=lr, v_format="e5m2", fused=fused)
        for s in range(steps):
            g = torch.Generator().manual_seed(seed0 + s)
            for i, p in enumerate(model.parameters()):  # gradients spanning many decades, as real ones do
                p.grad = torch.randn(p.shape, generator=g) * 10.0 ** (-(i + s) % 7)
            opt.step()
        return model, opt

    (ref, ref_opt), (fus, fus_opt) = run(False), run(True)
    n = sum(p.numel() for p in ref.parameters())
    assert fus_opt.state_bytes() == ref_opt.state_bytes() <= 2.3 * n  # same layout, same bytes
    for p, q in zip(ref.parameters(), fus.parameters()):
        assert (p - q).abs().max().item() <= 0.1 * lr
        for key, t in ref_opt.state[p].items():
            u = fus_opt.state[q][key]
            assert t.dtype == u.dtype and t.shape == u.shape, key
            if t.dtype in (E4M3, E5M2):
                assert (t.view(torch.uint8) != u.view(torch.uint8)).float().mean().item() <= 1e-3, key
            elif key.endswith("expand") or key == "step":
                assert torch.equal(t, u), key
            else:
                torch.testing.assert_close(u, t, rtol=1e-4, atol=0)  # amax/amin of values off by fp32 rounding
    # checkpoints cross between the paths: a fused run resumed by the reference path and vice versa
    path = tmp_path / "fused.pt"
    torch.save({"model": fus.state_dict(), "optim": fus_opt.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    resumed = _tiny_mlp(seed=3)
    resumed.load_state_dict(ckpt["model"])
    r_opt = CoatAdamW(resumed.parameters(), lr=lr, v_format="e5m2", fused=False)
    r_opt.load_state_dict(ckpt["optim"])
    run(False, resumed, r_opt, seed0=100)
    run(True, fus, fus_opt, seed0=100)
    for p, q in zip(resumed.parameters(), fus.parameters()):
        assert (p - q).abs().max().item() <= 0.1 * lr
    with pytest.raises(ConfigError, match="optimizer.fused"):
        CoatAdamW(_tiny_mlp().parameters(), fused="yes")


def test_fused_default_falls_back_to_eager_ops_when_compiling_fails(monkeypatch):
    """fused=None (the GPU default) must not stop training on a machine where torch.compile fails."""
    import meshwright.optim.coat as coat

    def broken():
        def fail(*args):
            raise RuntimeError("no compiler")
        return fail

    monkeypatch.setattr(coat, "compiled_update", broken)
    model, ref = _tiny_mlp(), _tiny_mlp()
    opt = CoatAdamW(model.parameters(), lr=1e-3)
    monkeypatch.setattr(opt, "_use_fused", lambda p: True if opt.fused is None else opt.fused)
    ref_opt = CoatAdamW(ref.parameters(), lr=1e-3, fused=False)
    with pytest.warns(RuntimeWarning, match="compiled step failed"):
        _train(model, opt, 2)
    _train(ref, ref_opt, 2)
    assert opt.fused is False
    for p, q in zip(model.parameters(), ref.parameters()):
        assert (p - q).abs().max().item() <= 0.1 * 1e-3  # the eager twin of the fused step, then the reference
    strict_model = _tiny_mlp()
    strict = CoatAdamW(strict_model.parameters(), lr=1e-3, fused=True)  # asked for explicitly: no silent fallback
    with pytest.raises(RuntimeError, match="no compiler"):
        _train(strict_model, strict, 1)
