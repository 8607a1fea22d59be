"""`meshwright train CONFIG [KEY=VALUE ...] [--plan PLAN|auto] [--resume | --resume-from CKPT]`: train a model.

One process gets a ``LocalRuntime``; under torchrun with WORLD_SIZE > 1 (or when a plan asks for more
than one device or for per-layer features) the distributed runtime from ``meshwright.parallel`` is used.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from meshwright.config import (TrainConfig, load_cluster, load_model_config, load_train_config, parse_override,
                               preset_names)
from meshwright.errors import ConfigError, invalid
from meshwright.runtime import Runtime


def world_size_from_env() -> int:
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise invalid("WORLD_SIZE", raw, "an integer (set by torchrun)") from None


def resolve_plan(train_cfg: TrainConfig, plan_ref: str | None, world_size: int):
    """A Plan from a path, ``auto`` (the planner, calibrated with cached profiles of these machines) or None."""
    from meshwright.plan import load_plan, validate_plan

    if plan_ref is None:
        return None
    if plan_ref == "auto":
        return _auto_plan(train_cfg, world_size)
    if not Path(plan_ref).is_file():
        raise invalid("plan", plan_ref, "'auto' or the path of an existing Plan YAML/JSON file")
    plan = load_plan(plan_ref)
    validate_plan(plan, train_cfg.model, plan.world_size() if world_size == 1 else world_size)
    return plan


def _auto_plan(train_cfg: TrainConfig, world_size: int):
    """The planner's best layout for this world, calibrated with (cached) profiles of these machines
    when ``auto_profile`` is on; under torchrun the process group starts here, as profiling is collective."""
    from meshwright.launcher.search import auto_plan

    hw_prof = model_prof = None
    if train_cfg.auto_profile:
        from meshwright.launcher.auto_profile import auto_profiles, describe

        if world_size > 1:
            from meshwright.parallel.runtime import init_distributed

            init_distributed()
        hw_prof, model_prof = auto_profiles(load_model_config(train_cfg.model), world_size, train_cfg.seq_len,
                                            train_cfg.micro_batch, progress=False)
        if int(os.environ.get("RANK", "0")) == 0:
            print(describe(hw_prof, model_prof), flush=True)
    return auto_plan(train_cfg, world_size, hardware_profile=hw_prof, model_profile=model_prof)


def _plan_needs_parallel(plan: Any) -> bool:
    if plan is None:
        return False
    if plan.world_size() > 1:
        return True
    return any(s.recompute != "none" or s.zero or s.savers.fp8_act or s.savers.wta_crs or s.savers.lemo
               for s in plan.layer_strategies())


def build_runtime(train_cfg: TrainConfig, plan_ref: str | None = None) -> Runtime:
    """LocalRuntime for one process; the distributed runtime under torchrun or when the plan needs it."""
    world = world_size_from_env()
    plan = resolve_plan(train_cfg, plan_ref, world)
    model_cfg = load_model_config(train_cfg.model)
    if world > 1 or _plan_needs_parallel(plan):
        if train_cfg.meft is not None:
            raise invalid("meft", "set", "null under the distributed runtime (MEFT runs in one process; DDP is tested "
                          "at the module level in tests/distributed/test_meft_ddp.py)")
        try:
            from meshwright.parallel.runtime import build_distributed_runtime
        except ImportError:
            raise ConfigError(f"plan={plan_ref!r} with WORLD_SIZE={world} needs the distributed runtime "
                              "(meshwright.parallel.runtime), which is not available in this version; "
                              "valid: one process without --plan") from None
        if plan is None:
            from meshwright.plan import default_plan

            plan = default_plan(model_cfg, world, train_cfg.seq_len, train_cfg.global_batch, train_cfg.micro_batch)
        return build_distributed_runtime(train_cfg, model_cfg, plan)
    import torch

    from meshwright.local_runtime import LocalRuntime
    from meshwright.models import build_model

    if train_cfg.seq_len > model_cfg.max_seq_len:
        raise invalid("seq_len", train_cfg.seq_len, f"at most model.max_seq_len={model_cfg.max_seq_len}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(model_cfg, seed=train_cfg.seed)
    if train_cfg.meft is not None:  # reversible fine-tuning: frozen base, adapters (+ head) train
        from meshwright.memory.meft import MeftConfig, make_reversible
        from meshwright.yamlio import from_dict

        model = make_reversible(model, config=from_dict(MeftConfig, train_cfg.meft, prefix="meft"))
    rt = LocalRuntime(model, device=device,
                      dtype=train_cfg.dtype if device == "cuda" else "fp32")
    rt.plan = plan
    return rt


def run_training(train_cfg: TrainConfig, plan_ref: str | None = None, resume: bool | str = False) -> dict[str, Any]:
    """Everything `meshwright train` does, callable from Python (tests, benchmarks)."""
    from meshwright.data.loader import build_loaders
    from meshwright.trainer import Trainer
    from meshwright.yamlio import write_yaml

    model_cfg = load_model_config(train_cfg.model)
    cluster = load_cluster(train_cfg.cluster)
    runtime = build_runtime(train_cfg, plan_ref if plan_ref is not None else train_cfg.plan)
    try:
        progress = train_cfg.progress and runtime.is_main
        train, val, ds = build_loaders(train_cfg, model_cfg.vocab_size, runtime.dp_rank, runtime.dp_size, progress)
        if runtime.is_main:
            Path(train_cfg.out_dir).mkdir(parents=True, exist_ok=True)
            write_yaml(train_cfg, Path(train_cfg.out_dir) / "config.yaml")
            plan = getattr(runtime, "plan", None)
            if plan is not None:  # the layout this run used, for `meshwright report`
                plan.save(Path(train_cfg.out_dir) / "plan.yaml")
            print(f"train: model {model_cfg.name} ({model_cfg.num_params() / 1e6:.2f}M params) | data {ds.path} "
                  f"({len(ds):,} tokens) | {train_cfg.steps} steps x {train_cfg.global_batch}x{train_cfg.seq_len} tokens | "
                  f"{type(runtime).__name__}, world {runtime.world_size} | out {train_cfg.out_dir}", flush=True)
        trainer = Trainer(train_cfg, runtime, train, val, model_cfg, cluster)
        return trainer.fit(resume=resume)
    finally:
        runtime.close()
        _destroy_process_group()


def _destroy_process_group() -> None:
    """Tear down the group the distributed runtime started, so no communicator thread outlives the
    interpreter (an abort at exit, "terminate called without an active exception", was seen without it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # local teardown: no barrier, so a rank that failed does not wait on the others


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="Train a model from a train config",
        description="Train a model. CONFIG is a preset in configs/train/ (" + ", ".join(preset_names("train")) +
                    ") or a YAML path; KEY=VALUE pairs override fields (dotted for nested: data.max_files=50).",
    )
    p.add_argument("config", metavar="CONFIG", help="train preset name or path to a TrainConfig YAML")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE",
                   help="field overrides, e.g. steps=100 lr=1e-3 (options may come before or after them)")
    _add_flags(p)
    p.set_defaults(func=_run)


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", default=None, metavar="PLAN|auto",
                   help="Plan YAML/JSON path, or 'auto' to let the planner choose (default: config's plan, else one process / pure DP)")
    p.add_argument("--resume", action="store_true", help="resume from OUT_DIR/ckpt/latest if it exists")
    p.add_argument("--resume-from", default=None, metavar="CKPT", help="resume from this checkpoint directory")


