"""Search the fastest hybrid layout: pipeline degree, stage partition, micro-batch size and schedule
outside, a Galvatron-style dynamic programme over per-layer strategies under a memory budget inside.

For every outer candidate (pp, smallest tp, micro-batch, schedule, partition) each pipeline rank runs
a DP over its layers x memory buckets x strategies (tp, sp, zero, recompute, ep, savers), with the
cost of changing (tp, sp) between neighbouring layers on the transitions. The DP is vectorised in
numpy, per-layer cost terms are memoised per layer kind (identical layers collapse), strategies
dominated in time and memory are pruned, and ranks with similar activation pressure share one DP.
Every surviving candidate is then scored by ``cost_model.evaluate_plan`` — the DP is the heuristic,
the cost model the judge — so predicted figures are always those of the emitted plan.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from meshwright.config import ClusterSpec, ModelConfig, divisors
from meshwright.config.io import to_dict
from meshwright.errors import ConfigError, invalid
from meshwright.launcher.planner import cost_model as cm
from meshwright.plan import EmbeddingStrategy, LayerStrategy, OptimizerSpec, PipelineSpec, Plan, Savers, validate_plan

RECOMPUTE = ("none", "selective", "full")
N_BUCKETS = 96


@dataclass
class Constraints:
    """User-fixed choices (``None`` = searched). Lets users evaluate a layout they already run."""

    tp: Optional[int] = None
    pp: Optional[int] = None
    dp: Optional[int] = None
    ep: Optional[int] = None
    zero: Optional[int] = None
    recompute: Optional[str] = None
    sp: Optional[bool] = None  # sequence parallelism on tp>1 layers (None: searched)
    micro_batch: Optional[int] = None
    schedule: Optional[str] = None
    virtual_stages: Optional[int] = None
    # Only emit what meshwright's own runtime runs (meshwright.parallel.support.check_runtime_support):
    # embeddings/head replicated over tp, no ZeRO-1 (its ZeroRedundancyOptimizer path needs a pure-DP
    # model), no memory savers. Off = the full space, e.g. for --emit to other stacks.
    runtime_compatible: bool = False

    def validate(self, prefix: str = "") -> None:
        for name in ("tp", "pp", "dp", "ep", "micro_batch", "virtual_stages"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise invalid(name.replace("_", "-"), v, "a positive integer")
        if self.zero is not None and self.zero not in (0, 1, 2, 3):
            raise invalid("zero", self.zero, "0, 1, 2 or 3")
        if self.recompute is not None and self.recompute not in RECOMPUTE:
            raise invalid("recompute", self.recompute, ", ".join(RECOMPUTE))
        if self.schedule is not None and self.schedule not in ("gpipe", "1f1b", "interleaved_1f1b"):
            raise invalid("schedule", self.schedule, "gpipe, 1f1b or interleaved_1f1b")


@dataclass
class Allow:
    """Memory savers the user accepts (each changes numerics): COAT FP8, WTA-CRS, LeMo."""

    fp8: bool = False
    wta_crs: Optional[float] = None
    lemo: Optional[float] = None
    fp8_gemm: bool = False  # set by search() under fp8 where the hardware has FP8 matmuls faster than its dtype

    @staticmethod
    def parse(items: list[str] | None) -> "Allow":
        """``["fp8", "wta-crs=0.3", "lemo"]`` -> Allow (default keep ratios 0.3 and 0.5)."""
        out = Allow()
        for raw in items or []:
            for item in raw.split(","):
                name, _, val = item.strip().partition("=")
                if name == "fp8" and not val:
                    out.fp8 = True
                elif name in ("wta-crs", "lemo"):
                    try:
                        ratio = float(val) if val else (0.3 if name == "wta-crs" else 0.5)
                    except ValueError:
                        raise invalid(f"allow {name}", val, "a keep ratio in (0, 1]") from None
                    if not 0.0 < ratio <= 1.0:
                        raise invalid(f"allow {name}", ratio, "a keep ratio in (0, 1]")
                    setattr(out, name.replace("-", "_"), ratio)
                else:
                    raise invalid("allow", item, "fp8, wta-crs[=RATIO] or lemo[=RATIO]")
        return out


@dataclass
class Candidate:
    plan: Plan
    prediction: cm.Prediction

    def layout(self) -> str:
        return describe_layout(self.plan)


@dataclass
class SearchResult:
    best: Optional[Candidate]
    runners_up: list[Candidate]
    rejected: list[dict[str, Any]]
    search_s: float
    candidates: int
    budget_gib: float
    min_memory_gib: Optional[float] = None  # smallest peak memory of any layout (for infeasible requests)
    suggestion: Optional[str] = None


def describe_layout(plan: Plan) -> str:
    """Short human summary, e.g. ``pp=4 1f1b m=64 mb=1; 80x tp8 sp dp4 z1 rc=none``."""
    pp = plan.pipeline
    head = f"pp={pp.degree}"
    if pp.degree > 1:
        head += f" {pp.schedule}" + (f" v={pp.virtual_stages}" if pp.virtual_stages > 1 else "") + f" m={pp.microbatches}"
    parts = []
    for s in plan.layers:
        t = f"{s.repeat}x tp{s.tp}{' sp' if s.sp else ''} dp{s.dp} z{s.zero}{f' hsdp{s.dp_shard}' if s.dp_shard else ''} rc={s.recompute}"
        if s.ep > 1:
            t += f" ep{s.ep}"
        if s.savers.fp8_act:
            t += " fp8gemm" if s.savers.fp8_gemm else " fp8act"
        if s.savers.wta_crs is not None:
            t += f" wta{s.savers.wta_crs:g}"
        if s.savers.lemo is not None:
            t += f" lemo{s.savers.lemo:g}"
        parts.append(t)
    states = " fp8-states" if plan.optimizer.states == "fp8" else ""
    return f"{head} mb={plan.micro_batch}{states}; " + ", ".join(parts)


# ---- strategy space --------------------------------------------------------------------------------

def tp_choices(cfg: ModelConfig, per_stage: int, seq_len: int) -> list[int]:
    """tp degrees that divide heads, KV heads, FFN widths and the stage's devices."""
    out = []
    for t in divisors(per_stage):
        if cfg.n_heads % t or cfg.kv_heads % t or cfg.ffn_dim % t:
            continue
        if cfg.n_experts and cfg.expert_ffn_dim % t:
            continue
        out.append(t)
    return out


