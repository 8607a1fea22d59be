"""What reading batches with ``pread`` (meshwright/data/token_file.py) costs against the memory map it replaced:
the loader's per-batch time on the same data set, the same shuffled windows, side by side in one process.

    .venv/bin/python benchmarks/bench_data_loader.py [--tokens 67108864 --seq-len 4096 --batch 8 --batches 500 --rounds 7
                                                      --docs 4000000]

The memory-map side is ``SequenceLoader`` over ``np.memmap`` arrays (its plain-array path: numpy slices of the
map, as before the change); the pread side is ``TokenDataset``'s files (one ``pread`` per sequence, one ``fstat``
per batch). Both read from the page cache (warmed first). Also what opening the data set costs, before (a
version-1 index.json with the offsets as a JSON list, every token read for the vocabulary check) and now. Prints a markdown section (benchmarks/results/data_loader.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from meshwright.data.fingerprint import data_fingerprint
from meshwright.data.loader import SequenceLoader, TokenDataset
from meshwright.data.prepare import DOC_OFFSETS, INDEX_VERSION


def synthetic(root: Path, n: int, docs: int) -> Path:
    """A prepared directory of ``n`` random uint16 tokens (vocab 4096) in ``docs`` documents with a loss mask,
    written directly; ``index_v1.json`` beside it is the same index in version 1 (offsets as a JSON list)."""
    rng = np.random.default_rng(0)
    rng.integers(0, 4096, n, dtype=np.uint16).tofile(root / "tokens.bin")
    rng.integers(0, 2, n, dtype=np.uint8).tofile(root / "mask.bin")
    offsets = np.linspace(0, n, docs + 1).astype("<i8")
    offsets.tofile(root / DOC_OFFSETS)
    common = {"tokenizer": {"name": "bench", "vocab_size": 4096, "eos_id": 0}, "dtype": "uint16", "num_tokens": n,
              "num_documents": docs, "sources": [], "loss_mask": "mask.bin"}
    (root / "index.json").write_text(json.dumps({**common, "version": INDEX_VERSION, "doc_offsets_file": DOC_OFFSETS,
                                                 "max_token_id": 4095}))
    (root / "index_v1.json").write_text(json.dumps({**common, "version": 1, "doc_offsets": offsets.tolist()}))
    return root


def open_costs(root: Path) -> dict[str, tuple[float, float]]:
    """Seconds and peak Python-heap MiB (tracemalloc, timed without it) to open the data set as before this change
    (version-1 index: offsets parsed from JSON, every token read for the vocabulary check) and now."""
    v1 = root.parent / "v1"
    v1.mkdir(exist_ok=True)
    for name in ("tokens.bin", "mask.bin"):
        if not (v1 / name).exists():
            os.link(root / name, v1 / name)
    (v1 / "index.json").write_bytes((root / "index_v1.json").read_bytes())

    def before() -> None:
        int(TokenDataset(v1).tokens.max())  # a version-1 index; the scan every start used to do

    out = {}
    for name, fn in (("before", before), ("now", lambda: TokenDataset(root))):
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        out[name] = (seconds, peak)
    return out


def per_batch_s(loader: SequenceLoader, batches: int) -> float:
    loader.consumed = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    return (time.perf_counter() - t0) / batches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1 << 26)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--docs", type=int, default=4_000_000, help="documents (offsets) in the data set")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "data").mkdir()
        root = synthetic(Path(tmp) / "data", args.tokens, args.docs)
        mapped = np.memmap(root / "tokens.bin", dtype=np.uint16, mode="r")
        int(mapped.max())  # warms the page cache
        mask_map = np.memmap(root / "mask.bin", dtype=np.uint8, mode="r")
        opening = open_costs(root)
        ds = TokenDataset(root)
        t0 = time.perf_counter()
        data_fingerprint(ds)
        fingerprint_s = time.perf_counter() - t0
        common = dict(seq_len=args.seq_len, global_batch=args.batch, micro_batch=args.batch, seed=0)
        variants = {
            ("tokens", "mmap"): SequenceLoader(mapped, **common),
            ("tokens", "pread"): SequenceLoader(ds.tokens, **common),
            ("tokens + loss mask", "mmap"): SequenceLoader(mapped, loss_mask=mask_map, **common),
            ("tokens + loss mask", "pread"): SequenceLoader(ds.tokens, loss_mask=ds.mask, **common),
        }
        a = variants[("tokens + loss mask", "mmap")].batch_at(0)
        b = variants[("tokens + loss mask", "pread")].batch_at(0)
        assert all((x[0] == y[0]).all() and (x[1] == y[1]).all() for x, y in zip(a, b)), "the two sides differ"
        for loader in variants.values():
            per_batch_s(loader, args.batches)  # warm: every window these batches touch is in the page cache
        times: dict[tuple[str, str], list[float]] = {k: [] for k in variants}
        for _ in range(args.rounds):  # interleaved, so background load hits every side alike
            for key, loader in variants.items():
                times[key].append(per_batch_s(loader, args.batches))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"## Data loader: pread instead of a memory map\n\nDate {datetime.date.today()} · machine: {platform.machine()}, "
          f"{os.cpu_count()}-core CPU shared with other jobs (read the ratios) · numpy {np.__version__}\n")
    print(f"Command: `.venv/bin/python benchmarks/bench_data_loader.py --tokens {args.tokens} --seq-len {args.seq_len} "
          f"--batch {args.batch} --batches {args.batches} --rounds {args.rounds} --docs {args.docs}`; a {args.tokens * 2 / 2**20:.0f} MiB "
          f"uint16 tokens.bin (page cache warm), global batch {args.batch} x {args.seq_len} tokens, shuffled windows, "
          f"median over {args.rounds} interleaved rounds of {args.batches} batches. Memory map: `SequenceLoader` over "
          f"`np.memmap` (numpy slices of the map, as before); pread: `TokenDataset`'s held-open files (one `pread` per "
          f"sequence, one `fstat` per batch), which turn a file cut under the run into one line instead of SIGBUS.\n")
    print("| per batch | memory map µs | pread µs | ratio |\n|---|---|---|---|")
    for what in ("tokens", "tokens + loss mask"):
        m, p = med[(what, "mmap")], med[(what, "pread")]
        print(f"| {what} | {m * 1e6:.0f} | {p * 1e6:.0f} | {p / m:.2f}x |")
    (b_s, b_mib), (n_s, n_mib) = opening["before"], opening["now"]
    print(f"\nOpening the data set ({args.docs:,} documents, page cache warm), as every rank does at start: before, "
          f"the offsets were a JSON list in index.json (version 1) and every token was read for the vocabulary check (measured with today's reader of a version-1 index); "
          f"now they are `doc_offsets.bin` and the check uses index.json's `max_token_id` plus each batch read.\n")
    print("| opening | before | now | ratio |\n|---|---|---|---|")
    print(f"| seconds | {b_s:.3f} | {n_s:.3f} | {n_s / b_s:.3f}x |")
    print(f"| peak Python heap MiB | {b_mib:.0f} | {n_mib:.0f} | {n_mib / b_mib:.3f}x |")
    print(f"\nThe fingerprint saved in each checkpoint (about 1 MiB read and hashed): {fingerprint_s * 1e3:.1f} ms once "
          f"per run.")


if __name__ == "__main__":
    main()
