"""Assemble BENCHMARKS.md from the per-topic sections in benchmarks/results/*.md.

Each benchmark script writes its own section (date, machine, command, table); this keeps one
readable file for users without engineers editing the same file at once.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["gpu_h100", "gpu_h200", "gpu_next", "trainer", "full_speed", "parallel", "pipeline_first_step", "zero1", "planner", "planner_accounting_s37", "search_bound", "planner_trust_table", "planner_tables", "published_runs", "capacity",
         "exports", "moe", "moe_expert_tp", "moe_savers_runtime", "coat", "fp8_cast_sass", "finetune", "lora_cost",
         "wta_crs", "meft", "lemo", "energy", "launch",
         "checkpoint_safety", "async_checkpoint", "data_loader", "data_mixture", "grow_positions"]

HEADER = """# Benchmarks

Every figure below was measured on the machine named in its section, with the command given there,
side by side with its baseline in one run, except tables headed as predictions (the planner's output,
shown beside the GPU command that will check them). Timings on the 2-core development CPU are noisy (other
work shared the cores while several were taken); ratios and deterministic quantities (bytes saved
for backward, optimizer-state bytes, FLOPs) are the figures to trust. GPU figures come from one NVIDIA H100 (stop 27, first section) and one NVIDIA H200
lent for 15 minutes each on 2026-11-26, and one H200 on 2026-11-27 (COAT compiled against bf16 and torchao float8, at
the top of the H200 section); sections that say "not yet measured" on a GPU still are.
"""


def main() -> None:
    results = ROOT / "benchmarks" / "results"
    files = sorted(results.glob("*.md"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem))
    parts = [HEADER]
    for f in files:
        text = f.read_text().strip()
        # images are referenced relative to the results folder
        text = text.replace("](", "](benchmarks/results/").replace("](benchmarks/results/http", "](http")
        text = text.replace("](benchmarks/results/benchmarks/results/", "](benchmarks/results/")
        parts.append(text)
    (ROOT / "BENCHMARKS.md").write_text("\n\n---\n\n".join(parts) + "\n")
    print(f"wrote BENCHMARKS.md from {len(files)} sections")


if __name__ == "__main__":
    main()
