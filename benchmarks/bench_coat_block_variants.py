"""COAT's FP8 choices on one compiled Llama block of the 1.3B, forward + backward, side by side (#18).

Why: the 300-step run (bench_coat_gpu.py) costs 8 minutes of a 15-minute GPU session and answers for one
configuration at a time. On the H200 (2026-11-27) COAT's FP8 GEMMs saved 78 ms of 170 per step while its FP8 casts
cost 85 ms (torchao's 31): which casts to keep, and on which linears FP8 GEMMs pay, is decided per block. Each
variant here is one block of the ~1.3B llama (d_model 2048, ffn 5632, 16 heads) at 4 x 4096 under bf16 autocast
with fp32 weights, compiled as bench_coat_gpu.py compiles the model, timed with CUDA events (median of
``--iters`` after warm-up), with its peak memory above the input's and its device time by kernel kind:

- ``bf16``: the plain block;
- ``coat``: FP8 activations + FP8 GEMMs on every linear, casts as opaque operators (the eager bytes are saved);
- ``coat_fused``: the same with the casts traced inline (inductor fuses them; bf16 is saved);
- ``coat_inductor_casts``: ``coat`` with inductor's compiled quantisers in place of the Triton casts
  (memory/fp8_triton.py): what the Triton kernels are worth;
- ``coat_inline_grads``: ``coat`` with the backward's output-gradient casts traced inline (inductor fuses each
  absmax with the kernel that produced the gradient) instead of the Triton casts;
- ``coat_mlp_gemm``: FP8 GEMMs on the MLP's three linears only, FP8 storage elsewhere (the attention linears are
  a third of the GEMM FLOPs and half of the casts);
- ``coat_act``: FP8 activations only, no FP8 GEMMs;
- ``torchao_float8``: torchao's tensorwise float8 on the block's linears (where torchao imports).

    python benchmarks/bench_coat_block_variants.py [--variants bf16,coat,...] [--iters 20] [--out F.json]
    python benchmarks/bench_coat_block_variants.py --smoke     # CPU, tiny shapes: checks every variant runs

Each variant runs in its own subprocess (a fresh compile cache, allocator and opaque-cast setting).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from meshwright.config.io import write_json_atomic  # noqa: E402
from bench_fp8_linear_gpu import _time  # noqa: E402 - median ms after 3 warm-up calls (CUDA events on a GPU)
from self_launch import run_one_in_subprocess  # noqa: E402

VARIANTS = ("bf16", "coat", "coat_fused", "coat_inductor_casts", "coat_inline_grads", "coat_mlp_gemm", "coat_act",
            "torchao_float8")
ATTENTION_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo")


def _block(variant: str, smoke: bool, device: str) -> tuple[torch.nn.Module, torch.Tensor, Any]:
    from meshwright.config import ModelConfig
    from meshwright.memory import fp8_ops, fp8_triton
    from meshwright.memory.fp8_activations import apply_fp8_activations
    from meshwright.models.decoder import Block
    from meshwright.models.layers import rope_tables

    batch, seq, d, f, heads = (2, 32, 64, 96, 4) if smoke else (4, 4096, 2048, 5632, 16)
    cfg = ModelConfig(name="llama-1.3b-block", arch="llama", vocab_size=32000, d_model=d, n_layers=1, n_heads=heads,
                      n_kv_heads=heads, ffn_hidden=f, max_seq_len=seq, tie_embeddings=False)
    torch.manual_seed(0)
    block = Block(cfg, 0).to(device)
    if variant.startswith("coat"):
        fp8_ops.set_opaque(variant != "coat_fused", grads=False if variant == "coat_inline_grads" else None)
        fp8_triton.set_enabled(variant != "coat_inductor_casts")
        holder = torch.nn.Module()
        holder.layers = torch.nn.ModuleDict({"0": block})
        apply_fp8_activations(holder, gemm_layers=() if variant == "coat_act" else None)
        if variant == "coat_mlp_gemm":  # attention linears back to FP8 storage only (wo to a plain linear, as then)
            for name, mod in block.named_modules():
                if name.endswith(ATTENTION_LINEARS):
                    if name.endswith("attention.wo"):
                        mod.__class__ = torch.nn.Linear
                    else:
                        mod._fp8_gemm = None
    elif variant == "torchao_float8":
        from torchao.float8 import convert_to_float8_training  # lazy: optional, absent from most images

        convert_to_float8_training(block)
    rope = rope_tables(cfg.head_dim, seq, cfg.rope_theta, device=torch.device(device))
    h = torch.randn(batch, seq, d, device=device, requires_grad=True)
    return block, h, rope


def run_one(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    try:
        block, h, rope = _block(variant, args.smoke, device)
    except ImportError as exc:
        return {"variant": variant, "skipped": f"{type(exc).__name__}: {exc}"}
    fwd = torch.compile(block)
    grad_out = torch.randn_like(h)

    def step() -> None:
        with torch.autocast(device, torch.bfloat16):
            y = fwd(h, rope)
        y.backward(grad_out)
        block.zero_grad(set_to_none=True)
        h.grad = None

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    iters = 2 if args.smoke else args.iters
    t0 = time.perf_counter()
    step()  # compile
    sync()
    compile_s = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    out: dict[str, Any] = {"variant": variant, "ms": _time(step, iters, device), "iters": iters,
                           "warmup_s": round(compile_s, 1)}
    if device == "cuda":
        out["peak_above_input_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    if args.trace:
        from gpu_check import _trace

        kernels = _trace(step, 2).get("trace_kernels", {})
        out["by_category_ms"] = {k: round(v * 1e3, 2) for k, v in kernels.get("by_category_s", {}).items()}
        out["gemm_fp8_ms"] = round(kernels.get("gemm_fp8_s", 0.0) * 1e3, 2)
        out["top_kernels"] = [f"{k['ms_per_step']} ms x{k['calls_per_step']:g} {k['name'][:90]}"
                              for k in kernels.get("top_kernels", [])[:10]]
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated from {', '.join(VARIANTS)}")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-trace", dest="trace", action="store_false", help="skip the kernel breakdown")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, 2 iterations")
    p.add_argument("--timeout", type=float, default=150, help="seconds per variant")
    p.add_argument("--out", default=None, help="also write the JSON here after every variant")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.names = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.names if v not in VARIANTS]
    if bad or not args.names:
        p.error(f"--variants={args.variants!r} is invalid; valid: a comma-separated list of {', '.join(VARIANTS)}")
    if args.iters < 1:
        p.error(f"--iters={args.iters} is invalid; valid: a positive integer")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args)), flush=True)
        return {}
    results: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke
                           else "cpu", "torch": torch.__version__, "results": results}
    for name in args.names:
        results.append(run_one_in_subprocess(__file__, name, argv if argv is not None else sys.argv[1:],
                                             timeout=args.timeout, key="variant"))
        base = next((r for r in results if r["variant"] == "bf16" and "ms" in r), None)
        for r in results:
            if base is not None and "ms" in r:
                r["x_bf16_time"] = round(r["ms"] / base["ms"], 3)
        print(json.dumps({k: v for k, v in results[-1].items() if k != "top_kernels"}), file=sys.stderr, flush=True)
        if args.out:
            write_json_atomic(doc, args.out, indent=1)
    print(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
