"""Published large-scale training runs vs the planner: the published layout's prediction and the free search's.

Each run: its source (paper, table), model shape, GPUs, layout (tp, pp, dp, cp, recompute), the stack that ran it
(``--stack`` rules: precision policy, overlap) and the published throughput. Throughput is compared in the
paper's own FLOP convention: we apply the paper's FLOPs-per-token formula to our predicted tokens/s, so the
error does not depend on how a paper counts recomputation or attention.

    python benchmarks/bench_published_runs.py [--quick] [--free-max-gpus N] [--rows 0,1,...] [--out FILE]

``--quick`` evaluates the published layouts only (no free search); ``--free-max-gpus`` limits the free search to
runs up to N GPUs (default: every run; all 22 take about a minute on 2 shared cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshwright.config import ModelConfig, load_cluster, load_model_config  # noqa: E402
from meshwright.launcher.planner import cost_model as cm  # noqa: E402
from meshwright.launcher.planner.search import Constraints, describe_layout, search  # noqa: E402


def megatron96(cfg: ModelConfig, seq: int) -> float:
    """Narayanan et al. 2021 eq. (3) per token: 96 l h^2 (1 + s/6h + V/16lh), full recomputation counted."""
    l, h, v = cfg.n_layers, cfg.d_model, cfg.vocab_size
    return 96 * l * h * h * (1 + seq / (6 * h) + v / (16 * l * h))


def megatron72(cfg: ModelConfig, seq: int) -> float:
    """Korthikanti et al. 2022 model FLOPs per token (no recomputation): 72 l h^2 (1 + s/6h + V/12lh)."""
    l, h, v = cfg.n_layers, cfg.d_model, cfg.vocab_size
    return 72 * l * h * h * (1 + seq / (6 * h) + v / (12 * l * h))


def palm(cfg: ModelConfig, seq: int) -> float:
    """6N + 12 l s h (PaLM appendix B), the model-FLOPs convention of MFU figures."""
    return cfg.flops_per_token(seq)


def gpt(name: str, h: int, layers: int, heads: int, vocab: int = 51200, seq: int = 2048) -> dict:
    return {"name": name, "arch": "gpt2", "vocab_size": vocab, "d_model": h, "n_layers": layers, "n_heads": heads,
            "max_seq_len": seq, "tie_embeddings": True}


LLAMA3_405B = {"name": "llama3-405b", "arch": "llama", "vocab_size": 128256, "d_model": 16384, "n_layers": 126,
               "n_heads": 128, "n_kv_heads": 8, "ffn_hidden": 53248, "max_seq_len": 131072, "rope_theta": 500000.0}


@dataclass
class Run:
    system: str
    source: str
    model: dict | str
    cluster: str
    gpus: int
    seq: int
    batch: int  # sequences per step
    tp: int
    pp: int
    published_tflops: float  # per GPU, in ``flops``' convention
    flops: Callable[[ModelConfig, int], float]
    stack: str
    attention: str = "flash"
    recompute: Optional[str] = None
    sp: Optional[bool] = None
    zero: Optional[int] = None
    cp: int = 1
    micro_batch: Optional[int] = None
    certain: bool = True
    note: str = ""
    extra: dict = field(default_factory=dict)


def runs() -> list[Run]:
    out = []
    # Narayanan et al. 2021 (SC'21) Table 1: GPT on DGX A100 80GB, seq 2048, micro-batch 1, full recomputation,
    # interleaved schedule where pp > 1, no sequence parallelism (2022); TFLOP/s per GPU with eq. (3).
    t1 = [("megatron-gpt-1.7b", 1, 1, 32, 512, 137), ("megatron-gpt-3.6b", 2, 1, 64, 512, 138),
          ("megatron-gpt-7.5b", 4, 1, 128, 512, 142), ("megatron-gpt-18.4b", 8, 1, 256, 1024, 135),
          ("megatron-gpt-39.1b", 8, 2, 512, 1536, 138), ("megatron-gpt-76.1b", 8, 4, 1024, 1792, 140),
          ("megatron-gpt-145.6b", 8, 8, 1536, 2304, 148), ("megatron-gpt-310.1b", 8, 16, 1920, 2160, 155),
          ("megatron-gpt-529.6b", 8, 35, 2520, 2520, 163), ("megatron-gpt-1t", 8, 64, 3072, 3072, 163)]
    for name, tp, pp, gpus, batch, tf in t1:
        out.append(Run("Megatron-LM 2021", "Narayanan et al. 2021, Table 1", name, "dgx-a100-80g", gpus, 2048, batch, tp, pp,
                       tf, megatron96, "megatron", attention="materialized", recompute="full", sp=False, zero=0,
                       micro_batch=1))
    # Korthikanti et al. 2022 ("Reducing Activation Recomputation"), Table 5: selective recomputation + sequence
    # parallelism on A100 80GB, seq 2048; MFU (model FLOPs, no recomputation) x 312 TFLOP/s.
    for (name, h, layers, heads, tp, pp, gpus, batch, mfu) in [
            ("gpt-22b", 6144, 48, 64, 8, 1, 8, 4, 0.415), ("gpt-175b", 12288, 96, 96, 8, 8, 64, 64, 0.514),
            ("gpt-530b", 20480, 105, 128, 8, 35, 280, 280, 0.560), ("gpt-1t", 25600, 128, 160, 8, 64, 512, 512, 0.563)]:
        out.append(Run("Korthikanti 2022", "Korthikanti et al. 2022, Table 5 (MFU)", gpt(name, h, layers, heads),
                       "dgx-a100-80g", gpus, 2048, batch, tp, pp, mfu * 312, megatron72, "megatron",
                       attention="materialized", recompute="selective", sp=True, zero=0, micro_batch=1,
                       certain=False, note="micro-batch 1 assumed"))
    # BLOOM-176B (BigScience 2022, arXiv 2211.05100 sec. 3.4): 384 A100 80GB, tp 4 pp 12 dp 8, Megatron-DeepSpeed
    # (DeepSpeed pipeline engine; bf16 through DeepSpeed's BF16_Optimizer, which has ZeRO-1 built in and accumulates
    # gradients in fp32: stack deepspeed-fp32-accum), full recomputation, seq 2048, global batch 2048; ~150 TFLOP/s
    # per GPU (the paper says up to 156) in eq. (3)'s convention.
    out.append(Run("BLOOM-176B", "Le Scao et al. 2022, sec. 3.4", gpt("bloom-176b", 14336, 70, 112, vocab=250880),
                   "dgx-a100-80g", 384, 2048, 2048, 4, 12, 150, megatron96, "deepspeed-fp32-accum", attention="materialized",
                   recompute="full", sp=False, zero=1, certain=False,
                   note="150-156 TFLOP/s reported; ALiBi modelled as gpt2 blocks"))
    # OPT-175B (Zhang et al. 2022, sec. 2.3): 992 A100 80GB, FSDP + Megatron tp 8, up to 147 TFLOP/s per GPU;
    # batch 2M tokens (992 x 2048); convention and recomputation not stated.
    out.append(Run("OPT-175B", "Zhang et al. 2022, sec. 2.3", gpt("opt-175b", 12288, 96, 96, vocab=50272),
                   "dgx-a100-80g", 992, 2048, 992, 8, 1, 147, megatron72, "torchtitan", attention="materialized",
                   sp=False, zero=3, certain=False, note="FLOP convention and recomputation unstated (72-formula assumed)"))
    # MT-NLG 530B (Smith et al. 2022, sec. 3.2 / Table): tp 8, pp 35 on 280/350/420 DGX A100, global batch 1920,
    # seq 2048, DeepSpeed pipeline + Megatron tp, full recomputation; 126 / 121 / 113 TFLOP/s per GPU.
    for nodes, tf in [(280, 126), (350, 121), (420, 113)]:
        out.append(Run("MT-NLG 530B", "Smith et al. 2022, Table 2", gpt("mt-nlg-530b", 20480, 105, 128),
                       "dgx-a100-80g", nodes * 8, 2048, 1920, 8, 35, tf, megatron96, "deepspeed",
                       attention="materialized", recompute="full", sp=False, zero=1, micro_batch=1))
    # Llama 3 405B (Dubey et al. 2024, Table 4): H100 80GB, seq 8192 (and 131072 with cp 16), tp 8, pp 16,
    # 16M tokens per batch; BF16 MFU 43% / 41% / 38% of 989 TFLOP/s.
    for gpus, seq, cp, mfu in [(8192, 8192, 1, 0.43), (16384, 8192, 1, 0.41), (16384, 131072, 16, 0.38)]:
        out.append(Run("Llama 3 405B", "Dubey et al. 2024, Table 4 (MFU)", LLAMA3_405B, "dgx-h100-80g", gpus, seq,
                       16 * 2**20 // seq, 8, 16, mfu * 989.5, palm, "megatron", cp=cp, micro_batch=1,
                       certain=seq == 8192, note="" if seq == 8192 else "attention FLOP convention at 128K unknown"))
    return out


def evaluate(run: Run, free_max_gpus: Optional[int]) -> dict:
    cfg = load_model_config(run.model)
    cl = load_cluster(run.cluster, nodes=run.gpus // 8)
    hw = dataclasses.replace(cm.hardware_from_cluster(cl, stack=run.stack), attention=run.attention)
    c = Constraints(tp=run.tp, pp=run.pp, cp=run.cp, zero=run.zero, recompute=run.recompute, sp=run.sp,
                    micro_batch=run.micro_batch)
    t0 = time.perf_counter()
    ref = search(cfg, cl, run.seq, run.batch, hw=hw, constraints=c, suggest=False)
    row = {"run": run, "cfg": cfg, "fixed_s": time.perf_counter() - t0}
    if ref.best is None:
        row["error"] = "infeasible: " + (ref.rejected[0]["reason"] if ref.rejected else "no layout")
        return row
    p = ref.best.prediction
    per_token = run.flops(cfg, run.seq)
    row["pred_tflops"] = p.tokens_per_s * per_token / run.gpus / 1e12
    row["err"] = row["pred_tflops"] / run.published_tflops - 1
    row["layout"] = describe_layout(ref.best.plan)
    row["mem"] = max(p.memory_gib)
    row["tokens_s"] = p.tokens_per_s
    if free_max_gpus is None or run.gpus <= free_max_gpus:
        t0 = time.perf_counter()
        free = search(cfg, cl, run.seq, run.batch, hw=hw, constraints=Constraints(cp=run.cp if run.cp > 1 else None),
                      suggest=False)
        row["free_s"] = time.perf_counter() - t0
        if free.best is not None:
            row["free_ratio"] = free.best.prediction.tokens_per_s / p.tokens_per_s
            row["free_layout"] = describe_layout(free.best.plan)
    return row


def table(rows: list[dict]) -> list[str]:
    out = ["| system | source | model | GPUs | layout (t, p, cp) | stack | published TFLOP/s/GPU | predicted (published layout) | "
           "error | free search / published layout | free search s | certain |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        run = r["run"]
        name = r["cfg"].name
        lay = f"t{run.tp} p{run.pp}" + (f" cp{run.cp}" if run.cp > 1 else "")
        if "error" in r:
            pred, err = r["error"], "-"
        else:
            pred, err = f"{r['pred_tflops']:.0f} (`{r['layout'][:60]}`, {r['mem']:.0f} GiB)", f"{100 * r['err']:+.1f}%"
        free = f"{r['free_ratio']:.3f}x" if "free_ratio" in r else "not run"
        free_s = f"{r['free_s']:.2f}" if "free_s" in r else "-"
        cert = "yes" if run.certain else f"no: {run.note}"
        out.append(f"| {run.system} | {run.source} | {name} | {run.gpus} | {lay} | {run.stack} | {run.published_tflops:.0f} | "
                   f"{pred} | {err} | {free} | {free_s} | {cert} |")
    return out


def summary(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if "err" in r]
    within = [r for r in ok if abs(r["err"]) <= 0.15]
    free = [r for r in ok if "free_ratio" in r]
    worse = [r for r in free if r["free_ratio"] < 0.98]
    systems = sorted({r["run"].system for r in rows})
    lines = [f"- runs: {len(rows)} from {len(systems)} systems ({', '.join(systems)}); expressible: {len(ok)}",
             f"- |error| <= 15%: {len(within)}/{len(ok)} ({100 * len(within) / max(len(ok), 1):.0f}%; target >= 80%)"]
    if ok:
        lines.append(f"- mean |error| {100 * sum(abs(r['err']) for r in ok) / len(ok):.1f}%, "
                     f"max {100 * max(abs(r['err']) for r in ok):.1f}%")
    lines.append(f"- free search below 0.98x the published layout's prediction: {len(worse)}/{len(free)} searched runs"
                 + (f" ({', '.join(r['cfg'].name + '@' + str(r['run'].gpus) for r in worse)})" if worse else ""))
    if free:
        ratios = [r["free_ratio"] for r in free]
        secs = [r["free_s"] for r in free if "free_s" in r]
        lines.append(f"- free search / published layout: {min(ratios):.3f}x to {max(ratios):.2f}x"
                     + (f"; free search time {min(secs):.2f} to {max(secs):.2f} s per run, {sum(secs):.1f} s in all"
                        if secs else ""))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="published layouts only (no free search)")
    ap.add_argument("--free-max-gpus", type=int, default=None, help="free search only up to this many GPUs (default: all)")
    ap.add_argument("--rows", default=None, help="comma-separated run indices (default: all)")
    ap.add_argument("--no-times", action="store_true", help="print '-' for the free-search seconds (output comparable byte for byte)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    selected = runs()
    if args.rows:
        selected = [selected[int(i)] for i in args.rows.split(",")]
    for run in selected:
        r = evaluate(run, 0 if args.quick else args.free_max_gpus)
        if args.no_times:
            r.pop("free_s", None)
        rows.append(r)
        print(table([r])[-1], flush=True)
        if "free_layout" in r:
            print(f"    free search: {r['free_layout'][:160]}", flush=True)
    text = [f"## Published runs vs the planner ({time.strftime('%Y-%m-%d')})", "",
            f"Machine: {platform.machine()} CPU, {platform.python_version()}; planner only (no GPU).",
            f"Command: `python {' '.join(sys.argv)}`", "",
            *summary(rows), "", *table(rows)]
    if args.out:
        Path(args.out).write_text("\n".join(text) + "\n")
    print("\n".join(summary(rows)))


if __name__ == "__main__":
    main()
