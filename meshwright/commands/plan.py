"""`meshwright plan`: search the fastest parallel layout for a model and cluster.

Three small steps so later sections (capacity planning, energy) slot in: ``add_arguments`` declares the
flags, ``compute_result`` returns one plain dict (what ``--json`` prints), ``render_text`` turns that
dict into the readable table. A new section adds flags, a key in the dict and a renderer block.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from meshwright.errors import ConfigError, invalid
from meshwright.launcher.planner.stack import STACKS

STACK_NAMES = tuple(STACKS)

JSON_SCHEMA_VERSION = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model preset name, YAML path, or a Hugging Face checkpoint "
                   "directory (or its config.json): the model a run with init_from: DIR fine-tunes")
    p.add_argument("--cluster", required=True, help="cluster preset name or YAML path")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--devices-per-node", type=int, default=None, help="devices per node (default: the cluster's)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    p.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--memory-budget-gib", type=float, default=None, help="usable memory per device (default: the cluster's)")
    p.add_argument("--hardware-profile", default=None, help="JSON from `meshwright profile hardware`")
    p.add_argument("--model-profile", default=None, help="JSON from `meshwright profile model`")
    g = p.add_argument_group("constraints (fix part of the layout, e.g. to evaluate one you already run)")
    g.add_argument("--tp", type=int, default=None)
    g.add_argument("--pp", type=int, default=None)
    g.add_argument("--dp", type=int, default=None)
    g.add_argument("--ep", type=int, default=None)
    g.add_argument("--cp", type=int, default=None,
                   help="context parallel degree (ring attention; each rank holds seq_len/cp tokens); planned and "
                        "exported, not yet run by meshwright's runtime")
    g.add_argument("--zero", type=int, default=None, choices=(0, 1, 2, 3))
    g.add_argument("--recompute", default=None, choices=("none", "selective", "full"))
    g.add_argument("--sp", default=None, action=argparse.BooleanOptionalAction,
                   help="sequence parallelism on tp>1 layers (default: searched)")
    g.add_argument("--micro-batch", type=int, default=None)
    g.add_argument("--schedule", default=None, choices=("gpipe", "1f1b", "interleaved_1f1b"))
    g.add_argument("--virtual-stages", type=int, default=None, help="model chunks per rank for interleaved_1f1b")
    p.add_argument("--any-runtime", action="store_true",
                   help="search the full space (ZeRO-1, vocab-parallel embeddings, savers) instead of only layouts "
                        "meshwright's runtime runs unchanged; implied by --allow (--emit searches what its stack runs)")
    p.add_argument("--stack", default=None, choices=STACK_NAMES,
                   help="the training stack that will run the plan: its precision policy (bytes per parameter, "
                        "gradient-reduction dtype) and overlap rules shape memory and step time, and the search keeps "
                        "to the layouts it runs (default: the --emit target, else meshwright)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp32"),
                   help="training dtype (TrainConfig.dtype; default bf16 where the device lists it, fp32 on CPU)")
    p.add_argument("--compile", default=False, action=argparse.BooleanOptionalAction,
                   help="the run compiles its blocks and loss (TrainConfig.compile, meshwright's runtime): smaller saved "
                        "activations, no fp32 logits (default: off, as TrainConfig)")
    p.add_argument("--loss-chunk-tokens", type=int, default=0, metavar="N",
                   help="the run's last stage takes head + loss N tokens at a time (TrainConfig.loss_chunk_tokens, "
                        "meshwright's runtime): one chunk's logits instead of the microbatch's (default: 0, whole)")
    p.add_argument("--attention", default="flash", choices=("flash", "materialized"),
                   help="attention kernels of the stack: flash (fused; meshwright, Megatron since 2023) or "
                        "materialized scores (e.g. Megatron-LM 2021), which cost memory traffic and activation memory")
    p.add_argument("--task", default="pretrain", choices=("pretrain", "finetune"),
                   help="what the run is: LeMo (token elimination) is only for long-context fine-tuning")
    p.add_argument("--allow", action="append", default=None, metavar="SAVER",
                   help="memory savers the search may use (they change numerics): fp8, wta-crs[=RATIO], lemo[=RATIO]")
    c = p.add_argument_group("capacity planning (days, device-hours, energy, CO2, cost of a whole run)")
    c.add_argument("--train-tokens", default=None, help="tokens to train on, e.g. 2T, 300B, 1.5e12")
    c.add_argument("--pue", type=float, default=None, help="data-centre power usage effectiveness (default 1.1)")
    c.add_argument("--grid-intensity", type=float, default=None, metavar="KG_PER_KWH",
                   help="grid carbon intensity in kgCO2e/kWh (default 0.385, US average)")
    c.add_argument("--price-per-device-hour", type=float, default=None, metavar="USD")
    c.add_argument("--power-basis", default="node", choices=("node", "tdp", "measured"),
                   help="node: device idle..TDP by utilisation + host power (default); tdp: GPU TDP x device-hours, "
                        "as the Llama 2/3 model cards count; measured: --measured-power-w per device")
    c.add_argument("--measured-power-w", type=float, default=None, metavar="W",
                   help="measured average power per device (for --power-basis measured)")
    c.add_argument("--goodput", type=float, default=1.0,
                   help="fraction of wall-clock doing useful steps (failures, restarts, eval); e.g. 0.8")
    p.add_argument("--top", type=int, default=5, help="how many layouts to list (best + runner-ups)")
    p.add_argument("--out", default=None, help="write the best plan to this YAML/JSON file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--emit", default=None, choices=("megatron", "deepspeed", "torchtitan"),
                   help="print the best plan as Megatron-LM args, a DeepSpeed config or a torchtitan config; the search "
                        "keeps to layouts that stack runs")
    p.add_argument("--train-config", default=None, metavar="YAML",
                   help="with --emit: take optimizer and schedule settings (lr, betas, clipping, steps) and the "
                        "dtype, where it sets one, from this TrainConfig")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="search the fastest parallel layout for a model and cluster",
                       description="Search tp/sp/dp/ZeRO/pp/ep/recompute per layer under a memory budget and predict step time, MFU and memory.")
    add_arguments(p)
    p.set_defaults(func=run)


def _load_inputs(args: argparse.Namespace) -> dict[str, Any]:
    from meshwright.config import load_cluster, load_model_config
    from meshwright.launcher.planner import cost_model as cm

    for name in ("nodes", "devices_per_node", "seq_len", "global_batch", "top"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={v!r} is invalid; valid: a positive integer")
    _check_outputs_and_extras(args)
    cfg = load_model_config(args.model)
    _train_config_matches(args, cfg)
    cluster = load_cluster(args.cluster, nodes=args.nodes, devices_per_node=args.devices_per_node)
    hprof = None
    if args.hardware_profile:  # the profiling modules import torch: only a run given a profile pays for it
        from meshwright.launcher.profiling.hardware import load_hardware_profile

        hprof = load_hardware_profile(args.hardware_profile)
    hw = cm.hardware_from_cluster(cluster, hprof, args.memory_budget_gib, stack=_stack(args),
                                  dtype=getattr(args, "dtype", None), compile=bool(getattr(args, "compile", False)),
                                  loss_chunk_tokens=getattr(args, "loss_chunk_tokens", 0) or 0)
    if args.model_profile:
        from meshwright.launcher.profiling.model import apply_model_profile, load_model_profile

        hw = apply_model_profile(hw, load_model_profile(args.model_profile), cfg, hprof)
    if args.attention != hw.attention:
        hw = dataclasses.replace(hw, attention=args.attention)
    return {"cfg": cfg, "cluster": cluster, "hw": hw, "hprof": hprof}


def _check_outputs_and_extras(args: argparse.Namespace) -> None:
    """What would otherwise fail only after the search: the --out path, --train-config, the capacity inputs."""
    from meshwright.config import load_train_config
    from meshwright.config.io import check_output_path
    from meshwright.launcher.planner.capacity import DEFAULT_GRID, DEFAULT_PUE, check_capacity_inputs, parse_tokens

    if getattr(args, "out", None) is not None:  # --out '' wrote nothing, silently
        check_output_path(args.out, "--out", directory=False, inputs={
            flag: getattr(args, name, None) for flag, name in (
                ("--model", "model"), ("--cluster", "cluster"), ("--train-config", "train_config"),
                ("--hardware-profile", "hardware_profile"), ("--model-profile", "model_profile"))})
    if getattr(args, "train_config", None):
        if not getattr(args, "emit", None):
            raise invalid("--train-config", args.train_config, "used only with --emit (drop it, or add --emit)")
        args.train_config_loaded = load_train_config(args.train_config)
        if args.train_config_loaded.lora is not None:  # Megatron-LM, DeepSpeed and torchtitan get no adapters from it
            raise invalid("--train-config lora", "set", f"no lora section for --emit {args.emit} (the export carries "
                          "full training: fine-tune with `meshwright train`, then `meshwright export --peft/--hf`)")
        _dtype_from_train_config(args)
    if hasattr(args, "goodput"):
        tokens = None if args.train_tokens is None else parse_tokens(args.train_tokens)
        check_capacity_inputs(tokens, DEFAULT_PUE if args.pue is None else args.pue,
                              DEFAULT_GRID if args.grid_intensity is None else args.grid_intensity,
                              args.price_per_device_hour, args.goodput, args.power_basis, args.measured_power_w)
        step_tokens = getattr(args, "global_batch", 0) * getattr(args, "seq_len", 0)
        if tokens is not None and step_tokens and tokens < step_tokens:  # 0.5 was costed as a run of half a token
            raise invalid("train_tokens", args.train_tokens, f"at least one step's tokens (global batch x seq len = "
                          f"{step_tokens:,}), e.g. 2T or 300B")


def _raw_train_config(args: argparse.Namespace) -> dict[str, Any]:
    """The keys --train-config sets itself (a preset name is its file in configs/train, as `train` reads it)."""
    from meshwright.config.io import read_mapping
    from meshwright.config.presets import preset_path

    return read_mapping(preset_path("train", args.train_config)) if isinstance(args.train_config, str) else {}


def _train_config_matches(args: argparse.Namespace, cfg: Any) -> None:
    """A --train-config that sets its model, seq_len or global_batch is a config for that run: the export writes its
    steps and schedule beside the plan's model and batch, so another model or batch is refused in one line (it was
    mixed in silently: tiny-test's 12 steps of 8x64 under a llama2-7b layout of 1024x4096). Keys the file leaves
    unset are not compared (a config of optimizer settings alone fits any plan)."""
    train = getattr(args, "train_config_loaded", None)
    if train is None:
        return
    raw = _raw_train_config(args)
    for name in ("seq_len", "global_batch"):
        if name in raw and getattr(train, name) != getattr(args, name):
            flag = f"--{name.replace('_', '-')}"
            raise invalid(flag, getattr(args, name), f"{getattr(train, name)} as --train-config {args.train_config} "
                          f"sets {name} (the export writes its steps and schedule), or a train config for this run")
    if "model" not in raw and "init_from" not in raw:
        return
    from meshwright.train.build import resolve_model_config
    from meshwright.train.plan_match import SHAPE_FIELDS, model_shape

    theirs = resolve_model_config(train)
    mine, wanted = model_shape(cfg), model_shape(theirs)
    for name in SHAPE_FIELDS:
        if mine.get(name) != wanted.get(name):
            raise invalid("--model", args.model, f"the model --train-config {args.train_config} trains ({theirs.name}: "
                          f"{name}={wanted.get(name)}, here {mine.get(name)}), or a train config for this model")


def _dtype_from_train_config(args: argparse.Namespace) -> None:
    """The training dtype a --train-config sets is the one predicted and emitted (it was ignored: a bf16 prediction
    and export for a config that trains in fp32); --dtype agrees with it or is refused. A config that leaves dtype
    at its default does not set it (the device's default stands)."""
    raw = _raw_train_config(args)
    if "dtype" not in raw:
        return
    wanted = args.train_config_loaded.dtype
    if getattr(args, "dtype", None) is not None and args.dtype != wanted:
        raise invalid("--dtype", args.dtype, f"{wanted!r} as --train-config {args.train_config} sets it, or no --dtype")
    args.dtype = wanted


def _stack(args: argparse.Namespace) -> str:
    """The stack the prediction describes: --stack, else the --emit target (its rules), else meshwright's runtime."""
    stack, target = getattr(args, "stack", None), getattr(args, "emit", None)
    # --emit deepspeed writes either DeepSpeed stack (deepspeed-fp32-accum: BF16_Optimizer)
    valid = tuple(n for n, st in STACKS.items() if st.deepspeed) if target == "deepspeed" else (target,)
    if stack is not None and target is not None and stack not in valid:
        raise ConfigError(f"stack={stack!r} is invalid with --emit {target}; valid: {' or '.join(map(repr, valid))} or "
                          "no --stack (an export is predicted for the stack that runs it)")
    if stack == "deepspeed-fp32-accum" and getattr(args, "dtype", None) == "fp32":
        # fp32 training has no bf16 gradients to accumulate in fp32: the prediction was fp32 throughout while
        # --emit deepspeed wrote bf16 with grad_accum_dtype fp32 (BF16_Optimizer), a different run
        raise invalid("dtype", "fp32", "bf16 with --stack deepspeed-fp32-accum (bf16 training with fp32 gradient "
                      "accumulation), or another --stack for fp32 training")
    return stack or target or "meshwright"


def compute_result(args: argparse.Namespace) -> dict[str, Any]:
    """Run the search and return the plain-data result (the ``--json`` object)."""
    from meshwright.launcher.planner import cost_model as cm
    from meshwright.launcher.planner.search import (Allow, Constraints, check_virtual_stages, describe_layout,
                                                    infeasible_message, search)

    inputs = _load_inputs(args)
    cfg, cluster, hw = inputs["cfg"], inputs["cluster"], inputs["hw"]
    if getattr(args, "emit", None):  # a model the target cannot be: one line now, not after the search
        from meshwright.launcher.planner.export import check_emit_model

        check_emit_model(args.emit, cfg)
    constraints = Constraints(tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep, cp=args.cp, zero=args.zero, recompute=args.recompute, sp=args.sp,
                              micro_batch=args.micro_batch, schedule=args.schedule, virtual_stages=args.virtual_stages,
                              runtime_compatible=not (args.any_runtime or args.allow))
    check_virtual_stages(cfg, cluster.world_size, constraints)
    allow = Allow.parse(args.allow)
    if allow.lemo is not None:
        from meshwright.memory.lemo import check_lemo_allowed

        check_lemo_allowed(args.task, ["lemo"])
    from meshwright.launcher.planner.export.stacks import RESTRICTED_STACKS

    target = _stack(args)
    if target == "meshwright" and constraints.runtime_compatible and args.zero == 1 and (args.tp or 1) > 1:
        # meshwright's ZeRO-1 is one ZeroRedundancyOptimizer over each stage's dp group (parallel/support.py)
        raise invalid("tp", args.tp, "1 with --zero 1 for meshwright's runtime (its ZeRO-1 shards whole parameters "
                      "of tp=1 layers); or --zero 0, 2 or 3, --stack deepspeed/megatron, or --any-runtime")
    if target in RESTRICTED_STACKS:  # --emit X or --stack X: only the layouts X runs
        res = _search_for_stack(target, cfg, cluster, args, hw, constraints)
    else:
        res = search(cfg, cluster, args.seq_len, args.global_batch, hw=hw, constraints=constraints, allow=allow, top=args.top,
                     progress=sys.stderr.isatty() and not args.json)
    out: dict[str, Any] = {
        "schema": JSON_SCHEMA_VERSION,
        "model": cfg.name, "cluster": cluster.name, "nodes": cluster.nodes, "devices_per_node": cluster.devices_per_node,
        "world_size": cluster.world_size, "seq_len": args.seq_len, "global_batch": args.global_batch,
        "memory_budget_gib": round(res.budget_gib, 3), "compute_dtype": hw.compute_dtype, "stack": hw.stack,
        "precision": hw.policy.name,
        "search_s": round(res.search_s, 3), "candidates": res.candidates, "skipped": res.skipped, "feasible": res.best is not None,
    }
    if res.best is None:
        out["error"] = infeasible_message(res)
        out["min_memory_gib"] = None if res.min_memory_gib is None else round(res.min_memory_gib, 3)
        out["suggestion"] = res.suggestion
    else:
        out["plan"] = res.best.plan.to_dict()
        out["precision"] = cm.plan_precision(res.best.plan, hw)  # e.g. DeepSpeed's pipeline engine's BF16_Optimizer
        out["predicted"] = res.best.prediction.to_dict()
        out["layout"] = describe_layout(res.best.plan)
        out["stages"] = _stage_rows(res.best.plan, cfg, res.best.prediction)
        if args.train_tokens is not None:
            out["capacity"] = _capacity(args, cluster, out["predicted"])
    out["runners_up"] = [{"layout": c.layout(), "predicted": c.prediction.to_dict()} for c in res.runners_up]
    out["rejected"] = res.rejected[: args.top]
    out["rejected_total"] = len(res.rejected)
    out["_objects"] = {"cfg": cfg, "best": res.best, "device_gib": cm.device_memory_gib(cluster, inputs["hprof"])}
    return out


def _search_for_stack(target: str, cfg: Any, cluster: Any, args: argparse.Namespace, hw: Any, constraints: Any) -> Any:
    """Search only the layouts ``target`` runs (export.stacks.search_for_stack, which ``search()`` also uses under a
    restricting ``hw.stack``); an error names the flag the user gave (--stack wins: `--emit deepspeed --stack
    deepspeed-fp32-accum`)."""
    from meshwright.launcher.planner.export.stacks import search_for_stack

    flag = "stack" if getattr(args, "stack", None) else "emit"
    emit = f" (with --emit {args.emit})" if flag == "stack" and getattr(args, "emit", None) else ""
    return search_for_stack(target, cfg, cluster, args.seq_len, args.global_batch, hw, constraints, top=args.top,
                            named=f"{flag}={target!r}{emit}")


def _capacity(args: argparse.Namespace, cluster: Any, predicted: dict[str, Any]) -> dict[str, Any]:
    """Whole-run figures at the predicted throughput; utilisation = compute time / step time."""
    from meshwright.launcher.planner.capacity import DEFAULT_GRID, DEFAULT_PUE, capacity_plan, parse_tokens

    step_s = predicted["step_s"]
    busy = predicted.get("breakdown", {}).get("compute_s")
    utilisation = min(1.0, busy / step_s) if busy and step_s > 0 else 1.0
    cap = capacity_plan(cluster, predicted["tokens_per_s"], parse_tokens(args.train_tokens), utilisation=utilisation,
                        pue=DEFAULT_PUE if args.pue is None else args.pue,
                        grid_intensity=DEFAULT_GRID if args.grid_intensity is None else args.grid_intensity,
                        price_per_device_hour=args.price_per_device_hour, goodput=args.goodput,
                        power_basis=args.power_basis, measured_power_w=args.measured_power_w)
    return {k: (float(f"{v:.7g}") if isinstance(v, float) else v) for k, v in cap.as_dict().items()}


def _stage_rows(plan: Any, cfg: Any, pred: Any) -> list[dict[str, Any]]:
    rows = []
    ranges = plan.stage_ranges(cfg.n_layers)
    strategies = plan.layer_strategies()
    pp = plan.pipeline.degree
    for r in range(pp):
        layers = [i for j, (a, b) in enumerate(ranges) if j % pp == r for i in range(a, b)]
        groups: list[list[Any]] = []
        for i in layers:
            s = strategies[i]
            desc = f"tp{s.tp}{'+sp' if s.sp else ''} dp{s.dp} z{s.zero} rc={s.recompute}" + (f" ep{s.ep}" if s.ep > 1 else "")
            if s.savers.fp8_act or s.savers.wta_crs or s.savers.lemo:
                desc += " savers"
            if groups and groups[-1][0] == desc and groups[-1][2] == i:
                groups[-1][2] = i + 1
            else:
                groups.append([desc, i, i + 1])
        rows.append({"stage": r, "layers": [[a, b] for _, a, b in groups], "strategy": [d for d, _, _ in groups],
                     "memory_gib": round(pred.memory_gib[r], 2)})
    return rows


def render_text(result: dict[str, Any]) -> str:
    """The readable table: per stage layers, strategy, memory; then totals and the alternatives."""
    from meshwright.launcher.planner.search import summarize_layout

    r = result
    lines = [f"meshwright plan: {r['model']} on {r['nodes']} x {r['devices_per_node']} {r['cluster']} "
             f"({r['world_size']} devices), seq {r['seq_len']}, global batch {r['global_batch']}, "
             f"budget {r['memory_budget_gib']:.1f} GiB/device, {r['compute_dtype']}, stack {r['stack']} ({r['precision']})"]
    if not r["feasible"]:
        lines.append(r["error"])
        return "\n".join(lines)
    p = r["predicted"]
    plan = r["plan"]
    pl = plan["pipeline"]
    lines.append(f"layout: {summarize_layout(r['layout'])}")
    if pl["degree"] > 1:
        lines.append(f"pipeline: {pl['degree']} stages, {pl['schedule']}, {pl['microbatches']} microbatches of {plan['micro_batch']}")
    else:
        lines.append(f"micro-batch {plan['micro_batch']}")
    lines.append("")
    lines.append(f"{'stage':>5}  {'layers':<14} {'strategy':<40} {'memory GiB':>10}")
    for row in r["stages"]:
        for k, (rng, strat) in enumerate(zip(row["layers"], row["strategy"])):
            mem = f"{row['memory_gib']:>10.2f}" if k == 0 else ""
            stage = f"{row['stage']:>5}" if k == 0 else " " * 5
            lines.append(f"{stage}  {f'{rng[0]}-{rng[1] - 1}':<14} {strat:<40} {mem}")
    lines.append("")
    b = p["breakdown"]
    lines.append(f"step {p['step_s']:.4g} s | {p['tokens_per_s']:.4g} tokens/s | {p['tflops_per_device']:.4g} TFLOP/s per device | "
                 f"MFU {100 * p['mfu']:.1f}% | HFU {100 * p['hfu']:.1f}% | peak memory {p['memory_gib_max']:.2f} GiB")
    lines.append(f"terms: compute {b['compute_s']:.4g} s, tp/ep comm {b['tp_ep_comm_s']:.4g} s, dp comm {b['dp_comm_s']:.4g} s "
                 f"(before overlap), bubble {100 * b['bubble_fraction']:.1f}%")
    if r.get("capacity"):
        c = r["capacity"]
        cost = f" | ${c['cost_usd']:,.0f}" if c.get("cost_usd") is not None else ""
        lines.append(f"capacity for {c['train_tokens']:.3g} tokens: {c['days']:.2f} days | {c['device_hours']:,.0f} device-hours | "
                     f"{c['energy_mwh']:,.1f} MWh (PUE {c['pue']}, {c['power_w_per_device']:.0f} W/device at "
                     f"{100 * c['utilisation']:.0f}% busy) | {c['tco2e']:,.1f} tCO2e at {c['grid_intensity']} kg/kWh{cost}")
    if r["runners_up"]:
        lines.append("")
        lines.append("runner-ups:")
        for c in r["runners_up"]:
            q = c["predicted"]
            lines.append(f"  {q['step_s']:.4g} s  MFU {100 * q['mfu']:.1f}%  {q['memory_gib_max']:.1f} GiB  "
                         f"{summarize_layout(c['layout'])}")
    if r["rejected"]:
        lines.append(f"rejected ({r['rejected_total']}, closest first):")
        for x in r["rejected"]:
            lines.append(f"  {x['layout']}: {x['reason']}")
    skipped = f" ({r['skipped']} skipped on a step-time lower bound)" if r.get("skipped") else ""
    lines.append(f"searched {r['candidates']} candidates{skipped} in {r['search_s']:.2f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from meshwright.launcher.planner.export import emit

    result = compute_result(args)
    objects = result.pop("_objects")
    if args.memory_budget_gib is not None and args.memory_budget_gib > objects["device_gib"]:
        print(f"meshwright plan: note: --memory-budget-gib {args.memory_budget_gib:g} is above the "
              f"{objects['device_gib']:g} GiB a {result['cluster']} device holds: a plan filling it would not fit "
              "there", file=sys.stderr)
    if not result["feasible"]:
        if args.json:
            print(json.dumps(result, indent=2, sort_keys=True))
        else:
            print(f"meshwright plan: {result['error']}", file=sys.stderr)
        return 1
    best = objects["best"]
    if args.out:
        try:
            best.plan.save(args.out)
        except OSError as exc:
            raise invalid("--out", args.out, f"a writable file path ({exc.strerror or exc})") from None
    if args.emit:
        train = getattr(args, "train_config_loaded", None)
        # the dtype the prediction was made in (--dtype, else the cluster's default): the export trains in it
        text, notes = emit(best.plan, objects["cfg"], args.emit, train, _stack(args), result["compute_dtype"])
        if args.allow:  # the consumers run none of meshwright's savers: say so rather than drop them unseen
            notes.append(f"--allow {' '.join(args.allow)} ignored: {args.emit} runs none of meshwright's memory savers, "
                         "so the search kept to layouts without them")
        print(text)
        for n in notes:
            print(f"note: {n}", file=sys.stderr)
        return 0
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(render_text(result))
        if args.out:
            print(f"wrote {args.out}")
    return 0
