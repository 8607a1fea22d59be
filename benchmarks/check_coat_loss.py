"""COAT's loss against AdamW's at the H200 run's optimizer settings, on CPU or a GPU (#18).

Why: on one H200 (2026-11-27) the compiled 1.3B with COAT ended 300 steps with a loss 10% *below* bf16 AdamW's, which
this small run did not reproduce on CPU. It trains a small llama (d_model 256, 4 layers, vocab 32000 as the 1.3B's,
8 x 128 tokens) for 300 steps with that run's lr 3e-4, 30 warm-up steps, betas (0.9, 0.95) and weight decay 0.1, on
the embedded corpus, fp32 weights (under bf16 autocast with ``--autocast``):
- ``adamw``: torch.optim.AdamW (fused on CUDA, as the H200 run's baseline);
- ``coat_states``: CoatAdamW alone, its reference ops (``--fused reference``, the default) or its Triton kernel
  (``--fused triton``: compiled on CUDA, interpreted on CPU);
- ``coat``: CoatAdamW + FP8 activations + FP8 GEMMs (``torch._scaled_mm`` on an FP8 GPU, the emulation elsewhere).
On a GPU the configurations take seconds each: the step that separates the optimizer kernel, the FP8 numerics and
what only the 1.3B run has (compilation, its size) costs no 300-step run of the 1.3B.

    .venv/bin/python benchmarks/check_coat_loss.py adamw|coat_states|coat[,...] [--steps 300] [--vocab 32000]
        [--device cpu|cuda] [--fused reference|triton] [--autocast]

Prints one JSON line per configuration (first loss, mean of the last 10, validation loss on 4 held-out batches,
seconds). On one core of the 2-core development machine: about 9 minutes for adamw, 14 for coat_states, 19 for coat.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_coat import token_stream  # noqa: E402
from meshwright.memory.fp8_activations import apply_fp8_activations  # noqa: E402
from meshwright.models import build_model, lm_loss  # noqa: E402
from meshwright.optim import CoatAdamW  # noqa: E402

LR, BETAS, WD, WARMUP = 3e-4, (0.9, 0.95), 0.1, 30  # bench_coat_gpu.py's


CONFIGS = ("adamw", "coat_states", "coat")


def run(config: str, args: argparse.Namespace) -> dict:
    cfg = {"name": "small", "arch": "llama", "vocab_size": args.vocab, "d_model": 256, "n_layers": 4, "n_heads": 4,
           "n_kv_heads": 4, "ffn_hidden": 704, "max_seq_len": 256, "tie_embeddings": False}
    torch.manual_seed(0)
    model = build_model(cfg, seed=0).to(args.device)
    if config == "coat":
        apply_fp8_activations(model, gemm_layers=None)
    if config.startswith("coat"):
        opt = CoatAdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, fused=args.fused)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD,
                                fused=args.device == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP))
    next_batch, val, _ = token_stream(128, 8)
    losses, t0 = [], time.time()
    for _ in range(args.steps):
        x, y = (t.to(args.device) for t in next_batch())
        with torch.autocast(args.device, torch.bfloat16, enabled=args.autocast):
            logits = model(x)
        loss = lm_loss(logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.detach())
    losses = torch.stack(losses).float().tolist()
    with torch.no_grad(), torch.autocast(args.device, torch.bfloat16, enabled=args.autocast):
        v = sum(lm_loss(model(x.to(args.device)), y.to(args.device)).item() for x, y in val[:4]) / 4
    return {"config": config, "device": args.device, "fused": args.fused if config.startswith("coat") else None,
            "autocast": args.autocast, "vocab": args.vocab, "steps": args.steps, "first_loss": round(losses[0], 4),
            "loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4), "val_loss": round(v, 4),
            "seconds": round(time.time() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", help=f"comma-separated from {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--fused", default="reference", choices=("reference", "triton"),
                   help="CoatAdamW's step: its reference ops or its Triton kernel")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast over the fp32 weights, as the 1.3B run")
    args = p.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    if not configs or any(c not in CONFIGS for c in configs):
        p.error(f"configs={args.configs!r} is invalid; valid: a comma-separated list of {', '.join(CONFIGS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if args.device == "cpu":
        torch.set_num_threads(1)
    for config in configs:
        print(json.dumps(run(config, args)), flush=True)


if __name__ == "__main__":
    main()
