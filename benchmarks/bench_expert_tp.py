"""Expert tensor parallelism: what one rank holds of tiny MoE under the runtime's layout, and the planner's Mixtral
pick on the meshwright stack. Deterministic (element counts, the planner's predictions): no timings.

Run on a tree (``PYTHONPATH``) to measure that tree's runtime and planner; ``--before`` / ``--after`` JSON files of two
runs (the commit before expert tp and this one) are combined into benchmarks/results/moe_expert_tp.md:

    PYTHONPATH=<old tree> python benchmarks/bench_expert_tp.py --out before.json
    PYTHONPATH=$PWD python benchmarks/bench_expert_tp.py --out after.json
    PYTHONPATH=$PWD python benchmarks/bench_expert_tp.py --before before.json --after after.json --md benchmarks/results/moe_expert_tp.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

# tests/distributed/ep_parity.py's LoRA model (tiny MoE): 4 experts of hidden 48 over d_model 32, 2 MoE blocks
TINY = {"name": "tiny-moe-lora", "arch": "llama", "vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 4,
        "n_kv_heads": 2, "ffn_hidden": 64, "moe_ffn_hidden": 48, "n_experts": 4, "top_k": 2, "capacity_factor": None,
        "max_seq_len": 64}
LAYOUTS = [(1, 1), (2, 1), (4, 1), (2, 2)]  # (tp, ep)


def held_on_rank(tp: int, ep: int) -> dict[str, int]:
    """Elements rank 0 of an (ep x tp) world holds of tiny MoE's blocks once the runtime's tp and ep are applied
    (parallel/runtime.py ``_apply_layers``: apply_tp, then apply_ep), on a fake process group in this process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from meshwright.config import load_model_config
    from meshwright.models import build_model
    from meshwright.parallel.expert_parallel import apply_ep
    from meshwright.parallel.tensor_parallel import apply_tp

    model = build_model(load_model_config(TINY), seed=0)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp * ep)
    try:
        mesh = init_device_mesh("cpu", (ep, tp), mesh_dim_names=("dp", "tp"))
        out = {"experts": 0, "other": 0}
        for block in model.layers.values():
            if tp > 1:
                block = apply_tp(block, mesh["tp"])
            if ep > 1:
                apply_ep(block, mesh["dp"].get_group())
            for name, p in block.named_parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                out["experts" if ".experts." in f".{name}" else "other"] += local.numel()
        return out
    finally:
        from meshwright.parallel.teardown import shutdown

        model = block = mesh = p = local = None  # the layout, its DTensors and the mesh hold the group: they go first
        shutdown()


def planner_picks() -> dict:
    """docs/finetune.md's Mixtral-8x7B LoRA r16 on q/k/v/o, fp32, seq 4096, global batch 64, 16 A100-80GB on the
    meshwright stack: the free search's pick, and the best plan at tp 2 (the old analytic pick's tp)."""
    from meshwright.config import load_cluster, load_model_config
    from meshwright.config.schema import LoraConfig
    from meshwright.launcher.planner import cost_model as cm
    from meshwright.launcher.planner import search as S
    from meshwright.launcher.planner.auto import lora_search_terms

    cfg, cluster = load_model_config("mixtral-8x7b"), load_cluster("dgx-a100-80g", nodes=2)
    hw = cm.hardware_from_cluster(cluster, stack="meshwright", dtype="fp32")
    out = {}
    for label, tp in (("free", None), ("tp2", 2)):
        lhw, cons = lora_search_terms(cfg, LoraConfig(rank=16), hw, S.Constraints(runtime_compatible=True))
        cons = dataclasses.replace(cons, tp=tp)
        t0 = time.perf_counter()
        result = S.search(cfg, cluster, 4096, 64, hw=lhw, constraints=cons)
        best = result.best
        out[label] = {"layout": S.describe_layout(best.plan), "step_s": best.prediction.step_s,
                      "memory_gib": max(best.prediction.memory_gib), "search_s": time.perf_counter() - t0}
    return out


GOLDEN = ["--model", "mixtral-8x7b", "--cluster", "dgx-h100-80g", "--nodes", "2", "--seq-len", "4096",
          "--global-batch", "256"]  # tests/unit/test_plan_cli.py's golden ``mixtral_16xh100`` (full training)


