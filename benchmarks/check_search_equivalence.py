"""Randomised A/B check that two meshwright trees' planners return the same search results (issue #17).

The search-time work on ``meshwright.launcher.planner.search`` was meant to change no plan. This script draws N
random but valid requests (models from configs/models with tied/untied embeddings, fewer layers and sparser MoE
blocks; cluster presets resized to 1..128 nodes; sequence lengths, global batches, Constraints, Allow, optimizer
state formats, the four stacks, compiled blocks, chunked losses, tight memory budgets where memory binds and the
refined DPs run, and requests where nothing fits), runs ``search()`` on each in one process per tree
(``PYTHONPATH=<tree>``), serialises every SearchResult field except ``search_s`` (floats as ``repr``: exact) and
diffs the two. A request both trees refuse with a ConfigError compares its message instead.

    python benchmarks/check_search_equivalence.py --base /tmp/s25base [--new .] [--n 200] [--seed 0]
        [--out /tmp/search_ab]
    python benchmarks/check_search_equivalence.py --dp-probe [--new .] [--n 200] [--seed 0]
    python benchmarks/check_search_equivalence.py --bound-probe [--new .] [--n 200] [--seed 0]

``--dp-probe`` checks the stage-DP shortcut (``_all_fastest``) call by call in one tree: every DP answered with and
without it. It found what 1,300 end-to-end cases missed: 1-ulp near ties where the DP picks another assignment of
the same float time (a runner-up's ZeRO levels differed; tests/unit/test_search.py has the reduced case).

``--bound-probe`` solves every outer candidate and checks each plan scored against the candidate's step-time lower
bound (``_step_lower_bound``), which the search skips candidates on; ``--plans-only`` compares the plans returned,
not the search's diagnostics (a change meant to solve fewer candidates changes the rejections and counts).

Exit status 1 where any case differs; each difference is printed with the case (JSON, replayable with
``--replay``) and the first differing field path with both values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODELS = ["tiny", "tiny-gpt2", "tiny-moe", "gpt2-small", "gpt2-medium", "llama2-7b", "llama2-13b", "llama2-70b",
          "llama3-8b", "llama3-70b", "mixtral-8x7b", "megatron-gpt-1.7b", "megatron-gpt-7.5b", "megatron-gpt-18.4b",
          "megatron-gpt-76.1b", "megatron-gpt-145.6b"]
MOE = {"tiny-moe", "mixtral-8x7b"}
CLUSTERS = ["dgx-a100-80g", "dgx-h100-80g", "dgx-h200-141g", "local-cpu"]
STACKS = ["meshwright", "megatron", "deepspeed", "torchtitan"]


# ---- cases (plain JSON, drawn without importing meshwright: both trees read the same requests) -------------------

def draw_case(rng: random.Random, i: int, seed: int = 0) -> dict[str, Any]:
    """One random request. Degrees are drawn from plausible values; the few combinations a tree refuses are kept
    (both must refuse them with the same message)."""
    model = rng.choice(MODELS)
    overrides: dict[str, Any] = {}
    if rng.random() < 0.25:
        overrides["tie_embeddings"] = rng.random() < 0.5
    if rng.random() < 0.3:
        overrides["n_layers"] = rng.choice([2, 3, 4, 6, 8, 12, 16])
    if model in MOE and rng.random() < 0.3:
        overrides["moe_every"] = 2
    if model in MOE and rng.random() < 0.2:
        overrides["capacity_factor"] = rng.choice([1.0, 1.25])
    cluster = rng.choice(CLUSTERS)
    if cluster == "local-cpu":
        nodes = rng.choice([1, 1, 2, 3, 4, 8])
        seq = rng.choice([64, 128, 256])
    else:
        nodes = rng.choice([1, 1, 1, 2, 2, 3, 4, 6, 8, 16, 32, 64, 128])
        seq = rng.choice([512, 1024, 2048, 3072, 4096, 8192])
    dpn = rng.choice([None, None, None, None, 4, 2])
    gb = rng.choice([8, 16, 24, 32, 48, 64, 96, 128, 256, 384, 512, 1024])
    if nodes >= 32:
        gb = max(gb, rng.choice([512, 1024, 1536, 2048]))
    world = nodes * (dpn or (2 if cluster == "local-cpu" else 8))
    c: dict[str, Any] = {}
    p = 0.12
    if rng.random() < p:
        c["tp"] = rng.choice([1, 2, 4, 8])
    if rng.random() < p:
        c["pp"] = rng.choice([1, 2, 4, 8])
    if rng.random() < p / 2:
        c["dp"] = max(1, world // ((c.get("tp") or 1) * (c.get("pp") or 1)))
    if rng.random() < p:
        c["zero"] = rng.choice([0, 1, 2, 3])
    if rng.random() < p:
        c["recompute"] = rng.choice(["none", "selective", "full"])
    if rng.random() < p:
        c["sp"] = rng.random() < 0.6 if c.get("tp") != 1 else False
    if rng.random() < p:
        c["micro_batch"] = rng.choice([1, 2, 4])
    if model in MOE and rng.random() < 0.3:
        c["ep"] = rng.choice([1, 2, 4, 8] if model == "mixtral-8x7b" else [1, 2, 4])
    if rng.random() < 0.08:
        c["cp"] = rng.choice([2, 4])
    if rng.random() < p / 2:
        c["schedule"] = rng.choice(["gpipe", "1f1b", "interleaved_1f1b"])
    if rng.random() < p / 2:
        c["virtual_stages"] = rng.choice([2, 3, 4])
    if rng.random() < 0.25:
        c["runtime_compatible"] = True
        c.pop("cp", None)
    allow = []
    if rng.random() < 0.3:
        allow.append("fp8")
    if rng.random() < 0.2:
        allow.append(rng.choice(["wta-crs", "wta-crs=0.5", "wta-crs=1.0"]))
    if rng.random() < 0.2:
        allow.append(rng.choice(["lemo", "lemo=0.3", "lemo=0.8"]))
    stack = rng.choice(STACKS)
    case = {"i": i, "model": model, "overrides": overrides, "cluster": cluster, "nodes": nodes,
            "devices_per_node": dpn, "seq_len": seq, "global_batch": gb, "constraints": c, "allow": allow,
            "states": rng.choice([None, None, None, "fp32", "fp8"]), "stack": stack,
            "dtype": "fp32" if rng.random() < 0.08 else None,
            "compiled": stack == "meshwright" and rng.random() < 0.35,
            "loss_chunk_tokens": rng.choice([0, 256, 1024]) if stack == "meshwright" and rng.random() < 0.3 else 0,
            "memory_budget_gib": None, "top": rng.choice([1, 3, 5, 8]), "suggest": rng.random() < 0.8,
            "clamp_seq": rng.random() < 0.95}  # seq_len capped at the model's max_seq_len (else a ConfigError)
    # Hardware as a model or hardware profile leaves it (fixed per search, but other code paths and more exact ties);
    # drawn from a generator of its own so that the other fields of a seed's cases do not depend on it
    extra = random.Random(f"{seed}:{i}")
    if extra.random() < 0.15:
        case["hw_replace"] = extra.choice([{"attention": "materialized"}, {"act_scale": 1.15},
                                           {"block_time_measured": True, "layer_overhead_s": 2e-5},
                                           {"overlap_slowdown": 0.0}, {"contention": 1.3},
                                           {"strategy_overheads": (("tp2", 1e-5, 1e-9), ("zero3", 2e-5, 0.0))}])
    r = rng.random()
    if cluster == "local-cpu":
        if r < 0.3:
            case["memory_budget_gib"] = rng.choice([0.02, 0.05, 0.1, 0.5])
    elif r < 0.3:  # memory binds: the DPs trade time for memory, the refined DPs run
        case["memory_budget_gib"] = rng.choice([4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0])
    elif r < 0.38:  # nothing fits: rejections, min_memory_gib, a suggestion
        case["memory_budget_gib"] = rng.choice([0.5, 1.0, 1.5, 2.0])
    return case


def draw_cases(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [draw_case(rng, i, seed) for i in range(n)]


# ---- worker: runs in the tree under test (PYTHONPATH) ---------------------------------------------------------

def canon(x: Any) -> Any:
    """JSON-able, exact: floats as repr (every bit), tuples as lists, numpy scalars unwrapped, dataclasses expanded."""
    import numpy as np

    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: canon(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): canon(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [canon(v) for v in x]
    if isinstance(x, np.ndarray):
        return [canon(v) for v in x.tolist()]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return "f:" + repr(float(x))
    if x is None or isinstance(x, str):
        return x
    return "repr:" + repr(x)


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    from meshwright.config import load_cluster, load_model_config
    from meshwright.config.io import to_dict
    from meshwright.errors import ConfigError
    from meshwright.launcher.planner import cost_model as cm
    from meshwright.launcher.planner import search as S

    try:
        cfg = load_model_config(case["model"])
        if case["overrides"]:
            d = to_dict(cfg)
            d.update(case["overrides"])
            cfg = load_model_config(d)
        cl = load_cluster(case["cluster"], nodes=case["nodes"], devices_per_node=case["devices_per_node"])
        hw = cm.hardware_from_cluster(cl, memory_budget_gib=case["memory_budget_gib"], stack=case["stack"],
                                      dtype=case["dtype"], compile=case["compiled"],
                                      loss_chunk_tokens=case["loss_chunk_tokens"])
        if case.get("hw_replace"):
            hw = dataclasses.replace(hw, **{k: tuple(map(tuple, v)) if k == "strategy_overheads" else v
                                            for k, v in case["hw_replace"].items()})
        seq = min(case["seq_len"], cfg.max_seq_len) if case["clamp_seq"] else case["seq_len"]
        r = S.search(cfg, cl, seq, case["global_batch"], hw=hw, constraints=S.Constraints(**case["constraints"]),
                     allow=S.Allow.parse(case["allow"]), states=case["states"], top=case["top"], suggest=case["suggest"])
    except ConfigError as exc:
        return {"error": f"ConfigError: {exc}"}
    out = canon(r)
    del out["search_s"]
    return out


def _instrument(counts: dict[str, int]) -> None:
    """Count calls of the DP entry points (module globals, looked up at call time) to report what the cases reached."""
    from meshwright.launcher.planner import search as S

    def wrap(name: str, hit_if_not_none: bool) -> None:
        fn = getattr(S, name, None)
        if fn is None:
            return

        def counted(*a: Any, **kw: Any) -> Any:
            res = fn(*a, **kw)
            counts[name] = counts.get(name, 0) + 1
            if hit_if_not_none and res is not None:
                counts[name + ":hit"] = counts.get(name + ":hit", 0) + 1
            return res

        setattr(S, name, counted)

    wrap("_refined_stage_dp", False)
    wrap("_repair", True)
    wrap("_all_fastest", True)
    wrap("_stage_dp_one_kind_many", True)  # the side-by-side DPs (one count per batch)


def worker(cases_path: str, out_path: str) -> None:
    import meshwright

    cases = json.loads(Path(cases_path).read_text())
    counts: dict[str, int] = {}
    _instrument(counts)
    with open(out_path, "w") as f:
        f.write(json.dumps({"meshwright": meshwright.__file__}) + "\n")
        for case in cases:
            counts.clear()
            t = time.perf_counter()
            res = run_case(case)
            f.write(json.dumps({"i": case["i"], "s": time.perf_counter() - t, "counts": dict(counts), "result": res})
                    + "\n")
            f.flush()


def probe_worker(cases_path: str, out_path: str) -> None:
    """--dp-probe: every stage DP of every case run twice in this tree, with and without the ``_all_fastest``
    shortcut (which skips the DP where one strategy is the fastest); the two answers must be identical. This sees
    the DP answers the end-to-end diff can miss (a differing assignment that ends outside the top plans). Likewise
    every cached layer_costs against a fresh one, and every Pareto pruning against the n x n table before #17."""
    import numpy as np
    from meshwright.launcher.planner import cost_model as cm
    from meshwright.launcher.planner import search as S

    cases = json.loads(Path(cases_path).read_text())
    dp, shortcut = S._stage_dp, S._all_fastest
    stats = {"calls": 0, "shortcut_hits": 0, "mismatches": 0, "layer_costs_cached": 0, "layer_costs_mismatches": 0,
             "pareto_calls": 0, "pareto_mismatches": 0}
    found: list[dict[str, Any]] = []
    current: dict[str, Any] = {}

    def no_shortcut(*a: Any, **kw: Any) -> None:
        return None

    def checked(kinds: list[Any], budget: float, inflight: float, trans_cost: Any, rounding: str = "up") -> Any:
        stats["calls"] += 1
        S._all_fastest = shortcut
        got = dp(kinds, budget, inflight, trans_cost, rounding=rounding)
        S._all_fastest = no_shortcut
        try:
            ref = dp(kinds, budget, inflight, trans_cost, rounding=rounding)
        finally:
            S._all_fastest = shortcut
        if kinds and all(k is kinds[0] for k in kinds) and shortcut(
                kinds[0], len(kinds), budget / S.N_BUCKETS, inflight, trans_cost, rounding) is not None:
            stats["shortcut_hits"] += 1
        if got != ref:
            stats["mismatches"] += 1
            if len(found) < 20:
                k = kinds[0]
                order = np.argsort(k.obj, kind="stable")[:3]
                found.append({"case": current, "layers": len(kinds), "rounding": rounding, "shortcut": canon(got),
                              "dp": canon(ref), "fastest": [(int(j), repr(float(k.obj[j])), repr(k.strategies[j]))
                                                            for j in order]})
        return ref

    columns = cm.layer_costs_columns

    def costs_checked(cfg: Any, index: int, cols: Any, mb_dp: float, seq_len: int, hw: Any, states: str,
                      parts: Any) -> Any:
        """layer_costs_columns with the search's cache of terms against a fresh cache (a field missing from a cache
        key would reuse another strategy's terms), counted per strategy."""
        got = columns(cfg, index, cols, mb_dp, seq_len, hw, states, parts)
        ref = columns(cfg, index, cols, mb_dp, seq_len, hw, states, {})
        stats["layer_costs_cached"] += len(cols.strategies)
        bad = ~(got == ref).all(axis=0)
        if bad.any():
            stats["layer_costs_mismatches"] += int(bad.sum())
            if len(found) < 20:
                j = int(np.flatnonzero(bad)[0])
                found.append({"case": current, "layer_costs": repr(cols.strategies[j]), "cached": canon(got[:, j]),
                              "fresh": canon(ref[:, j])})
        return got

    kind = S._Vectors.kind

    def pareto_checked(self: Any, m_eff: float) -> Any:
        """_Vectors.kind (Pareto pruning per class block) against the n x n table of the code before it."""
        got = kind(self, m_eff)
        stats["pareto_calls"] += 1
        obj = m_eff * self.mb_s + self.step_s
        n = len(self.strategies)
        st, ac, ga = self.static, self.act, self.gather
        cls = np.array([sorted(set(self.classes)).index(c) for c in self.classes], dtype=int)
        same = cls[:, None] == cls[None, :]
        np.fill_diagonal(same, False)
        mem_le = same & (st[None, :] <= st[:, None]) & (ac[None, :] <= ac[:, None]) & (ga[None, :] <= ga[:, None])
        mem_lt = ((st[None, :] < st[:, None]) | (ac[None, :] < ac[:, None]) | (ga[None, :] < ga[:, None])
                  | (np.arange(n)[None, :] < np.arange(n)[:, None]))
        dom = mem_le & (obj[None, :] <= obj[:, None]) & (mem_lt | (obj[None, :] < obj[:, None]))
        keep = np.flatnonzero(~dom.any(axis=1))
        same_kind = ([id(x) for x in got.strategies] == [id(self.strategies[i]) for i in keep]
                     and canon(got.obj) == canon(obj[keep]) and canon(got.static) == canon(st[keep]))
        if not same_kind:
            stats["pareto_mismatches"] += 1
            if len(found) < 20:
                found.append({"case": current, "pareto_kept": len(got.strategies), "table_kept": len(keep)})
        return got

    S._stage_dp = checked
    cm.layer_costs_columns = costs_checked
    S._Vectors.kind = pareto_checked
    for case in cases:
        current = case
        run_case(case)
    Path(out_path).write_text(json.dumps({"stats": stats, "found": found}, indent=1))


