"""LeMo token elimination vs dense LoRA fine-tuning on a tiny-width decoder, 1K-8K tokens of context.

One run measures, side by side:
  * memory: bytes saved for backward (exact, ``count_saved_bytes``) and the peak RSS a training
    step adds over the process's resident set before it, for dense LoRA (ordinary head + loss),
    dense LoRA + segmented loss, and LeMo (predictor-scored, keep ratio on every layer) + LoRA +
    segmented loss. Each (config, length) runs in its own child process so peak RSS is per config;
  * step time (fwd + bwd + AdamW on the adapters) from the same children - a shared 2-core CPU,
    read ratios as indicative only;
  * quality: a short full pre-training of the base on the default corpus (stdlib .py bytes), then
    predictor training with the base frozen (recall of the true top blocks on held-out text vs a
    random pick), then the same short LoRA fine-tune dense and with LeMo; held-out perplexity.

    .venv/bin/python benchmarks/bench_lemo.py [--seqs 1024,2048,4096,8192 --layers 4 --keep 0.5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from meshwright.config import ModelConfig  # noqa: E402
from meshwright.memory.accounting import count_saved_bytes  # noqa: E402
from meshwright.memory.lemo import LemoConfig, apply_lemo, lemo_layers, set_lemo_enabled  # noqa: E402
from meshwright.memory.lemo_predictor import attach_predictors, predictor_recall, train_predictors  # noqa: E402
from meshwright.memory.lora import apply_lora, lora_parameters  # noqa: E402
from meshwright.memory.segmented_loss import segmented_lm_loss  # noqa: E402
from meshwright.models import build_model, lm_loss  # noqa: E402

CONFIGS = ("dense_lora", "dense_lora_seg", "lemo")
LABELS = {"dense_lora": "dense LoRA", "dense_lora_seg": "dense LoRA + segmented loss", "lemo": "LeMo + LoRA + segmented loss"}


def model_cfg(layers: int, max_seq: int) -> ModelConfig:
    """The `tiny` preset's width (d_model 128, 4 heads, 2 KV heads, SwiGLU 384) with a long context."""
    return ModelConfig(name="tiny-long", d_model=128, n_layers=layers, n_heads=4, n_kv_heads=2, ffn_hidden=384,
                       max_seq_len=max_seq)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- one (config, length) measurement, in a child process -----------------------------------------


