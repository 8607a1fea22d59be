"""A Plan file run with a train config it was not made for (issues #16/#17): the runtimes read the train config's
model, seq_len and batch split while the Plan's layout and memory were computed for its own, so a plan for seq 64
ran at seq 32, a plan for `tiny` on `tiny-moe`, a 2-device plan on 4 ranks. Each is now one line naming the plan
field, before any model is built; what the Plan does not record (steps, lr) may differ; `--plan auto` still works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from meshwright.cli import main
from meshwright.config import load_model_config, load_train_config
from meshwright.config.io import to_dict
from meshwright.errors import ConfigError
import meshwright.train.build as build_mod
from meshwright.train.build import TrainingJob, build_runtime, run_training

TP2 = str(REPO / "configs/plans/tiny-tp2.yaml")  # tiny, seq 64, global 8, micro 4, 2 devices (tiny-test's numbers)
ONE = "version: 1\nmodel: tiny\nseq_len: 64\nglobal_batch: 8\nmicro_batch: 4\nlayers:\n  - {repeat: 4}\n"


def refused(overrides: dict, plan: str, world: int, monkeypatch, build: bool = False) -> str:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError) as err:
        job = TrainingJob.resolve(load_train_config("tiny-test", overrides), plan)
        if build:
            build_runtime(job)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def write(tmp_path: Path, text: str, name: str = "plan.yaml") -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize("overrides,needle", [
    ({"seq_len": 32}, "plan.seq_len=64 is invalid; valid: 32, the train config's seq_len (re-plan with `meshwright plan ... --seq-len 32`, or set seq_len=64"),
    ({"micro_batch": 2}, "plan.micro_batch=4 is invalid; valid: 2, the train config's micro_batch"),
    ({"global_batch": 16}, "plan.global_batch=8 is invalid; valid: 16, the train config's global_batch"),
    ({"model": "tiny-moe"}, "plan.model.n_experts=0 is invalid; valid: 4, the train model's (tiny-moe) n_experts"),
    ({"model": "llama2-7b"}, "plan.model.n_layers=4 is invalid; valid: 32"),
    ({"model": {"name": "tiny", "n_layers": 8, "d_model": 128, "n_heads": 4, "vocab_size": 256}},
     "plan.model.n_layers=4 is invalid; valid: 8"),  # same name, a mapping: compared field by field
])
def test_each_mismatch_is_one_line_naming_the_plan_field(monkeypatch, overrides, needle):
    if overrides.get("model") == "tiny-moe":  # the moe shape is what differs; read its expert count
        needle = needle.replace("4,", f"{load_model_config('tiny-moe').n_experts},")
    assert needle in refused(overrides, TP2, 2, monkeypatch)


def test_the_config_plan_field_is_checked_too(monkeypatch, tmp_path):
    """`plan: FILE` in the train config goes through the same check as --plan FILE."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^plan.seq_len=64 is invalid; valid: 32"):
        TrainingJob.resolve(load_train_config("tiny-test", {"plan": TP2, "seq_len": 32}))
    assert TrainingJob.resolve(load_train_config("tiny-test", {"plan": TP2})).plan_ref == TP2


def test_an_unknown_model_name_in_the_plan(monkeypatch, tmp_path):
    plan = write(tmp_path, ONE.replace("model: tiny", "model: made-elsewhere"))
    msg = refused({}, plan, 1, monkeypatch)
    assert msg.startswith("plan.model='made-elsewhere' is invalid; valid: 'tiny', the train config's model")


def test_the_device_count_must_be_this_runs(monkeypatch):
    """Said when the runtime is picked (before the process group or the model), not as tp*dp*cp inside it."""
    def no_runtime(*a, **k):
        raise AssertionError("built the distributed runtime")

    monkeypatch.setattr(build_mod, "build_distributed_runtime", no_runtime)
    msg = refused({}, TP2, 4, monkeypatch, build=True)  # torchrun --nproc-per-node 4 with a 2-device plan
    assert msg.startswith(f"plan={TP2!r} is invalid; valid: a plan for this run's 4 processes: it lays the model out on 2")
    assert "torchrun --nproc-per-node 2" in refused({}, TP2, 1, monkeypatch, build=True)  # one process, as before


