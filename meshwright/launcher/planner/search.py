"""Search the fastest hybrid layout: pipeline degree, stage partition, micro-batch size and schedule
outside, a Galvatron-style dynamic programme over per-layer strategies under a memory budget inside.

For every outer candidate (pp, smallest tp, micro-batch, schedule, partition) each pipeline rank runs
a DP over its layers x memory buckets x strategies (tp, sp, zero, recompute, ep, savers), with the
cost of changing (tp, sp) between neighbouring layers on the transitions. The DP is vectorised in
numpy, per-layer cost terms are memoised per layer kind for the duration of one search (identical layers,
and the schedules of one micro-batch, share them: ``_SearchMemo``), strategies dominated in time and
memory are pruned, and ranks with similar activation pressure share one DP.
Every surviving candidate is then scored by ``cost_model.evaluate_plan`` — the DP is the heuristic,
the cost model the judge — so predicted figures are always those of the emitted plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import heapq
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np

from meshwright.config import ClusterSpec, ModelConfig, divisors
from meshwright.config.io import to_dict
from meshwright.errors import ConfigError, invalid
from meshwright.launcher.planner import cost_model as cm
from meshwright.plan import EmbeddingStrategy, LayerStrategy, OptimizerSpec, PipelineSpec, Plan, Savers, validate_plan

RECOMPUTE = ("none", "selective", "full")
MAX_GLOBAL_BATCH = 2**24  # TrainConfig's bound on global_batch
N_BUCKETS = 64
# the least relative gain in a rank DP's time for which the refined DP's answer is kept and scored as well (below the
# 0.5% by which #17 counts a missed plan)
REFINE_GAIN = 5e-3
# candidates scored more than this much slower than the best so far skip the refined DPs (search time: they double
# the DPs of a 1,024-GPU search otherwise); the rounding loss they recovered was 5% in #17's case
REFINE_WINDOW = 0.10
# the plans passed over are refined at the end of the search where they are within this much of its fastest plan and
# their candidate's lower bound is below it (``_refine_deferred``): over the 48 bench_search_scale requests with every
# plan refined, the refined plans that beat the fastest so far came from plans at most 12.2% slower than it
REFINE_REACH = 0.15


@dataclass
class Constraints:
    """User-fixed choices (``None`` = searched). Lets users evaluate a layout they already run."""

    tp: Optional[int] = None
    pp: Optional[int] = None
    dp: Optional[int] = None
    ep: Optional[int] = None
    cp: Optional[int] = None  # context parallel degree (ring attention); fixed when given, 1 otherwise
    zero: Optional[int] = None
    recompute: Optional[str] = None
    sp: Optional[bool] = None  # sequence parallelism on tp>1 layers (None: searched)
    micro_batch: Optional[int] = None
    schedule: Optional[str] = None
    virtual_stages: Optional[int] = None
    # HSDP (ZeRO-2/3 sharded within node-sized groups, dp_shard) searched where dp spans nodes; False: plain sharding
    # only (a stack with no HSDP at that ZeRO level, export/stacks.py)
    hsdp: Optional[bool] = None
    # Only emit what meshwright's own runtime runs (meshwright.parallel.support.check_runtime_support):
    # embeddings/head replicated over tp, ZeRO-1 as one ZeroRedundancyOptimizer over each stage's dp group, so every
    # layer tp=1 and ZeRO-1 (the per-layer search cannot hold that all-or-none rule: with ``zero`` unset ``search``
    # runs it as a constraint set of its own, ``zero=1``, beside the per-layer ZeRO-0/2/3 search, and keeps the
    # best), no memory savers. Off = the full space, e.g. for --emit to other stacks.
    runtime_compatible: bool = False
    # tp>1 layers as megatron-core's parallel linears run them (tp_backend: megatron, parallel/support.py): no sp, no
    # ZeRO-2/3 (FSDP shards DTensor parameters only), no per-layer savers
    megatron_tp: bool = False

    def validate(self, prefix: str = "") -> None:
        for name in ("tp", "pp", "dp", "ep", "cp", "micro_batch", "virtual_stages"):
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
    # per-layer FP8 activations (and with them FP8 GEMMs) under fp8; search() clears it where the runtime refuses them
    # (a Gemma model: COAT's FP8 norm and gated MLP are Llama's), auto_plan with lora (the trainer refuses them there)
    fp8_act: bool = True

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
    skipped: int = 0  # of ``candidates``, those not solved: their step-time lower bound was slower than the result
    suggestion: Optional[str] = None


def describe_layout(plan: Plan) -> str:
    """Short human summary, e.g. ``pp=4 1f1b m=64 mb=1; 80x tp8 sp dp4 z1 rc=none``."""
    pp = plan.pipeline
    head = f"pp={pp.degree}"
    if pp.degree > 1:
        head += f" {pp.schedule}" + (f" v={pp.virtual_stages}" if pp.virtual_stages > 1 else "") + f" m={pp.microbatches}"
    parts = []
    for s in plan.layers:
        t = f"{s.repeat}x tp{s.tp}{' sp' if s.sp else ''}{f' cp{s.cp}' if s.cp > 1 else ''} dp{s.dp} z{s.zero}{f' hsdp{s.dp_shard}' if s.dp_shard else ''} rc={s.recompute}"
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


def summarize_layout(layout: str) -> str:
    """A ``describe_layout`` line with the layers counted per strategy, most layers first, e.g. ``pp=16 1f1b m=256
    mb=1; 55x tp2 sp dp4 z2 rc=none, 22x tp2 sp dp4 z2 rc=selective``. Where a layer-wise plan alternates strategies
    the exact line runs to dozens of runs (80 layers of Llama-2-70B: 40); the plan's stage table keeps the order."""
    head, sep, runs = layout.partition("; ")
    if not sep:
        return layout
    counts: dict[str, int] = {}
    for run in runs.split(", "):
        n, _, strategy = run.partition("x ")
        counts[strategy] = counts.get(strategy, 0) + int(n)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])  # stable: ties keep the order of first appearance
    return f"{head}; " + ", ".join(f"{n}x {strategy}" for strategy, n in ranked)


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


@functools.lru_cache(maxsize=4096)
def node_shard(dp: int, tp: int, devices_per_node: int) -> Optional[int]:
    """HSDP shard-group size for a layer whose dp group spans nodes: the largest divisor of dp whose
    tp*shard ranks fit one node (1 < shard < dp); None when dp fits one node (FSDP already stays there)."""
    if dp * tp <= devices_per_node:
        return None
    fits = [g for g in divisors(dp) if g * tp <= devices_per_node and 1 < g < dp]
    return max(fits) if fits else None


def layer_strategies(cfg: ModelConfig, index: int, per_stage: int, tps: list[int], seq_len: int,
                     c: Constraints, allow: Allow, mb: int, max_dp: int, global_batch: int,
                     devices_per_node: int = 0, cp: int = 1) -> list[LayerStrategy]:
    """Every strategy block ``index`` may take on a stage of ``per_stage`` devices per context-parallel
    rank (ZeRO-2/3 also as HSDP with node-sized shard groups when dp spans nodes and cp is 1)."""
    out = []
    moe = cfg.is_moe_layer(index)
    saver_opts = [Savers()]
    if c.runtime_compatible:
        # DistributedRuntime applies fp8_act and wta_crs per layer; LeMo is for fine-tuning only.
        allow = dataclasses.replace(allow, lemo=None)
    if allow.fp8 and allow.fp8_act:
        saver_opts.append(Savers(fp8_act=True))
    if allow.fp8_gemm and allow.fp8_act:
        saver_opts.append(Savers(fp8_act=True, fp8_gemm=True))
    if allow.wta_crs is not None:
        saver_opts += [dataclasses.replace(s, wta_crs=allow.wta_crs) for s in list(saver_opts)]
    if allow.lemo is not None:
        saver_opts += [dataclasses.replace(s, lemo=allow.lemo) for s in list(saver_opts)]
    for t in tps:
        dp = per_stage // t
        if c.dp is not None and dp != c.dp:
            continue
        if c.megatron_tp and t > 1 and moe:  # megatron-core tp runs dense blocks only
            continue
        if max_dp % dp or global_batch % (dp * mb):
            continue
        sps = [False] if t == 1 or (c.megatron_tp and t > 1) else ([True, False] if seq_len % t == 0 else [False])
        if c.sp is not None and t > 1:
            sps = [sp for sp in sps if sp == c.sp]
        zeros = [c.zero] if c.zero is not None else ([0, 1, 2, 3] if dp > 1 else [0])
        if c.runtime_compatible and dp > 1 and c.zero is None:
            zeros = [0, 2, 3]
        if c.runtime_compatible and c.zero == 1 and t > 1:
            continue  # the runtime's ZeRO-1 is one ZeroRedundancyOptimizer over tp=1 layers (parallel/support.py)
        if any(z > 0 for z in zeros) and dp == 1:
            zeros = [0]
        if c.megatron_tp and t > 1:
            zeros = [z for z in zeros if z < 2]
        rcs = [c.recompute] if c.recompute is not None else list(RECOMPUTE)
        eps = [1]
        if moe:
            eps = [e for e in divisors(math.gcd(cfg.n_experts, dp))]
            if c.ep is not None:
                eps = [e for e in eps if e == c.ep] or ([1] if c.ep == 1 else [])
        savers = [Savers()] if c.megatron_tp and t > 1 else saver_opts
        for sp, z, rc, ep, sv in itertools.product(sps, zeros, rcs, eps, savers):
            if c.runtime_compatible and moe and (sp or (ep > 1 and (z == 1 or dp != max_dp))):
                continue  # the runtime keeps MoE tokens tp-replicated, expert grads off ZeRO-1 and mixed-dp paths
                # (ZeRO-2/3 under ep shard the experts over edp: parallel/expert_fsdp.py)
            out.append(LayerStrategy(tp=t, sp=sp, dp=dp, zero=z, ep=ep, cp=cp, recompute=rc, savers=sv))
            shard = node_shard(dp, t, devices_per_node) if z >= 2 and not moe and cp == 1 and c.hsdp is not False else None
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
    # transient bytes while the layer runs (ZeRO-3 all-gathered layer + prefetch, backward working set):
    # a maximum per rank, not a sum (empty = none)
    gather: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    # (C, width) strategy indices per class, padded with len(strategies): the DP's per-class minima gather them.
    # Derived from ``cls``; dataclasses.replace carries it over to the masked variants, which keep ``cls``.
    cls_idx: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if len(self.gather) != len(self.strategies):
            self.gather = np.zeros(len(self.strategies))
        if self.cls_idx is None:
            S = len(self.strategies)
            groups = [np.flatnonzero(self.cls == c) for c in range(len(self.tpsp))]
            self.cls_idx = np.full((len(groups), max((len(g) for g in groups), default=0)), S, dtype=int)
            for c, g in enumerate(groups):
                self.cls_idx[c, :len(g)] = g

    def cls_rows_t(self) -> np.ndarray:
        """``dp_arrays``' scaled class rows gathered class-major (width, C, 1), built once."""
        cache = self.obj_cache()
        got = cache.get("cls_rows_t")
        if got is None:
            cls_idx_t, _, _, cls_rows = self.dp_arrays()
            got = cache["cls_rows_t"] = cls_rows.take(cls_idx_t, axis=0)
        return got

    def cls_list(self) -> list[int]:
        """``cls`` as a list of ints (read one element at a time), built once."""
        cache = self.obj_cache()
        got = cache.get("cls_list")
        if got is None:
            got = cache["cls_list"] = self.cls.tolist()
        return got

    def obj_cache(self) -> dict[str, Any]:
        """The caches that depend on ``obj`` and the classes only (not on memory): kinds that differ in memory only
        (``_KindTable.capped``'s, per in-flight count) share one."""
        got = self.__dict__.get("_obj_cache")
        if got is None:
            got = self.__dict__["_obj_cache"] = {}
        return got

    def dp_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The stage DP's arrays that do not depend on its bucket size, built once per kind (a rank's DPs at
        several budgets share them): cls_idx transposed (width, C), obj with its +inf padding row (S + 1, 1),
        that gathered class-major (width, C, 1), and the padded class index scaled to a (C, nb + 1) table's rows."""
        cache = self.obj_cache()
        got = cache.get("dp_arrays")
        if got is None:
            cls_idx_t = np.ascontiguousarray(self.cls_idx.T)
            obj = np.append(self.obj, np.inf)[:, None]
            got = cache["dp_arrays"] = (cls_idx_t, obj, obj.take(cls_idx_t, axis=0),
                                                 np.append(self.cls, 0)[:, None] * (N_BUCKETS + 2))
        return got

    def fastest_two(self) -> Optional[tuple[int, float, Optional[float]]]:
        """``_all_fastest``'s view of ``obj``, built once: the strictly fastest strategy, its time and the next
        fastest time (None where there is no other strategy or it is infinite); None where no strategy is finite or
        the fastest is not unique."""
        cache = self.obj_cache()
        got = cache.get("fastest_two", False)
        if got is False:
            got = None
            obj = self.obj
            if len(obj):
                s = int(obj.argmin())
                fastest = obj[s]
                if np.isfinite(fastest) and np.count_nonzero(obj == fastest) == 1:
                    second = np.partition(obj, 1)[1] if len(obj) > 1 else None
                    got = (s, float(fastest), float(second) if second is not None and np.isfinite(second) else None)
            cache["fastest_two"] = got
        return got

    def finite(self) -> np.ndarray:
        """Where ``obj`` is finite (the strategies a layer can take), built once."""
        cache = self.obj_cache()
        got = cache.get("finite")
        if got is None:
            got = cache["finite"] = np.isfinite(self.obj)
        return got

    def obj_full(self) -> np.ndarray:
        """``dp_arrays``' class-major obj (width, C, 1) repeated along the stage DP's buckets, (width, C, nb): built once."""
        cache = self.obj_cache()
        got = cache.get("obj_full")
        if got is None:
            obj_t = self.dp_arrays()[2]
            got = cache["obj_full"] = np.empty(obj_t.shape[:2] + (N_BUCKETS + 1,))
            got[...] = obj_t
        return got

    def hull(self, inflight: float, cls: Optional[int] = None) -> tuple[float, float, list[tuple[float, float]]]:
        """The lower convex hull of this kind's (bytes at ``inflight``, time) points (of class ``cls`` only where
        given), from the smallest footprint to the fastest strategy: (its bytes, its time, the segments (extra bytes,
        time saved), most seconds saved per byte first). ``_lp_bound``'s input, built once per (kind, count, class)."""
        hulls = self.__dict__.setdefault("_hulls", {})
        got = hulls.get((inflight, cls))
        if got is None:
            points = self.__dict__.setdefault("_hull_points", {})
            pts = points.get(cls)
            if pts is None:  # the finite points of the class, for every in-flight count
                ok = np.isfinite(self.obj) if cls is None else np.isfinite(self.obj) & (self.cls == cls)
                pts = points[cls] = (self.static[ok], self.act[ok], self.obj[ok])
            static, act, t = pts
            w = static + inflight * act
            if len(t) > 64:
                # the front runs from the smallest footprint (the fastest of those) to the fastest strategy (the
                # smallest of those): no other point is on it, and leaving them out of the sort changes nothing
                near = np.flatnonzero((t <= t[w == w.min()].min()) & (w <= w[t == t.min()].min()))
                w, t = w[near], t[near]
            # the few points left in plain Python: numpy's per-call cost was most of the time of the 8,000 hulls of a
            # 1,024-GPU search (a median of 19 points)
            pts: list[tuple[float, float]] = []
            low = math.inf
            for x, y in sorted(zip(w.tolist(), t.tolist())):  # by bytes, then time (as np.lexsort((t, w)))
                if not y < low:
                    continue  # off the Pareto front: no faster than a smaller (or equal) strategy
                low = y
                while len(pts) >= 2 and ((pts[-1][1] - pts[-2][1]) * (x - pts[-2][0])
                                         >= (y - pts[-2][1]) * (pts[-1][0] - pts[-2][0])):
                    pts.pop()  # pts[-1] lies on or above the chord from pts[-2] to (x, y)
                pts.append((x, y))
            got = hulls[(inflight, cls)] = (
                (pts[0][0], pts[0][1], [(q[0] - p[0], p[1] - q[1]) for p, q in zip(pts, pts[1:])])
                if pts else (math.inf, math.inf, []))
        return got


