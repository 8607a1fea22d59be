"""MoE/expert parallelism and memory savers through DistributedRuntime: ONE torchrun launch, 4 ranks.

Reference: the one-process model with the same savers (``apply_plan_savers``, same seed), run as
``dp`` deep copies, copy r reading data shard r micro-batch by micro-batch, gradients averaged over
the copies. That is the exact objective of data parallelism (mean over shards of the per-micro-batch
loss, MoE aux loss included), and it makes the copies' WTA-CRS generators consume random numbers in
the same order as the ranks' (same seed, same shard, same calls), so sampled gradients are
comparable. Each case runs 2 optimizer steps: loss (LM only, as logged), full gradients of step 1,
global grad norm. Tolerance: relative L2 error <= 1e-5 (parity_lib.RTOL).

FP8 under tp: tensor parallelism changes the reduction order of the forward (~1e-7), which can flip
the rounding of single FP8-saved values, a jump of one FP8 step (1/16 relative) in that element's
backward. So fp8 cases with tp>1 use a gradient tolerance FP8_TP_GRAD_RTOL = 2e-3 (and must stay 20x
below the saver's own effect); loss and grad norm keep 1e-5.

compile (``compile_moe_*``): ep2 layouts with the collective-free parts of each ep block compiled (aot_eager) against
the same eager reference, tolerance COMPILE_RTOL, and pre-hooks showing every call of those parts ran compiled.

Guards against a no-op: for saver cases the reference WITHOUT savers must differ from the reference
with them (``saver_effect`` > 1e-4), so the check fails if the runtime dropped the saver.
"""

from __future__ import annotations

import copy
import math
import sys

import torch
import torch.distributed as dist

from parity_lib import CFG, MAX_NORM, RTOL, SEED, Report, failure, full_grads, init, make_opt, rel, run_worker, shard
from parity_2rank import plan

from meshwright.config import load_model_config
from meshwright.models import build_model, lm_loss
from meshwright.models.moe import moe_layers
from meshwright.parallel.runtime import DistributedRuntime, apply_plan_savers
from meshwright.plan import plan_from_dict

STEPS = 2
MOE = load_model_config({"name": "tiny-moe-par", "arch": "llama", "vocab_size": 256, "d_model": 32, "n_layers": 2,
                         "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "moe_ffn_hidden": 48, "n_experts": 4,
                         "top_k": 2, "capacity_factor": 1.25, "max_seq_len": 64, "aux_loss_coef": 0.1,
                         "z_loss_coef": 0.01})
FP8_TP_GRAD_RTOL = 2e-3
PP2 = {"degree": 2, "schedule": "1f1b", "microbatches": 2}


def moe_plan(layers: list[dict], pipeline: dict | None = None) -> dict:
    return {**plan(layers, pipeline=pipeline), "model": "tiny-moe-par"}


CASES = {
    # name: (model cfg, plan dict, compare against the saver-free reference too?)
    "moe_ep2_dp4": (MOE, moe_plan([{"dp": 4, "ep": 2, "repeat": 2}])),
    "moe_ep4_dp4": (MOE, moe_plan([{"dp": 4, "ep": 4, "repeat": 2}])),
    "moe_ep2_tp2": (MOE, moe_plan([{"tp": 2, "dp": 2, "ep": 2, "repeat": 2}])),
    "moe_ep2_pp2": (MOE, moe_plan([{"dp": 2, "ep": 2, "repeat": 2}], pipeline=PP2)),
    "moe_ep1_ddp_dp4": (MOE, moe_plan([{"dp": 4, "repeat": 2}])),
    "moe_ep2_dp4_fp8_wta": (MOE, moe_plan([{"dp": 4, "ep": 2, "savers": {"fp8_act": True}},
                                            {"dp": 4, "ep": 2, "savers": {"wta_crs": 0.5}}])),
    "fp8_dp4_fsdp_layers02": (CFG, plan([{"dp": 4, "zero": 3, "savers": {"fp8_act": True}}, {"dp": 4, "zero": 3},
                                         {"dp": 4, "zero": 3, "savers": {"fp8_act": True}}, {"dp": 4, "zero": 3}])),
    "fp8gemm_dp4_fsdp_layers02": (CFG, plan([{"dp": 4, "zero": 3, "savers": {"fp8_act": True, "fp8_gemm": True}},
                                             {"dp": 4, "zero": 3}, {"dp": 4, "zero": 3, "savers": {"fp8_act": True,
                                                                                                    "fp8_gemm": True}},
                                             {"dp": 4, "zero": 3}])),
    "fp8_layerwise_dp4_tp2": (CFG, plan([{"dp": 4, "savers": {"fp8_act": True}}, {"tp": 2, "dp": 2},
                                         {"dp": 4, "savers": {"fp8_act": True}}, {"tp": 2, "dp": 2}])),
    "fp8_dp2_tp2": (CFG, plan([{"tp": 2, "dp": 2, "savers": {"fp8_act": True}, "repeat": 4}])),
    "fp8_dp2_tp2_sp": (CFG, plan([{"tp": 2, "dp": 2, "sp": True, "savers": {"fp8_act": True}, "repeat": 4}])),
    "wta_dp4_ddp": (CFG, plan([{"dp": 4, "savers": {"wta_crs": 0.5}, "repeat": 4}])),
    "wta_dp2_tp2": (CFG, plan([{"tp": 2, "dp": 2, "savers": {"wta_crs": 0.5}, "repeat": 4}])),
    "wta_keep1_dp4_equals_exact": (CFG, plan([{"dp": 4, "savers": {"wta_crs": 1.0}, "repeat": 4}])),
}


