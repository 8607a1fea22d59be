"""meshwright's ZeRO-1 in the planner: ZeroRedundancyOptimizer's whole-parameter partition (uneven shards, the ends'
states sharded too) in place of the per-layer ``/ dp`` count. The partition itself is checked against the runtime's
own in tests/distributed/test_parallel_runtime.py (the 2-rank launch's measured state bytes per rank)."""

from __future__ import annotations

import pytest

from meshwright.config import load_cluster, load_model_config
from meshwright.launcher.planner import cost_model as cm
from meshwright.launcher.planner.zero1_partition import model_params, partition_numels, stage_state_numels
from meshwright.plan import plan_from_dict

GIB = 1024 ** 3


def test_partition_is_greedy_largest_first_per_group_with_running_totals():
    # group 1 largest first: 10 -> r0, 6 -> r1, 5 -> r1 (6 < 10), 4 -> r0 ... running totals carry into group 2
    assert partition_numels([[5, 10, 6, 4]], 2) == [14, 11]
    assert partition_numels([[5, 10, 6, 4], [3, 3]], 2) == [17, 14]  # 3 -> r1 (11), then the tie 14/14 -> r0
    assert partition_numels([[7]], 3) == [7, 0, 0]  # whole parameters: one rank holds it all
    assert partition_numels([[2, 2], [1]], 2) == [3, 2]  # ties: the first rank with the fewest


def _plan(model: str, dp: int, zero: int, pp: int = 1, layers: int | None = None) -> object:
    cfg = load_model_config(model)
    d = {"model": model, "seq_len": 64, "global_batch": 8 * dp, "micro_batch": 1,
         "layers": [{"dp": dp, "zero": zero, "repeat": layers or cfg.n_layers}]}
    if pp > 1:
        d["pipeline"] = {"degree": pp, "schedule": "1f1b", "microbatches": 8}
    return plan_from_dict(d)


@pytest.mark.parametrize("model,dp,pp", [("tiny", 2, 1), ("tiny", 4, 1), ("tiny-gpt2", 2, 2), ("qwen3-0.6b", 8, 1)])
def test_meshwright_zero1_states_are_the_largest_ranks_whole_parameter_share(model, dp, pp):
    """ZeRO-0 holds every state on every rank; meshwright's ZeRO-1 the largest rank's share of whole parameters,
    blocks and ends together: the predicted states differ by exactly (stage parameters - largest share) x 8 B (fp32
    AdamW moments; autocast keeps no master copy), per pipeline rank; the old ``/ dp`` count is below the share
    wherever the partition is uneven (a vocabulary-sized embedding)."""
    cfg = load_model_config(model)
    cluster = load_cluster("local-cpu", nodes=dp * pp)
    hw = cm.hardware_from_cluster(cluster, stack="meshwright", dtype="fp32")
    world = dp * pp
    z0 = cm.evaluate_plan(_plan(model, dp, 0, pp), cfg, hw, world)
    z1 = cm.evaluate_plan(_plan(model, dp, 1, pp), cfg, hw, world)
    share = stage_state_numels(cfg, _plan(model, dp, 1, pp), dp, {})
    layers, ends = model_params(cfg, {})
    ranges = _plan(model, dp, 1, pp).stage_ranges(cfg.n_layers)
    for r in range(pp):
        mods = (("tok_embeddings", "pos_embeddings") if r == 0 else ()) + (("norm", "output") if r == pp - 1 else ())
        held = sum(n for i in range(*ranges[r]) for n, _ in layers[i]) + sum(n for k in mods for n, _ in ends.get(k, []))
        assert share[r] >= held / dp
        saved = (z0.memory_gib[r] - z1.memory_gib[r]) * GIB
        # the framework overhead term scales with the bytes used: compare the states alone on the largest rank
        if pp == 1:
            assert (z0.breakdown["mem_states_gib"] - z1.breakdown["mem_states_gib"]) * GIB == pytest.approx(
                (held - share[r]) * 8, rel=1e-9)
        assert saved > 0
    # tiny's embedding (vocab x d_model) is one whole parameter: the largest share exceeds total/dp
    if model == "tiny" and dp == 4:
        total = sum(n for v in layers.values() for n, _ in v) + sum(n for v in ends.values() for n, _ in v)
        assert share[0] > total / dp


def test_other_stacks_and_mixed_plans_keep_the_per_layer_count():
    """DeepSpeed partitions flat buffers evenly (its ZeRO-1 is ``/ dp``), and a plan the runtime does not run as
    one ZeroRedundancyOptimizer (a tp>1 block) is not corrected."""
    cfg = load_model_config("tiny")
    cluster = load_cluster("local-cpu", nodes=4)
    hw = cm.hardware_from_cluster(cluster, stack="meshwright", dtype="fp32")
    assert cm.runs_zero1(_plan("tiny", 4, 1), hw, 4)
    assert not cm.runs_zero1(_plan("tiny", 4, 0), hw, 4)
    ds = cm.hardware_from_cluster(cluster, stack="deepspeed", dtype="fp32")
    assert not cm.runs_zero1(_plan("tiny", 4, 1), ds, 4)
    mixed = plan_from_dict({"model": "tiny", "seq_len": 64, "global_batch": 8, "micro_batch": 1,
                            "layers": [{"dp": 4, "zero": 1, "repeat": cfg.n_layers - 1}, {"tp": 2, "dp": 2, "zero": 1}]})
    assert not cm.runs_zero1(mixed, hw, 4)


@pytest.mark.parametrize("model", ["tiny", "tiny-gpt2", "tiny-moe", "qwen3-0.6b", "qwen2.5-7b", "gemma-3-1b",
                                   "gemma-2-2b", "mixtral-8x7b", "phi-4",
                                   {"name": "moe-every-2", "n_experts": 4, "moe_every": 2, "moe_ffn_hidden": 96,
                                    "tie_embeddings": True}])
def test_model_params_are_the_built_models(model):
    """``model_params`` counts the parameters from the config (the planner imports no torch: a runtime-compatible
    search plans ZeRO-1, so every ``meshwright plan`` reaches it); per block and per end module, the (numel, is a
    matrix) pairs are those of the model the runtime builds (on the meta device), as multisets: the partition sorts
    each group."""
    from meshwright.models import build_model

    cfg = load_model_config(model)
    layers: dict[int, list] = {}
    ends: dict[str, list] = {}
    for name, p in build_model(cfg, device="meta").named_parameters():
        top, rest = name.split(".", 1)
        entry = (p.numel(), p.dim() >= 2)
        if top == "layers":
            layers.setdefault(int(rest.split(".", 1)[0]), []).append(entry)
        else:
            ends.setdefault(top, []).append(entry)
    got_layers, got_ends = model_params(cfg, {})
    assert {i: sorted(v) for i, v in got_layers.items()} == {i: sorted(v) for i, v in layers.items()}
    assert {k: sorted(v) for k, v in got_ends.items()} == {k: sorted(v) for k, v in ends.items()}
