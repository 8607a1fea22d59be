"""Planner truth on a GPU: `meshwright train --plan auto` predicted vs measured step time and memory.

Runs ``meshwright train CONFIG --plan auto`` for each case (the planner profiles the machine in the run's dtype,
plans, and the trainer runs the plan), then reads the plan's prediction (OUT/plan.yaml ``predicted``) and the
measured figures (OUT/summary.json: steady-state ``step_s``; ``peak_reserved_gib``, max_memory_reserved, is
what the memory model predicts -- allocated plus the caching allocator's headroom; ``peak_memory_gib`` is
max_memory_allocated).
Targets (issue 17): step within 15%, memory within 10%.

    python benchmarks/bench_planner_gpu.py [--cases gpt2-small,llama-1b] [--steps 30] [--out benchmarks/results/planner_gpu.md]
    python benchmarks/bench_planner_gpu.py --cpu-smoke      # mechanics only, on CPU with tiny-test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LLAMA_1B = ("{name: llama-1.1b, arch: llama, vocab_size: 32000, d_model: 2048, n_layers: 22, n_heads: 32, "
            "n_kv_heads: 4, ffn_hidden: 5632, max_seq_len: 2048}")  # TinyLlama-1.1B shapes

# name: (train preset, overrides)
CASES = {
    "gpt2-small": ("default", ["model=gpt2-small", "seq_len=1024", "global_batch=16", "micro_batch=16", "dtype=bf16"]),
    "llama-1b": ("default", [f"model={LLAMA_1B}", "seq_len=2048", "global_batch=8", "micro_batch=8", "dtype=bf16"]),
    "tiny-cpu": ("tiny-test", ["steps=6", "eval_every=0", "ckpt_every=0"]),
}


def run_case(name: str, steps: int, cluster: str | None, workdir: Path) -> dict:
    preset, overrides = CASES[name]
    out = workdir / name
    args = [sys.executable, "-m", "meshwright.cli", "train", preset, *overrides, f"out_dir={out}", "progress=false",
            "eval_every=0", "log_every=5"]
    if name != "tiny-cpu":
        args += [f"steps={steps}", "warmup_steps=2"]
    if cluster or name != "tiny-cpu":
        args.append(f"cluster={cluster or 'dgx-h100-80g'}")  # a GPU preset: bf16 peak, GPU memory budget
    args += ["--plan", "auto"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MESHWRIGHT_CACHE": str(workdir / "cache")}
    t0 = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    row = {"case": name, "rc": proc.returncode, "wall_s": time.time() - t0}
    if proc.returncode != 0:
        row["error"] = proc.stderr[-800:]
        return row
    import yaml

    plan = yaml.safe_load((out / "plan.yaml").read_text())
    summary = json.loads((out / "summary.json").read_text())
    pred = plan.get("predicted", {})
    row.update({"predicted_step_s": pred.get("step_s"), "measured_step_s": summary["step_s"],
                "predicted_memory_gib": pred.get("memory_gib_max"),
                "measured_gib": summary.get("peak_reserved_gib", summary["peak_memory_gib"]),
                "layout": plan.get("layers"), "dtype": summary["dtype"]})
    if row["predicted_step_s"]:
        row["step_ratio"] = row["predicted_step_s"] / row["measured_step_s"]
    if row["predicted_memory_gib"] and row["measured_gib"]:
        row["memory_ratio"] = row["predicted_memory_gib"] / row["measured_gib"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="gpt2-small,llama-1b")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cluster", default=None, help="cluster preset (default dgx-h100-80g for the GPU cases)")
    ap.add_argument("--cpu-smoke", action="store_true", help="run tiny-test on CPU to check the mechanics")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cases = ["tiny-cpu"] if args.cpu_smoke else args.cases.split(",")
    lines = ["| case | dtype | predicted step s | measured step s | pred/meas | predicted GiB | measured GiB (CUDA: max reserved; CPU: peak RSS) | pred/meas |",
             "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases:
            r = run_case(name, args.steps, args.cluster, Path(tmp))
            if "error" in r:
                lines.append(f"| {name} | failed rc={r['rc']}: {r['error'].splitlines()[-1] if r['error'] else ''} | | | | | | |")
            else:
                lines.append(f"| {name} | {r['dtype']} | {r['predicted_step_s']:.4g} | {r['measured_step_s']:.4g} | "
                             f"{r.get('step_ratio', float('nan')):.2f} | {r['predicted_memory_gib']:.3g} | "
                             f"{r['measured_gib']:.3g} | {r.get('memory_ratio', float('nan')):.2f} |")
            print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
