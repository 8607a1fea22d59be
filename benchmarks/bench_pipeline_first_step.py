"""Time to the first step of a pp2 pipeline, stage shapes inferred by torch (a trial forward, torch 2.13 also an
input-only backward, per stage) against fixed up front (``DistributedRuntime._stage_io``), and the forwards each
stage's chunk ran.

One torchrun launch (2 ranks, gloo, one thread each): per schedule and mode, a fresh runtime; the first
``forward_backward`` is timed in CPU seconds of the process (``time.process_time``, rank 0) and wall seconds
(between barriers), ``--reps`` times, medians reported; the forward counts are exact. Mode ``inferred`` builds the
schedule with ``io=None`` (the path before fixed shapes); everything else is the same runtime.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_pipeline_first_step.py [--reps 5] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from self_launch import run_workers  # noqa: E402  (this directory: the torchrun of the workers)

MODEL, GLOBAL, MICRO = "tiny", 8, 2
SCHEDULES = {"1f1b": {"degree": 2, "schedule": "1f1b", "microbatches": 4},
             "interleaved_1f1b": {"degree": 2, "schedule": "interleaved_1f1b", "microbatches": 4, "virtual_stages": 2}}


def batches(seq: int, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    tok = torch.randint(0, 256, (GLOBAL, seq + 1), generator=g)
    return [(tok[i:i + MICRO, :-1], tok[i:i + MICRO, 1:]) for i in range(0, GLOBAL, MICRO)]


def first_step(seq: int, pipeline: dict, mode: str) -> dict:
    """One fresh runtime's first training step: CPU s, wall s, forwards per chunk."""
    import torch.distributed as dist

    from meshwright.parallel.runtime import DistributedRuntime
    from meshwright.plan import plan_from_dict

    plan = plan_from_dict({"model": MODEL, "seq_len": seq, "global_batch": GLOBAL, "micro_batch": MICRO,
                           "layers": [{"repeat": 4}], "pipeline": pipeline})
    rt = DistributedRuntime(MODEL, plan, seed=0)
    if mode == "inferred":
        rt._stage_io = lambda tokens: None  # build_schedule(io=None): torch infers the shapes at the first step
    calls = [0] * len(rt.chunks)
    for i, chunk in enumerate(rt.chunks):
        chunk.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    mbs = batches(seq, 0)
    dist.barrier()
    c0, w0 = time.process_time(), time.perf_counter()
    rt.forward_backward(mbs)
    cpu = time.process_time() - c0
    dist.barrier()
    wall = time.perf_counter() - w0
    rt.close()
    return {"cpu_s": cpu, "wall_s": wall, "forwards": calls}


def worker(seq: int, reps: int, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from meshwright.parallel.teardown import shutdown

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    first_step(seq, SCHEDULES["1f1b"], "fixed")  # warm: imports (pipelining pulls dynamo), allocator
    rows = {}
    for name, pipeline in SCHEDULES.items():
        runs: dict[str, list[dict]] = {"inferred": [], "fixed": []}
        for _ in range(reps):
            for mode in runs:  # alternated: the shared box's load drifts alike for both
                runs[mode].append(first_step(seq, pipeline, mode))
        for mode, rs in runs.items():
            rows[f"{name} {mode}"] = {"cpu_s": statistics.median(r["cpu_s"] for r in rs),
                                      "wall_s": statistics.median(r["wall_s"] for r in rs),
                                      "forwards": rs[0]["forwards"], "microbatches": pipeline["microbatches"]}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(parts))
    shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.seq, args.reps, args.worker)
    parts = run_workers(__file__, 2, ["--seq", str(args.seq), "--reps", str(args.reps)])
    print(f"torch {torch.__version__}, {MODEL}, pp2, global batch {GLOBAL}, micro-batch {MICRO}, seq {args.seq}, "
          f"median of {args.reps}")
    print("\n| schedule, stage shapes | first step CPU s (rank 0 / rank 1) | first step wall s | "
          "chunk forwards (rank 0 / rank 1) | micro-batches |")
    print("|---|---:|---:|---|---:|")
    for key in parts[0]:
        r0, r1 = parts[0][key], parts[1][key]
        print(f"| {key} | {r0['cpu_s']:.3f} / {r1['cpu_s']:.3f} | {r0['wall_s']:.3f} | {r0['forwards']} / "
              f"{r1['forwards']} | {r0['microbatches']} |")


if __name__ == "__main__":
    main()
