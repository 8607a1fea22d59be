"""Expert-parallel parity checks, all in ONE torchrun launch of 4 ranks (gloo, CPU).

Cases (each against the one-process model on the same data; data parallelism averages the ranks'
per-shard losses, so the reference is mean_r(lm_loss(shard_r) + aux_loss(shard_r)) on one model):

- ``ep2``       : two independent 2-rank replicas of the experiment, dp=2, ep=2 (ranks {0,1}, {2,3});
- ``ep2dp2``    : 4 ranks, dp=4, ep=2, edp=2 (expert grads reduced over the edp group);
- ``ep2tp2``    : 4 ranks, dp=2 x tp=2 with DTensor tensor-parallel attention, ep=2 over dp per tp column;
- ``ep2pp2``    : 4 ranks, pp=2 x dp=2 with the runtime's pipeline stages (1F1B, 2 micro-batches), ep=2 per stage.

Each case runs no-drop and capacity-dropping routing (top-2 and top-1). Written to ``argv[1]`` as JSON:
max loss / grad errors, routing equality, all-to-all bytes measured vs the cost-model formula.
"""

from __future__ import annotations

import copy
import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from meshwright.config import load_model_config
from meshwright.models import build_model, lm_loss
from meshwright.models.moe import attach_aux_loss_to_backward, moe_layers, router_stats
from meshwright.parallel.expert_parallel import (
    apply_ep, ep_cost_terms, ep_groups_from_mesh, is_expert_param, reduce_dense_grads, reduce_expert_grads,
)

B_LOCAL, SEQ = 2, 16


def _cfg(top_k: int, capacity_factor: float | None):
    return load_model_config({"name": "ep-test", "arch": "llama", "vocab_size": 64, "d_model": 32, "n_layers": 2,
                              "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "moe_ffn_hidden": 48,
                              "n_experts": 4, "top_k": top_k, "capacity_factor": capacity_factor,
                              "max_seq_len": SEQ, "aux_loss_coef": 0.1, "z_loss_coef": 0.01})


def _data(dp: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (dp, B_LOCAL, SEQ + 1), generator=g)


def _loss(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return lm_loss(logits, tokens[:, 1:]) + model.aux_loss()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run_case(name: str, cfg, dp_group, dp_rank: int, dp: int, groups, seed: int, tp_mesh=None) -> dict:
    ref = build_model(cfg, seed=seed)
    model = copy.deepcopy(ref)
    data = _data(dp, seed + 1)
    # One-process reference: the mean over the dp shards of each shard's full loss.
    ref_losses, ref_counts = [], []
    ref_global = [[0] * cfg.n_experts for _ in range(cfg.n_moe_layers)]  # tokens per expert over all shards
    for r in range(dp):
        ref_losses.append(_loss(ref, data[r]))
        for layer, m in enumerate(moe_layers(ref).values()):
            ref_global[layer] = [a + b for a, b in zip(ref_global[layer], m.last_stats["tokens_per_expert"].tolist())]
        if r == dp_rank:
            ref_counts = [m.last_stats["tokens_per_expert"].tolist() for m in moe_layers(ref).values()]
            ref_dropped = sum(m.last_stats["dropped"] for m in moe_layers(ref).values())
    ref_loss = torch.stack(ref_losses).mean()
    ref_loss.backward()

    if tp_mesh is not None:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        for block in model.layers.values():
            parallelize_module(block.attention, tp_mesh, {"wq": ColwiseParallel(), "wk": ColwiseParallel(),
                                                          "wv": ColwiseParallel(), "wo": RowwiseParallel()})
    meter = apply_ep(model, groups.ep)
    loss = _loss(model, data[dp_rank])
    loss.backward()
    reduce_dense_grads(model, dp_group)
    reduce_expert_grads(model, groups.edp, dp)
    counts = [m.last_stats["tokens_per_expert"].tolist() for m in moe_layers(model).values()]
    dropped = sum(m.last_stats["dropped"] for m in moe_layers(model).values())
    logged = router_stats(model, group=dp_group)  # what the run log records: summed over the dp group
    logged_counts = [v["tokens_per_expert"] for v in logged["moe_layers"].values()]
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, group=dp_group)
    mean_loss /= dp

    ref_params = dict(ref.named_parameters())
    max_err, max_ref, n_expert = 0.0, 0.0, 0
    for pname, p in model.named_parameters():
        g = _full(p.grad)
        rg = ref_params[pname].grad
        if is_expert_param(p):
            n_expert += 1
            block = model.get_submodule(pname.rsplit(".", 1)[0])
            rg = rg[block.first_expert:block.first_expert + block.n_local]
        if g.shape != rg.shape:
            raise AssertionError(f"{name}: {pname} grad shape {tuple(g.shape)} != {tuple(rg.shape)}")
        max_err = max(max_err, (g - rg).abs().max().item())
        max_ref = max(max_ref, rg.abs().max().item())
    tokens = B_LOCAL * SEQ
    kept = sum(sum(c) for c in counts)
    cost = ep_cost_terms(cfg, dist.get_world_size(groups.ep), tokens)
    return {
        "case": name, "rank": dist.get_rank(), "top_k": cfg.top_k, "capacity_factor": cfg.capacity_factor,
        "loss": mean_loss.item(), "ref_loss": ref_loss.item(), "loss_err": abs(mean_loss.item() - ref_loss.item()),
        "grad_err": max_err, "grad_max": max_ref, "n_expert_params": n_expert,
        "routing_equal": counts == ref_counts, "logged_stats_equal": logged_counts == ref_global, "dropped": dropped, "ref_dropped": ref_dropped,
        "a2a_bytes": meter.bytes_total, "a2a_remote_bytes": meter.bytes_remote, "a2a_calls": meter.calls,
        "a2a_bytes_expected": 4 * kept * cfg.d_model * 4, "a2a_formula_bytes": cost.a2a_bytes_per_step,
    }


