"""Launches shared by several torchrun test modules: each launch costs ~12 CPU-s of startup (torchrun's agent and
every rank importing torch and meshwright) before it does anything, so modules that need a few CLI runs on 2 ranks share
one (tests/distributed/cli_launch.py lists its runs), and so do modules whose 2-rank worker scripts each took a launch
of their own (tests/distributed/worker_launch.py lists them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import REPO, run_torchrun


@pytest.fixture(scope="session")
def cli_launch(tmp_path_factory) -> tuple[str, Path]:
    """ONE 2-rank cli_runs launch of the runs of test_train_cli_parallel.py, test_shard_checkpoint_midrun.py,
    test_grow_positions_torchrun.py and test_profile_hardware.py (cli_launch.launch_args): (the launch's stdout, the
    directory its runs wrote under)."""
    from cli_launch import launch_args

    tmp = tmp_path_factory.mktemp("cli_launch")
    proc = run_torchrun(REPO / "tests" / "distributed" / "cli_runs.py", 2, launch_args(tmp), timeout=1100)
    return proc.stdout, tmp


@pytest.fixture(scope="session")
def worker_launch(tmp_path_factory) -> Path:
    """ONE 2-rank worker_runs launch of the workers of test_state_bytes.py, test_hf_sharded_load.py,
    test_coat_distributed.py, test_meft_ddp.py and test_wta_crs_tp.py (worker_launch.CASES): the directory under which
    each case wrote its outputs (``worker_launch.case_dir``)."""
    from worker_launch import launch_args

    tmp = tmp_path_factory.mktemp("worker_launch")
    run_torchrun(REPO / "tests" / "distributed" / "worker_runs.py", 2, launch_args(tmp), timeout=1200)
    return tmp
