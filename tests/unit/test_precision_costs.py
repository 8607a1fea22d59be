"""The precision policies' own costs, from the consumers' code (issue: costs left optimistic).

DeepSpeed's BF16_Optimizer (what the pipeline engine builds for bf16 at ZeRO-0, and deepspeed-fp32-accum at ZeRO-1):
the whole gradient buffer all-reduced after backward, the bf16 parameters all-gathered after each step, neither
overlapped. FSDP2's MixedPrecisionPolicy: each all-gather casts the rank's fp32 shard to bf16 first; autocast then
casts nothing for that layer. Each quantity by hand, for a fixed small configuration."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from meshwright.cli import main
from meshwright.config import load_cluster, load_model_config
from meshwright.launcher.planner import cost_model as cm
from meshwright.launcher.planner import stack as stack_mod
from meshwright.plan import EmbeddingStrategy, LayerStrategy, PipelineSpec, Plan, plan_from_dict

N = 1e8  # parameters on one tp shard


def _hw(stack: str, nodes: int = 1) -> cm.Hardware:
    return cm.hardware_from_cluster(load_cluster("dgx-a100-80g", nodes=nodes), stack=stack)


# ---- DeepSpeed BF16_Optimizer --------------------------------------------------------------------

def test_bf16_optimizer_all_reduces_then_all_gathers_after_the_step():
    hw = _hw("deepspeed")
    piped = cm.for_pipeline(hw, 2)
    assert piped.policy_at(0).name == "bf16_bf16_accum" and piped.policy_at(0).step_gather
    bw, lat = cm.link(hw, 8, 1)
    ar = cm.allreduce_s(N * 2, 8, bw, lat)  # the bf16 accumulation buffer, in bf16 (communication_data_type)
    ag = cm.allgather_s(N * 2, 8, bw, lat)  # the updated bf16 parameters from their dp partitions
    assert cm.dp_comm_s(N, 8, 0, 1, piped) == (0.0, pytest.approx(ar + ag))
    # without a pipeline, bf16 ZeRO-0 is DeepSpeed's plain optimizer: one all-reduce
    assert cm.dp_comm_s(N, 8, 0, 1, hw) == (0.0, pytest.approx(ar))
    # the pipeline engine's ZeRO-1 is DeepSpeedZeroOptimizer (bf16 accumulation): its all-reduce-sized step
    assert cm.dp_comm_s(N, 8, 1, 1, piped) == (0.0, pytest.approx(ar))
    # the fp32-accumulation stack's BF16_Optimizer: its fp32 buffer goes over the wire in bf16, then the gather
    fp32acc = _hw("deepspeed-fp32-accum")
    assert cm.dp_comm_s(N, 8, 1, 1, fp32acc) == (0.0, pytest.approx(ar + ag))
    # DeepSpeed builds BF16_Optimizer at ZeRO-0/1 only: the policy's ZeRO-3 keeps ZeRO-3's collectives
    rs = cm.reduce_scatter_s(N * 2, 8, bw, lat)
    assert cm.dp_comm_s(N, 8, 3, 1, fp32acc) == (pytest.approx(2 * ag + rs), 0.0) and fp32acc.dp_overlapped(3)


def test_bf16_optimizer_step_traffic_is_not_hidden_under_backward():
    cfg = load_model_config("llama2-7b")
    hw = _hw("deepspeed")
    piped = cm.for_pipeline(hw, 2)
    s = LayerStrategy(dp=8, zero=0)
    c = cm.layer_costs(cfg, 0, s, 1, 4096, piped)
    assert not c["dp_overlapped"] and cm.layer_step_dp_s(c, piped) == c["dp_step"]
    lean = cm.layer_costs(cfg, 0, s, 1, 4096, piped, lean=True)
    assert lean[1] == pytest.approx(c["dp_step"] + c["opt_step"])
    # DeepSpeed's ZeRO-0 engine without a pipeline overlaps its all-reduce with backward
    plain = cm.layer_costs(cfg, 0, s, 1, 4096, hw)
    assert plain["dp_overlapped"] and cm.layer_step_dp_s(plain, hw) < plain["dp_step"]
    # the search's column form says the same
    cols = cm.StrategyColumns(cfg, 0, [s, LayerStrategy(dp=8, zero=1)], piped)
    got = cm.layer_costs_columns(cfg, 0, cols, 8, 4096, piped, "fp32", {})
    assert got[1][0] == lean[1] and got[1][1] == cm.layer_costs(cfg, 0, LayerStrategy(dp=8, zero=1), 1, 4096, piped,
                                                                lean=True)[1]


def test_bf16_optimizer_plan_step_and_reported_precision(capsys):
    cfg = load_model_config("llama2-7b")
    hw = _hw("deepspeed", nodes=2)
    plan = Plan(model="llama2-7b", seq_len=4096, global_batch=64, micro_batch=1,
                layers=[LayerStrategy(dp=8, zero=0, repeat=cfg.n_layers)],
                pipeline=PipelineSpec(degree=2, microbatches=8))
    p = cm.evaluate_plan(plan, cfg, hw, 16)
    layer = cfg.layer_params(0)
    piped = cm.for_pipeline(hw, 2)
    # the blocks' DP seconds per step and stage: each layer's all-reduce + all-gather (16 layers per stage)
    bw, lat = cm.link(piped, 8, 1)
    per_layer = cm.allreduce_s(layer * 2, 8, bw, lat) + cm.allgather_s(layer * 2, 8, bw, lat)
    assert p.breakdown["dp_comm_s"] == pytest.approx(cfg.n_layers * per_layer / 2)
    assert cm.plan_precision(plan, hw) == "bf16_bf16_accum"
    assert cm.plan_precision(dataclasses.replace(plan, pipeline=PipelineSpec()), hw) == "bf16"
    # the plan JSON names the optimizer's policy, not the stack's default
    args = ["plan", "--model", "llama2-7b", "--cluster", "dgx-a100-80g", "--nodes", "2", "--seq-len", "4096",
            "--global-batch", "64", "--tp", "1", "--pp", "2", "--zero", "0", "--micro-batch", "1", "--stack",
            "deepspeed", "--json", "--memory-budget-gib", "400"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    # (the search leaves the embedding's ZeRO stage free: here ZeRO-1, costed with DeepSpeed's ZeRO optimizer)
    assert data["stack"] == "deepspeed" and data["precision"].split("+")[0] == "bf16_bf16_accum"
    assert data["precision"] == cm.plan_precision(plan_from_dict(data["plan"]), hw)


def test_deepspeed_source_does_what_the_costs_say():
    """The DeepSpeed code the costs come from (0.19.8 in the venv): reduction, gather and dtypes."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime import engine
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.pipe.engine import PipelineEngine

    assert "buffered_allreduce_fallback" in inspect.getsource(PipelineEngine._bf16_reduce_grads)
    assert "all_gather_dp_groups" in inspect.getsource(BF16_Optimizer.update_lp_params)
    assert "dist.all_reduce" in inspect.getsource(engine.DeepSpeedEngine.allreduce_bucket)
    comm = inspect.getsource(engine.DeepSpeedEngine.communication_data_type.fget)
    assert "bfloat16_enabled" in comm and "torch.bfloat16" in comm
    assert "self.enable_backward_allreduce = False" in inspect.getsource(PipelineEngine.__init__)


