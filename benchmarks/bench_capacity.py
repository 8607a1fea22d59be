"""Capacity planning vs published training reports (GPU-hours and emissions).

For each reference run we search a plan for the published model, sequence length and hardware at a
plausible scale, then turn its predicted throughput into device-hours and tCO2e with the report's own
accounting assumptions (Meta's model cards: power = TDP for every GPU-hour, no PUE, CO2 from the
grid intensity their totals imply). Prints a markdown table of predicted vs published.

    .venv/bin/python benchmarks/bench_capacity.py
"""

from __future__ import annotations

import time

from meshwright.config import load_cluster, load_model_config
from meshwright.launcher.planner.search import search
from meshwright.launcher.planner.capacity import capacity_plan

# (name, model preset, cluster preset, nodes, seq, global batch (sequences), train tokens,
#  published GPU-hours, published tCO2e, source)
REFERENCES = [
    ("Llama-2-7B", "llama2-7b", "dgx-a100-80g", 64, 4096, 1024, 2e12, 184_320, 31.22, "Llama 2 paper, Table 2 (A100-80GB, 400 W)"),
    ("Llama-2-13B", "llama2-13b", "dgx-a100-80g", 64, 4096, 1024, 2e12, 368_640, 62.44, "Llama 2 paper, Table 2"),
    ("Llama-2-70B", "llama2-70b", "dgx-a100-80g", 256, 4096, 1024, 2e12, 1_720_320, 291.42, "Llama 2 paper, Table 2"),
    ("Llama-3-8B", "llama3-8b", "dgx-h100-80g", 128, 8192, 512, 15e12, 1_300_000, 390.0, "Llama 3 model card (H100-80GB, 700 W)"),
    ("Llama-3-70B", "llama3-70b", "dgx-h100-80g", 256, 8192, 512, 15e12, 6_400_000, 1900.0, "Llama 3 model card"),
]


def main() -> None:
    rows = []
    for name, model, cluster_name, nodes, seq, gb, tokens, pub_h, pub_co2, source in REFERENCES:
        cfg = load_model_config(model)
        cluster = load_cluster(cluster_name, nodes=nodes)
        t0 = time.perf_counter()
        res = search(cfg, cluster, seq, gb)
        search_s = time.perf_counter() - t0
        pred = res.best.prediction.to_dict()
        # the published accounting: every GPU-hour at TDP, no PUE; intensity implied by their own totals
        implied_grid = pub_co2 / (pub_h * cluster.tdp_w / 1e6)
        cap = capacity_plan(cluster, pred["tokens_per_s"], tokens, utilisation=1.0, pue=1.0, grid_intensity=round(implied_grid, 3))
        # GPU-only emissions (the reports exclude host power)
        gpu_mwh = cap.device_hours * cluster.tdp_w / 1e6
        rows.append((name, f"{nodes}x8 {cluster.device}", f"{pred['mfu'] * 100:.1f}%", f"{cap.device_hours:,.0f}", f"{pub_h:,.0f}",
                     f"{cap.device_hours / pub_h - 1:+.0%}", f"{gpu_mwh * implied_grid:,.1f}", f"{pub_co2:,.1f}",
                     f"{cap.energy_mwh:,.0f}", f"{implied_grid:.3f}", f"{search_s:.1f}", source))
    print("| run | cluster | predicted MFU | predicted GPU-hours | published GPU-hours | error | predicted tCO2e (GPU, report's method) "
          "| published tCO2e | predicted MWh incl. host | implied kg/kWh | search s | source |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
