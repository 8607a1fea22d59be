"""DeepSpeed ZeRO-1/2/3 parity against the one-process run (2 ranks, one torchrun launch)."""

from __future__ import annotations

import math
import sys

import torch.distributed as dist

from parity_lib import CFG, MAX_NORM, RTOL, Report, failure, init, make_opt, reference, rel, run_worker, shard

from meshwright.parallel.deepspeed_backend import DeepSpeedRuntime
from meshwright.plan import plan_from_dict
from parity_2rank import plan, uniform

STEPS = 2  # ref must hold at least this many steps


def run_case(zero: int, ref: list[dict], ckpt_dir: str | None = None) -> dict:
    """Train STEPS steps against ``ref``; with ``ckpt_dir`` save, reload into a fresh engine
    (different init) and train 2 more steps against ``ref[STEPS:]``."""
    rt = DeepSpeedRuntime(CFG, plan_from_dict(plan(uniform(dp=2, zero=zero))), seed=7)
    opt = rt.build_optimizer(make_opt)
    res = _train(rt, opt, ref, 0, STEPS, check_grads=True)
    if ckpt_dir and res["ok"]:
        from meshwright.train.checkpoint import load_runtime, save_runtime

        save_runtime(f"{ckpt_dir}/ds{zero}", rt, opt, meta={"step": STEPS})
        rt2 = DeepSpeedRuntime(CFG, plan_from_dict(plan(uniform(dp=2, zero=zero))), seed=99)
        opt2 = rt2.build_optimizer(make_opt)
        load_runtime(f"{ckpt_dir}/ds{zero}", rt2, opt2)
        res2 = _train(rt2, opt2, ref, STEPS, 2, check_grads=False)
        res = {**res, "ok": res["ok"] and res2["ok"], "resume": res2}
    return res


def _train(rt, opt, ref: list[dict], start: int, steps: int, check_grads: bool) -> dict:
    worst = {"loss": 0.0, "grad": 0.0, "norm": 0.0}
    for step in range(start, start + steps):
        loss = rt.forward_backward(shard(step, rt.dp_rank, rt.dp_size))
        worst["loss"] = max(worst["loss"], rel(loss, ref[step]["loss"]))
        if check_grads and step == start:
            for name, g in rt.full_grads().items():
                worst["grad"] = max(worst["grad"], rel(g, ref[0]["grads"][name]))
        worst["norm"] = max(worst["norm"], rel(rt.clip_grad_norm_(MAX_NORM), ref[step]["norm"]))
        rt.optimizer_step(opt)
    ok = all(v <= RTOL and math.isfinite(v) for v in worst.values())
    return {"ok": ok, **worst}


def main() -> None:
    init()
    ref = reference(STEPS)
    report = Report(sys.argv[1])
    for zero in (1, 2, 3):
        try:
            res = run_case(zero, ref)
        except Exception as e:
            res = failure(f"deepspeed zero{zero}", e)
        report.add(f"deepspeed_zero{zero}", res["ok"], res)
        dist.barrier()
    report.gather_and_write()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_worker(main)