# ---- FSDP2 MixedPrecisionPolicy and autocast ------------------------------------------------------

def test_fsdp_casts_per_gather_by_hand():
    hw = _hw("torchtitan")
    bw = hw.mem_bw
    # ZeRO-3: forward gather + backward re-gather, each reading the fp32 shard (4) and writing bf16 (2)
    assert cm.fsdp_cast_s(N, 8, 3, hw) == (pytest.approx(2 * N / 8 * 6 / bw), 0.0)
    # ZeRO-2: gathered once per step
    assert cm.fsdp_cast_s(N, 8, 2, hw) == (0.0, pytest.approx(N / 8 * 6 / bw))
    # DDP-like (fully_shard over a one-rank shard mesh): the whole weight, forward and backward
    assert cm.fsdp_cast_s(N, 8, 0, hw) == (pytest.approx(2 * N * 6 / bw), 0.0)
    # reduce_dtype bf16: the reduce-scatter output (a shard) cast back to fp32 every microbatch (2 + 4 B)
    pol = dataclasses.replace(stack_mod.PRECISIONS["fsdp_mixed"], name="fsdp_bf16_reduce", reduce_bytes=2)
    stack_mod.PRECISIONS["fsdp_bf16_reduce"] = pol
    try:
        h = dataclasses.replace(hw, precision="fsdp_bf16_reduce")
        assert cm.fsdp_cast_s(N, 8, 3, h) == (pytest.approx((2 * N / 8 * 6 + N / 8 * 6) / bw), 0.0)
    finally:
        del stack_mod.PRECISIONS["fsdp_bf16_reduce"]
    # FSDP2 adds each microbatch's reduced fp32 shard into .grad (read 4 + 4, write 4 B), as autocast's runtime does
    assert cm.grad_accumulation_s(N, 8, 3, hw) == (pytest.approx(N / 8 * 12 / bw), 0.0)
    assert cm.grad_accumulation_s(N, 8, 0, hw) == (pytest.approx(N * 12 / bw), 0.0)
    assert cm.grad_accumulate_s(N, _hw("megatron")) == 0.0
    # torchtitan on pp>1 layouts: torch.distributed.pipelining turns FSDP2's sync and resharding off but for the last
    # microbatch, and reshard_after_forward = not pp_enabled: one gather (one cast) and one reduction per step, after
    # all backwards; the stage's bf16 weights and unsharded fp32 gradients alive through the step
    piped = cm.for_pipeline(hw, 4)
    assert piped.fsdp_deferred(3) and piped.fsdp_deferred(0) and not hw.fsdp_deferred(3)
    assert not cm.reshards_after_forward(3, piped) and cm.reshards_after_forward(3, hw)
    assert cm.fsdp_cast_s(N, 8, 3, piped) == (0.0, pytest.approx(N / 8 * 6 / bw))
    assert cm.fsdp_cast_s(N, 8, 0, piped) == (0.0, pytest.approx(N * 6 / bw))
    assert (cm.weight_copy_bytes(0, piped), cm.weight_copy_bytes(3, piped), cm.weight_copy_bytes(3, hw)) == (2, 2, 0)
    link = cm.link(hw, 8, 1)
    ag, rs = cm.allgather_s(N * 2, 8, *link), cm.reduce_scatter_s(N * 4, 8, *link)
    assert cm.dp_comm_s(N, 8, 3, 1, piped) == (0.0, pytest.approx(ag + rs))
    assert cm.dp_comm_s(N, 8, 0, 1, piped) == (0.0, pytest.approx(cm.allreduce_s(N * 4, 8, *link)))
    assert cm.dp_comm_s(N, 8, 3, 1, hw) == (pytest.approx(2 * ag + rs), 0.0)
    assert not piped.dp_overlapped(3) and hw.dp_overlapped(0)
    # the unsharded bf16 gradient added into its fp32 accumulator (2 + 4 read, 4 written) per microbatch after the
    # first, whose gradient is cast into it (2 + 4) once per step
    assert cm.grad_accumulation_s(N, 8, 3, piped) == (pytest.approx(N * 10 / bw), pytest.approx(N * 6 / bw))
    assert cm.model_state_bytes(N, 8, 3, "fp32", piped)["grads"] == N * 4
    # no MixedPrecisionPolicy, no cast: Megatron's bf16 weights, autocast's DDP layers
    assert cm.fsdp_cast_s(N, 8, 3, _hw("megatron")) == (0.0, 0.0)
    assert cm.fsdp_cast_s(N, 8, 0, _hw("meshwright")) == (0.0, 0.0)


