"""Launches shared by several torchrun test modules: each launch costs ~10 s of startup (torchrun's agent and every
rank importing torch and meshwright) before it does anything, so modules that need a few CLI runs on 2 ranks share
one (tests/distributed/cli_runs.py: runs in turn, each with a process group of its own)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import REPO, run_torchrun

TRAIN = ["train", "configs/train/tiny-test.yaml"]


@pytest.fixture(scope="session")
def cli_launch(tmp_path_factory) -> tuple[str, Path]:
    """ONE 2-rank launch of five CLI runs: runs 0-2 for test_train_cli_parallel.py (a layer-wise plan, then `--plan
    auto` twice: profiled once, then reused; out_dir ``layerwise``, ``auto0``, ``auto1``, auto's profile cache
    ``cache``), runs 3-4 for test_profile_hardware.py (``profile hardware`` -> ``hw.json``, ``profile model`` ->
    ``model.json``). The training runs come first, so their run numbers are those of a launch of their own.
    Returns (the launch's stdout, its directory)."""
    tmp = tmp_path_factory.mktemp("cli_launch")
    cache = tmp / "cache"
    args = [*TRAIN, f"out_dir={tmp / 'layerwise'}", "steps=4", "warmup_steps=1", "eval_every=2", "log_every=1",
            "--plan", "configs/plans/tiny-layerwise.yaml"]
    for attempt in range(2):
        args += ["::", f"--env=MESHWRIGHT_CACHE_DIR={cache}", *TRAIN, f"out_dir={tmp / f'auto{attempt}'}", "steps=2",
                 "eval_every=0", "log_every=1", "--plan", "auto"]
    args += ["::", "profile", "hardware", "--sizes", "64,128", "--iters", "2", "--timeout-s", "60",
             "--out", str(tmp / "hw.json"),
             "::", "profile", "model", "--model", "tiny", "--batch-sizes", "1,2", "--seq-lens", "32,64", "--tp", "1,2",
             "--iters", "2", "--timeout-s", "60", "--out", str(tmp / "model.json")]
    proc = run_torchrun(REPO / "tests" / "distributed" / "cli_runs.py", 2, args, timeout=800)
    return proc.stdout, tmp