def test_fp8_optimizer_states_need_coat(monkeypatch, tmp_path):
    plan = write(tmp_path, ONE + "optimizer: {states: fp8}\n")
    assert refused({}, plan, 1, monkeypatch).startswith("plan.optimizer.states='fp8' is invalid; valid: fp32 with optimizer='adamw'")
    monkeypatch.setenv("WORLD_SIZE", "1")
    TrainingJob.resolve(load_train_config("tiny-test", {"optimizer": "coat_adamw"}), plan)


def test_what_the_plan_does_not_record_may_differ(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_train_config("tiny-test", {"steps": 99, "lr": 1e-2, "eval_every": 0, "seed": 7, "cluster": "dgx-h100-80g"})
    assert TrainingJob.resolve(cfg, TP2).plan.world_size() == 2
    monkeypatch.setenv("WORLD_SIZE", "1")
    # a model mapping or another file of the same shape matches field by field, whatever its name
    tiny = to_dict(load_model_config("tiny"))
    for ref in (yaml.safe_dump({**tiny, "name": "tiny-copy"}), None):
        model = write(tmp_path, ref, "tiny-copy.yaml") if ref else "tiny"
        plan = write(tmp_path, ONE.replace("model: tiny", f"model: {json.dumps(tiny)}"))
        TrainingJob.resolve(load_train_config("tiny-test", {"model": model}), plan)
    plan = write(tmp_path, ONE.replace("model: tiny", f"model: {tmp_path / 'tiny-copy.yaml'}"))
    TrainingJob.resolve(load_train_config("tiny-test"), plan)
    assert TrainingJob.resolve(load_train_config("tiny-test", {"seq_len": 32}), "auto").plan.seq_len == 32


def test_the_cli_refuses_before_creating_the_run_dir(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "o"
    plan = write(tmp_path, ONE)
    rc = main(["train", "tiny-test", "seq_len=32", f"out_dir={out}", "--plan", plan])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert rc == 2 and len(err) == 1 and "plan.seq_len=64 is invalid; valid: 32" in err[0], err
    assert not out.exists()


@pytest.mark.timeout(120)
def test_a_matching_plan_file_trains(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_train_config("tiny-test", {"steps": 2, "warmup_steps": 1, "eval_every": 0, "log_every": 1,
                                          "ckpt_every": 0, "energy": False, "data.max_files": 20,
                                          "out_dir": str(tmp_path / "run")})
    summary = run_training(cfg, write(tmp_path, ONE))
    assert summary["steps_this_run"] == 2 and summary["final_loss"] is not None
    assert yaml.safe_load((tmp_path / "run" / "plan.yaml").read_text())["seq_len"] == 64


def test_launch_checks_the_plan_against_the_hosts(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the hosts run in this directory: launch preflights the train command here
    hostfile = tmp_path / "hosts"
    hostfile.write_text("127.0.0.1 slots=4\n")
    argv = ["launch", "--hosts", str(hostfile), "--dry-run", "--", "train", "tiny-test"]
    assert main([*argv, "--plan", "configs/plans/tiny-tp2.yaml"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1 and "a plan for this run's 4 processes: it lays the model out on 2" in err[0], err
    assert main([*argv, "seq_len=32", "--plan", "configs/plans/tiny-tp2.yaml"]) == 2
    assert "plan.seq_len=64 is invalid" in capsys.readouterr().err
    hostfile.write_text("127.0.0.1 slots=2\n")
    assert main([*argv, "--plan", "configs/plans/tiny-tp2.yaml"]) == 0


def _hf_dir(tmp_path: Path, name: str = "my-llama", layers: int = 2) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": layers,
        "num_attention_heads": 4, "intermediate_size": 96, "max_position_embeddings": 128}))
    return d


def test_init_from_with_model_overrides_matches_a_plan_made_for_its_config_json(tmp_path, monkeypatch, capsys):
    """docs/finetune.md's workflow: `init_from: DIR` plus `model: {max_seq_len: ...}` overrides, with a plan from
    `meshwright plan --model DIR/config.json` (which names the model after DIR). Refused before the fix as
    "plan.model='my-llama' is invalid; valid: 'my-llama'" (the name resolves to no preset here)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = _hf_dir(tmp_path)
    plan = str(tmp_path / "plan.yaml")
    assert main(["plan", "--model", str(d / "config.json"), "--cluster", "local-cpu", "--devices-per-node", "1",
                 "--seq-len", "64", "--global-batch", "8", "--micro-batch", "4", "--out", plan]) in (0, None)
    capsys.readouterr()
    assert yaml.safe_load(Path(plan).read_text())["model"] == "my-llama"
    for model in ({"max_seq_len": 256, "dropout": 0.0}, None):  # overrides (a mapping), or the checkpoint's as is
        over = {"init_from": str(d), **({"model": model} if model else {})}
        TrainingJob.resolve(load_train_config("tiny-test", over), plan)
    # an override that changes the shape is still compared field by field against the checkpoint's config.json
    msg = refused({"init_from": str(d), "model": {"n_layers": 3}}, plan, 1, monkeypatch)
    assert msg.startswith("plan.model.n_layers=2 is invalid; valid: 3"), msg
    # a plan made for another checkpoint directory (another name) is still refused
    other = _hf_dir(tmp_path, "other-llama", layers=3)
    msg = refused({"init_from": str(other), "model": {"max_seq_len": 256}}, plan, 1, monkeypatch)
    assert msg.startswith("plan.model='my-llama' is invalid; valid: 'other-llama'"), msg


def test_a_named_model_mapping_matches_a_plan_made_from_its_yaml(tmp_path, monkeypatch):
    """A train config's inline `model:` mapping with a name (gpu_check's style), planned by writing it to a YAML
    file (`meshwright plan --model that.yaml` records the name): both sides name the same model, matched by name
    although the name is no preset here (refused before as "valid: 'small-llama', the train config's model")."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    mapping = {**to_dict(load_model_config("tiny")), "name": "small-llama"}
    plan = write(tmp_path, ONE.replace("model: tiny", "model: small-llama"))
    TrainingJob.resolve(load_train_config("tiny-test", {"model": mapping}), plan)


MHA = {**to_dict(load_model_config("tiny")), "name": "tiny-mha", "n_kv_heads": None}  # gpt2 blocks have no GQA


@pytest.mark.parametrize("field,plan_value,train_model", [
    ("top_k", 1, "tiny-moe"),  # routed tokens, dispatch bytes and expert activations scale with it
    ("capacity_factor", 1.0, "tiny-moe"),  # the planner counts min(1, capacity) of the routed tokens
    ("arch", "gpt2", MHA),  # activation coefficients per arch
    ("attn_head_dim", 64, "tiny"),  # q/k/v widths: attention memory and flops
])
def test_other_fields_the_memory_model_reads_are_compared(monkeypatch, tmp_path, field, plan_value, train_model):
    """The planner's memory and time read arch, head_dim, top_k and capacity_factor too: a plan for a model that
    differs only there predicted another model's memory (was accepted: only the layout-shaping fields were read)."""
    train = load_model_config(train_model)
    planned = {**to_dict(train), "name": "custom", field: plan_value, "ffn_hidden": train.ffn_dim}
    plan = write(tmp_path, ONE.replace("model: tiny", f"model: {json.dumps(planned)}"))
    msg = refused({"model": train_model}, plan, 1, monkeypatch)
    shown = {"attn_head_dim": "head_dim"}.get(field, field)
    assert msg.startswith(f"plan.model.{shown}="), msg


@pytest.mark.timeout(120)
def test_plan_auto_with_init_from_plans_the_checkpoints_model(tmp_path, monkeypatch):
    """`--plan auto` with `init_from` planned the train config's `model` field (the default preset, or a mapping of
    overrides read as a whole model) instead of the checkpoint's config.json: a 4-layer `tiny` layout for a 2-layer
    model (refused by validate_plan under torchrun), predictions for the wrong model, and a run-dir plan.yaml that
    no longer matched its own run when passed back with --plan."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = _hf_dir(tmp_path)
    for model in (None, {"max_seq_len": 128}):
        over = {"init_from": str(d), "auto_profile": False, **({"model": model} if model else {})}
        cfg = load_train_config("tiny-test", over)
        job = TrainingJob.resolve(cfg, "auto")
        assert job.plan.model == "my-llama" and len(job.plan.layer_strategies()) == 2, job.plan.model
        saved = str(tmp_path / "saved.yaml")
        job.plan.save(saved)
        TrainingJob.resolve(cfg, saved)  # the run dir's plan.yaml matches its own run


def test_a_plan_predicting_more_than_the_gpu_holds_is_one_warning_line(tmp_path, monkeypatch, capsys):
    """On a GPU, rank 0 says in one line when the Plan's predicted peak (per stage) is above the device's memory (a
    plan for an 80 GB preset run on a 40 GB card went out of memory only after the model was built); the run goes on.
    The CPU walks the GPU's path with the device's memory given; without a GPU nothing is said."""
    import torch

    plan = write(tmp_path, ONE + "predicted: {memory_gib: [30.2, 41.5]}\n")
    monkeypatch.setenv("WORLD_SIZE", "1")
    TrainingJob.resolve(load_train_config("tiny-test"), plan)
    assert capsys.readouterr().err == ""  # no GPU here: a plan's memory is per GPU, CPU ranks share the host's
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for held_gib, said in ((40.0, True), (80.0, False)):
        monkeypatch.setattr(build_mod, "device_memory_bytes", lambda: int(held_gib * 2**30))
        job = TrainingJob.resolve(load_train_config("tiny-test"), plan)
        err = capsys.readouterr().err
        assert job.plan is not None and job.plan.predicted["memory_gib"] == [30.2, 41.5]
        if said:
            assert err.count("\n") == 1 and "predicts a peak of 41.5 GiB" in err and "holds 40.0 GiB" in err
            assert "--memory-budget-gib 40.0" in err
        else:
            assert err == ""
    from meshwright.train.plan_match import plan_memory_warning

    empty = write(tmp_path, ONE + "predicted: {memory_gib: []}\n", "empty.yaml")  # validate_plan lets [] through
    assert plan_memory_warning(TrainingJob.resolve(load_train_config("tiny-test"), empty).plan, 1 << 30) is None
    monkeypatch.setenv("RANK", "1")  # the other ranks stay quiet
    monkeypatch.setattr(build_mod, "device_memory_bytes", lambda: 1 << 30)
    TrainingJob.resolve(load_train_config("tiny-test"), plan)
    assert capsys.readouterr().err == ""


def test_plan_auto_on_a_gpu_plans_for_the_memory_the_device_holds(monkeypatch):
    """``--plan auto`` on a GPU whose device holds less than the cluster preset (or a profile) says plans for the
    device's own memory: a config naming an 80 GB preset on a 40 GB card planned for 80. The CPU walks the GPU's path
    with the device's memory given: the budget reaches the search (a device too small for tiny is refused in one
    line naming the budget), a larger device leaves the preset's, and without a GPU nothing changes."""
    import torch

    from meshwright.launcher.planner import auto as auto_mod

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("memory_budget_gib"))
        return auto_mod.auto_plan(*args, **kwargs)

    monkeypatch.setattr(build_mod, "auto_plan", spy)
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = load_train_config("tiny-test", {"auto_profile": False})  # local-cpu preset: 12 GiB per device
    TrainingJob.resolve(cfg, "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for held_gib, budget in ((64.0, None), (2.0, 2.0)):
        monkeypatch.setattr(build_mod, "device_memory_bytes", lambda: int(held_gib * 2**30))
        assert TrainingJob.resolve(cfg, "auto").plan is not None
        assert seen[-1] == budget
    monkeypatch.setattr(build_mod, "device_memory_bytes", lambda: 2**20)  # 1 MiB: tiny does not fit
    with pytest.raises(ConfigError, match=r"plan='auto' found no layout: no layout fits in 0\.0 GiB"):
        TrainingJob.resolve(cfg, "auto")
    assert seen[0] is None and seen[-1] == 2**20 / 2**30
