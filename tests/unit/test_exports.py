"""Exports checked against their consumers' own code: Megatron-LM's parser and validate_args (pinned copy),
DeepSpeed's DeepSpeedConfig and pipeline-engine rules (installed), torchtitan's config dataclasses (pinned
copy) and its pipeline stage rules; and ``plan --emit X`` keeps to layouts X runs."""

from __future__ import annotations

import json
import shlex

import pytest

from consumers.loaders import megatron_parser, megatron_validate, torchtitan_configs
from meshwright.cli import main
from meshwright.config import TrainConfig, load_model_config
from meshwright.launcher.planner import export as exports
from meshwright.launcher.planner.search import Constraints
from meshwright.plan import plan_from_dict, validate_plan


def _plan(model: str, world: int, pp: int = 1, schedule: str = "1f1b", v: int = 1, stages=None, gb: int = 1024, **layer):
    cfg = load_model_config(model)
    layer.setdefault("dp", world // (pp * layer.get("tp", 1)))
    dp = layer["dp"]
    layers = [{**layer, "repeat": cfg.n_layers}]
    plan = plan_from_dict({"model": model, "seq_len": 4096, "global_batch": gb, "micro_batch": 1,
                           "pipeline": {"degree": pp, "schedule": schedule, "virtual_stages": v,
                                        "microbatches": gb // dp if pp > 1 else 1, "stages": stages or []},
                           "layers": layers})
    validate_plan(plan, cfg, world)
    return plan, cfg


# 16 DGX-A100 nodes (128 GPUs) and variants, as in the issue
CASES = {
    "llama2-70b tp8 pp8 zero1": (("llama2-70b", 128), dict(pp=8, tp=8, sp=True, zero=1, recompute="selective")),
    "llama2-70b tp8 pp4 zero2 interleaved": (("llama2-70b", 128), dict(pp=4, schedule="interleaved_1f1b", v=2, tp=8, sp=True, zero=2)),
    "llama2-70b tp4 pp1 zero3 full": (("llama2-70b", 128), dict(tp=4, sp=True, zero=3, recompute="full")),
    "llama2-70b tp8 pp2 zero3 (fsdp refused with pp)": (("llama2-70b", 128), dict(pp=2, tp=8, sp=True, zero=3)),
    "llama2-70b hsdp zero2": (("llama2-70b", 128), dict(tp=8, sp=True, zero=2, dp_shard=8)),
    "llama2-70b uneven stages": (("llama2-70b", 128), dict(pp=4, tp=8, sp=True, zero=1, stages=[[0, 18], [18, 39], [39, 60], [60, 80]])),
    "llama3-70b tp8 pp4": (("llama3-70b", 128), dict(pp=4, tp=8, sp=True, zero=1)),
    "mixtral ep8 tp2 pp2": (("mixtral-8x7b", 128), dict(pp=2, tp=2, sp=True, zero=1, ep=8)),
    "mixtral ep4 zero0": (("mixtral-8x7b", 16), dict(tp=2, sp=True, ep=4, gb=256)),
    "qwen3-8b tp4 pp2": (("qwen3-8b", 64), dict(pp=2, tp=4, sp=True, zero=1)),
    "qwen2.5-7b tp4 qkv bias": (("qwen2.5-7b", 32), dict(tp=4, sp=True, zero=1, gb=256)),  # 28 heads, 4 kv heads
    "qwen3-0.6b zero3 (fsdp refused with tied embeddings)": (("qwen3-0.6b", 16), dict(tp=2, zero=3, gb=256)),
    "qwen3-0.6b tp2": (("qwen3-0.6b", 16), dict(tp=2, sp=True, zero=1, gb=256)),  # head_dim 128 on d_model 1024
    "phi-4 tp2 pp4": (("phi-4", 64), dict(pp=4, tp=2, sp=True, zero=1, gb=256)),  # 10 kv heads: tp 2, 5 or 10
}


_LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}

_PHI_LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 4096, "attention_factor": 1.19,
                 "short_factor": [1.0 + i / 64 for i in range(64)], "long_factor": [2.0 + i / 8 for i in range(64)]}

def _case(name):
    (model, world), kw = CASES[name]
    return (*_plan(model, world, **kw), world)


