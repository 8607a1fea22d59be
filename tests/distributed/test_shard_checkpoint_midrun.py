"""Mid-run checkpoints under expert parallelism and megatron TP: saving at step 3 must leave the live
optimizer state alone, so steps 4.. run and a resume from step 3 replays them bit for bit (#19 item 4:
the shard hooks wrote DTensors into the state the optimizer shares with ``state_dict()``).

Both cases' straight runs and resumes share one torchrun launch (tests/distributed/cli_runs.py; a launch costs
~13 s of startup before any step): each straight run's directory is copied, and the copy resumes from its
step-3 checkpoint (``--resume-from``, which drops the copied log's steps 4-5 and redoes them)."""

from __future__ import annotations

import json

import pytest

from helpers import REPO, run_torchrun

CASES = {
    "moe-ep2": ["model=tiny-moe", "--plan", "configs/plans/tiny-moe-ep2.yaml"],
    "tp2-megatron": ["tp_backend=megatron", "--plan", "{tmp}/tp2.yaml"],
}
TP2_NO_SP = "version: 1\nmodel: tiny\nseq_len: 64\nglobal_batch: 8\nmicro_batch: 4\nlayers:\n  - {tp: 2, dp: 1, repeat: 4}\n"


def train(out, extra, *flags) -> list[str]:
    return ["train", "configs/train/tiny-test.yaml", f"out_dir={out}", "steps=5", "warmup_steps=1", "eval_every=0",
            "log_every=1", "ckpt_every=3", "energy=false", "data.max_files=20", *extra, *flags]


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per case: the straight run's directory and the resumed copy's."""
    tmp = tmp_path_factory.mktemp("midrun")
    (tmp / "tp2.yaml").write_text(TP2_NO_SP)  # megatron TP has no sequence parallelism
    args, dirs = [], {}
    for case in sorted(CASES):
        extra = [a.format(tmp=tmp) for a in CASES[case]]
        straight, resumed = tmp / case / "straight", tmp / case / "resumed"
        args += [*(["::"] if args else []), *train(straight, extra),
                 "::", f"--copy={straight}:{resumed}", *train(resumed, extra, "--resume-from",
                                                             str(resumed / "ckpt" / "step_000003"))]
        dirs[case] = straight, resumed
    run_torchrun(REPO / "tests" / "distributed" / "cli_runs.py", 2, args, timeout=600)
    return dirs


@pytest.mark.timeout(700)
@pytest.mark.parametrize("case", sorted(CASES))
def test_midrun_checkpoint_then_resume_is_exact(runs, case):
    straight_dir, resumed_dir = runs[case]
    straight = losses(straight_dir)
    assert sorted(straight) == [1, 2, 3, 4, 5]  # steps after the step-3 checkpoint ran
    summary = json.loads((resumed_dir / "summary.json").read_text())
    assert summary["resumed"] and summary["steps_this_run"] == 2  # the copy redid steps 4-5 from step 3
    resumed = losses(resumed_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    assert [resumed[s] for s in (4, 5)] == [straight[s] for s in (4, 5)]