def bound_worker(cases_path: str, out_path: str) -> None:
    """Every outer candidate solved (none skipped), each scored plan against the candidate's ``_step_lower_bound``:
    a plan faster than its bound would have been lost by the skipping."""
    from meshwright.launcher.planner import search as S

    cases = json.loads(Path(cases_path).read_text())
    stats = {"candidates": 0, "plans": 0, "violations": 0, "tight": 0}
    found: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    solve = S._solve_candidate

    def checked(o: Any, **kw: Any) -> Any:
        got = solve(o, **kw)
        bound = S._step_lower_bound(o)
        steps = [x.prediction.step_s for x in got.items if isinstance(x, S.Candidate)]
        stats["candidates"] += 1
        stats["plans"] += len(steps)
        stats["tight"] += bool(steps) and bound >= 0.99 * min(steps)
        for t in steps:
            if t < bound:
                stats["violations"] += 1
                if len(found) < 20:
                    found.append({"case": current, "candidate": o.label(), "bound": repr(bound), "step": repr(t)})
        return got

    S._solve_candidate = checked
    S._Collector.add = lambda self, item: self.feasible.append(item)  # the bar stays infinite: nothing is skipped
    for case in cases:
        current = case
        run_case(case)
    Path(out_path).write_text(json.dumps({"stats": stats, "found": found}, indent=1))