def _lp_bound(kinds: list[_Kind], budget: float, inflight: float, trans_cost: np.ndarray | None,
              beat: float = math.inf) -> float:
    """A lower bound on the time of every assignment of ``kinds`` (one per layer) within ``budget`` bytes (as the
    stage DP counts them): the linear relaxation's optimum, where layers may mix strategies fractionally (``_lp``).
    It is within about one layer's strategy step of the optimum, much tighter than the rounded-down DP, so it settles
    that a refined DP cannot beat ``beat`` without running it. Class changes cost >= 0 (with a negative one the
    bound is -inf). Where the relaxation is within 1% of ``beat`` on a rank of one kind with several classes, an
    assignment either stays in one class (the relaxation over that class's strategies) or changes class at least
    once (the cheapest change on top): the larger bound. +inf where not even the smallest footprints fit."""
    if not kinds:
        return 0.0
    if trans_cost is not None and (trans_cost < 0).any():
        return -math.inf
    first, room = kinds[0], budget * (1 + 1e-12)
    if all(k is first for k in kinds):
        groups = [(first, len(kinds))]
    else:
        counts: dict[int, list[Any]] = {}
        for k in kinds:
            c = counts.get(id(k))
            if c is None:
                counts[id(k)] = [k, 1]
            else:
                c[1] += 1
        groups = [(k, n) for k, n in counts.values()]
    bound = _lp(groups, room, inflight, None)
    n, C = len(kinds), len(first.tpsp)
    if trans_cost is not None and len(groups) == 1 and C > 1 and n > 1 and beat * 0.99 <= bound < beat:
        change = float(np.min(trans_cost + np.diag(np.full(C, np.inf))))
        stay = min(_lp(groups, room, inflight, c) + (n - 1) * float(trans_cost[c, c]) for c in range(C))
        bound = max(bound, min(stay, bound + change))
    return bound


def _lp(groups: list[tuple[_Kind, int]], room: float, inflight: float, cls: Optional[int]) -> float:
    """The linear relaxation of the stage DP for ``groups`` (kind, layers of it) within ``room`` bytes (strategies of
    class ``cls`` only where given): every layer starts at its kind's smallest hull point and the bytes left buy hull
    segments, most seconds saved per byte first (the last one fractionally). +inf where nothing fits."""
    total, tol = 0.0, abs(room) * 1e-9
    segs: list[tuple[float, float, float]] = []
    for k, n in groups:
        w0, t0, hull = k.hull(inflight, cls)
        total += n * t0
        room -= n * w0
        if len(groups) == 1:
            segs = [(0.0, n * dw, n * saved) for dw, saved in hull]  # already best first
        else:
            segs.extend((saved / dw, n * dw, n * saved) for dw, saved in hull)
    if not room >= -tol or total == math.inf:
        return math.inf
    if len(groups) > 1:
        segs.sort(key=lambda x: -x[0])
    for _, dw, saved in segs:
        if room <= 0:
            break
        total -= saved if dw <= room else saved * (room / dw)
        room -= dw
    return total


def _any_row(a: np.ndarray) -> np.ndarray:
    """``a.any(axis=1)`` without ndarray.any's Python-level dispatch (the search calls it per class and candidate)."""
    return np.logical_or.reduce(a, axis=1)


def _skey(s: LayerStrategy) -> tuple:
    return (s.tp, s.sp, s.dp, s.zero, s.dp_shard, s.ep, s.cp, s.recompute, s.savers.fp8_act, s.savers.fp8_gemm,
            s.savers.wta_crs, s.savers.lemo)


