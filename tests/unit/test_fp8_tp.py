"""FP8 GEMMs on DTensor tensor-parallel linears (memory/fp8_tp.py) in one process: a 1-rank tp mesh.

With one rank each shard is the whole weight, so per-shard scales are the one-process scales and the TP
model must equal the plain FP8-GEMM model (same casts, same GEMMs; only the DTensor wrapping differs).
The multi-rank behaviour (shard shapes, reductions, per-shard scaling) is tested under torchrun in
tests/distributed/test_moe_savers_runtime.py. The CUDA case runs torch._scaled_mm on FP8 tensor cores.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from meshwright.config import load_model_config
from meshwright.errors import ConfigError
from meshwright.memory import fp8_activations
from meshwright.memory.fp8_activations import apply_fp8_activations
from meshwright.memory.fp8_gemm import cpu_scaled_mm_runs, scaled_mm_supported
from meshwright.memory.fp8_tp import local_operands
from meshwright.models import build_model, lm_loss
from meshwright.parallel.tensor_parallel import apply_tp

CUDA_FP8 = torch.cuda.is_available() and scaled_mm_supported("cuda")


@pytest.fixture(scope="module")
def group():
    """A one-rank default process group (gloo; NCCL for CUDA tensors where there is a GPU)."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()




def _run(device: str, backend: str, sp: bool | None, arch: str) -> dict:
    name = "tiny" if arch == "llama" else "tiny-gpt2"
    cfg = load_model_config(name)
    model = build_model(cfg, seed=3)
    apply_fp8_activations(model, gemm_layers=None, backend=backend)
    model = model.to(device)
    tp = copy.deepcopy(model)
    if sp is not None:
        mesh = init_device_mesh(device, (1,))
        for block in tp.layers.values():
            apply_tp(block, mesh, sp=sp)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (2, 32), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (2, 32), generator=g).to(device)
    calls: list[tuple] = []
    mm = fp8_activations.fp8_mm

    def counted(a, a_scale, b, *args, **kwargs):
        calls.append(type(a) is torch.Tensor and type(b) is torch.Tensor)  # local shards, not DTensors
        return mm(a, a_scale, b, *args, **kwargs)
    out = {}
    fp8_activations.fp8_mm = counted
    try:
        for label, m in (("plain", model), ("tp", tp)):
            calls.clear()
            with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
                loss = lm_loss(m(x), y)
            loss.backward()
            grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).float()
                     for n, p in m.named_parameters()}
            out[label] = {"loss": float(loss.detach()), "grads": grads, "calls": len(calls), "local": all(calls),
                          "dtensor": any(isinstance(p, DTensor) for p in m.parameters())}
    finally:
        fp8_activations.fp8_mm = mm
    return out


def _check(out: dict, rtol: float) -> None:
    plain, tp = out["plain"], out["tp"]
    assert tp["dtensor"] and not plain["dtensor"]
    # every linear ran its three FP8 GEMMs on plain local tensors: the shard path (DTensor's own op rules
    # would also run the unsharded code on DTensors, with globally reduced scales)
    assert tp["calls"] == plain["calls"] > 0 and tp["local"]
    assert abs(tp["loss"] - plain["loss"]) <= rtol * abs(plain["loss"])
    for n, g in plain["grads"].items():
        err = (tp["grads"][n] - g).norm() / g.norm().clamp_min(1e-12)
        assert err <= rtol, (n, float(err))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("sp", [False, True])
def test_one_rank_tp_fp8_gemms_equal_the_plain_fp8_model(group, sp, arch):
    _check(_run("cpu", "emulate", sp, arch), 1e-5)


@pytest.mark.skipif(not cpu_scaled_mm_runs(), reason="this torch has no CPU torch._scaled_mm")
def test_one_rank_tp_scaled_mm_path_on_cpu(group):
    _check(_run("cpu", "scaled_mm", True, "llama"), 1e-5)


@pytest.mark.skipif(not CUDA_FP8, reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")
@pytest.mark.parametrize("sp", [False, True])
def test_one_rank_tp_fp8_gemms_on_cuda(group, sp):
    """torch._scaled_mm on FP8 tensor cores under bf16 autocast, through DTensor TP (a 1-rank mesh)."""
    calls = []
    smm = torch._scaled_mm

    def counted(*args, **kwargs):
        calls.append(1)
        return smm(*args, **kwargs)
    torch._scaled_mm = counted
    try:
        out = _run("cuda", "auto", sp, "llama")
    finally:
        torch._scaled_mm = smm
    assert calls  # the real FP8 tensor-core GEMM ran
    _check(out, 2e-2)  # bf16 results: the two models may differ in kernel choice, not in FP8 rounding


def test_unsupported_layouts_give_one_line_errors(group):
    mesh = init_device_mesh("cpu", (1,))
    w = torch.randn(32, 16)
    x = torch.randn(4, 16)
    with pytest.raises(ConfigError, match=r"^fp8_gemm weight placement=Replicate\(\) is invalid"):
        local_operands(distribute_tensor(x, mesh, [Replicate()]), distribute_tensor(w, mesh, [Replicate()]), None)
    with pytest.raises(ConfigError, match=r"^fp8_gemm rowwise input placement=Replicate\(\) is invalid"):
        local_operands(distribute_tensor(x, mesh, [Replicate()]), distribute_tensor(w, mesh, [Shard(1)]), None)
    with pytest.raises(ConfigError, match=r"^fp8_gemm colwise input placement=Shard\(dim=1\) is invalid"):
        local_operands(distribute_tensor(x, mesh, [Shard(1)]), distribute_tensor(w, mesh, [Shard(0)]), None)


def test_shared_input_cache_sees_in_place_updates_through_fresh_dtensor_views(group):
    """FP8 storage on a tp linear keys its saved input on the local activation: an in-place update of that
    activation between two linears that share the cast (each given a fresh DTensor wrapper, version 0, as the
    tp input hooks make) must recast, or the second linear's weight gradient comes from the old values."""
    from meshwright.memory.fp8_activations import FP8Linear, _QuantCache

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    cache = _QuantCache()
    lins = []
    for _ in range(2):
        lin = FP8Linear(16, 8, bias=False)
        lin._fp8_cache = cache
        lin.weight = torch.nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [Shard(0)]))
        lins.append(lin)
    act = torch.randn(4, 16)
    lins[0](DTensor.from_local(act, mesh, (Replicate(),), run_check=False))
    with torch.no_grad():
        act.mul_(2.0)
    lins[1](DTensor.from_local(act, mesh, (Replicate(),), run_check=False)).to_local().sum().backward()
    expected = torch.ones(4, 8).t() @ act  # d(sum(x W^T))/dW = 1^T x, with x the updated activation
    err = (lins[1].weight.grad.to_local() - expected).norm() / expected.norm()
    assert err < 0.1, float(err)  # FP8 rounding is a few percent; the stale copy is off by half
