"""What meshwright's own ZeRO-0/1/2/3 hold per rank at the backward peak of a steady step, against the planner.

One torchrun launch (2 or 4 ranks, gloo, dp = world): for fp32 and bf16 (FSDP2 ``MixedPrecisionPolicy(bf16, fp32)``
plus autocast) and ZeRO-1/2/3 (embeddings and head at the same stage, so every parameter is costed alike), a walk
over the storages the runtime keeps (deterministic, as parity_deepspeed.py ``state_bytes_case`` does for DeepSpeed):
the parameters (an FSDP2 module's fp32 shard and, where they exist, its all-gather outputs: the gathered weights),
their gradients (the sharded ``.grad`` FSDP2 accumulates into; an unsharded parameter's own ``.grad`` is the one
layer's transient before its reduce-scatter, counted apart) and the optimizer's states. Planned: ``model_state_bytes``
plus the gathered weights an FSDP2 layer keeps from forward to backward (``cost_model.gathered_weight_bytes``).
DDP's reduction buckets (ZeRO-0 runs DDP, ZeRO-1 DDP + ZeroRedundancyOptimizer) live in its C++ reducer: with
``gradient_as_bucket_view`` (meshwright's apply_ddp) the ``.grad`` tensors are views of them and the walk meets them
there, one storage per bucket; without it they are a second copy out of the walk's reach, read from DDP's own logging
data and added to the measured bytes (+4 B/param in fp32 before stop 33).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from parity_lib import CFG, Report, failure, init, make_opt, plan, shard, uniform
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import ProfilerActivity, profile, record_function

from meshwright.config.presets import load_cluster
from meshwright.launcher.planner import cost_model as cm
from meshwright.parallel.runtime import DistributedRuntime
from meshwright.plan import plan_from_dict
from meshwright.train.precision import PrecisionPolicy


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Storages:
    """Distinct storages by kind (the first kind a storage is met as wins), freed ones (size 0) left out."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[str, int]] = {}

    def add(self, kind: str, t: torch.Tensor | None) -> None:
        if t is None or not torch.is_tensor(t):
            return
        t = _local(t)
        if t.is_meta:
            return
        st = t.untyped_storage()
        if st.nbytes() > 0:
            self.seen.setdefault(st.data_ptr(), (kind, st.nbytes()))

    def bytes(self, kind: str) -> int:
        return sum(n for k, n in self.seen.values() if k == kind)


def fsdp_params(rt) -> list:
    """The FSDPParam records of every FSDP2 module of the runtime."""
    out = []
    for mod in rt.model.modules():
        get = getattr(mod, "_get_fsdp_state", None)
        group = get()._fsdp_param_group if get is not None else None
        if group is not None:
            out += group.fsdp_params
    return out


def held(rt, opt) -> dict[str, int]:
    """Bytes this rank holds now: params (stored: replicated or fp32 shard), gathered (all-gather outputs), grads
    (kept gradients), optimizer (states), transient (an unsharded parameter's ``.grad`` before its reduce-scatter)."""
    s = Storages()
    fps = fsdp_params(rt)
    for fp in fps:  # FSDP2: shard, its kept gradient, the gathered weights and their transient gradient
        s.add("params", fp._sharded_param_data)
        s.add("grads", fp.sharded_param.grad)
        for t in getattr(fp, "all_gather_outputs", None) or []:
            s.add("gathered", t)
        unsharded = getattr(fp, "_unsharded_param", None)
        if unsharded is not None:
            s.add("gathered", unsharded)
            s.add("transient", unsharded.grad)
    grads, own = set(), {}
    for p in rt.parameters():  # replicated parameters (DDP / ZeRO-1)
        s.add("params", p)
        s.add("grads", p.grad)
        if p.grad is not None and not isinstance(p.grad, DTensor):
            grads.add(p.grad.untyped_storage().data_ptr())
            if not p.grad._is_view():  # a gradient of its own, not a view of DDP's bucket
                own[p.grad.untyped_storage().data_ptr()] = p.grad.untyped_storage().nbytes()
    inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer keeps its rank's states in .optim
    for st in inner.state.values():
        for v in st.values():
            s.add("optimizer", v)
    return {**{k: s.bytes(k) for k in ("params", "gathered", "grads", "optimizer", "transient")},
            "grad_storages": len(grads), "own_grads": sum(own.values())}


