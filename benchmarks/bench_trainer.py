"""Our Trainer vs a plain hand-written PyTorch loop on `tiny`, interleaved in one run; plus the measured
fp32 matmul peak of this machine (the honest denominator for CPU MFU).

    .venv/bin/python benchmarks/bench_trainer.py [--rounds 6] [--steps 10] [--plot benchmarks/results/trainer.png]

Both sides train the same model (same init) with the same AdamW, LR schedule and clipping on the same
batches (the plain loop gets them pre-materialised in memory; the trainer reads them through its loader),
so their loss trajectories must be identical - the script checks that. Rounds alternate which side goes
first. Timings on a shared CPU are noisy: read the ratio, not the absolute figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from meshwright.config import load_cluster, load_model_config, load_train_config  # noqa: E402
from meshwright.data.loader import build_loaders  # noqa: E402
from meshwright.train.local_runtime import LocalRuntime  # noqa: E402
from meshwright.models import build_model, lm_loss  # noqa: E402
from meshwright.train.trainer import Trainer, lr_at  # noqa: E402


def matmul_peak(sizes=(512, 1024, 2048)) -> tuple[float, dict[int, float]]:
    """Best fp32 GFLOP/s of torch.matmul over square sizes (2 n^3 FLOPs per product). Best-of-many, because on
    a shared machine most repeats are pre-empted; the fastest one is the closest to the hardware's peak."""
    out = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(30 if n <= 1024 else 10):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[n] = 2 * n**3 / best / 1e9
    return max(out.values()), out


class PlainLoop:
    """What a person writes by hand: forward, mean loss over micro-batches, backward, clip, AdamW."""

    def __init__(self, cfg, model_cfg, batches):
        self.cfg = cfg
        self.model = build_model(model_cfg, seed=cfg.seed)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                                     betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.batches, self.step = batches, 0

    def train_step(self) -> float:
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.cfg)
        micro = self.batches[self.step]
        total = 0.0
        for x, y in micro:
            loss = lm_loss(self.model(x), y)
            (loss / len(micro)).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return total / len(micro)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per side per round")
    ap.add_argument("--config", default="default", help="train preset providing model/batch shape")
    ap.add_argument("--plot", default=str(REPO / "benchmarks/results/trainer.png"))
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    ap.add_argument("--no-control", dest="control", action="store_false", help="skip the A/A control loop")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    total_steps = args.rounds * args.steps + 1
    tmp = tempfile.mkdtemp(prefix="bench_trainer_")
    base = load_train_config(args.config)
    cfg = dataclasses.replace(base, steps=total_steps, warmup_steps=min(base.warmup_steps, total_steps), progress=False,
                              out_dir=tmp)
    model_cfg = load_model_config(cfg.model)
    cluster = load_cluster(cfg.cluster)
    peak, per_size = matmul_peak()
    flops = model_cfg.flops_per_token(cfg.seq_len)
    tokens_per_step = cfg.global_batch * cfg.seq_len

    train, val, _ = build_loaders(cfg, model_cfg.vocab_size, progress=False)
    trainer = Trainer(cfg, LocalRuntime(build_model(model_cfg, seed=cfg.seed)), train, val, model_cfg, cluster,
                      print_fn=lambda s: None)
    twin, _, _ = build_loaders(cfg, model_cfg.vocab_size, progress=False)
    batches = [twin.next_batch() for _ in range(total_steps)]
    # A second, identical plain loop is the A/A control: its ratio to the first shows the timing noise floor.
    sides = {"trainer": lambda: trainer.train_step()["loss"], "plain": PlainLoop(cfg, model_cfg, batches).train_step}
    if args.control:
        sides["plain (A/A control)"] = PlainLoop(cfg, model_cfg, batches).train_step

    # one warm-up step each (allocator, first-call overheads), not timed
    losses = {name: [fn()] for name, fn in sides.items()}
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for side in order:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                losses[side].append(sides[side]())
            times[side].append((time.perf_counter() - t0) / args.steps)
    identical = all(losses[n] == losses["trainer"] for n in names)
    rows = {}
    for side in names:
        step_s = statistics.median(times[side])
        tps = tokens_per_step / step_s
        rows[side] = {"step_s": step_s, "tokens_per_s": tps, "gflops": tps * flops / 1e9,
                      "mfu_measured_peak": tps * flops / (peak * 1e9),
                      "mfu_preset_peak": tps * flops / cluster.peak_flops("fp32")}
    ratio = rows["trainer"]["tokens_per_s"] / rows["plain"]["tokens_per_s"]

    print(f"model {model_cfg.name}: {model_cfg.num_params():,} params, {flops:,.0f} FLOPs/token (PaLM 6N+12LHQT, T={cfg.seq_len}); "
          f"batch {cfg.global_batch}x{cfg.seq_len} (micro {cfg.micro_batch}); {args.rounds} rounds x {args.steps} steps, interleaved; "
          f"{torch.get_num_threads()} torch thread(s)")
    print(f"fp32 matmul peak ({torch.get_num_threads()} thread(s)): " + ", ".join(f"n={n}: {g:.1f}" for n, g in per_size.items()) + f" GFLOP/s -> {peak:.1f} GFLOP/s "
          f"(local-cpu preset: {cluster.peak_flops('fp32') / 1e9:.0f})")
    print(f"| loop | step ms (median) | tokens/s | GFLOP/s | MFU vs measured peak | MFU vs preset peak |")
    print(f"|---|---|---|---|---|---|")
    labels = {"trainer": "meshwright Trainer + LocalRuntime", "plain": "plain PyTorch loop",
              "plain (A/A control)": "plain PyTorch loop again (A/A control)"}
    for side in names:
        row, label = rows[side], labels[side]
        print(f"| {label} | {1e3 * row['step_s']:.1f} | {row['tokens_per_s']:,.0f} | {row['gflops']:.2f} | "
              f"{100 * row['mfu_measured_peak']:.1f}% | {100 * row['mfu_preset_peak']:.1f}% |")
    if any(r["mfu_measured_peak"] > 1 for r in rows.values()):
        print("warning: MFU above 100% of the measured peak - the peak measurement was pre-empted by other load; "
              "use the preset column")
    print(f"trainer/plain tokens/s ratio: {ratio:.3f} (per-round ratios: "
          + ", ".join(f"{p / t:.3f}" for t, p in zip(times['trainer'], times['plain'])) + ")")
    if args.control:
        control = rows["plain (A/A control)"]["tokens_per_s"] / rows["plain"]["tokens_per_s"]
        print(f"A/A control (plain again / plain): {control:.3f} - the timing noise floor of this run")
    print(f"loss trajectories identical: {identical} (final loss {losses['trainer'][-1]:.4f})")

    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratio": ratio, "threads": torch.get_num_threads(), "peak_gflops": peak, "per_size": per_size,
                                               "times": times, "identical": identical}, indent=1))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for side in names:
            ax.plot(range(1, args.rounds + 1), [tokens_per_step / t for t in times[side]], marker="o", label=labels[side])
        ax.set_xlabel("round (interleaved)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"tiny on CPU: trainer/plain = {ratio:.3f}")
        ax.legend()
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=100)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
