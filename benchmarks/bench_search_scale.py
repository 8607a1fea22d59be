"""Search time on 1,024 GPUs across models, clusters and ``--allow`` sets, side by side for two trees (#17's target:
under 1 s up to 1,024 GPUs on the development CPU).

Each tree runs in its own process (``PYTHONPATH=<tree>``), both at once, one per core, so that load from other work
hits both alike; each request is timed as the CPU time of one ``search(...)``, best of ``--repeat``. The best step
time of each request is printed too: a faster tree must not return a slower plan.

    python benchmarks/bench_search_scale.py --base <tree> [--new .] [--repeat 3] [--out results.md]
    python benchmarks/bench_search_scale.py --one [--repeat 3]          # this tree only, JSON lines
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# model, sequence length, global batch (Megatron-LM Table 1's batches for its GPT models; the Llama runs' 4M tokens)
MODELS = [("llama2-13b", 4096, 1024), ("llama2-70b", 4096, 1024), ("llama3-70b", 8192, 1024),
          ("mixtral-8x7b", 4096, 1024), ("megatron-gpt-145.6b", 2048, 2304), ("megatron-gpt-310.1b", 2048, 2160),
          ("megatron-gpt-529.6b", 2048, 2520), ("megatron-gpt-1t", 2048, 3072)]
CLUSTERS = ["dgx-a100-80g", "dgx-h100-80g"]
ALLOWS = [[], ["fp8"], ["fp8", "wta-crs", "lemo"]]
NODES = 128  # x 8 GPUs


def run_one(repeat: int) -> None:
    """Time every request in this process's tree; one JSON line per request."""
    import meshwright
    from meshwright.config import load_cluster, load_model_config
    from meshwright.launcher.planner.search import Allow, search

    print(json.dumps({"meshwright": meshwright.__file__}), flush=True)
    for name, seq, gb in MODELS:
        cfg = load_model_config(name)
        if name.startswith("megatron"):  # pipelining the presets needs untied embeddings (as bench_search.py)
            cfg = dataclasses.replace(cfg, tie_embeddings=False)
        for cl in CLUSTERS:
            cluster = dataclasses.replace(load_cluster(cl), nodes=NODES)
            for allow in ALLOWS:
                times = []
                for _ in range(repeat):
                    t0 = time.process_time()
                    r = search(cfg, cluster, seq, gb, allow=Allow.parse(allow), suggest=False)
                    times.append(time.process_time() - t0)
                print(json.dumps({"model": name, "cluster": cl, "allow": "+".join(allow) or "-", "s": min(times),
                                  "step": r.best.prediction.step_s if r.best else None, "candidates": r.candidates,
                                  "skipped": getattr(r, "skipped", None)}), flush=True)


def tree_arguments(description: str, repeat: int, timeout: float) -> argparse.ArgumentParser:
    """The options of a benchmark that times two source trees side by side (``run_trees``)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="the reference tree")
    ap.add_argument("--new", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--repeat", type=int, default=repeat)
    ap.add_argument("--timeout", type=float, default=timeout)
    ap.add_argument("--one", action="store_true", help="time this tree only (JSON lines)")
    return ap


def run_trees(script: str, a: argparse.Namespace) -> dict[str, list[dict]] | None:
    """``script --one`` under the base and the new tree at once (each importing meshwright from its own tree, so
    background load hits both alike): each tree's JSON lines, or None (named on stderr) when one failed."""
    procs = {label: subprocess.Popen([sys.executable, str(Path(script).resolve()), "--one", "--repeat", str(a.repeat)],
                                     env=dict(os.environ, PYTHONPATH=str(Path(tree).resolve())),
                                     stdout=subprocess.PIPE, text=True)
             for label, tree in (("base", a.base), ("new", a.new))}
    rows = {}
    for label, p in procs.items():
        out, _ = p.communicate(timeout=a.timeout)
        if p.returncode:
            print(f"{label} tree failed ({p.returncode})", file=sys.stderr)
            return None
        rows[label] = [json.loads(x) for x in out.splitlines() if x.strip()]
    return rows


def main() -> int:
    ap = tree_arguments(__doc__, repeat=3, timeout=1800.0)
    ap.add_argument("--out", help="write the markdown table here too")
    a = ap.parse_args()
    if a.one:
        run_one(a.repeat)
        return 0
    if not a.base:
        ap.error("--base is required")
    rows = run_trees(__file__, a)
    if rows is None:
        return 1
    where = {k: v[0]["meshwright"] for k, v in rows.items()}
    table = [f"base: {where['base']}  \nnew: {where['new']}  \nCPU s of one search, best of {a.repeat}; "
             f"{NODES} x 8 GPUs.", "",
             "| model | cluster | --allow | base s | new s | new / base | best step base -> new (s) | candidates (skipped) |",
             "|---|---|---|---|---|---|---|---|"]
    over = {"base": 0, "new": 0}
    slower_plans = 0
    for b, n in zip(rows["base"][1:], rows["new"][1:]):
        assert (b["model"], b["cluster"], b["allow"]) == (n["model"], n["cluster"], n["allow"])
        for label, r in (("base", b), ("new", n)):
            over[label] += r["s"] >= 1.0
        if b["step"] is not None and (n["step"] is None or n["step"] > b["step"] * (1 + 1e-12)):
            slower_plans += 1
        step = (f"{b['step']:.4f}" if b["step"] == n["step"] else
                f"{b['step']:.4f} -> {n['step']:.4f}" if b["step"] and n["step"] else f"{b['step']} -> {n['step']}")
        skipped = f" ({n['skipped']})" if n.get("skipped") is not None else ""
        table.append(f"| {b['model']} | {b['cluster']} | {b['allow']} | {b['s']:.3f} | {n['s']:.3f} | "
                     f"{n['s'] / b['s']:.2f} | {step} | {b['candidates']} / {n['candidates']}{skipped} |")
    n_req = len(rows["new"]) - 1
    table += ["", f"At or over 1 s: base {over['base']} of {n_req}, new {over['new']} of {n_req}. Requests whose best "
              f"plan got slower: {slower_plans}. Sum of times: base {sum(r['s'] for r in rows['base'][1:]):.2f} s, "
              f"new {sum(r['s'] for r in rows['new'][1:]):.2f} s."]
    text = "\n".join(table)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