def node_shard(dp: int, tp: int, devices_per_node: int) -> Optional[int]:
    """HSDP shard-group size for a layer whose dp group spans nodes: the largest divisor of dp whose
    tp*shard ranks fit one node (1 < shard < dp); None when dp fits one node (FSDP already stays there)."""
    if dp * tp <= devices_per_node:
        return None
    fits = [g for g in divisors(dp) if g * tp <= devices_per_node and 1 < g < dp]
    return max(fits) if fits else None


def layer_strategies(cfg: ModelConfig, index: int, per_stage: int, tps: list[int], seq_len: int,
                     c: Constraints, allow: Allow, mb: int, max_dp: int, global_batch: int,
                     devices_per_node: int = 0) -> list[LayerStrategy]:
    """Every strategy block ``index`` may take on a stage of ``per_stage`` devices (ZeRO-2/3 also as HSDP
    with node-sized shard groups when dp spans nodes)."""
    out = []
    moe = cfg.is_moe_layer(index)
    saver_opts = [Savers()]
    if c.runtime_compatible:
        # DistributedRuntime applies fp8_act and wta_crs per layer; LeMo is for fine-tuning only.
        allow = dataclasses.replace(allow, lemo=None)
    if allow.fp8:
        saver_opts.append(Savers(fp8_act=True))
    if allow.fp8_gemm:
        saver_opts.append(Savers(fp8_act=True, fp8_gemm=True))
    if allow.wta_crs is not None:
        saver_opts += [dataclasses.replace(s, wta_crs=allow.wta_crs) for s in list(saver_opts)]
    if allow.lemo is not None:
        saver_opts += [dataclasses.replace(s, lemo=allow.lemo) for s in list(saver_opts)]
    for t in tps:
        dp = per_stage // t
        if c.dp is not None and dp != c.dp:
            continue
        if max_dp % dp or global_batch % (dp * mb):
            continue
        sps = [False] if t == 1 else ([True, False] if seq_len % t == 0 else [False])
        if c.sp is not None and t > 1:
            sps = [sp for sp in sps if sp == c.sp]
        zeros = [c.zero] if c.zero is not None else ([0, 1, 2, 3] if dp > 1 else [0])
        if c.runtime_compatible and dp > 1 and c.zero is None:
            zeros = [0, 2, 3]
        if any(z > 0 for z in zeros) and dp == 1:
            zeros = [0]
        rcs = [c.recompute] if c.recompute is not None else list(RECOMPUTE)
        eps = [1]
        if moe:
            eps = [e for e in divisors(math.gcd(cfg.n_experts, dp))]
            if c.ep is not None:
                eps = [e for e in eps if e == c.ep] or ([1] if c.ep == 1 else [])
        for sp, z, rc, ep, sv in itertools.product(sps, zeros, rcs, eps, saver_opts):
            if sv.fp8_gemm and t > 1:
                continue  # the runtime's FP8 GEMMs take whole weights (parallel/support.py)
            if c.runtime_compatible and moe and (sp or (ep > 1 and (z != 0 or dp != max_dp))):
                continue  # the runtime keeps MoE tokens tp-replicated and expert grads off ZeRO/mixed-dp paths
            out.append(LayerStrategy(tp=t, sp=sp, dp=dp, zero=z, ep=ep, recompute=rc, savers=sv))
            shard = node_shard(dp, t, devices_per_node) if z >= 2 and not moe else None
            if shard is not None:
                out.append(LayerStrategy(tp=t, sp=sp, dp=dp, zero=z, dp_shard=shard, ep=ep, recompute=rc, savers=sv))
    return out


