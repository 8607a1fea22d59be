"""The planner's linear-relaxation bound (``_lp_bound``): it must never exceed the time of an assignment that fits
(else a refined DP that would have found a faster answer is skipped), and skipping by it must not change any DP's
answer."""

from __future__ import annotations

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


def _random_one_kind_rank(rng, transitions: bool):
    """A rank of 4-11 layers of one random kind, its transition costs (or None), memory budget and in-flight count."""
    kind = _random_kind(rng, int(rng.integers(2, 7)))
    layers = [kind] * int(rng.integers(4, 12))
    trans = rng.uniform(0, 0.2, (len(kind.tpsp),) * 2) if transitions else None
    return layers, trans, float(rng.uniform(5, 30)), 1.0


def test_refined_stage_dp_skips_its_dps_only_where_they_cannot_beat(monkeypatch):
    """Where the bound reaches ``beat`` the refined DP runs no DP and answers None, as its DPs would have; elsewhere
    its answer is the one it gives without the bound (random kinds, beats around the exact optimum)."""
    rng = np.random.default_rng(5)
    calls = []
    stage_dp = S._stage_dp
    monkeypatch.setattr(S, "_stage_dp", lambda *a, **k: calls.append(1) or stage_dp(*a, **k))
    many = S._stage_dp_many  # (the refined DP ran its two roundings side by side on one-kind ranks before stop 31's)
    monkeypatch.setattr(S, "_stage_dp_many", lambda items: calls.extend([1] * len(items)) or many(items))
    skipped = 0
    for trial in range(120):
        layers, trans, budget, inflight = _random_one_kind_rank(rng, transitions=bool(trial % 2))
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

def test_refined_stage_dp_runs_the_nearest_rounding_only_where_the_rounded_down_answer_needs_it(monkeypatch):
    """The refined DP's nearest-rounded DP runs only where the rounded-down one beats ``beat`` and does not fit (the
    other answers settle it: none beats ``beat``, or it fits and nothing is faster), and its answer is the one of both
    roundings run side by side as before (one-kind ranks with and without transitions, beats around the optimum)."""
    rng = np.random.default_rng(31)
    roundings: list[str] = []
    stage_dp = S._stage_dp
    monkeypatch.setattr(S, "_stage_dp", lambda *a, rounding="up", **k: roundings.append(rounding)
                        or stage_dp(*a, rounding=rounding, **k))
    many = S._stage_dp_many
    monkeypatch.setattr(S, "_stage_dp_many", lambda items: roundings.extend(x[4] for x in items) or many(items))
    settled = 0
    for trial in range(150):
        layers, trans, budget, inflight = _random_one_kind_rank(rng, transitions=bool(trial % 3))
        up = stage_dp(layers, budget, inflight, trans)
        beat = up[0] * float(rng.uniform(0.9, 1.0)) if up is not None and trial % 4 else math.inf
        down = stage_dp(layers, budget, inflight, trans, rounding="down")
        nearest = stage_dp(layers, budget, inflight, trans, rounding="nearest")
        roundings.clear()
        with monkeypatch.context() as m:
            m.setattr(S, "_lp_bound", lambda *a: -math.inf)  # every call reaches its DPs
            got = S._refined_stage_dp(layers, budget, inflight, trans, beat=beat)
        # the answer of both roundings (as _refined_stage_dp's loop took them, from _stage_dp_many before)
        found = []
        for rounding, res in (("down", down), ("nearest", nearest)):
            if res is None or (rounding == "down" and res[0] >= beat):
                break
            if S._stage_bytes(layers, res[1], inflight) <= budget * (1 + 1e-12):
                found.append(res)
                if rounding == "down":
                    break
                continue
            fixed = S._repair(layers, res[1], budget, inflight)
            if fixed is not None:
                found.append((S._assignment_s(layers, fixed, trans), fixed))
        best = min(found, key=lambda r: r[0], default=None)
        assert got == (best if best is not None and best[0] < beat else None), trial
        needs_nearest = (down is not None and down[0] < beat
                         and S._stage_bytes(layers, down[1], inflight) > budget * (1 + 1e-12))
        assert roundings == (["down", "nearest"] if needs_nearest else ["down"]), (trial, roundings)
        settled += not needs_nearest
    assert settled > 30, settled


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
    monkeypatch.setattr(S, "_step_lower_bound", lambda o: 0.0)
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
    """``_Kind.hull`` leaves the points that cannot be on the front out of its sort (over 64 points) and walks the rest
    in plain Python: the same hull, float for float, as numpy's sort over every finite point, with ties in bytes and in
    time (small integers) and masked strategies, on both sides of 64 points."""
    rng = np.random.default_rng(11)
    for trial in range(300):
        n = int(rng.integers(1, 60)) if trial % 4 else int(rng.integers(60, 200))
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
    alone, with nothing cached: a term cached under a key that misses a field it depends on would differ."""
    import dataclasses

    from meshwright.config import load_cluster, load_model_config

    name, cl, nodes, seq, gb, allow, compiled = case
    cluster = load_cluster(cl, nodes=nodes)
    seen = []
    bound_of = S._bound_of

    def recorded(o):
        got = bound_of(o)
        seen.append((o, got))
        return got

    monkeypatch.setattr(S, "_bound_of", recorded)
    S.search(load_model_config(name), cluster, seq, gb, hw=_hw(cluster, compiled), allow=S.Allow.parse(allow),
             suggest=False)
    assert len(seen) > 20
    for o, got in seen:
        alone = S._step_lower_bound(dataclasses.replace(o, memo=S._SearchMemo()))
        assert float(alone).hex() == float(got).hex(), (o.label(), alone, got)
