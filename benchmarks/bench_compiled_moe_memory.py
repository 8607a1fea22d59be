"""What a compiled MoE block saves for backward, per token and per routed token, against the planner's formula.

The block is compiled as meshwright's runtime compiles it (train/compile.py ``compile_layer``): in parts at every ep
(``compile_moe_block``; ep>1 runs here over a one-rank process group: the all-to-alls run, with nothing to exchange);
``--whole`` compiles the ep=1 block whole instead (``compile_block``, the runtime's path before). Saved bytes are counted with ``count_saved_bytes`` plus
what selective checkpointing caches (its MUST_SAVE outputs, which saved-tensor hooks do not see), under autocast, for
two batch sizes x capacity factor None / 0.5 (so routed tokens vary apart from tokens); a least-squares fit gives
bytes = fixed + a * tokens + b * routed. ``cm.compiled_moe_activation_bytes`` (compiled) or the eager
formula (``EAGER_MOE_ACT``) is printed next to it.

    PYTHONPATH=. python benchmarks/bench_compiled_moe_memory.py                                  # CPU, ~1 min
    PYTHONPATH=. python benchmarks/bench_compiled_moe_memory.py --device cuda --backend inductor  # a GPU, ~5 min
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshwright.config import load_model_config  # noqa: E402
from meshwright.launcher.planner import cost_model as cm  # noqa: E402
from meshwright.launcher.profiling.blocks import rope_for, shard_block  # noqa: E402
from meshwright.memory.accounting import count_saved_bytes  # noqa: E402
from meshwright.parallel import recompute as rc  # noqa: E402
from meshwright.parallel.expert_parallel import ExpertParallelExperts  # noqa: E402
from meshwright.parallel.teardown import shutdown  # noqa: E402
from meshwright.train import compile as compile_mod  # noqa: E402

SEQ = 32


def model_cfg(args: argparse.Namespace, capacity: float | None):
    return load_model_config({"name": "bench-moe", "arch": "llama", "vocab_size": 256, "d_model": args.d_model,
                              "n_layers": 1, "n_heads": args.heads, "n_kv_heads": args.kv_heads, "ffn_hidden": 4 * args.d_model,
                              "moe_ffn_hidden": args.expert_ffn, "n_experts": args.experts, "top_k": args.top_k,
                              "capacity_factor": capacity, "max_seq_len": SEQ})


def sac_bytes(contexts: list, skip: set) -> int:
    """Bytes selective checkpointing cached in its storage (outputs of its MUST_SAVE ops)."""
    seen = set()
    for caching, _ in contexts:
        for outs in caching.storage.values():
            for wrapped in (outs.values() if isinstance(outs, dict) else outs):  # dict (torch 2.13) or list
                leaves = torch.utils._pytree.tree_leaves(torch.utils._pytree.tree_map(lambda w: getattr(w, "val", w), wrapped))
                for t in leaves:
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in skip:
                        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
    return sum(n for _, n in seen)


def measure(cfg, recompute: str, ep: int, backend: str | None, device: torch.device, dtype,
            whole: bool = False) -> list[tuple[int, int, int]]:
    """(tokens, routed, saved bytes) for batches of 2 and 4 sequences."""
    contexts: list = []
    make = rc._selective_context
    rc._selective_context = lambda: contexts.append(make()) or contexts[-1]
    try:
        torch._dynamo.reset()
        torch.manual_seed(0)
        block = shard_block(cfg, 0, 1)
        if ep > 1:
            block.feed_forward.experts = ExpertParallelExperts(block.feed_forward.experts, dist.group.WORLD)
        block = rc.apply_recompute(block.to(device), recompute)
        if backend is not None:
            if whole and ep == 1:  # the old ep=1 path, for comparison
                compile_mod.compile_block(block, backend)
            else:
                compile_mod.compile_layer(block, backend)
        rope = rope_for(cfg, SEQ, device)
        skip = {t.untyped_storage().data_ptr() for t in [*block.parameters(), *rope]}
        out = []
        for b in (2, 4):
            contexts.clear()
            x = torch.randn(b, SEQ, cfg.d_model, device=device, requires_grad=True)
            with count_saved_bytes(block, exclude=[*rope]) as sb, torch.autocast(device.type, dtype=dtype):
                y = block(x, rope)
            total = sb.total + sac_bytes(contexts, skip)
            y.float().sum().backward()
            out.append((b * SEQ, int(block.feed_forward.last_stats["tokens_per_expert"].sum()), total))
        return out
    finally:
        rc._selective_context = make


def fit(samples: list[tuple[int, int, int]]) -> tuple[float, float, float]:
    """Least squares bytes = fixed + a * tokens + b * routed."""
    a = torch.tensor([[1.0, t, r] for t, r, _ in samples], dtype=torch.float64)
    y = torch.tensor([[float(s)] for *_, s in samples], dtype=torch.float64)
    c = torch.linalg.lstsq(a, y).solution.flatten().tolist()
    return c[0], c[1], c[2]


def add_moe_block_args(p: argparse.ArgumentParser) -> None:
    """The device, compile backend and MoE block shape flags this script shares with bench_moe_compile_graphs."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="aot_eager_decomp_partition", help="torch.compile backend (inductor on a GPU)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--expert-ffn", type=int, default=80)
    p.add_argument("--experts", type=int, default=6)
    p.add_argument("--top-k", type=int, default=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_moe_block_args(p)
    p.add_argument("--ep", default="1,2", help="comma-separated ep degrees (2: over a one-rank group)")
    p.add_argument("--recompute", default="none,selective,full")
    p.add_argument("--whole", action="store_true", help="compile the ep=1 block whole (the old path) for comparison")
    args = p.parse_args()
    device = torch.device(args.device)
    compile_mod.BACKENDS = (*compile_mod.BACKENDS, args.backend)  # the partitioner inductor uses, without kernels
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg0 = model_cfg(args, None)
    print(f"llama MoE block: h={cfg0.d_model} heads={cfg0.n_heads} kv={cfg0.kv_heads} f_e={cfg0.expert_ffn_dim} "
          f"E={cfg0.n_experts} top_k={cfg0.top_k}; {args.device}, bf16 autocast, backend {args.backend}\n")
    try:
        print("| ep | recompute | run | B/token | B/routed token | fixed B | formula B/token | formula B/routed |")
        print("|---|---|---|---|---|---|---|---|")
        for ep in (int(e) for e in args.ep.split(",")):
            for recompute in args.recompute.split(","):
                for backend in (None, args.backend):
                    samples = [s for cap in (None, 0.5) for s in measure(model_cfg(args, cap), recompute, ep, backend,
                                                                          device, torch.bfloat16, args.whole)]
                    fixed, per_t, per_r = fit(samples)
                    if backend:
                        f_t = cm.compiled_moe_activation_bytes(cfg0, 1.0, 1, recompute, 2, routed=0.0)
                        f_r = cm.compiled_moe_activation_bytes(cfg0, 0.0, 1, recompute, 2, routed=1.0)
                    else:  # the eager figure (activation_bytes of an MoE layer, autocast included)
                        f_t = cm.moe_block_bytes(cfg0, cm.EAGER_MOE_ACT[recompute], 1.0, 1, 2, routed=0.0)
                        f_r = cm.moe_block_bytes(cfg0, cm.EAGER_MOE_ACT[recompute], 0.0, 1, 2, routed=1.0)
                    run = "compiled" if backend else "eager"
                    formula = f"{f_t:.0f} | {f_r:.0f}"
                    print(f"| {ep} | {recompute} | {run} | {per_t:.0f} | {per_r:.0f} | {round(fixed) + 0} | {formula} |", flush=True)
    finally:
        # an ep>1 block's ExpertParallelExperts holds the group, and dynamo's caches hold the compiled blocks: they
        # go first, then the group, through parallel/teardown.py (as bench_moe.py)
        torch._dynamo.reset()
        shutdown()


if __name__ == "__main__":
    main()
