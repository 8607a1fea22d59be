"""The search: valid plans, constraints honoured, infeasible requests explained, DP optimality."""

from __future__ import annotations

import dataclasses
import gc
import itertools

import numpy as np
import pytest

from meshwright.config import TrainConfig, load_cluster, load_model_config
from meshwright.errors import ConfigError
from meshwright.launcher.planner import cost_model as cm
from meshwright.launcher.planner import search as S
from meshwright.launcher.planner.auto import auto_plan
from meshwright.plan import LayerStrategy, plan_from_dict, validate_plan


def _a100(nodes: int = 1):
    """The A100 preset at the 80.0 GiB it stated when these cases were pinned (79.1 since: CUDA's total_memory)."""
    return dataclasses.replace(load_cluster("dgx-a100-80g", nodes=nodes), memory_gib=80.0)


def test_tiny_on_this_machine_gives_a_valid_plan():
    cfg = load_model_config("tiny")
    r = S.search(cfg, load_cluster("local-cpu"), 128, 8)
    assert r.best is not None
    validate_plan(r.best.plan, cfg, 2)
    assert r.best.plan.predicted["step_s"] == pytest.approx(r.best.prediction.step_s, rel=1e-5)
    # runner-ups are sorted and distinct
    times = [r.best.prediction.step_s] + [c.prediction.step_s for c in r.runners_up]
    assert times == sorted(times)
    assert len({c.layout() for c in [r.best, *r.runners_up]}) == len(times)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_auto_plan_is_valid_for_the_trainer(world):
    tc = TrainConfig(model="tiny", cluster="local-cpu", seq_len=64, global_batch=8, micro_batch=2)
    plan = auto_plan(tc, world)
    validate_plan(plan, "tiny", world)
    assert plan.world_size() == world
    assert plan.micro_batch == 2  # the trainer's micro-batch is kept
    plan2 = auto_plan("tiny", "local-cpu", world, 64, 8, constraints=S.Constraints(micro_batch=2))
    assert plan2.to_dict() == plan.to_dict()
    for s in plan.layer_strategies():
        assert s.cp == 1


def test_auto_plan_never_pipelines_tied_embeddings():
    cfg = load_model_config("tiny-gpt2")
    assert cfg.tie_embeddings
    r = S.search(cfg, load_cluster("local-cpu", nodes=2), 64, 8, constraints=S.Constraints(runtime_compatible=True))
    assert r.best.plan.pipeline.degree == 1
    assert all(c.plan.pipeline.degree == 1 for c in r.runners_up)
    assert any("tied embeddings" in x["reason"] for x in r.rejected)


def test_constraints_are_honoured_to_evaluate_a_known_layout():
    cfg = load_model_config("llama2-13b")
    c = S.Constraints(tp=4, pp=2, zero=1, recompute="selective", micro_batch=2, schedule="1f1b")
    r = S.search(cfg, _a100(2), 4096, 256, constraints=c)
    assert r.best is not None
    for cand in [r.best, *r.runners_up]:
        p = cand.plan
        assert p.pipeline.degree == 2 and p.pipeline.schedule == "1f1b" and p.micro_batch == 2
        for s in p.layer_strategies():
            assert (s.tp, s.zero, s.recompute, s.dp) == (4, 1, "selective", 2)
        validate_plan(p, cfg, 16)
    r_dp = S.search(cfg, _a100(2), 4096, 256, constraints=S.Constraints(dp=8))
    assert all(s.dp == 8 for s in r_dp.best.plan.layer_strategies())


def test_moe_layers_get_expert_parallelism_and_respect_ep():
    cfg = load_model_config("tiny-moe")
    cl = load_cluster("local-cpu", nodes=2)  # 4 devices
    r = S.search(cfg, cl, 64, 16)
    validate_plan(r.best.plan, cfg, 4)
    eps = {s.ep for c in [r.best, *r.runners_up] for s in c.plan.layer_strategies()}
    assert eps <= {1, 2, 4}
    r2 = S.search(cfg, cl, 64, 16, constraints=S.Constraints(ep=2, tp=1))
    assert r2.best is not None
    assert all(s.ep == 2 for s in r2.best.plan.layer_strategies())
    validate_plan(r2.best.plan, cfg, 4)


def test_infeasible_request_names_the_need_and_the_nearest_change():
    cfg = load_model_config("llama2-70b")
    r = S.search(cfg, _a100(1), 4096, 64)
    assert r.best is None
    assert r.min_memory_gib is not None and r.min_memory_gib > 80
    msg = S.infeasible_message(r)
    assert "\n" not in msg and "80.0 GiB" in msg and f"{r.min_memory_gib:.1f} GiB" in msg
    assert r.suggestion == "--nodes 2"
    assert all("out of memory by" in x["reason"] for x in r.rejected if "need_gib" in x)
    with pytest.raises(ConfigError, match="no layout fits"):
        auto_plan(cfg, "dgx-a100-80g", 1, 4096, 8)


