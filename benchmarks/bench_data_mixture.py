"""What blending several data sets (``data.mixture``: meshwright/data/blend.py, mixture.py) costs against one data
set: the loader's per-batch time side by side in one process, the blend table's build time at start, and where
in the stream a batch is located (at position 0 and at 10^12: the same, no replay).

    .venv/bin/python benchmarks/bench_data_mixture.py [--tokens 16777216 --seq-len 4096 --batch 8 --batches 300
                                                       --rounds 5]

Three synthetic prepared data sets of ``--tokens`` uint16 tokens each (page cache warm). Plain: ``SequenceLoader``
over the first (``data.path``); one source: ``BlendedLoader`` over the same one (must read the same batches);
three sources: weights 0.5/0.3/0.2. Median over interleaved rounds. Prints a markdown section
(benchmarks/results/data_mixture.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_data_loader import per_batch_s  # the per-batch timer of the plain loader's bench (this directory)
from meshwright.data.blend import BlendSchedule
from meshwright.data.loader import SequenceLoader, TokenDataset
from meshwright.data.mixture import BlendedLoader
from meshwright.data.prepare import DOC_OFFSETS, INDEX_VERSION


def synthetic(root: Path, n: int, seed: int) -> Path:
    """A prepared directory of ``n`` random uint16 tokens (vocab 4096) in 1,000 documents, written directly."""
    root.mkdir()
    np.random.default_rng(seed).integers(0, 4096, n, dtype=np.uint16).tofile(root / "tokens.bin")
    np.linspace(0, n, 1001).astype("<i8").tofile(root / DOC_OFFSETS)
    (root / "index.json").write_text(json.dumps({
        "tokenizer": {"name": "bench", "vocab_size": 4096, "eos_id": 0}, "dtype": "uint16", "num_tokens": n,
        "num_documents": 1000, "sources": [], "version": INDEX_VERSION, "doc_offsets_file": DOC_OFFSETS,
        "max_token_id": 4095}))
    (root / "tokens.bin").read_bytes()  # into the page cache
    return root


def per_batch_us(loader: SequenceLoader, batches: int) -> float:
    return per_batch_s(loader, batches) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1 << 24)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    common = dict(seq_len=args.seq_len, global_batch=args.batch, micro_batch=args.batch, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        sets = [TokenDataset(synthetic(Path(tmp) / f"d{i}", args.tokens, i)) for i in range(3)]
        splits = [(ds.split("train", 0.05), None) for ds in sets]
        loaders = {
            "plain (data.path)": SequenceLoader(splits[0][0], **common),
            "mixture, 1 source": BlendedLoader(splits[:1], [1.0], ["d0"], **common),
            "mixture, 3 sources 0.5/0.3/0.2": BlendedLoader(splits, [0.5, 0.3, 0.2], ["d0", "d1", "d2"], **common),
        }
        first = [loader.next_batch() for loader in list(loaders.values())[:2]]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(*first)), "one source must read data.path's batches"
        times: dict[str, list[float]] = {k: [] for k in loaders}
        for loader in loaders.values():  # warm-up round, not counted
            per_batch_us(loader, args.batches)
        for _ in range(args.rounds):
            for name, loader in loaders.items():
                times[name].append(per_batch_us(loader, args.batches))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["plain (data.path)"]

    builds = []
    eight = [math.pi, math.e, 1, 2**0.5, 3**0.5, 0.1 * math.pi, 2.2, 5.5]
    for label, weights in [("0.7/0.3 (D=10)", [0.7, 0.3]), ("pi/e/1 (D=100,000)", [math.pi, math.e, 1.0]),
                           ("8 irrational weights (D=100,000)", eight)]:
        t0 = time.perf_counter()
        sched = BlendSchedule(weights)
        build_s = time.perf_counter() - t0
        where: dict[int, list[float]] = {0: [], 10**12: []}
        for _ in range(11):  # interleaved, median
            for start in where:
                pos = start + np.arange(1024)
                t0 = time.perf_counter()
                for _ in range(100):
                    sched.locate(pos)
                where[start].append((time.perf_counter() - t0) / 100 * 1e6)
        builds.append((label, sched.period, build_s, statistics.median(where[0]), statistics.median(where[10**12])))

    print("## Data mixture: blended loader against one data set\n")
    print(f"Date {datetime.date.today()} · machine: {platform.machine()}, {platform.processor() or 'CPU'} (shared with "
          f"other jobs: read the ratios) · numpy {np.__version__}\n")
    print(f"Command: `.venv/bin/python benchmarks/bench_data_mixture.py --tokens {args.tokens} --seq-len {args.seq_len} "
          f"--batch {args.batch} --batches {args.batches} --rounds {args.rounds}`; three {args.tokens * 2 >> 20} MiB "
          f"uint16 data sets (page cache warm), global batch {args.batch} x {args.seq_len} tokens, shuffled windows, "
          f"median over {args.rounds} interleaved rounds of {args.batches} batches. The one-source mixture was checked "
          f"to read the same batch as data.path.\n")
    print("| per batch | µs | ratio to plain |\n|---|---|---|")
    for name, us in med.items():
        print(f"| {name} | {us:.0f} | {us / base:.2f}x |")
    print("\nThe blend table, built once at start (pure Python), and locating one batch of 1,024 positions at the start "
          "of the stream and at position 10^12 (a resume a trillion samples in: no replay):\n")
    print("| weights | period D | build ms | locate µs at 0 | locate µs at 10^12 | ratio |\n|---|---|---|---|---|---|")
    for label, period, build_s, near_us, far_us in builds:
        print(f"| {label} | {period:,} | {build_s * 1e3:.0f} | {near_us:.0f} | {far_us:.0f} | {far_us / near_us:.2f}x |")


if __name__ == "__main__":
    main()
