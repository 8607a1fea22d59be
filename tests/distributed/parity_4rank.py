"""Four-rank parity checks (one torchrun launch): 2-D/3-D layouts, and a checkpoint written under
dp2·tp2 resumed under pp2·dp2 (the same loss trajectory as the one-process run)."""

from __future__ import annotations

import sys

import torch.distributed as dist
from parity_lib import (CFG, MAX_NORM, SEED, Report, check_runtime, count_chunk_forwards, failure, init, make_opt, plan,
                        reference, rel, run_worker, shard, stage_casts, uniform)

from meshwright.parallel.runtime import DistributedRuntime
from meshwright.plan import plan_from_dict
from meshwright.train.checkpoint import load_runtime, save_runtime
from meshwright.train.precision import PrecisionPolicy

PP2 = {"degree": 2, "schedule": "1f1b", "microbatches": 2}
CASES = {
    "dp2_tp2_fsdp": (plan(uniform(tp=2, dp=2, zero=3)), "dtensor"),
    "dp2_tp2_sp_zero0": (plan(uniform(tp=2, dp=2, sp=True)), "dtensor"),
    "dp2_tp2_megatron": (plan(uniform(tp=2, dp=2)), "megatron"),
    "pp2_tp2": (plan(uniform(tp=2), pipeline={**PP2, "microbatches": 4}), "dtensor"),
    "pp2_dp2": (plan(uniform(dp=2), pipeline=PP2), "dtensor"),
    # ZeRO-1 under pipelining: one ZeroRedundancyOptimizer per stage over its dp pair (the manual all-reduce, not DDP)
    "pp2_dp2_zero1": (plan(uniform(dp=2, zero=1), pipeline=PP2), "dtensor"),
    "hsdp_dp4_shard2": (plan(uniform(dp=4, zero=3)), "dtensor", 2),
    "hsdp_dp2x_tp2_zero2": (plan(uniform(dp=2, tp=2, zero=2)), "dtensor", 1),
    # HSDP from the Plan, per layer: two shard-group sizes' meshes side by side with plain FSDP
    "hsdp_plan_per_layer": (plan([{"dp": 4, "zero": 3, "dp_shard": 2, "repeat": 2}, {"dp": 4, "zero": 2, "dp_shard": 2},
                                  {"dp": 4, "zero": 3}]), "dtensor"),
    "pp2_layerwise_dp2_zero2_tp2": (plan([{"dp": 2, "zero": 2}, {"tp": 2}, {"tp": 2, "recompute": "full"}, {"dp": 2}],
                                         pipeline=PP2), "dtensor"),
}


# LoRA on 2-D layouts: tp2 x dp2 (FSDP2 ZeRO-3 over dp, DTensor tp, A/B as parity_2rank.LORA_TP_PLACEMENTS) and
# pp2 x dp2 (each stage's adapters, their gradients all-reduced over its dp pair), against one process
LORA_CASES = {
    "lora_tp2_dp2_fsdp": plan(uniform(tp=2, dp=2, zero=3)),
    "lora_pp2_dp2": plan(uniform(dp=2), pipeline=PP2),
    # megatron-core tp2 x dp2 (parallel/megatron_lora.py): the adapters' dp all-reduce, then their tp-partial sums
    "lora_tp2_dp2_megatron": plan(uniform(tp=2, dp=2)),
}
LORA_BACKENDS = {"lora_tp2_dp2_megatron": "megatron"}  # the others: dtensor

# bf16 under pp2 x dp2 with FSDP2's mixed policy (bf16 gathered weights, inputs cast to bf16): the hidden states
# between the stages are bf16 where FSDP cast the residual stream (from the embedding, or from layer 0 on, through
# the plain zero-0 layer 1), and DistributedRuntime._stage_io declares that dtype up front (no inference pass):
# (case: plan, loss_chunk_tokens, the stages' declared outputs). No stage may return another dtype (stage_casts 0),
# each chunk runs one forward per micro-batch, the losses track the one-process bf16 run.
BF16 = "torch.bfloat16"
BF16_PP_CASES = {
    "bf16_pp2_dp2_zero3": (plan(uniform(dp=2, zero=3), pipeline=PP2, embedding={"zero": 3}), 0, [BF16, BF16]),
    "bf16_pp2_dp2_zero_mix": (plan([{"dp": 2, "zero": 3}, {"dp": 2}, {"dp": 2}, {"dp": 2, "zero": 3}], pipeline=PP2),
                              0, [BF16, BF16]),
    # the last stage returns the final norm's output (its head runs in the chunked loss): bf16 stream x bf16 weight
    "bf16_chunked_pp2_dp2_zero3": (plan(uniform(dp=2, zero=3), pipeline=PP2, embedding={"zero": 3}), 8, [BF16, BF16]),
}
BF16_RTOL = 5e-3  # as fullspeed_2rank's bf16 layouts