def _split_overrides(args: argparse.Namespace) -> None:
    """Flags written after the KEY=VALUE overrides land in the remainder; pull them out here."""
    tail = argparse.ArgumentParser(prog="meshwright train", add_help=False)
    _add_flags(tail)
    tail.add_argument("overrides", nargs="*")
    ns, unknown = tail.parse_known_intermixed_args(args.overrides)
    if unknown:
        raise ConfigError(f"option={unknown[0]!r} is invalid; valid: --plan, --resume, --resume-from or KEY=VALUE")
    args.overrides = ns.overrides
    args.plan = ns.plan if ns.plan is not None else args.plan
    args.resume = args.resume or ns.resume
    args.resume_from = ns.resume_from if ns.resume_from is not None else args.resume_from


def _run(args: argparse.Namespace) -> int:
    _split_overrides(args)
    overrides = dict(parse_override(o) for o in args.overrides)
    cfg = load_train_config(args.config, overrides)
    resume: bool | str = args.resume_from if args.resume_from else args.resume
    if not resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        resume = True  # an elastic restart (torchrun --max-restarts) continues from the latest complete checkpoint
    summary = run_training(cfg, args.plan, resume)
    if summary["steps_this_run"] == 0:
        return 0
    return 0 if summary.get("final_loss") is not None else 1  # every step was skipped as NaN


__all__ = ["build_runtime", "run_training", "register", "resolve_plan"]