def model_state_total(got: dict, ddp_bytes: int) -> int:
    """The model-state bytes held now: under DDP its buckets (whatever the gradients met are) plus any gradient of
    its own beside them (``own_grads``), elsewhere the walk's gradients."""
    grads = ddp_bytes + got["own_grads"] if ddp_bytes else got["grads"]
    return got["params"] + got["gathered"] + got["optimizer"] + grads


def ddp_buckets(rt) -> dict:
    """DDP's gradient buckets from its logging data: whether ``.grad`` are views of them, and their sizes (bytes)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    views, sizes = [], []
    for mod in rt.modules:
        if isinstance(mod, DDP):
            data = mod._get_ddp_logging_data()
            views.append(bool(data.get("gradient_as_bucket_view", 0)))
            sizes += [int(x) for x in str(data.get("bucket_sizes", "")).split(",") if x.strip()]
    return {"ddp": bool(views), "as_view": bool(views) and all(views), "sizes": sizes}


class LiveBytes:
    """CPU bytes allocated and not freed over a run, from the profiler's allocation records (the whole run under
    the profiler: a block allocated before it started would be freed unrecorded). ``rise(name, step)``: the most
    that record_function regions ``name`` inside step ``step``'s region hold above what was live at their start."""

    def __init__(self) -> None:
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def __enter__(self) -> "LiveBytes":
        self.prof.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.prof.__exit__(*exc)
        events = list(self.prof.profiler.kineto_results.events())
        self.curve = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        self.regions = [(e.name(), e.start_ns(), e.end_ns()) for e in events if e.name().startswith("probe_")]

    def _rise(self, lo: int, hi: int) -> int:
        level, start, peak = 0, None, 0
        for t, nb in self.curve:
            if t > hi:
                break
            if t >= lo and start is None:
                start = peak = level
            level += nb
            if start is not None:
                peak = max(peak, level)
        return 0 if start is None else peak - start

    def rise(self, name: str, step: int) -> int:
        spans = [(a, b) for n, a, b in self.regions if n == f"probe_step{step}"]
        return max([self._rise(a, b) for n, a, b in self.regions if n == name
                    for lo, hi in spans if lo <= a <= hi] or [0])


def label_regions(rt) -> None:
    """Regions for ``LiveBytes``: DDP's pre-forward (where DDP itself would rebuild its buckets at step 2) and the
    runtime's gradient reduction after the last backward (``_finish_grads``: the manual all-reduce)."""
    for mod in rt.modules:
        if isinstance(mod, DDP):
            pre = mod._pre_forward

            def labelled(*a, _pre=pre, **k):
                with record_function("probe_pre_forward"):
                    return _pre(*a, **k)
            mod._pre_forward = labelled
    finish = rt._finish_grads

    def finish_labelled() -> None:
        with record_function("probe_finish"):
            finish()
    rt._finish_grads = finish_labelled


def microbatches(rt, step: int) -> list:
    """Two microbatches at any dp: the second's backward sees every gradient."""
    rows = [t for x, y in shard(step, rt.dp_rank, rt.dp_size) for t in zip(x.split(1), y.split(1))]
    half = len(rows) // 2
    return [tuple(torch.cat(c) for c in zip(*part)) for part in (rows[:half], rows[half:])]


def state_case(dtype: str, zero: int) -> dict:
    with LiveBytes() as live:
        res, rt = _state_steps(dtype, zero)
    n = res["params"]
    # DDP's one bucket rebuild: held at step 2's forward beside the old buckets (+4 B/param before stop 35); now
    # done in DistributedRuntime.zero_grad after step 1 without the old buckets (data_parallel.rebuild_buckets)
    res["pre_forward_rise_bytes_per_param"] = [round(live.rise("probe_pre_forward", k) / n, 4) for k in range(3)]
    res["finish_rise_bytes_per_param"] = [round(live.rise("probe_finish", k) / n, 4) for k in range(3)]
    if res["ddp"]:
        res["ok"] = res["ok"] and max(res["pre_forward_rise_bytes_per_param"]) <= 0.1
    return res


