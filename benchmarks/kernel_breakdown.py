"""Where a training step's device time goes, by kind of kernel, from a ``torch.profiler`` trace.

Why: a throughput miss on a GPU (COAT at 0.62x bf16 on the H200) can only be acted on with a breakdown, and
GPU time is scarce, so the benchmark that measures the miss records the breakdown in the same run: GEMMs
(with the FP8 share taken from the ``aten::_scaled_mm`` ops that launched them), attention, fused Triton
kernels that cast to FP8, other Triton kernels, ATen element-wise and reduction kernels, the optimizer,
copies; and the costliest kernels by name. On CPU (no device events) the same rules sort the operators'
own host time, so the plumbing is tested without a GPU.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

# first match wins: attention before GEMM (FlashAttention's kernels are CUTLASS templates), the optimizer
# before ATen (fused AdamW is a multi_tensor_apply ATen kernel)
RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("attention", re.compile(r"flash|fmha|sdpa|attention|attn", re.I)),
    ("optimizer", re.compile(r"adam|coat_adamw|multi_tensor_apply", re.I)),
    ("gemm", re.compile(r"gemm|gemv|nvjet|xmma|cutlass|cublas|wgmma|aten::(?:_scaled_mm|mm|addmm|bmm|baddbmm)$",
                        re.I)),
    ("copy", re.compile(r"memcpy|memset|aten::copy_$|aten::_to_copy$", re.I)),
    # inductor names a fused kernel after the ops it holds: an FP8 cast is an amax and/or a clamp before the cast
    ("triton_fp8_cast", re.compile(r"^triton_.*(amax|clamp)")),
    ("triton_other", re.compile(r"^triton_")),
    ("aten_pointwise", re.compile(r"elementwise|vectorized|reduce_kernel|at::native|aten::", re.I)),
)
CATEGORIES = tuple(name for name, _ in RULES) + ("other",)


def category(kernel: str) -> str:
    """The kind of a kernel (or, on CPU, of an operator) from its name."""
    return next((name for name, pattern in RULES if pattern.search(kernel)), "other")


def summarise(items: Iterable[tuple[str, float, int]], steps: int, fp8_gemm_us: float = 0.0,
              top: int = 15) -> dict[str, Any]:
    """Per-step device seconds by category, the FP8 share of the GEMMs, and the ``top`` kernels.

    ``items`` are (kernel name, total microseconds, calls) over ``steps`` steps; ``fp8_gemm_us`` the device
    time of ``aten::_scaled_mm`` over the same steps (its kernels' names do not say FP8 reliably)."""
    by_cat = dict.fromkeys(CATEGORIES, 0.0)
    rows = []
    for name, us, calls in items:
        by_cat[category(name)] += us
        rows.append((us, calls, name))
    rows.sort(reverse=True)
    total = sum(by_cat.values())
    per_step = {k: round(v / steps / 1e6, 5) for k, v in by_cat.items() if v}
    out: dict[str, Any] = {"busy_s": round(total / steps / 1e6, 5), "by_category_s": per_step,
                           "share": {k: round(v / total, 3) for k, v in by_cat.items() if v} if total else {}}
    if by_cat["gemm"]:
        fp8 = min(fp8_gemm_us, by_cat["gemm"])
        out["gemm_fp8_s"] = round(fp8 / steps / 1e6, 5)
        out["gemm_not_fp8_s"] = round((by_cat["gemm"] - fp8) / steps / 1e6, 5)
    out["top_kernels"] = [{"name": name[:110], "ms_per_step": round(us / steps / 1e3, 3), "calls_per_step": calls / steps,
                           "category": category(name)} for us, calls, name in rows[:top]]
    return out


def breakdown(prof: Any, steps: int, top: int = 15) -> dict[str, Any]:
    """:func:`summarise` of a finished ``torch.profiler.profile``: device kernels where there are any, else the
    CPU operators' own time."""
    events = prof.key_averages()
    device = [(e.key, float(e.self_device_time_total), int(e.count)) for e in events
              if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    if device:
        fp8_us = sum(float(e.device_time_total) for e in events
                     if e.device_type.name == "CPU" and e.key == "aten::_scaled_mm")
        return {"source": "cuda kernels", **summarise(device, steps, fp8_us, top)}
    host = [(e.key, float(e.self_cpu_time_total), int(e.count)) for e in events
            if e.device_type.name == "CPU" and e.self_cpu_time_total > 0 and e.key.startswith("aten::")]
    fp8_us = sum(us for name, us, _ in host if name == "aten::_scaled_mm")
    return {"source": "cpu operators (no device events)", **summarise(host, steps, fp8_us, top)}
