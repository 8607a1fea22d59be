"""WTA-CRS vs exact gradients, side by side in one run: saved bytes, peak RSS, batch in a budget,
step time, estimator variance on real gradients, and a loss curve on `tiny`.

    .venv/bin/python benchmarks/bench_wta_crs.py [--steps 300] [--out benchmarks/results]

Saved bytes and variances are deterministic; RSS and times are noisy on a shared CPU (ratios only).
Text comes from this Python's standard-library sources (bytes = tokens), so nothing downloads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from meshwright.config import load_model_config  # noqa: E402
from meshwright.memory.accounting import count_saved_bytes  # noqa: E402
from meshwright.memory.wta_crs import (  # noqa: E402
    DEFAULT_TARGETS, WTACRSLinear, apply_wta_crs, estimator_variance, kept_rows, wta_crs_saved_bytes,
)
from meshwright.models import build_model, lm_loss  # noqa: E402

KEEPS = (1.0, 0.3, 0.1)
SHAPES = {  # name -> (model config, batch, seq)
    "tiny": (load_model_config("tiny"), 8, 128),
    "gpt2-small-shaped": (dataclasses.replace(load_model_config("gpt2-small"), n_layers=2, vocab_size=256,
                                              name="gpt2-small-2layer"), 2, 512),
}
LORA_RANK = 8


# ---- data: stdlib source bytes -----------------------------------------------------------------
def corpus_bytes(limit: int = 4_000_000) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    buf = bytearray()
    for p in sorted(root.glob("*.py")):
        buf += p.read_bytes()
        if len(buf) >= limit:
            break
    return torch.frombuffer(bytearray(buf[:limit]), dtype=torch.uint8).long()


def batches(data: torch.Tensor, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        yield torch.stack([data[s: s + seq + 1] for s in starts.tolist()])


# ---- model setups ------------------------------------------------------------------------------
def make(shape: str, keep: float, lora: bool, seed: int = 0):
    cfg, batch, seq = SHAPES[shape]
    model = build_model(cfg, seed=seed)
    if lora:  # LoRA-style frozen base: adapters on exactly the layers WTA-CRS samples
        from meshwright.memory.lora import apply_lora
        apply_lora(model, rank=LORA_RANK, targets=tuple(t.rsplit(".", 1)[1] for t in DEFAULT_TARGETS))
    if keep < 1.0:
        apply_wta_crs(model, keep)
    return model, batch, seq


def step(model, tokens) -> torch.Tensor:
    loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    return loss


def saved_bytes(shape: str, keep: float, lora: bool, batch: int | None = None) -> int:
    model, b, seq = make(shape, keep, lora)
    tokens = torch.randint(0, 256, (batch or b, seq + 1), generator=torch.Generator().manual_seed(0))
    with count_saved_bytes(model) as sb:
        lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    return sb.total


def linear_term(shape: str, keep: float, batch: int | None = None) -> int:
    """Planner term: bytes the sampled linears keep (exact: the whole input, w1/w3 sharing one)."""
    cfg, b, seq = SHAPES[shape]
    n = (batch or b) * seq
    widths = [cfg.d_model, cfg.d_model, cfg.ffn_dim] + ([cfg.d_model] if cfg.arch == "llama" else [])  # wo w1 w2 w3
    if keep >= 1.0:
        per = n * 4 * (cfg.d_model + cfg.d_model + cfg.ffn_dim)  # w1/w3 share their input
    else:
        per = sum(wta_crs_saved_bytes(n, w, keep) for w in widths)
    return per * cfg.n_layers


def rss_child(shape: str, keep: float, lora: bool) -> dict:
    """In a fresh process: RSS growth of one training step (peak minus resident before the step)."""
    torch.set_num_threads(1)
    model, b, seq = make(shape, keep, lora)
    tokens = torch.randint(0, 256, (b, seq + 1), generator=torch.Generator().manual_seed(0))
    step(model, tokens[:1, :17])  # page in every kernel's code first: RSS counts shared-library pages
    model.zero_grad(set_to_none=True)
    page = os.sysconf("SC_PAGE_SIZE")
    before = int(Path("/proc/self/statm").read_text().split()[1]) * page
    step(model, tokens)
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across fork+exec
    status = Path("/proc/self/status").read_text().split("\n")
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    return {"peak_rss": peak, "step_growth": max(0, peak - before)}


def rss(shape: str, keep: float, lora: bool, reps: int = 3) -> dict:
    """Median over ``reps`` fresh processes (RSS is noisy: allocator and page-in effects)."""
    cmd = [sys.executable, __file__, "--rss-child", shape, str(keep), str(int(lora))]
    runs = []
    for _ in range(reps):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True,
                             env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def step_times(shape: str, lora: bool, reps: int = 5) -> dict[float, float]:
    """Fastest of ``reps`` steps per keep ratio, the configs interleaved round-robin so that load
    changes on a shared machine hit all of them alike (min is the least contention-sensitive)."""
    setups = {keep: make(shape, keep, lora) for keep in KEEPS}
    toks = {keep: torch.randint(0, 256, (b, seq + 1), generator=torch.Generator().manual_seed(0))
            for keep, (_, b, seq) in setups.items()}
    best = {keep: float("inf") for keep in KEEPS}
    for keep in KEEPS:
        step(setups[keep][0], toks[keep])  # warm-up
    for _ in range(reps):
        for keep in KEEPS:
            setups[keep][0].zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step(setups[keep][0], toks[keep])
            best[keep] = min(best[keep], time.perf_counter() - t0)
    return best


# ---- estimator variance on real gradients ------------------------------------------------------
def capture(model, layer: str, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    mod = model.get_submodule(layer)
    store = {}
    h1 = mod.register_forward_hook(lambda m, i, o: store.__setitem__("x", i[0].detach()))
    h2 = mod.register_full_backward_hook(lambda m, gi, go: store.__setitem__("g", go[0].detach()))
    model.zero_grad(set_to_none=True)
    step(model, tokens)
    h1.remove()
    h2.remove()
    return store["x"], store["g"]


def variance_table(model, data, layers: list[str], keeps=(0.3, 0.1)) -> list[dict]:
    rows = []
    it = batches(data, 8, 128, seed=99)
    prev, cur = next(it), next(it)
    for layer in layers:
        _, g_prev = capture(model, layer, prev)
        x, g = capture(model, layer, cur)
        s = x.shape[-2]
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        ref = float((g2.double().t() @ x2.double()).pow(2).sum())
        xn, gn = x2.norm(dim=1), g2.norm(dim=1)
        cache = g_prev.reshape(-1, s, g_prev.shape[-1]).norm(dim=-1).mean(0)
        est = xn * cache.repeat(x2.shape[0] // s)
        cached = 0.9 * est / est.sum() + 0.1 * xn / xn.sum()
        for keep in keeps:
            k = kept_rows(x2.shape[0], keep)
            props = {"uniform": torch.ones_like(xn), "x": xn, "cached": cached, "oracle": xn * gn}
            row = {"layer": layer, "keep": keep}
            for name, q in props.items():
                for wta in (False, True):
                    row[f"{'wta' if wta else 'crs'}-{name}"] = estimator_variance(x2, g2, q, k, winners=wta) / ref
            rows.append(row)
    return rows


# ---- loss curves -------------------------------------------------------------------------------
def loss_curve(data, keep: float, steps: int, proposal: str = "x", batch: int = 8, seq: int = 128) -> tuple[list[float], float, torch.nn.Module]:
    from tqdm import tqdm

    model = build_model("tiny", seed=0)
    if keep < 1.0:
        apply_wta_crs(model, keep, proposal=proposal)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    it = batches(data, batch, seq, seed=1)
    losses = []
    for _ in tqdm(range(steps), desc=f"tiny keep={keep} {proposal}", leave=False):
        opt.zero_grad(set_to_none=True)
        losses.append(step(model, next(it)).item())
        opt.step()
    model.eval()
    with torch.no_grad():
        ev = statistics.mean(lm_loss(model(b[:, :-1]), b[:, 1:]).item()
                             for b, _ in zip(batches(data[-400_000:], batch, seq, seed=7), range(8)))
    model.train()
    return losses, ev, model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--sections", default="memory,batch,time,loss", help="comma list; variance needs loss")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--rss-child", nargs=3, metavar=("SHAPE", "KEEP", "LORA"))
    a = ap.parse_args()
    if a.rss_child:
        print(json.dumps(rss_child(a.rss_child[0], float(a.rss_child[1]), bool(int(a.rss_child[2])))))
        return
    torch.set_num_threads(1)  # the box is shared: more threads oversubscribe the cores and spin
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"memory": [], "batch": [], "time": []}

    sections = set(a.sections.split(","))
    if "memory" in sections:
        memory_section(results)
    if "batch" in sections:
        batch_section(results)
    if "time" in sections:
        time_section(results)
    if "loss" in sections:
        loss_section(results, a.steps, out)
    (out / "wta_crs.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'wta_crs.json'}")


def memory_section(results: dict) -> None:
    mib = 1 << 20
    print("## saved-activation bytes and peak RSS of one training step")
    print("| shape | mode | keep | sampled-linear bytes (MiB) | model saved bytes (MiB) | ratio vs keep 1 | step RSS growth (MiB) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        for lora in (False, True):
            base_sb = base_rss = None
            for keep in KEEPS:
                sb = saved_bytes(shape, keep, lora)
                r = rss(shape, keep, lora)
                base_sb = base_sb or sb
                base_rss = base_rss or r["step_growth"]
                row = {"shape": shape, "lora": lora, "keep": keep, "linear_bytes": linear_term(shape, keep),
                       "saved_bytes": sb, "step_rss_growth": r["step_growth"], "peak_rss": r["peak_rss"]}
                results["memory"].append(row)
                print(f"| {shape} | {'LoRA r=8, frozen base' if lora else 'full'} | {keep} | "
                      f"{row['linear_bytes'] / mib:.1f} | {sb / mib:.1f} | {base_sb / sb:.2f}x | "
                      f"{r['step_growth'] / mib:.1f} | {base_rss / max(1, r['step_growth']):.2f}x |")



def batch_section(results: dict) -> None:
    mib = 1 << 20
    print("\n## largest batch whose saved activations fit the keep-1.0 budget at batch 8 (LoRA, frozen base)")
    print("| shape | keep | budget (MiB) | whole model: max batch | ratio | sampled linears only: max batch | ratio |")
    print("|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        budget_model = saved_bytes(shape, 1.0, True, batch=8)
        budget_lin = linear_term(shape, 1.0, batch=8)
        for keep in KEEPS:
            # saved bytes are affine in the batch (a few batch-independent tensors, e.g. rope tables)
            at4, at8 = saved_bytes(shape, keep, True, batch=4), saved_bytes(shape, keep, True, batch=8)
            per_seq, fixed = (at8 - at4) / 4, at4 - (at8 - at4)
            lin4, lin8 = linear_term(shape, keep, batch=4), linear_term(shape, keep, batch=8)
            bm = int((budget_model - fixed) // per_seq)
            bl = int((budget_lin - (lin4 - (lin8 - lin4))) // ((lin8 - lin4) / 4))
            results["batch"].append({"shape": shape, "keep": keep, "model_batch": bm, "linear_batch": bl})
            print(f"| {shape} | {keep} | {budget_model / mib:.0f} | {bm} | {bm / 8:.2f}x | {bl} | {bl / 8:.2f}x |")

def time_section(results: dict) -> None:
    print("\n## step time (fastest of 5 interleaved steps, 1 thread, shared 2-core CPU: ratios only)")
    print("| shape | mode | keep | step s | ratio vs keep 1 |")
    print("|---|---|---|---|---|")
    torch.set_num_threads(1)
    for shape in SHAPES:
        for lora in (False, True):
            times = step_times(shape, lora)
            for keep, t in times.items():
                results["time"].append({"shape": shape, "lora": lora, "keep": keep, "step_s": t})
                print(f"| {shape} | {'LoRA' if lora else 'full'} | {keep} | {t:.3f} | {t / times[1.0]:.2f} |")


def loss_section(results: dict, steps: int, out: Path) -> None:
    data = corpus_bytes()
    print(f"\n## loss curves on tiny ({steps} steps, batch 8 x 128 bytes of stdlib source, AdamW 2e-3)")
    curves, evals, trained = {}, {}, None
    for keep, prop in ((1.0, "x"), (0.3, "x"), (0.3, "cached"), (0.1, "x")):
        name = f"keep {keep}" + (f" ({prop})" if keep < 1 else " (exact)")
        curves[name], evals[name], model = loss_curve(data, keep, steps, prop)
        if keep == 1.0:
            trained = model
    print("| run | mean train loss, last 50 steps | held-out loss |")
    print("|---|---|---|")
    for name in curves:
        print(f"| {name} | {statistics.mean(curves[name][-50:]):.3f} | {evals[name]:.3f} |")
    results["loss"] = {"curves": curves, "eval": evals}

    print("\n## estimator variance on real gradients of the trained tiny model, E||est - G^T X||^2 / ||G^T X||^2")
    layers = ["layers.1.attention.wo", "layers.1.feed_forward.w1", "layers.1.feed_forward.w2"]
    vt = variance_table(trained, data, layers)
    cols = [c for c in vt[0] if c not in ("layer", "keep")]
    print("| layer | keep | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for row in vt:
        print(f"| {row['layer']} | {row['keep']} | " + " | ".join(f"{row[c]:.3g}" for c in cols) + " |")
    results["variance"] = vt

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        sm = [statistics.mean(c[max(0, i - 9): i + 1]) for i in range(len(c))]
        ax.plot(sm, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (10-step mean)")
    ax.set_title("tiny: WTA-CRS sampled weight gradients vs exact")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "wta_crs_loss.png", dpi=120)
    print(f"\nwrote {out / 'wta_crs_loss.png'}")


if __name__ == "__main__":
    main()