def child(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    cfg = model_cfg(args.layers, args.seq)
    m = build_model(cfg, seed=0)
    apply_lora(m, args.rank)
    if args.child == "lemo":
        apply_lemo(m, LemoConfig(keep_ratio=args.keep, block_size=args.block, scorer="predictor"))
        attach_predictors(m, rank=16)
        for b in lemo_layers(m).values():
            b.lemo_predictor.requires_grad_(False)
    opt = torch.optim.AdamW(lora_parameters(m), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (args.batch, args.seq), generator=g)
    y = torch.randint(0, 256, (args.batch, args.seq), generator=g)

    def loss_fn():
        if args.child == "dense_lora":
            return lm_loss(m(x), y)
        return segmented_lm_loss(m, x, y, chunk_size=1024)

    # warm-up at a short length: loads kernels and code pages, so the RSS delta is the step's own memory
    warm = 2 * args.block
    (lm_loss(m(x[:, :warm]), y[:, :warm]) if args.child == "dense_lora" else segmented_lm_loss(m, x[:, :warm], y[:, :warm])).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times, saved = [], None
    base_rss = rss_bytes()
    for step in range(args.steps):
        t0 = time.perf_counter()
        if step == 0:
            with count_saved_bytes(m) as sb:
                loss = loss_fn()
            saved = sb.total
        else:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print("RESULT " + json.dumps({"config": args.child, "seq": args.seq, "saved_bytes": saved,
                                  "peak_step_rss": peak_rss_bytes() - base_rss, "peak_rss": peak_rss_bytes(),
                                  "step_s": min(times[1:]) if len(times) > 1 else times[0]}))


def run_children(args: argparse.Namespace) -> list[dict]:
    from tqdm import tqdm

    results = []
    jobs = [(s, c) for s in args.seq_list for c in CONFIGS]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    for seq, cfg in tqdm(jobs, desc="memory/time children"):
        cmd = [sys.executable, __file__, "--child", cfg, "--seq", str(seq), "--layers", str(args.layers),
               "--keep", str(args.keep), "--block", str(args.block), "--batch", str(args.batch),
               "--rank", str(args.rank), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout, env=env, cwd=REPO)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            raise SystemExit(f"child {cfg} seq={seq} failed (rc={out.returncode}): {out.stderr[-2000:]}")
        results.append(json.loads(line[0][7:]))
    return results


# ---- quality: pre-train, predictors, fine-tune, perplexity ----------------------------------------


def corpus_bytes(limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Default corpus (stdlib .py sources, byte tokens): first 90% of files train, last 10% held out."""
    try:
        from meshwright.data.corpus import stdlib_files

        files = stdlib_files()
    except Exception:  # the corpus module is optional here; same files, same order
        import sysconfig

        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py") if not {"site-packages", "test", "tests"} & set(p.parts))
    cut = int(len(files) * 0.9)
    def read(fs):
        buf = bytearray()
        for f in fs:
            buf += f.read_bytes()
            if len(buf) >= limit:
                break
        return torch.frombuffer(bytearray(buf[:limit]), dtype=torch.uint8).long()
    return read(files[:cut]), read(files[cut:])


def batches(data: torch.Tensor, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        chunk = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def perplexity(m, held: torch.Tensor, seq: int, n: int) -> float:
    m.eval()
    losses = []
    for i in range(n):
        chunk = held[i * seq:(i + 1) * seq + 1]
        losses.append(float(segmented_lm_loss(m, chunk[None, :-1], chunk[None, 1:], chunk_size=1024)))
    m.train()
    return math.exp(sum(losses) / len(losses))


def train(m, params, data, steps, batch, seq, lr, seed, desc, segmented=True):
    from tqdm import tqdm

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    it = batches(data, batch, seq, seed)
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        x, y = next(it)
        loss = segmented_lm_loss(m, x, y, chunk_size=1024) if segmented else lm_loss(m(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def quality(args: argparse.Namespace) -> dict:
    import copy

    train_data, held = corpus_bytes(4_000_000)
    seq = args.ft_seq
    base = build_model(model_cfg(args.layers, seq), seed=0)
    train(base, list(base.parameters()), train_data, args.pretrain_steps, 8, 256, 3e-3, 10, "pre-train base")
    res = {"base_ppl": perplexity(base, held, seq, args.eval_seqs)}

    lemo = copy.deepcopy(base)
    apply_lemo(lemo, LemoConfig(keep_ratio=args.keep, block_size=args.block, scorer="predictor"))
    train_predictors(lemo, (x for x, _ in batches(train_data, 2, seq, 20)), steps=args.pred_steps, lr=1e-2)
    ev = [held[None, i * seq:(i + 1) * seq] for i in range(args.eval_seqs)]
    res["recall"] = predictor_recall(lemo, ev)
    res["random_recall"] = args.keep  # expected recall of a uniform random pick of the same size
    for b in lemo_layers(lemo).values():
        b.lemo_predictor.requires_grad_(False)

    dense = copy.deepcopy(base)
    apply_lora(dense, args.rank)
    apply_lora(lemo, args.rank)
    res["dense_ft_s"] = train(dense, lora_parameters(dense), train_data, args.ft_steps, 2, seq, 2e-3, 30, "dense LoRA ft")
    res["lemo_ft_s"] = train(lemo, lora_parameters(lemo), train_data, args.ft_steps, 2, seq, 2e-3, 30, "LeMo LoRA ft")
    res["dense_ft_ppl"] = perplexity(dense, held, seq, args.eval_seqs)
    res["lemo_ft_ppl_sparse"] = perplexity(lemo, held, seq, args.eval_seqs)
    set_lemo_enabled(lemo, False)
    res["lemo_ft_ppl_dense"] = perplexity(lemo, held, seq, args.eval_seqs)
    return res


# ---- report ---------------------------------------------------------------------------------------


def report(args, mem: list[dict], q: dict | None) -> str:
    by = {(r["config"], r["seq"]): r for r in mem}
    mib = 2 ** 20
    lines = ["| seq | dense LoRA saved MiB | + seg. loss | LeMo saved MiB | saved ratio (dense/LeMo) | ratio vs dense+seg | "
             "peak step RSS MiB dense / LeMo | RSS ratio | step s dense / LeMo | time ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in args.seq_list:
        d, ds, le = by[("dense_lora", s)], by[("dense_lora_seg", s)], by[("lemo", s)]
        lines.append(
            f"| {s} | {d['saved_bytes'] / mib:.1f} | {ds['saved_bytes'] / mib:.1f} | {le['saved_bytes'] / mib:.1f} | "
            f"{d['saved_bytes'] / le['saved_bytes']:.2f}x | {ds['saved_bytes'] / le['saved_bytes']:.2f}x | "
            f"{d['peak_step_rss'] / mib:.0f} / {le['peak_step_rss'] / mib:.0f} | {d['peak_step_rss'] / max(le['peak_step_rss'], 1):.2f}x | "
            f"{d['step_s']:.2f} / {le['step_s']:.2f} | {d['step_s'] / le['step_s']:.2f}x |")
    out = "\n".join(lines)
    if q:
        rec = ", ".join(f"L{i}: {r:.2f}" for i, r in sorted(q["recall"].items()))
        out += ("\n\n| quality (held-out stdlib bytes, seq "
                f"{args.ft_seq}, {args.eval_seqs} seqs) | value |\n|---|---|\n"
                f"| base perplexity (after {args.pretrain_steps} pre-training steps) | {q['base_ppl']:.3f} |\n"
                f"| dense LoRA fine-tune ({args.ft_steps} steps) perplexity | {q['dense_ft_ppl']:.3f} |\n"
                f"| LeMo LoRA fine-tune, evaluated with LeMo (keep {args.keep}) | {q['lemo_ft_ppl_sparse']:.3f} |\n"
                f"| LeMo LoRA fine-tune, evaluated dense | {q['lemo_ft_ppl_dense']:.3f} |\n"
                f"| perplexity gap (LeMo sparse - dense LoRA) | {q['lemo_ft_ppl_sparse'] - q['dense_ft_ppl']:+.3f} |\n"
                f"| predictor recall of true top blocks ({args.pred_steps} training steps) | {rec} |\n"
                f"| recall of a random pick (expected) | {q['random_recall']:.2f} |\n"
                f"| fine-tune wall time dense / LeMo (s) | {q['dense_ft_s']:.1f} / {q['lemo_ft_s']:.1f} |")
    return out


def plot(args, mem: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for c in CONFIGS:
        rows = sorted((r for r in mem if r["config"] == c), key=lambda r: r["seq"])
        xs = [r["seq"] for r in rows]
        axes[0].plot(xs, [r["saved_bytes"] / 2 ** 20 for r in rows], marker="o", label=LABELS[c])
        axes[1].plot(xs, [r["peak_step_rss"] / 2 ** 20 for r in rows], marker="o", label=LABELS[c])
    axes[0].set_title("bytes saved for backward (exact)")
    axes[1].set_title("peak RSS added by a training step")
    for ax in axes:
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("MiB")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"LeMo (keep {args.keep}, blocks of {args.block}) vs dense LoRA, {args.layers}-layer d_model=128, batch {args.batch}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="1024,2048,4096,8192")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="steps per memory/time child (first is the measured one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child-timeout", type=int, default=600)
    ap.add_argument("--pretrain-steps", type=int, default=120)
    ap.add_argument("--pred-steps", type=int, default=30)
    ap.add_argument("--ft-steps", type=int, default=30)
    ap.add_argument("--ft-seq", type=int, default=1024)
    ap.add_argument("--eval-seqs", type=int, default=6)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--memory-from", help="JSON of an earlier run whose memory/time rows to reuse")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lemo_raw.json"))
    ap.add_argument("--plot", default=str(REPO / "benchmarks" / "results" / "lemo_memory.png"))
    ap.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        child(args)
        return
    args.seq_list = [int(s) for s in re.split(r"[,\s]+", args.seqs) if s]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.memory_from:  # reuse the children's results of an earlier run (e.g. to redo only quality)
        mem = json.loads(Path(args.memory_from).read_text())["memory"]
    else:
        mem = run_children(args)
        Path(args.out).write_text(json.dumps({"memory": mem, "quality": None}, indent=1))
    q = None if args.skip_quality else quality(args)
    print(report(args, mem, q))
    plot(args, mem, Path(args.plot))
    Path(args.out).write_text(json.dumps({"memory": mem, "quality": q, "args": {k: v for k, v in vars(args).items()}},
                                         indent=1, default=str))
    print(f"\nwrote {args.plot} and {args.out}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