def test_fsdp_mixed_layer_pays_its_casts():
    cfg = load_model_config("llama2-7b")
    hw = _hw("torchtitan")
    n = cfg.layer_params(0)
    s = LayerStrategy(dp=8, zero=3)
    c = cm.layer_costs(cfg, 0, s, 1, 4096, hw)
    assert c["cast_mb"] == pytest.approx(2 * n / 8 * 6 / hw.mem_bw)
    bare = dataclasses.replace(hw, precision="bf16")  # the same layer with no cast at all (and bf16 gathers)
    assert c["compute_mb"] == pytest.approx(cm.layer_costs(cfg, 0, s, 1, 4096, bare)["compute_mb"] + c["cast_mb"])
    for h in (hw, cm.for_pipeline(hw, 4)):  # the search's column form: the same floats, with and without a pipeline
        cols = cm.StrategyColumns(cfg, 0, [s, LayerStrategy(dp=8, zero=0)], h)
        got = cm.layer_costs_columns(cfg, 0, cols, 8, 4096, h, "fp32", {})
        for i, st in enumerate(cols.strategies):
            assert tuple(got[:, i]) == cm.layer_costs(cfg, 0, st, 1, 4096, h, lean=True)[:6]


def test_autocast_casts_only_what_fsdp_does_not():
    """meshwright's runtime: autocast casts the weights of its DDP/ZeRO-1 layers (once per forward, again in a
    recomputation, plus the gradient up-cast); its ZeRO-2/3 layers are FSDP2 modules with bf16 param_dtype whose
    weights reach autocast in bf16 (nothing to cast or cache), so the all-gathers' casts replace autocast's."""
    cfg = load_model_config("llama2-7b")
    hw = _hw("meshwright")
    n = cfg.layer_params(0)
    z0 = cm.layer_costs(cfg, 0, LayerStrategy(dp=8, zero=0), 1, 4096, hw)
    z0rc = cm.layer_costs(cfg, 0, LayerStrategy(dp=8, zero=0, recompute="full"), 1, 4096, hw)
    assert cm.weight_traffic_mb_s(n, "none", hw, 0) == pytest.approx(n * 12 / hw.mem_bw) and z0["cast_mb"] == 0.0
    assert cm.weight_traffic_mb_s(n, "full", hw, 0) == pytest.approx(n * 18 / hw.mem_bw)
    assert z0["copy_bytes"] == n * 2 and z0rc["copy_bytes"] == n * 2
    z3 = cm.layer_costs(cfg, 0, LayerStrategy(dp=8, zero=3), 1, 4096, hw)
    assert cm.weight_traffic_mb_s(n, "none", hw, 3) == 0.0
    assert z3["cast_mb"] == pytest.approx(2 * n / 8 * 6 / hw.mem_bw)
    assert z3["copy_bytes"] == 0.0  # no autocast cache; the gathered bf16 layer is the ZeRO-3 transient
    # the gathered layer, its prefetched successor and its unsharded gradient, all bf16 (was fp32: 4 B)
    assert z3["gathered_bytes"] == pytest.approx(n * 2 * 3)
    # meshwright's ZeRO-3 reshards after forward on pp>1 layouts too (reshard_after_forward=(zero == 3))
    assert cm.fsdp_cast_s(n, 8, 3, cm.for_pipeline(hw, 4)) == cm.fsdp_cast_s(n, 8, 3, hw)
    z2 = cm.layer_costs(cfg, 0, LayerStrategy(dp=8, zero=2), 1, 4096, hw)
    assert z2["cast_mb"] == 0.0 and z2["copy_bytes"] == n * 2  # FSDP's unsharded bf16 weights, kept all step
    assert z2["opt_step"] == pytest.approx(cm.optimizer_step_s(n, 8, 2, "fp32", hw) + n / 8 * 6 / hw.mem_bw)


