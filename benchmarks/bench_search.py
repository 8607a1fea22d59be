"""Planner benchmark: search time, and predicted vs published throughput for public reference runs.

1. Search time for the issue's cases (Llama-2-70B on 128 x 8 A100, and 8-GPU cases).
2. Megatron-LM SC'21 Table 1 (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on
   GPU Clusters Using Megatron-LM"): GPT models on DGX A100 (80 GB), seq 2048, vocab 51200, full
   activation recomputation, micro-batch 1. The paper's TFLOP/s per GPU counts recomputation
   (96·B·s·l·h²·(1 + s/6h + V/16lh) per step) — the same count as our HFU x peak. For each row we
   evaluate the *published* layout (tp, pp, GPUs, batch fixed; schedule searched among 1F1B and
   interleaved) and run an unconstrained search; throughput is compared in tokens/s so plans with
   and without recomputation compare fairly.

    python benchmarks/bench_search.py [--quick] [--out benchmarks/results/planner.md]

The presets tie embeddings (GPT); pipelining needs untied ones here, so the rows are evaluated with
``tie_embeddings=False`` (50M-250M more parameters on the last stage; <0.5% of every model).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshwright.config import load_cluster, load_model_config  # noqa: E402
from meshwright.launcher.planner import cost_model as cm  # noqa: E402
from meshwright.launcher.planner.search import Allow, Constraints, describe_layout, search  # noqa: E402

# name, tp, pp, GPUs, global batch, published TFLOP/s per GPU (Table 1)
MEGATRON_TABLE1 = [
    ("megatron-gpt-1.7b", 1, 1, 32, 512, 137),
    ("megatron-gpt-3.6b", 2, 1, 64, 512, 138),
    ("megatron-gpt-7.5b", 4, 1, 128, 512, 142),
    ("megatron-gpt-18.4b", 8, 1, 256, 1024, 135),
    ("megatron-gpt-39.1b", 8, 2, 512, 1536, 138),
    ("megatron-gpt-76.1b", 8, 4, 1024, 1792, 140),
    ("megatron-gpt-145.6b", 8, 8, 1536, 2304, 148),
    ("megatron-gpt-310.1b", 8, 16, 1920, 2160, 155),
    ("megatron-gpt-529.6b", 8, 35, 2520, 2520, 163),
    ("megatron-gpt-1t", 8, 64, 3072, 3072, 163),
]

# model, cluster, nodes, seq, global batch, target seconds, `--allow` items
SEARCH_CASES = [
    ("llama2-70b", "dgx-a100-80g", 128, 4096, 1024, 10.0, []),
    ("llama2-7b", "dgx-a100-80g", 1, 4096, 128, 1.0, []),
    ("llama3-8b", "dgx-h100-80g", 1, 8192, 64, 1.0, []),
    ("mixtral-8x7b", "dgx-h100-80g", 2, 4096, 128, 2.0, []),
    ("megatron-gpt-18.4b", "dgx-a100-80g", 1, 2048, 64, 1.0, []),
    # FP8 (COAT) allowed: two optimizer-state formats and three saver sets per strategy
    ("llama2-70b", "dgx-h100-80g", 8, 4096, 512, 1.0, ["fp8"]),
    ("llama3-70b", "dgx-h100-80g", 128, 8192, 1024, 1.0, ["fp8"]),
]


PLOT_ROWS: list[tuple[str, float, float]] = []


def plot(path: str) -> None:
    """Published vs predicted TFLOP/s per GPU for the Table 1 rows (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r[0] for r in PLOT_ROWS]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar([i - 0.2 for i in x], [r[1] for r in PLOT_ROWS], 0.4, label="published (Narayanan et al. 2021)")
    ax.bar([i + 0.2 for i in x], [r[2] for r in PLOT_ROWS], 0.4, label="meshwright prediction, same layout")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("TFLOP/s per A100")
    ax.set_xlabel("GPT model (Megatron-LM SC'21 Table 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def megatron_flops_per_step(cfg, batch: int, seq: int) -> float:
    """Narayanan et al. eq. (3): 96 B s l h^2 (1 + s/(6h) + V/(16 l h)), recomputation included."""
    b, s, l, h, v = batch, seq, cfg.n_layers, cfg.d_model, cfg.vocab_size
    return 96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))