class _SearchMemo:
    """Pure results shared by every outer candidate of one ``search`` call (one model, hardware and sequence
    length, so none of them is in a key): per-layer costs, strategy cost vectors, and evaluate_plan's layer costs.
    Scoped to the call, not the process: nothing outlives the inputs it was computed from."""

    def __init__(self) -> None:
        # per (strategies, mb x max_dp, states): cm.layer_costs_columns' rows of per-mb s, per-step DP + optimizer s,
        # accumulation s per microbatch, static, activation and transient bytes
        self.columns: dict[tuple, np.ndarray] = {}
        self.cost_parts: dict[tuple, Any] = {}  # cm.layer_costs' terms shared by strategies that differ elsewhere
        self.vectors: dict[tuple, _Vectors] = {}
        # layer_strategies and their cm.StrategyColumns per (kind, stage, cp, tps, max_dp, tps the micro-batch admits)
        self.strategies: dict[tuple, tuple[list[LayerStrategy], cm.StrategyColumns]] = {}
        self.tp_blocks: dict[tuple, tuple[list[LayerStrategy], cm.StrategyColumns]] = {}  # _tp_block's, per its key
        self.plan_costs: dict[Any, Any] = {}  # cost_model.evaluate_plan's cache
        self.redistribution: dict[tuple, float] = {}  # cm.redistribution_s per (tokens, from class, to class)
        self._moe_flags: Optional[tuple[bool, ...]] = None
        self.best_step_s = math.inf  # the fastest candidate scored so far (gates the refined DPs)
        self.bounds: dict[tuple, float] = {}  # _step_lower_bound per candidate (_candidate_key)
        # the refinements _solve_candidate defers to the search's end (_refine_deferred): (candidate, stages, step,
        # refine, table)
        self.deferred: list[tuple] = []
        self.rooms: dict[tuple, float] = {}  # _first_rank_room per (stage size, tps, states, one stage, head tokens)
        # _step_lower_bound's terms that few fields set: head, boundary transfer, partitions, the first rank's counts
        self.bound_parts: dict[Any, Any] = {}

    def moe_flags(self, cfg: ModelConfig) -> tuple[bool, ...]:
        """``cfg.is_moe_layer(i)`` for every layer: the layer's kind key."""
        if self._moe_flags is None:
            self._moe_flags = tuple(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
        return self._moe_flags


@dataclass
class _Vectors:
    """One layer kind's strategies and their cost terms for one (stage size, tp degrees, micro-batch, microbatches, dp,
    states):
    every schedule of that micro-batch shares them; only the objective's microbatch count differs (``kind``)."""

    strategies: list[LayerStrategy]
    mb_s: np.ndarray  # seconds per microbatch (cm.layer_microbatch_s)
    step_s: np.ndarray  # per-step seconds: exposed DP (cm.layer_step_dp_s), optimizer step, gradient accumulation
    static: np.ndarray
    act: np.ndarray
    gather: np.ndarray
    classes: list[tuple[int, bool]]
    columns: cm.StrategyColumns  # the strategies' columns (what the bound reads of their fields)

    @functools.cached_property
    def blocks(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per (tp, sp) class: its strategies' indices (ascending) and their pairwise memory comparisons for the
        Pareto pruning, [i, j] about j against i (dominance is only judged inside a class: blocks, not an n x n
        table). Built on the first ``kind``: half the vectors of a large search only feed ``_step_lower_bound``."""
        tpsp = sorted(set(self.classes))
        cls_all = np.array([tpsp.index(c) for c in self.classes], dtype=int)
        blocks = []
        for c in range(len(tpsp)):
            idx = np.flatnonzero(cls_all == c)
            st, ac, ga = self.static[idx], self.act[idx], self.gather[idx]
            mem_le = (st[None, :] <= st[:, None]) & (ac[None, :] <= ac[:, None]) & (ga[None, :] <= ga[:, None])
            np.fill_diagonal(mem_le, False)
            mem_lt = ((st[None, :] < st[:, None]) | (ac[None, :] < ac[:, None]) | (ga[None, :] < ga[:, None])
                      | (idx[None, :] < idx[:, None]))
            blocks.append((idx, mem_le, mem_lt))
        return blocks

    def bound_terms(self) -> tuple[float, float, int, list[tuple[int, bool, int]]]:
        """What ``_step_lower_bound`` reads of these strategies, built once: the smallest per-microbatch and per-step
        times, the largest dp * cp and the distinct (tp, sp, cp)."""
        got = self.__dict__.get("_bound_terms")
        if got is None:
            got = self.__dict__["_bound_terms"] = (float(self.mb_s.min()), float(self.step_s.min()),
                                                   self.columns.max_dp_cp, self.columns.tp_sp_cp)
        return got

    def lp_kind(self, a: float, obj: Callable[[], np.ndarray]) -> _Kind:
        """These strategies as one class with objective ``obj()``, ``a`` x per-microbatch time + per-step time (built
        once per ``a``): ``_lp``'s input for the memory-aware part of ``_step_lower_bound``, whose hulls it keeps per
        in-flight count."""
        kinds = self.__dict__.setdefault("_lp_kinds", {})
        got = kinds.get(a)
        if got is None:
            n = len(self.strategies)
            got = kinds[a] = _Kind(self.strategies, obj(), self.static, self.act, np.zeros(n, dtype=int), [(0, False)])
        return got

    def kind(self, m_eff: float) -> _Kind:
        """The cost vectors at ``m_eff`` microbatch-times per step, without strategies dominated inside their
        (tp, sp) class (no better in time, static, activation and transient memory; the earlier one of equals)."""
        obj = m_eff * self.mb_s + self.step_s
        kept = []
        for idx, mem_le, mem_lt in self.blocks:
            o = obj[idx]
            dom = mem_le & (o[None, :] <= o[:, None]) & (mem_lt | (o[None, :] < o[:, None]))
            kept.append(idx[~_any_row(dom)])  # dom[i, j]: j dominates i
        keep = np.sort(np.concatenate(kept)) if kept else np.array([], dtype=int)
        strategies = [self.strategies[i] for i in keep]
        tpsp = sorted(set(self.classes[i] for i in keep))
        cls = np.array([tpsp.index(self.classes[i]) for i in keep], dtype=int)
        return _Kind(strategies, obj[keep], self.static[keep], self.act[keep], cls, tpsp, self.gather[keep])


def _vectors(o: "_Outer", index: int) -> _Vectors:
    """Strategies of layer ``index``'s kind for outer candidate ``o`` and their costs, memoised per search."""
    moe = o.cfg.is_moe_layer(index)
    key = (moe, o.per_stage, o.cp, tuple(o.tps), o.mb, o.m, o.max_dp, o.states)
    hit = o.memo.vectors.get(key)
    if hit is not None:
        return hit
    # the strategies depend on the micro-batch only through the tp degrees it admits (layer_strategies: the global batch
    # divides dp x mb): the micro-batches, state formats and microbatch counts that admit the same ones share them
    per_rank = o.per_stage // o.cp
    admitted = tuple(t for t in o.tps if not (o.max_dp % (per_rank // t) or o.global_batch % (per_rank // t * o.mb)))
    skey = (moe, o.per_stage, o.cp, tuple(o.tps), o.max_dp, admitted)
    got = o.memo.strategies.get(skey)
    if got is None:
        # layer_strategies goes through the tp degrees in turn: the list is the admitted degrees' blocks one after
        # another, each shared by every list that admits it (the candidates of the smallest tp degrees next to it)
        blocks = [_tp_block(o, index, moe, per_rank, t) for t in admitted]
        columns = cm.StrategyColumns.concat([b[1] for b in blocks])
        got = o.memo.strategies[skey] = (columns.strategies, columns)
    strategies, columns = got
    # per step, as evaluate_plan counts it: exposed DP traffic, the optimizer step over this rank's shard and the
    # accumulation of every microbatch after the first (both depend on the ZeRO level: #17)
    ckey = (skey, o.mb * o.max_dp, o.states)
    cols = o.memo.columns.get(ckey)
    if cols is None:
        cols = o.memo.columns[ckey] = cm.layer_costs_columns(o.cfg, index, columns, o.mb * o.max_dp, o.seq_len, o.hw,
                                                             o.states, o.memo.cost_parts)
    mb_s, step = cols[0], cols[1] + (o.m - 1) * cols[2]  # the same additions, in the same order, as per layer
    stat_a, act_a, gat_a = cols[3].copy(), cols[4].copy(), cols[5].copy()
    hit = o.memo.vectors[key] = _Vectors(strategies, mb_s.copy(), step, stat_a, act_a, gat_a, columns.classes, columns)
    return hit


def _tp_block(o: "_Outer", index: int, moe: bool, per_rank: int, t: int
              ) -> tuple[list[LayerStrategy], cm.StrategyColumns]:
    """``layer_strategies`` of one tp degree that the micro-batch admits, and its columns, memoised per search. Given
    the degree is admitted, the block depends on neither the micro-batch nor the largest dp, but for MoE layers
    under ``runtime_compatible`` (expert parallelism only at the largest dp)."""
    key = (moe, per_rank, t, o.cp, o.max_dp if moe and o.c.runtime_compatible else None)
    got = o.memo.tp_blocks.get(key)
    if got is None:
        strategies = layer_strategies(o.cfg, index, per_rank, [t], o.seq_len, o.c, o.allow, o.mb, o.max_dp,
                                      o.global_batch, o.cluster.devices_per_node, o.cp)
        got = o.memo.tp_blocks[key] = (strategies, cm.StrategyColumns(o.cfg, index, strategies, o.hw))
    return got


class _DPKind:
    """One layer kind's gather indices for one DP (its bucket size and in-flight count): built once per call and
    shared by every layer of that kind, so a layer costs a few whole-array numpy operations. Tables are laid out
    (strategy, bucket): numpy reduces over a leading axis several times faster than over a short trailing one.
    The general loop's (S + 1, nb) tables are built on first use: the one-kind DP gathers its own straight away."""

    def __init__(self, k: _Kind, bucket: float, inflight: float, rounding: str = "up") -> None:
        self.C, self.cls, self.cls_idx = len(k.tpsp), k.cls, k.cls_idx
        # cls_idx_t (width, C): the class minima reduce over a leading axis
        self.cls_idx_t, self.obj, self.obj_t, self.cls_rows = k.dp_arrays()
        self.w = _bucket_weights((k.static + inflight * k.act) / bucket, rounding)
        usable = self.w[k.finite()]
        self.min_w = int(np.minimum.reduce(usable)) if len(usable) else N_BUCKETS + 1  # the smallest strategy a layer can take
        self.kind = k

    @functools.cached_property
    def J(self) -> np.ndarray:
        """J[s, j]: the bucket a layer taking s in j buckets leaves to the layers before it; nb (the +inf pad of every
        source table) where s does not fit. Row S is a padding strategy with +inf time, so every f has a trailing +inf
        row that the per-class gathers (cls_idx pads with S) pick up as filler."""
        nb = N_BUCKETS + 1
        J = np.full((len(self.w) + 1, nb), nb)
        np.subtract(_BUCKET_ROW, self.w[:, None], out=J[:-1])
        J[J < 0] = nb
        return J

    @functools.cached_property
    def cls_at(self) -> np.ndarray:
        """J's indices into a flattened (C, nb + 1) per-class table."""
        return self.cls_rows + self.J

    def one_kind(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``_stage_dp_one_kind_many``'s tables: idx_t (W, C), the kind's strategies per class (ascending, padded with S);
        gathered by it, each (W, C, nb), the per-class table indices (``cls_at``'s rows), obj (full, not broadcast:
        numpy adds a contiguous array several times faster than one broadcast along the buckets) and ``J``'s rows;
        and ``cls_at``'s last column (S,): where the last layer reads the full budget."""
        nb = N_BUCKETS + 1
        idx_t = self.cls_idx_t
        # J's rows looked up by weight (capped at nb: no bucket fits it); the padding strategy S never fits
        w = np.minimum(self.w, nb)
        J_t = _J_ROWS.take(np.append(w, nb).take(idx_t), axis=0)
        return idx_t, self.kind.cls_rows_t() + J_t, self.kind.obj_full(), J_t, self.cls_rows[:-1, 0] + _J_LAST.take(w)


_BUCKET_ROW = np.arange(N_BUCKETS + 1)[None, :]
# _J_ROWS[w, j]: J's row of a strategy of w buckets (j - w, nb where it does not fit), w = 0 .. nb; its last column
_J_ROWS = np.arange(N_BUCKETS + 1)[None, :] - np.arange(N_BUCKETS + 2)[:, None]
_J_ROWS[_J_ROWS < 0] = N_BUCKETS + 1
_J_LAST = np.ascontiguousarray(_J_ROWS[:, N_BUCKETS])


def _bucket_weights(x: np.ndarray, rounding: str) -> np.ndarray:
    """Buckets each strategy takes (``x``: its bytes over the bucket size; an array, or one numpy scalar). up: every
    assignment the DP admits fits (conservative); down: every one that fits is admitted (a relaxation); nearest: in
    between."""
    w = np.ceil(x - 1e-9) if rounding == "up" else np.floor(x + 1e-9) if rounding == "down" else np.rint(x)
    return np.maximum(w, 0).astype(int)


def _all_fastest(k: _Kind, n: int, bucket: float, inflight: float, trans_cost: np.ndarray | None,
                 rounding: str) -> tuple[float, list[int]] | None:
    """The stage DP's answer for ``n`` layers of kind ``k`` without running it, where memory does not bind: when
    one strategy is strictly the fastest (by more than the float spacing at the sums: no other path ties), ``n`` of
    it fit the buckets and staying in a class costs nothing (changing costs >= 0), every layer taking it is the
    unique optimum, and its time is the DP's sum, added in the DP's order.
    None: the DP must run."""
    got = k.fastest_two()
    if got is None:
        return None
    s, fastest, second = got
    # numpy float64 scalars: the same IEEE ops, and the same rounding, as _DPKind's arrays
    w = int(_bucket_weights((k.static[s] + inflight * k.act[s]) / bucket, rounding))
    if w * n > N_BUCKETS:
        return None
    if trans_cost is not None:
        c = k.cls[s]
        if trans_cost[c, c] != 0 or (trans_cost < 0).any():
            return None
    total = 0.0
    for _ in range(n):  # Python floats: the same IEEE additions as the DP's float64 arrays
        total = total + fastest
    # the DP must not find another path of this float total either: a strategy a few ulps slower (ZeRO-2 beside a
    # ZeRO-3 whose gathers overlap) ties once added to the layers before, and the DP's first-index tie-breaking may
    # pick it. Each of a path's <= 2n additions (layer times, class changes) rounds by at most half the spacing at
    # the sums, so two paths' float totals differ by at least their exact difference less 2n spacings: where the next
    # fastest is slower by more than that, every other path's float total is strictly larger.
    if second is not None and not second - fastest > 2 * n * np.spacing(total + second):
        return None
    return float(total), [s] * n


def _stage_dp(kinds: list[_Kind], budget: float, inflight: float, trans_cost: np.ndarray | None,
              rounding: str = "up") -> tuple[float, list[int]] | None:
    """Min-time assignment of strategies to the stage's layers (``kinds``: one _Kind per layer, in order)
    with sum(static + inflight*act) <= budget. Returns (time, strategy index per layer) or None.
    Weights are rounded ``up`` to whole buckets (what it returns fits), ``down`` (a relaxation: what it returns may
    not fit, but its time is a lower bound) or to the ``nearest`` (``_refined_stage_dp`` checks the last two).

    ``f[s, j]``: the least time of the layers so far, the last one taking strategy ``s``, in at most ``j`` memory
    buckets. ``trans_cost`` is the (C, C) cost between (tp, sp) classes; the min over previous strategies is
    taken per class first, so one layer costs O(buckets x (S + C^2)) instead of O(buckets x S^2). Only the
    minima are kept going forward: the backtrack recomputes the argmins of the one bucket it visits per layer
    (``_dp_prev``) with numpy's first-index tie-breaking, so it picks what a full argmin table would.
    """
    if budget <= 0:
        return None
    bucket = budget / N_BUCKETS
    nb = N_BUCKETS + 1
    prep: dict[int, _DPKind] = {}
    fs: list[np.ndarray] = []  # f after each layer, (S + 1, nb)
    modes: list[int] = []  # how a layer took the min over the previous one: 0 first layer, 1 overall, 2 per class
    class_mins: list[np.ndarray | None] = []  # mode 2: the previous f's (C, nb) per-class minima, for the backtrack
    dks: list[_DPKind] = []
    prev_kind: _Kind | None = None
    minimum = np.minimum.reduce
    trans3 = trans_cost[:, :, None] if trans_cost is not None else None  # [previous class, class, bucket]
    g1 = np.empty(nb + 1)  # the min over the previous layer per bucket, +inf pad at nb
    g1[nb] = np.inf
    g1_head = g1[:nb]
    one_kind = len(kinds) > 0 and all(k is kinds[0] for k in kinds)
    if one_kind:
        hit = _all_fastest(kinds[0], len(kinds), bucket, inflight, trans_cost, rounding)
        if hit is not None:
            return hit
    if trans3 is not None and len(kinds) > 1 and one_kind:
        p = _DPKind(kinds[0], bucket, inflight, rounding)
        if p.min_w * len(kinds) > N_BUCKETS:
            return None  # not even the smallest strategy fits every layer
        if p.C > 1:
            return _stage_dp_one_kind_many([p], len(kinds), [trans_cost])[0]
        prep[id(kinds[0])] = p
    gc: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # per class count: (C, nb + 1) per-class minima, +inf pad
    for k in kinds:
        p = prep.get(id(k))
        if p is None:
            p = prep[id(k)] = _DPKind(k, bucket, inflight, rounding)
        mins = None
        if not fs:
            g1_head.fill(0.0)
            mode, f = 0, g1.take(p.J)
        elif trans3 is not None and prev_kind is k and p.C > 1:
            # per class the best previous strategy, then per class the best previous class plus the switch
            if p.C not in gc:
                g = np.empty((p.C, nb + 1))
                g[:, nb] = np.inf
                gc[p.C] = (g, g[:, :nb])
            g, g_head = gc[p.C]
            mins = minimum(fs[-1].take(p.cls_idx_t, axis=0), axis=0)  # (C, nb)
            minimum(mins[:, None, :] + trans3, axis=0, out=g_head)
            mode, f = 2, g.take(p.cls_at)
        else:
            minimum(fs[-1], axis=0, out=g1_head)
            mode, f = 1, g1.take(p.J)
        f += p.obj
        fs.append(f)
        modes.append(mode)
        class_mins.append(mins)
        dks.append(p)
        prev_kind = k
    if not fs:
        return 0.0, []
    last = fs[-1][:-1, N_BUCKETS]
    s = int(np.argmin(last))
    if not np.isfinite(last[s]):
        return None
    total = float(last[s])
    choice = [0] * len(kinds)
    j = N_BUCKETS
    for li in range(len(kinds) - 1, 0, -1):
        choice[li] = s
        p = dks[li]
        j -= int(p.w[s])
        s = _dp_prev(fs[li - 1][:, j], modes[li], p, s, trans_cost, class_mins[li], j)
    choice[0] = s
    return total, choice


def _stage_dp_many(items: list[tuple[Any, ...]]) -> list[tuple[float, list[int]] | None]:
    """``[_stage_dp(*item) for item in items]`` (item: kinds, budget, in-flight count, transitions[, rounding]), with the one-kind DPs of equal shape (layers, classes,
    class width) run side by side in one set of numpy operations: a layer of a rank DP is a few operations on arrays
    of a few thousand elements, whose per-call cost the ranks of one candidate then share. Each DP's elements see the
    same additions and minima as alone, so each answer is the one ``_stage_dp`` returns."""
    out: list[tuple[float, list[int]] | None] = [None] * len(items)
    groups: dict[tuple[int, int, int], list[tuple[int, _DPKind, np.ndarray]]] = {}
    for i, (kinds, budget, inflight, trans, *more) in enumerate(items):
        rounding = more[0] if more else "up"
        n = len(kinds)
        if budget <= 0 or trans is None or n < 2 or not all(k is kinds[0] for k in kinds):
            out[i] = _stage_dp(kinds, budget, inflight, trans, rounding)
            continue
        # _stage_dp's one-kind path, up to its kernel
        bucket = budget / N_BUCKETS
        hit = _all_fastest(kinds[0], n, bucket, inflight, trans, rounding)
        if hit is not None:
            out[i] = hit
            continue
        p = _DPKind(kinds[0], bucket, inflight, rounding)
        if p.min_w * n > N_BUCKETS:
            continue  # None: not even the smallest strategy fits every layer
        if p.C <= 1:
            out[i] = _stage_dp(kinds, budget, inflight, trans, rounding)
            continue
        groups.setdefault((n, p.C, p.cls_idx_t.shape[0]), []).append((i, p, trans))
    for (n, _, _), group in groups.items():
        for (i, _, _), res in zip(group, _stage_dp_one_kind_many([x[1] for x in group], n, [x[2] for x in group])):
            out[i] = res
    return out


def _stage_dp_one_kind_many(ps: list[_DPKind], n: int, transes: list[np.ndarray]) -> list[tuple[float, list[int]] | None]:
    """``_stage_dp`` for R DPs of ``n`` > 1 layers of one kind with transitions between its C > 1 classes (every rank
    of a dense model), all of the same shape (n layers, C classes, class width W), at once and without the general
    loop's per-layer dispatch. Every array has a leading DP axis (the gathers index a flattened (R, C, nb + 1) table).
    The layers between the first and the last are kept only class-major, ``fT[r, w, c, j] = f[r, idx_t[w, c], j]``
    (gathered straight from the per-class minima: the same sums as f's, so the same minima and, in class order, the
    same first-index argmins). The per-layer operands are contiguous (R, W, C, nb) and (R, C, C, nb) arrays, not
    broadcasts: the same additions, about twice as fast. R = 1 (one DP) takes views, not copies, of its tables."""
    R, C, nb = len(ps), ps[0].C, N_BUCKETS + 1
    minimum = np.minimum.reduce
    tabs = [p.one_kind() for p in ps]  # idx_t, at_t, obj_t, J_t, at_last
    if R == 1:
        at, obj, first_j = tabs[0][1][None], tabs[0][2][None], tabs[0][3][None]
    else:
        at = np.stack([t[1] + r * C * (nb + 1) for r, t in enumerate(tabs)])  # (R, W, C, nb) into g's flat index
        obj = np.stack([t[2] for t in tabs])
        first_j = np.stack([t[3] for t in tabs])
    trans_f = np.empty((R, C, C, nb))
    for r, tr in enumerate(transes):
        trans_f[r] = tr[:, :, None]
    buf = np.empty((R, C, C, nb))
    g = np.empty((R, C, nb + 1))
    g[:, :, nb] = np.inf
    g_head = g[:, :, :nb]
    g1 = np.zeros(nb + 1)
    g1[nb] = np.inf
    ft = g1.take(first_j)  # the first layer: 0 + obj where the strategy fits in j buckets
    ft += obj
    fts = [ft]
    class_mins: list[Any] = [None]
    for li in range(1, n):
        mins = minimum(ft, axis=1)
        np.add(mins[:, :, None, :], trans_f, out=buf)
        minimum(buf, axis=1, out=g_head)
        class_mins.append(mins)
        if li < n - 1:
            ft = g.take(at)
            ft += obj
            fts.append(ft)
    out: list[tuple[float, list[int]] | None] = []
    for r, (p, trans_cost, tab) in enumerate(zip(ps, transes, tabs)):
        last = g[r].take(tab[4])
        last += p.obj[:-1, 0]
        s = int(np.argmin(last))
        if not np.isfinite(last[s]):
            out.append(None)
            continue
        total = float(last[s])
        choice = [0] * n
        j = N_BUCKETS
        w, cls, idx_t = p.w.tolist(), p.cls.tolist(), tab[0]
        for li in range(n - 1, 0, -1):
            choice[li] = s
            j -= w[s]
            c = int((class_mins[li][r, :, j] + trans_cost[:, cls[s]]).argmin())
            s = int(idx_t[fts[li - 1][r, :, c, j].argmin(), c])
        choice[0] = s
        out.append((total, choice))
    return out


def _dp_prev(col: np.ndarray, mode: int, p: _DPKind, s: int, trans_cost: np.ndarray | None,
             mins: np.ndarray | None, j: int) -> int:
    """The previous layer's strategy on the optimal path into strategy ``s`` (``col``: the previous f at the
    bucket ``j`` the path leaves it; ``mins``: the forward pass's per-class minima of that f): the argmins behind
    the forward pass's minima, in the same order (first class, then first strategy inside it)."""
    if mode == 1:
        return int(col.argmin())
    c = int((mins[:, j] + trans_cost[:, p.cls[s]]).argmin())
    row = p.cls_idx[c]
    return int(row[col.take(row).argmin()])


def _transition_matrix(kind: _Kind, cfg: ModelConfig, tokens: float, hw: cm.Hardware, m_eff: float,
                       memo: Optional[dict[tuple, float]] = None) -> np.ndarray:
    """(C, C) seconds per step for changing (tp, sp) class between consecutive layers of this kind
    (``memo``: the search's redistribution times per (tokens, from, to), shared by its candidates)."""
    memo = {} if memo is None else memo
    C = len(kind.tpsp)
    out = np.zeros((C, C))
    for a in range(C):
        for b in range(C):
            key = (tokens, kind.tpsp[a], kind.tpsp[b])
            if key not in memo:
                memo[key] = cm.redistribution_s(tokens, cfg, kind.tpsp[a], kind.tpsp[b], hw)
            out[a, b] = m_eff * memo[key]
    return out


def _compress(strategies: list[LayerStrategy]) -> list[LayerStrategy]:
    """Plan.compress without the JSON keys (fast path for the search loop)."""
    out: list[LayerStrategy] = []
    keys: list[tuple] = []
    prev = None
    for s in strategies:
        if s is prev:  # the search hands out one object per strategy: the same object is the same key
            out[-1].repeat += 1
            continue
        k = _skey(s)
        if keys and keys[-1] == k:
            out[-1].repeat += 1
        else:
            out.append(s.with_repeat(1))
            keys.append(k)
        prev = s
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


def _check_request(cfg: ModelConfig, seq_len: int, global_batch: int, c: Constraints, world: int) -> list[int]:
    """One-line errors for a request no layout can satisfy; returns the pipeline degrees to try."""
    c.validate()
    if seq_len < 1 or global_batch < 1:
        raise invalid("seq-len" if seq_len < 1 else "global-batch", seq_len if seq_len < 1 else global_batch, "a positive integer")
    if seq_len > cfg.max_seq_len:
        raise invalid("seq-len", seq_len, f"at most the model's max_seq_len={cfg.max_seq_len}")
    if global_batch > MAX_GLOBAL_BATCH:  # 10^11 hung enumerating micro-batch sizes
        raise invalid("global-batch", global_batch, f"at most {MAX_GLOBAL_BATCH:,} sequences (as TrainConfig)")
    _check_fixed_degrees(cfg, global_batch, c, world)
    cp = c.cp or 1
    if cp > 1 and c.runtime_compatible:
        raise invalid("cp", cp, "1 for layouts meshwright's runtime runs (context parallelism is planned and exported "
                      "only: add --any-runtime)")
    if cp > 1 and seq_len % (2 * cp):
        raise invalid("cp", cp, f"a degree with seq_len={seq_len} divisible by 2*cp (ring attention splits each sequence into 2*cp chunks)")
    pps = [p for p in divisors(world) if p <= cfg.n_layers]
    if c.pp is not None:
        if c.pp not in pps:
            raise invalid("pp", c.pp, f"a divisor of world size {world} no larger than n_layers={cfg.n_layers}: {pps}")
        pps = [c.pp]
    return pps


def check_virtual_stages(cfg: ModelConfig, world: int, c: Constraints) -> None:
    """``--virtual-stages`` is the chunk count of interleaved 1F1B (``_schedules``); where no pipeline can take it,
    the search dropped it without a word: with --schedule gpipe/1f1b, with 1 under interleaved_1f1b, or deeper
    than n_layers/pp for every pipeline degree (only pp=1 plans were left, the pipelines reported as "out of
    memory"). Called on the user's own constraints, before an --emit target narrows the schedules."""
    v = c.virtual_stages
    if v is None:
        return
    if c.schedule in ("gpipe", "1f1b"):
        raise invalid("virtual-stages", v, f"used only with --schedule interleaved_1f1b (or no --schedule); "
                      f"{c.schedule} runs one model chunk per rank")
    if v < 2 and c.schedule == "interleaved_1f1b":
        raise invalid("virtual-stages", v, "at least 2 model chunks per rank with --schedule interleaved_1f1b")
    pps = [p for p in divisors(world) if 1 < p <= cfg.n_layers and (c.pp is None or p == c.pp)]
    deepest = max((cfg.n_layers // p for p in pps), default=0)
    if v > 1 and v > deepest:
        valid = (f"at most {deepest} (pp x virtual-stages <= n_layers={cfg.n_layers} for pp={min(pps)})" if deepest > 1
                 else "none here: interleaving needs a pipeline degree pp > 1 with pp x virtual-stages <= "
                      f"n_layers={cfg.n_layers} (world size {world}" + (f", --pp {c.pp}" if c.pp is not None else "") + ")")
        raise invalid("virtual-stages", v, valid)


def _check_fixed_degrees(cfg: ModelConfig, global_batch: int, c: Constraints, world: int) -> None:
    """A fixed degree no layout can take is named here, not reported later as "no layout fits in memory"."""
    if c.tp is not None:
        tps = [d for d in divisors(world) if cfg.n_heads % d == 0 and cfg.kv_heads % d == 0]
        if c.tp not in tps:
            raise invalid("tp", c.tp, f"a divisor of n_heads={cfg.n_heads}, n_kv_heads={cfg.kv_heads} and the world "
                          f"size {world}: {tps}")
    if c.dp is not None and world % c.dp:
        raise invalid("dp", c.dp, f"a divisor of the world size {world}: {divisors(world)}")
    if c.micro_batch is not None and global_batch % c.micro_batch:
        raise invalid("micro-batch", c.micro_batch, f"a divisor of global-batch={global_batch}")
    if c.ep is not None and c.ep > 1:
        if not cfg.n_experts:
            raise invalid("ep", c.ep, f"1 (model {cfg.name} has no experts)")
        if cfg.n_experts % c.ep:
            raise invalid("ep", c.ep, f"a divisor of n_experts={cfg.n_experts}: {divisors(cfg.n_experts)}")
    if c.sp and c.tp == 1:
        raise invalid("sp", c.sp, "off with tp=1 (sequence parallelism splits over the tp group)")


def _schedules(cfg: ModelConfig, c: Constraints, pp: int, m: int) -> list[tuple[str, int]]:
    """(schedule, virtual stages) to try for ``pp`` stages and ``m`` microbatches."""
    if pp == 1:
        return [("1f1b", 1)]
    scheds: list[tuple[str, int]] = []
    if c.schedule in (None, "1f1b"):
        scheds.append(("1f1b", 1))
    if c.schedule == "gpipe":
        scheds.append(("gpipe", 1))
    if c.schedule in (None, "interleaved_1f1b"):
        for v in ([c.virtual_stages] if c.virtual_stages else _interleave_depths(cfg.n_layers, pp)):
            if v > 1 and m % pp == 0 and cfg.n_layers >= pp * v:
                scheds.append(("interleaved_1f1b", v))
    return scheds


@dataclass
class _Collector:
    """Feasible candidates and rejections gathered over the outer loop, and the step time a candidate must beat to
    enter the result's ``top`` distinct layouts (``bar``: infinite until there are that many)."""

    top: int = 1
    feasible: list[Candidate] = dataclasses.field(default_factory=list)
    rejected: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    candidates: int = 0
    skipped: int = 0  # outer candidates skipped on their step-time lower bound
    solved: dict[tuple, "_Solved"] = dataclasses.field(default_factory=dict)  # the answers of _warm_start's candidates
    best_by_layout: dict[str, float] = dataclasses.field(default_factory=dict)
    bar: float = math.inf

    def fastest_s(self) -> float:
        """The fastest plan kept so far (inf before any)."""
        return min(self.best_by_layout.values(), default=math.inf)

    def add(self, item: Candidate) -> None:
        """Keep a feasible candidate; lower ``bar`` when it enters the fastest ``top`` distinct layouts."""
        self.feasible.append(item)
        t = item.prediction.step_s
        if t >= self.bar:
            return  # it cannot move the bar (a layout already kept at t or faster stays where it is)
        key = describe_layout(item.plan)
        if t < self.best_by_layout.get(key, math.inf):
            self.best_by_layout[key] = t
            if len(self.best_by_layout) >= self.top:
                self.bar = heapq.nsmallest(self.top, self.best_by_layout.values())[-1]


_BOUND_SLACK = 1e-9  # relative: the bound adds the same terms as evaluate_plan, in another order


def _step_lower_bound(o: _Outer) -> float:
    """A lower bound on ``evaluate_plan``'s step time of every plan outer candidate ``o`` can produce: each layer
    at its fastest strategy per microbatch and its smallest per-step term, whatever their memory (the DPs only
    choose slower or equal ones); the head at its cheapest tensor-parallel split and fewest tokens, the stage
    boundaries at their smallest transfer; then the pipeline schedule of ``evaluate_plan`` over the ranks of each
    stage partition (the step grows with every rank's time), the smallest over partitions. On the first rank, whose
    in-flight activations are the most, its layers must also fit: the linear relaxation of its share of the step
    within its bytes (``_first_rank_lp``; +inf where not even its smallest strategies fit). Redistribution between
    classes, framework terms of the ends and embedding traffic only add time and are left out. 0 where a kind has
    no strategy (the solve reports it)."""
    cfg, hw, pp, memo = o.cfg, o.hw, o.pp, o.memo
    flags = memo.moe_flags(cfg)
    per_kind: dict[bool, tuple[float, float, int, list[tuple[int, bool, int]]]] = {}
    for i, key in enumerate(flags):
        if key not in per_kind:
            vec = _vectors(o, i)
            if not vec.strategies:
                return 0.0
            per_kind[key] = vec.bound_terms()
    if len(per_kind) == 1:  # one kind of layer: the same lists as the comprehensions build
        mb_min, step_min = [per_kind[flags[0]][0]] * len(flags), [per_kind[flags[0]][1]] * len(flags)
    else:
        mb_min = [per_kind[key][0] for key in flags]
        step_min = [per_kind[key][1] for key in flags]
    # the head: evaluate_plan's head tokens are mb * seq * max_dp / (dp * cp) of the last layer's strategy (fewest at
    # the largest dp * cp) and its tp is 1 or the smallest layer tp (one of o.tps)
    head_tokens = o.mb * o.seq_len * o.max_dp / per_kind[flags[-1]][2]
    hkey = ("head", head_tokens, tuple(o.tps))
    head = memo.bound_parts.get(hkey)
    if head is None:
        head = memo.bound_parts[hkey] = min(cm.head_s(cfg, head_tokens, e, hw) + cm.loss_s(cfg, head_tokens, e, hw)
                                            for e in sorted({1, *o.tps}))
    v = o.v if o.sched == "interleaved_1f1b" else 1
    p2p = 0.0
    if pp > 1:  # evaluate_plan's boundary transfer: the first layer's (tp, sp, cp), at least o.mb sequences
        cross = o.per_stage >= hw.devices_per_node
        pkey = ("p2p", o.mb, cross, tuple(per_kind[flags[0]][3]))
        p2p = memo.bound_parts.get(pkey)
        if p2p is None:
            p2p = memo.bound_parts[pkey] = min(cm.pp_p2p_s(o.mb * o.seq_len / cp, cfg, tp, sp, hw, cross)
                                               for tp, sp, cp in per_kind[flags[0]][3])
        p2p *= v
    head_layers = memo.bound_parts.get("head_layers")
    if head_layers is None:
        head_layers = memo.bound_parts["head_layers"] = (cm.head_fwd_flops(cfg, 1.0)
                                                         / cm.layer_fwd_flops(cfg, 0, 1.0, o.seq_len))
    slow = hw.pipeline_slowdown if pp > 1 else 1.0
    room = _first_rank_room(o, head_tokens)
    best = math.inf
    pkey = ("partitions", pp, o.v)
    partitions = memo.bound_parts.get(pkey)
    if partitions is None:
        partitions = memo.bound_parts[pkey] = _partitions(cfg, pp, o.v, head_layers, False)
    sums: dict[Any, tuple[float, float]] = {}  # per stage (per stage length where every layer is of one kind)
    for stages in partitions:
        rank_mb, rank_step = [0.0] * pp, [0.0] * pp
        for j, (a, b) in enumerate(stages):
            skey = b - a if len(per_kind) == 1 else (a, b)
            got = sums.get(skey)
            if got is None:
                got = sums[skey] = (sum(mb_min[a:b]), sum(step_min[a:b]))
            rank_mb[j % pp] += got[0]
            rank_step[j % pp] += got[1]
        rank_mb[-1] += head
        rank_mb = [x + p2p for x in rank_mb]
        coupled = 0.0
        if room is not None:
            # the first rank's layers must fit: the linear relaxation of its time as the step charges it (m x its
            # per-microbatch time, as the slowest rank at least, plus its per-step term) within the bytes it has at
            # most; the other ranks' share of fill and drain at their fastest
            inflight = cm.inflight_microbatches(o.sched, pp, 0, o.m, v)
            lp = _first_rank_lp(o, _first_rank_counts(o, stages), inflight, room, o.m * slow)
            rest = sum(rank_mb) - max(rank_mb)
            coupled = lp + o.m * slow * (p2p + (head if pp == 1 else 0.0)) + slow * rest / v / max(hw.contention, 1.0)
        step = cm.pipeline_step_s(rank_mb, o.m, o.sched, v, hw.contention) * slow
        best = min(best, max(step + max(rank_step), coupled))
    return best * (1 - _BOUND_SLACK)


def _first_rank_counts(o: _Outer, stages: list[list[int]]) -> dict[bool, int]:
    """How many layers of each kind the first pipeline rank holds under ``stages`` (memoised per search), in the order
    of the first rank's layers."""
    key = ("first counts", o.pp, tuple(map(tuple, stages)))
    got = o.memo.bound_parts.get(key)
    if got is None:
        flags = o.memo.moe_flags(o.cfg)
        got = {}
        for j, (a, b) in enumerate(stages):
            if j % o.pp == 0:
                for i in range(a, b):
                    got[flags[i]] = got.get(flags[i], 0) + 1
        o.memo.bound_parts[key] = got
    return got


def _first_rank_room(o: _Outer, head_tokens: float) -> Optional[float]:
    """The most bytes the first pipeline rank's blocks may hold in a plan that fits (``evaluate_plan``: the rank's
    states, in-flight activations, transient and loss buffers, with framework overhead, within the device), less the
    least its embedding (and, with one stage, the head's loss buffers) takes at any tp and ZeRO level a plan may
    give them. None where ``evaluate_plan`` may count the memory otherwise (no gradients at the peak: one stage,
    one microbatch)."""
    hw, cfg = o.hw, o.cfg
    if o.pp == 1 and o.m == 1 and hw.grads_set_to_none:
        return None
    last = o.pp == 1
    key = (o.per_stage, tuple(o.tps), o.states, last, head_tokens if last else None)
    got = o.memo.rooms.get(key)
    if got is not None:
        return got
    ends = math.inf
    for e in sorted({1, *o.tps}):
        dp = o.per_stage // e
        emb = min(cm.embedding_static_bytes(cfg, True, last, e, dp, z if dp > 1 else 0, o.states, hw) for z in range(4))
        ends = min(ends, emb + (cm.loss_peak_bytes(cfg, head_tokens, e, hw) if last else 0.0))
    got = o.memo.rooms[key] = o.usable * (1 + 1e-9) - ends
    return got


def _first_rank_lp(o: _Outer, counts: dict[bool, int], inflight: float, room: float, a: float) -> float:
    """``_lp`` of ``a`` x per-microbatch time + per-step time over the first rank's layers (``counts`` per kind)
    within ``room`` bytes at ``inflight`` microbatches (+inf where the smallest footprints do not fit). Separate
    relaxations of the two times skipped no more candidates on the 1,024-GPU searches, at three times the cost."""
    flags = o.memo.moe_flags(o.cfg)
    groups = []
    for key, n in counts.items():
        vec = _vectors(o, flags.index(key))
        groups.append((vec.lp_kind(a, lambda: a * vec.mb_s + vec.step_s), n))
    return _lp(groups, room, inflight, None)


def _candidate_key(o: _Outer) -> tuple:
    """What tells one outer candidate of a search from another."""
    return (o.states, o.pp, o.t_base, o.mb, o.sched, o.v)


def _bound_of(o: _Outer) -> float:
    """``_step_lower_bound``, once per candidate and search."""
    key = _candidate_key(o)
    got = o.memo.bounds.get(key)
    if got is None:
        got = o.memo.bounds[key] = _step_lower_bound(o)
    return got


def _keep(items: list[Any], out: _Collector) -> None:
    """Plans into ``out`` (``out.add``), rejections into its list."""
    for item in items:
        if isinstance(item, Candidate):
            out.add(item)
        else:
            out.rejected.append(item)


WARM_START = 4  # candidates solved ahead of the loops, least lower bound first
# and up to this many while the bar is more than WARM_BAR x the fastest plan found: the first four candidates often
# give fewer than ``top`` good layouts (GPT-1T on 1,024 H100, every saver: the fifth took 79 s against 32 s for the
# best, so the loops solved 50 candidates of pp <= 16 before its own plans lowered the bar; mixtral-8x7b: four
# layouts, no bar at all)
WARM_START_MAX = 12
WARM_BAR = 1.05


def _warm_start(bases: list[tuple[_Outer, int]], out: _Collector) -> None:
    """Solve first the few candidates most likely to be the fastest (the least lower bounds among every pipeline
    degree's, smallest tp's and schedule's at its smallest micro-batch), so that ``out.bar`` is near its final value
    before the loops start and their skipping by the bound bites from the first pipeline degree on: ``WARM_START``
    of them, and more (up to ``WARM_START_MAX``) while the bar is still well above the fastest plan found. The loops
    reuse these answers where they reach them; plans of candidates they would not reach are kept too."""
    cands = []
    for base, per_replica in bases:
        mbs = _micro_batch_sizes(base.c, per_replica)
        if not mbs:
            continue
        b = dataclasses.replace(base, mb=mbs[0], m=per_replica // mbs[0])
        for sched, v in _schedules(b.cfg, b.c, b.pp, b.m):
            o = dataclasses.replace(b, sched=sched, v=v)
            cands.append((_bound_of(o), len(cands), o))
    cands.sort()
    for n, (bound, _, o) in enumerate(cands):
        if bound > out.bar or n >= WARM_START_MAX or (n >= WARM_START and out.bar <= WARM_BAR * out.fastest_s()):
            break
        out.candidates += 1
        # every refined DP runs (the gate's best so far is the loops' to set): where the loops reach the candidate,
        # they read it as if solved then (``_Solved.view``); its other plans stay in the result
        solved = out.solved[_candidate_key(o)] = _solve_candidate(o, refine_all=True)
        _keep(solved.items, out)


def _micro_batch_sizes(c: Constraints, per_replica: int) -> list[int]:
    """Micro-batch sizes tried for ``per_replica`` sequences per model replica, ascending."""
    mbs = [b for b in divisors(per_replica) if b <= 64]
    return [b for b in mbs if b == c.micro_batch] if c.micro_batch is not None else mbs


def _try_micro_batch(base: _Outer, out: _Collector) -> tuple[Optional[float], Optional[float]]:
    """Every schedule for one (pp, tp, micro-batch): the best step time found (None when nothing solved fits) and
    the smallest lower bound of the schedules skipped on it (None when none was). A skipped schedule's outcome is
    unknown: the loops here and in ``_try_micro_batches`` then go on where it might have let them, so the search
    solves at least the candidates it would have solved without the bound, less the skipped ones."""
    best: Optional[float] = None
    skipped: Optional[float] = None
    prev_depth: Optional[float] = None  # best time of the previous interleaving depth
    for sched, v in _schedules(base.cfg, base.c, base.pp, base.m):
        depth_best, unknown = _try_schedule(dataclasses.replace(base, sched=sched, v=v), out)
        if depth_best is not None:
            best = depth_best if best is None else min(best, depth_best)
        if unknown is not None:
            skipped = unknown if skipped is None else min(skipped, unknown)
        if sched == "interleaved_1f1b" and base.c.virtual_stages is None:
            # deeper interleaving only shrinks the bubble further: stop once a depth stops helping (or fits nothing)
            if unknown is None:
                if depth_best is None or (prev_depth is not None and depth_best >= prev_depth):
                    break
                prev_depth = depth_best
            elif prev_depth is not None and unknown >= prev_depth:
                break  # skipped, but at least as slow as the depth before: the rule stops here either way
            # else unknown: go deeper, with the previous depth's time to beat
    return best, skipped


def _try_schedule(o: _Outer, out: _Collector) -> tuple[Optional[float], Optional[float]]:
    """One outer candidate: its best step time (None where no plan fits or it was not solved) and, where it was
    skipped on its bound, that bound (its time is unknown, at least that). A candidate solved ahead (``_warm_start``)
    is read as if solved now; one whose bound is +inf is known not to fit (None, None)."""
    solved = out.solved.get(_candidate_key(o))  # solved ahead: its plans are kept already
    if solved is None:
        out.candidates += 1
        bound = _bound_of(o) if out.bar < math.inf else 0.0
        if bound > out.bar:  # no plan of it can enter the result
            out.skipped += 1
            if bound == math.inf:
                out.rejected.append({"layout": o.label(), "reason": "skipped: out of memory (the first pipeline "
                                     "rank's smallest strategies alone exceed the budget)"})
                return None, None
            out.rejected.append({"layout": o.label(), "reason": f"skipped: none of its plans is faster than {bound:.4g} s "
                                 f"(lower bound); the {out.top} fastest layouts found take at most {out.bar:.4g} s"})
            return None, bound
        items = _solve_candidate(o).items
        _keep(items, out)
    else:
        items = solved.view(o.memo.best_step_s)
    _note_best(o, items)
    return min((x.prediction.step_s for x in items if isinstance(x, Candidate)), default=None), None


def _try_micro_batches(base: _Outer, per_replica: int, out: _Collector) -> None:
    """Micro-batch sizes ascending for one (pp, smallest tp). Larger micro-batches only add activation memory:
    once one is out of memory, or two in a row did not beat the best so far, the larger ones are not tried
    (recorded as pruned)."""
    c, pp, t_base = base.c, base.pp, base.t_base
    mbs = _micro_batch_sizes(c, per_replica)
    best_mb_time: Optional[float] = None
    worse = 0
    for mb in mbs:
        if worse >= 2:
            out.rejected.append({"layout": f"pp={pp} tp>={t_base} mb>={mb}", "reason": "pruned: larger micro-batches stopped helping"})
            break
        mb_best, skipped = _try_micro_batch(dataclasses.replace(base, mb=mb, m=per_replica // mb), out)
        if mb_best is None and skipped is None:
            if c.micro_batch is None and mb != mbs[-1]:
                out.rejected.append({"layout": f"pp={pp} tp>={t_base} mb>{mb}", "reason": f"pruned: mb={mb} is already out of memory"})
            break
        if skipped is None:
            if best_mb_time is None or mb_best < best_mb_time * (1 - 1e-3):
                best_mb_time, worse = mb_best, 0
            else:
                worse += 1
            continue
        # a schedule was skipped: this micro-batch's best lies between the bound and what was solved (maybe out of
        # memory): it counts as better where it may be, and the time to beat rises rather than falls
        low = skipped if mb_best is None else min(mb_best, skipped)
        if best_mb_time is None or low < best_mb_time * (1 - 1e-3):
            worse = 0
            if mb_best is not None:
                best_mb_time = mb_best if best_mb_time is None else max(best_mb_time, mb_best)
        else:
            worse += 1


def _tp_bases(base: _Outer, out: _Collector) -> list[tuple[_Outer, int]]:
    """Every smallest-tp choice for one pipeline degree (``base.pp``) and optimizer-state format, with its sequences
    per model replica; what rules the degree or a tp out goes to ``out.rejected``."""
    cfg, c, pp, cp, world = base.cfg, base.c, base.pp, base.cp, base.cluster.world_size
    reject = out.rejected.append
    if pp > 1 and cfg.tie_embeddings and c.runtime_compatible:
        reject({"layout": f"pp={pp}", "reason": "meshwright's runtime runs tied embeddings with pp=1 only"})
        return []
    per_stage = world // pp
    if per_stage % cp:
        reject({"layout": f"pp={pp} cp={cp}", "reason": f"cp={cp} does not divide {per_stage} devices per stage"})
        return []
    tps = tp_choices(cfg, per_stage // cp, base.seq_len)
    if c.runtime_compatible and c.zero == 1:  # meshwright's ZeRO-1: every layer tp=1 (``layer_strategies``)
        tps = [t for t in tps if t == 1]
    if c.tp is not None:
        if c.tp not in tps:
            reject({"layout": f"pp={pp} tp={c.tp}", "reason": f"tp={c.tp} does not divide heads/FFN/{per_stage} devices"})
            return []
        tps = [c.tp]
    if c.dp is not None:
        tps = [t for t in tps if per_stage // (t * cp) == c.dp]
    bases = []
    for t_base in tps:
        max_dp = per_stage // (t_base * cp)
        if base.global_batch % max_dp:
            continue
        allowed_tps = [t for t in tps if t >= t_base][:3]
        bases.append((dataclasses.replace(base, per_stage=per_stage, tps=allowed_tps, t_base=t_base, max_dp=max_dp),
                      base.global_batch // max_dp))
    return bases


def _result(out: _Collector, top: int, budget: float, t0: float) -> SearchResult:
    """Distinct layouts, fastest first; rejections closest-to-fitting first."""
    keyed = sorted(((x.prediction.step_s, describe_layout(x.plan)), i) for i, x in enumerate(out.feasible))
    uniq: list[Candidate] = []
    seen = set()
    for (_, key), i in keyed:  # fastest first, then by layout (the index only breaks exact ties: the stable order)
        if key not in seen:
            seen.add(key)
            uniq.append(out.feasible[i])
    for x in uniq[:max(top, 1)]:
        x.plan.predicted = x.prediction.to_dict()
    rejected = sorted(out.rejected, key=lambda r: ("need_gib" not in r, r.get("need_gib", 0.0), r["layout"]))
    result = SearchResult(best=uniq[0] if uniq else None, runners_up=uniq[1:top], rejected=rejected,
                          search_s=time.perf_counter() - t0, candidates=out.candidates, budget_gib=budget / cm.GIB,
                          skipped=out.skipped)
    if not uniq:
        needs = [r["need_gib"] for r in rejected if "need_gib" in r]
        result.min_memory_gib = min(needs) if needs else None
    return result


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic collector off while the candidates are solved, back on as it was after.

    The search makes no reference cycles (its memos, kinds and plans are freed by reference counting), but it
    keeps tens of thousands of memo objects alive while it runs, and their promotion triggers full collections
    that walk every object of the process (~0.1 s each with torch imported, at least one per large search)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def search(cfg: ModelConfig, cluster: ClusterSpec, seq_len: int, global_batch: int,
           hw: Optional[cm.Hardware] = None, constraints: Optional[Constraints] = None,
           allow: Optional[Allow] = None, states: Optional[str] = None, top: int = 5,
           progress: bool = False, suggest: bool = True) -> SearchResult:
    """Search plans for ``cfg`` on ``cluster`` (its nodes x devices_per_node ranks): pipeline degree and
    optimizer-state format outside (``_tp_bases``), then smallest tp, micro-batch and schedule, then the
    per-rank DPs (``_solve_candidate``)."""
    t0 = time.perf_counter()
    c = constraints or Constraints()
    allow = allow or Allow()
    hw = hw or cm.hardware_from_cluster(cluster)
    if _outside_stack(hw.stack, c, cfg):  # only the layouts the stack runs (Stack.runs)
        from meshwright.launcher.planner.export.stacks import search_for_stack

        return search_for_stack(hw.stack, cfg, cluster, seq_len, global_batch, hw, c, top=top)
    if _whole_model_zero1(c):
        # meshwright's ZeRO-1 is all or nothing (one ZeroRedundancyOptimizer per stage: every layer tp=1 and ZeRO-1,
        # parallel/support.py), which the per-layer choices cannot express: search it as a constraint set of its own
        # beside the per-layer search (ZeRO-0/2/3), as search_for_stack does for a stack's sets, and keep the best
        layers, zero1 = (_search(cfg, cluster, seq_len, global_batch, hw, dataclasses.replace(c, zero=z), allow, states,
                                 top, progress, t0) for z in (None, 1))
        zero1.rejected = [{**r, "layout": f"{r['layout']} ZeRO-1 (all layers)"} for r in zero1.rejected]
        result = _union([layers, zero1], top, t0)
    else:
        result = _search(cfg, cluster, seq_len, global_batch, hw, c, allow, states, top, progress, t0)
    if result.best is None and suggest:
        result.suggestion = _suggest(cfg, cluster, seq_len, global_batch, hw, c, allow)
        result.search_s = time.perf_counter() - t0
    return result


def _search(cfg: ModelConfig, cluster: ClusterSpec, seq_len: int, global_batch: int, hw: cm.Hardware,
            c: Constraints, allow: Allow, states: Optional[str], top: int, progress: bool, t0: float) -> SearchResult:
    """``search`` over one constraint set (the per-layer search: every layer its own strategy)."""
    allow = dataclasses.replace(allow, fp8_gemm=allow.fp8 and cm.fp8_matmul_speedup(hw) > 1)
    if cfg.gemma_fields():  # what the runtime refuses for Gemma (memory/fp8_activations.py, memory/lemo.py): never planned
        allow = dataclasses.replace(allow, fp8_act=False, lemo=None)
    pps = _check_request(cfg, seq_len, global_batch, c, cluster.world_size)
    state_opts = [states] if states else (["fp32", "fp8"] if allow.fp8 else ["fp32"])
    usable = (hw.memory_bytes - hw.overhead_bytes - hw.stack_buffer_bytes) / (1 + hw.fragmentation)
    model_name = cfg.name if cfg.name != "custom" else to_dict(cfg)
    from tqdm import tqdm

    with _gc_paused():
        out = _Collector(top=max(top, 1))
        # per (optimizer-state format, pipeline degree): its smallest-tp choices; a stack whose pipeline engine keeps
        # other model states (cm.for_pipeline) costs pp>1 on its own Hardware, with memos of its own
        memos: dict[bool, _SearchMemo] = {}
        bases, memo = [], None
        for st, pp in itertools.product(state_opts, pps):
            h = cm.for_pipeline(hw, pp)
            memo = memos.setdefault(h.pipelined, _SearchMemo())
            bases.append(_tp_bases(_Outer(cfg, cluster, h, c, allow, st, pp, 0, [], 0, 0, 0, 0, "1f1b", 1, seq_len,
                                          global_batch, usable, model_name, c.cp or 1, memo), out))
        _warm_start([b for per_pp in bases for b in per_pp], out)
        for per_pp in tqdm(bases, desc="plan search", unit="pp", disable=not progress, leave=False):
            for tp_base, per_replica in per_pp:
                _try_micro_batches(tp_base, per_replica, out)
        for m in memos.values():
            _refine_deferred(m, out)
        del memo, memos  # freed before the collector is back on: it then has only the result's objects to walk
        result = _result(out, top, hw.memory_bytes, t0)
        del out
    return result


def _whole_model_zero1(c: Constraints) -> bool:
    """Whether a runtime-compatible search also plans meshwright's whole-model ZeRO-1 (``Constraints.zero`` left to
    the search, tp free to be 1 everywhere): ``search`` then runs the per-layer search (``layer_strategies`` keeps it
    to ZeRO-0/2/3 there) and the ZeRO-1 set (``zero=1``: tp=1 everywhere, ``_tp_bases``) and takes the union."""
    return c.runtime_compatible and c.zero is None and c.tp in (None, 1)


def _union(results: list[SearchResult], top: int, t0: float) -> SearchResult:
    """One SearchResult of searches over disjoint constraint sets: their plans fastest first (distinct layouts, as
    ``_result`` orders them), their rejections, candidates and skipped counts summed, the smallest need."""
    found = sorted((x for r in results for x in ([r.best] if r.best else []) + list(r.runners_up)),
                   key=lambda x: (x.prediction.step_s, describe_layout(x.plan)))
    uniq: list[Candidate] = []
    seen = set()
    for x in found:
        key = describe_layout(x.plan)
        if key not in seen:
            seen.add(key)
            uniq.append(x)
    rejected = sorted((r for res in results for r in res.rejected),
                      key=lambda r: ("need_gib" not in r, r.get("need_gib", 0.0), r["layout"]))
    needs = [r.min_memory_gib for r in results if r.min_memory_gib is not None]
    return SearchResult(best=uniq[0] if uniq else None, runners_up=uniq[1:top], rejected=rejected,
                        search_s=time.perf_counter() - t0, candidates=sum(r.candidates for r in results),
                        budget_gib=results[0].budget_gib, skipped=sum(r.skipped for r in results),
                        min_memory_gib=None if uniq or not needs else min(needs))


def _outside_stack(stack: str, c: Constraints, cfg: ModelConfig) -> bool:
    """Whether ``c`` admits layouts ``stack`` does not run (``Stack.runs``): the search then runs once per constraint
    set of the stack (export/stacks.py ``search_for_stack``), each of which lies inside it."""
    from meshwright.launcher.planner.export.stacks import restricts, stack_constraints

    return restricts(stack) and dataclasses.replace(c, runtime_compatible=False) not in stack_constraints(stack, c, cfg)


@dataclass
class _Outer:
    """One outer candidate (pp, smallest tp, micro-batch, schedule, optimizer states) and its fixed inputs."""

    cfg: ModelConfig
    cluster: ClusterSpec
    hw: cm.Hardware
    c: Constraints
    allow: Allow
    states: str
    pp: int
    per_stage: int
    tps: list[int]  # tp degrees the layers may take (>= t_base)
    t_base: int
    max_dp: int
    mb: int
    m: int  # microbatches per step
    sched: str
    v: int  # virtual stages
    seq_len: int
    global_batch: int
    usable: float  # bytes the DP may fill (budget less framework overhead and headroom)
    model_name: Any
    cp: int = 1  # context-parallel degree: per_stage = tp * dp * cp
    memo: _SearchMemo = dataclasses.field(default_factory=_SearchMemo)  # shared by every candidate of one search

    @property
    def m_eff(self) -> float:
        """Microbatch-times a layer's cost is paid per step (steady state + its share of fill/drain)."""
        return self.m + (self.pp - 1) / self.v if self.pp > 1 else self.m

    @property
    def tokens(self) -> int:
        return self.mb * self.seq_len

    @property
    def emb_tp(self) -> int:
        return 1 if self.c.runtime_compatible or self.cfg.vocab_size % self.t_base else self.t_base

    def label(self) -> str:
        v = f" v={self.v}" if self.v > 1 else ""
        return f"pp={self.pp} tp>={self.t_base} mb={self.mb} {self.sched}{v}{' fp8-states' if self.states == 'fp8' else ''}"


class _KindTable:
    """Cost vectors per layer kind (dense/MoE) for one outer candidate, built on first use, and their variants
    with the strategies whose transient memory exceeds a level masked out (infinite cost). A layer's kind key is
    ``flags[i]`` (is it an MoE layer); per-rank work runs on these keys, once per kind rather than per layer."""

    def __init__(self, o: _Outer) -> None:
        self.o = o
        self.flags = o.memo.moe_flags(o.cfg)
        self.kinds: dict[bool, _Kind] = {}
        self.trans: dict[bool, np.ndarray] = {}
        self.fastest: dict[bool, float] = {}  # each kind's fastest strategy time
        self.masked: dict[tuple[bool, float, float], tuple[_Kind, float]] = {}
        self.at_level: dict[tuple[bool, float], tuple[np.ndarray, np.ndarray, dict[str, Any]]] = {}  # capped's obj
        self.levels: dict[tuple, list[float]] = {}
        self.rank_results: dict[tuple, Any] = {}  # _rank_dp per (kind keys, in-flight, first, last): all partitions
        self.first_dps: dict[tuple, Any] = {}  # _rank_dp's DPs per (kind keys, budget, in-flight, level), run ahead
        self.extras: dict[tuple[bool, bool], tuple[float, float]] = {}  # _rank_extra_bytes per (first, last): 1, lowest
        self.next_levels: dict[tuple, list[float]] = {}  # _next_levels per (kind keys, budget, in-flight)

    def kind(self, i: int) -> _Kind:
        o, key = self.o, self.flags[i]
        if key not in self.kinds:
            k = self.kinds[key] = _vectors(o, i).kind(o.m_eff)
            self.trans[key] = _transition_matrix(k, o.cfg, o.tokens * o.max_dp, o.hw, o.m_eff, o.memo.redistribution)
            if len(k.obj):
                self.fastest[key] = float(k.obj.min())
        return self.kinds[key]

    def rank_kinds(self, layers: list[int]) -> tuple[tuple[bool, ...], dict[bool, _Kind]]:
        """The kind key of each of ``layers`` and the kinds they use (built on first use)."""
        keys = tuple(self.flags[i] for i in layers)
        used: dict[bool, _Kind] = {}
        for i, key in zip(layers, keys):
            if key not in used:
                used[key] = self.kind(i)
        return keys, used

    def rank_levels(self, used: dict[bool, _Kind]) -> list[float]:
        """``_transient_levels`` of a rank's kinds (memoised per set of kinds; [0.0] where there is none)."""
        sig = tuple(sorted(id(k) for k in used.values()))
        if sig not in self.levels:
            self.levels[sig] = _transient_levels(list(used.values()))
        return self.levels[sig] or [0.0]

    def dp_args(self, keys: tuple[bool, ...], used: dict[bool, _Kind], level: float, inflight: float, room: float
                ) -> tuple[list[_Kind], float]:
        """A rank DP's kinds (one per layer, capped at ``level``) and budget: ``room`` less the level's reserve and
        the footprint every strategy holds."""
        if len(used) == 1:  # one kind (a dense model): the same kind per layer, its footprint summed layer by layer
            k, base = self.capped(next(iter(used)), level, inflight)
            total = 0
            for _ in keys:
                total = total + base
            return [k] * len(keys), room - level - total
        capped = {key: self.capped(key, level, inflight) for key in used}
        return [capped[key][0] for key in keys], room - level - sum(capped[key][1] for key in keys)

    def capped(self, key: bool, level: float, inflight: float) -> tuple[_Kind, float]:
        """Kind ``key`` with strategies whose transient bytes exceed ``level`` at infinite cost, and its
        memory shifted down by its smallest footprint at ``inflight`` (returned): the DP then spends its
        buckets on the differences between strategies, not on the state every strategy holds."""
        mkey = (key, level, inflight)
        got = self.masked.get(mkey)
        if got is None:
            k = self.kinds[key]
            lkey = (key, level)
            at_level = self.at_level.get(lkey)
            if at_level is None:
                over = k.gather > level * (1 + 1e-9)
                # nothing over the level (the largest one): the kind's own arrays and obj caches
                at_level = self.at_level[lkey] = (
                    (np.where(over, np.inf, k.obj), np.where(over, 0.0, k.gather), {}) if over.any()
                    else (k.obj, k.gather, k.obj_cache()))
            obj, gather, cache = at_level
            base = float(np.min(k.static + inflight * k.act)) if len(k.strategies) else 0.0
            capped = _Kind(k.strategies, obj, k.static - base, k.act, k.cls, k.tpsp, gather, k.cls_idx)
            capped.__dict__["_obj_cache"] = cache  # one per level: the counts' kinds differ in memory only
            got = self.masked[mkey] = (capped, base)
        return got


def _transient_levels(ks: list[_Kind]) -> list[float]:
    """Transient-memory caps worth trying on one rank: the largest transient of all strategies, of those
    without ZeRO-3, and of those also without full recompute (a few DPs, not one per value); then the same per tp
    degree where more than one is searched. A rank's tp>1 strategies can hold more transient than its tp1 ones
    (Mixtral LoRA on 16 A100: 9.1 GiB without ZeRO-3 and full recompute at tp2/4, 3.6 GiB at tp1), and a level they
    set reserves memory the tp1 layers could use (28 selective + 4 full layers at 72.5 s where 32 selective fit at
    68.4 s). The per-tp levels only add: each is kept where it is not within 15% of a level already kept."""
    preds = [lambda s: True, lambda s: s.zero < 3, lambda s: s.zero < 3 and s.recompute != "full"]

    def maxima(tp: Optional[int]) -> set[float]:
        levels = set()
        for pred in preds:
            vals = [float(k.gather[j]) for k in ks for j, st in enumerate(k.strategies)
                    if pred(st) and (tp is None or st.tp == tp)]
            if vals:
                levels.add(max(vals))
        return levels

    out: list[float] = []
    for lv in sorted(maxima(None), reverse=True):  # levels within 15% of a kept one add little: keep the larger
        if not out or lv < 0.85 * out[-1]:
            out.append(lv)
    tps = sorted({st.tp for k in ks for st in k.strategies})
    if len(tps) > 1:
        extra = sorted(set().union(*(maxima(t) for t in tps)), reverse=True)
        for lv in extra:
            if all(not (0.85 * kept <= lv <= kept / 0.85) for kept in out):
                out.append(lv)
        out.sort(reverse=True)
    return out


def _rank_extra_bytes(o: _Outer, first: bool, last: bool, emb_zero: int = 1) -> float:
    """Memory outside the blocks on one pipeline rank: embedding (first) and head + logits (last), the embedding at
    ZeRO level ``emb_zero`` where it is data parallel (1: what every plan scored may use; the plans of layers with
    ZeRO-2/3 also try the embedding at their level: ``_embedding_zero_options``)."""
    emb_dp = o.per_stage // o.emb_tp
    extra = cm.embedding_static_bytes(o.cfg, first, last, o.emb_tp, emb_dp, 0 if emb_dp == 1 else emb_zero, o.states, o.hw)
    if last:
        extra += cm.loss_peak_bytes(o.cfg, o.tokens, o.emb_tp, o.hw)
    return extra


def _stage_bytes(kinds: list[_Kind], choice: list[int], inflight: float) -> float:
    """The exact bytes the stage DP counts for one assignment: sum(static + inflight * act), added layer by layer
    (a rank of one kind: its per-strategy bytes in one array operation, the same IEEE operations)."""
    if kinds and all(k is kinds[0] for k in kinds):
        k = kinds[0]
        return float(sum((k.static + inflight * k.act).take(choice).tolist()))
    return float(sum(k.static[j] + inflight * k.act[j] for k, j in zip(kinds, choice)))


def _assignment_s(kinds: list[_Kind], choice: list[int], trans_cost: np.ndarray | None) -> float:
    """The stage DP's objective of one assignment: the layers' times plus the (tp, sp) class changes."""
    t = float(sum(k.obj[j] for k, j in zip(kinds, choice)))
    if trans_cost is not None:
        cls = [int(k.cls[j]) for k, j in zip(kinds, choice)]
        t += float(sum(trans_cost[a, b] for a, b in zip(cls, cls[1:])))
    return t


def _repair(kinds: list[_Kind], choice: list[int], budget: float, inflight: float) -> Optional[list[int]]:
    """Make an assignment that is over ``budget`` (exact bytes) fit: move layers to the smaller strategy of their kind
    that costs the least time per byte saved, as many of one (kind, strategy) group at a time as the excess needs,
    until it fits (None when it cannot). Greedy, and blind to class changes (the caller scores them)."""
    choice = list(choice)
    kind_of: dict[int, _Kind] = {id(k): k for k in kinds}
    size = {kid: k.static + inflight * k.act for kid, k in kind_of.items()}
    groups: dict[tuple[int, int], list[int]] = {}  # (kind, strategy) -> its layers
    for i, (k, j) in enumerate(zip(kinds, choice)):
        groups.setdefault((id(k), int(j)), []).append(i)
    over = _stage_bytes(kinds, choice, inflight) - budget
    moves: dict[tuple[int, int], tuple[float, int, float]] = {}  # group -> (seconds per byte, target, bytes saved)
    while over > budget * 1e-12:
        best = None
        for key, layers in groups.items():
            if not layers:
                continue
            if key not in moves:
                kid, j = key
                k, sz = kind_of[kid], size[kid]
                saved = sz[j] - sz
                with np.errstate(divide="ignore", invalid="ignore"):
                    rate = np.where(saved > 0, (k.obj - k.obj[j]) / saved, np.inf)
                t = int(np.argmin(rate))
                moves[key] = (float(rate[t]), t, float(saved[t]))
            if best is None or moves[key][0] < moves[best][0]:
                best = key
        if best is None or not np.isfinite(moves[best][0]):
            return None
        _, t, saved = moves[best]
        layers = groups[best]
        n = min(len(layers), max(1, math.ceil(over / saved - 1e-9)))
        moved, groups[best] = layers[-n:], layers[:-n]
        groups.setdefault((best[0], t), []).extend(moved)
        for i in moved:
            choice[i] = t
        over -= n * saved
    return choice


def _refined_stage_dp(kinds: list[_Kind], budget: float, inflight: float, trans_cost: np.ndarray | None,
                      beat: float = math.inf) -> tuple[float, list[int]] | None:
    """``_stage_dp`` without most of its rounding loss, at up to two DPs' cost. Rounding every layer's bytes up to
    whole buckets loses up to one bucket per layer: on a rank of 40 layers and 64 buckets that is up to 60% of the
    budget, enough to rule out the best assignment when strategies of very different size (tp2 and tp8) set the
    bucket scale (#17). Rounded down, the DP is a relaxation: its answer is optimal if it fits, and nothing is faster
    than ``beat`` seconds if it is not. Otherwise that answer and the one with weights rounded to the nearest bucket
    are made to fit (``_repair``), and the faster is returned. None: nothing found that fits and beats ``beat``."""
    if beat < math.inf and _lp_bound(kinds, budget, inflight, trans_cost, beat) >= beat * (1 + 1e-9):
        return None  # nothing that fits beats ``beat`` (most refined DPs end so: their two DPs and repairs skipped)
    found: list[tuple[float, list[int]]] = []
    # one DP at a time: the nearest-rounded one runs only where the rounded-down answer beats ``beat`` and does not
    # fit. Since stop 31 (the refinements at every level) that is 1 in 4 of the refined DPs on GPT-1T's 1,024-GPU
    # searches, not the 5 in 6 for which both ran side by side (_stage_dp_many): 7-10% of those searches' time
    for rounding in ("down", "nearest"):
        res = _stage_dp(kinds, budget, inflight, trans_cost, rounding=rounding)
        if res is None or (rounding == "down" and res[0] >= beat):
            break
        if _stage_bytes(kinds, res[1], inflight) <= budget * (1 + 1e-12):
            found.append(res)
            if rounding == "down":
                break  # the relaxation's optimum fits: nothing is faster
            continue
        fixed = _repair(kinds, res[1], budget, inflight)
        if fixed is not None:
            found.append((_assignment_s(kinds, fixed, trans_cost), fixed))
    best = min(found, key=lambda r: r[0], default=None)
    return best if best is not None and best[0] < beat else None


def _rank_dp(o: _Outer, table: _KindTable, keys: tuple[bool, ...], used: dict[bool, _Kind], budget: float,
             inflight: float, refine_budget: Optional[float] = None
             ) -> tuple[Optional[tuple[float, list[int]]], Optional[Callable[[], Any]]]:
    """Min-time strategies for one rank's layers (``keys``: their kind keys, ``used``: those kinds) within
    ``budget`` bytes: (the bucketed DP's answer, None or a function that returns a faster one that
    ``_refined_stage_dp`` finds, or None; run on demand and once: ``_solve_candidate`` calls it for candidates
    near the best plan so far).

    ZeRO-3 layers need one all-gathered layer (+ prefetch) at a time and backward one layer's working set:
    a maximum over the rank, not a sum. The DP runs at the largest transient level (``_transient_levels``) with
    that much reserved and the strategies above it masked, then at the levels ``_next_levels`` picks from its
    answer, and keeps the fastest. Where that is slower than
    every layer's fastest strategy (memory binds), the refined DP can rerun the DP without the rounding loss;
    both answers are scored by evaluate_plan, so the refinement can only add a candidate.
    """
    trans = table.trans[keys[0]] if len(used) == 1 else None
    best = None
    levels = table.rank_levels(used)
    # no assignment beats every layer's fastest strategy: once a level reaches it, lower levels cannot help
    floor = sum(table.fastest[key] for key in keys if key in table.fastest)

    def run(level: float, dp: Any = _stage_dp, room: float = budget, **kw: Any) -> tuple[float, list[int]] | None:
        if dp is _stage_dp:  # run already, with the candidate's other ranks' DPs (``_assign_layers``)?
            got = table.first_dps.pop((keys, room, inflight, level), _NOT_RUN)
            if got is not _NOT_RUN:
                return got
        return dp(*table.dp_args(keys, used, level, inflight, room)[:2], inflight, trans, **kw)

    best = run(levels[0])
    best_level = levels[0]
    if best is not None and best[0] <= floor * (1 + 1e-9):
        return best, None
    # ``old``: the answer of the levels the DP ran before it also tried those below the chosen strategies' transient
    # (``_next_levels``). Where a lower level's answer is faster, ``old`` and its refinements stay candidates:
    # evaluate_plan judges, and a faster DP answer can score slower (llama2-7b on 8 A100 lost its second layout)
    first = best
    used_bytes = _chosen_transient(keys, used, first[1]) if first is not None else 0.0
    old, old_level = best, best_level
    for level in _next_levels(table, keys, used, levels, best, budget, inflight):
        res = run(level)
        if res is not None and (best is None or res[0] < best[0]):
            best, best_level = res, level
        # the chosen strategies' own transient (``_levels_after``; not one of ``levels``) gives ``best`` only: ``old``
        # stays the answer of the fixed levels, scored beside it where the refined DPs run (a faster DP answer can
        # score slower: megatron-gpt-529.6b on 1,024 A100 lost 103.0498 s for 103.1227 s)
        if (res is not None and (first is None or level >= used_bytes * (1 - 1e-9)) and level in levels
                and (old is None or res[0] < old[0])):
            old, old_level = res, level
    done: list[list[tuple[float, list[int]]]] = []

    def refine() -> list[tuple[float, list[int]]]:
        """Faster answers, fastest last: at the bucketed answer's level (search time: one level; every level when
        none fits) within ``budget``, then at every level within ``refine_budget`` where that is larger (an answer
        that relies on it is only a candidate: evaluate_plan may find that it does not fit). Every level, not only
        those up to the answer's: since ``_next_levels`` may settle the bucketed answer at a small level, a larger
        one with the extra room can be faster (megatron-gpt-145.6b on 1,024 H100 with fp8: 6.0123 s)."""
        if not done:
            found: list[tuple[float, list[int]]] = []
            ref = old if old is not None else best  # the refinements count from ``old`` (as before _next_levels)
            if ref is not best:
                found.append(ref)  # a candidate as well, placed as the first answer
            beat = ref[0] * (1 - REFINE_GAIN) if ref is not None else math.inf
            rooms = [(budget, sorted({best_level, old_level}, reverse=True) if best is not None else levels)]
            if refine_budget is not None and refine_budget > budget * (1 + 1e-9):
                rooms.append((refine_budget, levels))
            for room, lvls in rooms:
                for level in lvls:
                    res = run(level, _refined_stage_dp, room, beat=found[-1][0] * (1 - REFINE_GAIN) if found else beat)
                    if res is not None:
                        found.append(res)
            done.append(found)
        return done[0]

    return best, refine


def _next_levels(table: _KindTable, keys: tuple[bool, ...], used: dict[bool, _Kind], levels: list[float],
                 best: Optional[tuple[float, list[int]]], budget: float, inflight: float) -> list[float]:
    """The transient levels a rank DP runs after the largest one (``levels[0]``), whose answer is ``best``: every
    smaller level where nothing fitted; else the smallest level that still admits the chosen strategies (the same
    strategies with more room), and each level below the chosen strategies' largest transient whose relaxation
    (``_lp_bound``, exact bytes) may beat ``best``. The latter mask the chosen strategies but reserve less: a rank of
    GPT-1T's ``pp=32 tp>=2 mb=1`` reserves 44.6 GiB for a tp2 ZeRO-3 gather at the largest level, fits only ZeRO-2/3
    with full recompute in what is left (a 40 MiB-gather strategy among them), and its tp8 ZeRO-1 layers (0.2 GiB of
    transient) fit only at the smallest level: 111-165 s plans against 30.19 s where it tried only the level above the
    chosen strategies' transient."""
    if best is None:
        return levels[1:]  # nothing fits with the largest reserve: try smaller ones
    memo_key = (keys, budget, inflight)  # _first_dps_ahead and _rank_dp ask the same of the same first answer
    got = table.next_levels.get(memo_key)
    if got is None:
        got = table.next_levels[memo_key] = _levels_after(table, keys, used, levels, best, budget, inflight)
    return got


def _levels_after(table: _KindTable, keys: tuple[bool, ...], used: dict[bool, _Kind], levels: list[float],
                  best: tuple[float, list[int]], budget: float, inflight: float) -> list[float]:
    """``_next_levels`` where the largest level's DP found an answer."""
    used_bytes = _chosen_transient(keys, used, best[1])
    tighter = [lv for lv in levels[1:] if lv >= used_bytes * (1 - 1e-9)]
    todo = [min(tighter)] if tighter else []
    # and the chosen strategies' own transient, the least reserve that admits them all, where no level is exactly it:
    # near the budget a few GiB of reserve decide how many layers keep a fast strategy. Mixtral LoRA on 16 A100, ep 1,
    # tp free: its tp1 ZeRO-3 layers need 19.8 GiB; at the next level up (29.4 GiB before the per-tp levels, 22.9
    # with them) 24 or 30 of 32 layers stay selective (81.8 s, 75.8 s), at 19.8 GiB all 32 fit (73.8 s)
    if used_bytes < (todo[0] if todo else levels[0]) * (1 - 1e-9):
        todo.append(used_bytes)
    trans = table.trans[keys[0]] if len(used) == 1 else None
    for level in levels[1:]:
        if level < used_bytes * (1 - 1e-9):
            kinds, room = table.dp_args(keys, used, level, inflight, budget)
            if _lp_bound(kinds, room, inflight, trans, best[0]) < best[0] * (1 - 1e-9):
                todo.append(level)
    return todo


def _chosen_transient(keys: tuple[bool, ...], used: dict[bool, _Kind], choice: list[int]) -> float:
    """The largest transient (ZeRO-3 gather) bytes among a rank's chosen strategies: the level they need."""
    return max((float(used[key].gather[j]) for key, j in zip(keys, choice)), default=0.0)


def _min_memory_assignment(ks: list[_Kind], inflight: float) -> tuple[list[int], float]:
    """The memory-minimal strategy per layer and the bytes it needs (gather buffers as a maximum)."""
    mins = [int(np.argmin(k.static + inflight * k.act + k.gather)) for k in ks]
    need = sum(float(k.static[j] + inflight * k.act[j]) for k, j in zip(ks, mins))
    need += max((float(k.gather[j]) for k, j in zip(ks, mins)), default=0.0)
    return mins, need


def _group_same_class(kind: _Kind, picked: list[int]) -> list[int]:
    """Cost only depends on (tp, sp) changes: sort inside each same-class run so identical strategies sit
    together and the plan reads as a few ``repeat`` blocks."""
    cls = kind.cls_list()
    runs, cur = [], []
    for si in picked:
        if cur and cls[cur[-1]] != cls[si]:
            runs.append(sorted(cur))
            cur = []
        cur.append(si)
    runs.append(sorted(cur))
    return [x for run in runs for x in run]


def _assign_layers(o: _Outer, table: _KindTable, stages: list[list[int]]
                   ) -> tuple[Optional[list[LayerStrategy]], Optional[float], Optional[Callable[[], Any]]]:
    """Strategies for every layer of one stage partition: (strategies, None, refine), or (None, GiB needed, None)
    when some rank does not fit. ``refine`` (None where no rank's memory binds) returns the assignments with the
    refined rank DPs' faster answers (none when no rank has one). Raises _NoStrategy when the constraints leave a
    layer without options."""
    cfg, pp = o.cfg, o.pp
    rank_layers: list[list[int]] = [[] for _ in range(pp)]
    for j, (a, b) in enumerate(stages):
        rank_layers[j % pp].extend(range(a, b))
    choices: dict[int, LayerStrategy] = {}
    # per rank whose memory binds: its layers, kind keys, kinds, refine, and its _OwnCount where it has one
    pending: list[tuple[list[int], tuple[bool, ...], dict[bool, _Kind], Callable[[], Any], Optional[_OwnCount]]] = []
    memo = table.rank_results
    _first_dps_ahead(o, table, rank_layers)
    for r, layers in enumerate(rank_layers):
        keys, used = table.rank_kinds(layers)
        if any(len(k.strategies) == 0 for k in used.values()):
            raise _NoStrategy()
        ks = [used[key] for key in keys]
        inflight, first, last, extra, extra_lo, inflight_r = _rank_counts(o, table, r)
        sig = (keys, inflight_r, first, last)
        if sig not in memo:
            memo[sig] = _rank_dp(o, table, keys, used, o.usable - extra, inflight_r, o.usable - extra_lo)
        res, refine = memo[sig]
        if inflight_r > inflight and (res is None or refine is not None):
            # memory binds under the shared, rounded-up count (up to 2x this rank's activations: rank 0 of pp=64
            # interleaved holds 96 microbatches, counted as 128, and lost the all-selective layout, #17): this rank's
            # own count may admit faster strategies. Run at once where nothing fit, else with the refined DPs.
            own: Optional[_OwnCount] = _OwnCount(o, table, (keys, inflight, first, last), used, extra, extra_lo, res, refine)
            if res is None:
                res, refine = own.dp()
                own = None
            else:
                refine = own.refine
        else:
            own = None
        if res is None:
            # The DP's buckets and rounded-up in-flight count are conservative: fall back to the
            # memory-minimal assignment when that fits; otherwise it says how far off the layout is.
            mins, need = _min_memory_assignment(ks, inflight)
            need += extra
            if need > o.usable:
                return None, (need + cm.framework_overhead_bytes(o.hw, need)) / cm.GIB, None
            res = (float(sum(k.obj[j] for k, j in zip(ks, mins))), mins)
        if refine is not None:
            pending.append((layers, keys, used, refine, own))
        _place(choices, layers, keys, used, res[1])

    def refined() -> list[list[LayerStrategy]]:
        """Assignments with every rank's refined answers: the first ones (within the budget), the last ones of the
        shared DPs (where a rank's own-count DP added faster ones after them), then the last ones."""
        out = []
        for pick in ("first", "shared", "last"):
            alt, found = dict(choices), False
            for layers, keys, used, refine, own in pending:
                got = refine()
                i = 0 if pick == "first" else -1
                if pick == "shared" and own is not None:
                    if not own.n_shared:
                        continue  # the shared DP had no faster answer: the rank keeps its first one
                    i = own.n_shared - 1
                if got:
                    found = True
                    _place(alt, layers, keys, used, got[i][1])
            if found:
                strategies = [alt[i] for i in range(cfg.n_layers)]
                if strategies not in out:
                    out.append(strategies)
        return out

    return [choices[i] for i in range(cfg.n_layers)], None, refined if pending else None


def _rank_counts(o: _Outer, table: _KindTable, r: int) -> tuple[float, bool, bool, float, float, float]:
    """Pipeline rank ``r``'s in-flight microbatches, whether it is the first and the last, its bytes outside the
    blocks (as every plan may count them, and at the embedding's smallest ZeRO footprint) and the in-flight count its
    shared DP runs at."""
    pp = o.pp
    inflight = cm.inflight_microbatches(o.sched, pp, r, o.m, o.v)
    first, last = r == 0, r == pp - 1
    ends = table.extras.get((first, last))
    if ends is None:
        # the refined DP may count on the embedding's smallest ZeRO footprint (evaluate_plan judges the plan)
        ends = table.extras[(first, last)] = (
            _rank_extra_bytes(o, first, last), _rank_extra_bytes(o, first, last, 3 if o.c.zero is None else max(o.c.zero, 1)))
    extra, extra_lo = ends
    # ranks with similar activation pressure share one DP (round inflight up to a power of two)
    inflight_r = float(2 ** math.ceil(math.log2(inflight))) if inflight > 1 else 1.0
    inflight_r = min(inflight_r, float(o.m)) if o.sched != "gpipe" else inflight
    return inflight, first, last, extra, extra_lo, inflight_r


def _first_dps_ahead(o: _Outer, table: _KindTable, rank_layers: list[list[int]]) -> None:
    """The DPs at the transient levels that every rank DP ``_assign_layers`` is about to run (``_rank_dp``: the
    largest level, then the tighter one its answer allows, or the smaller ones where nothing fit), run together
    (``_stage_dp_many``) into ``table.first_dps``, where ``_rank_dp`` takes them: the same answers, with the
    per-call numpy cost shared by the ranks."""
    ranks: list[tuple[tuple, tuple[bool, ...], dict[bool, _Kind], float, float]] = []
    seen: set[tuple] = set()
    for r, layers in enumerate(rank_layers):
        keys, used = table.rank_kinds(layers)
        if any(len(k.strategies) == 0 for k in used.values()):
            break  # _assign_layers raises _NoStrategy here
        _, first, last, extra, _, inflight_r = _rank_counts(o, table, r)
        budget = o.usable - extra
        dkey = (keys, budget, inflight_r)
        if (keys, inflight_r, first, last) in table.rank_results or dkey in seen:
            continue
        seen.add(dkey)
        ranks.append((dkey, keys, used, budget, inflight_r))
    if len(ranks) < 2:
        return

    def run_all(todo: list[tuple[tuple, tuple[bool, ...], dict[bool, _Kind], float, float, float]]) -> list[Any]:
        items = []
        for _, keys, used, budget, inflight, level in todo:
            kinds, room = table.dp_args(keys, used, level, inflight, budget)
            items.append((kinds, room, inflight, table.trans[keys[0]] if len(used) == 1 else None))
        got = _stage_dp_many(items)
        for (dkey, *_, level), res in zip(todo, got):
            table.first_dps[dkey + (level,)] = res
        return got

    firsts = run_all([(dkey, keys, used, budget, inflight, table.rank_levels(used)[0])
                      for dkey, keys, used, budget, inflight in ranks])
    # what _rank_dp runs next, from the first answer (the same rules)
    second = []
    for (dkey, keys, used, budget, inflight), best in zip(ranks, firsts):
        levels = table.rank_levels(used)
        floor = sum(table.fastest[key] for key in keys if key in table.fastest)
        if best is not None and best[0] <= floor * (1 + 1e-9):
            continue
        second.extend((dkey, keys, used, budget, inflight, level)
                      for level in _next_levels(table, keys, used, levels, best, budget, inflight))
    if len(second) > 1:
        run_all(second)


class _OwnCount:
    """One rank's DP at its own in-flight count where the shared DP ran at a rounded-up one and memory binds:
    (keys, inflight, first, last) is its memo key in ``table.rank_results``. Every answer fits at the rank's count,
    so it can only add faster candidates."""

    def __init__(self, o: _Outer, table: _KindTable, sig: tuple, used: dict[bool, _Kind], extra: float,
                 extra_lo: float, res: Optional[tuple[float, list[int]]], refine: Optional[Callable[[], Any]]) -> None:
        self.o, self.table, self.sig, self.used, self.extra, self.extra_lo = o, table, sig, used, extra, extra_lo
        self.res, self.shared_refine = res, refine
        self.n_shared = 0  # how many of ``refine``'s answers are the shared DP's (set by ``refine``)

    def dp(self) -> tuple[Optional[tuple[float, list[int]]], Optional[Callable[[], Any]]]:
        """``_rank_dp`` at the rank's own count (memoised per key: ranks with the same count share it)."""
        memo = self.table.rank_results
        if self.sig not in memo:
            keys, inflight = self.sig[0], self.sig[1]
            memo[self.sig] = _rank_dp(self.o, self.table, keys, self.used, self.o.usable - self.extra, inflight,
                                      self.o.usable - self.extra_lo)
        return memo[self.sig]

    def refine(self) -> list[tuple[float, list[int]]]:
        """Faster answers, fastest last (as ``_rank_dp``'s refine): the shared DP's refinements (``n_shared`` of them),
        then the own-count DP's answer and refinements that beat them all."""
        found = list(self.shared_refine()) if self.shared_refine is not None else []
        self.n_shared = len(found)
        res, refine = self.dp()
        for x in ([res] if res is not None else []) + (refine() if refine is not None else []):
            if x[0] < (found[-1][0] if found else self.res[0] if self.res is not None else math.inf):
                found.append(x)
        return found


def _place(choices: dict[int, LayerStrategy], layers: list[int], keys: tuple[bool, ...], used: dict[bool, _Kind],
           picked: list[int]) -> None:
    """Write one rank's DP answer (strategy index per layer) into ``choices`` (layer -> strategy)."""
    picked = list(picked)
    if len(used) == 1:
        picked = _group_same_class(used[keys[0]], picked)
    for i, key, si in zip(layers, keys, picked):
        choices[i] = used[key].strategies[si]


_NOT_RUN = object()  # _KindTable.first_dps: no answer yet


class _NoStrategy(Exception):
    """No per-layer strategy satisfies the user's constraints for this outer candidate."""


def _score_plans(o: _Outer, stages: list[list[int]], strategies: list[LayerStrategy]) -> tuple[Any, Optional[float]]:
    """Build the Plan(s) for a strategy assignment (embedding ZeRO levels tried) and judge them with
    ``evaluate_plan``: (Candidate | rejection dict | None, GiB needed by the best plan that did not fit)."""
    cfg = o.cfg
    layers = _compress(strategies)  # the repeat blocks: the same smallest tp, largest dp and ZeRO level
    e_tp = min(s.tp for s in layers)
    if cfg.vocab_size % e_tp or o.c.runtime_compatible:
        e_tp = 1
    real_max_dp = max(s.dp for s in layers)
    if (o.mb * o.max_dp) % real_max_dp:
        return None, None
    mb_plan = o.mb * o.max_dp // real_max_dp
    best_plan = best_pred = None
    need: Optional[float] = None
    # the embedding/head's ZeRO level is not in the per-layer DP: score the runtime's choices for it
    validated = False
    for e_zero in _embedding_zero_options(layers, o.per_stage // e_tp, o.c.runtime_compatible):
        plan = Plan(model=o.model_name, cluster={"preset": o.cluster.name, "nodes": o.cluster.nodes,
                                                  "devices_per_node": o.cluster.devices_per_node},
                    seq_len=o.seq_len, global_batch=o.global_batch, micro_batch=mb_plan,
                    pipeline=PipelineSpec(degree=o.pp, schedule=o.sched,
                                          microbatches=o.global_batch // (real_max_dp * mb_plan) if o.pp > 1 else 1,
                                          virtual_stages=o.v, stages=stages if o.pp > 1 else []),
                    layers=layers, embedding=EmbeddingStrategy(tp=e_tp, zero=e_zero),
                    optimizer=OptimizerSpec(states=o.states))
        if not validated:  # validate_plan does not read the embedding's ZeRO level: the plans differ only there
            try:
                validate_plan(plan, cfg, o.per_stage * o.pp)
            except ConfigError as exc:
                return {"layout": o.label(), "reason": f"invalid plan: {exc}"}, need
            validated = True
        pred = cm.evaluate_plan(plan, cfg, o.hw, o.per_stage * o.pp, cache=o.memo.plan_costs)
        if not pred.fits:
            need = max(pred.memory_gib) if need is None else min(need, max(pred.memory_gib))
        elif best_pred is None or pred.step_s < best_pred.step_s:
            best_plan, best_pred = plan, pred
    if best_plan is None:
        return None, need
    return Candidate(best_plan, best_pred), need  # its plan's ``predicted``: set in _result, for the plans returned


@dataclass
class _Solved:
    """One outer candidate's answer: every item scored (Candidates and rejections), and per stage partition whose
    plan fitted and was refined, that plan's step and the refined Candidates (``view`` drops them where the refined DPs
    would not have run)."""

    items: list[Any]
    refined: list[tuple[float, list[Any]]]

    def view(self, best_step_s: float) -> list[Any]:
        """The items as the candidate gives them when the fastest plan scored before it takes ``best_step_s``: the
        refined ones only of plans within ``REFINE_WINDOW`` of it."""
        dropped = {id(x) for step, alts in self.refined if step > best_step_s * (1 + REFINE_WINDOW) for x in alts}
        return [x for x in self.items if id(x) not in dropped] if dropped else self.items


def _solve_candidate(o: _Outer, refine_all: bool = False) -> _Solved:
    """Run the per-rank DPs for one outer candidate over its stage partitions; return the scored
    Candidates, rejections, and an out-of-memory rejection with the smallest need when nothing fits. The refined DPs
    run where a plan does not fit, and where it does if it is within ``REFINE_WINDOW`` of the fastest plan scored so
    far (``o.memo.best_step_s``) or ``refine_all``; otherwise they are deferred to ``_refine_deferred`` where the
    candidate's lower bound is below that plan."""
    table = _KindTable(o)
    head_layers = cm.head_fwd_flops(o.cfg, 1.0) / cm.layer_fwd_flops(o.cfg, 0, 1.0, o.seq_len)
    out: list[Any] = []
    refined_of: list[tuple[float, list[Any]]] = []
    best_need: Optional[float] = None

    def note(need: Optional[float]) -> None:
        nonlocal best_need
        if need is not None:
            best_need = need if best_need is None else min(best_need, need)

    keep = False  # a refinement deferred to the end of the search holds the table
    try:
        for stages in _partitions(o.cfg, o.pp, o.v, head_layers, False):
            try:
                strategies, need, refined = _assign_layers(o, table, stages)
            except _NoStrategy:
                return _Solved([{"layout": o.label(), "reason": "no strategy satisfies the constraints"}], [])
            note(need)
            if strategies is None:
                continue
            item, need = _score_plans(o, stages, strategies)
            note(need)
            if item is not None:
                out.append(item)
            # the rank DPs' rounding loss, recovered where the plan is near the best so far (or does not fit)
            fitted = isinstance(item, Candidate)
            if (refined is not None and fitted and not refine_all
                    and item.prediction.step_s > o.memo.best_step_s * (1 + REFINE_WINDOW)):
                if (item.prediction.step_s <= o.memo.best_step_s * (1 + REFINE_REACH)
                        and _bound_of(o) < o.memo.best_step_s):  # some plan of it may still be the fastest: at the end
                    o.memo.deferred.append((o, stages, item.prediction.step_s, refined, table))
                    keep = True
                continue
            if refined is not None:
                alts = []
                for alt in refined():
                    alt_item, need = _score_plans(o, stages, alt)
                    note(need)
                    if alt_item is not None:
                        alts.append(alt_item)
                out.extend(alts)
                if fitted:
                    refined_of.append((item.prediction.step_s, alts))
    finally:
        # the rank DPs' refine closures hold the table that holds them: break the cycle so reference counting frees
        # the candidate's kinds now (the search runs with the cyclic collector paused); ``_refine_deferred`` does
        # where a refinement waits
        if not keep:
            table.rank_results.clear()
    if not any(isinstance(x, Candidate) for x in out) and best_need is not None:
        out.append({"layout": o.label(), "reason": f"out of memory by {best_need - o.hw.memory_bytes / cm.GIB:.2f} GiB",
                    "need_gib": round(best_need, 3)})
    return _Solved(out, refined_of)


def _refine_deferred(memo: _SearchMemo, out: _Collector) -> None:
    """The refined DPs of the plans ``_solve_candidate`` passed over (more than ``REFINE_WINDOW`` slower than the
    fastest plan then) while their candidate's step-time lower bound was below it, run now against the fastest plan
    of the whole search: where the bound is still below it, some plan of the candidate may be faster, and the
    refined DPs recover the bucketed DPs' rounding loss, which can be more than the window. llama3-70b on 1,024 H100
    with every saver: ``pp=2 interleaved v=8 fp8-states`` first scores 3.5626 s, 10.8% over the fastest then, and
    its refined DPs give 3.1731 s, the fastest of the search; before, only a warm start that solved it first (a
    tighter bound's order) found it. Run after the loops, these plans only add to the result: every loop decision
    is the one made without them, and the fastest plan at the end passes over the most (on GPT-1T, refining at once
    every candidate whose bound was below the fastest so far made its search ~1.8x slower)."""
    pending, memo.deferred = memo.deferred, []
    for o, stages, step_s, refined, table in sorted(pending, key=lambda d: (_bound_of(d[0]), d[2])):
        best = out.fastest_s()
        if step_s <= best * (1 + REFINE_REACH) and _bound_of(o) < best:
            for alt in refined():
                item, _ = _score_plans(o, stages, alt)
                if isinstance(item, Candidate):
                    out.add(item)
        table.rank_results.clear()  # the closures' cycle, as _solve_candidate breaks it


def _note_best(o: _Outer, items: list[Any]) -> None:
    """The fastest plan scored so far (``o.memo.best_step_s``, the refined DPs' gate) after ``items``."""
    for item in items:
        if isinstance(item, Candidate):
            o.memo.best_step_s = min(o.memo.best_step_s, item.prediction.step_s)


def _interleave_depths(n_layers: int, pp: int) -> list[int]:
    """Model chunks per rank tried for interleaved 1F1B: 2, and the smallest and largest depth up to 8 that
    split the layers evenly (Llama 3 405B ran 4-7 chunks per rank; deeper interleaving shrinks the bubble,
    costs p2p)."""
    even = [v for v in range(3, 9) if n_layers % (pp * v) == 0]
    if even:
        return [2] + sorted({even[0], even[-1]})  # at most two deeper ones: search time
    # no even split (Llama 3 405B: 126 layers over 16 ranks): chunks a layer apart, 4 and as deep as the layers allow
    deep = min(8, n_layers // pp)
    return [2] + sorted({v for v in (4, deep) if 2 < v <= deep})


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