def test_recompute_constraint_suggests_full_recompute():
    cfg = load_model_config("llama2-13b")
    r = S.search(cfg, _a100(1), 4096, 64, constraints=S.Constraints(recompute="none", tp=1, pp=1, zero=0))
    assert r.best is None
    assert r.suggestion is not None


def test_memory_budget_is_respected_and_forces_memory_savers():
    cfg = load_model_config("llama2-7b")
    roomy = S.search(cfg, _a100(), 4096, 64)
    hw = cm.hardware_from_cluster(_a100(), memory_budget_gib=24)
    tight = S.search(cfg, _a100(), 4096, 64, hw=hw)
    assert tight.best is not None
    assert max(tight.best.prediction.memory_gib) <= 24
    assert tight.best.prediction.step_s >= roomy.best.prediction.step_s
    assert max(roomy.best.prediction.memory_gib) > 24


def test_per_layer_dp_mixes_strategies_when_memory_is_between_two_layouts():
    """Galvatron's point: with a budget between 'all recompute' and 'none', some layers recompute."""
    cfg = load_model_config("llama2-7b")
    c = S.Constraints(tp=2, pp=1, zero=1, micro_batch=4)
    full = S.search(cfg, _a100(), 4096, 64, constraints=dataclasses.replace(c, recompute="full"))
    none = S.search(cfg, _a100(), 4096, 64, constraints=dataclasses.replace(c, recompute="none"),
                    hw=cm.hardware_from_cluster(_a100(), memory_budget_gib=200))
    lo, hi = max(full.best.prediction.memory_gib), max(none.best.prediction.memory_gib)
    mid = (lo + hi) / 2
    mixed = S.search(cfg, _a100(), 4096, 64, constraints=c, hw=cm.hardware_from_cluster(_a100(), memory_budget_gib=mid))
    modes = [s.recompute for s in mixed.best.plan.layer_strategies()]
    assert len(set(modes)) > 1, modes
    assert max(mixed.best.prediction.memory_gib) <= mid
    assert full.best.prediction.step_s > mixed.best.prediction.step_s


def test_allow_enables_savers_only_when_asked():
    cfg = load_model_config("llama2-13b")
    hw = cm.hardware_from_cluster(_a100(), memory_budget_gib=40)
    plain = S.search(cfg, _a100(), 4096, 64, hw=hw)
    for c in [plain.best, *plain.runners_up]:
        assert c.plan.optimizer.states == "fp32"
        assert not any(s.savers.fp8_act or s.savers.wta_crs or s.savers.lemo for s in c.plan.layer_strategies())
    fp8 = S.search(cfg, _a100(), 4096, 64, hw=hw, allow=S.Allow.parse(["fp8"]))
    assert fp8.best.prediction.step_s <= plain.best.prediction.step_s
    assert any(c.plan.optimizer.states == "fp8" for c in [fp8.best, *fp8.runners_up])


def test_allow_parsing():
    a = S.Allow.parse(["fp8,wta-crs=0.25", "lemo"])
    assert a.fp8 and a.wta_crs == 0.25 and a.lemo == 0.5
    for bad in (["fp16"], ["wta-crs=2"], ["lemo=x"]):
        with pytest.raises(ConfigError, match="allow"):
            S.Allow.parse(bad)


def test_bad_constraints_are_one_line_errors():
    cfg = load_model_config("llama2-7b")
    with pytest.raises(ConfigError, match="pp=3"):
        S.search(cfg, _a100(), 4096, 64, constraints=S.Constraints(pp=3))
    with pytest.raises(ConfigError, match="zero=5"):
        S.search(cfg, _a100(), 4096, 64, constraints=S.Constraints(zero=5))
    with pytest.raises(ConfigError, match="seq-len"):
        S.search(cfg, _a100(), 100000, 64)