def bf16_pp_case(pd: dict, chunk: int, declared: list[str], ref: list[float]) -> dict:
    rt = DistributedRuntime(CFG, plan_from_dict(pd), seed=SEED, precision=PrecisionPolicy.from_dtype("bf16"),
                            loss_chunk_tokens=chunk)
    calls = count_chunk_forwards(rt)
    opt = rt.build_optimizer(make_opt)
    losses = []
    for step in range(len(ref)):
        losses.append(rt.forward_backward(shard(step, rt.dp_rank, rt.dp_size)))
        rt.clip_grad_norm_(MAX_NORM)
        rt.optimizer_step(opt)
    mbs = shard(0, rt.dp_rank, rt.dp_size)
    outputs = [str(io.output.dtype) for io in rt._stage_io(mbs[0][0])]
    casts = stage_casts(rt)
    rt.close()
    worst = max(rel(a, b) for a, b in zip(losses, ref))
    ok = (casts == 0 and outputs == declared and calls == [len(ref) * len(mbs)] * len(calls) and worst <= BF16_RTOL)
    return {"ok": ok, "loss_rel": worst, "losses": losses, "stage_casts": casts, "declared_outputs": outputs,
            "chunk_forwards": calls}


def bf16_reference(steps: int) -> list[float]:
    """The one-process bf16 run's losses (LocalRuntime: autocast, fp32 weights; the 4 micro-batches of a step)."""
    from meshwright.models import build_model
    from meshwright.train.local_runtime import LocalRuntime

    rt = LocalRuntime(build_model(CFG, seed=SEED), dtype="bf16")
    opt = rt.build_optimizer(make_opt)
    losses = []
    for step in range(steps):
        losses.append(rt.forward_backward(shard(step, 0, 1)))
        rt.clip_grad_norm_(MAX_NORM)
        rt.optimizer_step(opt)
    return losses
CKPT_SAVE = "dp2_tp2_fsdp"  # the case whose run the checkpoint case saves after its 2 steps
ZERO1_CKPT = "ckpt_pp2dp2_zero1_to_dp4_zero1"


def zero1_reshard(report: Report, ref: list[dict], ckpt: str) -> None:
    """ZeRO-1 across partitions: a pp2 x dp2 ZeRO-1 run (each stage's pair owns its stage's parameters' states)
    saved after 2 steps, resumed under dp4 ZeRO-1 (four ranks partition every parameter anew, each reading the
    states of those it now owns) for steps 3-4 against the one-process run."""
    try:
        rt = DistributedRuntime(CFG, plan_from_dict(CASES["pp2_dp2_zero1"][0]), seed=7)
        res = check_runtime(rt, ref, steps=2, check_grads=False)
        save_runtime(ckpt, rt, res.pop("opt"), meta={"step": 2})
        rt.close()
        rt2 = DistributedRuntime(CFG, plan_from_dict(plan(uniform(dp=4, zero=1))), seed=123)
        opt2 = rt2.build_optimizer(__import__("parity_lib").make_opt)
        meta = load_runtime(ckpt, rt2, opt2)
        res2 = check_runtime(rt2, ref[2:], steps=2, start=2, check_grads=False, opt=opt2)
        res2.pop("opt")
        rt2.close()
        report.add(ZERO1_CKPT, res["ok"] and res2["ok"] and meta.get("step") == 2, {"save": res, "resume": res2})
    except Exception as e:
        report.add(ZERO1_CKPT, False, failure(ZERO1_CKPT, e))
    dist.barrier()


