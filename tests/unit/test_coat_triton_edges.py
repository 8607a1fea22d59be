"""CoatAdamW's Triton kernel (#18) under Triton's interpreter on CPU: the edge cases of the launch.

The kernel is the CUDA one, run by the interpreter (``fused="triton"`` on CPU tensors; the module is
executed with ``triton.knobs.runtime.interpret`` set, so no environment variable is needed). Each case
runs the reference ops and the kernel from the same weights and gradients and holds them to the bound of
test_coat_triton.py: codes, exponents and weights (within 0.01 lr) of the reference. Covered here: empty
tensors (FSDP2's empty local shards), all-zero groups and gradients, blocks with a tail, group sizes 1,
3 and 4096 (one group larger than the tensor), addresses not 16-byte aligned (the unaligned launch, and
both launches in one param group), parameters skipping steps (one launch per step count), lerp's
second branch (beta1 < 0.5), expand-only k_min = 1, param groups with different settings, strided
state and parameters, and non-finite gradients.
"""

from __future__ import annotations

import pytest
import torch

from meshwright.optim import CoatAdamW
from test_coat_triton import LR, _assert_close_to_reference

pytest.importorskip("triton")


_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # cpu: interpreted; cuda: compiled


def _place(t: torch.Tensor, device: str, offset: int) -> torch.Tensor:
    """``t`` on ``device`` as a contiguous view starting ``offset`` elements into a larger tensor
    (addresses off 16-byte alignment when odd)."""
    big = torch.cat([t.new_zeros(offset), t.reshape(-1)]).to(device)
    return big[offset:].view(t.shape)


class _Params(torch.nn.Module):
    """Parameters of the given shapes, placed as :func:`_place` does."""

    def __init__(self, shapes: list[tuple[int, ...]], offset: int = 0, device: str = "cpu") -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.offset = offset
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(_place(torch.randn(s, generator=g), device, offset))
                                          for s in shapes])


def _grad(i: int, s: int, p: torch.Tensor, g: torch.Generator) -> torch.Tensor | None:
    return torch.randn(p.shape, generator=g) * 10.0 ** (-((i + s) % 7))


