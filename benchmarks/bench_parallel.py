"""Tokens/s and saved-activation bytes of `tiny` on 2 ranks (dp2, fsdp2, tp2, tp2+sp, pp2) vs one process.

One run: the one-process baseline is measured in this process, then one torchrun launch (2 ranks,
gloo) measures every layout; the table prints ratios against the baseline. Saved bytes (unique
storages autograd keeps for backward during one optimizer step, parameters excluded, summed over
the step's micro-batches, per rank; counted as in ``meshwright.memory.accounting`` with the counted
tensors pinned for the step) are deterministic; tokens/s on a shared 2-core CPU are not.

    .venv/bin/python benchmarks/bench_parallel.py [--steps 5] [--seq 128] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from self_launch import run_workers  # noqa: E402  (this directory: the torchrun of the workers)


from meshwright.memory.accounting import count_saved_bytes  # noqa: E402  (pins counted tensors: exact per step)
from meshwright.models import build_model, lm_loss  # noqa: E402

MODEL, GLOBAL, MICRO = "tiny", 8, 4
LAYOUTS = {
    "dp2 (DDP)": {"layers": [{"dp": 2, "repeat": 4}]},
    "fsdp2 (ZeRO-3)": {"layers": [{"dp": 2, "zero": 3, "repeat": 4}], "embedding": {"zero": 3}},
    "tp2 (DTensor)": {"layers": [{"tp": 2, "repeat": 4}]},
    "tp2+sp": {"layers": [{"tp": 2, "sp": True, "repeat": 4}]},
    "pp2 (1F1B)": {"layers": [{"repeat": 4}], "pipeline": {"degree": 2, "schedule": "1f1b", "microbatches": 2}},
}


def batches(seq: int, dp_rank: int, dp_size: int, step: int):
    g = torch.Generator().manual_seed(step)
    tok = torch.randint(0, 256, (GLOBAL, seq + 1), generator=g)
    per = GLOBAL // dp_size
    tok = tok[dp_rank * per:(dp_rank + 1) * per]
    return [(tok[i:i + MICRO, :-1], tok[i:i + MICRO, 1:]) for i in range(0, per, MICRO)]


def one_process(seq: int, steps: int) -> dict:
    torch.set_num_threads(1)  # each torchrun rank gets one thread too: compare like with like
    model = build_model(MODEL, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(i: int) -> int:
        mbs = batches(seq, 0, 1, i)
        with count_saved_bytes(exclude=list(model.parameters())) as sb:
            for x, y in mbs:
                (lm_loss(model(x), y) / len(mbs)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return sb.total

    saved = step(0)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i + 1)
    dt = time.perf_counter() - t0
    return {"tokens_per_s": GLOBAL * seq * steps / dt, "saved_bytes": [saved]}


def worker(seq: int, steps: int, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist
    from tqdm import tqdm

    from meshwright.parallel.runtime import DistributedRuntime
    from meshwright.parallel.teardown import shutdown
    from meshwright.plan import plan_from_dict

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    rank = dist.get_rank()
    results = {}
    for name, layout in tqdm(LAYOUTS.items(), disable=rank != 0, desc="layouts"):
        plan = plan_from_dict({"model": MODEL, "seq_len": seq, "global_batch": GLOBAL, "micro_batch": MICRO, **layout})
        rt = DistributedRuntime(MODEL, plan, seed=0)
        opt = rt.build_optimizer(lambda g: torch.optim.AdamW(g, lr=1e-3))
        with count_saved_bytes(exclude=list(rt.parameters())) as sb:
            rt.forward_backward(batches(seq, rt.dp_rank, rt.dp_size, 0))
        rt.optimizer_step(opt)
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(steps):
            rt.forward_backward(batches(seq, rt.dp_rank, rt.dp_size, i + 1))
            rt.clip_grad_norm_(1.0)
            rt.optimizer_step(opt)
        dist.barrier()
        dt = time.perf_counter() - t0
        saved = [None] * dist.get_world_size()
        dist.all_gather_object(saved, sb.total)
        results[name] = {"tokens_per_s": GLOBAL * seq * steps / dt, "saved_bytes": saved}
        del opt
        rt.close()
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    shutdown()  # each runtime was closed (DDP first); collect, then destroy (parallel/teardown.py)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    a.bar(names, [rows[n]["tokens_per_s"] for n in names], color="tab:blue")
    a.set_ylabel("tokens/s (all ranks)")
    a.set_title("throughput, tiny, 2-core CPU (noisy)")
    b.bar(names, [max(rows[n]["saved_bytes"]) / 2**20 for n in names], color="tab:orange")
    b.set_ylabel("MiB saved for backward (max rank)")
    b.set_title("saved activations per rank per step")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.seq, args.steps, args.worker)
    before = one_process(args.seq, args.steps)
    rows = {"1 process": before}
    rows.update(run_workers(__file__, 2, ["--steps", str(args.steps), "--seq", str(args.seq)]))
    after = one_process(args.seq, args.steps)  # the box is shared: bracket the 2-rank run, use the mean
    before["tokens_per_s"] = (before["tokens_per_s"] + after["tokens_per_s"]) / 2
    print(f"1 process tokens/s before / after the 2-rank run: {2 * before['tokens_per_s'] - after['tokens_per_s']:,.0f} / "
          f"{after['tokens_per_s']:,.0f}")
    base = rows["1 process"]
    print(f"\n| layout | tokens/s | vs 1 process | saved bytes/rank (rank0, rank1) | vs 1 process (max rank) |")
    print("|---|---:|---:|---|---:|")
    for name, r in rows.items():
        sb = ", ".join(f"{b:,}" for b in r["saved_bytes"])
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {sb} | "
              f"{max(r['saved_bytes']) / base['saved_bytes'][0]:.2f}x |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    plot(rows, Path(args.out) / "parallel.png")
    print(f"\nplot: {Path(args.out) / 'parallel.png'}")


if __name__ == "__main__":
    main()
