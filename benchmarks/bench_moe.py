"""tiny-moe training throughput with ep1 (experts replicated, pure dp) vs ep2 (experts sharded), 2 ranks.

One run measures both layouts side by side (alternating rounds, same data), plus what EP changes
deterministically: expert parameter/optimizer bytes per rank and all-to-all bytes per step, the
latter counted on the wire (A2AMeter) and compared with the cost model's formula (ep_cost_terms).

    .venv/bin/python benchmarks/bench_moe.py [--steps 8 --rounds 3 --batch 4 --seq 128]

Without torchrun in the environment it relaunches itself under torchrun with 2 ranks (gloo).
Timing on a shared 2-core CPU is noisy: read the tokens/s ratio as indicative, the bytes as exact.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import weakref
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per layout per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "moe.json"))
    ap.add_argument("--plot", default=str(REPO / "benchmarks" / "results" / "moe.png"))
    return ap.parse_args()


def _launch(args: argparse.Namespace) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, check=True, timeout=900, env=env, cwd=REPO)
    _report(json.loads(Path(args.out).read_text()), args.plot)


def _report(res: dict, plot: str) -> None:
    rows = [("tokens/s (global, fwd+bwd+AdamW)", res["ep1"]["tokens_per_s"], res["ep2"]["tokens_per_s"]),
            ("expert params per rank", res["ep1"]["expert_params"], res["ep2"]["expert_params"]),
            ("params + grads + Adam states per rank (MiB)", res["ep1"]["state_mib"], res["ep2"]["state_mib"]),
            ("all-to-all bytes sent per step, mean over ranks", res["ep1"]["a2a_bytes"], res["ep2"]["a2a_bytes"]),
            ("all-to-all bytes leaving a rank per step, mean", res["ep1"]["a2a_remote_bytes"], res["ep2"]["a2a_remote_bytes"])]
    print(f"\n{res['model']}, 2 ranks (gloo, CPU), {res['tokens_per_rank']} tokens/rank/step, {res['steps']} steps x {res['rounds']} rounds")
    print(f"| metric | ep1 | ep2 | ep2/ep1 |\n|---|---:|---:|---:|")
    for name, a, b in rows:
        ratio = f"{b / a:.3f}" if a else "-"
        print(f"| {name} | {a:,.1f} | {b:,.1f} | {ratio} |")
    f = res["formula"]
    print(f"\nall-to-all per step, formula 4*tokens*top_k*d_model*4 B * {res['moe_layers']} MoE layers = {f['a2a_bytes_per_step']:,} B;"
          f" measured mean {res['ep2']['a2a_bytes']:,.0f} B (ratio {res['ep2']['a2a_bytes'] / f['a2a_bytes_per_step']:.4f});"
          f" remote: formula {f['a2a_remote_bytes_per_step']:,.0f} B, measured {res['ep2']['a2a_remote_bytes']:,.0f} B"
          f" (ratio {res['ep2']['a2a_remote_bytes'] / f['a2a_remote_bytes_per_step']:.4f})")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
        ax[0].bar(["ep1", "ep2"], [res["ep1"]["tokens_per_s"], res["ep2"]["tokens_per_s"]], color=["#888", "#3a7"])
        ax[0].set_title("tokens/s (2 ranks, CPU)")
        ax[1].bar(["ep1", "ep2"], [res["ep1"]["state_mib"], res["ep2"]["state_mib"]], color=["#888", "#3a7"])
        ax[1].set_title("param+grad+Adam MiB / rank")
        fig.suptitle(f"{res['model']}: expert parallelism")
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        print(f"plot: {plot}")
    except ImportError:
        pass


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from tqdm import tqdm

    from meshwright.config import load_model_config
    from meshwright.models import build_model, lm_loss
    from meshwright.parallel.expert_parallel import (
        apply_ep, ep_cost_terms, ep_groups_from_mesh, is_expert_param, reduce_dense_grads, reduce_expert_grads,
    )
    from meshwright.parallel.teardown import alive, close_all, destroy_process_group

    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    cfg = load_model_config(args.model)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    groups = ep_groups_from_mesh(mesh, "dp", world)
    base = build_model(cfg, seed=0)
    layouts = {"ep1": copy.deepcopy(base), "ep2": copy.deepcopy(base)}
    meter = apply_ep(layouts["ep2"], groups.ep)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in layouts.items()}
    gen = torch.Generator().manual_seed(100 + rank)
    data = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)

    def step(name: str) -> None:
        model = layouts[name]
        loss = lm_loss(model(data[:, :-1]), data[:, 1:]) + model.aux_loss()
        loss.backward()
        reduce_dense_grads(model, mesh.get_group())
        if name == "ep2":
            reduce_expert_grads(model, groups.edp, world)
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    for name in layouts:  # warm-up (also creates the optimizer states)
        step(name)
    times = {k: 0.0 for k in layouts}
    meter.reset()
    bar = tqdm(total=args.rounds * len(layouts) * args.steps, desc="bench_moe", disable=rank != 0)
    for _ in range(args.rounds):
        for name in layouts:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(name)
                bar.update(1)
            dist.barrier()
            times[name] += time.perf_counter() - t0
    bar.close()
    n_steps = args.rounds * args.steps
    tokens = args.batch * args.seq
    sent = torch.tensor([meter.bytes_total / n_steps, meter.bytes_remote / n_steps], dtype=torch.float64)
    dist.all_reduce(sent)
    sent /= world
    cost = ep_cost_terms(cfg, world, tokens, capacity_factor=cfg.capacity_factor)

    def state_mib(name: str) -> float:
        model, opt = layouts[name], opts[name]
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        adam = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        return (2 * params + adam) / 2**20  # params + grads + exp_avg/exp_avg_sq

    result = {
        "model": args.model, "steps": args.steps, "rounds": args.rounds, "tokens_per_rank": tokens,
        "moe_layers": cfg.n_moe_layers,
        "ep1": {"tokens_per_s": world * tokens * n_steps / times["ep1"],
                "expert_params": sum(p.numel() for n, p in layouts["ep1"].named_parameters() if ".experts." in n),
                "state_mib": state_mib("ep1"), "a2a_bytes": 0.0, "a2a_remote_bytes": 0.0},
        "ep2": {"tokens_per_s": world * tokens * n_steps / times["ep2"],
                "expert_params": sum(p.numel() for p in layouts["ep2"].parameters() if is_expert_param(p)),
                "state_mib": state_mib("ep2"), "a2a_bytes": sent[0].item(), "a2a_remote_bytes": sent[1].item()},
        "formula": {"a2a_bytes_per_step": cost.a2a_bytes_per_step,
                    "a2a_remote_bytes_per_step": cost.a2a_remote_bytes_per_layer * cost.n_moe_layers,
                    "expert_params_per_rank": cost.expert_params_per_rank},
    }
    if rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier()
    # what holds the groups goes first (parallel/teardown.py): the EP layout's modules hold the ep group, the
    # optimizers their parameters, the mesh the dp group. Freed after destroy_process_group, at this function's
    # return, one of them held a gloo group's last reference (the GIL deadlock teardown.py describes)
    refs = {"ep2 model": weakref.ref(layouts["ep2"]), "ep1 model": weakref.ref(layouts["ep1"]),
            "mesh": weakref.ref(mesh)}
    layouts.clear()
    opts.clear()
    del step, base, meter, groups, mesh
    close_all()  # torch's DTensor caches, then a collection
    left = alive(refs)
    if left:
        raise RuntimeError(f"still holding a process group at teardown: {', '.join(left)}")
    destroy_process_group()


if __name__ == "__main__":
    a = _parse()
    if "LOCAL_RANK" in os.environ:
        _worker(a)
    else:
        _launch(a)
