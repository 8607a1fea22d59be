"""`meshwright plan` and `meshwright profile`: JSON schema, text table, files, exports, goldens, errors.

Golden files in tests/golden/ hold fixed inputs and the stored plan + predicted figures; regenerate
them deliberately with ``MESHWRIGHT_UPDATE_GOLDEN=1 pytest tests/unit/test_plan_cli.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path

import pytest

from meshwright.cli import build_parser, main
from meshwright.commands import plan as plan_cmd
from meshwright.config import load_model_config
from meshwright.launcher.planner import export as exports
from meshwright.plan import load_plan, validate_plan

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
GOLDEN_CASES = {
    "tiny_local_cpu": ["--model", "tiny", "--cluster", "local-cpu", "--seq-len", "128", "--global-batch", "8"],
    "llama2_7b_8xa100": ["--model", "llama2-7b", "--cluster", "dgx-a100-80g", "--seq-len", "4096", "--global-batch", "128"],
    "llama2_13b_16xa100_budget40": ["--model", "llama2-13b", "--cluster", "dgx-a100-80g", "--nodes", "2", "--seq-len", "4096",
                                    "--global-batch", "256", "--memory-budget-gib", "40"],
    "mixtral_16xh100": ["--model", "mixtral-8x7b", "--cluster", "dgx-h100-80g", "--nodes", "2", "--seq-len", "4096",
                        "--global-batch", "256"],
    "gpt_18b_megatron_layout": ["--model", "megatron-gpt-18.4b", "--cluster", "dgx-a100-80g", "--nodes", "32", "--seq-len", "2048",
                                "--global-batch", "1024", "--tp", "8", "--pp", "1", "--micro-batch", "1", "--recompute", "full"],
}
JSON_KEYS = ["candidates", "cluster", "compute_dtype", "devices_per_node", "feasible", "global_batch", "layout", "memory_budget_gib",
             "model", "nodes", "plan", "precision", "predicted", "rejected", "rejected_total", "runners_up", "schema", "search_s",
             "seq_len", "skipped", "stack", "stages", "world_size"]
PREDICTED_KEYS = ["breakdown", "fits", "hfu", "memory_gib", "memory_gib_max", "mfu", "step_s", "tflops_per_device", "tokens_per_s"]


def _args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["plan", *argv])


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_output_schema_is_stable(capsys):
    rc, out, _ = _run(capsys, ["plan", *GOLDEN_CASES["tiny_local_cpu"], "--json"])
    assert rc == 0
    data = json.loads(out)
    assert sorted(data) == JSON_KEYS
    assert sorted(data["predicted"]) == PREDICTED_KEYS
    p = data["predicted"]
    assert p["step_s"] > 0 and p["tokens_per_s"] == pytest.approx(8 * 128 / p["step_s"], rel=1e-4)
    assert 0 < p["mfu"] <= p["hfu"] <= 1 and p["tflops_per_device"] > 0
    assert isinstance(p["memory_gib"], list) and p["memory_gib_max"] == max(p["memory_gib"])
    assert data["search_s"] >= 0 and data["plan"]["version"] == 1
    for r in data["runners_up"]:
        assert sorted(r) == ["layout", "predicted"]


def test_text_table_per_stage_and_totals(capsys):
    rc, out, _ = _run(capsys, ["plan", "--model", "llama2-13b", "--cluster", "dgx-a100-80g", "--nodes", "2", "--seq-len", "4096",
                               "--global-batch", "256", "--pp", "2", "--tp", "4"])
    assert rc == 0
    assert "stage" in out and "memory GiB" in out and "MFU" in out and "HFU" in out and "tokens/s" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("stage"))
    assert lines[header + 1].split()[0] == "0"
    assert any(line.split()[:1] == ["1"] for line in lines[header + 1:])
    assert "tp4" in out


def test_text_layout_lines_count_the_layers_per_strategy():
    """The text output's layout lines (best and runner-ups) count layers per strategy, most first; ``--json`` keeps
    the exact runs in order (the search keys layouts on them). A layer-wise 80-layer plan alternates strategies."""
    from meshwright.launcher.planner.search import summarize_layout

    runs = "pp=2 1f1b m=8 mb=1; 1x tp2 z2 rc=none, 3x tp2 z2 rc=full, 2x tp2 z2 rc=none, 1x tp2 z3 rc=full"
    assert summarize_layout(runs) == "pp=2 1f1b m=8 mb=1; 3x tp2 z2 rc=none, 3x tp2 z2 rc=full, 1x tp2 z3 rc=full"
    assert summarize_layout("pp=1 tp>=2 mb=16 1f1b") == "pp=1 tp>=2 mb=16 1f1b"  # a rejected layout: no runs
    result = plan_cmd.compute_result(_args(["--model", "llama2-70b", "--cluster", "dgx-a100-80g", "--nodes", "16",
                                            "--seq-len", "4096", "--global-batch", "1024"]))
    result.pop("_objects")
    text = plan_cmd.render_text(result).splitlines()
    exact = [result["layout"]] + [c["layout"] for c in result["runners_up"]]
    shown = [next(line for line in text if line.startswith("layout: "))[len("layout: "):]]
    shown += [line.split(" GiB  ", 1)[1] for line in text[text.index("runner-ups:") + 1:][:len(exact) - 1]]
    assert max(e.count(", ") for e in exact) > max(s.count(", ") for s in shown)  # some plan's runs were merged
    for e, s in zip(exact, shown, strict=True):
        assert s == summarize_layout(e)
        counts = [(int(run.split("x ", 1)[0]), run.split("x ", 1)[1]) for run in s.split("; ", 1)[1].split(", ")]
        assert sum(n for n, _ in counts) == 80 and len({k for _, k in counts}) == len(counts)
        assert [n for n, _ in counts] == sorted((n for n, _ in counts), reverse=True)


def test_a_budget_above_the_devices_memory_is_noted_in_one_line(capsys):
    """``--memory-budget-gib`` decides the search's budget, even above what the cluster's device holds (a what-if);
    stderr then says in one line that such a plan would not fit the card. At or below it, nothing is said."""
    argv = ["plan", "--model", "llama2-7b", "--cluster", "dgx-a100-80g", "--seq-len", "4096", "--global-batch", "128"]
    rc, out, err = _run(capsys, [*argv, "--memory-budget-gib", "100", "--json"])
    assert rc == 0 and json.loads(out)["memory_budget_gib"] == 100
    assert err.count("\n") == 1 and "--memory-budget-gib 100 is above the 79.1 GiB a dgx-a100-80g device holds" in err
    for budget in ("79.1", "40"):
        rc, _, err = _run(capsys, [*argv, "--memory-budget-gib", budget])
        assert rc == 0 and err == "", budget


def test_out_writes_a_plan_the_runtime_accepts(tmp_path, capsys):
    path = tmp_path / "plan.yaml"
    rc, out, _ = _run(capsys, ["plan", *GOLDEN_CASES["tiny_local_cpu"], "--out", str(path)])
    assert rc == 0 and path.is_file() and f"wrote {path}" in out
    plan = load_plan(path)
    validate_plan(plan, "tiny", 2)
    assert plan.predicted["step_s"] > 0


def test_infeasible_is_one_line(capsys):
    rc, out, err = _run(capsys, ["plan", "--model", "llama2-70b", "--cluster", "dgx-a100-80g", "--devices-per-node", "1",
                                 "--seq-len", "4096", "--global-batch", "8"])
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "no layout fits" in err and "smallest needs" in err and "nearest feasible change" in err
    rc, out, _ = _run(capsys, ["plan", "--model", "llama2-70b", "--cluster", "dgx-a100-80g", "--devices-per-node", "1",
                               "--seq-len", "4096", "--global-batch", "8", "--json"])
    data = json.loads(out)
    assert rc == 1 and data["feasible"] is False and data["min_memory_gib"] > 80 and data["suggestion"]


@pytest.mark.parametrize("argv,needle", [
    (["--model", "nope", "--cluster", "local-cpu", "--seq-len", "8", "--global-batch", "8"], "model='nope'"),
    (["--model", "tiny", "--cluster", "local-cpu", "--seq-len", "8", "--global-batch", "8", "--nodes", "0"], "--nodes=0"),
    (["--model", "tiny", "--cluster", "local-cpu", "--seq-len", "8", "--global-batch", "8", "--pp", "3"], "pp=3"),
    (["--model", "tiny", "--cluster", "local-cpu", "--seq-len", "8", "--global-batch", "8", "--allow", "magic"], "allow"),
    (["--model", "tiny", "--cluster", "local-cpu", "--seq-len", "8", "--global-batch", "8", "--hardware-profile", "/nonexistent.json"], "hardware-profile"),
])
def test_bad_input_is_a_one_line_error(capsys, argv, needle):
    rc, _, err = _run(capsys, ["plan", *argv])
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


# ---- exports -------------------------------------------------------------------------------------

def _best(argv):
    result = plan_cmd.compute_result(_args(argv))
    return result["_objects"]["best"].plan, result["_objects"]["cfg"]


def megatron_style_parser() -> argparse.ArgumentParser:
    """Megatron-LM's own parser (the pinned arguments.py in tests/consumers, on the installed megatron-core)."""
    from consumers.loaders import megatron_parser

    return megatron_parser()