@dataclass
class _Kind:
    """Cost vectors of one layer kind (dense or MoE) over its strategies, for one outer candidate."""

    strategies: list[LayerStrategy]
    obj: np.ndarray  # seconds per step this layer adds (m_eff * per-mb time + exposed per-step DP)
    static: np.ndarray  # bytes
    act: np.ndarray  # bytes per microbatch in flight
    cls: np.ndarray  # (tp, sp) class index, for transitions
    tpsp: list[tuple[int, bool]]


def _skey(s: LayerStrategy) -> tuple:
    return (s.tp, s.sp, s.dp, s.zero, s.dp_shard, s.ep, s.recompute, s.savers.fp8_act, s.savers.fp8_gemm,
            s.savers.wta_crs, s.savers.lemo)


_COST_CACHE: dict[tuple, dict[str, float]] = {}


def _cached_layer_costs(cfg: ModelConfig, index: int, s: LayerStrategy, mb_samples: float, seq_len: int,
                        hw: cm.Hardware, states: str) -> dict[str, float]:
    """layer_costs memoised per layer kind: identical layers (and candidates sharing a micro-batch) collapse."""
    key = (id(cfg), cfg.is_moe_layer(index), _skey(s), mb_samples, seq_len, id(hw), states)
    hit = _COST_CACHE.get(key)
    if hit is None:
        if len(_COST_CACHE) > 200_000:
            _COST_CACHE.clear()
        hit = _COST_CACHE[key] = cm.layer_costs(cfg, index, s, mb_samples, seq_len, hw, states)
    return hit


def _kind_costs(cfg: ModelConfig, index: int, strategies: list[LayerStrategy], mb: int, max_dp: int,
                seq_len: int, hw: cm.Hardware, states: str, m_eff: float) -> _Kind:
    objs, stat, act = [], [], []
    for s in strategies:
        c = _cached_layer_costs(cfg, index, s, mb * max_dp / s.dp, seq_len, hw, states)
        objs.append(m_eff * cm.layer_microbatch_s(c, hw) + cm.layer_step_dp_s(c, hw))
        stat.append(c["static_bytes"] + c["gathered_bytes"])
        act.append(c["act_bytes"])
    objs_a, stat_a, act_a = np.array(objs), np.array(stat), np.array(act)
    # Pareto pruning inside each (tp, sp) class: drop strategies no better in time, static and activation memory.
    classes = [(s.tp, s.sp) for s in strategies]
    tpsp = sorted(set(classes))
    cls_all = np.array([tpsp.index(c) for c in classes], dtype=int)
    n = len(strategies)
    if n:
        same = cls_all[:, None] == cls_all[None, :]
        le = (objs_a[None, :] <= objs_a[:, None]) & (stat_a[None, :] <= stat_a[:, None]) & (act_a[None, :] <= act_a[:, None])
        lt = (objs_a[None, :] < objs_a[:, None]) | (stat_a[None, :] < stat_a[:, None]) | (act_a[None, :] < act_a[:, None])
        earlier = np.arange(n)[None, :] < np.arange(n)[:, None]
        dom = same & le & (lt | earlier)  # dom[i, j]: j dominates i
        np.fill_diagonal(dom, False)
        keep = np.flatnonzero(~dom.any(axis=1))
    else:
        keep = np.array([], dtype=int)
    strategies = [strategies[i] for i in keep]
    tpsp = sorted(set(classes[i] for i in keep))
    cls = np.array([tpsp.index(classes[i]) for i in keep], dtype=int)
    return _Kind(strategies, objs_a[keep], stat_a[keep], act_a[keep], cls, tpsp)


