"""DeepSpeed ZeRO-1/2/3 parity against the one-process run (2 ranks, one torchrun launch)."""

from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist

from parity_lib import CFG, MAX_NORM, RTOL, SEED, Report, failure, init, make_opt, reference, rel, run_worker, shard

from meshwright.launcher.planner.stack import STACKS, DeepSpeedSizes
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


def _held_bytes(roots: list, bucket_bytes: int) -> tuple[int, int]:
    """Bytes of the distinct storages reachable from ``roots`` through DeepSpeed/torch objects, containers and
    ``.grad``: (everything but the reduction buckets, the buckets: storages of ``bucket_bytes`` bytes, whatever
    view of them is met first). Meta tensors hold no memory (ZeRO-1/2 keeps one per parameter as a shape record,
    ``round_robin_bit16_meta``; all at data_ptr 0, they once counted as one parameter's bytes)."""
    import torch

    seen, storages, todo = set(), {}, list(roots)
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if torch.is_tensor(o):
            if o.is_meta:
                continue
            st = o.untyped_storage()
            storages.setdefault(st.data_ptr(), (st.nbytes(), st.nbytes() == bucket_bytes))
            if o.is_leaf and o.grad is not None:
                todo.append(o.grad)
        elif isinstance(o, dict):
            todo += [*o.keys(), *o.values()]
        elif isinstance(o, (list, tuple, set)):
            todo += list(o)
        elif (type(o).__module__ or "").startswith(("deepspeed", "torch.optim", "torch.nn", "meshwright")) \
                and hasattr(o, "__dict__"):
            todo += list(vars(o).values())
    return (sum(n for n, bucket in storages.values() if not bucket), sum(n for n, bucket in storages.values() if bucket))


def _zero3_held_bytes(ds_opt, module) -> tuple[int, int, int]:
    """What DeepSpeed's ZeRO-3 optimizer holds, walked by name: (its states: the bf16 parameter and gradient
    partitions, the fp32 master partition and Adam's m and v; its reduction buckets; the all-gathered parameters)."""
    states = [ds_opt.lp_param_buffer, ds_opt.grad_partitions_flat_buffer, *ds_opt.fp32_partitioned_groups_flat,
              *ds_opt.optimizer.state.values()]
    buckets = [b.buffer for b in ds_opt.ipg_buckets.values() if b.buffer is not None]
    gathered = {p.data.untyped_storage().data_ptr(): p.data.untyped_storage().nbytes()
                for p in module.parameters() if p.numel() > 0}
    return sum(_held_bytes(states, 0)), sum(_held_bytes(buckets, 0)), sum(gathered.values())


