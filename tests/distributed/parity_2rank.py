"""Two-rank parity checks (one torchrun launch): every 2-device layout against the one-process run."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from parity_lib import (
    CFG,
    MAX_NORM,
    GEMMA_CFG,
    QK_CFG,
    SEED,
    STEPS,
    Report,
    batch,
    check_runtime,
    failure,
    full_grads,
    init,
    make_opt,
    plan,
    reference,
    run_worker,
    shard,
    uniform,
)

from meshwright.models import build_model, lm_loss
from meshwright.parallel.runtime import DistributedRuntime
from meshwright.plan import plan_from_dict
from meshwright.errors import ConfigError
from meshwright.train.checkpoint import load_runtime, save_runtime
from meshwright.train.checkpoint_io import read_metadata_file

L = CFG.n_layers




CASES = {
    "dp2_ddp": (plan(uniform(dp=2)), "dtensor"),
    "dp2_zero1": (plan(uniform(dp=2, zero=1)), "dtensor"),
    "dp2_zero2_fsdp": (plan(uniform(dp=2, zero=2)), "dtensor"),
    "dp2_zero3_fsdp": (plan(uniform(dp=2, zero=3), embedding={"zero": 3}), "dtensor"),
    "tp2_dtensor": (plan(uniform(tp=2)), "dtensor"),
    "tp2_megatron": (plan(uniform(tp=2)), "megatron"),
    "tp2_sp": (plan(uniform(tp=2, sp=True)), "dtensor"),
    "pp2_1f1b": (plan(uniform(), pipeline={"degree": 2, "schedule": "1f1b", "microbatches": 4}), "dtensor"),
    "pp2_gpipe": (plan(uniform(), pipeline={"degree": 2, "schedule": "gpipe", "microbatches": 4}), "dtensor"),
    "pp2_interleaved": (plan(uniform(), pipeline={"degree": 2, "schedule": "interleaved_1f1b", "microbatches": 4,
                                                  "virtual_stages": 2}), "dtensor"),
    "layerwise_tp_zero_mix": (plan([{"tp": 2}, {"dp": 2, "zero": 3}, {"dp": 2, "zero": 2}, {"tp": 2, "sp": True}]), "dtensor"),
    "recompute_full_dp2": (plan(uniform(dp=2, recompute="full")), "dtensor"),
    "recompute_selective_tp2": (plan(uniform(tp=2, recompute="selective")), "dtensor"),
}
# the tp layouts again on QK_CFG (Qwen3's q/k head norms): their replicated weights' gradients must be tp-summed.
# Trained with SGD: the head norms' gradients are small (~1e-3) and AdamW's second step turns fp32 summation-order
# noise in them into a ~1e-5 grad-norm difference (one process vs tp2); SGD keeps all three steps within RTOL.
QK_CASES = {f"{name}_qk_norm": CASES[name] for name in ("tp2_dtensor", "tp2_megatron", "tp2_sp")}
# and on GEMMA_CFG (Gemma 3's q/k norms with every Gemma 2 piece besides), trained with SGD for the same reason
GEMMA_CASES = {f"{name}_gemma": CASES[name] for name in ("tp2_dtensor", "tp2_megatron", "tp2_sp")}


# LoRA (the trainer's lora: section) under data parallelism: frozen base, adapters (and, in the zero3 case, the
# head as modules_to_save, FSDP-sharded with the frozen embedding) against one process with the same adapters
LORA = {"rank": 4, "alpha": 8.0, "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}
LORA_CASES = {
    "lora_dp2_ddp": (plan(uniform(dp=2)), LORA),
    "lora_dp2_zero1": (plan(uniform(dp=2, zero=1)), LORA),
    "lora_dp2_zero2_fsdp": (plan(uniform(dp=2, zero=2)), LORA),
    "lora_dp2_zero3_fsdp": (plan(uniform(dp=2, zero=3), embedding={"zero": 3}), {**LORA, "modules_to_save": ["output"]}),
    # tensor parallelism (DTensor, +sp) and pipeline stages: A/B sharded as PEFT/Megatron do, adapters on their stage
    "lora_tp2": (plan(uniform(tp=2)), LORA),
    "lora_tp2_sp": (plan(uniform(tp=2, sp=True)), LORA),
    "lora_pp2_1f1b": (plan(uniform(), pipeline={"degree": 2, "schedule": "1f1b", "microbatches": 4}), LORA),
    "lora_tp2_sp_gemma": (plan(uniform(tp=2, sp=True)), LORA),  # q/k head norms, post norms (sequence-split): frozen
    # megatron-core's ColumnParallelLinear/RowParallelLinear carrying the adapters (parallel/megatron_lora.py)
    "lora_tp2_megatron": (plan(uniform(tp=2)), LORA),
}
LORA_MODELS = {"lora_tp2_sp_gemma": GEMMA_CFG}  # the others train CFG
LORA_BACKENDS = {"lora_tp2_megatron": "megatron"}  # the others: dtensor
# where the adapters of a column-parallel (wq, w1) and a row-parallel (wo, w2) linear live under tp
LORA_TP_PLACEMENTS = {"attention.wq.lora_A": "R", "attention.wq.lora_B": "S(0)", "attention.wo.lora_A": "S(1)",
                      "attention.wo.lora_B": "R", "feed_forward.w1.lora_A": "R", "feed_forward.w1.lora_B": "S(0)",
                      "feed_forward.w2.lora_A": "S(1)", "feed_forward.w2.lora_B": "R"}  # str() of DTensor placements
LORA_RUN = "lora_tp2_run"  # beside the report: the tp2 LoRA checkpoint, for the export test in test_parallel_runtime.py
LORA_RUN_MEGATRON = "lora_tp2_megatron_run"  # ... and the megatron-core tp2 one (adapter-only)



def save_and_resume(rt, make_resumed, ref: list[dict], path: str, adapters=None) -> dict:
    """Two steps of ``rt`` against ``ref``, saved at ``path``; then ``make_resumed()`` (another layout, another seed)
    loads it and its next two steps are checked against ``ref[2:]``. ``adapters``: a LoRA run's AdapterScope, for
    an adapter-only checkpoint (the resumed runtime then builds the same base itself)."""
    res = check_runtime(rt, ref, steps=2, check_grads=False)
    save_runtime(path, rt, res.pop("opt"), meta={"step": 2}, adapters=adapters)
    rt2 = make_resumed()
    opt2 = rt2.build_optimizer(make_opt)
    load_runtime(path, rt2, opt2, adapters=adapters)
    res2 = check_runtime(rt2, ref[2:], steps=2, start=2, check_grads=False, opt=opt2)
    res2.pop("opt")
    return {"ok": res["ok"] and res2["ok"], "save": res, "resume": res2}

def lora_scope(lora: dict, seed: int, rt):
    """The AdapterScope the trainer makes for a LoRA run of CFG from ``seed`` (its base: that seed's draw)."""
    from meshwright.config import LoraConfig, TrainConfig
    from meshwright.train.lora_base import AdapterScope

    return AdapterScope.for_run(TrainConfig(seed=seed, lora=LoraConfig(**lora)), CFG, rt.init, rt.device.type)


def lora_model(lora: dict, cfg=CFG):
    from meshwright.config import LoraConfig
    from meshwright.memory.lora import apply_lora_config

    model = build_model(cfg, seed=SEED)
    apply_lora_config(model, LoraConfig(**lora), SEED)
    return model


def write_lora_run_files(run: Path, lora: dict) -> None:
    """config.yaml and model.yaml of a LoRA run of CFG, as run_training writes them: what ``meshwright export`` reads."""
    from meshwright.config import TrainConfig
    from meshwright.config.io import from_dict, to_dict, write_yaml

    run.mkdir(parents=True, exist_ok=True)
    write_yaml(from_dict(TrainConfig, {"model": to_dict(CFG), "seq_len": 16, "seed": SEED, "lora": lora}), run / "config.yaml")
    write_yaml(CFG, run / "model.yaml")


def lora_reference(lora: dict, steps: int = 4, model=None, cfg=CFG, opt=None, start: int = 0) -> list[dict]:
    """One process, the trainer's optimizer groups over the trainable parameters only; grads of those only."""
    model = model or lora_model(lora, cfg)
    opt = opt or make_opt([{"params": [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]},
                           {"params": [p for p in model.parameters() if p.requires_grad and p.dim() < 2],
                            "weight_decay": 0.0}])
    out = []
    for step in range(start, start + steps):
        x, y = batch(step)
        loss = lm_loss(model(x), y)
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append({"loss": float(loss.detach()), "grads": grads, "norm": norm})
    return out


def check_lora_case(name: str, pd: dict, lora: dict, ref: list[dict], steps: int = STEPS, cfg=CFG,
                    tp_backend: str = "dtensor") -> dict:
    """One LoRA layout against the one-process ``ref``: loss, first-step gradients and grad norm (check_runtime),
    gradients on exactly this rank's trainable parameters, an optimizer holding only those, and under tp the
    adapters' placements (LORA_TP_PLACEMENTS; megatron-core's plain shards read as the DTensor placement they stand
    for, and their local shapes checked against it)."""
    from meshwright.config import LoraConfig

    rt = DistributedRuntime(cfg, plan_from_dict(pd), tp_backend=tp_backend, seed=SEED, lora=LoraConfig(**lora))
    res = check_runtime(rt, ref, steps=steps)
    opt = res.pop("opt")
    rt.forward_backward(shard(0, rt.dp_rank, rt.dp_size))  # which parameters get a gradient at all
    grads = full_grads(rt)
    mine = dict(rt.model.named_parameters())  # this rank's stages' parameters (all of them without pp)
    res["grad_names"] = len(grads)
    # nothing frozen got a gradient, every trainable parameter of this rank's stages did
    res["ok"] = res["ok"] and set(grads) == {n for n in ref[0]["grads"] if n in mine}
    # the optimizer holds this rank's trainable parameters only
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    res["opt_params_ok"] = held == {id(p) for p in mine.values() if p.requires_grad} if not rt.zero1 else True
    res["ok"] = res["ok"] and res["opt_params_ok"]
    if "tp2" in name:  # A replicated / B column-sharded on column-parallel bases, the converse on row-parallel (the
        # tp placement: the last one on a (dp, tp) FSDP mesh)
        if tp_backend == "megatron":
            res["placements"] = {k: megatron_placement(rt, cfg, lora, f"layers.1.{k}") for k in LORA_TP_PLACEMENTS}
            # the frozen bases run megatron's frozen-weight matmul: no gradient, and they stay out of the optimizer
            res["frozen_bases"] = all(not p.requires_grad and p.grad is None for k, p in mine.items()
                                      if k.endswith(".weight") and ("attention.w" in k or "feed_forward.w" in k))
            res["collectives"] = megatron_lora_collectives(rt, pd, cfg)
            res["ok"] = res["ok"] and res["frozen_bases"] and res["collectives"]["ok"]
        else:
            res["placements"] = {k: str(mine[f"layers.1.{k}"].placements[-1]) for k in LORA_TP_PLACEMENTS}
        res["ok"] = res["ok"] and res["placements"] == LORA_TP_PLACEMENTS
    rt.close()
    return res


def all_reduce_sizes(fn) -> list[int]:
    """The element count of every all-reduce ``fn`` issues (megatron-core's mappings and linears, and our gradient
    buckets, all call ``torch.distributed.all_reduce``)."""
    seen: list[int] = []
    real = dist.all_reduce

    def counting(t, *args, **kwargs):
        seen.append(t.numel())
        return real(t, *args, **kwargs)

    dist.all_reduce = counting
    try:
        fn()
    finally:
        dist.all_reduce = real
    return seen


def megatron_lora_collectives(rt, pd: dict, cfg=CFG) -> dict:
    """The adapters ride on megatron's own reductions. Per micro-batch a LoRA step's forward + backward issues one
    all-reduce per row-parallel base (wo, w2) forward and one per column-parallel base (wq, wk, wv, w1, w3) backward,
    shared by base and adapter, but none for the first block's q/k/v input gradient (the frozen embedding needs none),
    plus the loss mean: each also issued by the same layout without LoRA (a sub-multiset of its all-reduces; its
    trainable-weight linears all-reduce the first block's input gradient although nothing uses it). The only
    extra one is a single bucket, after backward, of the replicated A (column) / B (row) gradients' tp-partial sums
    (after the dp buckets of the adapters' gradients, where dp > 1)."""
    def fwd_bwd(r) -> list[int]:
        finish, r._finish_grads = r._finish_grads, lambda: None
        try:
            return all_reduce_sizes(lambda: r.forward_backward(shard(0, r.dp_rank, r.dp_size)))
        finally:
            del r._finish_grads  # the bound method again
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    plain = DistributedRuntime(cfg, plan_from_dict(pd), tp_backend="megatron", seed=SEED)
    base = fwd_bwd(plain)
    plain.close()
    lora = fwd_bwd(rt)
    dp_buckets = sum(1 for ps, _, _ in rt._manual if any(p.grad is not None for p in ps))  # under dp: the adapters'
    finish = all_reduce_sizes(rt._finish_grads)
    partial = sum(p.numel() for ps in rt._tp_partial.values() for p in ps)
    linears = sum(isinstance(m, (ColumnParallelLinear, RowParallelLinear)) for m in rt.model.modules())
    want = len(shard(0, rt.dp_rank, rt.dp_size)) * (linears - 3) + 1
    subset = not Counter(lora) - Counter(base)
    return {"ok": subset and len(lora) == want and finish[-1:] == [partial] and len(finish) == 1 + dp_buckets,
            "want": want, "fwd_bwd": len(lora), "fwd_bwd_plain": len(base),
            "finish": finish, "partial_numel": partial}


def megatron_placement(rt, cfg, lora: dict, name: str) -> str:
    """The DTensor placement a megatron-core tp shard stands for ("S(dim)" or "R"), or "bad local shape" when its
    local shape is not that placement's cut of the one-process parameter."""
    full = dict(lora_model(lora, cfg).named_parameters())[name].shape
    p = dict(rt.model.named_parameters())[name]
    shard = rt._megatron_shards.get(p)
    want = list(full)
    if shard is not None:
        want[shard[0]] //= shard[1]
    return ("R" if shard is None else f"S({shard[0]})") if list(p.shape) == want else "bad local shape"


def lora_cases(report: Report, only: set | None, rank: int, out: str | None = None) -> None:
    """The LoRA layouts, then a zero3 adapter-only checkpoint (adapters + AdamW state) and a tp2 checkpoint resumed
    under DDP for steps 3-4; both are kept beside ``out`` (``lora_adapter_ckpt``, and the tp2 one as a run directory
    for the export test) for test_parallel_runtime.py to resume in one process."""
    from meshwright.config import LoraConfig

    refs: dict = {}
    for name, (pd, lora) in LORA_CASES.items():
        if only and name not in only:
            continue
        try:
            cfg = LORA_MODELS.get(name, CFG)
            key = cfg.name + json.dumps(lora, sort_keys=True)
            ref = refs[key] = refs.get(key) or lora_reference(lora, cfg=cfg)
            res = check_lora_case(name, pd, lora, ref, cfg=cfg, tp_backend=LORA_BACKENDS.get(name, "dtensor"))
        except Exception as e:
            res = failure(f"case {name}", e)
        report.add(name, res["ok"], res)
        dist.barrier()
    if only is None or "lora_ckpt_zero3_to_ddp" in only:
        import tempfile

        try:
            pd, lora = LORA_CASES["lora_dp2_zero3_fsdp"]
            ref = lora_reference(lora)
            box = [(str(Path(out).parent) if out else tempfile.mkdtemp()) if rank == 0 else None]
            dist.broadcast_object_list(box)
            path = f"{box[0]}/lora_adapter_ckpt"
            rt = DistributedRuntime(CFG, plan_from_dict(pd), seed=SEED, lora=LoraConfig(**lora))
            # adapter-only (lora.checkpoint: adapters): the DDP runtime rebuilds the base from the same seed and reads
            # the adapters, the head (modules_to_save) and their AdamW state over it
            scope = lora_scope(lora, SEED, rt)
            ddp = LORA_CASES["lora_dp2_ddp"][0]
            res = save_and_resume(rt, lambda: DistributedRuntime(CFG, plan_from_dict(ddp), seed=SEED,
                                                                 lora=LoraConfig(**lora)), ref, path, adapters=scope)
            metadata = read_metadata_file(f"{path}/.metadata").state_dict_metadata
            saved = sorted(k.split(".", 1)[1] for k in metadata if k.startswith("model."))
            res["saved_model_keys"] = len(saved)
            res["ok"] = res["ok"] and bool(saved) and all(scope.carries(k) for k in saved) and "output.weight" in saved
            # a base drawn from another seed is refused in one line naming the seed, before anything is read
            rt3 = DistributedRuntime(CFG, plan_from_dict(ddp), seed=99, lora=LoraConfig(**lora))
            try:
                load_runtime(path, rt3, rt3.build_optimizer(make_opt), adapters=lora_scope(lora, 99, rt3))
                res["refusal"] = None
            except ConfigError as e:
                res["refusal"] = str(e)
            res["ok"] = res["ok"] and str(res["refusal"]).startswith("seed=99") and "\n" not in res["refusal"]
        except Exception as e:
            res = failure("lora ckpt", e)
        report.add("lora_ckpt_zero3_to_ddp", res["ok"], res)
        dist.barrier()
    if only is None or "lora_ckpt_tp2_to_ddp" in only:  # a tp2 LoRA checkpoint (DTensor A/B shards) resumed under DDP
        import tempfile

        try:
            pd, lora = LORA_CASES["lora_tp2"]
            ref = lora_reference(lora)
            box = [str(Path(out).parent / LORA_RUN) if out else tempfile.mkdtemp() if rank == 0 else None]
            dist.broadcast_object_list(box)
            if rank == 0:  # a run directory `meshwright export` reads (test_parallel_runtime.py exports it)
                write_lora_run_files(Path(box[0]), lora)
            rt = DistributedRuntime(CFG, plan_from_dict(pd), seed=SEED, lora=LoraConfig(**lora))
            res = save_and_resume(rt, lambda: DistributedRuntime(CFG, plan_from_dict(LORA_CASES["lora_dp2_ddp"][0]),
                                                                 seed=99, lora=LoraConfig(**lora)), ref,
                                  f"{box[0]}/ckpt/step_000002")
        except Exception as e:
            res = failure("lora tp2 ckpt", e)
        report.add("lora_ckpt_tp2_to_ddp", res["ok"], res)
        dist.barrier()
    if only is None or "lora_ckpt_tp2_megatron_to_ddp" in only:  # megatron-core tp2, adapter-only, resumed under DDP
        import tempfile

        try:
            pd, lora = LORA_CASES["lora_tp2_megatron"]
            ref = lora_reference(lora)
            box = [str(Path(out).parent / LORA_RUN_MEGATRON) if out else tempfile.mkdtemp() if rank == 0 else None]
            dist.broadcast_object_list(box)
            if rank == 0:  # a run directory for test_parallel_runtime.py's export and one-process resume
                write_lora_run_files(Path(box[0]), lora)
            rt = DistributedRuntime(CFG, plan_from_dict(pd), tp_backend="megatron", seed=SEED, lora=LoraConfig(**lora))
            scope = lora_scope(lora, SEED, rt)
            path = f"{box[0]}/ckpt/step_000002"
            res = save_and_resume(rt, lambda: DistributedRuntime(CFG, plan_from_dict(LORA_CASES["lora_dp2_ddp"][0]),
                                                                 seed=SEED, lora=LoraConfig(**lora)), ref, path,
                                  adapters=scope)
            # adapter-only: A and B of the seven linears of every layer, the sharded ones whole (DCP gathered them)
            metadata = read_metadata_file(f"{path}/.metadata").state_dict_metadata
            saved = {k.split(".", 1)[1]: list(v.size) for k, v in metadata.items() if k.startswith("model.")}
            full = {k: list(p.shape) for k, p in lora_model(lora).named_parameters() if p.requires_grad}
            res["saved_model_keys"] = len(saved)
            res["ok"] = res["ok"] and saved == full
        except Exception as e:
            res = failure("lora tp2 megatron ckpt", e)
        report.add("lora_ckpt_tp2_megatron_to_ddp", res["ok"], res)
        dist.barrier()


ZERO1_RUN = "zero1_run"  # beside the report: the ZeRO-1 dp2 checkpoint, resumed in one process by test_parallel_runtime.py
ZERO1_CKPT_CASES = ("zero1_ckpt_resume_bitwise", "zero1_ckpt_to_zero2", "zero0_ckpt_to_zero1")


def _train_exact(rt, opt, start: int, steps: int) -> list[float]:
    """``steps`` steps of ``rt`` from data step ``start``: the losses and grad norms, for bitwise comparison."""
    out = []
    for step in range(start, start + steps):
        out.append(rt.forward_backward(shard(step, rt.dp_rank, rt.dp_size)))
        out.append(rt.clip_grad_norm_(MAX_NORM))
        rt.optimizer_step(opt)
    return out


def _flat_state(rt, opt) -> dict[str, torch.Tensor]:
    """This rank's parameters and the optimizer states it holds, by name (for bitwise comparison)."""
    from meshwright.parallel.zero1_state import param_fqns

    names = param_fqns(rt.model)
    out = {f"param.{names[p]}": p.detach().clone() for p in rt.model.parameters()}
    inner = opt.optim if hasattr(opt, "optim") else opt
    for p, st in inner.state.items():
        for k, v in st.items():
            out[f"state.{names[p]}.{k}"] = v.detach().clone()
    return out


def zero1_ckpt_cases(report: Report, only: set | None, rank: int, out: str | None, ref4: list[dict]) -> None:
    """ZeRO-1 (ZeroRedundancyOptimizer) through DCP checkpoints (parallel/zero1_state.py): a dp2 run saved after step
    2 and resumed under ZeRO-1 dp2 (another seed) repeats the uninterrupted run's steps 3-4 bitwise (losses, grad
    norms, parameters, the states each rank owns); each rank holds exactly the AdamW moments of the parameters it
    owns and the checkpoint holds every parameter's (the union); the same checkpoint resumes under ZeRO-2 dp2, and a
    ZeRO-0 (DDP) checkpoint resumes under ZeRO-1 dp2, both against the one-process steps 3-4. The checkpoint is kept
    beside ``out`` (``ZERO1_RUN``) for test_parallel_runtime.py to resume in one process."""
    import tempfile

    from meshwright.parallel.data_parallel import sharded_state_bytes

    if only is not None and not set(ZERO1_CKPT_CASES) & only:
        return
    box = [str(Path(out).parent / ZERO1_RUN) if out else tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(box)
    path = f"{box[0]}/ckpt/step_000002"
    zero1, zero2, ddp = CASES["dp2_zero1"][0], CASES["dp2_zero2_fsdp"][0], CASES["dp2_ddp"][0]
    try:
        rt = DistributedRuntime(CFG, plan_from_dict(zero1), seed=SEED)
        opt = rt.build_optimizer(make_opt)
        whole = _train_exact(rt, opt, 0, 4)
        want = _flat_state(rt, opt)
        rt.close()
        rt = DistributedRuntime(CFG, plan_from_dict(zero1), seed=SEED)
        opt = rt.build_optimizer(make_opt)
        first = _train_exact(rt, opt, 0, 2)
        owned = [p for g in opt.optim.param_groups for p in g["params"]]
        held = sharded_state_bytes(opt)
        save_runtime(path, rt, opt, meta={"step": 2})
        rt.close()
        rt = DistributedRuntime(CFG, plan_from_dict(zero1), seed=99)
        opt = rt.build_optimizer(make_opt)
        load_runtime(path, rt, opt)
        second = _train_exact(rt, opt, 2, 2)
        got = _flat_state(rt, opt)
        rt.close()
        metadata = read_metadata_file(f"{path}/.metadata").state_dict_metadata
        saved = sorted(k[len("optim.state."):-len(".exp_avg")] for k in metadata
                       if k.startswith("optim.state.") and k.endswith(".exp_avg"))
        names = sorted(n for n, _ in build_model(CFG, seed=SEED).named_parameters())
        res = {"losses_norms": whole, "resumed": first + second, "bitwise": whole == first + second,
               "state_keys_equal": sorted(want) == sorted(got),
               "tensors_equal": sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want),
               "owned_params": len(owned), "owned_state_bytes": sum(2 * p.numel() * p.element_size() for p in owned),
               "opt_state_bytes": held, "saved_state_params": len(saved), "all_params_saved": saved == names}
        res["ok"] = (res["bitwise"] and res["tensors_equal"] and res["all_params_saved"]
                     and res["opt_state_bytes"] == res["owned_state_bytes"])
    except Exception as e:
        res = failure("zero1 ckpt resume", e)
    report.add("zero1_ckpt_resume_bitwise", res["ok"], res)
    dist.barrier()
    try:  # the ZeRO-1 checkpoint under ZeRO-2 (FSDP2 DTensor shards of every state)
        rt = DistributedRuntime(CFG, plan_from_dict(zero2), seed=99)
        opt = rt.build_optimizer(make_opt)
        meta = load_runtime(path, rt, opt)
        res = check_runtime(rt, ref4[2:], steps=2, start=2, check_grads=False, opt=opt)
        res.pop("opt")
        res["ok"] = res["ok"] and meta["step"] == 2
        rt.close()
    except Exception as e:
        res = failure("zero1 ckpt to zero2", e)
    report.add("zero1_ckpt_to_zero2", res["ok"], res)
    dist.barrier()
    try:  # a ZeRO-0 (DDP) checkpoint under ZeRO-1: each rank reads the states of the parameters it owns
        d = [tempfile.mkdtemp() if rank == 0 else None]
        dist.broadcast_object_list(d)
        rt = DistributedRuntime(CFG, plan_from_dict(ddp), seed=SEED)
        res = save_and_resume(rt, lambda: DistributedRuntime(CFG, plan_from_dict(zero1), seed=99), ref4,
                              f"{d[0]}/ddp_ckpt")
    except Exception as e:
        res = failure("zero0 ckpt to zero1", e)
    report.add("zero0_ckpt_to_zero1", res["ok"], res)
    dist.barrier()


def make_sgd(groups):
    return torch.optim.SGD(groups, lr=0.1)


def zero2_gather_counts() -> tuple[bool, dict]:
    """ZeRO-2 gathers each FSDP block's parameters once per step (not once per microbatch): count the
    all-gathers of two steps of two microbatches each (4 blocks -> 4 per step)."""
    calls = {"n": 0}
    names = [n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n)]
    saved = {n: getattr(dist, n) for n in names}

    def counting(fn):
        def wrapped(*a, **k):
            calls["n"] += 1
            return fn(*a, **k)
        return wrapped

    try:
        rt = DistributedRuntime(CFG, plan_from_dict(plan(uniform(dp=2, zero=2))), seed=7)
        opt = rt.build_optimizer(make_opt)
        counts = []
        for step in range(2):
            micro = shard(step, rt.dp_rank, rt.dp_size)
            for n in names:
                setattr(dist, n, counting(saved[n]))
            calls["n"] = 0
            rt.forward_backward(micro)
            for n in names:
                setattr(dist, n, saved[n])
            counts.append(calls["n"])
            rt.optimizer_step(opt)
        rt.close()
        return counts == [L, L] and len(micro) == 2, {"gathers_per_step": counts, "microbatches": len(micro)}
    except Exception as e:
        for n in names:
            setattr(dist, n, saved[n])
        return False, failure("zero2_gathers_once_per_step", e)


