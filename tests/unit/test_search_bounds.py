"""The planner's linear-relaxation bound (``_lp_bound``): it must never exceed the time of an assignment that fits
(else a refined DP that would have found a faster answer is skipped), and skipping by it must not change any DP's
answer."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

from meshwright.launcher.planner import search as S
from meshwright.plan import LayerStrategy

TPS = [(1, False), (2, True), (4, True)]


def _random_kind(rng: np.random.Generator, n: int, masked: bool = False) -> S._Kind:
    cls_of = rng.integers(0, len(TPS), n)
    tpsp = sorted({TPS[c] for c in cls_of})
    strategies = [LayerStrategy(tp=TPS[c][0], sp=TPS[c][1], dp=8 // TPS[c][0]) for c in cls_of]
    obj = rng.uniform(1, 3, n)
    if masked:
        obj[rng.random(n) < 0.3] = np.inf  # a transient-memory level's masked strategies
    return S._Kind(strategies, obj, rng.uniform(0, 4, n), rng.uniform(0, 2, n),
                   np.array([tpsp.index(TPS[c]) for c in cls_of]), tpsp)


def _brute(layers: list[S._Kind], budget: float, inflight: float, trans: np.ndarray | None) -> float:
    """The least time over every assignment whose bytes fit (inf where none does)."""
    best = math.inf
    for combo in itertools.product(*(range(len(k.obj)) for k in layers)):
        if S._stage_bytes(layers, list(combo), inflight) <= budget:
            t = S._assignment_s(layers, list(combo), trans)
            best = min(best, t)
    return best


def test_lp_bound_never_exceeds_a_fitting_assignment():
    rng = np.random.default_rng(3)
    finite = tighter = 0
    for trial in range(150):
        kinds = [_random_kind(rng, int(rng.integers(1, 6)), masked=trial % 3 == 0) for _ in range(2)]
        single = trial % 2 == 0
        layers = [kinds[0]] * int(rng.integers(1, 5)) if single else [kinds[int(x)] for x in rng.integers(0, 2, 4)]
        trans = rng.uniform(0, 0.5, (len(kinds[0].tpsp),) * 2) if single else None
        budget, inflight = float(rng.uniform(0, 14)), float(rng.integers(1, 4))
        exact = _brute(layers, budget, inflight, trans)
        bound = S._lp_bound(layers, budget, inflight, trans)
        assert bound <= exact * (1 + 1e-12), (trial, bound, exact)
        if math.isinf(exact):
            continue
        finite += 1
        assert bound >= sum(float(np.min(k.obj)) for k in layers) * (1 - 1e-12)  # never below the floor
        # near the time to beat, a rank of one kind with several classes also bounds per class (or one change)
        by_class = S._lp_bound(layers, budget, inflight, trans, beat=bound * 1.005)
        assert bound <= by_class <= exact * (1 + 1e-12), (trial, by_class, exact)
        tighter += by_class > bound * (1 + 1e-9)
    assert finite > 40 and tighter > 5, (finite, tighter)
    # a negative class change could make an assignment cheaper than its layers' sum: no bound then
    k = _random_kind(rng, 4)
    assert S._lp_bound([k] * 3, 10.0, 1.0, -np.ones((len(k.tpsp),) * 2)) == -math.inf


def test_lp_bound_is_the_linear_relaxation():
    """40 identical layers (1.0 s at 1.69 buckets, 1.02 s at 1.09, 1.5 s at 0): every layer buys the 1.09-bucket
    step (0.44 s per bucket) and 20.4 of the 24 buckets of the next step (0.033 s per bucket): 40.12 s, here also the
    exact optimum. Nothing fits below 0 bytes: +inf."""
    kind = S._Kind([LayerStrategy(tp=1, dp=8, zero=z) for z in range(3)], np.array([1.0, 1.02, 1.5]),
                   np.array([1.69, 1.09, 0.0]), np.zeros(3), np.zeros(3, dtype=int), [(1, False)])
    assert S._lp_bound([kind] * 40, 64.0, 1.0, None) == pytest.approx(40.12)
    assert S._lp_bound([kind] * 40, 200.0, 1.0, None) == pytest.approx(40.0)  # everything fits: the floor
    assert S._lp_bound([kind] * 40, 0.0, 1.0, None) == pytest.approx(60.0)
    assert S._lp_bound([kind] * 40, -1.0, 1.0, None) == math.inf


def test_refined_stage_dp_skips_its_dps_only_where_they_cannot_beat(monkeypatch):
    """Where the bound reaches ``beat`` the refined DP runs no DP and answers None, as its DPs would have; elsewhere
    its answer is the one it gives without the bound (random kinds, beats around the exact optimum)."""
    rng = np.random.default_rng(5)
    calls = []
    stage_dp = S._stage_dp
    monkeypatch.setattr(S, "_stage_dp", lambda *a, **k: calls.append(1) or stage_dp(*a, **k))
    many = S._stage_dp_many  # the refined DP's two roundings, side by side on one-kind ranks
    monkeypatch.setattr(S, "_stage_dp_many", lambda items: calls.extend([1] * len(items)) or many(items))
    skipped = 0
    for trial in range(120):
        kind = _random_kind(rng, int(rng.integers(2, 7)))
        layers = [kind] * int(rng.integers(4, 12))
        trans = rng.uniform(0, 0.2, (len(kind.tpsp),) * 2) if trial % 2 else None
        budget, inflight = float(rng.uniform(5, 30)), 1.0
        up = stage_dp(layers, budget, inflight, trans)
        if up is None:
            continue
        beat = up[0] * float(rng.uniform(0.9, 1.0))
        calls.clear()
        with_bound = S._refined_stage_dp(layers, budget, inflight, trans, beat=beat)
        ran = len(calls)
        with monkeypatch.context() as m:
            m.setattr(S, "_lp_bound", lambda *a: -math.inf)
            without = S._refined_stage_dp(layers, budget, inflight, trans, beat=beat)
        assert with_bound == without
        if ran == 0:
            skipped += 1
            assert with_bound is None
            assert S._lp_bound(layers, budget, inflight, trans) >= beat
    assert skipped > 10, skipped


# ---- the outer candidates' step-time bound (``_step_lower_bound``) ----------------------------------------------

OUTER_CASES = [  # (model, cluster, nodes, seq, global batch, allow, compiled)
    ("llama2-13b", "dgx-h100-80g", 2, 4096, 64, ["fp8"], False),
    ("mixtral-8x7b", "dgx-h100-80g", 2, 4096, 64, [], True),
    ("gpt2-medium", "dgx-a100-80g", 1, 1024, 32, [], False),
]


def _hw(cluster, compiled: bool):
    from meshwright.launcher.planner import cost_model as cm

    return cm.hardware_from_cluster(cluster, compile=compiled)


@pytest.mark.parametrize("case", OUTER_CASES, ids=lambda c: c[0])
def test_outer_bound_never_exceeds_a_scored_plan(case, monkeypatch):
    """Every plan an outer candidate's DPs produce, as ``evaluate_plan`` scores it, is no faster than the candidate's
    bound (a bound above one would skip a candidate that could have entered the result); and it is not vacuous."""
    from meshwright.config import load_cluster, load_model_config

    name, cl, nodes, seq, gb, allow, compiled = case
    cluster = load_cluster(cl, nodes=nodes)
    checked, ratios = 0, []
    solve = S._solve_candidate

    def checked_solve(o, **kw):
        nonlocal checked
        out = solve(o, **kw)
        bound = S._step_lower_bound(o)
        steps = [x.prediction.step_s for x in out.items if isinstance(x, S.Candidate)]
        for t in steps:
            assert bound <= t, (o.label(), bound, t)
            checked += 1
        if steps:
            ratios.append(bound / min(steps))
        return out

    monkeypatch.setattr(S, "_solve_candidate", checked_solve)
    monkeypatch.setattr(S._Collector, "add", lambda self, item: self.feasible.append(item))  # the bar stays infinite
    S.search(load_model_config(name), cluster, seq, gb, hw=_hw(cluster, compiled), allow=S.Allow.parse(allow),
             suggest=False)
    assert checked > 20
    assert max(ratios) > 0.9, max(ratios)  # tight for some candidates: the bound prunes


@pytest.mark.parametrize("case", OUTER_CASES, ids=lambda c: c[0])
def test_skipping_on_the_bound_loses_no_plan(case, monkeypatch):
    """The search with the bound (and the candidates it solves ahead to set the bar) returns plans no slower, rank by
    rank, than the search that solves every candidate in order, and skips some. Where they differ, solving ahead ran
    refined DPs the in-order search skipped."""
    from meshwright.config import load_cluster, load_model_config

    name, cl, nodes, seq, gb, allow, compiled = case
    cluster = load_cluster(cl, nodes=nodes)

    def run():
        r = S.search(load_model_config(name), cluster, seq, gb, hw=_hw(cluster, compiled), allow=S.Allow.parse(allow),
                     suggest=False)
        return [c.prediction.step_s for c in [r.best, *r.runners_up]], r.skipped, r.best.plan.to_dict()

    bounded, skipped, best = run()
    monkeypatch.setattr(S, "_step_lower_bound", lambda o, enough=math.inf: 0.0)
    monkeypatch.setattr(S, "WARM_START", 0)
    full, none_skipped, full_best = run()
    assert none_skipped == 0 and skipped > 0
    assert len(bounded) == len(full)
    assert all(b <= f for b, f in zip(bounded, full)), (bounded, full)
    assert bounded[0] < full[0] or best == full_best


def _hull_reference(k: S._Kind, inflight: float, cls) -> tuple:
    """``_Kind.hull`` as it was before it sorted only the points that can be on the front: every finite point."""
    ok = np.isfinite(k.obj) if cls is None else np.isfinite(k.obj) & (k.cls == cls)
    w, t = (k.static + inflight * k.act)[ok], k.obj[ok]
    order = np.lexsort((t, w))
    w, t = w[order], t[order]
    front = np.ones(len(t), dtype=bool)
    front[1:] = t[1:] < np.minimum.accumulate(t)[:-1]
    pts: list[tuple[float, float]] = []
    for x, y in zip(w[front].tolist(), t[front].tolist()):
        while len(pts) >= 2 and ((pts[-1][1] - pts[-2][1]) * (x - pts[-2][0])
                                 >= (y - pts[-2][1]) * (pts[-1][0] - pts[-2][0])):
            pts.pop()
        pts.append((x, y))
    return (pts[0][0], pts[0][1], [(q[0] - p[0], p[1] - q[1]) for p, q in zip(pts, pts[1:])]) if pts else \
        (math.inf, math.inf, [])


def test_hull_is_the_hull_of_every_point():
    """``_Kind.hull`` leaves the points that cannot be on the front out of its sort: the same hull, float for float,
    as over every finite point, with ties in bytes and in time (small integers) and masked strategies."""
    rng = np.random.default_rng(11)
    for trial in range(300):
        n = int(rng.integers(1, 60))
        k = _random_kind(rng, n, masked=trial % 3 == 0)
        if trial % 2:  # ties everywhere
            k = S._Kind(k.strategies, np.where(np.isfinite(k.obj), rng.integers(1, 6, n).astype(float), np.inf),
                        rng.integers(0, 4, n).astype(float), rng.integers(0, 3, n).astype(float), k.cls, k.tpsp)
        for inflight in (1.0, 2.5, 7.0):
            for cls in [None, *range(len(k.tpsp))]:
                assert k.hull(inflight, cls) == _hull_reference(k, inflight, cls), (trial, inflight, cls)


@pytest.mark.parametrize("case", OUTER_CASES[:2], ids=lambda c: c[0])
def test_outer_bound_from_the_search_caches_is_the_fresh_one(case, monkeypatch):
    """Every candidate's bound as the search computes it (strategy blocks shared between lists, head, boundary
    transfer, partitions, stage sums and hulls kept per search) is bit for bit the bound of the same candidate
    alone, with nothing cached: a term cached under a key that misses a field it depends on would differ. Where the
    search stopped a bound once it exceeded the bar (``_bound_of``), that part is over the bar and within the whole."""

    from meshwright.config import load_cluster, load_model_config

    name, cl, nodes, seq, gb, allow, compiled = case
    cluster = load_cluster(cl, nodes=nodes)
    seen = []
    bound_of = S._bound_of

    def recorded(o, bar=math.inf):
        got = bound_of(o, bar)
        seen.append((o, bar, got))
        return got

    monkeypatch.setattr(S, "_bound_of", recorded)
    S.search(load_model_config(name), cluster, seq, gb, hw=_hw(cluster, compiled), allow=S.Allow.parse(allow),
             suggest=False)
    assert len(seen) > 20
    parts = 0
    for o, bar, got in seen:
        alone = S._step_lower_bound(dataclasses.replace(o, memo=S._SearchMemo()))
        if got > bar:  # skipped: maybe a part
            parts += got < alone
            assert got <= alone, (o.label(), got, alone)
        else:
            assert float(alone).hex() == float(got).hex(), (o.label(), alone, got)
    assert parts > 0


# ---- every pipeline rank's memory in the bound (``_rank_lp_bound``) ------------------------------------------------

RANK_CASES = [  # deep pipelines whose ranks hold different numbers of microbatches (1F1B, interleaved, GPipe)
    ("llama2-13b", "dgx-h100-80g", 2, 4096, 64, ["fp8", "wta-crs", "lemo"], False),
    ("llama2-70b", "dgx-a100-80g", 4, 4096, 128, [], False),
    ("mixtral-8x7b", "dgx-h100-80g", 2, 4096, 64, ["fp8"], True),
]


def _rank_terms(o) -> tuple[float, float]:
    """The bound as ``_rank_lp_bound`` defines it, over every pipeline rank (not only the first of each layer mix) and
    only its q = p terms: min over partitions of max over ranks r of the relaxation of m x rank r's per-microbatch time
    + its per-step time, its boundary transfer, ends and head, and the other ranks' share of fill and drain; and the
    same with the first rank's term alone."""
    from meshwright.launcher.planner import cost_model as cm

    flags = o.memo.moe_flags(o.cfg)
    terms = {key: S._vectors(o, flags.index(key)).bound_terms() for key in set(flags)}
    head_tokens = o.mb * o.seq_len * o.max_dp / terms[flags[-1]][2]
    head = min(cm.head_s(o.cfg, head_tokens, e, o.hw) + cm.loss_s(o.cfg, head_tokens, e, o.hw) for e in {1, *o.tps})
    v = o.v if o.sched == "interleaved_1f1b" else 1
    p2p = 0.0
    if o.pp > 1:
        cross = o.per_stage >= o.hw.devices_per_node
        p2p = v * min(cm.pp_p2p_s(o.mb * o.seq_len / cp, o.cfg, tp, sp, o.hw, cross) for tp, sp, cp in terms[flags[0]][3])
    slow = o.hw.pipeline_slowdown if o.pp > 1 else 1.0
    a, d = o.m * slow, slow / v / max(o.hw.contention, 1.0)
    best = first_only = math.inf
    head_layers = cm.head_fwd_flops(o.cfg, 1.0) / cm.layer_fwd_flops(o.cfg, 0, 1.0, o.seq_len)
    for stages in S._partitions(o.cfg, o.pp, o.v, head_layers, False):
        counts = [{} for _ in range(o.pp)]
        for j, (lo, hi) in enumerate(stages):
            for i in range(lo, hi):
                counts[j % o.pp][flags[i]] = counts[j % o.pp].get(flags[i], 0) + 1
        y = [sum(terms[k][0] * n for k, n in c.items()) + p2p for c in counts]
        y[-1] += head
        worst = -math.inf
        for r, c in enumerate(counts):
            first, last = r == 0, r == o.pp - 1
            e_mb, e_step = S._ends_min(o, first, last) if first or last else (0.0, 0.0)
            lp = S._rank_lp(o, c, cm.inflight_microbatches(o.sched, o.pp, r, o.m, v),
                            S._rank_room(o, head_tokens, first, last), a, last)
            worst = max(worst, lp + a * (p2p + e_mb) + e_step + d * (sum(y) - y[r]))
            if first:
                first_only = min(first_only, worst)
        best = min(best, worst)
    return best, first_only


