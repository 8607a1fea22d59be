"""What the checkpoint safety of issue 19 costs: save and load of one checkpoint with checksums, allow-listed
unpickling and the fit check, side by side with the same calls with the checksums switched off.

    .venv/bin/python benchmarks/bench_checkpoint_safety.py [--d-model 512 --layers 8 --repeats 3]

Prints a markdown section (for benchmarks/results/checkpoint_safety.md).
"""

from __future__ import annotations

import argparse
import warnings
import datetime
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import meshwright.train.checkpoint as ckpt
from meshwright.config import load_model_config
from meshwright.models import build_model
from meshwright.train.checkpoint_io import file_sha256
from meshwright.train.local_runtime import LocalRuntime


def one(root: Path, checksums: bool, d_model: int, layers: int) -> tuple[float, float, int]:
    """Seconds to save, seconds to load, bytes on disk, for one checkpoint of an AdamW-stepped model."""
    cfg = load_model_config({"name": "bench", "vocab_size": 4096, "d_model": d_model, "n_layers": layers,
                             "n_heads": 8, "max_seq_len": 128})
    rt = LocalRuntime(build_model(cfg, seed=0))
    opt = torch.optim.AdamW(rt.parameters(), lr=1e-3)
    rt.forward_backward([(torch.randint(0, 4096, (2, 64)), torch.randint(0, 4096, (2, 64)))])
    opt.step()
    saved_write, saved_verify = ckpt.write_manifest, ckpt.verify_manifest
    if not checksums:
        ckpt.write_manifest = lambda d, names=None: None
    try:
        t0 = time.perf_counter()
        path = ckpt.save_checkpoint(root, 1, rt, opt, {"step": 1}, keep=1)
        t1 = time.perf_counter()
        ckpt.load_latest(root, rt, opt)
        t2 = time.perf_counter()
    finally:
        ckpt.write_manifest, ckpt.verify_manifest = saved_write, saved_verify
    size = sum(f.stat().st_size for f in path.iterdir())
    shutil.rmtree(root)
    return t1 - t0, t2 - t1, size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # "no checksums.json" is the point of the baseline
    rows = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for checks in (False, True):  # interleaved, so background load hits both alike
                rows[checks].append(one(Path(tmp) / f"c{r}{checks}", checks, args.d_model, args.layers))
        blob = Path(tmp) / "blob"
        blob.write_bytes(torch.randint(0, 255, (256 << 20,), dtype=torch.uint8).numpy().tobytes())
        t0 = time.perf_counter()
        file_sha256(blob)
        sha_mib_s = 256 / (time.perf_counter() - t0)
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in rows.items()}
    size = rows[True][0][2]
    print(f"## Checkpoint safety cost (issue 19)\n\nDate {datetime.date.today()} · machine: {platform.machine()} "
          f"{torch.get_num_threads()} torch thread, CPU shared with other jobs (read the ratios) · torch {torch.__version__}\n")
    print(f"Command: `.venv/bin/python benchmarks/bench_checkpoint_safety.py --d-model {args.d_model} --layers "
          f"{args.layers} --repeats {args.repeats}`; one checkpoint of {size / 2**20:.0f} MiB (weights + AdamW state + "
          f"RNG), median of {args.repeats}.\n")
    print("| | without checksums | with checksums | ratio |\n|---|---|---|---|")
    print(f"| save s | {med[False][0]:.3f} | {med[True][0]:.3f} | {med[True][0] / med[False][0]:.2f}x |")
    print(f"| load (resume) s | {med[False][1]:.3f} | {med[True][1]:.3f} | {med[True][1] / med[False][1]:.2f}x |")
    print(f"\nSHA-256 on one core: {sha_mib_s:.0f} MiB/s (files hash on up to 8 threads; on load the ranks split them).")


if __name__ == "__main__":
    main()
