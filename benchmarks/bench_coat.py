"""COAT side by side with the baselines in one run: state bytes, saved-activation bytes, peak memory,
step time and 300+-step loss curves of `tiny` (fp32 AdamW vs CoatAdamW vs CoatAdamW + FP8 activations).

    .venv/bin/python benchmarks/bench_coat.py [--steps 300] [--plot benchmarks/results/coat.png]

Bytes are deterministic; peak RSS and step times come from a shared CPU box (ratios only, noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from meshwright.config import load_model_config  # noqa: E402
from meshwright.memory.accounting import count_saved_bytes  # noqa: E402
from meshwright.memory.fp8_activations import apply_fp8_activations, block_saved_bytes_per_token  # noqa: E402
from meshwright.models import build_model, lm_loss  # noqa: E402
from meshwright.optim import CoatAdamW, coat_state_bytes_per_param  # noqa: E402

CONFIGS = {  # name -> (optimizer, fp8 activations)
    "fp32 AdamW": ("adamw", False),
    "CoatAdamW": ("coat", False),
    "CoatAdamW + FP8 act": ("coat", True),
}


def make_optimizer(kind: str, params, lr: float = 3e-3):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    return CoatAdamW(params, lr=lr, weight_decay=0.01)


def token_stream(seq: int, batch: int, seed: int = 0):
    """Batches from the default corpus (meshwright.data) or, if that is unavailable, stdlib bytes."""
    try:
        from meshwright.data import SequenceLoader, TokenDataset, prepare_default_corpus

        ds = TokenDataset(prepare_default_corpus(progress=False))
        train = SequenceLoader(ds.split("train", 0.05), seq, batch, batch, seed=seed)
        val = SequenceLoader(ds.split("val", 0.05), seq, batch, batch, shuffle=False, name="val")
        return (lambda: train.next_batch()[0]), val.fixed_batches(16), "default corpus (meshwright.data, byte tokens)"
    except Exception as exc:  # noqa: BLE001 - the loader is someone else's work in progress
        import numpy as np

        data = b"".join(p.read_bytes() for p in sorted(Path(os.__file__).parent.glob("*.py"))[:200])
        toks = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
        g = np.random.default_rng(seed)
        cut = int(len(toks) * 0.95)

        def draw(lo: int, hi: int, rng) -> tuple[torch.Tensor, torch.Tensor]:
            s = rng.integers(lo, hi - seq - 1, size=batch)
            x = torch.from_numpy(np.stack([toks[i:i + seq + 1] for i in s]))
            return x[:, :-1], x[:, 1:]

        vr = np.random.default_rng(1)
        return (lambda: draw(0, cut, g)), [draw(cut, len(toks), vr) for _ in range(16)], f"stdlib bytes (fallback: {exc})"


# ---- 1. optimizer-state bytes ------------------------------------------------------------------
def state_bytes() -> list[tuple[str, float, float]]:
    model = build_model("tiny", seed=0)
    n = sum(p.numel() for p in model.parameters())
    out = []
    for name, kind in (("fp32 AdamW", "adamw"), ("CoatAdamW", "coat")):
        opt = make_optimizer(kind, model.parameters())
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        total = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items()
                    if k != "step" and isinstance(t, torch.Tensor))
        out.append((name, total / n, total))
    return out


# ---- 2. saved activations per token per layer ---------------------------------------------------
def saved_activation_bytes(seq: int = 256, batch: int = 2) -> list[tuple[str, float]]:
    rows = []
    for label, dtype, fp8 in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False),
                              ("FP8 act (fp32 compute)", torch.float32, True),
                              ("FP8 act (bf16 compute)", torch.bfloat16, True)):
        model = build_model("tiny", seed=0).to(dtype)
        if fp8:
            apply_fp8_activations(model)
        h = torch.randn(batch, seq, model.cfg.d_model, dtype=dtype, requires_grad=True)
        rope = model.rope(seq)
        with count_saved_bytes(model, exclude=list(rope)) as sb:
            model.layers["0"](h, rope)
        rows.append((label, sb.total / (batch * seq)))
    return rows


# ---- 3./4. peak memory and step time (one subprocess per configuration) --------------------------
def _child(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    kind, fp8 = CONFIGS[args.child]
    model = build_model("tiny", seed=0)
    if fp8:
        apply_fp8_activations(model)
    opt = make_optimizer(kind, model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.mem_batch, args.mem_seq + 1), generator=g)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(args.time_steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    steady = sorted(times[1:])  # the first step allocates the states
    med = steady[len(steady) // 2]
    print(json.dumps({"peak_delta_mib": (peak - rss0) / 1024, "wall_s": med[0], "cpu_s": med[1]}))


def memory_and_time(args: argparse.Namespace) -> dict[str, dict]:
    out = {}
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--child", name, "--mem-batch", str(args.mem_batch),
               "--mem-seq", str(args.mem_seq), "--time-steps", str(args.time_steps)]
        # Every allocation >= 64 KiB through mmap: freed tensors leave RSS at once, so peak RSS tracks
        # the live tensors instead of glibc's heap high-water mark.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ---- 5. loss curves ----------------------------------------------------------------------------
def loss_curves(steps: int, seq: int, batch: int) -> tuple[dict[str, list[float]], dict[str, float], str]:
    from tqdm import tqdm

    torch.set_num_threads(1)
    curves, vals, source = {}, {}, ""
    for name, (kind, fp8) in CONFIGS.items():
        model = build_model("tiny", seed=0)
        if fp8:
            apply_fp8_activations(model)
        opt = make_optimizer(kind, model.parameters())
        next_batch, val_batches, source = token_stream(seq, batch)
        losses = []
        for _ in tqdm(range(steps), desc=name, leave=False):
            x, y = next_batch()
            loss = lm_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            vals[name] = sum(lm_loss(model(x), y).item() for x, y in val_batches) / len(val_batches)
        curves[name] = losses
    return curves, vals, source


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        w = 10
        smooth = [sum(losses[max(0, i - w + 1): i + 1]) / len(losses[max(0, i - w + 1): i + 1]) for i in range(len(losses))]
        ax.plot(smooth, label=name, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (10-step mean)")
    ax.set_title("tiny on the default corpus: COAT vs fp32 AdamW")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mem-batch", type=int, default=8)
    ap.add_argument("--mem-seq", type=int, default=256)
    ap.add_argument("--time-steps", type=int, default=6)
    ap.add_argument("--plot", default=str(REPO / "benchmarks/results/coat.png"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)

    print("## Optimizer-state bytes per parameter (tiny, measured after one step)\n")
    print("| optimizer | bytes/param | total bytes | vs fp32 AdamW |\n|---|---|---|---|")
    sb = state_bytes()
    for name, per, total in sb:
        print(f"| {name} | {per:.4f} | {total} | {per / sb[0][1]:.3f}x |")
    big = load_model_config("llama2-7b")
    n7 = big.num_params()
    print(f"\nllama2-7b ({n7 / 1e9:.2f} B params): fp32 AdamW {8 * n7 / 2**30:.1f} GiB, "
          f"CoatAdamW {coat_state_bytes_per_param() * n7 / 2**30:.1f} GiB of optimizer state (formula).\n")

    print("## Saved-activation bytes per token per layer (tiny block, count_saved_bytes)\n")
    print("| storage | bytes/token/layer | vs fp32 | vs bf16 |\n|---|---|---|---|")
    acts = saved_activation_bytes()
    for label, b in acts:
        print(f"| {label} | {b:.1f} | {b / acts[0][1]:.3f} | {b / acts[1][1]:.3f} |")
    cfg7 = load_model_config("llama2-7b")
    print(f"\nPlanner formula, llama2-7b block (fp32 compute): {block_saved_bytes_per_token(cfg7, False):.0f} -> "
          f"{block_saved_bytes_per_token(cfg7, True):.0f} bytes/token "
          f"({block_saved_bytes_per_token(cfg7, True) / block_saved_bytes_per_token(cfg7, False):.3f}).\n")

    print(f"## Peak process memory and step time (tiny, batch {args.mem_batch} x seq {args.mem_seq}, 1 thread)\n")
    mt = memory_and_time(args)
    base = mt["fp32 AdamW"]
    print("| config | peak RSS growth during training (MiB) | step wall (s) | step CPU (s) | CPU time vs fp32 AdamW |")
    print("|---|---|---|---|---|")
    for name, r in mt.items():
        print(f"| {name} | {r['peak_delta_mib']:.1f} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | {r['cpu_s'] / base['cpu_s']:.2f}x |")

    print(f"\n## Loss curves ({args.steps} steps, batch {args.batch} x seq {args.seq}, lr 3e-3)\n")
    t0 = time.time()
    curves, vals, source = loss_curves(args.steps, args.seq, args.batch)
    print(f"data: {source}; {time.time() - t0:.0f} s\n")
    print("| config | first loss | mean of last 20 train losses | val loss | val vs fp32 AdamW |\n|---|---|---|---|---|")
    for name, losses in curves.items():
        print(f"| {name} | {losses[0]:.3f} | {sum(losses[-20:]) / 20:.4f} | {vals[name]:.4f} | "
              f"{vals[name] - vals['fp32 AdamW']:+.4f} |")
    plot(curves, Path(args.plot))
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
