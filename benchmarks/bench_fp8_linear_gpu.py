"""One FP8 linear and one Llama block of the 1.3B, forward + backward, FP8 (COAT) vs bf16 autocast (#18).

Times x [4*4096, 2048] (fp32, as the norm output is) -> w1 [5632, 2048] and one whole block with CUDA
events (median of ``--iters``), prints the top CUDA kernels of the FP8 block (torch.profiler), the graphs
each compiled unit built and whether any fell back to eager. One JSON document on stdout.

    python benchmarks/bench_fp8_linear_gpu.py [--iters 20] [--smoke]   # --smoke: CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshwright.config import ModelConfig  # noqa: E402
from meshwright.memory import fp8_cast, fp8_fused, fp8_triton  # noqa: E402
from meshwright.memory.fp8_activations import FP8Linear, _QuantCache, apply_fp8_activations  # noqa: E402
from meshwright.memory.fp8_gemm import gemm_backend  # noqa: E402
from meshwright.models.decoder import Block  # noqa: E402
from meshwright.models.layers import rope_tables  # noqa: E402

UNITS = (fp8_cast.quantize_per_tensor, fp8_cast.quantize_per_tensor_t, fp8_cast.dequantize_per_tensor,
         fp8_cast.quantize_last_dim_groups, fp8_cast.dequantize_last_dim_groups, fp8_fused.fused_rmsnorm_forward,
         fp8_fused.fused_rmsnorm_backward, fp8_fused.fused_swiglu_forward, fp8_fused.fused_swiglu_backward)


def compiled_status() -> dict[str, Any]:
    """Graphs each compiled FP8 unit built (dynamo runs a unit eagerly beyond 8) and those that failed."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    return {"compiled_graphs": {u.fn.__name__: len(_debug_get_cache_entry_list(u.fn.__code__)) for u in UNITS},
            "compiled_broken": [u.fn.__name__ for u in UNITS if u.broken],
            "triton_casts_on": fp8_triton.ENABLED,
            "triton_casts_failed": [u.fn.__name__ for u in UNITS if getattr(u, "kernel_failed", False)]}


def _time(step: Callable[[], None], iters: int, device: str) -> float:
    """Median milliseconds of ``step`` (3 warm-up calls first: compilation, autotuning)."""
    for _ in range(3):
        step()
    out = []
    for _ in range(iters):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            step()
            out.append(1e3 * (time.perf_counter() - t))
    return round(statistics.median(out), 3)


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: str) -> Callable[[], None]:
    def step() -> None:
        with torch.autocast(device, torch.bfloat16):
            y = fn(x)
        y.backward(torch.ones_like(y))
    return step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    tokens, seq, d, f = (64, 32, 64, 96) if args.smoke else (16384, 4096, 2048, 5632)
    iters = 2 if args.smoke else args.iters
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                           "torch": torch.__version__, "gemm_backend": gemm_backend(device), "tokens": tokens}
    x = torch.randn(tokens, d, device=device, requires_grad=True)
    lin = torch.nn.Linear(d, f, bias=False, device=device)
    out["linear_bf16_ms"] = _time(_fwd_bwd(lin, x, device), iters, device)
    lin.__class__ = FP8Linear
    lin._fp8_cache, lin._fp8_dtype, lin._fp8_gemm = _QuantCache(), torch.float8_e4m3fn, "auto"
    out["linear_fp8_ms"] = _time(_fwd_bwd(lin, x, device), iters, device)
    out["linear_fp8_over_bf16"] = round(out["linear_fp8_ms"] / out["linear_bf16_ms"], 3)

    cfg = ModelConfig(name="llama-1.3b", arch="llama", vocab_size=32000, d_model=d, n_layers=22, n_heads=16 if d > 64 else 4,
                      n_kv_heads=16 if d > 64 else 4, ffn_hidden=f, max_seq_len=seq, tie_embeddings=False)
    block = Block(cfg, 0).to(device)
    rope = rope_tables(cfg.head_dim, seq, cfg.rope_theta, device=torch.device(device))
    h = torch.randn(tokens // seq, seq, d, device=device, requires_grad=True)
    run = _fwd_bwd(lambda t: block(t, rope), h, device)
    out["block_bf16_ms"] = _time(run, iters, device)
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleDict({"0": block})
    apply_fp8_activations(holder, gemm_layers=None)
    out["block_fp8_ms"] = _time(run, iters, device)
    out["block_fp8_over_bf16"] = round(out["block_fp8_ms"] / out["block_bf16_ms"], 3)

    out.update(compiled_status())
    try:  # the kernels of one FP8 block step, longest first
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            run()
            if device == "cuda":
                torch.cuda.synchronize()
        key = "device_time_total" if device == "cuda" else "cpu_time_total"
        events = [e for e in prof.key_averages()
                  if getattr(e, key, 0) > 0 and (device != "cuda" or e.device_type.name == "CUDA")]
        events.sort(key=lambda e: -getattr(e, key))
        out["fp8_block_top_kernels_ms"] = [f"{round(getattr(e, key) / 1e3, 3)} ms x{e.count} {e.key[:100]}"
                                           for e in events[:18]]
    except Exception as exc:  # noqa: BLE001 - the timings above stand without the profile
        out["profile_error"] = f"{type(exc).__name__}: {exc}"[:300]
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