# ---- driver ---------------------------------------------------------------------------------------------------

def first_diff(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    if type(a) is not type(b):
        return path, a, b
    if isinstance(a, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{path}.{k}", a.get(k, "<absent>"), b.get(k, "<absent>")
            d = first_diff(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_diff(x, y, f"{path}[{i}]")
            if d:
                return d
        return (f"{path}.len", len(a), len(b)) if len(a) != len(b) else None
    return None if a == b else (path, a, b)


PLAN_FIELDS = ("best", "runners_up", "budget_gib", "min_memory_gib", "suggestion")


def _compared(res: dict[str, Any], plans_only: bool) -> dict[str, Any]:
    """What the A/B compares of one result: everything, or with ``--plans-only`` the plans and what a user reads
    of an infeasible request (a refusal's message either way)."""
    if not plans_only or "error" in res:
        return res
    return {k: res.get(k) for k in PLAN_FIELDS}


def features(res: dict[str, Any]) -> set[str]:
    """What a (canonical) result's plans use, to report what the sample covered."""
    out: set[str] = set()
    if "error" in res:
        return out
    if res["rejected"]:
        out.add("rejections")
    if res["suggestion"]:
        out.add("suggestion")
    if res["min_memory_gib"] is not None:
        out.add("min_memory_gib")
    for cand in ([res["best"]] if res["best"] else []) + res["runners_up"]:
        plan = cand["plan"]
        pp = plan["pipeline"]
        if pp["degree"] > 1:
            out.add("pp>1")
        if pp["schedule"] == "interleaved_1f1b":
            out.add("interleaved")
        if plan["optimizer"]["states"] == "fp8":
            out.add("states fp8")
        kinds = set()
        for s in plan["layers"]:
            out.update(k for k, on in (("tp>1", s["tp"] > 1), ("sp", s["sp"]), ("ep>1", s["ep"] > 1),
                                       ("cp>1", s["cp"] > 1), ("hsdp", s["dp_shard"] is not None),
                                       ("zero3", s["zero"] == 3), ("recompute " + s["recompute"], True),
                                       ("fp8_act", s["savers"]["fp8_act"]), ("fp8_gemm", s["savers"]["fp8_gemm"]),
                                       ("wta_crs", s["savers"]["wta_crs"] is not None),
                                       ("lemo", s["savers"]["lemo"] is not None)) if on)
            kinds.add(json.dumps({k: v for k, v in s.items() if k != "repeat"}, sort_keys=True))
        if len(kinds) > 1:
            out.add("mixed layer strategies")
    return out


def run_tree(tree: str, cases_path: Path, out_path: Path, timeout: float, mode: str = "--worker") -> float:
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()))
    t = time.perf_counter()
    subprocess.run(["nice", "-n", "10", sys.executable, str(Path(__file__).resolve()), mode, str(cases_path),
                    str(out_path)], env=env, check=True, timeout=timeout)
    return time.perf_counter() - t


def _probe(tree: str, cases_path: Path, out_path: Path, timeout: float, mode: str, label: str
           ) -> tuple[dict[str, Any], float]:
    """Run one in-tree probe worker; print what it found under ``label``; return its stats and seconds."""
    t = run_tree(tree, cases_path, out_path, timeout, mode)
    got = json.loads(out_path.read_text())
    for f in got["found"]:
        print(f"{label} {json.dumps(f)}")
    return got["stats"], t


def load_results(path: Path) -> tuple[str, dict[int, dict[str, Any]]]:
    lines = path.read_text().splitlines()
    return json.loads(lines[0])["meshwright"], {r["i"]: r for r in map(json.loads, lines[1:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="the reference tree (old code)")
    ap.add_argument("--new", default=str(Path(__file__).resolve().parents[1]), help="the tree under test")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/search_ab")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per tree")
    ap.add_argument("--plans-only", action="store_true",
                    help="compare the plans returned (best, runners-up, their predictions, the smallest memory need, "
                         "the suggestion) but not the search's diagnostics (rejections, candidate count): for a "
                         "change meant to solve fewer candidates, not to return other plans")
    ap.add_argument("--replay", help="a case as JSON (from a difference report): run it on both trees only")
    ap.add_argument("--dp-probe", action="store_true",
                    help="instead of the A/B: in the --new tree only, every stage DP with and without the "
                         "_all_fastest shortcut")
    ap.add_argument("--bound-probe", action="store_true",
                    help="instead of the A/B: in the --new tree only, every candidate solved and each plan checked "
                         "against the candidate's step-time lower bound (a plan below it would be lost to skipping)")
    ap.add_argument("--bound-worker", nargs=2, metavar=("CASES", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=2, metavar=("CASES", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--probe-worker", nargs=2, metavar=("CASES", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(*a.worker)
        return 0
    if a.probe_worker:
        probe_worker(*a.probe_worker)
        return 0
    if a.bound_worker:
        bound_worker(*a.bound_worker)
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = [json.loads(a.replay)] if a.replay else draw_cases(a.n, a.seed)
    cases_path = out / "cases.json"
    cases_path.write_text(json.dumps(cases, indent=1))
    if a.bound_probe:
        st, t = _probe(a.new, cases_path, out / "bounds.json", a.timeout, "--bound-worker", "BELOW BOUND")
        print(f"{len(cases)} cases ({t:.0f} s): {st['candidates']} candidates solved, {st['plans']} plans scored, "
              f"{st['violations']} faster than their candidate's bound; {st['tight']} candidates' bounds within 1% "
              f"of their best plan")
        return 1 if st["violations"] else 0
    if a.dp_probe:
        st, t = _probe(a.new, cases_path, out / "probe.json", a.timeout, "--probe-worker", "MISMATCH")
        print(f"{len(cases)} cases ({t:.0f} s): {st['calls']} stage DPs, {st['shortcut_hits']} answered by the "
              f"shortcut, {st['mismatches']} differ from the DP's answer; {st['layer_costs_cached']} cached "
              f"layer_costs, {st['layer_costs_mismatches']} differ from a fresh one; {st['pareto_calls']} Pareto "
              f"prunings, {st['pareto_mismatches']} differ from the n x n table")
        return 1 if st["mismatches"] or st["layer_costs_mismatches"] or st["pareto_mismatches"] else 0
    if not a.base:
        ap.error("--base is required")
    secs = {}
    for name, tree in (("base", a.base), ("new", a.new)):
        secs[name] = run_tree(tree, cases_path, out / f"{name}.jsonl", a.timeout)
    where_a, ra = load_results(out / "base.jsonl")
    where_b, rb = load_results(out / "new.jsonl")
    print(f"base: {where_a} ({secs['base']:.0f} s)\nnew:  {where_b} ({secs['new']:.0f} s)")
    if where_a == where_b:
        print("both runs imported the same meshwright: check --base/--new")
        return 2
    diffs = errors = infeasible = 0
    reach: dict[str, int] = {}
    covered: dict[str, int] = {}
    for case in cases:
        x, y = ra[case["i"]], rb[case["i"]]
        res = y["result"]
        if "error" in res:
            errors += 1
        elif res["best"] is None:
            infeasible += 1
        for k in features(res):
            covered[k] = covered.get(k, 0) + 1
        for k, v in y["counts"].items():
            if v:
                reach[k] = reach.get(k, 0) + 1
        d = first_diff(_compared(x["result"], a.plans_only), _compared(y["result"], a.plans_only))
        if d:
            diffs += 1
            print(f"DIFF case {json.dumps(case)}\n  field {d[0]}: base {d[1]!r} new {d[2]!r}")
    n = len(cases)
    print(f"{n} cases: {diffs} differ; {errors} refused by both with a ConfigError compared; {infeasible} infeasible; "
          f"{n - errors - infeasible} with a plan")
    print("cases reaching (new tree): " + ", ".join(f"{k} {v}" for k, v in sorted(reach.items())))
    print("cases whose plans use (new tree): " + ", ".join(f"{k} {v}" for k, v in sorted(covered.items())))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
