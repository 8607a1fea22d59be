"""meshwright's precision policy against FSDP2 mixed precision on one device, each beside the planner's prediction.

Why: the planner predicts meshwright's runtime at ZeRO-0/1 (fp32 parameters under bf16 autocast) slower and heavier
than torchtitan's FSDP2 ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``. It charges the autocast policy
a cast of every weight per forward, the gradient's up-cast and an fp32 gradient accumulation per microbatch
(cost_model.weight_traffic_mb_s, grad_accumulate_s); since 2026-11-27 it charges the ``fsdp_mixed`` policy
(launcher/planner/stack.py) FSDP2's cast of the fp32 shard at every all-gather (the forward's and, resharded after
forward, backward's: cost_model.fsdp_cast_s) and the same fp32 accumulation, which on this slice comes to the same
step under the same rules (before, it charged fsdp_mixed none of them: results/exports.md, "What the llama2-70b rows
say"). One device running the same slice both ways settles whether the two really cost the same.

Policies, each on a slice of a llama-7B-shaped model (``--layers`` blocks of d_model 4096 with embedding and head),
micro-batch 1, ``--accum`` microbatches per AdamW step with clipping at 1.0, the same weights and tokens:
  autocast           meshwright's LocalRuntime(dtype="bf16"): fp32 parameters, torch.autocast bf16 (train/precision.py)
  fsdp_mixed         FSDP2 fully_shard per block and at the root on a 1-rank mesh, PrecisionPolicy.fsdp_policy()
                     (bf16 all-gathers, fp32 reduction): torchtitan's replicate-only layout
  fsdp_mixed_nosync  the same, gradient sync off but for the last microbatch (FSDP2 then accumulates unsharded
                     gradients in the reduce dtype): what the reduction alone costs
  bf16_master        bf16 parameters and gradients, fp32 master copy and moments in the optimizer (DeepSpeed's bf16)
Each runs in a subprocess of its own (its own peak memory, its own process group). Prediction per policy:
``evaluate_plan`` of the same slice (dp 1, ZeRO-0, no recompute) with meshwright's stack, torchtitan's, and
meshwright's with the ``bf16`` precision; analytic (no profile), so the ratios are what to compare.

    python benchmarks/bench_precision_policy.py --out /tmp/pp.json            # cuda: 4 blocks, seq 4096 (~2 min)
    python benchmarks/bench_precision_policy.py --cpu-smoke --out /tmp/pp.json  # CPU: tiny shapes, correctness only

Writes JSON (--out) and a markdown table (--md, default beside --out); on CPU only losses count, not times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POLICIES = ("autocast", "fsdp_mixed", "fsdp_mixed_nosync", "bf16_master")
# the planner's stack and precision override for each policy (None: the stack's own bf16 precision)
PLANNER = {"autocast": ("meshwright", None), "fsdp_mixed": ("torchtitan", None),
           "fsdp_mixed_nosync": ("torchtitan", None), "bf16_master": ("meshwright", "bf16")}
MARK = "[precision_policy] "


def model_config(args: argparse.Namespace) -> Any:
    """llama2-7b with ``--layers`` blocks (on --cpu-smoke: d_model 64, 4 heads, vocab 512)."""
    from meshwright.config import load_model_config

    cfg = load_model_config("llama2-7b")
    shape: dict[str, Any] = {"name": f"llama2-7b-{args.layers}l", "n_layers": args.layers,
                             "max_seq_len": max(args.seq, 16)}
    if args.cpu_smoke:
        shape.update(name=f"llama-tiny-{args.layers}l", d_model=64, n_heads=4, n_kv_heads=4, ffn_hidden=176,
                     vocab_size=512)
    return dataclasses.replace(cfg, **shape)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _batches(cfg: Any, args: argparse.Namespace, device: str) -> list[tuple[Any, Any]]:
    """``--accum`` microbatches of 1 x seq random tokens, the same for every policy (seeded)."""
    import torch

    g = torch.Generator().manual_seed(1234)
    toks = torch.randint(0, cfg.vocab_size, (args.accum, 1, args.seq + 1), generator=g)
    return [(t[:, :-1].to(device), t[:, 1:].to(device)) for t in toks]


def decay_groups(params: list[Any]) -> list[dict[str, Any]]:
    """Weight decay on matrices only, as ``Runtime.param_groups`` groups meshwright's own parameters."""
    return [{"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class MasterAdamW:
    """bf16 weights, fp32 master copy and AdamW moments: the optimizer a pure-bf16 run keeps (DeepSpeed's bf16 at
    ZeRO-0 in miniature). Gradients are clipped and stepped in fp32, then the weights are rounded from the master."""

    def __init__(self, params: list[Any], clip: float, **kwargs: Any) -> None:
        import torch

        self.params = params
        self.master = [p.detach().float().requires_grad_(True) for p in params]
        self.clip = clip
        self.opt = torch.optim.AdamW(decay_groups(self.master), **kwargs)

    def step(self) -> Any:
        import torch

        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
        norm = torch.nn.utils.clip_grad_norm_(self.master, self.clip)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)
        return norm

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.master):
            p.grad = m.grad = None