@pytest.mark.parametrize("case", RANK_CASES, ids=lambda c: c[0])
def test_bound_holds_every_rank_and_no_plan_beats_it(case, monkeypatch):
    """Over every candidate a search solves (pipelines of 1F1B, interleaved and GPipe ranks, whose in-flight counts
    differ): no plan its DPs produce is faster than its bound (the invariant: else a candidate that could enter the
    result is skipped); the bound is at least every rank's memory relaxation (so the ranks it leaves out are dominated,
    and the first rank's alone would not do: some candidates are bounded by another rank)."""
    from meshwright.config import load_cluster, load_model_config

    name, cl, nodes, seq, gb, allow, compiled = case
    cluster = load_cluster(cl, nodes=nodes)
    checked, by_other, deep = 0, 0, set()
    solve = S._solve_candidate

    def checked_solve(o, **kw):
        nonlocal checked, by_other
        out = solve(o, **kw)
        bound = S._step_lower_bound(dataclasses.replace(o, memo=S._SearchMemo()))
        for t in (x.prediction.step_s for x in out.items if isinstance(x, S.Candidate)):
            assert bound <= t, (o.label(), bound, t)
            checked += 1
        if o.pp > 1:
            every, first_only = _rank_terms(o)
            assert bound >= every * (1 - 1e-6), (o.label(), bound, every)
            by_other += every > first_only * (1 + 1e-6)  # a rank after the first sets the bound
            deep.add((o.pp, o.sched))
        return out

    monkeypatch.setattr(S, "_solve_candidate", checked_solve)
    monkeypatch.setattr(S._Collector, "add", lambda self, item: self.feasible.append(item))  # the bar stays infinite
    S.search(load_model_config(name), cluster, seq, gb, hw=_hw(cluster, compiled), allow=S.Allow.parse(allow),
             suggest=False)
    assert checked > 20 and len(deep) > 3, (checked, deep)
    assert by_other > 0