def test_stage_dp_matches_brute_force():
    """The bucketed DP finds the same optimum as trying every assignment (same bucketed weights)."""
    rng = np.random.default_rng(0)
    strategies = [LayerStrategy(tp=t, sp=t > 1, dp=8 // t, zero=z) for t in (1, 2) for z in (0, 1, 2)]
    n = len(strategies)
    cls = np.array([0 if s.tp == 1 else 1 for s in strategies])
    for trial in range(5):
        kind = S._Kind(strategies, rng.uniform(1, 2, n), rng.uniform(1, 5, n), rng.uniform(0, 2, n), cls, [(1, False), (2, True)])
        trans = np.array([[0.0, 0.7], [0.7, 0.0]])
        budget, inflight, layers = 14.0, 2.0, 4
        res = S._stage_dp([kind] * layers, budget, inflight, trans)
        bucket = budget / S.N_BUCKETS
        w = np.ceil((kind.static + inflight * kind.act) / bucket - 1e-9).astype(int)
        best = None
        for combo in itertools.product(range(n), repeat=layers):
            if sum(w[i] for i in combo) > S.N_BUCKETS:
                continue
            t = sum(kind.obj[i] for i in combo) + sum(trans[cls[a], cls[b]] for a, b in zip(combo, combo[1:]))
            best = t if best is None else min(best, t)
        if best is None:
            assert res is None
        else:
            assert res is not None and res[0] == pytest.approx(best)
            combo = res[1]
            t = sum(kind.obj[i] for i in combo) + sum(trans[cls[a], cls[b]] for a, b in zip(combo, combo[1:]))
            assert t == pytest.approx(best)


def _stage_dp_full_tables(kinds, budget, inflight, trans_cost):
    """The stage DP as first written: (bucket, strategy) tables with a full argmin table kept per layer for the
    backtrack. The search's _stage_dp keeps only minima and recomputes argmins on the path; it must agree exactly."""
    bucket, nb = budget / S.N_BUCKETS, S.N_BUCKETS + 1
    rows, f, back, prev = np.arange(nb), None, [], None
    for k in kinds:
        n = len(k.strategies)
        w = np.ceil((k.static + inflight * k.act) / bucket - 1e-9).astype(int)
        J = rows[:, None] - w[None, :]
        J = np.where(J < 0, nb, J)
        if f is None:
            g, arg = np.zeros((nb, n)), np.full((nb, n), -1)
        elif trans_cost is not None and prev is k and len(k.tpsp) > 1:
            C = len(k.tpsp)
            groups = [np.flatnonzero(k.cls == c) for c in range(C)]
            cls_best = np.stack([f[:, g].min(axis=1) for g in groups], axis=1)
            cls_arg = np.stack([g[f[:, g].argmin(axis=1)] for g in groups], axis=1)
            tot = cls_best[:, :, None] + trans_cost[None, :, :]
            best_c = tot.argmin(axis=1)
            g = tot.min(axis=1)[:, k.cls]
            arg = cls_arg[rows[:, None], best_c][:, k.cls]
        else:
            a = f.argmin(axis=1)
            g, arg = np.repeat(f.min(axis=1)[:, None], n, axis=1), np.repeat(a[:, None], n, axis=1)
        gp, ap = np.vstack([g, np.full((1, n), np.inf)]), np.vstack([arg, np.full((1, n), -1)])
        f = gp[J, np.arange(n)[None, :]] + k.obj[None, :]
        back.append((ap[J, np.arange(n)[None, :]], w))
        prev = k
    s = int(np.argmin(f[S.N_BUCKETS]))
    if not np.isfinite(f[S.N_BUCKETS, s]):
        return None
    total, choice, j = float(f[S.N_BUCKETS, s]), [0] * len(kinds), S.N_BUCKETS
    for li in range(len(kinds) - 1, -1, -1):
        choice[li] = s
        arg, w = back[li]
        s, j = int(arg[j, s]), j - int(w[s])
    return total, choice


def test_stage_dp_keeps_the_full_table_dp_choices_including_ties():
    """Same total and same strategy per layer as the full-argmin-table DP, on random kinds whose costs are small
    integers (many exact ties: the first-index tie-breaking must survive), mixing two kinds (MoE-like) and
    transitions on and off."""
    rng = np.random.default_rng(1)
    tps = [(1, False), (2, False), (2, True), (4, True)]
    for trial in range(60):
        kinds = []
        for _ in range(2):
            n = int(rng.integers(1, 9))
            cls_of = rng.integers(0, len(tps), n)
            tpsp = sorted({tps[c] for c in cls_of})
            strategies = [LayerStrategy(tp=tps[c][0], sp=tps[c][1], dp=8 // tps[c][0]) for c in cls_of]
            cls = np.array([tpsp.index(tps[c]) for c in cls_of])
            kinds.append(S._Kind(strategies, rng.integers(1, 4, n).astype(float), rng.integers(0, 4, n).astype(float),
                                 rng.integers(0, 3, n).astype(float), cls, tpsp))
        C, single = len(kinds[0].tpsp), trial % 2 == 1
        # as in the search: transition costs only on a rank whose layers are all of one kind
        trans = rng.integers(0, 3, (C, C)).astype(float) if single and trial % 3 else None
        layers = [kinds[0]] * int(rng.integers(1, 7)) if single else [kinds[int(x)] for x in rng.integers(0, 2, 6)]
        budget, inflight = float(rng.integers(4, 40)), float(rng.integers(1, 3))
        assert S._stage_dp(layers, budget, inflight, trans) == _stage_dp_full_tables(layers, budget, inflight, trans)


@pytest.mark.parametrize("with_trans", [False, True])
def test_stage_dp_shortcut_keeps_the_dp_choice_on_one_ulp_near_ties(with_trans):
    """_all_fastest skips the DP where one strategy is strictly the fastest, but a strategy 1 ulp slower (ZeRO-2
    beside ZeRO-3 whose gathers overlap: the same time summed another way) ties with it once added to the layers
    before, and the DP's first-index tie-breaking then picks it for every layer but the first. A 300-case random A/B
    against the code before the shortcut (benchmarks/check_search_equivalence.py) found such runners-up: megatron-gpt-
    76.1b with 6 layers on 2 x 8 H100, megatron stack, tp=2, mb=1: ZeRO 2,2,3,2,2,3 before, ZeRO-3 throughout after.
    The shortcut must give the DP's answer exactly (the full-table DP is the reference)."""
    strategies = [LayerStrategy(tp=2, sp=True, dp=4, zero=2), LayerStrategy(tp=2, sp=True, dp=4, zero=3)]
    # ZeRO-2 first (lower index) and 1 ulp slower than ZeRO-3; it keeps less transient memory (no gathers), so the
    # Pareto pruning keeps both
    kind = S._Kind(strategies, np.array([np.nextafter(0.0633700416094302, 1.0), 0.0633700416094302]),
                   np.array([1.0, 0.5]), np.zeros(2), np.array([0, 0]), [(2, True)], gather=np.array([0.0, 1.0]))
    trans = np.zeros((1, 1)) if with_trans else None
    for layers in (1, 2, 3, 4, 5, 8):
        got = S._stage_dp([kind] * layers, 64.0, 1.0, trans)
        assert got == _stage_dp_full_tables([kind] * layers, 64.0, 1.0, trans), layers


def test_one_search_computes_each_layer_cost_once():
    """The search memo (per search call): the DPs' layer costs once per (kind, list of strategies, micro-batch x dp,
    states) as whole columns (cm.layer_costs_columns; counted here per strategy), layer_costs once per (kind,
    strategy, previous class) for the plans scored, and the blocks' sums once per layout, shared by the embedding
    ZeRO variants. llama2-7b on 8 A100: 1,287 strategies costed and 19 block sums for 38 plans scored, 144 of 151
    candidates skipped on a step-time lower bound, the same best plan (1,284, 18 and 36 before stop 33 counted FSDP2
    ZeRO-2's stored parameters sharded, which made a ZeRO-2 layer worth mixing in; 1,157, 25, 52, 131 of 141 before meshwright's
    ZeRO-2/3 layers were costed as the FSDP2 mixed-precision modules they are: bf16 gathers, no autocast copy at
    ZeRO-3, which made mb=2 plans fit; 1,155, 28, 56 and 130 before the rank DPs
    also tried the transient levels below their first answer, whose plans lower the bar sooner; 1,134 and 136 before
    the memo; 798 and 104 for 136 before the rank DPs counted the optimizer step and gradient accumulation and
    scored their refined answers too, #17; 111 for 169 and 99 candidates before ranks whose shared DP ran at a
    rounded-up in-flight count also refined at their own count; 700, 122 and 191 with 100 candidates, none skipped,
    when costs were memoised per strategy: columns cost more strategies, each for far less); the plan is the one of
    tests/unit/test_plan_cli.py's golden."""
    calls = {"layer_costs": 0, "_add_layers": 0, "evaluate_plan": 0}
    originals = {name: getattr(cm, name) for name in calls}

    def counted(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return wrapper

    columns = cm.layer_costs_columns

    def columns_counted(cfg, index, cols, *args, **kwargs):  # the DP's layer_costs, one call per list of strategies
        calls["layer_costs"] += len(cols.strategies)
        return columns(cfg, index, cols, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    try:
        for name in calls:
            mp.setattr(cm, name, counted(name))
        mp.setattr(cm, "layer_costs_columns", columns_counted)
        r = S.search(load_model_config("llama2-7b"), _a100(), 4096, 128)
    finally:
        mp.undo()
    assert r.best is not None and r.candidates == 151 and r.skipped == 144
    assert calls == {"layer_costs": 1287, "_add_layers": 19, "evaluate_plan": 38}


def test_search_pauses_the_cyclic_collector_and_restores_its_state():
    """The candidates are solved with Python's cyclic GC off (full collections walking every object of the
    process cost ~0.1 s per large search) and the collector is left as the caller had it, on or off."""
    seen = []
    original = S._try_micro_batches

    def recording(base, per_replica, out):
        seen.append(gc.isenabled())
        return original(base, per_replica, out)

    mp = pytest.MonkeyPatch()
    was = gc.isenabled()
    try:
        mp.setattr(S, "_try_micro_batches", recording)
        gc.enable()
        assert S.search(load_model_config("tiny"), _a100(), 256, 8).best is not None
        assert gc.isenabled()
        gc.disable()
        assert S.search(load_model_config("tiny"), _a100(), 256, 8).best is not None
        assert not gc.isenabled()
    finally:
        mp.undo()
        (gc.enable if was else gc.disable)()
    assert seen and not any(seen)


def test_search_leaves_no_cyclic_garbage():
    """With the collector paused, whatever the search builds must be freed by reference counting: a reference
    cycle (the refined rank DPs' closures hold the kind table that holds them) kept every candidate's kinds alive
    until the collector ran (184k objects, ~0.1-0.3 s after a 1,024-GPU fp8 search)."""
    refined = []
    original = S._refined_stage_dp

    def counting(*a, **k):
        refined.append(1)
        return original(*a, **k)

    mp = pytest.MonkeyPatch()
    was = gc.isenabled()
    try:
        mp.setattr(S, "_refined_stage_dp", counting)
        gc.collect()
        gc.disable()
        r = S.search(load_model_config("llama2-13b"), load_cluster("dgx-h100-80g", nodes=1), 4096, 64,
                     allow=S.Allow(fp8=True))
        gc.set_debug(gc.DEBUG_SAVEALL)  # keep what the collector finds, to see whose it is
        gc.collect()
        # only the search's own objects: earlier tests' torch.compile state may be released (in cycles) meanwhile
        found = [o for o in gc.garbage if _owner(o).startswith("meshwright")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        mp.undo()
        (gc.enable if was else gc.disable)()
    assert r.best is not None and refined, "the case must run refined rank DPs (their closures made the cycle)"
    assert not found, [type(o).__name__ for o in found[:10]]


def _owner(obj) -> str:
    """The module an object of the collector's garbage belongs to (its function's, or its type's)."""
    if callable(obj) and hasattr(obj, "__module__") and not isinstance(obj, type):
        return getattr(obj, "__module__", "") or ""
    return type(obj).__module__ or ""


def test_runtime_compatible_plans_pass_the_runtime_check():
    """auto_plan and the CLI default emit only what meshwright.parallel.runtime runs unchanged."""
    runtime = pytest.importorskip("meshwright.parallel.runtime")
    for model, cl, nodes, seq, gb in [("tiny", "local-cpu", 2, 64, 16), ("llama2-13b", "dgx-a100-80g", 2, 4096, 256)]:
        cfg = load_model_config(model)
        r = S.search(cfg, load_cluster(cl, nodes=nodes), seq, gb, constraints=S.Constraints(runtime_compatible=True))
        for c in [r.best, *r.runners_up]:
            runtime.check_runtime_support(c.plan, cfg, "dtensor", "torch")
            assert c.plan.embedding.tp == 1
    tc = TrainConfig(model="tiny", cluster="local-cpu", seq_len=64, global_batch=8, micro_batch=4)
    plan = auto_plan(tc, 2)
    runtime.check_runtime_support(plan, load_model_config("tiny"), "dtensor", "torch")
    assert plan.micro_batch == 4


def test_megatron_tp_plans_pass_the_megatron_runtime_check():
    """With tp_backend megatron (``Constraints.megatron_tp``, set by auto_plan from the train config) tp>1 layers come
    without sp, ZeRO-2/3, savers or experts, which megatron-core's parallel linears do not run: every candidate passes
    the runtime's check for that backend (Llama-2-13B held to tp 2, where the unconstrained best uses sp; a tiny MoE
    model, whose MoE layers then stay tp 1)."""
    from meshwright.parallel.support import check_runtime_support

    allow = S.Allow(fp8=True, wta_crs=0.3)
    for model, cl, nodes, seq, gb, tp in [("tiny-moe", "local-cpu", 2, 64, 16, None),
                                          ("llama2-13b", "dgx-a100-80g", 2, 4096, 256, 2)]:
        cfg = load_model_config(model)
        c = S.Constraints(runtime_compatible=True, tp=tp)
        free = S.search(cfg, load_cluster(cl, nodes=nodes), seq, gb, constraints=c, allow=allow)
        r = S.search(cfg, load_cluster(cl, nodes=nodes), seq, gb, constraints=dataclasses.replace(c, megatron_tp=True),
                     allow=allow)
        for cand in [r.best, *r.runners_up]:
            check_runtime_support(cand.plan, cfg, "megatron", "torch")
        if tp:
            assert any(s.sp for s in free.best.plan.layer_strategies())
            assert all(s.tp == tp for cand in [r.best, *r.runners_up] for s in cand.plan.layer_strategies())


def test_hsdp_is_offered_with_node_sized_shards_only_when_dp_spans_nodes():
    assert S.node_shard(64, 1, 8) == 8 and S.node_shard(64, 2, 8) == 4 and S.node_shard(32, 8, 8) is None
    assert S.node_shard(8, 1, 8) is None  # dp inside one node: plain FSDP already shards there
    cfg = load_model_config("llama2-7b")
    strategies = S.layer_strategies(cfg, 0, 64, [1], 4096, S.Constraints(zero=3, recompute="none"), S.Allow(), 1, 64, 256, 8)
    assert {s.dp_shard for s in strategies} == {None, 8}
    r = S.search(cfg, load_cluster("dgx-a100-80g", nodes=8), 4096, 256, constraints=S.Constraints(tp=1, zero=3))
    assert r.best is not None and all(s.dp_shard in (None, 8) for s in r.best.plan.layer_strategies())


# ---- ZeRO-3 gather buffers: a maximum per rank in the search, as in evaluate_plan -------------------

OPT_175B = {"name": "opt-175b", "arch": "gpt2", "vocab_size": 50272, "d_model": 12288, "n_layers": 96, "n_heads": 96,
            "max_seq_len": 2048, "tie_embeddings": True}


def test_zero3_search_reserves_one_gathered_layer_not_one_per_layer():
    """Llama 2 13B, ZeRO-3 on 8 A100 under a budget the judge's figure fits but a per-layer sum of gather
    buffers (40 x 2 layers of bf16) would not: the search finds it and agrees with evaluate_plan."""
    cfg = load_model_config("llama2-13b")
    cluster = _a100()
    c = S.Constraints(tp=1, pp=1, zero=3, recompute="none", micro_batch=1)
    roomy = cm.hardware_from_cluster(cluster, memory_budget_gib=500)
    judge = S.search(cfg, cluster, 4096, 64, hw=roomy, constraints=c).best.prediction.memory_gib[0]
    gather_per_layer = cm.layer_costs(cfg, 0, LayerStrategy(dp=8, zero=3), 1, 4096, roomy)["gathered_bytes"] / cm.GIB
    budget = judge + 1.0
    assert budget < judge + (cfg.n_layers - 1) * gather_per_layer  # the old sum would reject this budget
    hw = cm.hardware_from_cluster(cluster, memory_budget_gib=budget)
    r = S.search(cfg, cluster, 4096, 64, hw=hw, constraints=c)
    assert r.best is not None and r.best.prediction.fits
    assert r.best.prediction.memory_gib[0] == pytest.approx(judge, rel=1e-6)


def test_published_fsdp_layouts_are_expressible():
    """torchtitan Llama 3 8B (FSDP on 8 H100, seq 8192, local batch 1) and OPT-175B (FSDP + Megatron tp 8 on
    992 A100 80 GB, seq 2048, ~2M-token batch; Zhang et al. 2022 sec. 2.3) give feasible ZeRO-3 plans."""
    cfg = load_model_config("llama3-8b")
    r = S.search(cfg, load_cluster("dgx-h100-80g"), 8192, 8, constraints=S.Constraints(tp=1, pp=1, zero=3, micro_batch=1))
    assert r.best is not None and all(s.zero == 3 for s in r.best.plan.layers)
    opt = load_model_config(OPT_175B)
    r = S.search(opt, load_cluster("dgx-a100-80g", nodes=124), 2048, 992,
                 constraints=S.Constraints(tp=8, pp=1, zero=3, micro_batch=1))
    assert r.best is not None and all(s.zero == 3 and s.tp == 8 for s in r.best.plan.layers)
    assert max(r.best.prediction.memory_gib) <= 80.0


def test_tied_embeddings_pipeline_in_the_full_search_and_pay_the_embedding_all_reduce():
    """Megatron and BLOOM pipeline tied embeddings: the last stage keeps a copy and the two gradients are
    all-reduced once per step between the first and last stage."""
    cfg = load_model_config("megatron-gpt-18.4b")
    assert cfg.tie_embeddings
    cluster = _a100(4)
    r = S.search(cfg, cluster, 2048, 256, constraints=S.Constraints(tp=8, pp=4, micro_batch=1))
    assert r.best is not None and r.best.plan.pipeline.degree == 4
    validate_plan(r.best.plan, cfg, 32)
    hw = cm.hardware_from_cluster(cluster)
    bw, lat = cm.link(hw, 2, 8 * 3)
    want = cm.allreduce_s(cfg.vocab_size * cfg.d_model / 8 * hw.policy.reduce_bytes, 2, bw, lat)
    assert cm.tied_embedding_grad_s(cfg, 8, 4, 8, hw) == pytest.approx(want) and want > 0
    assert cm.tied_embedding_grad_s(cfg, 8, 1, 8, hw) == 0.0


# ---- context parallelism (a planner dimension; the runtime rejects it) --------------------------------

LLAMA3_405B = {"name": "llama3-405b", "arch": "llama", "vocab_size": 128256, "d_model": 16384, "n_layers": 126,
               "n_heads": 128, "n_kv_heads": 8, "ffn_hidden": 53248, "max_seq_len": 131072, "rope_theta": 500000.0}


def test_context_parallel_plan_for_long_context_and_ring_cost_by_hand():
    """Llama 3 405B at 128K context (Dubey et al. 2024, Table 4: tp 8, cp 16, pp 16 on 16K H100): no plan fits
    without cp; with cp=16 the search finds one, each rank holds 8K tokens."""
    cfg = load_model_config(LLAMA3_405B)
    cluster = load_cluster("dgx-h100-80g", nodes=2048)
    fixed = dict(tp=8, pp=16, micro_batch=1, recompute="full")
    assert S.search(cfg, cluster, 131072, 16, constraints=S.Constraints(cp=1, **fixed), suggest=False).best is None
    r = S.search(cfg, cluster, 131072, 16, constraints=S.Constraints(cp=16, **fixed), suggest=False)
    assert r.best is not None and all(s.cp == 16 and s.tp == 8 for s in r.best.plan.layers)
    validate_plan(r.best.plan, cfg, 16384)
    assert max(r.best.prediction.memory_gib) <= 80.0
    hw = cm.hardware_from_cluster(cluster)
    kv = 8192 * 2 * 8 / 8 * 128 * 2  # tokens x (K, V) x kv_heads/tp x head_dim x bf16
    bw, lat = cm.link(hw, 16, 8)
    assert cm.cp_ring_s(8192, cfg, 8, 16, hw) == pytest.approx(3 * 15 * (lat + kv / bw))
    from meshwright.parallel.support import check_runtime_support

    with pytest.raises(ConfigError, match="cp"):
        check_runtime_support(r.best.plan, cfg, "dtensor", "torch")
    with pytest.raises(ConfigError, match="cp"):
        S.search(cfg, cluster, 131072 - 8, 16, constraints=S.Constraints(cp=16, **fixed))


def test_llama2_7b_on_one_h200_budget_never_returns_the_layout_that_ran_out_of_memory():
    """Measured on one H200 (issue 17): llama2-7b, seq 4096, mb 1, no recompute went out of memory with 133 GiB
    allocated + 6 GiB reserved. The memory model puts that layout above the 130 GiB budget, and the search's
    best plan fits it."""
    cfg = load_model_config("llama2-7b")
    cluster = load_cluster("dgx-h100-80g", devices_per_node=1)
    roomy = cm.hardware_from_cluster(cluster, memory_budget_gib=400)
    c = S.Constraints(tp=1, pp=1, micro_batch=1, recompute="none", runtime_compatible=True)
    oom = S.search(cfg, cluster, 4096, 8, hw=roomy, constraints=c).best.prediction
    assert max(oom.memory_gib) > 139.0  # what the card had: the layout does not fit
    hw = cm.hardware_from_cluster(cluster, memory_budget_gib=130)
    r = S.search(cfg, cluster, 4096, 8, hw=hw, constraints=S.Constraints(runtime_compatible=True))
    assert r.best is not None and max(r.best.prediction.memory_gib) <= 130.0
    assert any(s.recompute != "none" for s in r.best.plan.layers)


def test_interleaving_depth_is_searched_when_no_depth_splits_the_layers_evenly():
    """Llama 3 405B: 126 layers over pp=16 split evenly at no depth from 3 to 8. Only v=2 was tried (its bubble,
    47% at 16 microbatches, put the 16K-GPU run 16% low); chunks a layer apart are tried at 4 and as deep as the
    layers allow. Where an even depth exists the choice is unchanged (search time)."""
    assert S._interleave_depths(126, 16) == [2, 4, 7]
    assert S._interleave_depths(80, 16) == [2, 5]  # 80 = 16 x 5: the even depth only
    assert S._interleave_depths(48, 2) == [2, 3, 8]
    assert S._interleave_depths(40, 16) == [2]  # fewer than 3 layers per rank: nothing deeper


@pytest.mark.parametrize("stack,dtype,compiled,hw_replace", [
    ("meshwright", None, False, {}), ("meshwright", None, True, {}), ("megatron", None, False, {}),
    ("deepspeed", "fp32", False, {}), ("torchtitan", None, False, {"overlap_slowdown": 0.0}),
    ("meshwright", None, False, {"strategy_overheads": (("tp2", 1e-5, 1e-9), ("zero3", 2e-5, 0.0))}),
    ("meshwright", None, False, {"block_time_measured": True, "layer_overhead_s": 2e-5, "act_scale": 1.15}),
    ("meshwright", None, False, {"lora": True}),  # a LoRA step (Hardware.lora): adapters on every linear
    # attention adapters, replicated over ep (the layout LoRA runs under ep): the gradients' cast up (6 B per adapter
    # parameter on the rank, LoraStep.on_rank) must be the scalar path's at every ep of the MoE blocks
    ("meshwright", None, False, {"lora": ("wq", "wk", "wv", "wo")}),
    ("deepspeed", None, False, {"lora": ("wq", "wk", "wv", "wo")})])
def test_layer_cost_columns_are_layer_costs_bit_for_bit(stack, dtype, compiled, hw_replace):
    """The search's DP costs every strategy of a micro-batch size with cm.layer_costs_columns (whole arrays, each term
    once per group of strategies sharing it); it must give exactly layer_costs(lean=True)'s floats (any difference
    could change a DP's tie-breaking and so a plan), for dense and MoE blocks, every saver, ZeRO level, HSDP, recompute
    and both optimizer state formats."""
    allow = S.Allow.parse(["fp8", "wta-crs", "lemo"])
    for model, cluster, nodes in (("llama2-13b", "dgx-h100-80g", 4), ("mixtral-8x7b", "dgx-h100-80g", 4),
                                  ("gpt2-medium", "dgx-a100-80g", 2)):
        cfg = load_model_config(model)
        cl = load_cluster(cluster, nodes=nodes)
        hw = cm.hardware_from_cluster(cl, stack=stack, dtype=dtype, compile=compiled)
        hw = dataclasses.replace(hw, **hw_replace)
        if hw_replace.get("lora"):
            from meshwright.config import LoraConfig
            from meshwright.memory.lora_cost import lora_step

            every = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
            targets = hw_replace["lora"] if hw_replace["lora"] is not True else every
            hw = dataclasses.replace(hw, lora=lora_step(cfg, LoraConfig(targets=list(targets))))
            if cfg.n_experts:  # the MoE blocks are costed at ep > 1 with LoRA
                assert {s.ep for s in S.layer_strategies(cfg, 0, 16, [1, 2, 4], 2048, S.Constraints(), allow, 1, 16,
                                                         256, cl.devices_per_node)} >= {2, 4}
        allow = dataclasses.replace(allow, fp8_gemm=cm.fp8_matmul_speedup(hw) > 1)
        for index in range(min(cfg.n_layers, 2)):
            for mb in (1, 2):
                strategies = S.layer_strategies(cfg, index, 16, [1, 2, 4], 2048, S.Constraints(), allow, mb, 16, 256,
                                                cl.devices_per_node)
                assert len(strategies) > 50
                mbs = [mb * 16 / s.dp for s in strategies]
                columns = cm.StrategyColumns(cfg, index, strategies, hw)
                for states in ("fp32", "fp8"):
                    parts: dict = {}
                    got = cm.layer_costs_columns(cfg, index, columns, mb * 16, 2048, hw, states, parts)
                    want = [cm.layer_costs(cfg, index, s, m, 2048, hw, states, lean=True)
                            for s, m in zip(strategies, mbs)]
                    assert [tuple(map(float.hex, map(float, g))) for g in got.T] == \
                        [tuple(map(float.hex, map(float, w))) for w in want]
                    # and with the shared cache of terms filled by the other path first
                    again = cm.layer_costs_columns(cfg, index, columns, mb * 16, 2048, hw, states, parts)
                    assert (again == got).all()
                    # and as the search builds the list: one block per tp degree, each costed on its own (#17)
                    blocks = [cm.StrategyColumns(cfg, index, [s for s in strategies if s.tp == t], hw)
                              for t in (1, 2, 4)]
                    joined = cm.StrategyColumns.concat([b for b in blocks if b.strategies])
                    assert joined.strategies == strategies and joined.classes == columns.classes
                    assert all(joined.reps[k] == columns.reps[k] and (joined.idx[k] == columns.idx[k]).all()
                               for k in cm.StrategyColumns.GROUPS)
                    fresh: dict = {}
                    for b in blocks:  # a block costed first (as for a list of the next tp degrees) is reused
                        cm.layer_costs_columns(cfg, index, b, mb * 16, 2048, hw, states, fresh)
                    assert (cm.layer_costs_columns(cfg, index, joined, mb * 16, 2048, hw, states, fresh) == got).all()


def test_runtime_compatible_moe_layers_offer_zero23_with_ep():
    """meshwright's runtime runs ZeRO-2/3 with ep>1 (experts FSDP-sharded over edp, parallel/expert_fsdp.py): the
    runtime-compatible search offers those strategies for an MoE block at the largest dp, never ZeRO-1 with ep>1, and
    every one passes the runtime's own check."""
    from meshwright.parallel.support import check_runtime_support

    cfg = load_model_config("tiny-moe")
    c = S.Constraints(runtime_compatible=True, zero=None)
    got = S.layer_strategies(cfg, 0, 4, [1], 64, c, S.Allow(), 1, 4, 16)
    ep_zero = {(s.ep, s.zero) for s in got}
    assert {(2, 2), (2, 3), (4, 3)} <= ep_zero and not any(e > 1 and z == 1 for e, z in ep_zero)
    for s in got:
        if s.ep > 1:
            plan = plan_from_dict({"model": "tiny-moe", "seq_len": 64, "global_batch": 16, "micro_batch": 1,
                                   "layers": [{**dataclasses.asdict(s), "repeat": cfg.n_layers}]})
            check_runtime_support(plan, cfg, "dtensor", "torch")
