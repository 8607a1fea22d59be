"""Bytes saved for backward per token by one block, eager vs torch.compile (inductor), with and without FP8
activations: the slope between two sequence lengths, so the block's weight casts (a constant) drop out.

    python benchmarks/bench_fp8_compiled_saved.py [llama512|llama1024|gpt2_512] [--device cuda] [--fp8-gemm]
    (CPU: bf16 autocast, ~1-2 min per shape; --fp8-gemm: FP8 GEMMs too, "auto" backend: _scaled_mm on
    compute capability >= 8.9, the emulation elsewhere)
"""
import argparse

import torch
from meshwright.config import load_model_config
from meshwright.models import build_model
from meshwright.memory.fp8_activations import apply_fp8_activations
from meshwright.memory.accounting import saved_bytes_per_token

shapes = {"llama512": {"arch": "llama", "d_model": 512, "n_heads": 8, "n_kv_heads": 8, "ffn_hidden": 1408},
          "llama1024": {"arch": "llama", "d_model": 1024, "n_heads": 16, "n_kv_heads": 16, "ffn_hidden": 2816},
          "gpt2_512": {"arch": "gpt2", "d_model": 512, "n_heads": 8}}
ap = argparse.ArgumentParser()
ap.add_argument("shape", nargs="?", default="llama512", choices=sorted(shapes))
ap.add_argument("--device", default="cpu")
ap.add_argument("--fp8-gemm", action="store_true", help="FP8 GEMMs as well as FP8 saved activations")
args = ap.parse_args()
cfg = load_model_config({"name": "b", "vocab_size": 512, "n_layers": 1, "max_seq_len": 1024, **shapes[args.shape]})
print(args.shape, args.device, "fp8 GEMMs" if args.fp8_gemm else "", flush=True)
res = {}
for saver in ["none", "fp8_act"]:
    for mode in ["eager", "inductor"]:
        torch._dynamo.reset()
        m = build_model(cfg, seed=0)
        if saver != "none":
            apply_fp8_activations(m, gemm_layers=None if args.fp8_gemm else ())
        m = m.to(args.device)
        blk = m.layers["0"] if hasattr(m.layers, "keys") else m.layers[0]
        f = blk if mode == "eager" else torch.compile(blk, backend=mode, dynamic=False)
        res[f"{saver}/{mode}"] = saved_bytes_per_token(blk, f, cfg.d_model, (256, 512), device=args.device)
        print(saver, mode, "bytes/token", res[f"{saver}/{mode}"], "per d_model", res[f"{saver}/{mode}"] / cfg.d_model, flush=True)
print("compiled: no saver / FP8 = %.3fx" % (res["none/inductor"] / res["fp8_act/inductor"]),
      "(eager %.3fx)" % (res["none/eager"] / res["fp8_act/eager"]), flush=True)
