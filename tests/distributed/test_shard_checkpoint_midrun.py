"""Mid-run checkpoints under expert parallelism, megatron TP and torch's ZeRO-1 (``meshwright train`` with a zero=1
plan, saved async): saving at step 3 must leave the live optimizer state alone, so steps 4.. run and a resume from
step 3 replays them bit for bit (#19 item 4: the shard hooks wrote DTensors into the state the optimizer shares with
``state_dict()``; ZeRO-1's checkpoint holds each rank's own parameters' states, read back under the same partition).

Both cases' straight runs and resumes share one torchrun launch (tests/distributed/cli_runs.py; a launch costs
~13 s of startup before any step) with the runs of other modules (conftest.cli_launch, cli_launch.py): each
straight run's directory is copied, and the copy resumes from its step-3 checkpoint (``--resume-from``, which drops
the copied log's steps 4-5 and redoes them)."""

from __future__ import annotations

import json

import pytest

from cli_launch import MIDRUN_CASES, losses, midrun_dirs


@pytest.fixture(scope="module")
def runs(cli_launch):
    """Per case: the straight run's directory and the resumed copy's (runs 3-8 of conftest.cli_launch)."""
    return midrun_dirs(cli_launch[1])


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("case", sorted(MIDRUN_CASES))
def test_midrun_checkpoint_then_resume_is_exact(runs, case):
    straight_dir, resumed_dir = runs[case]
    straight = losses(straight_dir)
    assert sorted(straight) == [1, 2, 3, 4, 5]  # steps after the step-3 checkpoint ran
    summary = json.loads((resumed_dir / "summary.json").read_text())
    assert summary["resumed"] and summary["steps_this_run"] == 2  # the copy redid steps 4-5 from step 3
    resumed = losses(resumed_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    assert [resumed[s] for s in (4, 5)] == [straight[s] for s in (4, 5)]