def state_bytes_case(stack: str, zero: int = 1, dtype: str = "bf16") -> dict:
    """What DeepSpeed holds at the backward peak of a steady step, in ``dtype`` with the config ``plan --emit deepspeed
    --stack STACK --dtype DTYPE`` writes (ZeRO-``zero``, overlap_comm, 2 micro-batches, dp=2), against the planner's
    ``stack`` training in ``dtype``: what
    the DeepSpeed optimizer holds (it owns the flat parameter, gradient and state buffers), as parameters, gradients
    and optimizer states (``model_state_bytes``) and reduction buckets (``Hardware.stack_buffers``); at ZeRO-3 also
    the all-gathered parameters (``zero3_transient_bytes``).

    ZeRO-3 runs ``ZERO3_SIZES`` (emitted the same way): a live-parameter budget under the tiny model's size, so the
    budget binds as on a real model, and no persistent parameters (at DeepSpeed's threshold every tiny parameter
    would stay whole)."""
    import dataclasses

    import deepspeed
    import deepspeed.ops

    from meshwright.config.presets import load_cluster
    from meshwright.launcher.planner import cost_model as cm
    from meshwright.launcher.planner.export.deepspeed import deepspeed_config
    from meshwright.models import build_model, lm_loss

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # gloo, as DeepSpeedRuntime does on CPU
    st = STACKS[stack] if zero < 3 else dataclasses.replace(STACKS[stack], deepspeed=ZERO3_SIZES)
    p = plan_from_dict(plan(uniform(dp=2, zero=zero)))
    conf, _ = deepspeed_config(p, CFG, stack=st, dtype=dtype)
    conf["zero_allow_untested_optimizer"] = True
    model = build_model(CFG, seed=SEED)
    n = sum(t.numel() for t in model.parameters())
    engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=make_opt(model.parameters()), config=conf,
                                                dist_init_required=False)
    hw = cm.apply_stack(cm.hardware_from_cluster(load_cluster("dgx-a100-80g"), stack=stack, dtype=dtype), st)
    bucket_bytes = st.deepspeed.reduce_bucket_size * hw.elem_bytes
    peak = [0, 0, 0]

    def at_backward(*_: object) -> None:
        got = _zero3_held_bytes(ds_opt, engine.module) if zero == 3 else (*_held_bytes([ds_opt], bucket_bytes), 0)
        if sum(got) > sum(peak):
            peak[:] = got

    for m in engine.module.modules():
        m.register_full_backward_hook(at_backward)
    for step in range(2):  # the second step is steady: optimizer states exist, the first step's are counted
        if step == 1:
            peak[:] = [0, 0, 0]
        for x, y in shard(step, dist.get_rank(), dist.get_world_size()):
            engine.backward(lm_loss(engine(x), y))
            engine.step()
    predicted = sum(cm.model_state_bytes(n, 2, zero, "fp32", hw).values())
    buckets = hw.stack_buffers[zero]
    states_err = peak[0] / predicted - 1
    buckets_err = (peak[1] - buckets) / max(buckets, 1.0)
    # the states within 3% (alignment padding, RoPE tables); the buckets exactly
    ok = type(ds_opt).__name__ == EXPECTED_OPTIMIZER[stack, zero, dtype] and abs(states_err) <= 0.03 and buckets_err == 0
    res = {"optimizer": type(ds_opt).__name__, "params": n, "measured_bytes_per_param": round(peak[0] / n, 3),
           "predicted_bytes_per_param": round(predicted / n, 3), "measured_bucket_bytes": peak[1],
           "predicted_bucket_bytes": buckets}
    if zero == 3:  # the gathered parameters: the budget, less the layer's unsharded gradient (autograd holds it)
        layer = CFG.layer_params(0)
        gathered = float(cm.zero3_transient_bytes(CFG, 0, layer, hw, {})) - layer * hw.policy.gather_bytes
        # DeepSpeed fills the budget and overshoots it by part of the module in use: within 10% on this model
        ok = ok and 0 <= peak[2] / gathered - 1 <= 0.10
        res.update({"measured_gathered_bytes": peak[2], "predicted_gathered_bytes": gathered})
    return {"ok": ok, **res}


def pipeline_state_bytes_case() -> dict:
    """bf16 ZeRO-0 under DeepSpeed's pipeline engine, with the config ``plan --emit deepspeed`` writes for pp=2 (the 2
    ranks: dp=1): DeepSpeed builds BF16_Optimizer with bf16 accumulation. What it holds at the backward peak of a
    steady step on each stage against the planner's count of that stage's parameters (``Hardware.policy_at``: the
    stack's ``pipeline_zero0_precision``), within 3% as the other cases."""
    import deepspeed
    import deepspeed.ops
    from deepspeed.pipe import PipelineModule

    from meshwright.config.presets import load_cluster
    from meshwright.launcher.planner import cost_model as cm
    from meshwright.launcher.planner.export.deepspeed import deepspeed_config
    from meshwright.models import build_model, lm_loss

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    p = plan_from_dict(plan(uniform(), pipeline={"degree": 2, "schedule": "1f1b", "microbatches": 4}))
    conf, _ = deepspeed_config(p, CFG, stack=STACKS["deepspeed"])
    model = build_model(CFG, seed=SEED)
    layers = [_Embed(model), *[_Block(model, b) for b in model.layers.values()], _Head(model)]
    module = PipelineModule(layers, num_stages=2, loss_fn=lm_loss, partition_method="uniform")
    engine, ds_opt, _, _ = deepspeed.initialize(model=module, optimizer=make_opt(module.parameters()), config=conf,
                                                dist_init_required=False)
    n = sum(t.numel() for t in engine.module.parameters())  # this stage's
    peak = [0]

    def at_backward(*_: object) -> None:
        peak[0] = max(peak[0], _held_bytes([ds_opt], 0)[0])

    for m in engine.module.modules():
        m.register_full_backward_hook(at_backward)
    for step in range(2):  # the second step is steady
        peak[0] = 0
        engine.train_batch(iter(shard(step, 0, 1)))
    hw = cm.for_pipeline(cm.hardware_from_cluster(load_cluster("dgx-a100-80g"), stack="deepspeed", dtype="bf16"), 2)
    predicted = sum(cm.model_state_bytes(n, 1, 0, "fp32", hw).values())
    ok = type(ds_opt).__name__ == "BF16_Optimizer" and abs(peak[0] / predicted - 1) <= 0.03
    return {"ok": ok, "optimizer": type(ds_opt).__name__, "params": n, "measured_bytes_per_param": round(peak[0] / n, 3),
            "predicted_bytes_per_param": round(predicted / n, 3)}


