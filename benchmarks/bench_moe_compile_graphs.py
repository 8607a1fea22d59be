"""Graphs, graph breaks and step times of one MoE block at ep=1 compiled whole vs in parts (``compile_moe_block``).

Why: compiled whole, dynamo cuts the block at the routing's data-dependent ops, and under recomputation it compiles
nothing; the runtimes now compile MoE blocks in parts (train/compile.py). This prints, per recompute mode and way of
compiling, the unique graphs and graph breaks dynamo counted and the seconds of each of ``--steps`` forward+backward
steps (the first ones compile). Times on a CPU are no GPU figure; on a GPU run it with ``--device cuda --backend
inductor``.

    PYTHONPATH=. python benchmarks/bench_moe_compile_graphs.py                                  # CPU, ~1 min
    PYTHONPATH=. python benchmarks/bench_moe_compile_graphs.py --device cuda --backend inductor --d-model 1024 \\
        --expert-ffn 2048 --experts 8 --batch 8 --seq 1024                                    # a GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshwright.config import load_model_config  # noqa: E402
from meshwright.launcher.profiling.blocks import rope_for, shard_block  # noqa: E402
from meshwright.parallel.recompute import apply_recompute  # noqa: E402
from meshwright.train import compile as compile_mod  # noqa: E402

from bench_compiled_moe_memory import add_moe_block_args  # noqa: E402  (this folder: the shared shape flags)


def run(args: argparse.Namespace, recompute: str, whole: bool) -> tuple[int, int, list[float]]:
    """(unique graphs, graph breaks, seconds per step) of one block compiled ``whole`` or in parts."""
    device = torch.device(args.device)
    cfg = load_model_config({"name": "bench-moe", "arch": "llama", "vocab_size": 256, "d_model": args.d_model,
                             "n_layers": 1, "n_heads": args.heads, "n_kv_heads": args.kv_heads,
                             "ffn_hidden": 4 * args.d_model, "moe_ffn_hidden": args.expert_ffn,
                             "n_experts": args.experts, "top_k": args.top_k, "max_seq_len": args.seq})
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    block = apply_recompute(shard_block(cfg, 0, 1).to(device), recompute)
    (compile_mod.compile_block if whole else compile_mod.compile_moe_block)(block, args.backend)
    rope = rope_for(cfg, args.seq, device)
    times = []
    for _ in range(args.steps):
        x = torch.randn(args.batch, args.seq, cfg.d_model, device=device, requires_grad=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = block(x, rope)
        y.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return counters["stats"].get("unique_graphs", 0), sum(counters["graph_break"].values()), times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_moe_block_args(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--recompute", default="none,selective,full")
    args = p.parse_args()
    compile_mod.BACKENDS = (*compile_mod.BACKENDS, args.backend)
    print(f"MoE block h={args.d_model} f_e={args.expert_ffn} E={args.experts} top_k={args.top_k}, batch {args.batch}x"
          f"{args.seq}, {args.device}, {args.backend}, bf16 autocast\n")
    print("| recompute | compiled | graphs | graph breaks | first 2 steps (s) | median of the rest (s) |")
    print("|---|---|---|---|---|---|")
    for recompute in args.recompute.split(","):
        for whole in (True, False):
            graphs, breaks, t = run(args, recompute, whole)
            rest = sorted(t[2:])
            med = rest[len(rest) // 2] if rest else float("nan")
            print(f"| {recompute} | {'whole' if whole else 'in parts'} | {graphs} | {breaks} | "
                  f"{t[0]:.2f} + {t[1]:.2f} | {med:.4f} |", flush=True)


if __name__ == "__main__":
    main()
