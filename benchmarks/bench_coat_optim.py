"""CoatAdamW's optimizer step alone: reference ops vs the compiled step vs the Triton step vs torch AdamW (#18).

    python benchmarks/bench_coat_optim.py [--model tiny] [--steps 10] [--device cpu|cuda] [--threads 1]
                                          [--triton-blocks 8] [--variants coat_reference,coat_triton,...]

The Triton variants run on CUDA only (on CPU Triton's interpreter is a test tool, not a speed):
``coat_triton`` (the default fast math), ``coat_triton_precise`` (libdevice powf, IEEE division), and
with ``--triton-blocks 4,8,16`` one more per groups-per-program count (tuning).

Gradients are fixed random tensors (the step's cost does not depend on their values); each variant
runs ``--warmup`` steps first (the fused step compiles there), then the median of ``--steps`` timed
steps. Prints a JSON document with the times and the ratios to the reference and to torch AdamW.
"""

from __future__ import annotations

import argparse
import contextlib
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
from meshwright.errors import invalid  # noqa: E402
from meshwright.optim import CoatAdamW, coat_triton  # noqa: E402

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


@contextlib.contextmanager
def _triton_settings(settings: dict):
    """Run with coat_triton's module settings (BLOCK_GROUPS, MATH) changed, then restore them."""
    saved = {k: getattr(coat_triton, k) for k in settings}
    for k, v in settings.items():
        setattr(coat_triton, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(coat_triton, k, v)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="a model preset or llama-1.3b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: less noise on a shared box)")
    p.add_argument("--triton-blocks", default=str(coat_triton.BLOCK_GROUPS),
                   help="comma-separated groups per Triton program; one variant each (CUDA only)")
    p.add_argument("--variants", default="", help="comma-separated subset of the variants (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(MODELS.get(args.model, args.model), seed=0).to(args.device)
    g = torch.Generator(device=args.device).manual_seed(0)
    for prm in model.parameters():
        prm.grad = torch.randn(prm.shape, device=args.device, generator=g) * 1e-3
    variants = {
        "coat_reference": lambda ps: CoatAdamW(ps, lr=1e-4, fused="reference"),
        "coat_fused": lambda ps: CoatAdamW(ps, lr=1e-4, fused="compile"),
        "torch_adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "torch_adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
    }
    blocks = [int(b) for b in args.triton_blocks.split(",") if b]
    if args.device == "cuda" and coat_triton.triton_available():
        for b in blocks:
            variants["coat_triton" if b == coat_triton.BLOCK_GROUPS else f"coat_triton_bg{b}"] = \
                lambda ps, b=b: ({"BLOCK_GROUPS": b}, CoatAdamW(ps, lr=1e-4, fused="triton"))
        variants["coat_triton_precise"] = lambda ps: ({"MATH": "precise"}, CoatAdamW(ps, lr=1e-4, fused="triton"))
    chosen = args.variants.split(",") if args.variants else list(variants)
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        raise invalid("--variants", args.variants, ", ".join(variants))
    rows = {}
    for name in chosen:
        made = variants[name](model.parameters())
        settings, opt = made if isinstance(made, tuple) else ({}, made)
        with _triton_settings(settings):
            first, med = time_steps(opt, args.device, args.warmup, args.steps)
        rows[name] = {"first_step_s": round(first, 4), "step_s": round(med, 5)}
        del opt, made
        if args.device == "cuda":
            torch.cuda.empty_cache()
    doc = {"model": args.model, "params": count_parameters(model), "device": args.device,
           "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "torch": torch.__version__,
           "variants": rows}
    adamw = rows.get("torch_adamw_fused", {}).get("step_s")
    ref = rows.get("coat_reference", {}).get("step_s")
    for name, row in rows.items():
        if adamw:
            row["x_of_torch_fused_adamw"] = round(row["step_s"] / adamw, 2)
        if ref and name.startswith("coat_"):
            row["speedup_over_coat_reference"] = round(ref / row["step_s"], 2)
    if ref and "coat_fused" in rows and adamw:  # the keys earlier runs reported
        doc["fused_speedup_over_reference"] = round(ref / rows["coat_fused"]["step_s"], 2)
        doc["fused_x_of_torch_fused_adamw"] = round(rows["coat_fused"]["step_s"] / adamw, 2)
        doc["reference_x_of_torch_fused_adamw"] = round(ref / adamw, 2)
    if "coat_triton" in rows and adamw:
        doc["triton_x_of_torch_fused_adamw"] = rows["coat_triton"]["x_of_torch_fused_adamw"]
    print(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
