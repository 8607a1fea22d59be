"""Build time and peak host memory of a one-process run started from a Hugging Face checkpoint (``init_from``),
for one or more source trees side by side (e.g. before/after a change), alternating, in fresh processes.

    python benchmarks/bench_init_from.py --trees /path/to/old,/path/to/new [--layers 16 --d-model 1024 --repeat 2]

The checkpoint is a randomly initialised Llama written by transformers into a temporary directory (nothing is
downloaded). Each measurement is one ``build_runtime`` (model built, weights loaded) in a new interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from meshwright.config import load_train_config
from meshwright.train.build import TrainingJob, build_runtime
cfg = load_train_config({"init_from": sys.argv[1], "data": {"path": "default", "max_files": 5}, "seq_len": 64,
                         "global_batch": 2, "micro_batch": 2, "steps": 1, "warmup_steps": 0, "eval_every": 0,
                         "out_dir": sys.argv[2], "progress": False, "energy": False})
t0 = time.perf_counter()
rt = build_runtime(TrainingJob.resolve(cfg))
print(json.dumps({"build_s": time.perf_counter() - t0, "init": getattr(rt, "init", None),
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def write_checkpoint(path: Path, layers: int, d_model: int) -> int:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=d_model, intermediate_size=int(d_model * 11 / 4),
                                   num_hidden_layers=layers, num_attention_heads=d_model // 64,
                                   num_key_value_heads=d_model // 64, max_position_embeddings=2048)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", default=str(Path(__file__).resolve().parents[1]), help="comma-separated source trees")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    trees = args.trees.split(",")
    with tempfile.TemporaryDirectory(prefix="bench_init_from_") as tmp:
        ckpt = Path(tmp) / "hf"
        params = write_checkpoint(ckpt, args.layers, args.d_model)
        rows: dict[str, list[dict]] = {t: [] for t in trees}
        for i in range(args.repeat):
            for tree in trees:
                env = {**os.environ, "PYTHONPATH": tree}
                # cwd outside every tree: `python -c` puts the cwd first on sys.path, ahead of PYTHONPATH
                out = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(Path(tmp) / f"run{i}")], env=env,
                                     capture_output=True, text=True, timeout=900, check=True, cwd=tmp)
                rows[tree].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"checkpoint: Llama {params / 1e6:.0f}M parameters ({args.layers} layers, d_model {args.d_model}), fp32")
        print("| tree | init | build s (each run) | best | peak RSS GiB |")
        print("|---|---|---|---|---|")
        for tree, rs in rows.items():
            times = [r["build_s"] for r in rs]
            print(f"| {tree} | {rs[0]['init']} | {', '.join(f'{t:.2f}' for t in times)} | {min(times):.2f} | "
                  f"{max(r['peak_rss_gib'] for r in rs):.2f} |")


if __name__ == "__main__":
    main()
