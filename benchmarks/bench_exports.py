"""What restricting the search to a stack costs: for one model/cluster, the best layout meshwright runs and
the best each export target runs (``plan --emit X``), with predicted step time, MFU, whether the stack runs it
as planned, and the search time. Usage: python benchmarks/bench_exports.py [--model M --nodes N ...]"""

from __future__ import annotations

import argparse
import time

from meshwright.cli import build_parser
from meshwright.commands import plan as plan_cmd
from meshwright.launcher.planner.export import EMITTERS, emit, stack_problems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="llama2-70b")
    p.add_argument("--cluster", default="dgx-a100-80g")
    p.add_argument("--nodes", default="16")
    p.add_argument("--seq-len", default="4096")
    p.add_argument("--global-batch", default="1024")
    a = p.parse_args()
    base = ["plan", "--model", a.model, "--cluster", a.cluster, "--nodes", a.nodes, "--seq-len", a.seq_len,
            "--global-batch", a.global_batch]
    print(f"{a.model} on {a.nodes} x {a.cluster}, seq {a.seq_len}, global batch {a.global_batch}\n")
    print("| target | layout | predicted step (s) | MFU | vs unrestricted | runs as planned | notes | search (s) |")
    print("|---|---|---|---|---|---|---|---|")
    best = None
    for target in (None, *EMITTERS):
        args = build_parser().parse_args(base + (["--emit", target, "--any-runtime"] if target else ["--any-runtime"]))
        t0 = time.perf_counter()
        res = plan_cmd.compute_result(args)
        dt = time.perf_counter() - t0
        cand, cfg = res["_objects"]["best"], res["_objects"]["cfg"]
        step, mfu = cand.prediction.step_s, cand.prediction.mfu
        best = best or step
        probs = stack_problems(target, cand.plan, cfg) if target else []
        n_notes = len(emit(cand.plan, cfg, target)[1]) - 1 if target else 0
        print(f"| {target or 'meshwright (any runtime)'} | {res['layout'][:90]} | {step:.2f} | {100 * mfu:.1f}% | "
              f"{step / best:.3f}x | {('yes' if not probs else '; '.join(probs)) if target else '-'} | {n_notes} | {dt:.1f} |")


if __name__ == "__main__":
    main()