def _stage_dp(kinds: list[_Kind], budget: float, inflight: float, trans_cost: np.ndarray | None) -> tuple[float, list[int]] | None:
    """Min-time assignment of strategies to the stage's layers (``kinds``: one _Kind per layer, in order)
    with sum(static + inflight*act) <= budget. Returns (time, strategy index per layer) or None.

    ``trans_cost`` is the (C, C) cost between (tp, sp) classes; the min over previous strategies is
    taken per class first, so one layer costs O(buckets x (S + C^2)) instead of O(buckets x S^2), and
    the per-strategy memory shift is one gather with a precomputed index matrix.
    """
    if budget <= 0:
        return None
    bucket = budget / N_BUCKETS
    nb = N_BUCKETS + 1
    rows = np.arange(nb)
    f = None
    back: list[tuple[np.ndarray, np.ndarray]] = []
    prev_kind: _Kind | None = None
    prep: dict[int, tuple] = {}
    for k in kinds:
        if id(k) not in prep:
            w = np.ceil((k.static + inflight * k.act) / bucket - 1e-9).astype(int)
            J = rows[:, None] - w[None, :]
            J = np.where(J < 0, nb, J)  # row nb is the +inf pad
            groups = [np.flatnonzero(k.cls == c) for c in range(len(k.tpsp))]
            S = len(k.strategies)
            # (C, maxS) strategy indices per class, padded with S (an +inf column) for one-shot class minima
            width = max(len(g) for g in groups)
            cls_idx = np.full((len(groups), width), S, dtype=int)
            for c, g in enumerate(groups):
                cls_idx[c, :len(g)] = g
            gp = np.empty((nb + 1, S))
            gp[nb] = np.inf
            ap = np.empty((nb + 1, S), dtype=int)
            ap[nb] = -1
            prep[id(k)] = (w, J, np.arange(S)[None, :], groups, cls_idx, gp, ap)
        w, J, cols, groups, cls_idx, gp, ap = prep[id(k)]
        S = len(k.strategies)
        if f is None:
            g = np.zeros((nb, S))
            g_arg = np.full((nb, S), -1, dtype=int)
        elif trans_cost is not None and prev_kind is k and len(groups) > 1:
            C = len(groups)
            fpad = np.concatenate([f, np.full((nb, 1), np.inf)], axis=1)
            sub = fpad[:, cls_idx]  # (nb, C, maxS)
            a = sub.argmin(axis=2)
            cls_best = np.take_along_axis(sub, a[:, :, None], axis=2)[:, :, 0]
            cls_arg = cls_idx[np.arange(C)[None, :], a]
            tot = cls_best[:, :, None] + trans_cost[None, :, :]  # (nb, C_prev, C_cur)
            best_c = tot.argmin(axis=1)
            g_c = tot[rows[:, None], best_c, np.arange(C)[None, :]]
            g = g_c[:, k.cls]
            g_arg = cls_arg[rows[:, None], best_c][:, k.cls]
        else:
            a = f.argmin(axis=1)
            g = np.repeat(f[rows, a][:, None], S, axis=1)
            g_arg = np.repeat(a[:, None], S, axis=1)
        gp[:nb] = g
        ap[:nb] = g_arg
        f = gp[J, cols] + k.obj[None, :]
        back.append((ap[J, cols], w))
        prev_kind = k
    if f is None:
        return 0.0, []
    last = f[N_BUCKETS]
    s = int(np.argmin(last))
    if not np.isfinite(last[s]):
        return None
    total = float(last[s])
    choice = [0] * len(kinds)
    j = N_BUCKETS
    for li in range(len(kinds) - 1, -1, -1):
        choice[li] = s
        arg, w = back[li]
        prev_s = int(arg[j, s])
        j -= int(w[s])
        s = prev_s
    return total, choice