# compile: true with ep>1 (train/compile.py compile_expert_parallel_block): the attention, both norms and the local
# experts' SwiGLU compiled (aot_eager: dynamo + AOTAutograd, no per-rank C++ build), routing and the all-to-alls eager;
# against the same eager one-process reference, loss / gradients / grad norm within COMPILE_RTOL over STEPS steps
# (fp32; measured on CPU: losses <= 2.2e-8, gradients <= 3.2e-7, norms <= 7.9e-8 relative)
COMPILE_RTOL = 1e-5
COMPILE_CASES = {
    "compile_moe_ep2_dp4": (MOE, moe_plan([{"dp": 4, "ep": 2, "repeat": 2}])),
    "compile_moe_ep2_tp2_recompute": (MOE, moe_plan([{"tp": 2, "dp": 2, "ep": 2, "recompute": "full", "repeat": 2}])),
    "compile_moe_ep2_pp2_selective": (MOE, moe_plan([{"dp": 2, "ep": 2, "recompute": "selective", "repeat": 2}],
                                                    pipeline=PP2)),
}


class CompiledCalls:
    """Forward pre-hooks on the compiled parts of every ep>1 block: calls made while dynamo traced them (inside a
    compiled graph) and eager ones. A tensor bumped in place: a Python counter read while tracing becomes a guard."""

    def __init__(self, rt) -> None:
        self.calls = torch.zeros(2, dtype=torch.int64)
        self.parts = [part for c in rt.chunks for name, b in c.layers.items() if rt.strategies[int(name)].ep > 1
                      for part in (b.attention_norm, b.attention, b.ffn_norm, b.feed_forward.experts.mlp)]
        self.handles = [m.register_forward_pre_hook(self._pre) for m in self.parts]

    def _pre(self, mod, args) -> None:
        if torch.compiler.is_compiling():
            self.calls[0] += 1
        else:
            self.calls[1] += 1

    def close(self) -> dict:
        for h in self.handles:
            h.remove()
        compiled, eager = self.calls.tolist()
        return {"parts": len(self.parts), "calls_compiled": compiled, "calls_eager": eager}


