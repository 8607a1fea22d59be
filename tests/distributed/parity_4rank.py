"""Four-rank parity checks (one torchrun launch): 2-D/3-D layouts, a checkpoint written under dp2·tp2 resumed under
pp2·dp2 (the same loss trajectory as the one-process run), and per ZeRO level pp2·dp2 <-> dp4 resumes with the state
equal bit for bit (``layout_resumes``), LoRA ZeRO-1 too (``lora_zero1_resume``)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from parity_lib import (CFG, MAX_NORM, RTOL, SEED, Report, check_runtime, count_chunk_forwards, failure, full_state,
                        init, make_opt, plan, reference, rel, run_worker, shard, stage_casts, state_diff, uniform)

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
ZEROS = (0, 1, 2, 3)
# a checkpoint written under pp2 x dp2 resumes under dp4 (no pp), and one written under dp4 under pp2 x dp2, for each
# ZeRO level (ZeRO-0: DDP / the manual all-reduce under pp; 1: ZeroRedundancyOptimizer; 2/3: FSDP2)
LAYOUT_CKPT = [name for z in ZEROS for name in (f"ckpt_pp2dp2_to_dp4_zero{z}", f"ckpt_dp4_to_pp2dp2_zero{z}")]
LORA_ZERO1_CKPT = "lora_ckpt_dp4_zero1_to_pp2dp2_zero1"


def resumed(ckpt: str, build, ref: list[dict], start: int, saved: dict, **load) -> tuple:
    """Build ``build()`` (another seed than the saver's), load ``ckpt``, require its ``full_state`` to equal ``saved``
    (the saver's, bit for bit) and its next two steps to match ``ref[start:]``; returns (runtime, optimizer, result)."""
    rt = build()
    opt = rt.build_optimizer(__import__("parity_lib").make_opt)
    meta = load_runtime(ckpt, rt, opt, **{k: v(rt) for k, v in load.items()})
    diff = state_diff(saved, full_state(rt, opt))
    res = check_runtime(rt, ref[start:], steps=2, start=start, check_grads=False, opt=opt)
    res.pop("opt")
    res.update(step=meta.get("step"), state_keys=len(saved), state_diff=diff[:5])
    # the resume itself is exact (the state check); losses are held to RTOL against the one-process run, the grad norm
    # only reported: by steps 5-6 AdamW has grown fp32 summation-order noise in it to 1.5e-5 (ZeRO-0/1) and 2.3e-5
    # (ZeRO-2/3) -- the layouts', not the resume's: the state the resume reads equals the saver's bit for bit
    res["ok"] = (res["loss"] <= RTOL and res["eval"] <= RTOL and not diff and meta.get("step") == start
                 and bool(saved))
    return rt, opt, res


def layout_resumes(report: Report, ref6: list[dict], ckpt: str, only: set | None) -> None:
    """Per ZeRO level, one chain: pp2 x dp2 trains steps 1-2 and saves; dp4 loads it (state equal to the saver's, bit
    for bit), trains steps 3-4 (losses against the one-process run) and saves; pp2 x dp2 loads that and trains steps
    5-6. Each pp2 x dp2 checkpoint's full state is written beside it (``full_state.pt``) for the one-process resume."""
    for z in ZEROS:
        a, b = f"ckpt_pp2dp2_to_dp4_zero{z}", f"ckpt_dp4_to_pp2dp2_zero{z}"
        if only and a not in only and b not in only:
            continue
        pp, flat = plan(uniform(dp=2, zero=z), pipeline=PP2), plan(uniform(dp=4, zero=z))
        first, second = f"{ckpt}_pp_zero{z}", f"{ckpt}_dp4_zero{z}"
        try:
            rt = DistributedRuntime(CFG, plan_from_dict(pp), seed=7)
            res = check_runtime(rt, ref6, steps=2, check_grads=False)
            opt = res.pop("opt")
            save_runtime(first, rt, opt, meta={"step": 2})
            saved = full_state(rt, opt)
            if dist.get_rank() == 0:
                torch.save(saved, f"{first}/full_state.pt")
            rt.close()
            rt, opt, res2 = resumed(first, lambda: DistributedRuntime(CFG, plan_from_dict(flat), seed=123),
                                    ref6, 2, saved)
            report.add(a, res["ok"] and res2["ok"], {"save": res, "resume": res2})
            save_runtime(second, rt, opt, meta={"step": 4})
            saved = full_state(rt, opt)
            rt.close()
            rt, _, res3 = resumed(second, lambda: DistributedRuntime(CFG, plan_from_dict(pp), seed=99),
                                  ref6, 4, saved)
            rt.close()
            report.add(b, res3["ok"], {"resume": res3})
        except Exception as e:
            for name in (a, b):
                if name not in report.cases:
                    report.add(name, False, failure(name, e))
        dist.barrier()


def lora_zero1_resume(report: Report, ckpt: str) -> None:
    """LoRA under ZeRO-1, adapter-only: dp4 trains steps 1-2 and saves (each rank the AdamW states of the adapters it
    owns); pp2 x dp2 ZeRO-1 (its own partition per stage) loads them over the base it drew from the same seed
    (full state equal to the saver's, bit for bit) and trains steps 3-4 against the one-process LoRA run."""
    from parity_2rank import LORA, lora_reference, lora_scope

    from meshwright.config import LoraConfig

    try:
        ref = lora_reference(LORA)
        rt = DistributedRuntime(CFG, plan_from_dict(plan(uniform(dp=4, zero=1))), seed=7, lora=LoraConfig(**LORA))
        res = check_runtime(rt, ref, steps=2, check_grads=False)
        opt = res.pop("opt")
        scope = lora_scope(LORA, 7, rt)
        save_runtime(ckpt, rt, opt, meta={"step": 2}, adapters=scope)
        saved = full_state(rt, opt)  # the base too: the resumed run draws it from the same seed, bit for bit
        rt.close()
        pd = plan(uniform(dp=2, zero=1), pipeline=PP2)
        rt, _, res2 = resumed(ckpt,
                              lambda: DistributedRuntime(CFG, plan_from_dict(pd), seed=7, lora=LoraConfig(**LORA)),
                              ref, 2, saved, adapters=lambda r: lora_scope(LORA, 7, r))
        rt.close()
        report.add(LORA_ZERO1_CKPT, res["ok"] and res2["ok"], {"save": res, "resume": res2})
    except Exception as e:
        report.add(LORA_ZERO1_CKPT, False, failure(LORA_ZERO1_CKPT, e))
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
    layout_resumes(report, reference(steps=6), ckpt, only)
    if not only or LORA_ZERO1_CKPT in only:
        lora_zero1_resume(report, f"{ckpt}_lora_zero1")
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
