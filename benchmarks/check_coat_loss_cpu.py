"""COAT's loss against AdamW's on CPU at the H200 run's optimizer settings, one configuration per call (#18).

Why: on one H200 (2026-11-27) the compiled 1.3B with COAT ended 300 steps with a loss 10% *below* bf16 AdamW's. This
trains a small llama (d_model 256, 4 layers, vocab 32000 as the 1.3B's, 8 x 128 tokens) in fp32 on CPU for 300 steps
with that run's lr 3e-4, 30 warm-up steps, betas (0.9, 0.95) and weight decay 0.1, on the embedded corpus:
- ``adamw``: torch.optim.AdamW;
- ``coat_states``: CoatAdamW's reference ops;
- ``coat``: CoatAdamW + FP8 activations + FP8 GEMMs (the emulation: dequantise, then matmul).
It separates the optimizer and the FP8 numerics from what only the GPU runs (bf16 autocast, ``torch._scaled_mm``,
the Triton step, compilation).

    .venv/bin/python benchmarks/check_coat_loss_cpu.py adamw|coat_states|coat [--steps 300] [--vocab 32000]

Prints one JSON line (first loss, mean of the last 10, validation loss on 4 held-out batches, seconds).
About 9 minutes for adamw, 14 for coat_states and 19 for coat on one core of the 2-core development machine.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", choices=("adamw", "coat_states", "coat"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = {"name": "small", "arch": "llama", "vocab_size": args.vocab, "d_model": 256, "n_layers": 4, "n_heads": 4,
           "n_kv_heads": 4, "ffn_hidden": 704, "max_seq_len": 256, "tie_embeddings": False}
    torch.manual_seed(0)
    model = build_model(cfg, seed=0)
    if args.config == "coat":
        apply_fp8_activations(model, gemm_layers=None)
    if args.config.startswith("coat"):
        opt = CoatAdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, fused=False)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP))
    next_batch, val, _ = token_stream(128, 8)
    losses, t0 = [], time.time()
    for _ in range(args.steps):
        x, y = next_batch()
        loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
    with torch.no_grad():
        v = sum(lm_loss(model(x), y).item() for x, y in val[:4]) / 4
    print(json.dumps({"config": args.config, "vocab": args.vocab, "steps": args.steps, "first_loss": round(losses[0], 4),
                      "loss_last10": round(sum(losses[-10:]) / 10, 4), "val_loss": round(v, 4),
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
