"""The Trainer, data loader and DCP checkpoints under torchrun (2 ranks, gloo, default plan = pure DP):
the loss trajectory equals the one-process run, and the 2-rank checkpoint resumes in one process
(DCP reshards; the loader position is counted in global sequences) on the same trajectory. The 2-rank run writes
its checkpoints in the background (ckpt_async), the one-process runs synchronously.
Tolerance: relative 1e-5 on each step's loss (fp32; gradient all-reduce changes summation order)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from helpers import run_torchrun

HERE = Path(__file__).resolve().parent
RTOL = 1e-5
ARGS = ["tiny-test", "steps=6", "ckpt_every=3", "log_every=1", "eval_every=3", "data.max_files=20", "progress=false"]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


@pytest.mark.timeout(300)
def test_two_rank_training_matches_one_process_and_resumes_across_layouts(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    two = tmp_path / "two"
    # ckpt_async, its writer held until step 5: the step-3 checkpoint is written after steps 4 and 5 changed the
    # weights, on its own gloo group while training collectives go on; it must still hold step 3's state (the resume).
    # preempt_grace_s=1e-9: every step exceeds it, so from step 2 on the ranks agree on stops eagerly (the request
    # rides the lagged all-reduce; a rank switching a call before the other would hang or stop alone)
    proc = run_torchrun(HERE / "trainer_worker.py", 2, [*ARGS, f"out_dir={two}", "ckpt_async=true",
                                                        "preempt_grace_s=1e-9"], timeout=240,
                        env={"MESHWRIGHT_CACHE": str(cache), "MESHWRIGHT_TEST_HOLD_CKPT_WRITE": "5"})
    assert "rank 0 at step 5: checkpoints ['step_000003.tmp']" in proc.stdout, proc.stdout[-2000:]
    grace = [x for x in proc.stdout.splitlines() if "warning: a stop (SIGTERM/SIGUSR1) may take" in x]
    assert len(grace) == 1 and "(2 step(s) of " in grace[0] and "one step sooner" in grace[0], proc.stdout[-2000:]
    assert len(list(cache.glob("stdlib-byte-*"))) == 1  # two ranks filled the cache once, atomically
    ckpt = two / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_000003", "step_000006"]
    assert (ckpt / "step_000006" / "rng_rank00001.pt").is_file()

    from meshwright.cli import main

    monkeypatch.setenv("MESHWRIGHT_CACHE", str(cache))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = tmp_path / "one"
    assert main(["train", *ARGS, f"out_dir={one}"]) == 0
    a, b = losses(two), losses(one)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=RTOL), (s, a[s], b[s])

    # resume the 2-rank step-3 checkpoint in one process
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "ckpt" / "step_000006")
    (resumed / "ckpt" / "latest").write_text("step_000003\n")
    assert main(["train", *ARGS, f"out_dir={resumed}", "--resume"]) == 0
    c = losses(resumed)
    assert sorted(c) == list(range(1, 7))
    for s in (4, 5, 6):
        assert c[s] == pytest.approx(a[s], rel=RTOL), (s, a[s], c[s])



MIXED_PP_PLAN = """version: 1
model: tiny
seq_len: 64
global_batch: 8
micro_batch: 4
pipeline: {degree: 2, schedule: gpipe, microbatches: 1}
layers:
  - {dp: 2, zero: 3, repeat: 2}
  - {dp: 2, repeat: 2}
"""
OVERLAP_ARGS = ["train", "configs/train/tiny-test.yaml", "warmup_steps=1", "log_every=1", "data.max_files=20"]


def overlapped(proc, world: int, runs: int = 1) -> list[set[str]]:
    """Per run, the distinct 'overlapped [...]' lists the ranks printed (one when all ranks agree). Matched anywhere in
    the output: torchrun may join two ranks' lines into one."""
    found = re.findall(r"rank (\d+) run (\d+) overlapped (\[[0-9, ]*\])", proc.stdout)
    assert sorted((int(run), int(rank)) for rank, run, _ in found) == \
        [(run, rank) for run in range(runs) for rank in range(world)], proc.stdout[-2000:]
    return [{steps for _, r, steps in found if int(r) == run} for run in range(runs)]