def reference(cfg, p, dp: int, savers: bool = True, steps: int = STEPS) -> list[dict]:
    """dp copies of the one-process model (with the plan's savers), copy r on shard r; 2 AdamW steps."""
    base = build_model(cfg, seed=SEED)
    if savers:
        apply_plan_savers(base, p, SEED)
    copies = [copy.deepcopy(base) for _ in range(dp)]
    m0 = copies[0]
    opt = make_opt([{"params": [q for q in m0.parameters() if q.dim() >= 2]},
                    {"params": [q for q in m0.parameters() if q.dim() < 2], "weight_decay": 0.0}])
    out = []
    for step in range(steps):
        lm_total = 0.0
        for r, model in enumerate(copies):
            micro = shard(step, r, dp)
            for x, y in micro:
                loss = lm_loss(model(x), y)
                aux = model.aux_loss()
                ((loss if aux is None else loss + aux) / (len(micro) * dp)).backward()
                lm_total += float(loss.detach()) / (len(micro) * dp)
        names = [n for n, _ in m0.named_parameters()]
        grads = {}
        for n, q in zip(names, m0.parameters()):
            gs = [dict(c.named_parameters())[n].grad for c in copies]
            grads[n] = sum(g for g in gs if g is not None)
            q.grad = grads[n].clone()
        for c in copies[1:]:
            c.zero_grad(set_to_none=True)
        norm = float(torch.nn.utils.clip_grad_norm_(m0.parameters(), MAX_NORM))
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for c in copies[1:]:
                for a, b in zip(c.parameters(), m0.parameters()):
                    a.copy_(b)
        router: dict[str, list[int]] = {}  # tokens per expert of each copy's last forward, summed over copies
        for c in copies:
            for lname, mod in moe_layers(c).items():
                cur = mod.last_stats["tokens_per_expert"].tolist()
                router[lname] = [a + b for a, b in zip(router.get(lname, [0] * len(cur)), cur)]
        out.append({"loss": lm_total, "grads": {k: v.detach().clone() for k, v in grads.items()}, "norm": norm,
                    "router": router})
    return out


