"""Kernels and bytes of one FP8 linear and one Llama block, forward + backward, at the 1.3B's shapes (#18).

Counts what eager mode launches on the GPU path (``torch._scaled_mm`` GEMMs, compiled quantisers as
fused kernels) with :class:`meshwright.memory.op_bytes.OpBytesMode` under ``FakeTensorMode``: nothing is
computed, so it runs on a CPU in seconds. Compares with the plain bf16-autocast linear / block.

    python benchmarks/bench_fp8_passes.py [--tokens 16384] [--table linear|block|none] [--eager-quantisers]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshwright.memory.fp8_activations import FP8Linear, _QuantCache, apply_fp8_activations  # noqa: E402
from meshwright.memory.op_bytes import OpBytesMode, OpLog  # noqa: E402
from meshwright.models.decoder import Block  # noqa: E402
from meshwright.models.layers import rope_tables  # noqa: E402
from meshwright.config import ModelConfig  # noqa: E402

LLAMA_1B3 = dict(name="llama-1.3b", arch="llama", vocab_size=32000, d_model=2048, n_layers=22, n_heads=16,
                 n_kv_heads=16, ffn_hidden=5632, max_seq_len=4096, tie_embeddings=False)


def _fwd_bwd(make: Callable[[], tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]], fused: bool = True) -> OpLog:
    """Build (module call, input) in fake mode, run forward under bf16 autocast and backward, count ops."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        fn, x = make()
        mode = OpBytesMode(fused)
        with mode:
            with mode.phase("fwd"), torch.autocast("cpu", torch.bfloat16):
                y = fn(x)
            with mode.paused():
                grad = torch.ones_like(y)  # the incoming gradient is not part of the layer's cost
            with mode.phase("bwd"):
                y.backward(grad)
    return mode.log


def linear_log(tokens: int, d_in: int, d_out: int, fp8: bool, fused: bool = True) -> OpLog:
    """One linear (fp32 master weight, fp32 input as the norm output is) under bf16 autocast."""
    def make():
        lin = torch.nn.Linear(d_in, d_out, bias=False)
        if fp8:
            lin.__class__ = FP8Linear
            lin._fp8_cache, lin._fp8_dtype, lin._fp8_gemm = _QuantCache(), torch.float8_e4m3fn, "scaled_mm"
        return lin, torch.randn(tokens, d_in, requires_grad=True)
    return _fwd_bwd(make, fused)


def block_log(tokens: int, fp8: bool, seq: int = 4096, fused: bool = True) -> OpLog:
    """One Llama block of the 1.3B (fp32 residual stream, fp32 parameters) under bf16 autocast."""
    cfg = ModelConfig(**{k: v for k, v in LLAMA_1B3.items() if k != "name"})

    def make():
        block = Block(cfg, 0)
        if fp8:
            holder = torch.nn.Module()
            holder.layers = torch.nn.ModuleDict({"0": block})
            apply_fp8_activations(holder, gemm_layers=None, backend="scaled_mm")
        rope = rope_tables(cfg.head_dim, seq, cfg.rope_theta)
        return (lambda h: block(h, rope)), torch.randn(tokens // seq, seq, cfg.d_model, requires_grad=True)
    return _fwd_bwd(make, fused)


def summary(log: OpLog) -> dict[str, Any]:
    return {"kernels_fwd": log.count("fwd"), "kernels_bwd": log.count("bwd"),
            "gb_fwd": round(log.total("fwd") / 1e9, 3), "gb_bwd": round(log.total("bwd") / 1e9, 3),
            "transposes": sum(r.transpose for r in log.records)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--table", choices=("linear", "block", "none"), default="none")
    p.add_argument("--by-op", action="store_true", help="per block: kernels and GB grouped by op name")
    p.add_argument("--eager-quantisers", action="store_true",
                   help="count the eager ops of the quantisers (what runs when torch.compile is not used)")
    args = p.parse_args(argv)
    fused = not args.eager_quantisers
    logs = {"linear_bf16": linear_log(args.tokens, 2048, 5632, False),
            "linear_fp8": linear_log(args.tokens, 2048, 5632, True, fused),
            "block_bf16": block_log(args.tokens, False), "block_fp8": block_log(args.tokens, True, fused=fused)}
    out = {k: summary(v) for k, v in logs.items()}
    if args.table != "none":
        for k in (f"{args.table}_bf16", f"{args.table}_fp8"):
            print(f"\n### {k}\n\n{logs[k].table()}\n")
    if args.by_op:
        print("\n| op | bf16 block: kernels, GB | FP8 block: kernels, GB |\n|---|---|---|")
        groups: dict[str, dict[str, list[float]]] = {}
        for k in ("block_bf16", "block_fp8"):
            for r in logs[k].records:
                key = r.name + (" (transpose)" if r.transpose else "")
                groups.setdefault(key, {}).setdefault(k, [0, 0.0])
                groups[key][k][0] += 1
                groups[key][k][1] += r.bytes / 1e9
        for key, g in sorted(groups.items(), key=lambda kv: -max(v[1] for v in kv[1].values())):
            cell = lambda k: f"{g[k][0]}, {g[k][1]:.2f}" if k in g else "-"  # noqa: E731
            print(f"| {key} | {cell('block_bf16')} | {cell('block_fp8')} |")
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
