"""CoatAdamW on FSDP2-sharded `tiny` (2 gloo ranks) plus a DCP save/load resume, in ONE torchrun launch.

Checks, written by rank 0 to ``argv[1]`` as JSON:
- parity: 3 steps of FSDP2 + CoatAdamW (each rank half the batch) vs one-process CoatAdamW on the whole
  batch: loss and parameters. Not bitwise: gradients are reduced in another order and 1-D norm weights
  are grouped per shard (64 elements) instead of per 128, so an FP8 rounding may flip;
- the moments really are FP8 and the state bytes over both ranks are ~2.19 per parameter;
- DCP: save model + optimizer, train 2 more steps; a fresh model/optimizer loads the checkpoint and trains
  the same 2 steps: parameters and FP8 states equal bitwise.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from meshwright.models import build_model, lm_loss
from meshwright.optim import CoatAdamW

SEQ, B = 32, 4


def _batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 256, (B, SEQ + 1), generator=g)


def _shard(model, mesh):
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _step(model, opt, tokens: torch.Tensor) -> float:
    loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def _dcp_resume_bitwise(model, opt, mesh, ckpt_dir: str, rank: int, per: int, opt_kw: dict) -> bool:
    """DCP-save model + optimizer, train 2 more steps; a fresh model/optimizer loads the checkpoint and
    trains the same 2 steps: are parameters and optimizer states bitwise equal on every rank?"""
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
    for step in range(3, 5):
        _step(model, opt, _batch(step)[rank * per:(rank + 1) * per])

    fresh = _shard(build_model("tiny", seed=123), mesh)
    fresh_opt = CoatAdamW(fresh.parameters(), lr=1e-3, **opt_kw)
    msd2, osd2 = get_state_dict(fresh, fresh_opt)
    target = {"model": msd2, "optim": osd2}
    dcp.load(target, checkpoint_id=ckpt_dir)
    set_state_dict(fresh, fresh_opt, model_state_dict=target["model"], optim_state_dict=target["optim"])
    for step in range(3, 5):
        _step(fresh, fresh_opt, _batch(step)[rank * per:(rank + 1) * per])
    bitwise = True
    for p, q in zip(model.parameters(), fresh.parameters()):
        bitwise &= torch.equal(p.to_local(), q.to_local())
        for key, t in opt.state[p].items():
            u = fresh_opt.state[q][key]
            same = t.dtype == u.dtype and torch.equal(t.view(torch.uint8) if t.element_size() == 1 else t,
                                                      u.view(torch.uint8) if u.element_size() == 1 else u)
            bitwise &= same
    flag = torch.tensor(1.0 if bitwise else 0.0)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def main() -> None:
    out_path, ckpt_dir = sys.argv[1], sys.argv[2]
    from parity_lib import pg_timeout

    dist.init_process_group("gloo", timeout=pg_timeout(120))  # 120 s on a quiet box, stretched by the load
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    per = B // world
    res: dict[str, object] = {}

    ref = build_model("tiny", seed=0)
    model = _shard(copy.deepcopy(ref), mesh)
    ref_opt = CoatAdamW(ref.parameters(), lr=1e-3)
    opt = CoatAdamW(model.parameters(), lr=1e-3)
    loss_err = 0.0
    for step in range(3):
        tokens = _batch(step)
        ref_loss = _step(ref, ref_opt, tokens)
        local = torch.tensor(_step(model, opt, tokens[rank * per:(rank + 1) * per]))
        dist.all_reduce(local)
        loss_err = max(loss_err, abs(local.item() / world - ref_loss))
    res["loss_err"] = loss_err
    param_err, drift = 0.0, 0.0
    init = build_model("tiny", seed=0)
    for (name, p), q, p0 in zip(model.named_parameters(), ref.parameters(), init.parameters()):
        param_err = max(param_err, (p.full_tensor() - q).abs().max().item())
        drift = max(drift, (q - p0).abs().max().item())
    res["param_err"], res["param_drift"] = param_err, drift
    st = opt.state[next(iter(model.parameters()))]
    res["moment_dtypes"] = [str(st["exp_avg"].dtype), str(st["exp_avg_sq"].dtype)]
    nbytes = torch.tensor(float(opt.state_bytes()))
    dist.all_reduce(nbytes)
    res["state_bytes_per_param"] = nbytes.item() / sum(p.numel() for p in ref.parameters())

    res["dcp_resume_bitwise"] = _dcp_resume_bitwise(model, opt, mesh, os.path.join(ckpt_dir, "fp8"), rank, per, {})
    # fp32 moments (quantize=False) are DTensors in the state dict too, so DCP keeps every rank's shard.
    plain = _shard(build_model("tiny", seed=0), mesh)
    plain_opt = CoatAdamW(plain.parameters(), lr=1e-3, quantize=False)
    for step in range(3):
        _step(plain, plain_opt, _batch(step)[rank * per:(rank + 1) * per])
    res["dcp_resume_bitwise_fp32_states"] = _dcp_resume_bitwise(plain, plain_opt, mesh, os.path.join(ckpt_dir, "fp32"),
                                                                rank, per, {"quantize": False})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from parity_lib import run_worker

    run_worker(main)