def expert_slice(rt, name: str, g: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """An ep-sharded expert gradient covers experts [first, first + n_local) of the reference."""
    if g.shape == ref.shape:
        return ref
    mod = rt.model.get_submodule(name.rsplit(".", 1)[0])
    return ref[mod.first_expert:mod.first_expert + mod.n_local]


def run_case(name: str, cfg, pd: dict, compile_backend: str | None = None) -> dict:
    p = plan_from_dict(pd)
    dp = max(s.dp for s in p.layer_strategies())
    ref = reference(cfg, p, dp)
    if compile_backend is not None:
        torch._dynamo.reset()  # fresh recompile budget: past dynamo's limit it would fall back to eager silently
    rt = DistributedRuntime(cfg, p, seed=SEED, compile_backend=compile_backend)
    probe = CompiledCalls(rt) if compile_backend is not None else None
    opt = rt.build_optimizer(make_opt)
    worst = {"loss": 0.0, "grad": 0.0, "norm": 0.0}
    worst_name, n_expert, stats = "", 0, {}
    for step in range(STEPS):
        loss = rt.forward_backward(shard(step, rt.dp_rank, rt.dp_size))
        worst["loss"] = max(worst["loss"], rel(loss, ref[step]["loss"]))
        if step == 0:
            stats = rt.extra_log_fields()
            for pname, g in full_grads(rt).items():
                r = expert_slice(rt, pname, g, ref[0]["grads"][pname])
                n_expert += r is not ref[0]["grads"][pname]
                e = rel(g, r)
                if e > worst["grad"]:
                    worst["grad"], worst_name = e, pname
        norm = rt.clip_grad_norm_(MAX_NORM)
        worst["norm"] = max(worst["norm"], rel(norm, ref[step]["norm"]))
        rt.optimizer_step(opt)
    fp8_tp = any(s.savers.fp8_act and s.tp > 1 for s in p.layer_strategies())
    tol = {"loss": RTOL, "norm": RTOL, "grad": FP8_TP_GRAD_RTOL if fp8_tp else RTOL}
    if compile_backend is not None:
        tol = dict.fromkeys(tol, COMPILE_RTOL)
    ok = all(v <= tol[k] and math.isfinite(v) for k, v in worst.items())
    res = {**worst, "worst_grad_param": worst_name, "n_expert_shards": n_expert, "saver_layers": rt.saver_layers}
    if probe is not None:  # every call of every compiled part ran inside a compiled graph
        res["compiled"] = probe.close()
        ok = ok and res["compiled"]["parts"] > 0 and res["compiled"]["calls_compiled"] > 0 \
            and res["compiled"]["calls_eager"] == 0
    if cfg.n_experts:
        layers = stats.get("moe_layers", {})
        tokens = sum(sum(v["tokens_per_expert"]) for v in layers.values())
        res["router_layers"] = sorted(layers)
        res["router_tokens"] = tokens
        res["a2a_bytes"] = stats.get("moe_a2a_bytes")
        res["router_equal"] = {k: v["tokens_per_expert"] for k, v in layers.items()} == ref[0]["router"]
        ok = ok and len(layers) == cfg.n_moe_layers and res["router_equal"]
        if any(s.ep > 1 for s in p.layer_strategies()):
            ok = ok and n_expert > 0 and stats.get("moe_a2a_bytes", 0) > 0
    if any(s.savers.fp8_act or s.savers.wta_crs not in (None, 1.0) for s in p.layer_strategies()):
        plain = reference(cfg, p, dp, savers=False)
        res["saver_effect"] = max(rel(plain[0]["grads"][k], ref[0]["grads"][k]) for k in plain[0]["grads"])
        ok = ok and res["saver_effect"] > max(1e-4, 20 * worst["grad"])
    if name == "wta_keep1_dp4_equals_exact":  # keep_ratio 1 keeps every row: the exact gradient
        plain = reference(cfg, p, dp, savers=False)
        res["vs_exact"] = max(rel(ref[0]["grads"][k], plain[0]["grads"][k]) for k in plain[0]["grads"])
        ok = ok and res["vs_exact"] <= RTOL
    return {"ok": ok, **res}


CKPT_CASES = {  # save after step 1 under the first plan, resume under the second, steps 2-3 vs the reference
    "ckpt_moe_ep2_to_ep4": (moe_plan([{"dp": 4, "ep": 2, "repeat": 2}]), moe_plan([{"dp": 4, "ep": 4, "repeat": 2}])),
    "ckpt_moe_ep2_to_fsdp_ep1": (moe_plan([{"dp": 4, "ep": 2, "repeat": 2}]),
                                 moe_plan([{"dp": 4, "zero": 3, "repeat": 2}])),
}


def run_ckpt_case(pd_save: dict, pd_load: dict, path: str) -> dict:
    from meshwright.train.checkpoint import load_runtime, save_runtime

    ref = reference(MOE, plan_from_dict(pd_save), 4, steps=3)
    rt = DistributedRuntime(MOE, plan_from_dict(pd_save), seed=SEED)
    opt = rt.build_optimizer(make_opt)
    rt.forward_backward(shard(0, rt.dp_rank, rt.dp_size))
    rt.clip_grad_norm_(MAX_NORM)
    rt.optimizer_step(opt)
    save_runtime(path, rt, opt, meta={"step": 1})
    rt2 = DistributedRuntime(MOE, plan_from_dict(pd_load), seed=SEED + 99)  # other init: must be overwritten
    opt2 = rt2.build_optimizer(make_opt)
    meta = load_runtime(path, rt2, opt2)
    worst = {"loss": 0.0, "grad": 0.0, "norm": 0.0}
    for step in (1, 2):
        loss = rt2.forward_backward(shard(step, rt2.dp_rank, rt2.dp_size))
        worst["loss"] = max(worst["loss"], rel(loss, ref[step]["loss"]))
        for pname, g in full_grads(rt2).items():
            worst["grad"] = max(worst["grad"], rel(g, expert_slice(rt2, pname, g, ref[step]["grads"][pname])))
        worst["norm"] = max(worst["norm"], rel(rt2.clip_grad_norm_(MAX_NORM), ref[step]["norm"]))
        rt2.optimizer_step(opt2)
    ok = meta.get("step") == 1 and all(v <= RTOL and math.isfinite(v) for v in worst.values())
    return {"ok": ok, **worst, "meta": meta}


def main() -> None:
    init(timeout_s=120)
    out, ckpt_dir = sys.argv[1], sys.argv[2]
    only = set(sys.argv[3].split(",")) if len(sys.argv) > 3 and sys.argv[3] else None
    report = Report(out)
    for name, (cfg, pd) in CASES.items():
        if only and name not in only:
            continue
        try:
            res = run_case(name, cfg, pd)
        except Exception as e:
            res = failure(f"case {name}", e)
        report.add(name, res["ok"], res)
        dist.barrier()
    for name, (cfg, pd) in COMPILE_CASES.items():
        if only and name not in only:
            continue
        try:
            res = run_case(name, cfg, pd, compile_backend="aot_eager")
        except Exception as e:
            res = failure(f"case {name}", e)
        report.add(name, res["ok"], res)
        dist.barrier()
    for name, (pd_save, pd_load) in CKPT_CASES.items():
        if only and name not in only:
            continue
        try:
            res = run_ckpt_case(pd_save, pd_load, f"{ckpt_dir}/{name}")
        except Exception as e:
            res = failure(f"case {name}", e)
        report.add(name, res["ok"], res)
        dist.barrier()
    report.gather_and_write()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_worker(main)
