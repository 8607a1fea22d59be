"""Trust check: the cost model's predicted step time vs the measured step time of the same plans on
this machine (tiny model; 1, 2 and 4 ranks; dp/tp/pp mixes), with hardware and model profiles taken
here first, and whether the predicted ranking matches the measured one.

    python benchmarks/bench_planner_trust.py [--steps 8] [--out benchmarks/results/planner_trust.md]

Every rank is a process with one thread (OMP_NUM_THREADS=1), the hardware profile is taken with the
same number of ranks as the plan it calibrates, and measured step time is the median of the logged
intervals after the first. Timing on a shared 2-core box is noisy: read ratios, not absolutes.
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

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
MODEL, SEQ, GB, MB = "tiny", 128, 16, 4
NOISE = 0.10  # run-to-run spread of one layout's measured step time on this box

LAYOUTS = [  # (name, world, plan constraints)
    ("1 rank", 1, []),
    ("dp2 (DDP)", 2, ["--dp", "2", "--zero", "0"]),
    ("dp2 ZeRO-2", 2, ["--dp", "2", "--zero", "2"]),
    ("tp2+sp", 2, ["--tp", "2", "--sp"]),
    ("tp2", 2, ["--tp", "2", "--no-sp"]),
    ("pp2 1f1b", 2, ["--pp", "2", "--schedule", "1f1b"]),
    ("dp4 (DDP)", 4, ["--dp", "4", "--zero", "0"]),
    ("tp2 x dp2", 4, ["--tp", "2", "--dp", "2", "--pp", "1", "--zero", "0", "--no-sp"]),
    ("dp2 ZeRO-3 x pp2", 4, ["--pp", "2", "--dp", "2", "--zero", "3", "--schedule", "1f1b"]),
    ("pp2 x dp2", 4, ["--pp", "2", "--dp", "2", "--schedule", "1f1b", "--zero", "0"]),
]


def env() -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    e.pop("TORCHELASTIC_RUN_ID", None)
    return e


def torchrun(n: int, args: list[str], timeout: float = 600) -> None:
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", str(REPO / "meshwright" / "cli.py"), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")


def cli(args: list[str], timeout: float = 600) -> str:
    p = subprocess.run([PY, "-m", "meshwright.cli", *args], capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)
    if p.returncode:
        raise SystemExit(f"failed: meshwright {' '.join(args)}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def plot(rows: list[tuple], path: str) -> None:
    """Predicted vs measured step time per layout, with the y = x line and the +-25% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    hi = 1.15 * max(max(r[3], r[4]) for r in rows)
    xs = [0, hi]
    ax.plot(xs, xs, "k-", lw=1, label="predicted = measured")
    ax.fill_between(xs, [0.75 * x for x in xs], [1.25 * x for x in xs], color="tab:green", alpha=0.15, label="within 25%")
    for name, world, _, p, m in rows:
        ax.scatter(m, p, s=30, marker={1: "o", 2: "s", 4: "^"}.get(world, "x"))
        ax.annotate(name, (m, p), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("measured step time (s)")
    ax.set_ylabel("predicted step time (s)")
    ax.set_title("planner trust: tiny on this CPU (o 1 rank, s 2, ^ 4)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--iters", type=int, default=9, help="samples per profiled point")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="predicted-vs-measured scatter (PNG)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mw-trust-"))
    print("model profile (2 ranks: blocks, and the runtime's TP/SP and ZeRO-2/3 blocks) ...", flush=True)
    torchrun(2, ["profile", "model", "--model", MODEL, "--batch-sizes", "1,2,4", "--seq-lens", "64,128", "--tp", "1,2",
                 "--iters", str(args.iters), "--out", str(tmp / "model.json")])
    hw_profiles = {}
    for world in sorted({w for _, w, _ in LAYOUTS}):
        print(f"hardware profile, {world} ranks ...", flush=True)
        hw_profiles[world] = tmp / f"hw{world}.json"
        torchrun(world, ["profile", "hardware", "--sizes", "128,256", "--iters", str(args.iters), "--timeout-s", "120",
                         "--out", str(hw_profiles[world])])
    rows = []
    for name, world, cons in LAYOUTS:
        plan_path = tmp / f"plan_{world}_{len(rows)}.yaml"
        out = cli(["plan", "--model", MODEL, "--cluster", "local-cpu", "--devices-per-node", str(world), "--seq-len", str(SEQ),
                   "--global-batch", str(GB), "--micro-batch", str(MB), *cons, "--hardware-profile", str(hw_profiles[world]),
                   "--model-profile", str(tmp / "model.json"), "--json", "--out", str(plan_path)])
        res = json.loads(out)
        predicted = res["predicted"]["step_s"]
        run_dir = tmp / f"run{len(rows)}"
        train = ["train", "tiny-test", f"steps={args.steps}", "eval_every=0", "log_every=1", f"seq_len={SEQ}", f"global_batch={GB}",
                 f"micro_batch={MB}", f"out_dir={run_dir}", "progress=false", "ckpt_every=0", "--plan", str(plan_path)]
        print(f"run {name} ({res['layout']}) ...", flush=True)
        if world == 1:
            cli(train)
        else:
            torchrun(world, train)
        recs = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines() if x.strip()]
        steps = [r["step_s"] for r in recs if "step_s" in r and "loss" in r][2:]  # skip warm-up steps
        measured = statistics.median(steps)
        rows.append((name, world, res["layout"], predicted, measured))
        print(f"  predicted {predicted:.4f} s, measured {measured:.4f} s", flush=True)
    lines = ["| layout | ranks | plan | predicted step s | measured step s | error |", "|---|---|---|---|---|---|"]
    for name, world, lay, p, m in rows:
        lines.append(f"| {name} | {world} | `{lay}` | {p:.4f} | {m:.4f} | {100 * (p - m) / m:+.0f}% |")
    errs = [abs(p - m) / m for *_, p, m in rows]
    pred_rank = [r[0] for r in sorted(rows, key=lambda r: r[3])]
    meas_rank = [r[0] for r in sorted(rows, key=lambda r: r[4])]
    from itertools import combinations

    pairs = list(combinations(range(len(rows)), 2))
    agree = sum((rows[i][3] - rows[j][3]) * (rows[i][4] - rows[j][4]) > 0 for i, j in pairs)
    # pairs whose measured times differ by more than run-to-run noise (repeated runs here vary by ~10%)
    apart = [(i, j) for i, j in pairs if abs(rows[i][4] - rows[j][4]) / min(rows[i][4], rows[j][4]) > NOISE]
    agree_apart = sum((rows[i][3] - rows[j][3]) * (rows[i][4] - rows[j][4]) > 0 for i, j in apart)
    lines += ["", f"Mean |error| {100 * sum(errs) / len(errs):.0f}% (max {100 * max(errs):.0f}%); "
              f"{sum(e <= 0.25 for e in errs)}/{len(errs)} within 25%.",
              f"Predicted ranking: {', '.join(pred_rank)}", f"Measured ranking:  {', '.join(meas_rank)}",
              f"Pairwise order agreement (Kendall): {agree}/{len(pairs)}; on the {len(apart)} pairs measured more than "
              f"{100 * NOISE:.0f}% apart: {agree_apart}/{len(apart)}"]
    text = "\n".join(lines)
    print(text)
    if args.plot:
        plot(rows, args.plot)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
