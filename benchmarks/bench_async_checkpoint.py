"""How long training stalls per checkpoint: synchronous checkpoints (save_checkpoint) side by side with background
ones (ckpt_async: AsyncCheckpointer, train/async_checkpoint.py), in one process, one run, same model and steps.

    .venv/bin/python benchmarks/bench_async_checkpoint.py [--d-model 1024 --layers 8 --steps 16 --every 4 --out FILE]

Each mode trains the same fp32 model (AdamW) for ``--steps`` steps with a checkpoint every ``--every`` steps; the
time of the save call is what the step is blocked for. Ordinary steps of the async mode include the cost of the
writer running beside them (CPU and disk it takes), so the whole run's time, the final wait for the last write
included, is reported too. Prints a markdown section (benchmarks/results/async_checkpoint.md).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from meshwright.config import load_model_config
from meshwright.models import build_model
from meshwright.train.async_checkpoint import AsyncCheckpointer
from meshwright.train.checkpoint import save_checkpoint
from meshwright.train.local_runtime import LocalRuntime


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a step's time is its compute (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(mode: str, root: Path, args: argparse.Namespace) -> dict[str, float]:
    """Train ``args.steps`` steps checkpointing every ``args.every``: seconds per kind of step, in the save call
    (and, async, waiting there for the previous write), and for the whole run including the wait for the last write."""
    cfg = load_model_config({"name": "bench", "vocab_size": args.vocab, "d_model": args.d_model, "n_layers": args.layers,
                             "n_heads": 16, "max_seq_len": args.seq})
    torch.manual_seed(0)
    device = torch.device(args.device)
    rt = LocalRuntime(build_model(cfg, seed=0).to(device))
    opt = torch.optim.AdamW(rt.parameters(), lr=1e-4)
    writer = AsyncCheckpointer(rt) if mode == "async" else None
    gen = torch.Generator().manual_seed(0)
    ordinary, save_s, wait_s = [], [], []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = [(torch.randint(0, args.vocab, (1, args.seq), generator=gen).to(device),
                  torch.randint(0, args.vocab, (1, args.seq), generator=gen).to(device))]
        t0 = time.perf_counter()
        rt.forward_backward(batch)
        rt.optimizer_step(opt)
        sync(device)
        t1 = time.perf_counter()
        if step % args.every == 0:
            state = {"step": step}
            if writer is not None:
                writer.wait()  # what save() does first; timed apart: the previous write still in flight
                t2 = time.perf_counter()
                writer.save(root, step, opt, state, keep=1)
                wait_s.append(t2 - t1)
            else:
                save_checkpoint(root, step, rt, opt, state, keep=1)
            save_s.append(time.perf_counter() - t1)
        elif step > 1:  # the first step pays one-off allocations
            ordinary.append(t1 - t0)
    t0 = time.perf_counter()
    if writer is not None:
        writer.close()
    end = time.perf_counter()
    size = sum(f.stat().st_size for d in root.glob("step_*") for f in d.iterdir())
    params = sum(p.numel() for p in rt.parameters())
    shutil.rmtree(root)
    return {"ordinary_s": statistics.median(ordinary), "save_s": statistics.median(save_s),
            "wait_s": statistics.median(wait_s) if wait_s else 0.0, "final_wait_s": end - t0, "total_s": end - start,
            "bytes": size, "params": params, "n_ckpt": len(save_s)}


def where(device: str) -> str:
    """The device named for the results: the GPU's name on CUDA."""
    return f"on {torch.cuda.get_device_name(0)}" if device.startswith("cuda") else "no GPU"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the staged copy then goes to pinned host memory)")
    ap.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="also write the section to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    res = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for mode in ("sync", "async"):
            res[mode] = run(mode, Path(tmp) / mode, args)
    s, a = res["sync"], res["async"]

    def cost(r: dict[str, float]) -> str:  # what checkpointing added to the run, the writer's share of later steps too
        return f"{(r['total_s'] - args.steps * s['ordinary_s']) / r['n_ckpt']:.2f}"

    cmd = " ".join(sys.argv[1:])
    lines = [
        "## Asynchronous checkpoints (ckpt_async)", "",
        f"Date {datetime.date.today()} · machine: {platform.machine()} CPU, {where(args.device)}, {args.threads} torch "
        f"thread(s), cores shared with other jobs (wall-clock numbers are noisy, read the ratio) · torch "
        f"{torch.__version__}", "",
        f"Command: `.venv/bin/python benchmarks/bench_async_checkpoint.py {cmd}`: one process, fp32 model of "
        f"{s['params'] / 1e6:.0f}M parameters (d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}), "
        f"AdamW, batch 1 x {args.seq} tokens, {args.steps} steps with a checkpoint every {args.every} "
        f"({s['n_ckpt']} per mode, {s['bytes'] / 2**30:.2f} GiB each: weights + AdamW state + RNG, checksummed); "
        "both modes in one run, sync first.", "",
        "| | sync | async | async / sync |", "|---|---|---|---|",
        f"| training blocked per checkpoint (the save call, median) s | {s['save_s']:.2f} | {a['save_s']:.2f} | "
        f"{a['save_s'] / s['save_s']:.2f}x |",
        f"| of which waiting for the previous write s | | {a['wait_s']:.2f} | |",
        f"| median ordinary step s | {s['ordinary_s']:.2f} | {a['ordinary_s']:.2f} | {a['ordinary_s'] / s['ordinary_s']:.2f}x |",
        f"| wait for the last write at the end s | | {a['final_wait_s']:.2f} | |",
        f"| whole run s | {s['total_s']:.1f} | {a['total_s']:.1f} | {a['total_s'] / s['total_s']:.2f}x |",
        f"| cost per checkpoint s: (whole run - {args.steps} x sync ordinary step) / {s['n_ckpt']} | {cost(s)} | "
        f"{cost(a)} | {float(cost(a)) / float(cost(s)):.2f}x |",
        "",
        "Async, the save call is the copy of the state into CPU memory, the RNG files and trainer_state.json (and any "
        "wait for the previous write still in flight); the write, checksums and rename run beside the following "
        "steps, whose time includes the CPU the writer takes from them: on this shared 2-core CPU the training and "
        "the writer compete for the same cores. On a GPU the steps run on the device and that share is smaller.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
