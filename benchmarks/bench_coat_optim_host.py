"""CoatAdamW's host time per step on the Triton path: the Python work before the kernel launches (#18).

Why: on an H200 (2026-11-27, benchmarks/results/gpu_h200.md) CoatAdamW's step took 18.1 ms against fused AdamW's
12.1 ms, synced around ``opt.step()``, while its Triton kernel ran 10.0 ms against AdamW's 10.5 ms: the difference
is host work (per-parameter checks, address tables) during which the GPU waits for the launch. This measures that
work on any machine: the parameter list of the ~1.3B llama (201 tensors; small sizes, since the host work does not
depend on them) on CPU tensors, ``fused="triton"``, with the kernel launch itself replaced by a no-op.

    .venv/bin/python benchmarks/bench_coat_optim_host.py [--steps 200] [--params 201]

Prints one JSON line: host milliseconds per step (median and minimum) and microseconds per parameter (minimum).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshwright.optim import CoatAdamW  # noqa: E402
from meshwright.optim import coat_triton  # noqa: E402


class _NoLaunch:
    """Stands in for the kernel module: ``kernel[grid](...)`` does nothing (the host work before it is timed)."""

    class _Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    coat_adamw_kernel = _Kernel()


def measure(n_params: int, steps: int, numel: int = 4096) -> dict[str, float]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel)) for _ in range(n_params)]
    opt = CoatAdamW(params, lr=1e-3, fused="triton")
    real = coat_triton.kernels
    coat_triton.kernels = lambda interpret: _NoLaunch  # type: ignore[assignment]
    try:
        times = []
        for _ in range(steps):
            for p in params:
                p.grad = torch.ones_like(p)  # a fresh gradient tensor every step, as zero_grad(set_to_none=True) gives
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
    finally:
        coat_triton.kernels = real  # type: ignore[assignment]
    steady = times[steps // 10:]
    med, low = statistics.median(steady), min(steady)  # the minimum: other work on the machine only adds time
    return {"params": n_params, "steps": steps, "host_ms_per_step_median": round(med * 1e3, 3),
            "host_ms_per_step_min": round(low * 1e3, 3), "host_us_per_param_min": round(low * 1e6 / n_params, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--params", type=int, default=201, help="parameter tensors (the 1.3B llama has 201)")
    args = p.parse_args()
    print(json.dumps({"torch": torch.__version__, **measure(args.params, args.steps)}))


if __name__ == "__main__":
    main()