def test_torch_fsdp_source_does_what_the_costs_say():
    """The torch FSDP2 code the casts come from: the fp32 shard copied into a param_dtype buffer per all-gather, the
    reduce-scatter output cast back to the parameters' dtype."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as coll

    src = inspect.getsource(coll._get_param_all_gather_inputs)
    assert "dtype=param_dtype" in src and "torch._foreach_copy_(splits, foreach_copy_inputs)" in src
    assert "_to_dtype_if_needed(reduce_output, orig_dtype)" in inspect.getsource(coll.foreach_reduce)


def test_head_copy_follows_the_layers_rule():
    """The head's compute-dtype copy in the ends' states is the one ``weight_copy_bytes`` counts: autocast's at
    ZeRO-0/1, none at meshwright's ZeRO-3 (FSDP2 hands autocast bf16 weights), the gathered bf16 head where
    torchtitan's pipeline keeps it gathered; the plan's memory terms and the ends' states agree."""
    cfg = load_model_config("llama2-7b")
    head = cfg.vocab_size * cfg.d_model
    mesh = _hw("meshwright")
    states = lambda h, z: cm.embedding_static_bytes(cfg, False, True, 1, 8, z, "fp32", h)  # noqa: E731
    no_copy = lambda h, z: sum(cm.model_state_bytes(cm.embedding_param_count(cfg, False, True, 1), 8, z, "fp32",  # noqa: E731
                                                    h).values())
    assert states(mesh, 0) - no_copy(mesh, 0) == head * 2 and states(mesh, 3) == no_copy(mesh, 3)
    titan = cm.for_pipeline(_hw("torchtitan"), 2)
    assert states(titan, 3) - no_copy(titan, 3) == head * 2
    plan = Plan(model="llama2-7b", seq_len=4096, global_batch=16, micro_batch=1,
                layers=[LayerStrategy(dp=8, zero=3, repeat=cfg.n_layers)], embedding=EmbeddingStrategy(zero=3))
    p = cm.evaluate_plan(plan, cfg, mesh, 8)
    assert p.breakdown["mem_weight_copies_gib"] == 0.0