def main() -> None:
    rank, world = init()
    out = sys.argv[1] if len(sys.argv) > 1 else None
    only = set(sys.argv[2].split(",")) if len(sys.argv) > 2 and sys.argv[2] else None
    ckpt = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
    ref4 = reference(steps=4)
    ref = ref4[:STEPS]
    report = Report(out)
    sgd_refs: dict[str, list] = {}
    for name, (pd, tp_backend) in {**CASES, **QK_CASES, **GEMMA_CASES}.items():
        if only and name not in only:
            continue
        cfg = QK_CFG if name in QK_CASES else GEMMA_CFG if name in GEMMA_CASES else CFG
        if cfg is not CFG and cfg.name not in sgd_refs:
            model = build_model(cfg, seed=SEED)
            sgd_refs[cfg.name] = reference(model=model, opt=make_sgd(model.parameters()))
        try:
            rt = DistributedRuntime(cfg, plan_from_dict(pd), tp_backend=tp_backend, seed=7)
            if cfg is not CFG:
                res = check_runtime(rt, sgd_refs[cfg.name], opt=rt.build_optimizer(make_sgd))
            else:
                res = check_runtime(rt, ref)
            res.pop("opt")
            rt.close()
        except Exception as e:  # report, keep the other cases running
            res = failure(f"case {name}", e)
        report.add(name, res["ok"], res)
        dist.barrier()
    lora_cases(report, only, rank, out)
    zero1_ckpt_cases(report, only, rank, out, ref4)
    if only is None or "zero2_gathers_once_per_step" in only:
        report.add("zero2_gathers_once_per_step", *zero2_gather_counts())
        dist.barrier()
    if only is None or "deepspeed" in only:
        import tempfile

        from parity_deepspeed import run_all

        box = [tempfile.mkdtemp() if rank == 0 else None]
        dist.broadcast_object_list(box)
        run_all(report, ref4, ckpt_dir=box[0])
    if only is None or "ckpt_megatron_to_dtensor" in only:  # a megatron-core tp2 checkpoint resumed by the DTensor backend
        import tempfile

        try:
            d = tempfile.mkdtemp() if rank == 0 else None
            box = [d]
            dist.broadcast_object_list(box)
            path = f"{box[0]}/mckpt"
            rt = DistributedRuntime(CFG, plan_from_dict(CASES["tp2_megatron"][0]), tp_backend="megatron", seed=7)
            res = save_and_resume(rt, lambda: DistributedRuntime(CFG, plan_from_dict(CASES["tp2_megatron"][0]),
                                                                 tp_backend="dtensor", seed=99), ref4, path)
        except Exception as e:
            res = failure("megatron ckpt", e)
        report.add("ckpt_megatron_to_dtensor", res["ok"], res)
        dist.barrier()
    if ckpt:  # resume the 4-rank dp2·tp2 checkpoint (written after step 2) under pp2
        try:
            rt = DistributedRuntime(CFG, plan_from_dict(CASES["pp2_1f1b"][0]), seed=99)
            opt = rt.build_optimizer(make_opt)
            meta = load_runtime(ckpt, rt, opt)
            res = check_runtime(rt, ref4[2:], steps=2, start=2, check_grads=False, opt=opt)
            res.pop("opt")
            res["meta"] = meta
            res["ok"] = res["ok"] and meta.get("step") == 2
        except Exception as e:
            res = failure("ckpt resume", e)
        report.add("ckpt_dp2tp2_to_pp2", res["ok"], res)
    report.gather_and_write()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_worker(main)