def _init_one_rank(device: str, timeout_s: float) -> Any:
    """A 1-rank process group (in-process store, so no port) and its mesh, as FSDP2 needs one."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=timedelta(seconds=timeout_s))
    return init_device_mesh(device, (1,))


def stored(model: Any) -> str:
    """What the optimizer's model holds: the parameters' dtype and type (DTensor: FSDP2's shards)."""
    p = next(model.parameters())
    return f"{str(p.dtype).replace('torch.', '')} {type(p).__name__}"


Step = Callable[[list[tuple[Any, Any]]], Any]


def build_step(policy: str, cfg: Any, device: str, timeout_s: float) -> tuple[Step, str]:
    """One training step of ``policy`` (forward/backward over the microbatches, clip, AdamW) -> mean loss tensor,
    and what the model stores (``stored``)."""
    import torch

    from meshwright.models import build_model, lm_loss
    from meshwright.train.compile import fast_adamw_kwargs
    from meshwright.train.precision import PrecisionPolicy

    adamw = {"lr": 3e-4, "weight_decay": 0.1, **fast_adamw_kwargs(device)}
    model = build_model(cfg, device=device, seed=0, init="keyed")
    if policy == "autocast":  # meshwright's runtime path as `meshwright train` builds it on one device
        from meshwright.train.local_runtime import LocalRuntime

        rt = LocalRuntime(model, device, dtype="bf16")
        opt = rt.build_optimizer(lambda groups: torch.optim.AdamW(groups, **adamw))

        def step(mbs: list[tuple[Any, Any]]) -> Any:
            loss = rt.forward_backward_lazy(mbs)
            rt.clip_grad_norm_lazy(1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return step, stored(model)
    if policy.startswith("fsdp_mixed"):
        from meshwright.parallel.data_parallel import apply_fsdp

        mesh = _init_one_rank(device, timeout_s)
        mp = PrecisionPolicy.from_dtype("bf16").fsdp_policy()
        for block in model.layers.values():  # torchtitan: each block, then the root (embedding, norm, head)
            apply_fsdp(block, mesh, 3, mp)
        apply_fsdp(model, mesh, 3, mp)
        opt = torch.optim.AdamW(decay_groups(list(model.parameters())), **adamw)
        nosync = policy == "fsdp_mixed_nosync"

        def step(mbs: list[tuple[Any, Any]]) -> Any:
            total = torch.zeros((), dtype=torch.float64, device=device)
            for i, (x, y) in enumerate(mbs):
                if nosync:
                    model.set_requires_gradient_sync(i == len(mbs) - 1)
                loss = lm_loss(model(x), y)
                (loss / len(mbs)).backward()
                total += loss.detach().double()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=device == "cuda")
            opt.step()
            opt.zero_grad(set_to_none=True)
            return total / len(mbs)
        return step, stored(model)
    if policy == "bf16_master":
        params = list(model.parameters())
        for p in params:  # parameters only: the RoPE tables stay as built
            p.data = p.data.to(torch.bfloat16)
        opt = MasterAdamW(params, 1.0, **adamw)

        def step(mbs: list[tuple[Any, Any]]) -> Any:
            total = torch.zeros((), dtype=torch.float64, device=device)
            for x, y in mbs:
                loss = lm_loss(model(x), y)
                (loss / len(mbs)).backward()
                total += loss.detach().double()
            opt.step()
            opt.zero_grad()
            return total / len(mbs)
        return step, stored(model)
    raise ValueError(f"policy={policy!r} is invalid: one of {', '.join(POLICIES)}")


def run_one(policy: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build, warm up, reset the peak, time ``--steps`` steps (synchronised); memory is the steady-state peak."""
    import torch

    from meshwright.parallel import teardown

    device = _device()
    cfg = model_config(args)
    step = mbs = None
    try:
        step, held = build_step(policy, cfg, device, args.timeout)
        mbs = _batches(cfg, args, device)
        losses = [float(step(mbs)) for _ in range(args.warmup)]
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        _sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step(mbs)
        _sync()
        dt = (time.perf_counter() - t0) / args.steps
        losses.append(float(loss))
    finally:
        # the FSDP2 model (held by the step's closure) and its mesh hold the group: dropped before it goes, through
        # parallel/teardown.py (a collection, torch's DTensor caches, then the group), as bench_moe.py
        step = mbs = None
        teardown.shutdown(exc=sys.exc_info()[1])
    tokens = args.accum * args.seq
    out: dict[str, Any] = {"policy": policy, "step_s": dt, "tokens_per_s": tokens / dt, "loss_first": losses[0],
                           "loss_last": losses[-1], "stored": held, "params": sum(p.numel() for p in cfg_params(cfg))}
    if device == "cuda":
        out.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    return out


def cfg_params(cfg: Any) -> list[Any]:
    """The slice's parameters on the meta device (counted, not allocated)."""
    from meshwright.models import build_model

    return list(build_model(cfg, device="meta").parameters())


def predictions(args: argparse.Namespace, cluster: str) -> dict[str, dict[str, Any]]:
    """The planner's step time and peak memory of the slice per policy (dp 1, ZeRO-0, no recompute): under the
    policy's stack (``stack``; torchtitan's is charged no loss and optimizer-step terms, cost_model.loss_s and
    optimizer_step_s) and under meshwright's rules with only the precision swapped (``rules``: the precision
    policy's own terms, weight_traffic_mb_s and grad_accumulate_s among them)."""
    from meshwright.config import load_cluster
    from meshwright.launcher.planner import cost_model as cm
    from meshwright.plan import EmbeddingStrategy, LayerStrategy, OptimizerSpec, PipelineSpec, Plan, validate_plan

    cfg = model_config(args)
    cl = load_cluster(cluster, nodes=1, devices_per_node=1)
    plan = Plan(model=cfg.name, cluster={"preset": cl.name, "nodes": 1, "devices_per_node": 1},
                seq_len=args.seq, global_batch=args.accum, micro_batch=1, pipeline=PipelineSpec(),
                layers=[LayerStrategy(tp=1, dp=1, zero=0, recompute="none", repeat=cfg.n_layers)],
                embedding=EmbeddingStrategy(), optimizer=OptimizerSpec())
    validate_plan(plan, cfg, 1)
    mesh_hw = cm.hardware_from_cluster(cl, stack="meshwright", dtype="bf16")
    out = {}
    for policy, (stack, precision) in PLANNER.items():
        hw = cm.hardware_from_cluster(cl, stack=stack, dtype="bf16")
        hw = dataclasses.replace(hw, precision=precision) if precision else hw
        p = cm.evaluate_plan(plan, cfg, hw, 1)
        rules = cm.evaluate_plan(plan, cfg, dataclasses.replace(mesh_hw, precision=hw.precision), 1)
        out[policy] = {"stack": stack, "precision": hw.precision, "step_s": p.step_s, "memory_gib": max(p.memory_gib),
                       "compute_s": p.breakdown.get("compute_s"), "rules_step_s": rules.step_s,
                       "rules_memory_gib": max(rules.memory_gib)}
    return out


def _spawn(policy: str, args: argparse.Namespace) -> dict[str, Any]:
    """``run_one`` in a fresh interpreter: one line of JSON back, or the error's last line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", policy, "--layers", str(args.layers), "--seq",
           str(args.seq), "--accum", str(args.accum), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--timeout", str(args.timeout)] + (["--cpu-smoke"] if args.cpu_smoke else [])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                           check=False)
    except subprocess.TimeoutExpired:
        return {"policy": policy, "error": f"timed out after {args.timeout:.0f} s"}
    for line in r.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = (r.stderr.strip().splitlines() or [f"exit {r.returncode}, no output"])[-1]
    return {"policy": policy, "error": tail[-400:]}


def _ratio(a: Any, b: Any) -> str:
    return f"{a / b:.3f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"


def markdown(res: dict[str, Any]) -> str:
    """One row per policy: measured and predicted, each as a ratio to autocast (meshwright's runtime)."""
    m, p = res["measured"], res["predicted"]
    base, pbase = m.get("autocast", {}), p["autocast"]
    mem = "peak_reserved_gib" if res["device"] != "cpu" else None
    lines = [f"{res['date_utc']}, {res['device']}, torch {res['torch']}: {res['model']}, seq {res['seq']}, "
             f"micro-batch 1 x {res['accum']} accumulated, AdamW; ratios to autocast (step time and memory: "
             "< 1 = faster / lighter)", "",
             "| policy | step s | tokens/s | peak reserved GiB | step / autocast | predicted: stack | "
             "predicted: precision only | memory / autocast | predicted: stack | loss first -> last |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in res["policies"]:
        r, q = m.get(name, {}), p[name]
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | | | | | |")
            continue
        gib = f"{r[mem]:.2f}" if mem and r.get(mem) is not None else "-"
        lines.append(f"| {name} | {r['step_s']:.4f} | {r['tokens_per_s']:.0f} | {gib} | "
                     f"{_ratio(r['step_s'], base.get('step_s'))} | {_ratio(q['step_s'], pbase['step_s'])} | "
                     f"{_ratio(q['rules_step_s'], pbase['rules_step_s'])} | "
                     f"{_ratio(r.get(mem) if mem else None, base.get(mem) if mem else None)} | "
                     f"{_ratio(q['memory_gib'], pbase['memory_gib'])} | "
                     f"{r['loss_first']:.4f} -> {r['loss_last']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes (d_model 64, seq 64), CPU: correctness only")
    ap.add_argument("--layers", type=int, default=None, help="blocks of the slice (default 4; 2 on --cpu-smoke)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 4096; 64 on --cpu-smoke)")
    ap.add_argument("--accum", type=int, default=8, help="microbatches (of 1 sequence) per optimizer step")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5; 2 on --cpu-smoke)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (optimizer states exist after one)")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of " + ", ".join(POLICIES))
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per policy (and the process group's timeout)")
    ap.add_argument("--out", default="/tmp/precision_policy.json")
    ap.add_argument("--md", default=None, help="markdown table (default: --out with .md)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.layers = args.layers or (2 if args.cpu_smoke else 4)
    args.seq = args.seq or (64 if args.cpu_smoke else 4096)
    args.steps = args.steps or (2 if args.cpu_smoke else 5)
    for name in ("layers", "seq", "accum", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}={getattr(args, name)} is invalid: a positive integer")
    if args.warmup < 1:
        ap.error(f"--warmup={args.warmup} is invalid: at least 1 (the first step allocates the optimizer states)")
    policies = [s for s in args.policies.split(",") if s]
    bad = [s for s in policies if s not in POLICIES]
    if bad or not policies:
        ap.error(f"--policies={args.policies!r} is invalid: a comma-separated subset of {', '.join(POLICIES)}")
    if args.one:
        print(MARK + json.dumps(run_one(args.one, args)), flush=True)
        return 0
    import torch

    device = _device()
    if device == "cpu" and not args.cpu_smoke:
        ap.error("no CUDA device: the full-size slice needs one (use --cpu-smoke on CPU)")
    cluster = "local-cpu" if device == "cpu" else (
        "dgx-h200-141g" if "H200" in torch.cuda.get_device_name(0) else "dgx-h100-80g")
    measured = {}
    for name in policies:
        measured[name] = _spawn(name, args)
        print(f"{name}: {json.dumps(measured[name])}", flush=True)
    res = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "cluster": cluster,
           "model": model_config(args).name, "seq": args.seq, "accum": args.accum, "steps": args.steps,
           "policies": policies, "measured": measured, "predicted": predictions(args, cluster)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    table = markdown(res)
    Path(args.md or str(Path(args.out).with_suffix(".md"))).write_text(table)
    print(table, flush=True)
    return 1 if any("error" in r for r in measured.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