def _state_steps(dtype: str, zero: int) -> tuple[dict, object]:
    """``state_case``'s run and storage walk (under the caller's profiler)."""
    world = dist.get_world_size()
    p = plan_from_dict(plan(uniform(dp=world, zero=zero), embedding={"zero": zero}))
    rt = DistributedRuntime(CFG, p, seed=7, precision=PrecisionPolicy.from_dtype(dtype))
    opt = rt.build_optimizer(make_opt)
    label_regions(rt)
    n = sum(CFG.layer_params(i) for i in range(CFG.n_layers)) + cm.embedding_param_count(CFG, True, True, 1)
    peak: dict[str, int] = {}

    def at_backward(*_: object) -> None:
        got = held(rt, opt)
        if got["params"] + got["gathered"] + got["grads"] + got["optimizer"] > sum(
                peak.get(k, 0) for k in ("params", "gathered", "grads", "optimizer")):
            peak.clear()
            peak.update(got)
        peak["max_transient"] = max(peak.get("max_transient", 0), got["transient"])

    # the first step against the second (steady): model states held at every backward hook and after the optimizer
    # step (its states created while the gradients exist), and gradients of their own beside DDP's buckets (a first
    # no_sync microbatch allocated them before stop 34: +4 B/param in step 1; apply_ddp now hands DDP zeroed gradients,
    # which its reducer turns into bucket views at construction)
    ddp_bytes = sum(ddp_buckets(rt)["sizes"])
    step_peak, own_peak = [0, 0, 0], [0, 0, 0]

    def note(step: int) -> None:
        got = held(rt, opt)
        step_peak[step] = max(step_peak[step], model_state_total(got, ddp_bytes))
        own_peak[step] = max(own_peak[step], got["own_grads"] if ddp_bytes else 0)

    hooks = [m.register_full_backward_hook(at_backward) for m in rt.model.modules() if not list(m.children())]
    for step in range(3):  # steps 2 and 3 are steady (the optimizer's states exist); DDP rebuilt after step 1
        if step == 1:
            peak.clear()
        micro = microbatches(rt, step)
        step_hooks = [m.register_full_backward_hook(lambda *_, k=step: note(k)) for m in rt.model.modules()
                      if not list(m.children())]
        with record_function(f"probe_step{step}"):
            rt.forward_backward(micro)
            rt.optimizer_step(opt)
        note(step)
        for h in step_hooks:
            h.remove()
    for h in hooks:
        h.remove()
    buckets = ddp_buckets(rt)
    # a copy apart from the gradients where they are not views of the buckets
    copy = sum(buckets["sizes"]) if buckets["ddp"] and not buckets["as_view"] else 0
    hw = cm.apply_stack(cm.hardware_from_cluster(load_cluster("dgx-a100-80g"), stack="meshwright", dtype=dtype),
                        "meshwright")
    planned = sum(cm.model_state_bytes(n, world, zero, "fp32", hw).values()) + n * cm.gathered_weight_bytes(zero, hw)
    # ZeRO-3's gathered weights are one layer's at a time (zero3_transient_bytes, per layer): apart from the states
    measured = peak["params"] + peak["grads"] + peak["optimizer"] + (peak["gathered"] if zero < 3 else 0) + copy
    err = measured / planned - 1
    # within 0.2%: FSDP2 pads each shard to a multiple of dp along dim 0; AdamW's step counters
    ok = abs(err) <= 0.002
    res = {"params": n, "dp": world, "measured_bytes_per_param": round(measured / n, 4),
           "planned_bytes_per_param": round(planned / n, 4),
           "measured": {k: peak.get(k, 0) for k in ("params", "gathered", "grads", "optimizer", "max_transient")},
           "ddp": buckets["ddp"], "ddp_bucket_view": buckets["as_view"], "ddp_bucket_bytes": sum(buckets["sizes"]),
           "ddp_buckets": len(buckets["sizes"]), "ddp_bucket_copy_bytes": copy,
           "grad_storages_at_peak": peak.get("grad_storages", 0),
           "step_state_bytes_per_param": [round(x / n, 4) for x in step_peak],
           "step_own_grad_bytes_per_param": [round(x / n, 4) for x in own_peak]}
    # no step holds more model states than a steady one (within the pads and step counters)
    ok = ok and max(step_peak) <= step_peak[1] * 1.002 and own_peak == [0, 0, 0]
    if buckets["ddp"] and buckets["as_view"]:  # the gradients at the peak are the buckets themselves, not a copy
        ok = ok and peak["grads"] == sum(buckets["sizes"]) and peak["grad_storages"] <= len(buckets["sizes"])
    if zero == 3:  # at most the largest layer gathered at once, in gather_bytes
        layer = max(CFG.layer_params(i) for i in range(CFG.n_layers)) * hw.policy.gather_bytes
        ok = ok and 0 < peak["gathered"] <= layer
        res["largest_layer_gathered_bytes"] = layer
    rt.close()
    return {"ok": ok, **res}, rt