def _transition_matrix(kind: _Kind, cfg: ModelConfig, tokens: float, hw: cm.Hardware, m_eff: float) -> np.ndarray:
    """(C, C) seconds per step for changing (tp, sp) class between consecutive layers of this kind."""
    C = len(kind.tpsp)
    out = np.zeros((C, C))
    for a in range(C):
        for b in range(C):
            out[a, b] = m_eff * cm.redistribution_s(tokens, cfg, kind.tpsp[a], kind.tpsp[b], hw)
    return out


def _compress(strategies: list[LayerStrategy]) -> list[LayerStrategy]:
    """Plan.compress without the JSON keys (fast path for the search loop)."""
    out: list[LayerStrategy] = []
    keys: list[tuple] = []
    for s in strategies:
        k = _skey(s)
        if keys and keys[-1] == k:
            out[-1].repeat += 1
        else:
            out.append(dataclasses.replace(s, repeat=1))
            keys.append(k)
    return out


def _partitions(cfg: ModelConfig, pp: int, v: int, head_layers: float, fixed: bool) -> list[list[list[int]]]:
    """Stage partitions to try: even, and balanced for the head's compute on the last stage."""
    n_stages = pp * v
    L = cfg.n_layers
    out = []
    base, extra = divmod(L, n_stages)
    even = []
    a = 0
    for i in range(n_stages):
        b = a + base + (1 if i < extra else 0)
        even.append([a, b])
        a = b
    out.append(even)
    if fixed or v > 1 or pp == 1:
        return out
    # give the last stage fewer layers so layers + head balance
    target = (L + head_layers) / pp
    last_n = max(1, int(round(target - head_layers)))
    if last_n < even[-1][1] - even[-1][0]:
        rest = L - last_n
        b2, e2 = divmod(rest, pp - 1)
        part, a = [], 0
        for i in range(pp - 1):
            b = a + b2 + (1 if i < e2 else 0)
            part.append([a, b])
            a = b
        part.append([a, L])
        if all(y > x for x, y in part):
            out.append(part)
    return out