def _zeros(i: int, s: int, p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    grad = torch.randn(p.shape, generator=g)
    if i == 0:
        grad[128:256] = 0.0  # one all-zero group between two others
    return grad if i == 0 else torch.zeros(p.shape)  # an all-zero gradient: every group of its moments is zero


def _skips(i: int, s: int, p: torch.Tensor, g: torch.Generator) -> torch.Tensor | None:
    return None if (i + s) % 3 == 0 else _grad(i, s, p, g)


def _run(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, grad_fn) -> None:
    """``steps`` steps; gradients made on CPU, placed like their parameters (offset views included)."""
    offsets = {id(p): m.offset for m in model.modules() if isinstance(m, _Params) for p in m.ps}
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        for i, p in enumerate(model.parameters()):
            grad = grad_fn(i, s, p.cpu(), g)
            p.grad = None if grad is None else _place(grad, p.device.type, offsets[id(p)])
        opt.step()
    if any(p.is_cuda for p in model.parameters()):
        torch.cuda.synchronize()


_ODD = [(1,), (3,), (127,), (129,), (7, 100), (1000,)]
_CASES = {
    "empty-tensors": (dict(shapes=[(0,), (5,), (0, 4), (300,)]), {}),
    "only-empty-tensors": (dict(shapes=[(0,), (0, 3)]), {}),
    "zero-groups": (dict(shapes=[(300,), (256,)], grad_fn=_zeros), {}),
    "lerp-branch-kmin1": (dict(shapes=_ODD), dict(betas=(0.3, 0.99), k_min=1.0)),
    "skipped-steps": (dict(shapes=_ODD, steps=4, grad_fn=_skips), {}),
    "unaligned": (dict(shapes=_ODD, offset=1), {}),
    "group-size-1": (dict(shapes=[(5,), (17,)]), dict(group_size=1)),
    "group-size-3": (dict(shapes=[(5,), (16,), (100,)]), dict(group_size=3)),
    "group-size-4096": (dict(shapes=[(5,), (1000,), (5000,)]), dict(group_size=4096)),
}


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("case", list(_CASES))
def test_kernel_matches_the_reference_on_edge_cases(case, device):
    """On CUDA (compiled, fast math, 16-byte accesses where aligned) within the CUDA bound."""
    setup, kw = _CASES[case]
    shapes, offset = setup["shapes"], setup.get("offset", 0)
    ref, tri = _Params(shapes, offset, device), _Params(shapes, offset, device)
    ref_opt = CoatAdamW(ref.parameters(), lr=LR, fused="reference", **kw)
    tri_opt = CoatAdamW(tri.parameters(), lr=LR, fused="triton", **kw)
    for model, opt in ((ref, ref_opt), (tri, tri_opt)):
        _run(model, opt, setup.get("steps", 3), setup.get("grad_fn", _grad))
    _assert_close_to_reference(ref, ref_opt, tri, tri_opt, exact_math=device == "cpu")
    assert tri_opt.state_bytes() == ref_opt.state_bytes()


@pytest.mark.parametrize("device", _DEVICES)
def test_aligned_and_unaligned_parameters_in_one_group(device, monkeypatch):
    """One param group whose parameters take both launches (16-byte aligned and not)."""
    from meshwright.optim import coat_triton

    launches, launch = [], coat_triton._launch
    monkeypatch.setattr(coat_triton, "_launch", lambda *a, **kw: (launches.append(a[3]), launch(*a, **kw)))
    def model() -> torch.nn.Module:
        m = torch.nn.Module()
        m.a, m.b = _Params([(129,), (7, 100)], 0, device), _Params([(256,), (3,)], 1, device)
        return m

    ref, tri = model(), model()
    ref_opt = CoatAdamW(ref.parameters(), lr=LR, fused="reference")
    tri_opt = CoatAdamW(tri.parameters(), lr=LR, fused="triton")
    for m, opt in ((ref, ref_opt), (tri, tri_opt)):
        _run(m, opt, 3, _grad)
    _assert_close_to_reference(ref, ref_opt, tri, tri_opt, exact_math=device == "cpu")
    assert launches == [True, False] * 3  # per step: the aligned launch, then the unaligned one


def test_param_groups_with_different_settings():
    """One launch per param group, each with its own group size, formats, expansion and learning rate."""
    def groups(m: torch.nn.Module) -> list[dict]:
        return [dict(params=list(m.ps)[:3], expand=False, weight_decay=0.0),
                dict(params=list(m.ps)[3:], group_size=64, m_format="e5m2", lr=1e-2)]

    ref, tri = _Params(_ODD), _Params(_ODD)
    ref_opt = CoatAdamW(groups(ref), lr=LR, fused="reference")
    tri_opt = CoatAdamW(groups(tri), lr=LR, fused="triton")
    for m, opt in ((ref, ref_opt), (tri, tri_opt)):
        _run(m, opt, 3, _grad)
    _assert_close_to_reference(ref, ref_opt, tri, tri_opt, lr=1e-2)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy: inf/inf and NaN arithmetic, as intended
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")  # the interpreter's nanmax over a NaN group
@pytest.mark.parametrize("device", _DEVICES)
def test_non_finite_gradients(device):
    """A NaN or inf gradient element poisons the same weights as in the reference, and the other groups'
    state stays the reference's. Both leave a non-finite value out of its group's statistics and store it as
    NaN (tests/unit/test_coat_nonfinite.py: before, a NaN zeroed the reference's other moments of the group
    while the kernel kept them, and an inf made every code of its group NaN in both)."""
    def grads(i: int, s: int, p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        grad = torch.randn(p.shape, generator=g)
        if s == 1:
            grad[5] = float("nan") if i == 0 else float("inf")  # group 0 of each
        return grad

    ref, tri = _Params([(300,), (300,)], 0, device), _Params([(300,), (300,)], 0, device)
    ref_opt = CoatAdamW(ref.parameters(), lr=LR, fused="reference", group_size=128)
    tri_opt = CoatAdamW(tri.parameters(), lr=LR, fused="triton", group_size=128)
    for m, opt in ((ref, ref_opt), (tri, tri_opt)):
        _run(m, opt, 3, grads)
    for i, (p, q) in enumerate(zip(ref.parameters(), tri.parameters())):
        assert torch.equal(p.isfinite(), q.isfinite()), i
        # groups 1 and 2 untouched by it (on CUDA: the CUDA bound's rare one-code moves)
        exact = device == "cpu"
        assert (p[128:] - q[128:]).abs().max().item() <= (0.01 if exact else 0.5) * LR, i
        for name in ("exp_avg", "exp_avg_sq"):
            a, b = ref_opt.state[p][name], tri_opt.state[q][name]
            codes = (a.view(torch.uint8)[128:].int() - b.view(torch.uint8)[128:].int()).abs()
            assert codes.max().item() <= (0 if exact else 1) and (codes > 0).sum().item() <= (0 if exact else 2), (i, name)
            assert a.float()[5].isnan() and b.float()[5].isnan(), (i, name)
            # NaN or inf: only the bad element's codes are NaN, in both (the group's statistics skip it)
            assert a.float()[:128].isnan().sum() == 1 and b.float()[:128].isnan().sum() == 1, (i, name)
    assert ref.ps[0][:128].isnan().sum() == 1 and tri.ps[0][:128].isnan().sum() == 1  # only the NaN element's weight


def test_non_contiguous_state_and_parameters():
    """State tensors that arrive strided (e.g. loaded as views) are made contiguous before the in-place
    kernel writes; a strided parameter is a one-line error under ``fused="triton"`` (the kernel writes
    through flat addresses) and stays on the reference ops under ``fused=None`` on CPU."""
    from meshwright.errors import ConfigError

    ref, tri = _Params(_ODD), _Params(_ODD)
    ref_opt = CoatAdamW(ref.parameters(), lr=LR, fused="reference")
    tri_opt = CoatAdamW(tri.parameters(), lr=LR, fused="triton")
    for m, opt in ((ref, ref_opt), (tri, tri_opt)):
        _run(m, opt, 1, _grad)
    for st in tri_opt.state.values():  # the same values, every other element of a buffer twice the size
        for key, t in list(st.items()):
            if key != "step":
                strided = torch.zeros(2 * t.numel(), dtype=t.dtype)[::2]
                strided.copy_(t)
                assert t.numel() <= 1 or not strided.is_contiguous()  # one element: contiguous anyway
                st[key] = strided
    for m, opt in ((ref, ref_opt), (tri, tri_opt)):
        _run(m, opt, 2, _grad)
    _assert_close_to_reference(ref, ref_opt, tri, tri_opt)
    assert all(t.is_contiguous() for st in tri_opt.state.values() for t in st.values())

    w = torch.nn.Parameter(torch.randn(6, 4).t())  # a transposed weight: not contiguous
    w.grad = torch.randn(6, 4).t()
    with pytest.raises(ConfigError, match="optimizer.fused='triton' is invalid; valid: contiguous weights"):
        CoatAdamW([w], fused="triton").step()
    before = w.detach().clone()
    CoatAdamW([w]).step()  # fused=None on CPU: the reference ops, which take any strides
    assert not torch.equal(w, before)


def test_weights_and_moments_are_checked_once_and_again_when_replaced(monkeypatch):
    """The launch checks each weight's moments (dtypes, sizes, contiguity, addresses) at its first step only: later
    steps check the new gradient alone (the per-step checks of every tensor took longer than the kernel on an H200).
    A moment replaced after that (a loaded checkpoint, say) is checked again, so a wrong one is still an error."""
    from meshwright.errors import ConfigError
    from meshwright.optim import coat_triton

    shapes = [(130,), (64, 4), (256,)]
    ref, tri = _Params(shapes), _Params(shapes)
    ref_opt = CoatAdamW(ref.parameters(), lr=LR, fused="reference")
    tri_opt = CoatAdamW(tri.parameters(), lr=LR, fused="triton")
    checks, check = [], coat_triton._check
    monkeypatch.setattr(coat_triton, "_check", lambda i, p, *a: (checks.append(p), check(i, p, *a))[1])
    for m, opt in ((ref, ref_opt), (tri, tri_opt)):
        _run(m, opt, 3, _grad)
    assert len(checks) == len(shapes)  # three steps, one check per weight
    _assert_close_to_reference(ref, ref_opt, tri, tri_opt)

    st = tri_opt.state[tri.ps[1]]
    st["exp_avg_scale"] = st["exp_avg_scale"].clone()  # the same values in a new tensor: checked again, same result
    for m, opt in ((ref, ref_opt), (tri, tri_opt)):
        _run(m, opt, 1, _grad)
    assert len(checks) == len(shapes) + 1 and checks[-1] is tri.ps[1]
    _assert_close_to_reference(ref, ref_opt, tri, tri_opt)

    st["exp_avg_sq"] = st["exp_avg_sq"].float()  # a wrong dtype: the recheck refuses it
    tri.ps[1].grad = torch.ones_like(tri.ps[1])
    with pytest.raises(ConfigError, match="optimizer.state"):
        tri_opt.step()


def test_fsdp2_parameters_are_checked_once_too(one_rank_group, monkeypatch):
    """An FSDP2 parameter's ``to_local()`` is a fresh view at every call: the step takes the DTensor's own local tensor,
    so the once-per-parameter checks hold for ZeRO-2/3 layers as well (one check per weight over three steps)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from meshwright.optim import coat_triton

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16))
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    opt = CoatAdamW(model.parameters(), lr=LR, fused="triton")
    checks, check = [], coat_triton._check
    monkeypatch.setattr(coat_triton, "_check", lambda i, p, *a: (checks.append(p), check(i, p, *a))[1])
    before = [p.detach().full_tensor().clone() for p in model.parameters()]
    for _ in range(3):
        model(torch.randn(8, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert len(checks) == 4  # two weights, two biases: once each
    assert all(not torch.equal(b, p.detach().full_tensor()) for b, p in zip(before, model.parameters()))