def golden_pick() -> dict:
    from meshwright.cli import build_parser
    from meshwright.commands import plan as plan_cmd
    from meshwright.launcher.planner.search import describe_layout

    result = plan_cmd.compute_result(build_parser().parse_args(["plan", *GOLDEN]))
    pred = result["predicted"]
    return {"layout": describe_layout(result["_objects"]["best"].plan), "step_s": pred["step_s"],
            "memory_gib": pred["memory_gib_max"]}


def measure() -> dict:
    return {"held": {f"tp{tp}_ep{ep}": held_on_rank(tp, ep) for tp, ep in LAYOUTS}, "planner": planner_picks(),
            "golden": golden_pick()}


def markdown(before: dict, after: dict, cmd: str) -> str:
    rows = []
    for tp, ep in LAYOUTS:
        k = f"tp{tp}_ep{ep}"
        b, a = before["held"][k], after["held"][k]
        tb, ta = b["experts"] + b["other"], a["experts"] + a["other"]
        rows.append(f"| tp {tp} x ep {ep} | {b['experts']:,} | {a['experts']:,} | {a['other']:,} | "
                    f"{4 * tb:,} / {8 * tb:,} | {4 * ta:,} / {8 * ta:,} |")
    prows = []
    for label, what in (("free", "search pick (tp searched)"), ("tp2", "best plan at tp 2")):
        b, a = before["planner"][label], after["planner"][label]
        prows.append(f"| {what} | `{b['layout']}` {b['step_s']:.1f} s, {b['memory_gib']:.1f} GiB | "
                     f"`{a['layout']}` {a['step_s']:.1f} s, {a['memory_gib']:.1f} GiB |")
    gb, ga = before["golden"], after["golden"]
    prows.append(f"| golden `mixtral_16xh100` (full training, 16 H100, seq 4096, gb 256) | `{gb['layout']}` "
                 f"{gb['step_s']:.4f} s, {gb['memory_gib']:.2f} GiB | `{ga['layout']}` {ga['step_s']:.4f} s, "
                 f"{ga['memory_gib']:.2f} GiB |")
    return "\n".join([
        "## MoE: expert tensor parallelism (per-rank bytes, planner pick)",
        "",
        f"Date: {time.strftime('%Y-%m-%d')} (stop 36). Machine: the 2-core development CPU (deterministic counts and "
        "predictions only). Command: " + cmd,
        "",
        "Before: the commit before expert tp (experts whole on every tp rank); after: `parallel/expert_tp.py` (w1/w3 "
        "split by hidden columns, w2 by hidden rows over tp, then sliced over ep). Parameters rank 0 holds of tiny "
        "MoE's two MoE blocks (tests/distributed/ep_parity.py's LoRA model: 4 experts, hidden 48, d_model 32), counted "
        "on the runtime's real layout (apply_tp, then apply_ep, on a fake process group); fp32 bytes: parameters / "
        "AdamW states (8 B per parameter). 'Other' (attention shards, router, norms) is the same before and after.",
        "",
        "| layout | expert params before | after | other params | param / AdamW bytes before | after |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Planner, meshwright stack (`Stack.experts_tp_sharded` / `expert_compute_tp_split` now true; an MoE block's "
        "router and norms counted whole on every tp rank): Mixtral-8x7B LoRA r16 on q/k/v/o, fp32, seq 4096, global "
        "batch 64, 16 A100-80GB (docs/finetune.md). Predictions, not measured.",
        "",
        "| plan | before | after |",
        "|---|---|---|",
        *prows,
    ]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--before")
    ap.add_argument("--after")
    ap.add_argument("--md")
    a = ap.parse_args()
    if a.out:
        Path(a.out).write_text(json.dumps(measure(), indent=1))
    if a.md:
        cmd = ("`PYTHONPATH=<tree> python benchmarks/bench_expert_tp.py --out <tree>.json` on the commit before "
               "expert tp and on this one, then `--before before.json --after after.json --md "
               "benchmarks/results/moe_expert_tp.md`")
        Path(a.md).write_text(markdown(json.loads(Path(a.before).read_text()), json.loads(Path(a.after).read_text()),
                                       cmd))


if __name__ == "__main__":
    main()
