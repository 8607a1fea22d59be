"""Overhead of the accounting (energy windows + MFU/HFU) on step time, side by side in one run.

Runs the same short `tiny` training with `energy: false` and `energy: true`, alternating A/B/A/B so
machine noise hits both alike, and prints the step-time ratio and the measured energy figures.

    .venv/bin/python benchmarks/bench_energy.py [--rounds 3] [--steps 60]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from meshwright.train.build import run_training
from meshwright.config import load_train_config


def one(energy: bool, steps: int, out: str) -> dict:
    cfg = load_train_config("tiny-test", {"steps": steps, "energy": energy, "eval_every": 0, "log_every": 10,
                                         "out_dir": out, "progress": False, "warmup_steps": 5})
    return run_training(cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    off, on, last = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        one(False, 5, f"{tmp}/warm")
        for r in range(args.rounds):
            a = one(False, args.steps, f"{tmp}/off{r}")
            b = one(True, args.steps, f"{tmp}/on{r}")
            off.append(a["train_s"] / a["steps_this_run"])
            on.append(b["train_s"] / b["steps_this_run"])
            last = b
    ratio = statistics.median(o / f for o, f in zip(on, off))
    print("| accounting | median step s | ratio |")
    print("|---|---|---|")
    print(f"| off | {statistics.median(off):.4f} | 1.000 |")
    print(f"| on (NVML probe + codecarbon windows + per-log snapshots) | {statistics.median(on):.4f} | {ratio:.3f} |")
    print(f"\nlast run with accounting: {last['energy_j']:.1f} J ({last['cpu_j']:.1f} CPU, {last['ram_j']:.1f} RAM, "
          f"GPU source: {last['energy_gpu_source']}), {last['j_per_token']:.4f} J/token, MFU {last['mfu']:.3f}")


if __name__ == "__main__":
    main()