def bench_search_time(repeats: int) -> list[str]:
    rows = ["| case | devices | search s (best of %d) | target s | candidates | best layout | MFU |" % repeats,
            "|---|---|---|---|---|---|---|"]
    for model, cluster, nodes, seq, gb, target, allow in SEARCH_CASES:
        cfg = load_model_config(model)
        cl = load_cluster(cluster, nodes=nodes)
        best_t, r = None, None
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = search(cfg, cl, seq, gb, allow=Allow.parse(allow))
            dt = time.perf_counter() - t0
            best_t = dt if best_t is None else min(best_t, dt)
        lay = describe_layout(r.best.plan) if r.best else "infeasible"
        mfu = f"{100 * r.best.prediction.mfu:.1f}%" if r.best else "-"
        flags = "".join(f", allow {a}" for a in allow)
        rows.append(f"| {model} seq {seq} gb {gb} on {cluster}{flags} | {cl.world_size} | {best_t:.2f} | < {target:g} | {r.candidates} | `{lay}` | {mfu} |")
        print(rows[-1], flush=True)
    return rows


def bench_megatron(rows_limit: int | None) -> list[str]:
    out = ["| model | GPUs | published layout (t, p, B) | published TFLOP/s/GPU | predicted TFLOP/s/GPU (same layout) | error | "
           "published tokens/s | searched plan | searched tokens/s | searched / published-layout | search s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    errors = []
    PLOT_ROWS.clear()
    for name, tp, pp, gpus, batch, published in MEGATRON_TABLE1[:rows_limit]:
        cfg = dataclasses.replace(load_model_config(name), tie_embeddings=False)
        cl = load_cluster("dgx-a100-80g", nodes=gpus // 8)
        seq = 2048
        # the 2021 runs predate FlashAttention: their softmax/dropout kernels read and write the score matrices
        hw_2021 = dataclasses.replace(cm.hardware_from_cluster(cl, stack="megatron"), attention="materialized")
        ref = search(cfg, cl, seq, batch, hw=hw_2021, constraints=Constraints(tp=tp, pp=pp, micro_batch=1, recompute="full", sp=False),
                     suggest=False)
        if ref.best is None:
            out.append(f"| {name} | {gpus} | t={tp} p={pp} B={batch} | {published} | infeasible in our model | - | - | - | - | - | - |")
            continue
        p = ref.best.prediction
        # the paper's TFLOP/s: its eq. (3) FLOPs over our predicted step time
        pred_tflops = megatron_flops_per_step(cfg, batch, seq) / p.step_s / gpus / 1e12
        err = (pred_tflops - published) / published
        errors.append(abs(err))
        PLOT_ROWS.append((name.replace("megatron-gpt-", ""), published, pred_tflops))
        pub_tokens = published * 1e12 * gpus / (megatron_flops_per_step(cfg, batch, seq) / (batch * seq))
        t0 = time.perf_counter()
        free = search(cfg, cl, seq, batch, hw=hw_2021, suggest=False)  # same kernels, any layout
        ts = time.perf_counter() - t0
        f = free.best.prediction
        out.append(f"| {name} | {gpus} | t={tp} p={pp} B={batch} ({describe_layout(ref.best.plan).split(';')[0]}) | {published} | "
                   f"{pred_tflops:.0f} | {100 * err:+.1f}% | {pub_tokens:,.0f} | `{describe_layout(free.best.plan)}` | "
                   f"{f.tokens_per_s:,.0f} | {f.tokens_per_s / p.tokens_per_s:.2f}x | {ts:.1f} |")
        print(out[-1], flush=True)
    if errors:
        out.append("")
        out.append(f"Mean absolute error of predicted vs published TFLOP/s/GPU: {100 * sum(errors) / len(errors):.1f}% "
                   f"(max {100 * max(errors):.1f}%) over {len(errors)} rows.")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows and one repeat")
    ap.add_argument("--out", default=None, help="write the markdown tables here")
    ap.add_argument("--plot", default=None, help="write the published-vs-predicted bar chart here (PNG)")
    args = ap.parse_args()
    print("## search time", flush=True)
    t = bench_search_time(1 if args.quick else 3)
    print("## Megatron-LM SC'21 Table 1", flush=True)
    m = bench_megatron(4 if args.quick else None)
    text = "\n".join(["### Search time", "", *t, "", "### Predicted vs published (Megatron-LM SC'21 Table 1, DGX A100 80GB)", "", *m, ""])
    if args.out:
        Path(args.out).write_text(text)
    if args.plot and PLOT_ROWS:
        plot(args.plot)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
