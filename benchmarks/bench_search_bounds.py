"""The search's step-time lower bounds alone, side by side for two trees (#17: most candidates of a large search are
skipped on their bound, so computing bounds is a large share of its time).

For each request, one search records the outer candidates it bounds; then every one of them is bounded again in
order on a fresh memo (``_step_lower_bound``: strategy lists, their costs, hulls, all rebuilt as in the search), CPU
time, best of ``--repeat``, with Python's cyclic collector off as in the search. Each tree runs in its own process
(``PYTHONPATH=<tree>``), both at once. A tree whose search solves other candidates ahead bounds other candidates
(the counts are printed).

    python benchmarks/bench_search_bounds.py --base <tree> [--new .] [--repeat 5]
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time

from bench_search_scale import run_trees, tree_arguments  # the two-tree runner (this directory)

# the two slowest requests of bench_search_scale.py: 1,024 H100, every saver allowed
REQUESTS = [("megatron-gpt-1t", 2048, 3072), ("mixtral-8x7b", 4096, 1024)]
ALLOW = ["fp8", "wta-crs", "lemo"]


def run_one(repeat: int) -> None:
    """Time this tree's bounds; one JSON line per request."""
    import meshwright
    from meshwright.config import load_cluster, load_model_config
    from meshwright.launcher.planner import search as S

    print(json.dumps({"meshwright": meshwright.__file__}), flush=True)
    for name, seq, gb in REQUESTS:
        cfg = load_model_config(name)
        if name.startswith("megatron"):
            cfg = dataclasses.replace(cfg, tie_embeddings=False)
        cluster = dataclasses.replace(load_cluster("dgx-h100-80g"), nodes=128)
        seen: dict[tuple, object] = {}
        bound_of = S._bound_of

        def recorded(o, *args):  # (the bar, where the tree's _bound_of takes it)
            seen.setdefault(S._candidate_key(o), o)
            return bound_of(o, *args)

        S._bound_of = recorded
        try:
            S.search(cfg, cluster, seq, gb, allow=S.Allow.parse(ALLOW), suggest=False)
        finally:
            S._bound_of = bound_of
        outers = list(seen.values())
        times = []
        enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            for _ in range(repeat):
                memo = S._SearchMemo()
                fresh = [dataclasses.replace(o, memo=memo) for o in outers]
                t0 = time.process_time()
                for o in fresh:
                    S._step_lower_bound(o)
                times.append(time.process_time() - t0)
        finally:
            if enabled:
                gc.enable()
        print(json.dumps({"request": name, "candidates": len(outers), "s": min(times)}), flush=True)


def main() -> int:
    ap = tree_arguments(__doc__, repeat=5, timeout=900.0)
    a = ap.parse_args()
    if a.one:
        run_one(a.repeat)
        return 0
    if not a.base:
        ap.error("--base is required")
    rows = run_trees(__file__, a)
    if rows is None:
        return 1
    print(f"base: {rows['base'][0]['meshwright']}  \nnew: {rows['new'][0]['meshwright']}  \n"
          f"CPU s of every candidate's bound on a fresh memo, best of {a.repeat}; 1,024 H100, "
          f"--allow {'+'.join(ALLOW)}.\n")
    print("| request | candidates base / new | base s | new s | new / base |")
    print("|---|---|---|---|---|")
    for b, n in zip(rows["base"][1:], rows["new"][1:]):
        print(f"| {b['request']} | {b['candidates']:,} / {n['candidates']:,} | {b['s']:.3f} | {n['s']:.3f} | "
              f"{n['s'] / b['s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