def run_pp_case(cfg, mesh, groups, seed: int) -> dict:
    from meshwright.parallel.pipeline import build_schedule, cut_stage

    pp_rank, dp_rank = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    ref = build_model(cfg, seed=seed)
    full = copy.deepcopy(ref)
    data = _data(2, seed + 1)
    n_mb = B_LOCAL  # micro-batches of one sequence
    lm, total = [], []
    for r in range(2):
        for m in range(n_mb):
            t = data[r, m:m + 1]
            lm_m = lm_loss(ref(t[:, :-1]), t[:, 1:])
            lm.append(lm_m.detach())
            total.append(lm_m + ref.aux_loss())
    torch.stack(total).mean().backward()
    ref_lm = torch.stack(lm).mean().item()

    half = cfg.n_layers // 2
    start, end = (0, half) if pp_rank == 0 else (half, cfg.n_layers)
    stage = cut_stage(full, start, end, first=pp_rank == 0, last=pp_rank == 1)
    attach_aux_loss_to_backward(stage)
    meter = apply_ep(stage, groups.ep)
    sched = build_schedule([stage], [pp_rank], 2, "1f1b", n_mb, lm_loss, torch.device("cpu"), mesh["pp"].get_group())
    x, y = data[dp_rank, :, :-1], data[dp_rank, :, 1:]
    losses: list = []
    if pp_rank == 0:
        sched.step(x)
    else:
        sched.step(target=y, losses=losses)
    reduce_dense_grads(stage, mesh["dp"].get_group())
    reduce_expert_grads(stage, groups.edp, 2)
    loss = torch.stack(losses).mean() if losses else torch.zeros(())
    dist.all_reduce(loss, group=mesh["dp"].get_group())
    loss /= 2
    ref_params = dict(ref.named_parameters())
    max_err, max_ref, n_expert = 0.0, 0.0, 0
    for pname, p in stage.named_parameters():
        rg = ref_params[pname].grad
        if is_expert_param(p):
            n_expert += 1
            block = stage.get_submodule(pname.rsplit(".", 1)[0])
            rg = rg[block.first_expert:block.first_expert + block.n_local]
        max_err = max(max_err, (p.grad - rg).abs().max().item())
        max_ref = max(max_ref, rg.abs().max().item())
    return {"case": "ep2pp2", "rank": dist.get_rank(), "pp_rank": pp_rank, "top_k": cfg.top_k,
            "capacity_factor": cfg.capacity_factor, "loss": loss.item() if pp_rank == 1 else None, "ref_loss": ref_lm,
            "loss_err": abs(loss.item() - ref_lm) if pp_rank == 1 else 0.0, "grad_err": max_err, "grad_max": max_ref,
            "n_expert_params": n_expert, "a2a_calls": meter.calls, "a2a_bytes": meter.bytes_total}


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 4, "this script expects 4 ranks"
    torch.set_num_threads(1)
    variants = [(2, None), (2, 1.0), (1, 1.25)]
    results = []

    # ep2: two independent 2-rank experiments; dp group == ep group, edp groups of size 1.
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("rep", "dp"))
    groups = ep_groups_from_mesh(mesh, "dp", 2)
    for k, c in variants:
        results.append(run_case("ep2", _cfg(k, c), mesh["dp"].get_group(), mesh["dp"].get_local_rank(), 2,
                                groups, seed=10 + mesh["rep"].get_local_rank()))

    # ep2 x dp2: dp=4 over the world, experts sharded over pairs, replicated over the edp pairs.
    mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
    groups = ep_groups_from_mesh(mesh, "dp", 2)
    for k, c in variants:
        results.append(run_case("ep2dp2", _cfg(k, c), mesh.get_group(), rank, 4, groups, seed=20))

    # ep2 with tp2: attention tensor-parallel (DTensor), experts not split by tp, ep over dp per tp column.
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    groups = ep_groups_from_mesh(mesh, "dp", 2)
    for k, c in variants[:2]:
        results.append(run_case("ep2tp2", _cfg(k, c), mesh["dp"].get_group(), mesh["dp"].get_local_rank(), 2,
                                groups, seed=30, tp_mesh=mesh["tp"]))

    # ep2 with pp2: two pipeline stages (the runtime's cut_stage/build_schedule, 1F1B), each stage's
    # two dp ranks form its ep group; aux losses enter through backward (attach_aux_loss_to_backward).
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    groups = ep_groups_from_mesh(mesh, "dp", 2)
    for k, c in variants[:2]:
        results.append(run_pp_case(_cfg(k, c), mesh, groups, seed=40))

    gathered: list = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(out, "w") as f:
            json.dump([r for rs in gathered for r in rs], f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from parity_lib import run_worker

    run_worker(main)