def test_megatron_args_parse_and_match_the_plan(capsys):
    argv = ["--model", "llama2-13b", "--cluster", "dgx-a100-80g", "--nodes", "2", "--seq-len", "4096", "--global-batch", "256",
            "--tp", "4", "--pp", "2", "--recompute", "full"]
    rc, out, _ = _run(capsys, ["plan", *argv, "--emit", "megatron"])
    assert rc == 0
    ns = megatron_style_parser().parse_args(shlex.split(out))
    plan, cfg = _best([*argv, "--emit", "megatron"])  # the plan the export was made from (Megatron's own search)
    assert ns.tensor_model_parallel_size == 4 and ns.pipeline_model_parallel_size == 2
    assert ns.num_layers == cfg.n_layers and ns.hidden_size == cfg.d_model and ns.seq_length == 4096
    assert ns.micro_batch_size == plan.micro_batch and ns.global_batch_size == 256
    assert ns.recompute_granularity == "full" and ns.swiglu and ns.normalization == "RMSNorm"
    dp = 16 // (4 * 2)
    assert ns.global_batch_size % (ns.micro_batch_size * dp) == 0


def test_megatron_args_for_moe_and_gqa():
    plan, cfg = _best(GOLDEN_CASES["mixtral_16xh100"])
    args, notes = exports.megatron_args(plan, cfg)
    ns = megatron_style_parser().parse_args(args)
    assert ns.num_experts == 8 and ns.moe_router_topk == 2 and ns.group_query_attention and ns.num_query_groups == 8
    # the expert-parallel degree most of the (MoE) layers use; a note where they differ (the golden's plan mixes ep)
    eps = [s.ep for s in plan.layer_strategies()]
    assert ns.expert_model_parallel_size == max(set(eps), key=eps.count)
    assert (len(set(eps)) > 1) == any(n.startswith("layers differ in ep") for n in notes)