def manual_case() -> dict:
    """A layer-wise plan (ZeRO-0 blocks beside ZeRO-2 ones, replicated ends): no DDP, the ZeRO-0 blocks and the ends
    reduced by ``all_reduce_grads`` after the last backward, which copies each group into one flat tensor. Measured:
    the most ``_finish_grads`` holds above what was live, per step; planned: the largest group's gradients
    (``cost_model.reduce_copy_bytes`` per block, the ends' in ``_ends_ops``)."""
    world = dist.get_world_size()
    layers = [{"dp": world, "zero": 0, "repeat": 2}, {"dp": world, "zero": 2, "repeat": 2}]
    p = plan_from_dict(plan(layers, embedding={"zero": 0}))
    with LiveBytes() as live:
        rt = DistributedRuntime(CFG, p, seed=7, precision=PrecisionPolicy.from_dtype("fp32"))
        opt = rt.build_optimizer(make_opt)
        label_regions(rt)
        for step in range(3):
            with record_function(f"probe_step{step}"):
                rt.forward_backward(microbatches(rt, step))
                rt.optimizer_step(opt)
        rt.close()
    n = sum(CFG.layer_params(i) for i in range(CFG.n_layers)) + cm.embedding_param_count(CFG, True, True, 1)
    hw = cm.for_reduction(cm.apply_stack(cm.hardware_from_cluster(load_cluster("dgx-a100-80g"), stack="meshwright",
                                                                  dtype="fp32"), "meshwright"), p)
    blocks = [cm.reduce_copy_bytes(CFG, i, s, hw) for i, s in enumerate(p.layer_strategies())]
    ends = cm.embedding_param_count(CFG, True, True, 1) * hw.policy.grad_bytes
    planned = max(blocks + [ends])
    measured = [live.rise("probe_finish", k) for k in range(3)]
    # steps 2 and 3 (step 1 also meets the optimizer's lazily built state on the way); within 1%: the reduction's
    # own small tensors
    ok = hw.manual_dp and all(abs(m / planned - 1) <= 0.01 for m in measured[1:])
    return {"ok": ok, "params": n, "planned_bytes": planned, "planned_blocks": blocks, "planned_ends": ends,
            "finish_rise_bytes": measured, "finish_rise_bytes_per_param": [round(m / n, 4) for m in measured]}


def main() -> None:
    init()
    report = Report(sys.argv[1] if len(sys.argv) > 1 else None)
    for dtype in ("fp32", "bf16"):
        for zero in (0, 1, 2, 3):
            name = f"{dtype}_zero{zero}"
            try:
                res = state_case(dtype, zero)
            except Exception as e:  # report, keep the other cases running
                res = failure(name, e)
            report.add(name, res["ok"], res)
            dist.barrier()
    try:
        res = manual_case()
    except Exception as e:
        res = failure("manual_reduce", e)
    report.add("manual_reduce", res["ok"], res)
    report.gather_and_write()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
