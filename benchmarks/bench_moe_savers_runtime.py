"""MoE/EP and memory savers through DistributedRuntime, side by side with their baselines in ONE run.

Run under torchrun with 2 ranks:
    torchrun --standalone --nproc-per-node=2 benchmarks/bench_moe_savers_runtime.py [--steps 6] [--out benchmarks/results]

Measures (per rank, rank 0 reports):
- ``tiny`` dp2 with savers off / fp8_act / wta_crs=0.5 / both: bytes autograd saves for backward in one
  micro-batch (deterministic), and median step time (timing: shared machine, ratios only);
- ``tiny-moe`` dp2 with ep1 vs ep2: expert parameter bytes on the rank, all-to-all bytes per step
  measured by the runtime's meter (mean over ranks; one rank's share moves with routing imbalance) vs the cost-model formula (``ep_cost_terms``), median step time.
Variants take turns step by step so load changes hit all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshwright.config import load_model_config  # noqa: E402
from meshwright.memory.accounting import count_saved_bytes  # noqa: E402
from meshwright.parallel.expert_parallel import ep_cost_terms, is_expert_param  # noqa: E402
from meshwright.parallel.runtime import DistributedRuntime  # noqa: E402
from meshwright.parallel.teardown import shutdown  # noqa: E402
from meshwright.plan import plan_from_dict  # noqa: E402

SEQ, MICRO, N_MICRO = 128, 4, 2


def plan(model: str, layer: dict, n_layers: int) -> dict:
    return {"model": model, "seq_len": SEQ, "global_batch": 2 * MICRO * N_MICRO, "micro_batch": MICRO,
            "layers": [{**layer, "repeat": n_layers}]}


def batches(step: int, vocab: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 * step + rank)
    tok = torch.randint(0, vocab, (N_MICRO, MICRO, SEQ + 1), generator=g)
    return [(t[:, :-1], t[:, 1:]) for t in tok]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    dense, moe = load_model_config("tiny"), load_model_config("tiny-moe")
    variants = {
        "tiny dp2 (no savers)": (dense, plan("tiny", {"dp": 2}, dense.n_layers)),
        "tiny dp2 fp8_act": (dense, plan("tiny", {"dp": 2, "savers": {"fp8_act": True}}, dense.n_layers)),
        "tiny dp2 wta_crs=0.5": (dense, plan("tiny", {"dp": 2, "savers": {"wta_crs": 0.5}}, dense.n_layers)),
        "tiny dp2 fp8_act + wta_crs=0.5": (dense, plan("tiny", {"dp": 2, "savers": {"fp8_act": True, "wta_crs": 0.5}},
                                                        dense.n_layers)),
        "tiny-moe dp2 ep1": (moe, plan("tiny-moe", {"dp": 2}, moe.n_layers)),
        "tiny-moe dp2 ep2": (moe, plan("tiny-moe", {"dp": 2, "ep": 2}, moe.n_layers)),
    }
    rts = {k: DistributedRuntime(cfg, plan_from_dict(pd), seed=0) for k, (cfg, pd) in variants.items()}
    opts = {k: rt.build_optimizer(lambda g: torch.optim.AdamW(g, lr=1e-3)) for k, rt in rts.items()}
    res: dict[str, dict] = {k: {"step_s": []} for k in rts}
    for k, rt in rts.items():  # deterministic quantities: saved bytes of one micro-batch, expert bytes, a2a bytes
        cfg = variants[k][0]
        with count_saved_bytes(rt.model) as sb:
            rt.forward_backward(batches(0, cfg.vocab_size, rank)[:1])
        res[k]["saved_bytes"] = sb.total
        res[k]["saved_by_dtype"] = sb.by_dtype
        opts[k].zero_grad(set_to_none=True)
        if cfg.n_experts:
            res[k]["expert_param_bytes"] = sum(p.numel() * p.element_size() for p in rt.parameters() if is_expert_param(p))
            if not res[k]["expert_param_bytes"]:
                res[k]["expert_param_bytes"] = sum(p.numel() * p.element_size() for n, p in rt.model.named_parameters()
                                                   if ".experts." in n)
            before = rt.a2a_meter.bytes_total
            rt.forward_backward(batches(0, cfg.vocab_size, rank))
            mine = torch.tensor([rt.a2a_meter.bytes_total - before], dtype=torch.float64)
            res[k]["a2a_bytes_step_rank"] = int(mine.item())
            dist.all_reduce(mine)  # a rank sends its dispatch + what it received back: mean over ranks = formula
            res[k]["a2a_bytes_step"] = float(mine.item()) / dist.get_world_size()
            ep = variants[k][1]["layers"][0].get("ep", 1)
            res[k]["a2a_formula_step"] = ep_cost_terms(cfg, ep, MICRO * SEQ).a2a_bytes_per_step * N_MICRO
            stats = rt.extra_log_fields()
            res[k]["dropped_frac"] = stats["moe_dropped_frac"]
            opts[k].zero_grad(set_to_none=True)
    for step in range(args.steps + 1):  # step 0 is a warm-up
        for k, rt in rts.items():
            dist.barrier()
            t0 = time.perf_counter()
            rt.forward_backward(batches(step + 1, variants[k][0].vocab_size, rank))
            rt.clip_grad_norm_(1.0)
            rt.optimizer_step(opts[k])
            dist.barrier()
            if step:
                res[k]["step_s"].append(time.perf_counter() - t0)
    if rank == 0:
        base = {"tiny": "tiny dp2 (no savers)", "tiny-moe": "tiny-moe dp2 ep1"}
        print("| variant | saved for backward / micro-batch (MiB) | vs baseline | median step ms | step time vs baseline |"
              " expert param MiB / rank | a2a MiB / step / rank (measured, mean) | a2a MiB / step / rank (formula) |")
        print("|---|---|---|---|---|---|---|---|")
        for k, r in res.items():
            b = res[base[variants[k][1]["model"]]]
            r["median_step_ms"] = 1e3 * statistics.median(r["step_s"])
            mib = lambda v: f"{v / 2**20:.2f}" if v is not None else "-"  # noqa: E731
            print(f"| {k} | {mib(r['saved_bytes'])} | {r['saved_bytes'] / b['saved_bytes']:.3f} | {r['median_step_ms']:.1f} | "
                  f"{r['median_step_ms'] / b['median_step_ms']:.2f} | {mib(r.get('expert_param_bytes'))} | "
                  f"{mib(r.get('a2a_bytes_step'))} | {mib(r.get('a2a_formula_step'))} |")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "moe_savers_runtime.json").write_text(json.dumps(res, indent=1))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [k for k in res if k.startswith("tiny dp2")]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.barh(names, [res[k]["saved_bytes"] / 2**20 for k in names], color=["grey", "C0", "C1", "C2"])
        ax.set_xlabel("MiB saved for backward per micro-batch (rank 0)")
        ax.set_title(f"Savers in DistributedRuntime: tiny, dp2, {MICRO}x{SEQ} tokens")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out / "moe_savers_runtime.png", dpi=120)
    dist.barrier()
    opts.clear()
    shutdown(*rts.values())  # the runtimes let go of their groups (DDP first) before the group goes


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
