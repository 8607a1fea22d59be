"""ZeRO-1 beside DDP (ZeRO-0) and FSDP2 (ZeRO-2/3): per-rank optimizer-state bytes and step time of `tiny`, gloo.

One torchrun launch per dp size (2 and 4 ranks): the four ZeRO levels are built side by side in that launch and
timed in interleaved rounds (level 0, 1, 2, 3, then again), so the shared box's drift hits them alike; the table
gives each level's figures as ratios to ZeRO-0 of the same launch. Optimizer-state bytes are each rank's AdamW
moments (local shards; ``data_parallel.sharded_state_bytes``): deterministic. Beside them the planner's prediction
for the largest rank, from the functions its cost model uses: ``model_state_bytes`` (ZeRO-0/2/3: the states over
dp) and, for ZeRO-1, ``zero1_partition.stage_state_numels`` (whole parameters per rank, the largest share), as
``cost_model.zero1_states_correction`` counts it. Step time (forward-backward, clip, AdamW step; barriers around
each step) is the median over the timed steps; on a shared 2-core CPU it is noisy: read the ratios.

    .venv/bin/python benchmarks/bench_zero1.py [--steps 4] [--rounds 3] [--dp 2 4]
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

MODEL, SEQ, GLOBAL, MICRO = "tiny", 128, 8, 2
ZEROS = (0, 1, 2, 3)


def plan_dict(dp: int, zero: int) -> dict:
    """``zero`` on every block; the embedding and head at the same level for FSDP2 (ZeRO-1 covers their states
    anyway: one ZeroRedundancyOptimizer over the stage)."""
    d = {"model": MODEL, "seq_len": SEQ, "global_batch": GLOBAL, "micro_batch": MICRO,
         "layers": [{"dp": dp, "zero": zero, "repeat": 4}]}
    if zero >= 2:
        d["embedding"] = {"zero": zero}
    return d


def predicted_state_bytes(dp: int, zero: int) -> int:
    """The planner's optimizer-state bytes on the largest rank (fp32 AdamW: two 4-byte moments per element)."""
    from meshwright.config import load_cluster, load_model_config
    from meshwright.launcher.planner import cost_model as cm
    from meshwright.launcher.planner.zero1_partition import stage_state_numels
    from meshwright.plan import plan_from_dict

    cfg = load_model_config(MODEL)
    plan = plan_from_dict(plan_dict(dp, zero))
    if zero == 1:
        return int(8 * max(stage_state_numels(cfg, plan, dp, {})))
    hw = cm.apply_stack(cm.hardware_from_cluster(load_cluster("dgx-a100-80g"), stack="meshwright", dtype="fp32"),
                        "meshwright")
    blocks = sum(cfg.layer_params(j) for j in range(cfg.n_layers))
    ends = cm.embedding_param_count(cfg, True, True, 1)
    return int(cm.model_state_bytes(blocks, dp, zero, "fp32", hw)["optimizer"]
               + cm.model_state_bytes(ends, dp, plan.embedding.zero, "fp32", hw)["optimizer"])


def batches(dp_rank: int, dp_size: int, step: int) -> list:
    tok = torch.randint(0, 256, (GLOBAL, SEQ + 1), generator=torch.Generator().manual_seed(step))
    per = GLOBAL // dp_size
    tok = tok[dp_rank * per:(dp_rank + 1) * per]
    return [(tok[i:i + MICRO, :-1], tok[i:i + MICRO, 1:]) for i in range(0, per, MICRO)]


def worker(steps: int, rounds: int, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from meshwright.parallel.data_parallel import sharded_state_bytes
    from meshwright.parallel.runtime import DistributedRuntime
    from meshwright.parallel.teardown import shutdown
    from meshwright.plan import plan_from_dict

    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    torch.set_num_threads(1)
    world = dist.get_world_size()
    runs = {}
    for z in ZEROS:  # built side by side, same seed: the same model under each level
        rt = DistributedRuntime(MODEL, plan_from_dict(plan_dict(world, z)), seed=0)
        opt = rt.build_optimizer(lambda g: torch.optim.AdamW(g, lr=1e-3))
        runs[z] = {"rt": rt, "opt": opt, "times": [], "losses": []}
    step = 0
    for r in range(rounds + 1):  # round 0 warms up (the states are created, DDP rebuilds its buckets)
        for z, run in runs.items():
            rt, opt = run["rt"], run["opt"]
            for k in range(steps if r else 2):
                dist.barrier()
                t0 = time.perf_counter()
                loss = rt.forward_backward(batches(rt.dp_rank, rt.dp_size, step + k))
                rt.clip_grad_norm_(1.0)
                rt.optimizer_step(opt)
                dist.barrier()
                if r:
                    run["times"].append(time.perf_counter() - t0)
                    run["losses"].append(loss)
        step += steps if r else 2
    results = {}
    for z, run in runs.items():
        held = [None] * world
        dist.all_gather_object(held, sharded_state_bytes(run["opt"]))
        results[z] = {"state_bytes": held, "step_s": statistics.median(run["times"]), "n_steps": len(run["times"])}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    for z in reversed(ZEROS):
        runs[z]["rt"].close()
    del runs
    shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per level per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.steps, args.rounds, args.worker)
    from meshwright.config import load_model_config

    n = sum(p.numel() for p in __import__("meshwright.models", fromlist=["build_model"]).build_model(
        load_model_config(MODEL), device="meta").parameters())
    print(f"model {MODEL}: {n:,} parameters; AdamW fp32 states whole: {8 * n:,} B")
    print("\n| dp | ZeRO | state bytes per rank (measured) | max rank | vs ZeRO-0 | planner (max rank) | "
          "measured / planner | step s (median) | vs ZeRO-0 |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for dp in args.dp:
        got = run_workers(__file__, dp, ["--steps", str(args.steps), "--rounds", str(args.rounds)], timeout=1200,
                          quiet=True)
        rows = {int(k): v for k, v in got.items()}
        base = rows[0]
        for z, r in rows.items():
            top, plan = max(r["state_bytes"]), predicted_state_bytes(dp, z)
            name = {0: "0 (DDP)", 1: "1 (ZeroRedundancyOptimizer)", 2: "2 (FSDP2)", 3: "3 (FSDP2)"}[z]
            print(f"| {dp} | {name} | {', '.join(f'{b:,}' for b in r['state_bytes'])} | {top:,} | "
                  f"{top / max(base['state_bytes']):.3f} | {plan:,} | {top / plan:.4f} | {r['step_s']:.3f} | "
                  f"{r['step_s'] / base['step_s']:.2f}x |")


if __name__ == "__main__":
    main()
