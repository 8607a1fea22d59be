"""torchrun worker (2 ranks, gloo): WTA-CRS under tensor parallelism and under DDP, in one launch.

TP: a GPT-2 MLP (w1 ColwiseParallel, w2 RowwiseParallel, biases on) with WTA-CRS on both linears.
Every rank must sample the same rows as the other rank AND as the one-process layer with the same
seed; forward, grad_input and (sampled) weight gradients must match the one-process run. Two steps
with the cached-gradient-norm proposal exercise the norm all-reduce on both shard layouts.
The TP check runs twice: with DTensor.from_local(grad_placements=) (torch 2.13) and without it (the torch
2.11 path: from_local's default gradient placement), forced here by patching wta_crs._replicated_grad.
DP: DDP over a WTA-CRS `tiny` model; the averaged gradient equals the mean of the one-process
sampled gradients of the two ranks' batches.
Writes {"ok": true, ...} to argv[1] on rank 0; any mismatch raises (non-zero exit).
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel as DDP

from meshwright.memory import wta_crs
from meshwright.memory.wta_crs import WTACRSLinear, apply_wta_crs
from meshwright.models import build_model, lm_loss
from meshwright.models.layers import GeluMLP

TOL = dict(rtol=1e-5, atol=1e-6)


def gathered(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def check_tp(report: dict, mesh, suffix: str = "") -> None:
    torch.manual_seed(0)
    ref = GeluMLP(32, 64)
    for lin in (ref.w1, ref.w2):
        WTACRSLinear.convert(lin, 0.3, proposal="cached", seed=11)
    tp = copy.deepcopy(ref)
    parallelize_module(tp, mesh, {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
    for step in range(2):
        torch.manual_seed(100 + step)  # identical data on both ranks
        x = torch.randn(3, 20, 32)
        gy = torch.randn(3, 20, 32)
        xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yt = ref(xr), tp(xt)
        torch.testing.assert_close(yt, yr, **TOL)
        yr.backward(gy)
        yt.backward(gy)
        torch.testing.assert_close(xt.grad, xr.grad, **TOL)
        for name in ("w1", "w2"):
            idx_tp, idx_ref = getattr(tp, name).last_indices, getattr(ref, name).last_indices
            a, b = gathered(idx_tp)
            assert torch.equal(a, b), f"step {step} {name}: tp ranks sampled different rows"
            assert torch.equal(idx_tp, idx_ref), f"step {step} {name}: tp rows differ from one-process rows"
            for pname in ("weight", "bias"):
                g_tp = getattr(getattr(tp, name), pname).grad.full_tensor()
                torch.testing.assert_close(g_tp, getattr(getattr(ref, name), pname).grad, **TOL)
            report[f"tp{suffix}_step{step}_{name}_rows"] = int(idx_tp.numel())
        assert tp.w1._gnorm_cache is not None and tp.w2._gnorm_cache is not None
        torch.testing.assert_close(tp.w1._gnorm_cache, ref.w1._gnorm_cache, **TOL)  # all-reduced norms
        for m in (ref, tp):
            m.zero_grad(set_to_none=True)
    report[f"tp{suffix}_ok"] = True


def check_ddp(report: dict) -> None:
    rank = dist.get_rank()
    model = build_model("tiny", seed=0)
    apply_wta_crs(model, 0.3, seed=5)
    ref = copy.deepcopy(model)
    ddp = DDP(model)
    g = torch.Generator().manual_seed(0)
    batches = torch.randint(0, 256, (2, 2, 33), generator=g)  # one batch per rank
    mine = batches[rank]
    lm_loss(ddp(mine[:, :-1]), mine[:, 1:]).backward()
    sums = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for r in range(2):  # the one-process reference replays each rank's draws from the same seeds
        for m in ref.modules():
            if isinstance(m, WTACRSLinear):
                m.reset_sampler()
        ref.zero_grad(set_to_none=True)
        lm_loss(ref(batches[r][:, :-1]), batches[r][:, 1:]).backward()
        for n, p in ref.named_parameters():
            sums[n] += p.grad
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, sums[n] / 2, rtol=1e-4, atol=1e-6, msg=lambda s, n=n: f"{n}: {s}")
    report["ddp_ok"] = True


def main() -> None:
    from parity_lib import pg_timeout

    dist.init_process_group("gloo", timeout=pg_timeout(90))  # 90 s on a quiet box, stretched by the load
    torch.set_num_threads(1)
    report: dict = {}
    try:
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        check_tp(report, mesh)
        report["tp_grad_placements_kwarg"] = wta_crs._from_local_takes_grad_placements()
        real = wta_crs._replicated_grad
        wta_crs._replicated_grad = lambda replicate: {}  # the torch 2.11 call: no grad_placements keyword
        try:
            check_tp(report, mesh, "_no_grad_kwarg")
        finally:
            wta_crs._replicated_grad = real
        check_ddp(report)
        if dist.get_rank() == 0:
            with open(sys.argv[1], "w") as f:
                json.dump({"ok": True, **report}, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    from parity_lib import run_worker

    run_worker(main)