@pytest.mark.parametrize("dtype", exports.DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_megatron_export_passes_megatron_validate_args(name, dtype):
    import torch

    plan, cfg, world = _case(name)
    args, notes = exports.megatron_args(plan, cfg, TrainConfig(lr=1.5e-4, min_lr=1.5e-5, steps=1000, warmup_steps=100),
                                        dtype)
    parser_opts = {o for a in megatron_parser()._actions for o in a.option_strings}
    assert [a for a in args if a.startswith("--") and a not in parser_opts] == []
    ns = megatron_validate(args, world, exports.megatron_env(plan, cfg))
    # the plan's dtype as validate_args resolves it: bf16 params with fp32 main gradients, or fp32 throughout
    assert ns.params_dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    assert ns.bf16 == (dtype == "bf16") and not ns.fp16
    assert ns.main_grads_dtype == torch.float32 and ns.accumulate_allreduce_grads_in_fp32 == (dtype == "bf16")
    s = plan.layer_strategies()[0]
    assert ns.tensor_model_parallel_size == s.tp and ns.pipeline_model_parallel_size == plan.pipeline.degree
    assert ns.data_parallel_size == world // (s.tp * plan.pipeline.degree)
    assert ns.rotary_base == int(cfg.rope_theta) and ns.attention_dropout == 0 and ns.hidden_dropout == 0
    assert ns.kv_channels == cfg.head_dim and ns.qk_layernorm == cfg.qk_norm  # Qwen3: head_dim apart, q/k norms
    assert not ns.add_bias_linear and ns.add_qkv_bias == cfg.qkv_bias  # Qwen2: biases on q/k/v only
    assert ns.lr == 1.5e-4 and ns.train_iters == 1000 and ns.adam_beta2 == 0.95
    fsdp = s.zero == 3 and plan.pipeline.degree == 1 and s.ep == 1 and not cfg.tie_embeddings
    assert ns.use_torch_fsdp2 == fsdp and ns.use_distributed_optimizer == (s.zero >= 1 and not fsdp)
    if not fsdp:
        assert ns.overlap_grad_reduce
    if s.zero == 2:
        assert any("not the gradients" in n for n in notes)
    if s.zero == 3 and not fsdp:
        assert any("--use-torch-fsdp2 needs " + ("untied" if cfg.tie_embeddings else "pp=1") in n for n in notes)
    if s.dp_shard:
        assert ns.num_distributed_optimizer_instances == s.dp // s.dp_shard
    if plan.pipeline.degree > 1:  # the exact planned split, virtual stages included
        from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

        layout = PipelineParallelLayerLayout(ns.pipeline_model_parallel_layout, plan.pipeline.degree)
        layout.validate_layer_layout(num_layers=cfg.n_layers, mtp_num_layers=None)
        assert (ns.virtual_pipeline_model_parallel_size or 1) == plan.pipeline.virtual_stages
        sizes = [b - a for a, b in plan.stage_ranges(cfg.n_layers)]
        from megatron.core.transformer.enums import LayerType

        flat = [sum(1 for t in stage if t == LayerType.decoder)
                for stage in PipelineParallelLayerLayout.parse_str_to_list(ns.pipeline_model_parallel_layout)]
        assert flat == sizes
    if cfg.n_experts:
        assert ns.moe_aux_loss_coeff == cfg.aux_loss_coef and ns.num_experts == cfg.n_experts
        assert ns.expert_model_parallel_size == s.ep
        # the experts sharded over tp as the planner costs them on this stack (Stack.experts_tp_sharded)
        assert ns.expert_tensor_parallel_size == s.tp


def test_megatron_fsdp_export_leaves_max_connections_alone():
    plan, cfg, world = _case("llama2-70b tp4 pp1 zero3 full")
    args, notes = exports.megatron_args(plan, cfg)
    assert exports.megatron_env(plan, cfg) == {} and any("unset or > 1" in n for n in notes)
    with pytest.raises(AssertionError, match="FSDP always requires CUDA_DEVICE_MAX_CONNECTIONS"):
        megatron_validate(args, world, {"CUDA_DEVICE_MAX_CONNECTIONS": "1"})


def test_megatron_validate_args_catches_what_the_old_export_got_wrong():
    """The harness is not a rubber stamp: FSDP2 with pp>1, and tp>1 without CUDA_DEVICE_MAX_CONNECTIONS, fail."""
    plan, cfg, world = _case("llama2-70b tp8 pp2 zero3 (fsdp refused with pp)")
    args, _ = exports.megatron_args(plan, cfg)
    bad = [a for a in args if a not in ("--use-distributed-optimizer", "--overlap-param-gather")] + ["--use-torch-fsdp2"]
    with pytest.raises(AssertionError, match="pipeline parallelism"):
        megatron_validate(bad, world, {"CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    with pytest.raises(AssertionError, match="CUDA_DEVICE_MAX_CONNECTIONS"):
        megatron_validate(args, world, {})


def _ds_config(conf, dp, monkeypatch):
    import deepspeed.runtime.config as dsc

    class MPU:
        def get_data_parallel_world_size(self):
            return dp

    monkeypatch.setattr(dsc.dist, "get_rank", lambda *a, **k: 0)
    return dsc.DeepSpeedConfig(json.loads(json.dumps(conf)), mpu=MPU())


def _ds_optimizer(ds, pipeline: bool):
    """The optimizer wrapper DeepSpeed's engine picks for config ``ds`` (engine.py _do_optimizer_sanity_check, run on
    the config alone): None = the torch optimizer as is, "zero_optimization", "bf16" (BF16_Optimizer), "ddp_bf16"."""
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    names = ("_do_optimizer_sanity_check", "get_data_types", "fp16_enabled", "bfloat16_enabled", "zero_optimization",
             "zero_optimization_stage", "zero_cpu_offload", "zero_compute_grad_norm", "zero_allow_untested_optimizer")
    engine = type("EngineOnConfig", (), {n: getattr(DeepSpeedEngine, n) for n in names})()
    engine._config, engine.pipeline_parallelism, engine.global_rank = ds, pipeline, 0
    return engine._do_optimizer_sanity_check(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))


@pytest.mark.parametrize("dtype", exports.DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_deepspeed_export_loads_and_keeps_the_pipeline_engine_rules(name, dtype, monkeypatch):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    plan, cfg, world = _case(name)
    conf, notes = exports.deepspeed_config(plan, cfg, TrainConfig(lr=2e-4, grad_clip=0.5), dtype=dtype)
    s = plan.layer_strategies()[0]
    ds = _ds_config(conf, s.dp, monkeypatch)
    # the plan's dtype as DeepSpeed resolves it: no fp16 block, bf16 on or off; fp32 accumulates and reduces in fp32
    assert "fp16" not in conf and not ds.float16_config.enabled and ds.bfloat16_config.enabled == (dtype == "bf16")
    assert ds.grad_accum_dtype is None and ds.communication_data_type is None  # both follow the model dtype
    built = _ds_optimizer(ds, plan.pipeline.degree > 1)
    stage = ds.zero_optimization_stage
    if dtype == "fp32":
        assert built == (None if stage == 0 else "zero_optimization")
    else:
        assert built == ("zero_optimization" if stage else "bf16" if plan.pipeline.degree > 1 else "ddp_bf16")
    # the ZeRO optimizers' fp32 master copy in fp32 is counted by the planner (PRECISIONS["deepspeed_fp32"]), not noted
    assert not any("fp32 at ZeRO-" in n or "master" in n for n in notes)
    assert ds.train_batch_size == plan.global_batch
    assert ds.train_micro_batch_size_per_gpu * ds.gradient_accumulation_steps * s.dp == plan.global_batch
    assert ds.optimizer_params["lr"] == 2e-4 and ds.gradient_clipping == 0.5
    if plan.pipeline.degree > 1:
        # runtime/pipe/engine.py: assert zero_optimization_stage() < ZeroStageEnum.gradients
        assert ds.zero_optimization_stage < ZeroStageEnum.gradients
        assert ds.pipeline["activation_checkpoint_interval"] == (0 if s.recompute == "none" else 1)
        assert any("PipelineModule(" in n and f"num_stages={plan.pipeline.degree}" in n for n in notes)
        if s.zero >= 2:
            assert any("refuses ZeRO-2/3" in n for n in notes)
    else:
        assert ds.zero_optimization_stage == s.zero
    if cfg.n_experts:
        assert any(f"ep_size={s.ep}" in n and "enable_expert_tensor_parallelism=False" in n for n in notes)


def _titan_check(plan, cfg, world, settings):
    """Construct torchtitan's own dataclasses (unknown fields raise) and apply its mesh and stage rules."""
    import typing

    tt = torchtitan_configs()
    par = tt.ParallelismConfig(**settings["parallelism"])
    training = tt.TrainingConfig(**settings["training"])
    hints = typing.get_type_hints(tt.TrainingConfig)
    for field in ("dtype", "mixed_precision_param", "mixed_precision_reduce"):  # the dataclass checks no Literal
        assert getattr(training, field) in typing.get_args(hints[field]), field
    assert (par.data_parallel_replicate_degree * par.data_parallel_shard_degree * par.tensor_parallel_degree
            * par.pipeline_parallel_degree * par.context_parallel_degree) == world
    dense = par.data_parallel_shard_degree * par.context_parallel_degree * par.tensor_parallel_degree
    assert dense % par.expert_parallel_degree == 0  # efsdp * ep == dp_shard * cp * tp
    if par.pipeline_parallel_degree > 1:
        parts = par.module_fqns_per_model_part
        # pipeline_parallel.py: stages % pp == 0; single-stage schedules 1 stage per rank, looped ones >= 2
        assert len(parts) % par.pipeline_parallel_degree == 0
        per_rank = len(parts) // par.pipeline_parallel_degree
        assert per_rank == 1 if par.pipeline_parallel_schedule in ("1F1B", "GPipe") else per_rank >= 2
        layers = [m for p in parts for m in p if m.startswith("layers.")]
        assert layers == [f"layers.{i}" for i in range(cfg.n_layers)]
        assert [sum(m.startswith("layers.") for m in p) for p in parts] == [b - a for a, b in plan.stage_ranges(cfg.n_layers)]
    return par


@pytest.mark.parametrize("dtype", exports.DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_torchtitan_export_builds_torchtitans_config_dataclasses(name, dtype):
    plan, cfg, world = _case(name)
    settings, ac, notes = exports.torchtitan_settings(plan, cfg, dtype=dtype)
    par = _titan_check(plan, cfg, world, settings)
    # fp32 weights and optimizer states either way; the plan's dtype is what FSDP2 gathers and computes in
    assert settings["training"] == {**settings["training"], "dtype": "float32", "mixed_precision_reduce": "float32",
                                    "mixed_precision_param": {"bf16": "bfloat16", "fp32": "float32"}[dtype]}
    s = plan.layer_strategies()[0]
    assert par.enable_sequence_parallel == s.sp
    assert ac == {"none": "None", "full": "FullAC.Config()", "selective": "SelectiveAC.Config()"}[s.recompute]
    if cfg.n_experts and par.expert_parallel_degree != s.ep:
        assert any(f"instead of the planned {s.ep}" in n for n in notes)
    text, _ = exports.torchtitan_config(plan, cfg, dtype=dtype)
    compile(text, "apply_plan.py", "exec")  # valid Python
    assert f"'mixed_precision_param': '{settings['training']['mixed_precision_param']}'" in text
    assert "b5bcd76" in text


def test_torchtitan_interleaved_stage_count_is_valid():
    """The old TOML export gave 17 virtual stages for pp=8 (torchtitan raises); the stage list is explicit now."""
    plan, cfg = _plan("llama2-70b", 128, pp=8, schedule="interleaved_1f1b", v=2, tp=8, sp=True, zero=3)
    settings, _, _ = exports.torchtitan_settings(plan, cfg)
    par = _titan_check(plan, cfg, 128, settings)
    assert len(par.module_fqns_per_model_part) == 16 and "pipeline_parallel_layers_per_stage" not in settings["parallelism"]


def test_differing_layers_are_noted_not_silently_collapsed():
    cfg = load_model_config("llama2-13b")
    plan = plan_from_dict({"model": "llama2-13b", "seq_len": 4096, "global_batch": 64, "micro_batch": 1,
                           "layers": [{"tp": 2, "dp": 4, "zero": 2, "recompute": "full", "repeat": 10},
                                      {"tp": 2, "dp": 4, "zero": 0, "recompute": "none", "repeat": 30}]})
    for target in exports.EMITTERS:
        _, notes = exports.emit(plan, cfg, target)
        assert notes[0].startswith("targets ")
        assert any("layers differ in zero (0-9: 2, 10-39: 0)" in n for n in notes), target
        assert any("layers differ in recompute" in n for n in notes), target
    assert exports.stack_problems("megatron", plan, cfg) == ["layers use different strategies",
                                                             "Megatron-LM has no ZeRO-2 (its distributed optimizer shards optimizer states only)"]


def test_stack_constraints_union_and_conflicts():
    sets = exports.stack_constraints("deepspeed", Constraints(pp=4))
    assert [(c.pp, c.zero) for c in sets] == [(4, 0), (4, 1)]
    assert exports.stack_constraints("deepspeed", Constraints(pp=4, zero=3)) == []
    assert [(c.zero, c.pp, c.ep) for c in exports.stack_constraints("megatron")] == [(0, None, None), (1, None, None), (3, 1, 1)]
    assert {c.zero for c in exports.stack_constraints("torchtitan")} == {0, 3}
    with pytest.raises(Exception, match="emit"):
        exports.stack_constraints("jax")


@pytest.mark.parametrize("dtype", [None, "fp32"])
@pytest.mark.parametrize("target", exports.EMITTERS)
def test_plan_emit_searches_layouts_the_stack_runs(target, dtype, capsys, tmp_path):
    """... and writes the dtype the plan was predicted in (no --dtype: bf16, the A100's default)."""
    import torch

    train = tmp_path / "train.yaml"
    train.write_text("lr: 0.0002\nmin_lr: 0.00002\nsteps: 500\nwarmup_steps: 50\n")
    argv = ["plan", "--model", "llama2-13b", "--cluster", "dgx-a100-80g", "--nodes", "2", "--seq-len", "4096",
            "--global-batch", "256", "--emit", target, "--train-config", str(train), "--out", str(tmp_path / "p.yaml")]
    argv += ["--dtype", dtype] if dtype else []
    fp32 = dtype == "fp32"
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "note: targets " in err
    from meshwright.plan import load_plan

    plan = load_plan(tmp_path / "p.yaml")
    cfg = load_model_config("llama2-13b")
    assert exports.stack_problems(target, plan, cfg) == []
    if target == "megatron":
        ns = megatron_validate(shlex.split(out), 16, exports.megatron_env(plan, cfg))
        assert ns.lr == 2e-4 and ns.train_iters == 500
        assert ns.params_dtype == (torch.float32 if fp32 else torch.bfloat16)
    elif target == "deepspeed":
        conf = json.loads(out)
        if "pipeline" in conf:
            assert conf["zero_optimization"]["stage"] < 2
        assert conf["optimizer"]["params"]["lr"] == 2e-4
        assert conf["bf16"] == {"enabled": not fp32} and "fp16" not in conf
    else:
        settings, _, _ = exports.torchtitan_settings(plan, cfg, dtype=dtype or "bf16")
        _titan_check(plan, cfg, 16, settings)
        assert "apply_plan" in out
        assert f"'mixed_precision_param': '{'float32' if fp32 else 'bfloat16'}'" in out


def test_plan_emit_says_when_it_ignores_allowed_savers(capsys):
    argv = ["plan", "--model", "llama2-13b", "--cluster", "dgx-a100-80g", "--nodes", "2", "--seq-len", "4096",
            "--global-batch", "256", "--emit", "megatron", "--allow", "fp8"]
    assert main(argv) == 0
    _, err = capsys.readouterr()
    assert "note: --allow fp8 ignored" in err


def test_export_dtype_errors_are_one_line():
    """An unknown dtype, and fp32 with DeepSpeed's bf16 + fp32-accumulation stack (as ``plan --dtype fp32 --stack
    deepspeed-fp32-accum``), are refused with the field, the value and what is valid."""
    from meshwright.errors import ConfigError

    plan, cfg, _ = _case("llama2-70b tp8 pp8 zero1")
    for target in exports.EMITTERS:
        with pytest.raises(ConfigError, match=r"^dtype='fp16' is invalid; valid: bf16 or fp32$"):
            exports.emit(plan, cfg, target, dtype="fp16")
    with pytest.raises(ConfigError, match=r"^dtype='fp32' is invalid; valid: bf16 with stack deepspeed-fp32-accum"):
        exports.deepspeed_config(plan, cfg, stack="deepspeed-fp32-accum", dtype="fp32")
    conf, _ = exports.deepspeed_config(plan, cfg, stack="deepspeed-fp32-accum", dtype="bf16")
    assert conf["bf16"] == {"enabled": True} and conf["data_types"] == {"grad_accum_dtype": "fp32"}


def test_megatron_stack_plans_no_fsdp_for_tied_embeddings(capsys):
    """validate_args refuses --use-torch-fsdp2 without --untie-embeddings-and-output-weights: the megatron stack
    searches no ZeRO-3 layout for a tied model (qwen3-0.6b), and a --zero 3 asked of it is one line."""
    tied, untied = load_model_config("qwen3-0.6b"), load_model_config("qwen3-8b")
    assert {c.zero for c in exports.stack_constraints("megatron", None, tied)} == {0, 1}
    assert {c.zero for c in exports.stack_constraints("megatron", None, untied)} == {0, 1, 3}
    plan, cfg, _ = _case("qwen3-0.6b zero3 (fsdp refused with tied embeddings)")
    assert any(p.startswith("--use-torch-fsdp2 needs untied embeddings") for p in exports.stack_problems("megatron", plan, cfg))
    argv = ["plan", "--model", "qwen3-0.6b", "--cluster", "dgx-a100-80g", "--nodes", "2", "--seq-len", "4096",
            "--global-batch", "256", "--emit", "megatron", "--zero", "3"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "emit='megatron' cannot run the layout fixed by --zero 3; valid: " in err and "untied embeddings" in err, err


def test_emit_makes_the_found_plans_uniform_rather_than_fall_back_to_a_slow_one():
    """Mixtral 8x7B on 16 A100: the search's best plans mix recompute and expert-parallel degrees per layer, which
    no other stack runs; --emit megatron used to fall back to the fastest uniform plan among them, a ZeRO-3 full-
    recompute one at 1.71x the unrestricted best. The found plans' layers made to agree (export/uniform.py) give a
    plan Megatron-LM runs as planned within 5% of it, and torchtitan's pick runs as planned too, within 10% (6.7%
    since its FSDP2 casts and fp32 accumulation are charged and its pp>1 layouts keep the bf16 weights gathered,
    which leaves it pp=1; 1.3% before)."""
    from meshwright.cli import build_parser
    from meshwright.commands import plan as plan_cmd
    from meshwright.launcher.planner.export.uniform import uniform_variants

    base = ["plan", "--model", "mixtral-8x7b", "--cluster", "dgx-a100-80g", "--nodes", "2", "--seq-len", "4096",
            "--global-batch", "256", "--any-runtime"]
    free = plan_cmd.compute_result(build_parser().parse_args(base))["_objects"]["best"]
    cfg = load_model_config("mixtral-8x7b")
    assert "layers use different strategies" in exports.stack_problems("megatron", free.plan, cfg)
    for target, within in (("megatron", 1.05), ("torchtitan", 1.10)):
        best = plan_cmd.compute_result(build_parser().parse_args(base + ["--emit", target]))["_objects"]["best"]
        assert exports.stack_problems(target, best.plan, cfg) == [], (target, best.layout())
        assert best.prediction.step_s < within * free.prediction.step_s, (target, best.layout())
    from meshwright.config import load_cluster
    from meshwright.launcher.planner import cost_model as cm

    hw = cm.hardware_from_cluster(load_cluster("dgx-a100-80g", nodes=2))
    variants = uniform_variants(free.plan, cfg, hw, 16, {})
    assert variants and all(len({s.key() for i, s in enumerate(p.layer_strategies()) if not cfg.is_moe_layer(i)}) <= 1
                            for p, _ in variants)
    assert uniform_variants(variants[0][0], cfg, hw, 16, {}) == []  # a uniform plan has no other variant


@pytest.mark.parametrize("change,expect", [
    ({"rope_scaling": _LLAMA31}, {"use_rope_scaling": True, "rope_scaling_factor": 8.0}),  # Llama 3.1
    ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, {"rotary_seq_len_interpolation_factor": 4}),
    ({"rotary_dim": 96}, {"rotary_percent": 0.75}),  # Phi-4-mini's share of a 128-wide head
    ({"sliding_window": 4096}, {"window_size": (4095, 0)}),  # Mistral: itself and the 4,095 before
])
def test_megatron_export_keeps_rope_scaling_partial_rotary_and_the_window(change, expect):
    """Llama 3.1's rope scaling, partial rotary and a sliding window were exported as plain RoPE with full
    attention, silently: another model. Each is a Megatron-LM flag now, read back by its own parser (and built by
    megatron-core: test_megatron_builds_our_model_from_the_export)."""
    import dataclasses

    plan, cfg, world = _case("llama3-70b tp8 pp4")
    cfg = dataclasses.replace(cfg, **change)
    args, notes = exports.megatron_args(plan, cfg, None, "bf16")
    ns = megatron_validate(args, world, exports.megatron_env(plan, cfg))
    for key, value in expect.items():
        assert getattr(ns, key) == value, (key, getattr(ns, key))
    assert not [n for n in notes if "rope" in n.lower()]


@pytest.mark.parametrize("change,error", [
    ({"rope_scaling": {**_LLAMA31, "factor": 32.0, "original_max_position_embeddings": 4096}},
     r"model\.rope_scaling\.original_max_position_embeddings=4096 is invalid; valid: 8192 for --emit megatron"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.5}},
     r"model\.rope_scaling\.factor=2\.5 is invalid; valid: an integer for --emit megatron"),
    ({"rope_scaling": _PHI_LONGROPE}, r"model\.rope_scaling\.rope_type='longrope' is invalid; valid: llama3, linear or null"),
    ({"rope_theta": 10000.5}, r"model\.rope_theta=10000\.5 is invalid; valid: an integer for --emit megatron"),
])
def test_megatron_export_refuses_a_rope_it_has_no_flags_for(change, error):
    """A rope Megatron-LM core_v0.16.1 cannot express was exported as plain RoPE with a note ("another model"): now
    one line naming the field, from the export API and before plan --emit's search (check_emit_model)."""
    import dataclasses

    from meshwright.errors import ConfigError

    plan, cfg, _ = _case("phi-4 tp2 pp4")
    cfg = dataclasses.replace(cfg, **change)
    with pytest.raises(ConfigError, match="^" + error):
        exports.megatron_args(plan, cfg)
    with pytest.raises(ConfigError, match="^" + error):
        exports.check_emit_model("megatron", cfg)


def test_plan_emit_takes_the_dtype_a_train_config_sets(tmp_path, capsys):
    """--train-config's dtype was ignored: a config training in fp32 got a bf16 prediction and a bf16 export."""
    train = tmp_path / "train.yaml"
    train.write_text("lr: 0.0002\nmin_lr: 0.00002\nsteps: 500\nwarmup_steps: 50\ndtype: fp32\n")
    base = ["plan", "--model", "llama2-13b", "--cluster", "dgx-a100-80g", "--nodes", "2", "--seq-len", "4096",
            "--global-batch", "256", "--emit", "deepspeed", "--train-config", str(train)]
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["bf16"] == {"enabled": False}
    assert main(base + ["--dtype", "bf16"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--dtype='bf16' is invalid; valid: 'fp32' as --train-config {train} sets it" in err[0]
    train.write_text("lr: 0.0002\nmin_lr: 0.00002\nsteps: 500\nwarmup_steps: 50\n")  # no dtype: the default (bf16) stands
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["bf16"] == {"enabled": True}


@pytest.mark.parametrize("pp,ep,tied", [(1, 1, False), (1, 1, True), (2, 1, False), (1, 2, False), (2, 2, True)])
def test_megatron_fsdp2_rule_is_one_for_search_check_export_and_validate_args(pp, ep, tied):
    """Megatron's --use-torch-fsdp2 conditions (pp=1, ep=1, untied embeddings) were written twice, in the export and in
    stack_problems (and a third time in stack_constraints). All three now apply ``megatron_fsdp2_refusal``; this fails
    if any of them drifts from the others or from what Megatron-LM's own validate_args accepts."""
    import dataclasses

    plan, cfg = _plan("mixtral-8x7b", 16, pp=pp, tp=2, zero=3, ep=ep, gb=256)
    cfg = dataclasses.replace(cfg, tie_embeddings=tied)
    args, notes = exports.megatron_args(plan, cfg)
    exported = "--use-torch-fsdp2" in args
    problems = [p for p in exports.stack_problems("megatron", plan, cfg) if "--use-torch-fsdp2" in p]
    searched = any(c.zero == 3 and c.pp in (None, pp) and c.ep in (None, ep)
                   for c in exports.stack_constraints("megatron", None, cfg))
    fsdp_args = [a for a in args if a not in ("--use-distributed-optimizer", "--overlap-param-gather", "--use-torch-fsdp2",
                                              "--no-gradient-accumulation-fusion")]
    try:
        megatron_validate(fsdp_args + ["--use-torch-fsdp2", "--no-gradient-accumulation-fusion"], 16, {})
        accepted = True
    except AssertionError:
        accepted = False
    assert exported == (not problems) == searched == accepted == (pp == 1 and ep == 1 and not tied), (problems, notes)


@pytest.fixture(scope="module")
def megatron_single_rank():
    """One gloo rank with Megatron's model-parallel groups of 1, for building megatron-core modules on the CPU."""
    pytest.importorskip("megatron.core")
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


# megatron-core's CPU build: no TE/apex fusions (the flags change kernels only, not the model)
_MEGATRON_CPU = ["--use-cpu-initialization", "--no-rope-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
                 "--no-masked-softmax-fusion", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion"]


def _megatron_gpt(args: list[str], vocab_size: int):
    """The GPTModel Megatron-LM builds from ``args``, as pretrain_gpt.py's model provider does at core_v0.16.1
    (core_transformer_config_from_args; GPTModel(..., share_embeddings_and_output_weights=not
    args.untie_embeddings_and_output_weights, rotary_percent, rotary_base, rope_scaling=args.use_rope_scaling,
    rope_scaling_factor, seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor)) with the local
    (non-TE) layer spec. The vocabulary comes from Megatron's tokenizer, not from the arguments: ``vocab_size``."""
    from consumers.loaders import megatron_arguments
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    ns = megatron_validate(args + _MEGATRON_CPU, 1, {})
    config = megatron_arguments().core_transformer_config_from_args(ns)
    spec = get_gpt_layer_local_spec(qk_layernorm=ns.qk_layernorm, normalization=ns.normalization)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
                    max_sequence_length=ns.max_position_embeddings,
                    share_embeddings_and_output_weights=not ns.untie_embeddings_and_output_weights,
                    position_embedding_type=ns.position_embedding_type, rotary_percent=ns.rotary_percent,
                    rotary_base=ns.rotary_base, rope_scaling=ns.use_rope_scaling,
                    rope_scaling_factor=ns.rope_scaling_factor,
                    seq_len_interpolation_factor=ns.rotary_seq_len_interpolation_factor), ns


_TINY = dict(name="tiny-export", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
             max_seq_len=256, rope_theta=500000.0)


@pytest.mark.parametrize("change", [
    {},
    {"tie_embeddings": True},
    {"attn_head_dim": 32},  # --kv-channels: heads wider than d_model/n_heads (Qwen3)
    {"qk_norm": True, "qkv_bias": True, "attn_head_dim": 32},  # both at once: megatron-core builds both
    {"qkv_bias": True, "n_kv_heads": 4},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}},
    {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    {"rotary_dim": 8},  # partial rotary: the first 8 of each head's 16 dimensions
    {"sliding_window": 3},
], ids=["plain", "tied", "kv-channels", "qk-norm+qkv-bias", "qkv-bias", "llama3-rope", "linear-rope", "partial-rotary",
        "window"])
def test_megatron_builds_our_model_from_the_export(change, megatron_single_rank, monkeypatch):
    """Megatron-core builds a GPTModel from the exported arguments with our model's parameters (count and attention
    shapes: q/k/v biases, q/k head norms, kv_channels, tied or untied output layer) and our rotary angles
    (RotaryEmbedding's, llama3 and linear scaling, partial rotary) -- not merely arguments its parser accepts."""
    import dataclasses

    import torch

    from meshwright.config import ModelConfig
    from meshwright.models import build_model
    from meshwright.models.decoder import count_parameters
    from meshwright.models.layers import rope_inv_freq

    cfg = dataclasses.replace(ModelConfig(**_TINY), **change)
    cfg.validate()
    plan, _ = _plan("qwen3-0.6b", 1, tp=1, zero=0, gb=8)
    args, notes = exports.megatron_args(plan, cfg)
    assert not [n for n in notes if "another model" in n]
    gpt, ns = _megatron_gpt(args, cfg.vocab_size)
    ours = build_model(cfg, device="cpu")
    assert sum(p.numel() for p in gpt.parameters()) == count_parameters(ours)
    theirs = dict(gpt.decoder.layers[0].self_attention.named_parameters())
    qkv_rows = (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim
    assert theirs["linear_qkv.weight"].shape == (qkv_rows, cfg.d_model)
    assert ("linear_qkv.bias" in theirs) == cfg.qkv_bias and "linear_proj.bias" not in theirs
    assert ("q_layernorm.weight" in theirs) == cfg.qk_norm
    if cfg.qk_norm:
        assert theirs["q_layernorm.weight"].shape == theirs["k_layernorm.weight"].shape == (cfg.head_dim,)
    assert gpt.share_embeddings_and_output_weights == cfg.tie_embeddings
    # rotary angles: RotaryEmbedding's position x frequency table (positions / the interpolation factor), which its
    # forward repeats over the rotated dimensions (get_emb moves it to CUDA first: the table alone on the CPU)
    seq = 512
    freqs = gpt.rotary_pos_emb.get_freqs_non_repeated(seq).double()
    angles = torch.outer(torch.arange(seq, dtype=torch.float64),
                         rope_inv_freq(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling).double())
    assert freqs.shape == (seq, cfg.rope_dim // 2)
    torch.testing.assert_close(freqs, angles, rtol=1e-5, atol=1e-3)
    # the window: the local spec's softmax masks with get_sliding_window_causal_mask (True = masked; it allocates on
    # CUDA, here on the CPU) -- the complement of our mask
    from megatron.core.transformer import utils as mcore_utils

    from meshwright.models.layers import sliding_window_mask

    window = gpt.decoder.layers[0].self_attention.core_attention.scale_mask_softmax.window_size
    assert window == (None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0))
    if window is not None:
        ones = torch.ones
        monkeypatch.setattr(mcore_utils.torch, "ones", lambda *a, **k: ones(*a, **{**k, "device": "cpu"}))
        assert torch.equal(~mcore_utils.get_sliding_window_causal_mask(9, 9, window),
                           sliding_window_mask(9, cfg.sliding_window))



@pytest.mark.parametrize("model,scaling", [
    ("llama2-70b", None),  # theta 1e4, no scaling: torchtitan's llama3 flavors would give it Llama 3.1's rope
    ("llama3-70b", None),
    ("llama3-70b", _LLAMA31),
    ("llama3-70b", {**_LLAMA31, "factor": 32.0, "original_max_position_embeddings": 4096}),  # Megatron cannot
    ("llama2-7b", {"rope_type": "linear", "factor": 4.0}),
    ("llama2-7b", {"rope_type": "linear", "factor": 2.5}),
    ("qwen3-8b", None),  # head_dim 128 apart from d_model/n_heads
])
def test_torchtitan_export_gives_torchtitans_rope_our_frequencies(model, scaling):
    """torchtitan's own ComplexRoPE (pinned models/common/rope.py @ b5bcd76, loaded with its SPMD typing stubbed)
    builds its cache from the exported ROPE fields; its angles are our model's (rope_tables), linear scaling included
    (written as torchtitan's llama scaling with a 1-token original context: every frequency divided)."""
    import dataclasses

    import torch

    from consumers.loaders import torchtitan_rope
    from meshwright.models.layers import rope_tables

    cfg = dataclasses.replace(load_model_config(model), rope_scaling=scaling)
    _, rope = exports.torchtitan_model(cfg)
    tt = torchtitan_rope()
    seq = 8192
    cache = tt.ComplexRoPE(tt.ComplexRoPE.Config(dim=cfg.head_dim, max_context_length=seq, **rope)).cache
    cos, sin = rope_tables(cfg.head_dim, seq, cfg.rope_theta, scaling=cfg.rope_scaling)
    torch.testing.assert_close(cache.real, cos, rtol=0, atol=2e-3)
    torch.testing.assert_close(cache.imag, sin, rtol=0, atol=2e-3)
    # torchtitan's recipes' rope (every llama3 flavor: theta 500000, llama scaling factor 8) is another model unless
    # the model is Llama 3.1's: what apply_plan's ROPE replaces
    recipe = tt.ComplexRoPE(tt.ComplexRoPE.Config(dim=cfg.head_dim, max_context_length=seq, theta=500000,
                                                  scaling="llama")).cache
    assert torch.allclose(recipe, cache, atol=2e-3) == (cfg.rope_theta == 500000 and scaling == _LLAMA31)


@pytest.mark.parametrize("change,field", [
    ({"sliding_window": 4096}, r"model\.sliding_window=4096 is invalid; valid: null for --emit torchtitan"),
    ({"rotary_dim": 96}, r"model\.rotary_dim=96 is invalid; valid: null \(head_dim=128\) for --emit torchtitan"),
    ({"rope_scaling": {"rope_type": "longrope", "original_max_position_embeddings": 4096, "attention_factor": 1.19,
                       "short_factor": [1.0] * 64, "long_factor": [2.0] * 64}},
     r"model\.rope_scaling\.rope_type='longrope' is invalid; valid: llama3, linear or null for --emit torchtitan"),
])
def test_torchtitan_export_refuses_what_torchtitan_cannot_express(change, field, capsys):
    """A sliding window (Mistral), partial rotary (Phi-4-mini) or longrope (Phi-3) has no torchtitan llama3/qwen3
    setting: the export is one line naming the field, from the export API and before `plan --emit`'s search."""
    import dataclasses

    from meshwright.errors import ConfigError

    plan, cfg, _ = _case("llama3-70b tp8 pp4")
    cfg = dataclasses.replace(cfg, **change)
    with pytest.raises(ConfigError, match="^" + field):
        exports.emit(plan, cfg, "torchtitan")
    exports.emit(plan, cfg, "deepspeed")  # its JSON carries no model (the HF config.json does: a note names it)
    if "rope_scaling" not in change:  # a window and partial rotary are Megatron-LM flags (longrope: refused there too)
        exports.emit(plan, cfg, "megatron")
    gpt2 = load_model_config("gpt2-small")
    with pytest.raises(ConfigError, match=r"^model\.arch='gpt2' is invalid; valid: llama for --emit torchtitan"):
        exports.check_emit_model("torchtitan", gpt2)
    argv = ["plan", "--model", "gpt2-small", "--cluster", "dgx-a100-80g", "--nodes", "1", "--seq-len", "1024",
            "--global-batch", "64", "--emit", "torchtitan"]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.arch='gpt2' is invalid" in err[0], err


def _titan_recipe(tt_rope, cfg, **override):
    """A recipe model config as torchtitan's llama3 registry builds it (Decoder.Config -> layers[i].attention:
    GQAttention.Config with a FusedQKVLinear wqkv and the flavors' ComplexRoPE.Config; feed_forward.w1; norm), with
    the fields apply_plan reads; ``override`` changes one."""
    from types import SimpleNamespace as NS

    f = {"dim": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.kv_heads,
         "head_dim": None, "vocab_size": cfg.vocab_size, "tie": cfg.tie_embeddings, "bias": False,
         "eps": cfg.norm_eps, "hidden": cfg.ffn_dim, **override}
    rope = tt_rope.ComplexRoPE.Config(dim=f["dim"] // f["n_heads"], max_context_length=131072, theta=500000,
                                      scaling="llama")
    layers = [NS(attention=NS(n_heads=f["n_heads"], n_kv_heads=f["n_kv_heads"], head_dim=f["head_dim"], qk_norm=None,
                              qkv_linear=NS(wqkv=NS(bias=f["bias"])), rope=rope),
                 feed_forward=NS(w1=NS(out_features=f["hidden"]))) for _ in range(f["n_layers"])]
    model = NS(dim=f["dim"], vocab_size=f["vocab_size"], enable_weight_tying=f["tie"], norm=NS(eps=f["eps"]),
               layers=layers)
    return NS(model_spec=NS(model=model), parallelism=NS(), training=NS(), activation_checkpoint=None)


def test_torchtitan_apply_plan_sets_our_rope_and_refuses_another_model(monkeypatch):
    """The emitted apply_plan, run on a recipe shaped like torchtitan's llama3 70B flavor: every layer gets the
    planned rope (Llama 3's unscaled one, not the flavor's Llama 3.1 scaling) and the plan's parallelism; a recipe
    of another model (8 -> 16 kv heads, tied embeddings) is a ValueError naming the field."""
    import sys
    import types

    from consumers.loaders import torchtitan_rope

    plan, cfg, _ = _case("llama3-70b tp8 pp4")
    text, _ = exports.torchtitan_config(plan, cfg)
    trainer = types.ModuleType("torchtitan.trainer")
    trainer.Trainer = type("Trainer", (), {"Config": object})
    for name, mod in (("torchtitan", types.ModuleType("torchtitan")), ("torchtitan.trainer", trainer)):
        monkeypatch.setitem(sys.modules, name, mod)
    ns: dict = {}
    exec(compile(text, "apply_plan.py", "exec"), ns)
    tt = torchtitan_rope()
    config = ns["apply_plan"](_titan_recipe(tt, cfg))
    ropes = {(r.theta, r.scaling) for r in (layer.attention.rope for layer in config.model_spec.model.layers)}
    assert ropes == {(500000.0, "none")} and config.parallelism.pipeline_parallel_degree == 4
    for override, field in (({"n_kv_heads": 16}, "n_kv_heads=16"), ({"tie": True}, "enable_weight_tying=True"),
                            ({"head_dim": 64}, "head_dim=64"), ({"eps": 1e-6}, "norm_eps=1e-06")):
        with pytest.raises(ValueError, match=f"^model {field} in the recipe, the plan's model has"):
            ns["apply_plan"](_titan_recipe(tt, cfg, **override))



@pytest.mark.parametrize("model,change,arch", [
    ("llama2-7b", {}, "LlamaForCausalLM"),
    ("llama3-70b", {"rope_scaling": _LLAMA31}, "LlamaForCausalLM"),
    ("llama2-7b", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "LlamaForCausalLM"),
    ("llama2-7b", {"sliding_window": 4096}, "MistralForCausalLM"),
    ("qwen2.5-7b", {}, "Qwen2ForCausalLM"),
    ("qwen3-0.6b", {}, "Qwen3ForCausalLM"),  # head_dim 128 on d_model 1024, tied embeddings
    ("phi-4", {"rope_scaling": _PHI_LONGROPE, "max_seq_len": 131072}, "Phi3ForCausalLM"),
    ("phi-4", {"rotary_dim": 96, "rope_scaling": {**_PHI_LONGROPE, "short_factor": [1.0] * 48, "long_factor": [4.0] * 48},
               "max_seq_len": 131072}, "Phi3ForCausalLM"),  # Phi-4-mini's partial rotary
    ("mixtral-8x7b", {}, "MixtralForCausalLM"),
])
def test_deepspeed_export_names_the_model_transformers_rebuilds_as_ours(model, change, arch, tmp_path):
    """DeepSpeed's JSON holds no model: the export names the transformers class that rebuilds ours from the
    config.json meshwright writes, and transformers, reading that file, has our rotary frequencies (its model's
    RotaryEmbedding: default, llama3, linear, longrope, partial rotary), window, head shape and tying."""
    import dataclasses
    import importlib

    import torch
    import transformers

    from meshwright.config.hf import hf_config_from_model
    from meshwright.models.layers import rope_inv_freq

    base = load_model_config(model)
    cfg = dataclasses.replace(base, **change)
    cfg.validate()
    plan, _, _ = _case("llama3-70b tp8 pp4")
    _, notes = exports.deepspeed_config(plan, cfg)
    assert notes[0].startswith(f"the JSON carries no model: build transformers' {arch} from the config.json")
    for feature in [*(["sliding window 4096"] if cfg.sliding_window else []), *(["q/k head norms"] if cfg.qk_norm else []),
                    *(["tied embeddings"] if cfg.tie_embeddings else []), *(["q/k/v biases"] if cfg.qkv_bias else [])]:
        assert feature in notes[0], feature
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_model(cfg)))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.architectures == [arch] and getattr(hf, "sliding_window", None) == cfg.sliding_window
    assert hf.num_key_value_heads == cfg.kv_heads and bool(hf.tie_word_embeddings) == cfg.tie_embeddings
    assert getattr(hf, "head_dim", None) in (None, cfg.head_dim) and hf.hidden_size == cfg.d_model
    mod = importlib.import_module(f"transformers.models.{hf.model_type}.modeling_{hf.model_type}")
    rotary = next(getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding"))(hf)
    torch.testing.assert_close(rotary.inv_freq.double(), rope_inv_freq(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling).double(),
                               rtol=1e-6, atol=0)
    scale = float(cfg.rope_scaling["attention_factor"]) if cfg.rope_scaling and "attention_factor" in cfg.rope_scaling else 1.0
    assert rotary.attention_scaling == pytest.approx(scale)
