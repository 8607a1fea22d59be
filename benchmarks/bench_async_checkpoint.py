"""How long training stalls per checkpoint, and what it holds in host memory: synchronous checkpoints
(save_checkpoint) side by side with background ones (ckpt_async: AsyncCheckpointer, train/async_checkpoint.py),
staged copy kept between saves (ckpt_staging: keep) or freed after each write (free); same model and steps, each
mode in a fresh process of its own (so one mode's freed memory is not counted in the next one's RSS).

    .venv/bin/python benchmarks/bench_async_checkpoint.py [--d-model 1024 --layers 8 --steps 16 --every 4 --out FILE]

Each mode trains the same fp32 model (AdamW) for ``--steps`` steps with a checkpoint every ``--every`` steps; the
time of the save call is what the step is blocked for. Ordinary steps of the async mode include the cost of the
writer running beside them (CPU and disk it takes), so the whole run's time, the final wait for the last write
included, is reported too. Host memory: the process RSS after the first step (model, AdamW state) and after the
last write completed (before the end's cleanup): what the checkpoints leave held between saves. Prints a markdown
section (benchmarks/results/async_checkpoint.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import subprocess
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


def rss_gib() -> float:
    """This process's resident set now (Linux /proc), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run(mode: str, root: Path, args: argparse.Namespace) -> dict[str, float]:
    """Train ``args.steps`` steps checkpointing every ``args.every``: seconds per kind of step, in the save call
    (and, async, waiting there for the previous write), and for the whole run including the wait for the last write."""
    cfg = load_model_config({"name": "bench", "vocab_size": args.vocab, "d_model": args.d_model, "n_layers": args.layers,
                             "n_heads": 16, "max_seq_len": args.seq})
    torch.manual_seed(0)
    device = torch.device(args.device)
    rt = LocalRuntime(build_model(cfg, seed=0).to(device))
    opt = torch.optim.AdamW(rt.parameters(), lr=1e-4)
    writer = AsyncCheckpointer(rt, staging=mode.split("-")[1]) if mode.startswith("async") else None
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
        if step == 1:
            rss_base = rss_gib()
    if writer is not None:
        writer.wait()  # the last write on disk, the stager as it is between saves
    rss_held = rss_gib()
    t0 = time.perf_counter()
    if writer is not None:
        writer.close()
    end = time.perf_counter()
    size = sum(f.stat().st_size for d in root.glob("step_*") for f in d.iterdir())
    params = sum(p.numel() for p in rt.parameters())
    shutil.rmtree(root)
    return {"ordinary_s": statistics.median(ordinary), "save_s": statistics.median(save_s),
            "wait_s": statistics.median(wait_s) if wait_s else 0.0, "final_wait_s": end - t0, "total_s": end - start,
            "bytes": size, "params": params, "n_ckpt": len(save_s), "rss_base": rss_base, "rss_held": rss_held}


MODES = ("sync", "async-keep", "async-free")


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
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one mode, in this process: its numbers as JSON
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.only:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            print(json.dumps(run(args.only, Path(tmp) / args.only, args)))
        return
    res = {}
    for mode in MODES:  # each in a fresh process: RSS is not shared with an earlier mode's freed memory
        argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if v is not None and k not in ("out", "only")]
        out = subprocess.run([sys.executable, __file__, *argv, "--only", mode], capture_output=True, text=True,
                             timeout=3600, check=True).stdout
        res[mode] = json.loads(out.strip().splitlines()[-1])
    s, a, f = res["sync"], res["async-keep"], res["async-free"]

    def cost(r: dict[str, float]) -> str:  # what checkpointing added to the run, the writer's share of later steps too
        return f"{(r['total_s'] - args.steps * s['ordinary_s']) / r['n_ckpt']:.2f}"

    def row(name: str, key: str, fmt: str = ".2f", blank_sync: bool = False) -> str:
        v = [s[key], a[key], f[key]]
        ratio = [f"{x / v[0]:.2f}x" if v[0] else "" for x in v[1:]]
        first = "" if blank_sync else format(v[0], fmt)
        return f"| {name} | {first} | {v[1]:{fmt}} | {v[2]:{fmt}} | {ratio[0] if not blank_sync else ''} | " \
               f"{ratio[1] if not blank_sync else ''} |"

    held = {k: r["rss_held"] - r["rss_base"] for k, r in res.items()}
    cmd = " ".join(sys.argv[1:])
    lines = [
        "## Asynchronous checkpoints (ckpt_async)", "",
        f"Date {datetime.date.today()} · machine: {platform.machine()} CPU, {where(args.device)}, {args.threads} torch "
        f"thread(s), cores shared with other jobs (wall-clock numbers are noisy, read the ratio) · torch "
        f"{torch.__version__}", "",
        f"Command: `.venv/bin/python benchmarks/bench_async_checkpoint.py {cmd}`: fp32 model of "
        f"{s['params'] / 1e6:.0f}M parameters (d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}), "
        f"AdamW, batch 1 x {args.seq} tokens, {args.steps} steps with a checkpoint every {args.every} "
        f"({s['n_ckpt']} per mode, {s['bytes'] / 2**30:.2f} GiB each: weights + AdamW state + RNG, checksummed); "
        "each mode in a fresh process, sync first.", "",
        "| | sync | async, staging kept | async, staging freed | kept / sync | freed / sync |",
        "|---|---|---|---|---|---|",
        row("training blocked per checkpoint (the save call, median) s", "save_s"),
        row("of which waiting for the previous write s", "wait_s", blank_sync=True),
        row("median ordinary step s", "ordinary_s"),
        row("wait for the last write at the end s", "final_wait_s", blank_sync=True),
        row("whole run s", "total_s", ".1f"),
        f"| cost per checkpoint s: (whole run - {args.steps} x sync ordinary step) / {s['n_ckpt']} | {cost(s)} | "
        f"{cost(a)} | {cost(f)} | {float(cost(a)) / float(cost(s)):.2f}x | {float(cost(f)) / float(cost(s)):.2f}x |",
        f"| host RSS after step 1 GiB | {s['rss_base']:.2f} | {a['rss_base']:.2f} | {f['rss_base']:.2f} | | |",
        f"| host RSS after the last write GiB | {s['rss_held']:.2f} | {a['rss_held']:.2f} | {f['rss_held']:.2f} | | |",
        f"| held between saves GiB (the difference) | {held['sync']:.2f} | {held['async-keep']:.2f} | "
        f"{held['async-free']:.2f} | | |",
        "",
        "Async, the save call is the copy of the state into CPU memory, the RNG files and trainer_state.json (and any "
        "wait for the previous write still in flight); the write, checksums and rename run beside the following "
        "steps, whose time includes the CPU the writer takes from them: on this shared 2-core CPU the training and "
        "the writer compete for the same cores. On a GPU the steps run on the device and that share is smaller. "
        "Staging kept (ckpt_staging: keep, auto on CUDA) reuses DCP's staged copy at every save; freed (free, auto "
        "on CPU) allocates it per save and drops it once the write is on disk.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
