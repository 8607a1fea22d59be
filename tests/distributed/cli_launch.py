"""The runs of the one 2-rank launch several test modules share (conftest.cli_launch; tests/distributed/cli_runs.py runs
them in turn, each with a process group of its own, and stops at the first that fails). A launch costs ~12 CPU-s of
startup (torchrun's agent, every rank importing torch and meshwright) before any run does anything.

Runs, in order (the numbers cli_runs prints):
  0-2  test_train_cli_parallel.py: a layer-wise plan, then ``--plan auto`` twice (profiled once, then reused);
  3-8  test_shard_checkpoint_midrun.py: per case a straight run, then its copy resumed from the step-3 checkpoint;
  9-10 test_grow_positions_torchrun.py: an FSDP2 run at max_seq_len 32, then (its step-2 directory copied for the
       one-process resume) the run resumed grown to 64;
  11-12 test_profile_hardware.py: ``profile hardware``, ``profile model``.
"""

from __future__ import annotations

import json
from pathlib import Path

TRAIN = ["train", "configs/train/tiny-test.yaml"]

# test_shard_checkpoint_midrun.py: mid-run checkpoints under expert parallelism, megatron TP and torch's ZeRO-1
# (ZeroRedundancyOptimizer, each rank writing its own parameters' states: parallel/zero1_state.py; saved async)
MIDRUN_CASES = {
    "moe-ep2": ["model=tiny-moe", "--plan", "configs/plans/tiny-moe-ep2.yaml"],
    "tp2-megatron": ["tp_backend=megatron", "--plan", "{tmp}/tp2.yaml"],
    "zero1-async": ["ckpt_async=true", "--plan", "{tmp}/zero1.yaml"],
}
TP2_NO_SP = "version: 1\nmodel: tiny\nseq_len: 64\nglobal_batch: 8\nmicro_batch: 4\nlayers:\n  - {tp: 2, dp: 1, repeat: 4}\n"
ZERO1 = "version: 1\nmodel: tiny\nseq_len: 64\nglobal_batch: 8\nmicro_batch: 4\nlayers:\n  - {dp: 2, zero: 1, repeat: 4}\n"


def midrun_train(out, extra, *flags) -> list[str]:
    return [*TRAIN, f"out_dir={out}", "steps=5", "warmup_steps=1", "eval_every=0", "log_every=1", "ckpt_every=3",
            "energy=false", "data.max_files=20", *extra, *flags]


def midrun_dirs(tmp: Path) -> dict[str, tuple[Path, Path]]:
    """Per mid-run case: the straight run's directory and the resumed copy's."""
    return {case: (tmp / "midrun" / case / "straight", tmp / "midrun" / case / "resumed") for case in sorted(MIDRUN_CASES)}


# test_grow_positions_torchrun.py: grow_positions under FSDP2 (ZeRO-3 on 2 ranks)
GPT2 = {"name": "g", "arch": "gpt2", "vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden": 64,
        "max_seq_len": 32}


def grow_files(tmp: Path, seq_len: int, **overrides) -> tuple[str, str]:
    """The plan and train config (JSON) of the grow_positions run at ``seq_len``, writing to ``tmp/run``."""
    model = {**GPT2, "max_seq_len": seq_len}
    plan = {"version": 1, "model": model, "seq_len": seq_len, "global_batch": 4, "micro_batch": 2,
            "layers": [{"dp": 2, "zero": 3, "repeat": 2}], "embedding": {"tp": 1, "zero": 3}}
    cfg = {"model": model, "data": {"path": "default", "max_files": 20}, "seq_len": seq_len, "global_batch": 4,
           "micro_batch": 2, "steps": 2, "warmup_steps": 1, "eval_every": 0, "log_every": 1, "energy": False,
           "progress": False, "out_dir": str(tmp / "run"), **overrides}
    tmp.mkdir(parents=True, exist_ok=True)
    paths = tmp / f"plan{seq_len}.json", tmp / f"cfg{seq_len}.json"
    paths[0].write_text(json.dumps(plan))
    paths[1].write_text(json.dumps(cfg))
    return str(paths[0]), str(paths[1])


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def launch_args(tmp: Path) -> list[str]:
    """cli_runs' arguments for every run above, writing under ``tmp``."""
    cache = tmp / "cache"
    runs = [[*TRAIN, f"out_dir={tmp / 'layerwise'}", "steps=4", "warmup_steps=1", "eval_every=2", "log_every=1",
             "--plan", "configs/plans/tiny-layerwise.yaml"]]
    for attempt in range(2):
        runs.append([f"--env=MESHWRIGHT_CACHE_DIR={cache}", *TRAIN, f"out_dir={tmp / f'auto{attempt}'}", "steps=2",
                     "eval_every=0", "log_every=1", "--plan", "auto"])
    (tmp / "tp2.yaml").write_text(TP2_NO_SP)  # megatron TP has no sequence parallelism
    (tmp / "zero1.yaml").write_text(ZERO1)
    for case, (straight, resumed) in midrun_dirs(tmp).items():
        extra = [a.format(tmp=tmp) for a in MIDRUN_CASES[case]]
        runs.append(midrun_train(straight, extra))
        runs.append([f"--copy={straight}:{resumed}",
                     *midrun_train(resumed, extra, "--resume-from", str(resumed / "ckpt" / "step_000003"))])
    grow = tmp / "grow"
    plan32, cfg32 = grow_files(grow, 32)
    plan64, cfg64 = grow_files(grow, 64, steps=4, grow_positions="copy")
    runs.append(["train", cfg32, "--plan", plan32])
    runs.append([f"--copy={grow / 'run'}:{grow / 'one'}",  # the step-2 run, for the one-process resume
                 "train", cfg64, "--plan", plan64, "--resume", "--allow-config-change"])
    runs.append(["profile", "hardware", "--sizes", "64,128", "--iters", "2", "--timeout-s", "60",
                 "--out", str(tmp / "hw.json")])
    runs.append(["profile", "model", "--model", "tiny", "--batch-sizes", "1,2", "--seq-lens", "32,64", "--tp", "1,2",
                 "--iters", "2", "--timeout-s", "60", "--out", str(tmp / "model.json")])
    args: list[str] = []
    for run in runs:
        args += [*(["::"] if args else []), *run]
    return args
