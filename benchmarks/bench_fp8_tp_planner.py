"""What lifting the tp=1 limit of FP8 GEMMs changes in the planner's choices (#18 follow-up): predicted.

Searches Llama-2 7B/13B on one DGX H100 (8 GPUs, seq 4096, global batch 64) under ``--allow fp8``, free and
with tp fixed to 2, and prints the best plan and its predicted step time. Run it on the tree before and
after the change to compare (``PYTHONPATH`` picks the tree). Predictions only: FP8 GEMMs under tp>1 have
not been timed on several GPUs.

    PYTHONPATH=. python benchmarks/bench_fp8_tp_planner.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshwright.config import load_cluster, load_model_config  # noqa: E402
from meshwright.launcher.planner import search as S  # noqa: E402

CASES = [("llama2-7b", None), ("llama2-7b", 2), ("llama2-13b", None), ("llama2-13b", 2)]


def main() -> None:
    cluster = load_cluster("dgx-h100-80g")
    print("| model | tp constraint | best layout | predicted step s | tokens/s | MFU |")
    print("|---|---|---|---|---|---|")
    for model, tp in CASES:
        r = S.search(load_model_config(model), cluster, 4096, 64, constraints=S.Constraints(tp=tp) if tp else None,
                     allow=S.Allow.parse(["fp8"]))
        p = r.best.prediction
        print(f"| {model} | {tp or 'free'} | `{r.best.layout()}` | {p.step_s:.3f} | {p.tokens_per_s:,.0f} | {p.mfu:.3f} |")


if __name__ == "__main__":
    main()
