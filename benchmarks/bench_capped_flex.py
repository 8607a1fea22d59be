"""Memory of Gemma 2's capped attention: the materialised path vs compiled FlexAttention, on CPU at long sequences.

Two deterministic measures per (path, sequence), on ``AttentionCore`` with caps, GQA and optionally a window:

* saved for backward (``count_saved_bytes``, training). Materialised: eager, a real backward. Flex: traced with
  ``aot_eager_decomp_partition`` (AOTAutograd's min-cut partitioner, the one inductor uses, without the C++ build),
  so the bytes are what a compiled graph with the flex HOP keeps; torch's CPU flex refuses gradients, so its
  device check is lifted and the HOP runs its eager reference (the GPU kernel saves the same q, k, v, out, lse).
* forward peak (no gradients): the resident-set high-water mark of one call over the resident set before it
  (``forward_peak_bytes``), after a warm-up call (so compilation is not measured). Flex here is
  inductor's fused CPU kernel; materialised is eager (compiled without gradients, the rule picks flex).

  python benchmarks/bench_capped_flex.py --seqs 2048 4096 --out benchmarks/results/capped_flex.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import torch
import torch.nn.attention.flex_attention as fa

import meshwright.models.layers as layers
from meshwright.memory.accounting import count_saved_bytes

MIB = 2 ** 20


def _core(window: int | None, heads: int, kv_heads: int, head_dim: int) -> layers.AttentionCore:
    return layers.AttentionCore(head_dim, heads // kv_heads, False, 0.0, window, head_dim ** -0.5, 50.0)


def _inputs(seq: int, heads: int, kv_heads: int, head_dim: int, grad: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, seq, n * head_dim, generator=g).requires_grad_(grad)
                 for n in (heads, kv_heads, kv_heads))


def saved_bytes(fn, inputs: tuple[torch.Tensor, ...]) -> int:
    fn(*inputs)  # warm-up (builds a compiled graph)
    with count_saved_bytes(exclude=list(inputs)) as saved:
        out = fn(*inputs)
    out.sum().backward()
    return saved.total


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def forward_peak_bytes(fn, inputs: tuple[torch.Tensor, ...]) -> int:
    """Resident-set growth at the peak of one no-grad call: the kernel's high-water mark (VmHWM), reset just before
    the call (``/proc/self/clear_refs`` 5), less the resident set then. Why not the torch profiler's allocation
    events: they miss what an inductor-compiled graph allocates (a compiled mm + tanh showed 0.004 of its 7.5 MiB).
    glibc must hand every block over 64 KiB back at once (``MALLOC_MMAP_THRESHOLD_``, set by ``main``), else a freed
    block stays resident and the next call's peak reads 0; so set, repeats agree within ~0.1 MiB."""
    with torch.no_grad():
        fn(*inputs)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_bytes("VmRSS:")
        fn(*inputs)
        return _status_bytes("VmHWM:") - base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--windows", type=int, nargs="+", default=[0, 1024], help="0: global (causal only)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # see forward_peak_bytes: again, with glibc set so
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    torch.manual_seed(0)
    rows = []
    for window in args.windows:
        core = _core(window or None, args.heads, args.kv_heads, args.head_dim)
        for seq in args.seqs:
            torch._dynamo.reset()
            t0 = time.time()
            row: dict = {"seq": seq, "window": window or None}
            # saved for backward: materialised eager vs the flex HOP through the inductor partitioner
            row["saved_materialised"] = saved_bytes(core, _inputs(seq, args.heads, args.kv_heads, args.head_dim, True))
            check, fa._validate_device = fa._validate_device, (lambda *a: None)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    traced = torch.compile(core, backend="aot_eager_decomp_partition", dynamic=False)
                    # the partitioned graph must hold flex: force the rule's "CUDA" answer for this trace only
                    rule = layers.flex_capped
                    layers.flex_capped = lambda compiled, device, grad, drop: compiled and drop == 0
                    try:
                        row["saved_flex"] = saved_bytes(traced, _inputs(seq, args.heads, args.kv_heads,
                                                                        args.head_dim, True))
                    finally:
                        layers.flex_capped = rule
            finally:
                fa._validate_device = check
            torch._dynamo.reset()
            # forward peak: eager materialised (optionally compiled) vs inductor's fused CPU flex kernel
            inp = _inputs(seq, args.heads, args.kv_heads, args.head_dim, False)
            row["peak_materialised"] = forward_peak_bytes(core, inp)
            torch._dynamo.reset()
            row["peak_flex"] = forward_peak_bytes(torch.compile(core, dynamic=False), inp)
            torch._dynamo.reset()
            scores = args.heads * seq * seq * 4  # one fp32 seq x seq tensor per head
            row["one_score_tensor"] = scores
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
            print(json.dumps({k: (round(v / MIB, 2) if isinstance(v, int) and k not in ("seq", "window") else v)
                              for k, v in row.items()}), flush=True)
    env = {"torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
           "threads": torch.get_num_threads(), "heads": args.heads, "kv_heads": args.kv_heads,
           "head_dim": args.head_dim, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