def test_deepspeed_config_loads_in_deepspeed(monkeypatch):
    import deepspeed.runtime.config as dsc

    argv = ["--model", "llama2-7b", "--cluster", "dgx-a100-80g", "--seq-len", "4096", "--global-batch", "128", "--pp", "1",
            "--tp", "1", "--zero", "3", "--recompute", "full"]
    plan, cfg = _best(argv)
    conf, _ = exports.deepspeed_config(plan, cfg)
    dp = plan.layer_strategies()[0].dp

    class MPU:  # DeepSpeed reads the data-parallel size from an mpu when one is given
        def get_data_parallel_world_size(self):
            return dp

    monkeypatch.setattr(dsc.dist, "get_rank", lambda *a, **k: 0)
    ds = dsc.DeepSpeedConfig(json.loads(json.dumps(conf)), mpu=MPU())
    assert ds.zero_optimization_stage == 3
    assert ds.train_batch_size == 128 and ds.train_micro_batch_size_per_gpu == plan.micro_batch
    assert ds.gradient_accumulation_steps == 128 // (dp * plan.micro_batch)
    assert ds.bfloat16_config.enabled


def test_torchtitan_config_parses_and_degrees_multiply_to_world():
    # torchtitan's configs are Python now (the TOML job config is gone): the export is a Python module
    plan, cfg = _best(GOLDEN_CASES["llama2_13b_16xa100_budget40"])
    text, _ = exports.torchtitan_config(plan, cfg)
    compile(text, "apply_plan.py", "exec")
    t, ac, _ = exports.torchtitan_settings(plan, cfg)
    t["activation_checkpoint"] = {"mode": {"None": "none", "FullAC.Config()": "full", "SelectiveAC.Config()": "selective"}[ac]}
    par = t["parallelism"]
    world = (par["data_parallel_replicate_degree"] * par["data_parallel_shard_degree"] * par["tensor_parallel_degree"]
             * par["pipeline_parallel_degree"] * par["context_parallel_degree"])
    assert world == 16
    assert t["training"]["num_tokens_per_train_step"] == 256 * 4096 and t["training"]["max_context_length"] == 4096
    assert t["activation_checkpoint"]["mode"] in ("none", "selective", "full")


def test_emit_unknown_target():
    plan, cfg = _best(GOLDEN_CASES["tiny_local_cpu"])
    with pytest.raises(Exception, match="emit"):
        exports.emit(plan, cfg, "jax")


