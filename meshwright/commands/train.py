"""`meshwright train CONFIG [KEY=VALUE ...] [--plan PLAN|auto] [--resume | --resume-from CKPT]`: train a model.

A thin adapter: parse the command line, load the train config, hand it to ``meshwright.train.build``.
Only argparse and the config package at import time: `meshwright --help`, completion and argument errors build
this parser, and ``meshwright.train.build`` imports torch (seconds); the run's imports are inside ``_run``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from meshwright.config import load_train_config, parse_override, preset_names
from meshwright.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model from a train config",
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
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh in an OUT_DIR that holds another run (removes only meshwright's own files there)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume although model/data/optimiser fields, seq_len, seed or global_batch (or the data set's "
                        "fingerprint) differ from the checkpoint's: the tokens read carry over (docs/training.md)")


def _split_overrides(args: argparse.Namespace) -> None:
    """Flags written after the KEY=VALUE overrides land in the remainder; pull them out here."""
    tail = argparse.ArgumentParser(prog="meshwright train", add_help=False)
    _add_flags(tail)
    tail.add_argument("overrides", nargs="*")
    ns, unknown = tail.parse_known_intermixed_args(args.overrides)
    if unknown:
        raise ConfigError(f"option={unknown[0]!r} is invalid; valid: --plan, --resume, --resume-from, --overwrite, "
                          f"--allow-config-change or KEY=VALUE")
    args.overrides = ns.overrides
    args.plan = ns.plan if ns.plan is not None else args.plan
    args.resume = args.resume or ns.resume
    args.resume_from = ns.resume_from if ns.resume_from is not None else args.resume_from
    args.overwrite = args.overwrite or ns.overwrite
    args.allow_config_change = args.allow_config_change or ns.allow_config_change


def preflight(argv: list[str], world_size: int | None = None) -> Any:
    """Check a ``train ...`` command line without running it: its config, overrides and plan file (and that the
    file fits the config and, given ``world_size``, the devices it will run on), one line per mistake
    (``meshwright launch`` calls it before starting anything on the hosts), ``lora.init_adapter`` included where this
    host has it (train/peft_init.py ``preflight_init_adapter``). Returns the TrainConfig (its ``preempt_grace_s`` sets
    torchrun's shutdown timeout)."""
    p = argparse.ArgumentParser(prog="meshwright train", add_help=False)
    p.add_argument("config")
    p.add_argument("overrides", nargs=argparse.REMAINDER)
    _add_flags(p)
    args, unknown = p.parse_known_args(argv[1:])
    args.overrides = list(args.overrides) + unknown
    _split_overrides(args)
    cfg = load_train_config(args.config, dict(parse_override(o) for o in args.overrides))
    from meshwright.plan import default_plan
    from meshwright.train.build import (_plan_needs_parallel, check_distributed_run, check_positions, load_plan_file,
                                        resolve_model_config)
    from meshwright.train.plan_match import check_plan_matches

    plan = args.plan if args.plan is not None else cfg.plan
    loaded = None
    if plan is not None and plan != "auto":
        loaded = load_plan_file(plan)
        assert loaded is not None
        model = resolve_model_config(cfg)
        check_plan_matches(loaded, cfg, model, loaded.world_size() if world_size is None else world_size, plan)
    if world_size is not None and (world_size > 1 or (loaded is not None and _plan_needs_parallel(loaded))):
        # what the distributed runtime refuses (a layout it cannot run, lora or DeepSpeed with compile, meft, ...):
        # said here once, not by every rank of every host after they started. An init_from absent here may be on
        # the hosts' own disks: without a plan file, only the checks that need no model then
        model = resolve_model_config(cfg) if loaded is not None or cfg.init_from is None or \
            os.path.exists(cfg.init_from) else None
        if model is not None:
            check_positions(cfg, model)
            if plan is None:
                loaded = default_plan(model, world_size, cfg.seq_len, cfg.global_batch, cfg.micro_batch)
        check_distributed_run(cfg, model, loaded)
    if cfg.lora is not None and cfg.lora.init_adapter is not None:  # what every rank would check at build
        from meshwright.train.build import resume_target
        from meshwright.train.checkpoint import follow_pointer
        from meshwright.train.peft_init import preflight_init_adapter

        resume: bool | str = str(follow_pointer(args.resume_from)) if args.resume_from else args.resume
        note = preflight_init_adapter(cfg, bool(resume) and resume_target(cfg, resume) is not None)
        if note:
            print(f"meshwright launch: {note}", file=sys.stderr)
    return cfg


def _run(args: argparse.Namespace) -> int:
    _split_overrides(args)
    overrides = dict(parse_override(o) for o in args.overrides)
    cfg = load_train_config(args.config, overrides)
    from meshwright.train.build import run_training  # torch: after the command line and config are known good
    from meshwright.train.checkpoint import follow_pointer
    from meshwright.train.preemption import EXIT_PREEMPTED

    resume: bool | str = str(follow_pointer(args.resume_from)) if args.resume_from else args.resume
    if not resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        resume = True  # an elastic restart (torchrun --max-restarts) continues from the latest complete checkpoint
    summary = run_training(cfg, args.plan, resume, overwrite=args.overwrite,
                           allow_config_change=args.allow_config_change)
    if summary.get("stopped_by"):  # preempted: a checkpoint is saved, the run is not finished
        return EXIT_PREEMPTED
    if summary["steps_this_run"] == 0:
        return 0
    return 0 if summary.get("final_loss") is not None else 1  # every step was skipped as NaN


__all__ = ["register"]
