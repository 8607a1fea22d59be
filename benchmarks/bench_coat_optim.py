"""CoatAdamW's optimizer step alone: reference ops vs the fused (compiled) step vs torch AdamW (#18).

    python benchmarks/bench_coat_optim.py [--model tiny] [--steps 10] [--device cpu|cuda] [--threads 1]

Gradients are fixed random tensors (the step's cost does not depend on their values); each variant
runs ``--warmup`` steps first (the fused step compiles there), then the median of ``--steps`` timed
steps. Prints a JSON document with the times and the ratios to the reference and to torch AdamW.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "benchmarks"))

from bench_coat_gpu import LLAMA_1B3  # noqa: E402
from meshwright.models import build_model, count_parameters  # noqa: E402
from meshwright.optim import CoatAdamW  # noqa: E402

MODELS = {"llama-1.3b": LLAMA_1B3}  # beside the presets: the model of bench_coat_gpu.py


def time_steps(opt: torch.optim.Optimizer, device: str, warmup: int, steps: int) -> tuple[float, float]:
    """(first-step seconds, median seconds of the timed steps)."""
    times = []
    for _ in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[warmup:])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="a model preset or llama-1.3b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: less noise on a shared box)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(MODELS.get(args.model, args.model), seed=0).to(args.device)
    g = torch.Generator(device=args.device).manual_seed(0)
    for prm in model.parameters():
        prm.grad = torch.randn(prm.shape, device=args.device, generator=g) * 1e-3
    variants = {
        "coat_reference": lambda ps: CoatAdamW(ps, lr=1e-4, fused=False),
        "coat_fused": lambda ps: CoatAdamW(ps, lr=1e-4, fused=True),
        "torch_adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "torch_adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
    }
    rows = {}
    for name, make in variants.items():
        first, med = time_steps(make(model.parameters()), args.device, args.warmup, args.steps)
        rows[name] = {"first_step_s": round(first, 4), "step_s": round(med, 5)}
    ref, fused, adamw = (rows[k]["step_s"] for k in ("coat_reference", "coat_fused", "torch_adamw_fused"))
    doc = {"model": args.model, "params": count_parameters(model), "device": args.device,
           "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "torch": torch.__version__,
           "variants": rows, "fused_speedup_over_reference": round(ref / fused, 2),
           "fused_x_of_torch_fused_adamw": round(fused / adamw, 2),
           "reference_x_of_torch_fused_adamw": round(ref / adamw, 2)}
    print(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
