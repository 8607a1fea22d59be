"""Expert-parallel parity checks, all in ONE torchrun launch of 4 ranks (gloo, CPU).

Cases (each against the one-process model on the same data; data parallelism averages the ranks'
per-shard losses, so the reference is mean_r(lm_loss(shard_r) + aux_loss(shard_r)) on one model):

- ``ep2``       : two independent 2-rank replicas of the experiment, dp=2, ep=2 (ranks {0,1}, {2,3});
- ``ep2dp2``    : 4 ranks, dp=4, ep=2, edp=2 (expert grads reduced over the edp group);
- ``ep2tp2``    : 4 ranks, dp=2 x tp=2 with DTensor tensor-parallel attention and experts split over tp (expert tp,
                  parallel/expert_tp.py), ep=2 over dp per tp column;
- ``ep2pp2``    : 4 ranks, pp=2 x dp=2 with the runtime's pipeline stages (1F1B, 2 micro-batches), ep=2 per stage.

Each case runs no-drop and capacity-dropping routing (top-2 and top-1). Written to ``argv[1]`` as JSON:
max loss / grad errors, routing equality, all-to-all bytes measured vs the cost-model formula.

LoRA under ep, through the trainer's ``DistributedRuntime`` (``lora_*`` rows): attention adapters (q/k/v/o; the head
trained in full in ``lora_ep2_dp4``) on a frozen MoE base, against ``dp`` copies of the one-process LoRA model each on
its data shard (the exact objective of data parallelism, aux loss included): loss over 2 AdamW steps, the first
step's gradients and the grad norm within RTOL (1e-5 relative), only the adapters (and head) with gradients and
optimizer state, the experts still sharded and frozen. ``lora_ckpt_ep2_to_ep4`` saves an adapter-only checkpoint
(``lora.checkpoint: adapters``) after 2 steps under ep2 and resumes it under ep4 for steps 3-4; the checkpoint is
kept in ``argv[2]`` as a run directory for test_expert_parallel.py to resume in one process and export.

LoRA on the experts under ep (``lora_experts_*`` rows): ``experts.gate_up_proj``/``experts.down_proj`` adapters (and
q/v) with ep2 x dp4, ep4 x dp4 and ep2 with DTensor tp2 against the same reference; each rank holds its experts' A/B
rows, compared with those rows of the reference's gradients; ``lora_experts_ckpt_ep2_to_ep4`` keeps its ep2
adapter-only checkpoint in ``argv[2]`` too.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
from typing import Any

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

        from meshwright.parallel.expert_tp import apply_expert_tp

        for block in model.layers.values():
            parallelize_module(block.attention, tp_mesh, {"wq": ColwiseParallel(), "wk": ColwiseParallel(),
                                                          "wv": ColwiseParallel(), "wo": RowwiseParallel()})
            apply_expert_tp(block.feed_forward, tp_mesh)  # experts split over tp, then sliced over ep
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
            r, t = block.tp_index  # ep x tp shards: this rank's hidden slice too
            dim = {"w1": 1, "w3": 1, "w2": 2}[pname.rsplit(".", 1)[-1]]
            rg = rg.narrow(dim, r * g.shape[dim], g.shape[dim]) if t > 1 else rg
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
        "ep": dist.get_world_size(groups.ep), "tp": 1 if tp_mesh is None else tp_mesh.size(),
        "expert_numel": sum(p.numel() for p in model.parameters() if is_expert_param(p)),
        "expert_numel_full": cfg.n_moe_layers * cfg.n_experts * 3 * cfg.d_model * cfg.expert_ffn_dim,
    }


def run_pp_case(cfg, mesh, groups, seed: int) -> dict:
    from meshwright.parallel.pipeline import build_schedule, cut_stage, stage_io

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
    # contiguous: stage 0's declared input is (torch 2.11 compares its strides with every micro-batch's)
    x, y = data[dp_rank, :, :-1].contiguous(), data[dp_rank, :, 1:]
    # the stages' shapes fixed up front (fp32 hidden states between them, logits out of the last): no trial forward
    # routes an uninitialised buffer through the all-to-alls (a2a_calls counts the real micro-batches' only)
    io = stage_io(x[:1], cfg.d_model, [torch.float32], [True], cfg.vocab_size, torch.float32)
    sched = build_schedule([stage], [pp_rank], 2, "1f1b", n_mb, lm_loss, torch.device("cpu"), mesh["pp"].get_group(),
                           io=io)
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
            "n_expert_params": n_expert, "a2a_calls": meter.calls, "a2a_bytes": meter.bytes_total, "n_mb": n_mb}


# ---- LoRA under ep, through the runtime ---------------------------------------------------------------------

LORA = {"rank": 4, "alpha": 8.0, "targets": ["wq", "wk", "wv", "wo"]}
LORA_HEAD = {**LORA, "modules_to_save": ["output"]}
LORA_STEPS = 2
LORA_RUN = "lora_ep_run"  # under argv[2]: the adapter-only ep2 checkpoint as a run directory (export, one process)


def lora_moe_cfg():
    """The MoE model of the LoRA rows (vocab of parity_lib's batches): Mixtral's routing (top-2 renormalised, no
    capacity dropping, which the rows above cover), so its checkpoint exports to transformers."""
    return load_model_config({"name": "tiny-moe-lora", "arch": "llama", "vocab_size": 256, "d_model": 32,
                              "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "moe_ffn_hidden": 48,
                              "n_experts": 4, "top_k": 2, "capacity_factor": None, "max_seq_len": 64,
                              "aux_loss_coef": 0.1, "z_loss_coef": 0.01})


def lora_plan(layers: list[dict], pipeline: dict | None = None) -> dict:
    from parity_lib import plan

    return {**plan(layers, pipeline=pipeline), "model": "tiny-moe-lora"}


LORA_CASES = {
    "lora_ep2_dp4": (lora_plan([{"dp": 4, "ep": 2, "repeat": 2}]), LORA_HEAD),
    "lora_ep4_dp4": (lora_plan([{"dp": 4, "ep": 4, "repeat": 2}]), LORA),
    "lora_ep2_tp2": (lora_plan([{"tp": 2, "dp": 2, "ep": 2, "repeat": 2}]), LORA),
    "lora_ep2_pp2": (lora_plan([{"dp": 2, "ep": 2, "repeat": 2}],
                               pipeline={"degree": 2, "schedule": "1f1b", "microbatches": 2}), LORA),
}


def lora_model(lora: dict):
    """The one-process LoRA model of the LoRA rows: the base drawn from SEED, adapters keyed by SEED."""
    from parity_lib import SEED

    from meshwright.config import LoraConfig
    from meshwright.memory.lora import apply_lora_config

    model = build_model(lora_moe_cfg(), seed=SEED)
    apply_lora_config(model, LoraConfig(**lora), SEED)
    return model


def lora_reference(lora: dict, dp: int, steps: int = LORA_STEPS) -> list[dict]:
    """``dp`` copies of the one-process LoRA model, copy r on data shard r, (LM + aux) / (micro-batches x dp) per
    micro-batch; per step the logged LM loss, the summed trainable gradients, the grad norm; AdamW on the trainable
    parameters only (the runtime's groups)."""
    from parity_lib import dp_copies_reference

    return dp_copies_reference([lora_model(lora) for _ in range(dp)], steps)


def lora_runtime(pd: dict, lora: dict, seed: int | None = None):
    from parity_lib import SEED

    from meshwright.config import LoraConfig
    from meshwright.parallel.runtime import DistributedRuntime
    from meshwright.plan import plan_from_dict

    return DistributedRuntime(lora_moe_cfg(), plan_from_dict(pd), seed=SEED if seed is None else seed,
                              lora=LoraConfig(**lora))


def lora_steps(rt, opt, ref: list[dict], start: int, steps: int, grads: bool) -> dict:
    """``steps`` steps of ``rt`` from ``start``: worst relative loss / first-step gradient / grad norm error vs ``ref``
    (indexed from ``start``), and the names of the parameters that had a gradient."""
    import math

    from parity_lib import MAX_NORM, full_grads, rel, shard

    worst = {"loss": 0.0, "grad": 0.0, "norm": 0.0}
    worst_name, names = "", []
    for k in range(steps):
        loss = rt.forward_backward(shard(start + k, rt.dp_rank, rt.dp_size))
        worst["loss"] = max(worst["loss"], rel(loss, ref[start + k]["loss"]))
        if grads and k == 0:
            got = full_grads(rt)
            names = sorted(got)
            for n, g in got.items():
                e = rel(g, ref[start]["grads"][n]) if n in ref[start]["grads"] else math.inf
                if e > worst["grad"]:
                    worst["grad"], worst_name = e, n
        worst["norm"] = max(worst["norm"], rel(rt.clip_grad_norm_(MAX_NORM), ref[start + k]["norm"]))
        rt.optimizer_step(opt)
    return {**worst, "worst_grad_param": worst_name, "grad_names": names,
            "ok": all(v <= 1e-5 and math.isfinite(v) for v in worst.values())}


def run_lora_case(name: str, pd: dict, lora: dict) -> dict:
    from parity_lib import make_opt

    from meshwright.parallel.data_parallel import sharded_state_bytes
    from meshwright.plan import plan_from_dict

    p = plan_from_dict(pd)
    dp = max(s.dp for s in p.layer_strategies())
    ref = lora_reference(lora, dp)
    rt = lora_runtime(pd, lora)
    opt = rt.build_optimizer(make_opt)
    res = lora_steps(rt, opt, ref, 0, LORA_STEPS, grads=True)
    mine = dict(rt.model.named_parameters())
    trainable = {n for n, q in mine.items() if q.requires_grad}
    experts = [(n, q) for n, q in mine.items() if is_expert_param(q)]
    # gradients on exactly this rank's trainable parameters (adapters, the head), which are the reference's
    res["grads_ok"] = set(res["grad_names"]) == trainable == {n for n in ref[0]["grads"] if n in mine}
    res["adapters"] = sum(n.endswith(("lora_A", "lora_B")) for n in trainable)
    # the experts: sharded over ep, frozen, no gradient, no optimizer state
    res["n_expert_shards"] = len(experts)
    res["experts_frozen"] = bool(experts) and all(not q.requires_grad and q.grad is None for _, q in experts)
    res["experts_sharded"] = all(q.shape[0] == 4 // s.ep for (n, q), s in
                                 ((e, p.layer_strategies()[int(e[0].split(".")[1])]) for e in experts))
    held = {id(q) for g in opt.param_groups for q in g["params"]}
    res["opt_params_ok"] = held == {id(q) for q in mine.values() if q.requires_grad}
    local = sum(q.to_local().numel() if hasattr(q, "to_local") else q.numel() for q in mine.values() if q.requires_grad)
    res["opt_state_bytes"], res["opt_state_expected"] = sharded_state_bytes(opt), 8 * local
    res["a2a_bytes"] = rt.a2a_meter.bytes_total
    res["ok"] = (res["ok"] and res["grads_ok"] and res["adapters"] > 0 and res["experts_frozen"]
                 and res["experts_sharded"] and res["opt_params_ok"] and res["a2a_bytes"] > 0
                 and res["opt_state_bytes"] == res["opt_state_expected"])
    rt.close()
    return {"case": name, "rank": dist.get_rank(), **res}


def run_lora_ckpt(run_dir: str) -> dict:
    """Adapter-only checkpoint under ep2 (dp4) after 2 steps, resumed under ep4 (dp4) for steps 3-4; kept in
    ``run_dir`` (config.yaml, model.yaml, ckpt/step_000002) for the one-process resume and the exports."""
    from pathlib import Path

    from parity_lib import SEED, make_opt

    from meshwright.config import LoraConfig, TrainConfig
    from meshwright.config.io import from_dict, to_dict, write_yaml
    from meshwright.train.checkpoint import load_runtime, save_runtime
    from meshwright.train.checkpoint_io import read_metadata_file
    from meshwright.train.lora_base import AdapterScope

    lora = LORA
    cfg = lora_moe_cfg()
    ref = lora_reference(lora, 4, steps=4)
    if dist.get_rank() == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_yaml(from_dict(TrainConfig, {"model": to_dict(cfg), "seq_len": 16, "seed": SEED, "lora": lora}),
                   Path(run_dir) / "config.yaml")
        write_yaml(cfg, Path(run_dir) / "model.yaml")
    path = f"{run_dir}/ckpt/step_000002"
    rt = lora_runtime(LORA_CASES["lora_ep2_dp4"][0], lora)
    scope = AdapterScope.for_run(TrainConfig(seed=SEED, lora=LoraConfig(**lora)), cfg, rt.init, rt.device.type)
    opt = rt.build_optimizer(make_opt)
    save = lora_steps(rt, opt, ref, 0, 2, grads=False)
    save_runtime(path, rt, opt, meta={"step": 2}, adapters=scope)
    rt.close()
    rt2 = lora_runtime(LORA_CASES["lora_ep4_dp4"][0], lora)
    opt2 = rt2.build_optimizer(make_opt)
    meta = load_runtime(path, rt2, opt2, adapters=scope)
    resume = lora_steps(rt2, opt2, ref, 2, 2, grads=False)
    rt2.close()
    metadata = read_metadata_file(f"{path}/.metadata").state_dict_metadata
    saved = sorted(k.split(".", 1)[1] for k in metadata if k.startswith("model."))
    ok = (save["ok"] and resume["ok"] and meta.get("step") == 2 and bool(saved)
          and all(k.endswith(("lora_A", "lora_B")) for k in saved))
    return {"case": "lora_ckpt_ep2_to_ep4", "rank": dist.get_rank(), "ok": ok, "save": save, "resume": resume,
            "saved_model_keys": saved, "ref_losses": [r["loss"] for r in ref]}


def _case_rows(cases: dict[str, Any], ckpt_case: str, ckpt: Any, run_dir: str, run_root: str | None) -> list[dict]:
    """Run each of ``cases`` (name -> no-argument function giving its row), then ``ckpt`` on rank 0's run directory
    ``run_dir`` under ``run_root`` (a temporary one without it), barrier after each: a failure becomes a row with its
    error, so the other rows still run."""
    import tempfile

    from parity_lib import failure

    rows = []
    for name, case in cases.items():
        try:
            rows.append(case())
        except Exception as e:
            rows.append({"case": name, "rank": dist.get_rank(), **failure(f"case {name}", e)})
        dist.barrier()
    box = [f"{run_root or tempfile.mkdtemp()}/{run_dir}" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box)
    try:
        rows.append(ckpt(box[0]))
    except Exception as e:
        rows.append({"case": ckpt_case, "rank": dist.get_rank(), **failure(f"case {ckpt_case}", e)})
    dist.barrier()
    return rows


def lora_rows(run_root: str | None) -> list[dict]:
    """Every LoRA row on this rank (a failure becomes a row with its error, so the other rows still run)."""
    cases = {name: functools.partial(run_lora_case, name, pd, lora) for name, (pd, lora) in LORA_CASES.items()}
    return _case_rows(cases, "lora_ckpt_ep2_to_ep4", run_lora_ckpt, LORA_RUN, run_root)


# ---- LoRA on the experts under ep (``lora_experts_*`` rows) ------------------------------------------------------
# adapters on the experts' stacked weights (memory/lora.py ExpertAdapter, PEFT's target_parameters) besides two
# attention ones: sharded with their experts over ep (each rank holds its experts' A/B rows), reduced over the edp
# group only (the ranks holding the same experts), like the experts' own gradients in full training

LORA_EXPERTS = {"rank": 4, "alpha": 8.0, "targets": ["wq", "wv", "experts.gate_up_proj", "experts.down_proj"]}
LORA_EXPERTS_RUN = "lora_experts_run"  # under argv[2]: the ep2 adapter-only checkpoint (one-process resume, exports)
LORA_EXPERT_CASES = {
    "lora_experts_ep2_dp4": lora_plan([{"dp": 4, "ep": 2, "repeat": 2}]),
    "lora_experts_ep4_dp4": lora_plan([{"dp": 4, "ep": 4, "repeat": 2}]),
    "lora_experts_ep2_tp2": lora_plan([{"tp": 2, "dp": 2, "ep": 2, "repeat": 2}]),
    # expert tp without ep: the experts split over tp (DTensors), their adapters whole on each tp rank
    "lora_experts_tp2_dp2": lora_plan([{"tp": 2, "dp": 2, "repeat": 2}]),
}


_EXPERT_REFS: dict[int, list[dict]] = {}


def lora_expert_reference(dp: int) -> list[dict]:
    """``lora_reference(LORA_EXPERTS, dp, 4 steps)``, computed once per dp for the rows below (deterministic: the
    2-step rows read its first two steps)."""
    if dp not in _EXPERT_REFS:
        _EXPERT_REFS[dp] = lora_reference(LORA_EXPERTS, dp, steps=4)
    return _EXPERT_REFS[dp]


def _expert_offsets(model) -> dict[str, tuple[int, int]]:
    """{parameter name: (first expert, experts held)} of this rank's expert adapter shards."""
    from meshwright.parallel.expert_parallel import ExpertParallelExperts

    out = {}
    for path, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            for attr in ("gate_up_proj", "down_proj"):
                if getattr(module, attr, None) is not None:
                    for w in ("lora_A", "lora_B"):
                        out[f"{path}.{attr}.{w}"] = (module.first_expert, module.n_local)
    return out


def lora_expert_steps(rt, opt, ref: list[dict], start: int, steps: int, grads: bool) -> dict:
    """``lora_steps`` for expert adapters: a shard's gradient is compared with its experts' rows of the reference."""
    import math

    from parity_lib import MAX_NORM, rel, shard
    from torch.distributed.tensor import DTensor

    offsets = _expert_offsets(rt.model)
    worst = {"loss": 0.0, "grad": 0.0, "norm": 0.0}
    worst_name, names, frozen_grads = "", [], []
    for k in range(steps):
        loss = rt.forward_backward(shard(start + k, rt.dp_rank, rt.dp_size))
        worst["loss"] = max(worst["loss"], rel(loss, ref[start + k]["loss"]))
        if grads and k == 0:
            for n, q in rt.model.named_parameters():
                if q.grad is None:
                    continue
                if not q.requires_grad:
                    frozen_grads.append(n)
                    continue
                names.append(n)
                g = q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad
                r = ref[start]["grads"].get(n)
                if r is not None and n in offsets:
                    lo, count = offsets[n]
                    r = r[lo:lo + count]
                e = rel(g, r) if r is not None and r.shape == g.shape else math.inf
                if e > worst["grad"]:
                    worst["grad"], worst_name = e, n
        worst["norm"] = max(worst["norm"], rel(rt.clip_grad_norm_(MAX_NORM), ref[start + k]["norm"]))
        rt.optimizer_step(opt)
    return {**worst, "worst_grad_param": worst_name, "grad_names": sorted(names), "frozen_grads": frozen_grads,
            "n_expert_adapter_shards": len(offsets),
            "ok": all(v <= 1e-5 and math.isfinite(v) for v in worst.values()) and not frozen_grads}


def run_lora_expert_case(name: str, pd: dict, lora: dict) -> dict:
    from parity_lib import make_opt

    from meshwright.config import LoraConfig
    from meshwright.memory.lora import is_adapter_param, lora_adapter_params
    from meshwright.parallel.data_parallel import sharded_state_bytes
    from meshwright.plan import plan_from_dict

    p = plan_from_dict(pd)
    s = p.layer_strategies()[0]
    ref = lora_expert_reference(s.dp) if lora == LORA_EXPERTS else lora_reference(lora, s.dp)
    rt = lora_runtime(pd, lora)
    opt = rt.build_optimizer(make_opt)
    res = lora_expert_steps(rt, opt, ref, 0, LORA_STEPS, grads=True)
    mine = dict(rt.model.named_parameters())
    trainable = {n for n, q in mine.items() if q.requires_grad}
    res["grads_ok"] = set(res["grad_names"]) == trainable == {n for n in ref[0]["grads"] if n in mine}
    adapters = {n: q for n, q in mine.items() if ".experts." in n and is_adapter_param(n)}
    n_local = lora_moe_cfg().n_experts // s.ep
    # sharded with the experts over ep, marked as expert shards (reduced over edp, not dp), trainable; whole on every
    # tp rank (expert tp applies their slices)
    res["expert_adapters_sharded"] = len(adapters) == 2 * 2 * 2 and all(
        q.shape[0] == n_local and is_expert_param(q) == (s.ep > 1) and q.requires_grad and not hasattr(q, "to_local")
        for q in adapters.values())
    base = [(n, q) for n, q in mine.items() if n.endswith((".w1", ".w2", ".w3")) or ".router." in n]
    res["base_frozen"] = bool(base) and all(not q.requires_grad and q.grad is None for _, q in base)
    local = sum(q.to_local().numel() if hasattr(q, "to_local") else q.numel() for q in mine.values() if q.requires_grad)
    tp_split = sum(q.numel() - q.to_local().numel() for q in mine.values()
                   if q.requires_grad and hasattr(q, "to_local"))
    # the planner's count (memory/lora.py lora_adapter_params) is this rank's real one (tp's split of the attention
    # adapters aside: the planner's LoraStep applies it)
    res["adapter_params"], res["adapter_params_counted"] = local + tp_split, lora_adapter_params(
        lora_moe_cfg(), LoraConfig(**lora), ep=s.ep)
    res["opt_state_bytes"], res["opt_state_expected"] = sharded_state_bytes(opt), 8 * local
    held = {id(q) for g in opt.param_groups for q in g["params"]}
    res["opt_params_ok"] = held == {id(q) for q in mine.values() if q.requires_grad}
    res["a2a_bytes"] = rt.a2a_meter.bytes_total
    res["ok"] = (res["ok"] and res["grads_ok"] and res["expert_adapters_sharded"] and res["base_frozen"]
                 and res["opt_params_ok"] and res["opt_state_bytes"] == res["opt_state_expected"]
                 and res["adapter_params"] == res["adapter_params_counted"] and (res["a2a_bytes"] > 0) == (s.ep > 1))
    rt.close()
    return {"case": name, "rank": dist.get_rank(), "ep": s.ep, **res}


def run_lora_experts_ckpt(run_dir: str) -> dict:
    """Adapter-only checkpoint of expert adapters under ep2 (dp4) after 2 steps (each rank writes its experts' A/B
    rows), resumed under ep4 for steps 3-4; kept in ``run_dir`` for the one-process resume and the exports."""
    from pathlib import Path

    from parity_lib import SEED, make_opt

    from meshwright.config import LoraConfig, TrainConfig
    from meshwright.config.io import from_dict, to_dict, write_yaml
    from meshwright.train.checkpoint import load_runtime, save_runtime
    from meshwright.train.checkpoint_io import read_metadata_file
    from meshwright.train.lora_base import AdapterScope

    lora = LORA_EXPERTS
    cfg = lora_moe_cfg()
    ref = lora_expert_reference(4)
    if dist.get_rank() == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_yaml(from_dict(TrainConfig, {"model": to_dict(cfg), "seq_len": 16, "seed": SEED, "lora": lora}),
                   Path(run_dir) / "config.yaml")
        write_yaml(cfg, Path(run_dir) / "model.yaml")
    path = f"{run_dir}/ckpt/step_000002"
    rt = lora_runtime(LORA_EXPERT_CASES["lora_experts_ep2_dp4"], lora)
    scope = AdapterScope.for_run(TrainConfig(seed=SEED, lora=LoraConfig(**lora)), cfg, rt.init, rt.device.type)
    opt = rt.build_optimizer(make_opt)
    save = lora_expert_steps(rt, opt, ref, 0, 2, grads=False)
    save_runtime(path, rt, opt, meta={"step": 2}, adapters=scope)
    rt.close()
    rt2 = lora_runtime(LORA_EXPERT_CASES["lora_experts_ep4_dp4"], lora)
    opt2 = rt2.build_optimizer(make_opt)
    meta = load_runtime(path, rt2, opt2, adapters=scope)
    resume = lora_expert_steps(rt2, opt2, ref, 2, 2, grads=False)
    rt2.close()
    metadata = read_metadata_file(f"{path}/.metadata").state_dict_metadata
    saved = sorted(k.split(".", 1)[1] for k in metadata if k.startswith("model."))
    shapes = {k.split(".", 1)[1]: list(v.size) for k, v in metadata.items()
              if k.startswith("model.") and ".experts." in k}
    ok = (save["ok"] and resume["ok"] and meta.get("step") == 2 and bool(saved)
          and all(k.endswith(("lora_A", "lora_B")) for k in saved))
    return {"case": "lora_experts_ckpt_ep2_to_ep4", "rank": dist.get_rank(), "ok": ok, "save": save,
            "resume": resume, "saved_model_keys": saved, "saved_expert_shapes": shapes,
            "ref_losses": [r["loss"] for r in ref]}


def lora_expert_rows(run_root: str | None) -> list[dict]:
    """Every expert-LoRA row on this rank (a failure becomes a row with its error)."""
    cases = {name: functools.partial(run_lora_expert_case, name, pd, LORA_EXPERTS)
             for name, pd in LORA_EXPERT_CASES.items()}
    return _case_rows(cases, "lora_experts_ckpt_ep2_to_ep4", run_lora_experts_ckpt, LORA_EXPERTS_RUN, run_root)


# ---- a cold ep rank (``ep2_cold_rank`` rows) -----------------------------------------------------------------
# every token routed to ep rank 0's experts, so ep rank 1's get none: a collapsed router does it in training, and
# torch 2.13's pipelining can do it at a stage's first step (its metadata inference runs the stage forward and an
# input-only backward on an uninitialised buffer: all zeros route every token to experts 2 and 3, topk's pick among
# ties, so under ep2 ep rank 0 gets none). Backward must run both all-to-alls on both ranks; a rank that skipped
# them left its peer waiting in one (the ep2pp2 failure, seen intermittently). Each backward mode runs on groups
# of its own with a short timeout: a regression is a failed row after COLD_TIMEOUT_S, not a hung launch.

COLD_TIMEOUT_S = 30.0


class _ColdRouter(torch.nn.Module):
    """Router logits favouring experts 0 and 1 for every token (still a function of the input, so the router's
    backward runs as in a real one)."""

    def __init__(self, n_experts: int) -> None:
        super().__init__()
        self.bias = torch.tensor([10.0, 9.0] + [0.0] * (n_experts - 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.01 * x[:, :1] + self.bias


def run_cold_rank_case(mode: str, groups) -> dict:
    """One MoE block under ep2 with the cold router: forward, then ``mode`` ("backward": loss.backward(), or
    "input_grad": torch.autograd.grad w.r.t. the block's input only, as pipelining computes input gradients); the
    token all-to-alls this rank ran in backward (2 on both ranks when aligned) and the input gradient's error."""
    cfg = _cfg(2, None)
    model = build_model(cfg, seed=50)
    block = next(iter(moe_layers(model).values()))
    block.router = _ColdRouter(cfg.n_experts)
    ref_x = torch.randn(B_LOCAL * SEQ, cfg.d_model, generator=torch.Generator().manual_seed(51 + dist.get_rank()))
    ref_x.requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(copy.deepcopy(block)(ref_x[None]).square().sum(), [ref_x])
    meter = apply_ep(model, groups.ep)
    x = ref_x.detach().clone().requires_grad_(True)
    out = block(x[None])
    fwd_calls = meter.calls
    loss = out.square().sum()
    if mode == "backward":
        loss.backward()
        grad = x.grad
    else:
        (grad,) = torch.autograd.grad(loss, [x])
    return {"case": "ep2_cold_rank", "mode": mode, "rank": dist.get_rank(), "ep_rank": dist.get_rank(groups.ep),
            "tokens_per_expert": block.last_stats["tokens_per_expert"].tolist(), "fwd_a2a_calls": fwd_calls,
            "bwd_a2a_calls": meter.calls - fwd_calls,
            "grad_err": (grad - ref_grad).abs().max().item(), "ok": True}


def cold_rank_rows(mesh) -> list[dict]:
    """Both backward modes of run_cold_rank_case, each on ep groups of its own (COLD_TIMEOUT_S, all made first:
    making groups is collective) with a world barrier after it (a rank stuck until the timeout is waited for); a
    failure is a row."""
    from parity_lib import failure, pg_timeout

    cold_s = pg_timeout(COLD_TIMEOUT_S).total_seconds()  # on a quiet box; a loaded one slows the peer, not a hang
    modes = {mode: ep_groups_from_mesh(mesh, "dp", 2, timeout_s=cold_s) for mode in ("backward", "input_grad")}
    rows = []
    for mode, groups in modes.items():
        try:
            rows.append(run_cold_rank_case(mode, groups))
        except Exception as e:
            rows.append({"case": "ep2_cold_rank", "mode": mode, "rank": dist.get_rank(),
                         **failure(f"ep2_cold_rank {mode}", e)})
        dist.barrier()
    return rows


def main() -> None:
    out = sys.argv[1]
    from parity_lib import pg_timeout

    dist.init_process_group("gloo", timeout=pg_timeout(120))  # 120 s on a quiet box, stretched by the load
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

    # ep2 with tp2: attention tensor-parallel (DTensor), experts split by tp (expert tp), ep over dp per tp column.
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

    # a cold ep rank (no token reaches its experts): both ranks still run both backward all-to-alls
    results += cold_rank_rows(init_device_mesh("cpu", (2, 2), mesh_dim_names=("rep", "dp")))

    results += lora_rows(sys.argv[2] if len(sys.argv) > 2 else None)
    results += lora_expert_rows(sys.argv[2] if len(sys.argv) > 2 else None)

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
