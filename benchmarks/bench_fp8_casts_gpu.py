"""COAT's FP8 casts on the GPU: the Triton kernels (memory/fp8_triton.py) against inductor's compiled quantisers (#18).

Why: on an H200 the 1.3B's COAT step spent 84.6 ms in FP8 casts, against torchao's 30.7 (gpu_h200.md); inductor's
kernels of the quantisers ran at about a fifth of memory bandwidth. This times each cast a COAT block runs, on the
1.3B's shapes at 4 x 4096 tokens, every way in one process: inductor; the Triton kernels as shipped, with the integer
encoder, and with the GPU's FP8 conversion unchecked; and the shipped way's verdict on that conversion per kernel
variant. For each: median milliseconds (``triton.testing.do_bench``), the bytes each moves at the minimum (read once
for the cast, once more for a per-tensor absmax; FP8 out, transposed too where asked) and so its effective bandwidth,
the speed-up, and how many FP8 codes and scales differ from the reference (``fp8_quant`` on CPU: 0 and 0 is bit for
bit). Prints one JSON document.

    python benchmarks/bench_fp8_casts_gpu.py [--tokens 16384] [--out F.json]
    python benchmarks/bench_fp8_casts_gpu.py --smoke    # CPU: the compiled side only, tiny shapes (plumbing)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from meshwright.config.io import write_json_atomic  # noqa: E402
from meshwright.memory import fp8_cast, fp8_triton  # noqa: E402
from meshwright.optim import fp8_quant  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def cases(tokens: int, d: int = 2048, ffn: int = 5632) -> list[tuple[str, tuple[int, int], torch.dtype, str, Any]]:
    """(name, shape, input dtype, kind, FP8 format or group) of the casts one block runs per step."""
    return [
        ("norm input, 1x16 groups (fp32 residual)", (tokens, d), torch.float32, "groups", 16),
        ("SwiGLU input, 1x16 groups", (tokens, ffn), torch.bfloat16, "groups", 16),
        ("linear input + transpose, E4M3", (tokens, d), torch.bfloat16, "tensor_t", E4M3),
        ("w2 input + transpose, E4M3", (tokens, ffn), torch.bfloat16, "tensor_t", E4M3),
        ("output gradient + transpose, E5M2", (tokens, d), torch.bfloat16, "tensor_t", E5M2),
        ("w1 weight + transpose, E4M3 (fp32)", (ffn, d), torch.float32, "tensor_t", E4M3),
    ]


def _min_bytes(shape: tuple[int, int], dtype: torch.dtype, kind: str) -> int:
    n = shape[0] * shape[1]
    size = torch.tensor([], dtype=dtype).element_size()
    if kind == "groups":
        return n * size + n + n // 16 * 4
    return 2 * n * size + 2 * n  # absmax read, cast read, FP8 copy and its transpose written


def _median_ms(fn: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t0) / 3 * 1e3


def _nan_codes(codes: torch.Tensor, dtype: torch.dtype) -> int:
    """How many of ``codes`` (FP8 bytes) are NaN in ``dtype``."""
    return int(fp8_triton.nan_codes(codes, dtype).sum())


def _differences(out: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...], x: torch.Tensor) -> dict[str, Any]:
    """FP8 codes and scales that differ from the reference's, in all and per output (``q``, the transposed ``qt``
    where there is one), with NaN codes the reference has not and the first differing code: 0 and 0 is bit for bit.
    Per output, because on an H200 the GPU's FP8 conversion gave NaN only through a backward GEMM (2026-11-28):
    which copy held them is the question."""
    codes = [(a.view(torch.uint8), b.view(torch.uint8), a.dtype) for a, b in zip(out, ref) if a.dtype in (E4M3, E5M2)]
    scales = [(a, b) for a, b in zip(out, ref) if a.dtype == torch.float32]
    names = ("q", "qt")[:len(codes)]
    diff: dict[str, Any] = {"codes": sum(int((a != b).sum()) for a, b, _ in codes),
                            "scales": sum(int((a != b).sum()) for a, b in scales)}
    for name, (a, b, f8) in zip(names, codes):
        diff[name] = {"codes": int((a != b).sum()), "new_nan_codes": _nan_codes(a, f8) - _nan_codes(b, f8)}
        bad = (a != b).nonzero()
        if len(bad) and "first" not in diff:
            i = tuple(bad[0].tolist())
            xi = x.reshape(a.shape)[i] if name == "q" else x.reshape(b.shape[::-1])[i[::-1]]
            diff["first"] = {"in": name, "at": list(i), "x": float(xi), "code": int(a[i]), "reference": int(b[i])}
    return diff


def _with_conversion(fn: Callable[..., Any], mode: str) -> Callable[..., Any]:
    """``fn`` with fp8_triton's conversion set to ``mode`` for its calls ("hardware": the GPU's cvt unchecked,
    "encoder": the integer encoder)."""
    def call(*args: Any) -> Any:
        saved = fp8_triton.set_conversion(mode)
        try:
            return fn(*args)
        finally:
            fp8_triton.set_conversion(saved)
    return call


def run(tokens: int, device: str) -> list[dict[str, Any]]:
    rows = []
    for name, shape, dtype, kind, arg in cases(tokens):
        x = torch.randn(shape, device=device).to(dtype)
        ways = {"compiled": (fp8_cast.compiled_quantize_last_dim_groups if kind == "groups"
                             else fp8_cast.compiled_quantize_per_tensor_t)}
        if device == "cuda":
            triton_cast = (fp8_triton.quantize_last_dim_groups if kind == "groups"
                           else fp8_triton.quantize_per_tensor_t)
            ways["triton"] = triton_cast  # as shipped: the GPU's conversion where its first cast agreed
            ways["triton_encoder"] = _with_conversion(triton_cast, "encoder")
            ways["triton_hw"] = _with_conversion(triton_cast, "hardware")  # unchecked: its own codes
        row: dict[str, Any] = {"cast": name, "shape": list(shape), "dtype": str(dtype).replace("torch.", "")}
        outs = {}
        for way, fn in ways.items():
            outs[way] = fn(x, arg)
            ms = _median_ms(lambda: fn(x, arg), device)
            row[f"{way}_ms"] = round(ms, 4)
            row[f"{way}_gb_s"] = round(_min_bytes(shape, dtype, kind) / ms / 1e6, 1)
        # the reference on CPU, as the kernels' tests take it (fp8_quant divides tensor by tensor for the scales, so
        # its CUDA bits are the same: a Python-number divisor, which torch's CUDA kernel multiplies in as a
        # reciprocal, put half the group scales of stop 39 one ulp off)
        xc = x.cpu()
        ref = (fp8_quant.quantize_last_dim_groups(xc, arg) if kind == "groups"
               else fp8_quant.quantize_per_tensor_t(xc, arg))
        for way, out in outs.items():
            row[f"{way}_vs_reference"] = _differences(tuple(t.cpu() for t in out), ref, xc)
        for way in ("triton", "triton_encoder", "triton_hw"):
            if way in outs:
                row[f"{way}_speedup_x"] = round(row["compiled_ms"] / row[f"{way}_ms"], 2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4 * 4096)
    p.add_argument("--smoke", action="store_true", help="CPU, 64 tokens, the compiled side only")
    p.add_argument("--hardware-conversion", action="store_true",
                   help="ignored: both conversions are always timed and checked (kept for older command lines)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.tokens < 1:
        p.error(f"--tokens={args.tokens} is invalid; valid: a positive number of tokens")
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    tokens = 64 if args.smoke else args.tokens
    doc = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "tokens": tokens, "cases": run(tokens, device),
           "conversion_checked": {str(k): v for k, v in fp8_triton._HW_AGREES.items()}}
    if args.out:
        write_json_atomic(doc, args.out, indent=1)
    print(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
