"""The free search against fixed layouts (#17): for a handful of models and clusters (with and without --allow fp8 and
WTA-CRS), the search's predicted step next to evaluate_plan of the best uniform layout over a small grid (tp, pp 1F1B
with even stages, micro-batch, recompute, ZeRO level, savers, optimizer-state format, embedding ZeRO level), in the
full (--any-runtime) space. A grid layout faster than the search by more than 0.5% is a search miss.

    PYTHONPATH=. python benchmarks/bench_search_vs_grid.py [CASE_INDEX ...]
"""

import dataclasses
import itertools
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from meshwright.config import divisors, load_cluster, load_model_config  # noqa: E402
from meshwright.errors import ConfigError  # noqa: E402
from meshwright.launcher.planner import cost_model as cm  # noqa: E402
from meshwright.launcher.planner import search as S  # noqa: E402
from meshwright.plan import EmbeddingStrategy, LayerStrategy, OptimizerSpec, PipelineSpec, Plan, Savers, validate_plan  # noqa: E402

def grid_best(cfg, cluster, hw, seq, gb, allow):
    """The fastest fitting uniform layout of the grid: (step s, layout) or None, and how many plans were scored."""
    world = cluster.world_size
    best = None
    cache = {}
    savers = [Savers()]
    if allow.fp8:
        savers.append(Savers(fp8_act=True))
        if cm.fp8_matmul_speedup(hw) > 1:
            savers.append(Savers(fp8_act=True, fp8_gemm=True))
    if allow.wta_crs is not None:
        savers += [dataclasses.replace(s, wta_crs=allow.wta_crs) for s in list(savers)]
    states_opts = ["fp32", "fp8"] if allow.fp8 else ["fp32"]
    n = 0
    for tp, pp, mb, rc in itertools.product([1, 2, 4, 8], [1, 2, 4, 8, 16], [1, 2, 4], S.RECOMPUTE):
        if world % (tp * pp) or cfg.n_heads % tp or cfg.kv_heads % tp or cfg.ffn_dim % tp or pp > cfg.n_layers:
            continue
        if tp > cluster.devices_per_node:
            continue
        dp = world // (tp * pp)
        if gb % (dp * mb):
            continue
        m = gb // (dp * mb)
        if pp > 1 and m < pp:
            continue
        eps = [1]
        if cfg.n_experts:
            eps = sorted({1, max(divisors(math.gcd(cfg.n_experts, dp)))})
        for z, sv, st, ep in itertools.product([0, 1, 2, 3] if dp > 1 else [0], savers, states_opts, eps):
            e_tp = tp if cfg.vocab_size % tp == 0 else 1
            for ez in ([0] if dp * tp // e_tp == 1 else sorted({max(z, 1), 1})):
                base, extra = divmod(cfg.n_layers, pp)
                stages, a = [], 0
                for i in range(pp):
                    b = a + base + (1 if i < extra else 0); stages.append([a, b]); a = b
                plan = Plan(model=cfg.name, cluster={"preset": cluster.name, "nodes": cluster.nodes, "devices_per_node": cluster.devices_per_node},
                            seq_len=seq, global_batch=gb, micro_batch=mb,
                            pipeline=PipelineSpec(degree=pp, schedule="1f1b", microbatches=m if pp > 1 else 1, stages=stages if pp > 1 else []),
                            layers=[LayerStrategy(tp=tp, sp=tp > 1 and seq % tp == 0, dp=dp, zero=z, ep=ep, recompute=rc, savers=sv, repeat=cfg.n_layers)],
                            embedding=EmbeddingStrategy(tp=e_tp, zero=ez), optimizer=OptimizerSpec(states=st))
                try:
                    validate_plan(plan, cfg, world)
                except ConfigError:
                    continue
                n += 1
                p = cm.evaluate_plan(plan, cfg, hw, world, cache=cache)
                if p.fits and (best is None or p.step_s < best[0]):
                    best = (p.step_s, S.describe_layout(plan))
    return best, n

CASES = [
    ("llama2-70b", "dgx-a100-80g", 128, 4096, 1024, [], None),
    ("llama2-13b", "dgx-h100-80g", 1, 4096, 64, ["fp8"], None),
    ("llama2-7b", "dgx-h100-80g", 1, 4096, 64, ["fp8"], None),
    ("llama2-7b", "dgx-a100-80g", 1, 4096, 128, [], None),
    ("llama2-13b", "dgx-a100-80g", 2, 4096, 256, [], 40),
    ("llama2-13b", "dgx-h100-80g", 2, 4096, 128, ["fp8", "wta-crs"], None),
    ("llama3-8b", "dgx-h100-80g", 1, 8192, 64, [], None),
    ("llama3-8b", "dgx-h100-80g", 1, 8192, 64, ["fp8"], 40),
    ("mixtral-8x7b", "dgx-h100-80g", 2, 4096, 256, [], None),
    ("llama2-70b", "dgx-h100-80g", 8, 4096, 512, ["fp8"], None),
    ("llama2-70b", "dgx-a100-80g", 8, 4096, 512, [], None),
]
def main() -> None:
    sel = [CASES[int(i)] for i in sys.argv[1:]] or CASES
    for model, cl, nodes, seq, gb, allow_s, budget in sel:
        cfg, cluster = load_model_config(model), load_cluster(cl, nodes=nodes)
        hw = cm.hardware_from_cluster(cluster, None, budget)
        allow = S.Allow.parse(allow_s)
        t = time.perf_counter()
        r = S.search(cfg, cluster, seq, gb, hw=hw, constraints=S.Constraints(runtime_compatible=False), allow=allow,
                     suggest=False)
        ts = time.perf_counter() - t
        g, n = grid_best(cfg, cluster, hw, seq, gb, allow)
        s = r.best.prediction.step_s if r.best else float("inf")
        if g is None:
            print(f"{model} {cluster.world_size}x{cl} gb{gb}: search {s:.4f}, no grid layout fits", flush=True)
            continue
        flag = "GRID BEATS SEARCH" if g[0] < s * (1 - 0.005) else "ok"
        print(f"{model} {cluster.world_size}x{cl} gb{gb} allow={allow_s} budget={budget}: search {s:.4f} ({ts:.2f}s) "
              f"`{r.best.layout() if r.best else None}` | grid({n}) {g[0]:.4f} `{g[1]}` | {flag} {100 * (s / g[0] - 1):+.2f}%",
              flush=True)


if __name__ == "__main__":
    main()