def shard_mesh_dims(rt, layer: int) -> list[int]:
    """Sizes of the mesh layer ``layer``'s first weight is a DTensor on (HSDP: [replicas, shard])."""
    p = next(p for n, p in rt.model.named_parameters() if n.startswith(f"layers.{layer}.") and p.dim() == 2)
    return list(p.device_mesh.shape)


def main() -> None:
    rank, world = init()
    out, ckpt = sys.argv[1], sys.argv[2]
    only = set(sys.argv[3].split(",")) if len(sys.argv) > 3 and sys.argv[3] else None
    ref = reference(steps=4)
    report = Report(out)
    saved: dict = {}  # the dp2_tp2_fsdp run after its 2 checked steps: the checkpoint below saves it
    for name, (pd, tp_backend, *shard) in CASES.items():
        if only and name not in only:
            continue
        try:
            rt = DistributedRuntime(CFG, plan_from_dict(pd), tp_backend=tp_backend, seed=7, dp_shard=(shard or [None])[0])
            res = check_runtime(rt, ref, steps=2)
            if name == CKPT_SAVE:
                saved.update(rt=rt, opt=res["opt"], res={k: v for k, v in res.items() if k != "opt"})
            res.pop("opt")
            if name == "hsdp_plan_per_layer":  # layers 0-2 replicate x shard(2), layer 3 shards over all 4
                res["shard_mesh_dims"] = [shard_mesh_dims(rt, i) for i in range(4)]
                res["ok"] = res["ok"] and res["shard_mesh_dims"] == [[2, 2], [2, 2], [2, 2], [4]]
        except Exception as e:
            res = failure(f"case {name}", e)
        report.add(name, res["ok"], res)
        dist.barrier()
    from parity_2rank import LORA, check_lora_case, lora_reference

    lora_ref = None
    for name, pd in LORA_CASES.items():
        if only and name not in only:
            continue
        try:
            lora_ref = lora_ref or lora_reference(LORA)
            res = check_lora_case(name, pd, LORA, lora_ref, steps=2, tp_backend=LORA_BACKENDS.get(name, "dtensor"))
        except Exception as e:
            res = failure(f"case {name}", e)
        report.add(name, res["ok"], res)
        dist.barrier()
    bf16_ref = None
    for name, (pd, chunk, declared) in BF16_PP_CASES.items():
        if only and name not in only:
            continue
        try:
            bf16_ref = bf16_ref or bf16_reference(2)
            res = bf16_pp_case(pd, chunk, declared, bf16_ref)
        except Exception as e:
            res = failure(f"case {name}", e)
        report.add(name, res["ok"], res)
        dist.barrier()
    if not only or ZERO1_CKPT in only:
        zero1_reshard(report, ref, f"{ckpt}_zero1")
    if only and "ckpt" not in only:
        report.gather_and_write()
        dist.destroy_process_group()
        return
    # checkpoint: train 2 steps under dp2·tp2 (FSDP+TP), save, resume under pp2·dp2 for steps 2..3; the 2 steps are
    # those of the dp2_tp2_fsdp case above (same layout, seed and checks), trained again only if it did not run
    try:
        if saved:
            rt, opt, res = saved["rt"], saved["opt"], saved["res"]
        else:
            rt = DistributedRuntime(CFG, plan_from_dict(CASES[CKPT_SAVE][0]), seed=7)
            res = check_runtime(rt, ref, steps=2)
            opt = res.pop("opt")
        save_runtime(ckpt, rt, opt, meta={"step": 2})
        rt2 = DistributedRuntime(CFG, plan_from_dict(CASES["pp2_dp2"][0]), seed=123)  # different init: must be overwritten
        opt2 = rt2.build_optimizer(__import__("parity_lib").make_opt)
        meta = load_runtime(ckpt, rt2, opt2)
        res2 = check_runtime(rt2, ref[2:], steps=2, start=2, check_grads=False, opt=opt2)
        res2.pop("opt")
        res2["meta"] = meta
        ok = res["ok"] and res2["ok"] and meta.get("step") == 2
        report.add("ckpt_dp2tp2_to_pp2dp2", ok, {"save": res, "resume": res2})
    except Exception as e:
        report.add("ckpt_dp2tp2_to_pp2dp2", False, failure("ckpt_dp2tp2_to_pp2dp2", e))
    report.gather_and_write()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_worker(main)
