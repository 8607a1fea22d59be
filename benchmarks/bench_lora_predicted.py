"""LoRA vs full fine-tuning under ``meshwright train --plan auto`` on this CPU: the planner's predicted step time
(OUT/plan.yaml ``predicted.step_s``) against the trainer's measured one (OUT/summary.json ``step_s``, steady state),
and the FLOPs per token each run's MFU counts.

Each model runs full fine-tuning and LoRA (rank 8 on every linear) ``--repeats`` times, alternating, as one
process each (OMP_NUM_THREADS=1); the median of each column is reported. Every repeat starts from an empty profile
cache: its full run profiles the hardware and the plain blocks, its LoRA run the LoRA blocks (a profile taken while
the shared machine was busy would otherwise set every later prediction). Timing on the shared 2-core box is noisy:
read the ratios.

    python benchmarks/bench_lora_predicted.py [--models tiny,small] [--repeats 3] [--out benchmarks/results/lora_cost.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL = "{name: small, arch: llama, vocab_size: 256, d_model: 384, n_layers: 4, n_heads: 6, n_kv_heads: 2, ffn_hidden: 1024, max_seq_len: 256}"
MODELS = {"tiny": ("tiny", 64, 8, 4), "small": (SMALL, 128, 8, 4)}  # model, seq_len, global_batch, micro_batch
LORA = "{rank: 8, targets: [wq, wk, wv, wo, w1, w2, w3]}"


def run(model: str, lora: bool, steps: int, work: Path, tag: str, cache: str) -> dict:
    spec, seq, gb, mb = MODELS[model]
    out = work / tag
    args = [sys.executable, "-m", "meshwright.cli", "train", "tiny-test", f"model={spec}", f"seq_len={seq}",
            f"global_batch={gb}", f"micro_batch={mb}", f"steps={steps}", "warmup_steps=0", "eval_every=0",
            "ckpt_every=0", "log_every=2", "progress=false", "energy=false", f"out_dir={out}"]
    if lora:
        args.append(f"lora={LORA}")
    args += ["--plan", "auto"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MESHWRIGHT_CACHE": str(work / cache)}
    p = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(args)}\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}")
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    s = json.loads((out / "summary.json").read_text())
    return {"pred": plan["predicted"]["step_s"], "meas": s["step_s"], "flops": s["flops_per_token"],
            "full_flops": s.get("full_flops_per_token", s["flops_per_token"]), "pred_mfu": plan["predicted"]["mfu"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lines = ["| model | run | FLOPs/token counted (MFU) | predicted step s | measured step s | predicted / measured |",
             "|---|---|---|---|---|---|"]
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model in args.models.split(","):
            rows: dict[str, list[dict]] = {"full": [], "lora": []}
            for i in range(args.repeats):
                for kind in ("full", "lora"):
                    rows[kind].append(run(model, kind == "lora", args.steps, work, f"{model}-{kind}-{i}",
                                          f"cache-{model}-{i}"))
            med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in rows.items()}
            for kind in ("full", "lora"):
                m = med[kind]
                ratios = ", ".join(f"{r['pred'] / r['meas']:.2f}" for r in rows[kind])
                lines.append(f"| {model} | {kind} | {m['flops'] / 1e6:.2f}M | {m['pred']:.4f} | {m['meas']:.4f} | "
                             f"{m['pred'] / m['meas']:.2f} (runs: {ratios}) |")
                print(lines[-1], flush=True)
            f, lo = med["full"], med["lora"]
            pairs = ", ".join(f"{a['pred'] / b['pred']:.2f}/{a['meas'] / b['meas']:.2f}"
                              for a, b in zip(rows["lora"], rows["full"]))
            summary.append(f"- {model}: LoRA / full step time predicted {lo['pred'] / f['pred']:.2f}, measured "
                           f"{lo['meas'] / f['meas']:.2f} (medians; per repeat predicted/measured: {pairs}); LoRA FLOPs "
                           f"per token {lo['flops'] / lo['full_flops']:.3f} of full training's")
            print(summary[-1], flush=True)
    text = "\n".join(lines + [""] + summary) + "\n"
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