class _Embed(torch.nn.Module):
    """The tiny model's embedding as the first pipeline layer."""

    def __init__(self, model) -> None:
        super().__init__()
        self.tok = model.tok_embeddings

    def forward(self, x):
        return self.tok(x)


class _Block(torch.nn.Module):
    """One block as a pipeline layer, with its own copy of the RoPE tables (buffers, not parameters)."""

    def __init__(self, model, block) -> None:
        super().__init__()
        self.block = block
        self.register_buffer("cos", model.rope_cos.clone(), persistent=False)
        self.register_buffer("sin", model.rope_sin.clone(), persistent=False)

    def forward(self, h):
        return self.block(h, (self.cos[:h.shape[1]], self.sin[:h.shape[1]]))


class _Head(torch.nn.Module):
    """The final norm and output projection as the last pipeline layer."""

    def __init__(self, model) -> None:
        super().__init__()
        self.norm, self.out = model.norm, model.output

    def forward(self, h):
        return self.out(self.norm(h))


# (stack, ZeRO level, dtype) held to the planner, with the optimizer the emitted config must make DeepSpeed build
# (ZeRO-0 in bf16 without a pipeline: its fp16 optimizer in bf16; BF16_Optimizer only with grad_accum_dtype fp32 at
# ZeRO-1; ZeRO-0 in fp32: the torch optimizer itself, no wrapper). fp32 at ZeRO-1/2 holds the ZeRO optimizer's fp32
# master partition (4/dp B per parameter), which fp32 at ZeRO-0/3 does not
EXPECTED_OPTIMIZER = {("deepspeed", 0, "bf16"): "FP16_UnfusedOptimizer", ("deepspeed", 1, "bf16"): "DeepSpeedZeroOptimizer",
                      ("deepspeed", 2, "bf16"): "DeepSpeedZeroOptimizer",
                      ("deepspeed", 3, "bf16"): "DeepSpeedZeroOptimizer_Stage3",
                      ("deepspeed-fp32-accum", 1, "bf16"): "BF16_Optimizer",
                      ("deepspeed", 0, "fp32"): "AdamW", ("deepspeed", 1, "fp32"): "DeepSpeedZeroOptimizer",
                      ("deepspeed", 2, "fp32"): "DeepSpeedZeroOptimizer",
                      ("deepspeed", 3, "fp32"): "DeepSpeedZeroOptimizer_Stage3"}
STATE_BYTES_CASES = tuple(EXPECTED_OPTIMIZER)
# a bucket holds the largest parameter (16384 elements); a live budget of 100000 of the model's 180800 parameters
ZERO3_SIZES = DeepSpeedSizes(reduce_bucket_size=100_000, stage3_prefetch_bucket_size=20_000,
                             stage3_max_live_parameters=100_000, stage3_max_reuse_distance=100_000,
                             stage3_param_persistence_threshold=0)


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


def run_all(report: Report, ref: list[dict], ckpt_dir: str | None = None) -> None:
    """Every DeepSpeed case into ``report``: ZeRO-1/2/3 parity (and resume with ``ckpt_dir``), then the planner's
    DeepSpeed memory against what DeepSpeed holds (``STATE_BYTES_CASES``); a failing case does not stop the others."""
    cases = [(f"deepspeed_zero{z}", lambda z=z: run_case(z, ref, ckpt_dir=ckpt_dir)) for z in (1, 2, 3)]
    cases += [(f"{st}{'' if dt == 'bf16' else '_' + dt}_zero{z}_state_bytes", lambda st=st, z=z, dt=dt: state_bytes_case(st, z, dt))
              for st, z, dt in STATE_BYTES_CASES]
    cases.append(("deepspeed_pp2_zero0_state_bytes", pipeline_state_bytes_case))
    for name, case in cases:
        try:
            res = case()
        except Exception as e:
            res = failure(name, e)
        report.add(name, res["ok"], res)
        dist.barrier()


def main() -> None:
    init()
    report = Report(sys.argv[1])
    run_all(report, reference(STEPS))
    report.gather_and_write()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_worker(main)