def search(cfg: ModelConfig, cluster: ClusterSpec, seq_len: int, global_batch: int,
           hw: Optional[cm.Hardware] = None, constraints: Optional[Constraints] = None,
           allow: Optional[Allow] = None, states: Optional[str] = None, top: int = 5,
           progress: bool = False, suggest: bool = True) -> SearchResult:
    """Search plans for ``cfg`` on ``cluster`` (its nodes x devices_per_node ranks)."""
    t0 = time.perf_counter()
    c = constraints or Constraints()
    c.validate()
    allow = allow or Allow()
    hw = hw or cm.hardware_from_cluster(cluster)
    allow = dataclasses.replace(allow, fp8_gemm=allow.fp8 and cm.fp8_matmul_speedup(hw) > 1)
    world = cluster.world_size
    if seq_len < 1 or global_batch < 1:
        raise invalid("seq-len" if seq_len < 1 else "global-batch", seq_len if seq_len < 1 else global_batch, "a positive integer")
    if seq_len > cfg.max_seq_len:
        raise invalid("seq-len", seq_len, f"at most the model's max_seq_len={cfg.max_seq_len}")
    state_opts = [states] if states else (["fp32", "fp8"] if allow.fp8 else ["fp32"])
    pps = [p for p in divisors(world) if p <= cfg.n_layers]
    if c.pp is not None:
        if c.pp not in pps:
            raise invalid("pp", c.pp, f"a divisor of world size {world} no larger than n_layers={cfg.n_layers}: {pps}")
        pps = [c.pp]
    feasible: list[Candidate] = []
    rejected: list[dict[str, Any]] = []
    n_cand = 0
    budget = hw.memory_bytes
    usable = (budget - hw.overhead_bytes) / (1 + hw.fragmentation)
    model_name = cfg.name if cfg.name != "custom" else to_dict(cfg)
    from tqdm import tqdm

    outer = list(itertools.product(state_opts, pps))
    for st, pp in tqdm(outer, desc="plan search", unit="pp", disable=not progress, leave=False):
        if pp > 1 and cfg.tie_embeddings:
            rejected.append({"layout": f"pp={pp}", "reason": "tied embeddings need pp=1"})
            continue
        per_stage = world // pp
        tps = tp_choices(cfg, per_stage, seq_len)
        if c.tp is not None:
            if c.tp not in tps:
                rejected.append({"layout": f"pp={pp} tp={c.tp}", "reason": f"tp={c.tp} does not divide heads/FFN/{per_stage} devices"})
                continue
            tps = [c.tp]
        if c.dp is not None:
            tps = [t for t in tps if per_stage // t == c.dp]
        for t_base in tps:
            max_dp = per_stage // t_base
            if global_batch % max_dp:
                continue
            per_replica = global_batch // max_dp
            mbs = [b for b in divisors(per_replica) if b <= 64]
            if c.micro_batch is not None:
                mbs = [b for b in mbs if b == c.micro_batch]
            if pp > 1:
                mbs = [b for b in mbs if per_replica // b >= 1]
            allowed_tps = [t for t in tps if t >= t_base][:3]
            best_mb_time: Optional[float] = None
            worse = 0
            for mb in mbs:
                # Larger micro-batches only add activation memory: once one is out of memory, or two in a
                # row did not beat the best so far, the larger ones are not tried (recorded as pruned).
                if worse >= 2:
                    rejected.append({"layout": f"pp={pp} tp>={t_base} mb>={mb}", "reason": "pruned: larger micro-batches stopped helping"})
                    break
                m = per_replica // mb
                scheds: list[tuple[str, int]] = []
                if pp == 1:
                    scheds = [("1f1b", 1)]
                else:
                    if c.schedule in (None, "1f1b"):
                        scheds.append(("1f1b", 1))
                    if c.schedule == "gpipe":
                        scheds.append(("gpipe", 1))
                    if c.schedule in (None, "interleaved_1f1b"):
                        for v in ([c.virtual_stages] if c.virtual_stages else [2]):
                            if v > 1 and m % pp == 0 and cfg.n_layers >= pp * v:
                                scheds.append(("interleaved_1f1b", v))
                mb_best: Optional[float] = None
                any_fit = False
                for sched, v in scheds:
                    n_cand += 1
                    cand = _solve_candidate(cfg, cluster, hw, c, allow, st, pp, per_stage, allowed_tps, t_base,
                                            max_dp, mb, m, sched, v, seq_len, global_batch, usable, model_name)
                    for item in cand:
                        if isinstance(item, Candidate):
                            feasible.append(item)
                            any_fit = True
                            t = item.prediction.step_s
                            mb_best = t if mb_best is None else min(mb_best, t)
                        else:
                            rejected.append(item)
                if not any_fit:
                    if c.micro_batch is None and mb != mbs[-1]:
                        rejected.append({"layout": f"pp={pp} tp>={t_base} mb>{mb}", "reason": f"pruned: mb={mb} is already out of memory"})
                    break
                if best_mb_time is None or mb_best < best_mb_time * (1 - 1e-3):
                    best_mb_time, worse = mb_best, 0
                else:
                    worse += 1
    feasible.sort(key=lambda x: (x.prediction.step_s, describe_layout(x.plan)))
    uniq: list[Candidate] = []
    seen = set()
    for x in feasible:
        key = describe_layout(x.plan)
        if key not in seen:
            seen.add(key)
            uniq.append(x)
    rejected.sort(key=lambda r: ("need_gib" not in r, r.get("need_gib", 0.0), r["layout"]))
    result = SearchResult(best=uniq[0] if uniq else None, runners_up=uniq[1:top], rejected=rejected,
                          search_s=time.perf_counter() - t0, candidates=n_cand, budget_gib=budget / cm.GIB)
    if not uniq:
        needs = [r["need_gib"] for r in rejected if "need_gib" in r]
        result.min_memory_gib = min(needs) if needs else None
        if suggest:
            result.suggestion = _suggest(cfg, cluster, seq_len, global_batch, hw, c, allow)
        result.search_s = time.perf_counter() - t0
    return result


def _solve_candidate(cfg, cluster, hw, c, allow, states, pp, per_stage, tps, t_base, max_dp, mb, m, sched, v,
                     seq_len, global_batch, usable, model_name) -> list[Any]:
    """Run the per-rank DPs for one outer candidate and return a scored Candidate or a rejection."""
    m_eff = m + (pp - 1) / v if pp > 1 else m
    kinds_cache: dict[bool, _Kind] = {}
    trans_cache: dict[bool, np.ndarray] = {}
    tokens = mb * seq_len

    def kind_for(i: int) -> _Kind:
        key = cfg.is_moe_layer(i)
        if key not in kinds_cache:
            strategies = layer_strategies(cfg, i, per_stage, tps, seq_len, c, allow, mb, max_dp, global_batch,
                                          cluster.devices_per_node)
            kinds_cache[key] = _kind_costs(cfg, i, strategies, mb, max_dp, seq_len, hw, states, m_eff)
            trans_cache[key] = _transition_matrix(kinds_cache[key], cfg, tokens * max_dp, hw, m_eff)
        return kinds_cache[key]

    emb_tp = 1 if c.runtime_compatible or cfg.vocab_size % t_base else t_base
    head_layers = (cm.head_fwd_flops(cfg, 1.0) / cm.layer_fwd_flops(cfg, 0, 1.0, seq_len))
    layout = f"pp={pp} tp>={t_base} mb={mb} {sched}{f' v={v}' if v > 1 else ''}{' fp8-states' if states == 'fp8' else ''}"
    out: list[Any] = []
    fixed = False
    best_need = None
    for stages in _partitions(cfg, pp, v, head_layers, fixed):
        rank_layers: list[list[int]] = [[] for _ in range(pp)]
        for j, (a, b) in enumerate(stages):
            rank_layers[j % pp].extend(range(a, b))
        choices: dict[int, LayerStrategy] = {}
        ok = True
        memo: dict[tuple, Any] = {}
        for r in range(pp):
            layers = rank_layers[r]
            ks = [kind_for(i) for i in layers]
            if any(len(k.strategies) == 0 for k in ks):
                return [{"layout": layout, "reason": "no strategy satisfies the constraints"}]
            inflight = cm.inflight_microbatches(sched, pp, r, m, v)
            extra = 0.0
            first, last = r == 0, r == pp - 1
            emb_dp = per_stage // emb_tp
            for flag_first, flag_last in ((first, False), (False, last)):
                if flag_first or flag_last:
                    n = cm.embedding_param_count(cfg, flag_first, flag_last, emb_tp)
                    extra += sum(cm.model_state_bytes(n, emb_dp, 0 if emb_dp == 1 else 1, states, hw).values())
            if last:
                extra += cm.logits_bytes(cfg, tokens, emb_tp, hw.elem_bytes)
            # ranks with similar activation pressure share one DP (round inflight up to a power of two)
            inflight_r = float(2 ** math.ceil(math.log2(inflight))) if inflight > 1 else 1.0
            inflight_r = min(inflight_r, float(m)) if sched != "gpipe" else inflight
            sig = (tuple(cfg.is_moe_layer(i) for i in layers), inflight_r, first, last)
            if sig not in memo:
                single_kind = len({cfg.is_moe_layer(i) for i in layers}) == 1
                trans = trans_cache[cfg.is_moe_layer(layers[0])] if single_kind and layers else None
                memo[sig] = _stage_dp(ks, usable - extra, inflight_r, trans)
            res = memo[sig]
            if res is None:
                # The DP's buckets and rounded-up in-flight count are conservative: fall back to the
                # memory-minimal assignment when that fits; otherwise it says how far off the layout is.
                mins = [int(np.argmin(k.static + inflight * k.act)) for k in ks]
                need = extra + sum(float(k.static[j] + inflight * k.act[j]) for k, j in zip(ks, mins))
                need_gib = (need + cm.framework_overhead_bytes(hw, need)) / cm.GIB
                if need <= usable - 0.0:
                    res = (float(sum(k.obj[j] for k, j in zip(ks, mins))), mins)
                else:
                    best_need = need_gib if best_need is None else min(best_need, need_gib)
                    ok = False
                    break
            picked = list(res[1])
            if len({cfg.is_moe_layer(i) for i in layers}) == 1 and layers:
                # cost only depends on (tp, sp) changes: sort inside each same-class run so identical
                # strategies sit together and the plan reads as a few `repeat` blocks
                kk = kind_for(layers[0])
                runs, cur = [], []
                for si in picked:
                    if cur and kk.cls[cur[-1]] != kk.cls[si]:
                        runs.append(sorted(cur))
                        cur = []
                    cur.append(si)
                runs.append(sorted(cur))
                picked = [x for run in runs for x in run]
            for i, si in zip(layers, picked):
                choices[i] = kinds_cache[cfg.is_moe_layer(i)].strategies[si]
        if not ok:
            continue
        strategies = [choices[i] for i in range(cfg.n_layers)]
        e_tp = min(s.tp for s in strategies)
        if cfg.vocab_size % e_tp or c.runtime_compatible:
            e_tp = 1
        real_max_dp = max(s.dp for s in strategies)
        mb_plan = mb * max_dp // real_max_dp if (mb * max_dp) % real_max_dp == 0 else None
        if mb_plan is None:
            continue
        # the embedding/head's ZeRO level is not in the per-layer DP: score the runtime's choices for it
        best_plan = best_pred = None
        for e_zero in _embedding_zero_options(strategies, per_stage // e_tp, c.runtime_compatible):
            plan = Plan(model=model_name, cluster={"preset": cluster.name, "nodes": cluster.nodes,
                                                    "devices_per_node": cluster.devices_per_node},
                        seq_len=seq_len, global_batch=global_batch, micro_batch=mb_plan,
                        pipeline=PipelineSpec(degree=pp, schedule=sched,
                                              microbatches=global_batch // (real_max_dp * mb_plan) if pp > 1 else 1,
                                              virtual_stages=v, stages=stages if pp > 1 else []),
                        layers=_compress(strategies), embedding=EmbeddingStrategy(tp=e_tp, zero=e_zero),
                        optimizer=OptimizerSpec(states=states))
            try:
                validate_plan(plan, cfg, per_stage * pp)
            except ConfigError as exc:
                out.append({"layout": layout, "reason": f"invalid plan: {exc}"})
                break
            pred = cm.evaluate_plan(plan, cfg, hw, per_stage * pp)
            if not pred.fits:
                need = max(pred.memory_gib)
                best_need = need if best_need is None else min(best_need, need)
            elif best_pred is None or pred.step_s < best_pred.step_s:
                best_plan, best_pred = plan, pred
        if best_plan is None:
            continue
        plan, pred = best_plan, best_pred
        plan.predicted = pred.to_dict()
        out.append(Candidate(plan, pred))
    if not any(isinstance(o, Candidate) for o in out) and best_need is not None:
        out.append({"layout": layout, "reason": f"out of memory by {best_need - hw.memory_bytes / cm.GIB:.2f} GiB",
                    "need_gib": round(best_need, 3)})
    return out


def _embedding_zero_options(strategies: list[LayerStrategy], emb_dp: int, runtime_compatible: bool) -> list[int]:
    """ZeRO levels worth trying for embeddings/head: like the blocks (least memory), or replicated
    (no per-microbatch traffic for a large vocabulary). meshwright's runtime shards them with FSDP at
    zero >= 2 and replicates them otherwise, so ZeRO-1 is not used there."""
    if emb_dp == 1:
        return [0]
    top = max(s.zero for s in strategies)
    if runtime_compatible:
        return [top, 0] if top >= 2 else [0]
    return sorted({max(top, 1), 1}, reverse=True)


def _suggest(cfg, cluster, seq_len, global_batch, hw, c, allow) -> str:
    """Nearest feasible change for an infeasible request: recomputation, FP8 states, or more nodes."""
    tries: list[tuple[str, dict]] = []
    if c.micro_batch is None:
        c = dataclasses.replace(c, micro_batch=1)  # the smallest micro-batch needs the least memory
    if c.recompute not in (None, "full"):
        tries.append(("--recompute full", {"constraints": dataclasses.replace(c, recompute="full")}))
    if not allow.fp8:
        tries.append(("--allow fp8 (COAT FP8 optimizer states and activations)",
                      {"allow": dataclasses.replace(allow, fp8=True), "constraints": dataclasses.replace(c, runtime_compatible=False)}))
    for label, kw in tries:
        r = search(cfg, cluster, seq_len, global_batch, hw=hw, constraints=kw.get("constraints", c),
                   allow=kw.get("allow", allow), suggest=False)
        if r.best is not None:
            return label
    for factor in (2, 4, 8, 16):
        nodes = cluster.nodes * factor
        bigger = dataclasses.replace(cluster, nodes=nodes)
        cc = dataclasses.replace(c, dp=None, pp=None)
        r = search(cfg, bigger, seq_len, global_batch, hw=hw, constraints=cc, allow=allow, suggest=False)
        if r.best is not None:
            return f"--nodes {nodes}"
    return "a larger --memory-budget-gib or a smaller model"


def infeasible_message(result: SearchResult) -> str:
    need = f"{result.min_memory_gib:.1f} GiB" if result.min_memory_gib is not None else "an unknown amount"
    change = result.suggestion or "relax the constraints"
    return (f"no layout fits in {result.budget_gib:.1f} GiB per device: the smallest needs {need}; "
            f"nearest feasible change: {change}")