def torn_down(proc, world: int, runs: int = 1) -> list[set[str]]:
    """Per run, what the ranks watched at its teardown (overlap_worker.watch_teardown), after asserting that none of it
    was alive when the process group was destroyed: DDP wrappers and their Reducers, pipeline schedules and stages,
    stage modules, meshes, the optimizer, holder attributes left on the runtime."""
    found = re.findall(r"rank (\d+) run (\d+) teardown alive (\[[^\]]*\]) of (\[[^\]]*\])", proc.stdout)
    assert sorted((int(run), int(rank)) for rank, run, _, _ in found) == \
        [(run, rank) for run in range(runs) for rank in range(world)], proc.stdout[-2000:]
    assert {left for _, _, left, _ in found} == {"[]"}, [f for f in found if f[2] != "[]"]
    return [{kinds for _, r, _, kinds in found if int(r) == run} for run in range(runs)]


@pytest.mark.timeout(600)
def test_overlapped_readback_is_decided_alike_on_every_rank(tmp_path):
    """pp2 x dp2 with ZeRO-3 (DTensor) blocks on stage 0 and replicated (plain) blocks on stage 1, fused AdamW:
    stage 0 cannot skip non-finite steps on the device, stage 1 can. Were stage 1 to read step N back after
    queueing step N+1 while stage 0 logs step N first, their collectives (the log's memory gather against the
    pipeline's sends) would cross and hang: no rank overlaps, and the run finishes with every step logged.
    Under DDP and under a plain pp2 pipeline (every rank plain) every rank overlaps the same steps (not 3: eval,
    6: the end), with the losses, grad norms and eval losses of the run that reads every step back at once, bitwise.
    The four 2-rank runs share one launch (overlap_worker.py, cli_runs.py), each with a process group of its own.
    Each run's teardown (parallel/teardown.py): when its group is destroyed none of what holds it is alive (DDP and its
    C++ Reducer under dp2, the pipeline schedule and stages under pp2, the meshes, the optimizer): freed after it, a
    Reducer held a gloo group's last reference and gloo's destructor deadlocked on the GIL."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(MIXED_PP_PLAN)
    out = tmp_path / "mixed"
    proc = run_torchrun(HERE / "overlap_worker.py", 4, [*OVERLAP_ARGS, f"out_dir={out}", "steps=4", "eval_every=0",
                                                        "--plan", str(plan)], timeout=240)
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert overlapped(proc, 4) == [{"[]"}]
    # the run's teardown (parallel/teardown.py): nothing that holds a group outlives close(), pipeline stages included
    pipelined = torn_down(proc, 4)[0]
    assert len(pipelined) == 1 and "'PipelineStage', 'meshes', 'optimizer', 'schedule', 'stage_module'" in next(iter(pipelined))
    runs, args = [], []
    for layout in ("dp2", "pp2"):
        for name, env in (("lagged", []), ("eager", ["--env=MESHWRIGHT_TEST_NO_OVERLAP=1"])):
            runs.append((layout, name))
            args += [*(["::"] if args else []), *env, *OVERLAP_ARGS, f"out_dir={tmp_path / f'{layout}-{name}'}", "steps=6",
                     "eval_every=3", "--plan", f"configs/plans/tiny-{layout}.yaml"]
    proc = run_torchrun(HERE / "overlap_worker.py", 2, args, timeout=400)
    seen = overlapped(proc, 2, runs=len(runs))
    for (layout, _), kinds in zip(runs, torn_down(proc, 2, runs=len(runs))):  # DDP's Reducer went before the group
        assert kinds == ({"['DDP', 'Reducer', 'meshes', 'optimizer', 'stage_module']"} if layout == "dp2" else
                         {"['PipelineStage', 'meshes', 'optimizer', 'schedule', 'stage_module']"}), (layout, kinds)
    logs = {}
    for (layout, name), steps in zip(runs, seen):
        assert steps == ({"[1, 2, 4, 5]"} if name == "lagged" else {"[]"}), (layout, name)
        logs[layout, name] = [json.loads(line) for line in (tmp_path / f"{layout}-{name}" / "log.jsonl").read_text().splitlines()]
    for layout in ("dp2", "pp2"):
        assert [r["step"] for r in logs[layout, "lagged"]] == list(range(1, 7))
        for a, b in zip(logs[layout, "lagged"], logs[layout, "eager"]):
            assert (a["step"], a["loss"], a["grad_norm"], a.get("eval_loss")) == \
                   (b["step"], b["loss"], b["grad_norm"], b.get("eval_loss")), layout