# ---- goldens -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_plans(name):
    """Fixed inputs -> stored best plan, predicted figures and runner-up layouts, exactly."""
    result = plan_cmd.compute_result(_args(GOLDEN_CASES[name]))
    result.pop("_objects")
    got = {"argv": GOLDEN_CASES[name], "plan": result["plan"], "predicted": result["predicted"],
           "runners_up": [r["layout"] for r in result["runners_up"]]}
    path = GOLDEN / f"plan_{name}.json"
    if os.environ.get("MESHWRIGHT_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert got == want
    validate_plan(load_plan_dict(got["plan"]), load_model_config(GOLDEN_CASES[name][1]), result["world_size"])


def load_plan_dict(d):
    from meshwright.plan import plan_from_dict

    return plan_from_dict(d)


# ---- profiles ------------------------------------------------------------------------------------

def test_profile_hardware_single_process_writes_a_valid_profile(tmp_path, capsys):
    from meshwright.launcher.profiling.hardware import load_hardware_profile

    out = tmp_path / "hw.json"
    rc, text, _ = _run(capsys, ["profile", "hardware", "--sizes", "64,128", "--iters", "1", "--out", str(out)])
    assert rc == 0 and out.is_file()
    prof = load_hardware_profile(out)
    assert prof["device"]["gpu"]["available"] is False  # no driver here: the NVML fallback, not a crash
    assert prof["device"]["memory_gib"] is None  # CUDA's memory of the device: none on a CPU
    assert prof["derived"]["peak_tflops"]["fp32"] > 0 and len(prof["matmul"]) == 2
    # the planner takes it
    rc, _, _ = _run(capsys, ["plan", *GOLDEN_CASES["tiny_local_cpu"], "--hardware-profile", str(out), "--json"])
    assert rc == 0
    bad = json.loads(out.read_text())
    bad["version"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    rc, _, err = _run(capsys, ["plan", *GOLDEN_CASES["tiny_local_cpu"], "--hardware-profile", str(tmp_path / "bad.json")])
    assert rc == 2 and "version=99" in err
    del bad["derived"]["overlap_slowdown"]
    bad["version"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    rc, _, err = _run(capsys, ["plan", *GOLDEN_CASES["tiny_local_cpu"], "--hardware-profile", str(tmp_path / "bad.json")])
    assert rc == 2 and "overlap_slowdown" in err
    # a device holding less than the preset says (local-cpu: 12 GiB) sets the budget; a bad figure is one line
    small = json.loads(out.read_text())
    for memory, rc_want in ((0.75, 0), (-1, 2), ("lots", 2)):
        small["device"]["memory_gib"] = memory
        (tmp_path / "small.json").write_text(json.dumps(small))
        rc, text, err = _run(capsys, ["plan", *GOLDEN_CASES["tiny_local_cpu"], "--hardware-profile",
                                      str(tmp_path / "small.json"), "--json"])
        assert rc == rc_want, err
        if rc == 0:
            assert json.loads(text)["memory_budget_gib"] == 0.75
        else:
            assert len(err.strip().splitlines()) == 1 and f"device.memory_gib={memory!r}" in err


def test_profile_model_fits_times_and_measures_bytes(tmp_path, capsys):
    from meshwright.launcher.planner import cost_model as cm
    from meshwright.launcher.profiling.model import apply_model_profile, load_model_profile

    out = tmp_path / "model.json"
    rc, text, _ = _run(capsys, ["profile", "model", "--model", "tiny", "--batch-sizes", "1,2", "--seq-lens", "32,64",
                                "--tp", "1,2", "--iters", "1", "--out", str(out)])
    assert rc == 0
    prof = load_model_profile(out)
    cfg = load_model_config("tiny")
    assert [(e["kind"], e["tp"]) for e in prof["entries"]] == [("dense", 1), ("dense", 2)]
    for e in prof["entries"]:
        assert len(e["points"]) == 4 and set(e["fwd_fit"]) == {"a", "b", "c", "max_rel_err"}
        want = cm.activation_bytes(cfg, 0, 1.0, e["tp"], False, "none", 4)
        assert e["act_bytes_per_token"]["none"] == pytest.approx(want, rel=0.08)
    assert prof["entries"][1]["param_bytes"] < prof["entries"][0]["param_bytes"]
    from meshwright.config import load_cluster

    hw = apply_model_profile(cm.hardware_from_cluster(load_cluster("local-cpu")), prof, cfg)
    assert 0 < hw.matmul_efficiency <= 1 and hw.act_scale == pytest.approx(1.0, rel=0.08)
    # a hardware profile whose matmuls ran twice as fast halves the predicted block time
    from meshwright.launcher.profiling.model import speed_ratio

    fast = {"matmul": [{**m, "tflops": 2 * m["tflops"]} for m in prof["matmul_ref"]]}
    assert speed_ratio(prof, fast) == pytest.approx(2.0)
    hw2 = apply_model_profile(cm.hardware_from_cluster(load_cluster("local-cpu")), prof, cfg, fast)
    assert hw2.layer_overhead_s == pytest.approx(hw.layer_overhead_s / 2)
    assert hw2.matmul_efficiency == pytest.approx(min(2 * hw.matmul_efficiency, 1.0))
    with pytest.raises(Exception, match="model-profile"):
        apply_model_profile(hw, prof, load_model_config("tiny-gpt2"))
    rc, _, _ = _run(capsys, ["plan", *GOLDEN_CASES["tiny_local_cpu"], "--model-profile", str(out)])
    assert rc == 0


def test_lemo_needs_a_finetuning_task(capsys):
    """LeMo drops context tokens: the planner may use it for fine-tuning only, and says so in one line."""
    args = ["plan", "--model", "tiny", "--cluster", "local-cpu", "--seq-len", "128", "--global-batch", "8", "--json"]
    rc, _, err = _run(capsys, [*args, "--allow", "lemo"])
    assert rc == 2 and "task='pretrain'" in err and "finetune" in err and len(err.strip().splitlines()) == 1
    rc, out, _ = _run(capsys, [*args, "--allow", "lemo", "--task", "finetune"])
    assert rc == 0 and json.loads(out)["predicted"]["step_s"] > 0


def test_sp_constraint_fixes_sequence_parallelism(capsys):
    base = ["plan", "--model", "tiny", "--cluster", "local-cpu", "--devices-per-node", "2", "--seq-len", "128",
            "--global-batch", "8", "--tp", "2", "--json"]
    for flag, want in (("--sp", True), ("--no-sp", False)):
        rc, out, _ = _run(capsys, [*base, flag])
        assert rc == 0
        assert {layer["sp"] for layer in json.loads(out)["plan"]["layers"]} == {want}


def test_hsdp_exports_to_torchtitan_mesh_and_deepspeed_hpz(monkeypatch):
    from meshwright.plan import plan_from_dict

    cfg = load_model_config("llama2-7b")
    plan = plan_from_dict({"model": "llama2-7b", "seq_len": 4096, "global_batch": 256, "micro_batch": 1,
                           "cluster": {"preset": "dgx-a100-80g", "nodes": 8},
                           "layers": [{"dp": 64, "zero": 3, "dp_shard": 8, "repeat": cfg.n_layers}]})
    par = exports.torchtitan_settings(plan, cfg)[0]["parallelism"]
    assert (par["data_parallel_replicate_degree"], par["data_parallel_shard_degree"]) == (8, 8)
    conf, notes = exports.deepspeed_config(plan, cfg)
    assert conf["zero_optimization"]["zero_hpz_partition_size"] == 8 and any("hpZ" in n for n in notes)
    import deepspeed.runtime.config as dsc

    class MPU:
        def get_data_parallel_world_size(self):
            return 64

    monkeypatch.setattr(dsc.dist, "get_rank", lambda *a, **k: 0)
    ds = dsc.DeepSpeedConfig(json.loads(json.dumps(conf)), mpu=MPU())
    assert ds.zero_config.zero_hpz_partition_size == 8
    _, mnotes = exports.megatron_args(plan, cfg)
    assert any("HSDP" in n for n in mnotes)


# ---- stacks and training precision (issue 17) ----------------------------------------------------

def test_stack_option_sets_the_precision_policy_and_changes_memory(capsys):
    base = ["--model", "llama2-7b", "--cluster", "dgx-a100-80g", "--seq-len", "4096", "--global-batch", "64",
            "--tp", "1", "--pp", "1", "--zero", "0", "--recompute", "full", "--micro-batch", "1", "--json",
            "--memory-budget-gib", "400"]
    got = {}
    for stack in ("meshwright", "megatron", "deepspeed", "torchtitan"):
        rc, text, _ = _run(capsys, ["plan", *base, "--stack", stack])
        assert rc == 0
        data = json.loads(text)
        assert data["stack"] == stack
        got[stack] = (data["precision"], data["predicted"]["memory_gib_max"])
    assert got["meshwright"][0] == "autocast" and got["megatron"][0] == "bf16_fp32_grads" and got["deepspeed"][0] == "bf16"
    # ZeRO-0 states of 6.7B params: meshwright 16 B/param + 2 B autocast copies, Megatron 18, DeepSpeed 16
    assert got["deepspeed"][1] < got["megatron"][1]
    rc, text, _ = _run(capsys, ["plan", *base, "--dtype", "fp32"])
    assert json.loads(text)["precision"] == "fp32" and json.loads(text)["compute_dtype"] == "fp32"
    # DeepSpeed's fp32 policy (the ZeRO optimizers' fp32 master copy), the other stacks' plain fp32
    for stack, name in (("deepspeed", "deepspeed_fp32"), ("meshwright", "fp32")):
        rc, text, _ = _run(capsys, ["plan", *base, "--dtype", "fp32", "--stack", stack])
        assert rc == 0 and json.loads(text)["precision"] == name


def test_deepspeed_stacks_count_the_buckets_and_the_fp32_accumulation_and_keep_to_what_deepspeed_runs(capsys):
    """DeepSpeed's two bf16 optimizers as the planner sees them (bytes measured in tests/distributed/parity_deepspeed.py):
    the ZeRO optimizer's 2.0e9 bytes of reduction buckets, BF16_Optimizer's full fp32 gradient buffer (4 B/param,
    not sharded), and a search that keeps BF16_Optimizer at ZeRO-1, the one stage DeepSpeed builds it at."""
    base = ["--model", "llama2-7b", "--cluster", "dgx-a100-80g", "--seq-len", "4096", "--global-batch", "64", "--tp", "1",
            "--pp", "1", "--recompute", "full", "--micro-batch", "1", "--json", "--memory-budget-gib", "400"]
    got = {}
    for stack in ("deepspeed", "deepspeed-fp32-accum"):
        rc, text, _ = _run(capsys, ["plan", *base, "--zero", "1", "--stack", stack])
        assert rc == 0
        data = json.loads(text)
        got[stack] = data["predicted"]
    params = 6.74e9  # llama2-7b, every one on the rank (tp1, pp1), gradients not sharded at ZeRO-1
    # + 4 B/param fp32 accumulation, - the 2.0e9 bucket bytes; the fp32 reduction moves no memory
    extra = got["deepspeed-fp32-accum"]["memory_gib_max"] - got["deepspeed"]["memory_gib_max"]
    assert extra == pytest.approx((4 * params * 1.065 - 2e9) / 2**30, rel=0.01)
    free = ["--model", "llama2-7b", "--cluster", "dgx-a100-80g", "--nodes", "2", "--seq-len", "4096", "--global-batch", "256"]
    rc, text, _ = _run(capsys, ["plan", *free, "--json", "--stack", "deepspeed-fp32-accum"])
    assert rc == 0
    data = json.loads(text)
    assert {s["zero"] for s in data["plan"]["layers"]} == {1}
    for zero in ("0", "2"):
        rc, _, err = _run(capsys, ["plan", *base, "--zero", zero, "--stack", "deepspeed-fp32-accum"])
        assert rc != 0 and f"stack='deepspeed-fp32-accum' cannot run the layout fixed by --zero {zero} --pp 1; " \
                           "valid: --zero 1 with --schedule 1f1b" in err
    # with --emit deepspeed the line names the flag that conflicts (--stack), not emit='deepspeed-fp32-accum'
    for extra, fixed in ((["--zero", "3"], "--zero 3 --pp 1"), (["--pp", "2", "--virtual-stages", "2"],
                                                                 "--pp 2 --virtual-stages 2")):
        rc, _, err = _run(capsys, ["plan", *base, *extra, "--emit", "deepspeed", "--stack", "deepspeed-fp32-accum"])
        assert rc != 0 and "error: stack='deepspeed-fp32-accum' (with --emit deepspeed) cannot run the layout fixed " \
                           f"by {fixed}; valid: --zero 1 with" in err, err
    # fp32 training with the bf16 + fp32-accumulation stack: predicted fp32 throughout, emitted bf16 (BF16_Optimizer)
    for flag in ([], ["--emit", "deepspeed"]):
        rc, _, err = _run(capsys, ["plan", *base, "--zero", "1", "--stack", "deepspeed-fp32-accum", "--dtype", "fp32",
                                   *flag])
        assert rc != 0 and "error: dtype='fp32' is invalid; valid: bf16 with --stack deepspeed-fp32-accum" in err, err
    # HSDP where the stack has none: DeepSpeed's ZeRO-2 and Megatron's FSDP2 shard over all dp ranks (the search
    # picked z2 hsdp8 and z3 hsdp8 here, which their exports could only approximate)
    for stack, zero in (("deepspeed", 2), ("megatron", 3)):
        rc, text, _ = _run(capsys, ["plan", *free, "--json", "--stack", stack, "--top", "3"])
        assert rc == 0
        data = json.loads(text)
        layouts = [data["layout"]] + [r["layout"] for r in data["runners_up"]]
        assert len(layouts) == 3 and not [t for t in layouts if f"z{zero} hsdp" in t], (stack, layouts)
    # DeepSpeed's pipeline engine has no interleaved schedule: the flag is refused, not dropped
    for flag in (["--stack", "deepspeed"], ["--emit", "deepspeed"]):
        rc, _, err = _run(capsys, ["plan", *free, "--virtual-stages", "2", *flag])
        assert rc != 0 and "cannot run the layout fixed by --virtual-stages 2; valid: --virtual-stages 1" in err


def test_model_profile_in_the_training_dtype_is_recorded_and_checked():
    from meshwright.config import load_cluster
    from meshwright.launcher.planner import cost_model as cm
    from meshwright.launcher.profiling.model import apply_model_profile, profile_model

    cfg = load_model_config("tiny")
    prof = profile_model(cfg, [1, 2], [16, 32], [1], iters=1, progress=False, dtype="bf16")
    assert prof["dtype"] == "bf16" and prof["mode"] == "autocast" and prof["matmul_ref"][0]["dtype"] == "bf16"
    # autocast saves its bf16 casts for the matmuls next to the fp32 norm/residual tensors: not half the fp32 bytes
    fp32 = profile_model(cfg, [1, 2], [16, 32], [1], iters=1, progress=False)
    assert fp32["dtype"] == "fp32"
    assert prof["entries"][0]["act_bytes_per_token"]["none"] != fp32["entries"][0]["act_bytes_per_token"]["none"]
    cpu = cm.hardware_from_cluster(load_cluster("local-cpu"))
    with pytest.raises(Exception, match="model-profile.dtype"):
        apply_model_profile(cpu, prof, cfg)  # an fp32 plan cannot be calibrated with bf16 timings
    bf = cm.hardware_from_cluster(load_cluster("local-cpu"), dtype="bf16")
    cal = apply_model_profile(bf, prof, cfg)
    analytic_bf16 = cm.activation_bytes(cfg, 0, 1.0, 1, False, "none", 2) + cm.autocast_extra_act_bytes(cfg, 1.0, 1, False, "none")
    assert cal.compute_dtype == "bf16"
    assert cal.act_scale == pytest.approx(prof["entries"][0]["act_bytes_per_token"]["none"] / analytic_bf16)
    with pytest.raises(Exception, match="dtype"):
        profile_model(cfg, [1, 2], [16, 32], [1], iters=1, progress=False, dtype="fp8")


def test_cp_and_power_basis_flags(capsys):
    base = ["--model", "tiny", "--cluster", "local-cpu", "--seq-len", "128", "--global-batch", "8"]
    rc, _, err = _run(capsys, ["plan", *base, "--cp", "2"])
    assert rc != 0 or "any-runtime" in err
    with pytest.raises(Exception, match="any-runtime"):
        plan_cmd.compute_result(_args([*base, "--cp", "2"]))
    out = plan_cmd.compute_result(_args([*base, "--cp", "2", "--any-runtime"]))
    assert all(s["cp"] == 2 for s in out["plan"]["layers"]) and "cp2" in out["layout"]
    tdp = plan_cmd.compute_result(_args([*base, "--train-tokens", "1B", "--power-basis", "tdp", "--pue", "1.0"]))
    node = plan_cmd.compute_result(_args([*base, "--train-tokens", "1B", "--pue", "1.0"]))
    assert tdp["capacity"]["device_hours"] == node["capacity"]["device_hours"]
    assert tdp["capacity"]["energy_mwh"] != node["capacity"]["energy_mwh"]


def test_emit_deepspeed_writes_the_config_of_the_stack_predicted(capsys, monkeypatch):
    """``--emit deepspeed --stack deepspeed-fp32-accum`` writes what makes DeepSpeed 0.19.8 build BF16_Optimizer (bf16,
    ZeRO-1, data_types.grad_accum_dtype fp32: engine.py _do_optimizer_sanity_check), the plain stack leaves the
    accumulation dtype to bf16 (the ZeRO optimizer), and both write the buffer sizes the planner counts (run under
    DeepSpeed in tests/distributed/parity_deepspeed.py)."""
    import deepspeed.runtime.config as dsc

    from meshwright.launcher.planner.stack import STACKS
    from meshwright.plan import plan_from_dict

    class MPU:
        def get_data_parallel_world_size(self):
            return 8

    monkeypatch.setattr(dsc.dist, "get_rank", lambda *a, **k: 0)
    capsys.readouterr()  # DeepSpeed's import may log to stdout: not the first command's output
    base = ["--model", "llama2-7b", "--cluster", "dgx-a100-80g", "--seq-len", "4096", "--global-batch", "64", "--tp", "1",
            "--pp", "1", "--recompute", "full", "--micro-batch", "1", "--emit", "deepspeed"]
    sizes = STACKS["deepspeed"].deepspeed
    got = {}
    for stack, zero in (("deepspeed-fp32-accum", "1"), ("deepspeed", "1"), ("deepspeed", "3")):
        rc, text, _ = _run(capsys, ["plan", *base, "--stack", stack, "--zero", zero])
        assert rc == 0
        got[stack, zero] = conf = json.loads(text)
        ds = dsc.DeepSpeedConfig(conf, mpu=MPU())
        capsys.readouterr()
        assert ds.bfloat16_config.enabled and ds.zero_optimization_stage == int(zero)
        assert ds.zero_config.reduce_bucket_size == sizes.reduce_bucket_size
    assert got["deepspeed-fp32-accum", "1"]["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in got["deepspeed", "1"] and "data_types" not in got["deepspeed", "3"]
    z3 = dsc.DeepSpeedConfig(got["deepspeed", "3"], mpu=MPU()).zero_config
    assert (z3.prefetch_bucket_size, z3.max_live_parameters, z3.max_reuse_distance, z3.param_persistence_threshold) == (
        sizes.stage3_prefetch_bucket_size, sizes.stage3_max_live_parameters, sizes.stage3_max_reuse_distance,
        sizes.stage3_param_persistence_threshold)
    rc, _, err = _run(capsys, ["plan", *base, "--stack", "megatron"])
    assert rc != 0 and "stack='megatron' is invalid with --emit deepspeed; valid: 'deepspeed' or 'deepspeed-fp32-accum'" in err
    # bf16 without ZeRO under the pipeline engine is BF16_Optimizer too (bf16 accumulation): counted by the planner
    # (the deepspeed stack's pipeline_zero0_precision), so no note
    plan = plan_from_dict({"model": "llama2-7b", "seq_len": 4096, "global_batch": 64, "micro_batch": 1,
                           "pipeline": {"degree": 2, "schedule": "1f1b"}, "layers": [{"dp": 4, "zero": 0, "repeat": 32}]})
    _, notes = exports.deepspeed_config(plan, load_model_config("llama2-7b"))
    assert not any("zero=0" in n or "BF16_Optimizer" in n for n in notes), notes


def test_plan_zero1_for_meshwrights_runtime_is_one_it_runs(capsys):
    """`plan --zero 1` for meshwright's runtime prints a plan its ZeRO-1 runs (one ZeroRedundancyOptimizer per stage,
    checkpointed through DCP since parallel/zero1_state.py; stop 35 refused it): every layer tp=1 and ZeRO-1, the
    ends replicated, passing the runtime's check; with --tp 2 one line (its ZeRO-1 is tp=1 only), while the stacks
    that run ZeRO-1 at tp>1 (DeepSpeed here) and --any-runtime still plan it."""
    from meshwright.parallel.support import check_runtime_support
    from meshwright.plan import plan_from_dict

    base = ["--model", "llama2-7b", "--cluster", "dgx-a100-80g", "--seq-len", "4096", "--global-batch", "64", "--json"]
    rc, text, err = _run(capsys, ["plan", *base, "--zero", "1"])
    assert rc == 0, err
    plan = plan_from_dict(json.loads(text)["plan"])
    assert {(s.tp, s.zero) for s in plan.layer_strategies()} == {(1, 1)} and plan.embedding.zero == 0
    check_runtime_support(plan, load_model_config("llama2-7b"), "dtensor", "torch")
    rc, _, err = _run(capsys, ["plan", *base, "--zero", "1", "--tp", "2"])
    assert rc == 2 and "tp=2 is invalid; valid: 1 with --zero 1 for meshwright's runtime" in err, err
    assert len(err.strip().splitlines()) == 1
    for extra in (["--stack", "deepspeed"], ["--any-runtime"]):
        rc, text, err = _run(capsys, ["plan", *base, "--zero", "1", *extra])
        assert rc == 0, err
        assert {s["zero"] for s in json.loads(text)["plan"]["layers"]} == {1}