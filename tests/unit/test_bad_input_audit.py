"""Bad input found by a sweep of every entry point (configs, plan flags, checkpoints, HF directories, output
paths, launch/profile flags): each is one line on stderr and exit 2, said before any work, and leaves nothing
behind. Before the fixes these were torch/safetensors/OSError tracebacks, silent acceptance, a hang, a Rust
abort, or an error only after the search/measurement/model build. CLI calls run in-process (``cli.main``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from _train_helpers import MICRO, one_line_error, trained_run
from meshwright.cli import main
from meshwright.config import load_model_config, load_train_config
from meshwright.errors import ConfigError
from meshwright.models import build_model
from meshwright.models.hf_weights import save_hf

PLAN = ["plan", "--model", "tiny", "--cluster", "local-cpu", "--seq-len", "64", "--global-batch", "8", "--top", "1"]
TRAIN = ["train", "tiny-test", "steps=2", "warmup_steps=1", "eval_every=0"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ---- config fields ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,needle", [
    (["eps=-1e-8"], "eps=-1e-08 is invalid"),  # was torch's "ValueError: Invalid epsilon value" traceback
    (["eps=0"], "eps=0.0 is invalid"),  # trained into NaN at step 2
    (["out_dir=''"], "out_dir='' is invalid"),  # trained into the working directory
    (["=3"], "override='=3' is invalid"),  # was " is not a known key"
    (["model.d_model=64"], "model='tiny' here"),  # said only "a key whose parents are mappings"
    (["model={n_experts: 4, moe_every: 100}"], "moe_every=100 is invalid"),  # an MoE model without an MoE layer
    (["model={top_k: 0}"], "top_k=0 is invalid"),  # MoE fields on a dense model were never checked
    (["model={capacity_factor: -1}"], "capacity_factor=-1.0 is invalid"),
    (["model={aux_loss_coef: -1}"], "aux_loss_coef=-1.0 is invalid"),
    (["cluster={host_power_w: -1, peak_tflops: {fp32: 1}}"], "host_power_w=-1.0 is invalid"),
    (["cluster={inter_node_latency_us: -1, peak_tflops: {fp32: 1}}"], "inter_node_latency_us=-1.0"),  # named intra_
    (["wandb=offline", "wandb_project=''"], "wandb_project='' is invalid"),
])
def test_train_config_values(capsys, tmp_path, overrides, needle):
    line = one_line_error(capsys, [*TRAIN, *overrides] if overrides[0].startswith("out_dir") else
                          [*TRAIN, f"out_dir={tmp_path / 'o'}", *overrides])
    assert needle in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "ckpt").exists()


def test_moe_ffn_hidden_zero_is_named_not_a_zero_division(capsys, tmp_path):
    model = _yaml(tmp_path / "m.yaml", {"n_experts": 4, "top_k": 2, "moe_ffn_hidden": 0})
    line = one_line_error(capsys, ["plan", "--model", model, *PLAN[3:]])
    assert "model.moe_ffn_hidden=0 is invalid" in line


# ---- meshwright plan --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,needle", [
    (["--tp", "3"], "tp=3 is invalid"),  # was "no layout fits in 12.0 GiB ... a larger --memory-budget-gib"
    (["--dp", "3"], "dp=3 is invalid"),
    (["--micro-batch", "3"], "micro-batch=3 is invalid"),
    (["--ep", "2"], "ep=2 is invalid"),  # silently ignored on a dense model
    (["--sp", "--tp", "1"], "sp=True is invalid"),
    (["--memory-budget-gib", "nan"], "memory_budget_gib=nan is invalid"),  # "no layout fits in nan GiB"
    (["--pue", "nan"], "pue=nan is invalid"),  # capacity inputs were checked only with --train-tokens
    (["--price-per-device-hour", "nan", "--train-tokens", "1B"], "price_per_device_hour=nan is invalid"),
    (["--goodput", "0"], "goodput=0.0 is invalid"),
    (["--power-basis", "measured"], "measured_power_w=None is invalid"),
    (["--train-tokens", "inf"], "train_tokens=inf is invalid"),
    (["--train-tokens", "0.5"], "train_tokens='0.5' is invalid; valid: at least one step's tokens"),  # costed as half a token
    (["--out", "."], "--out='.' is invalid"),  # IsADirectoryError traceback after the search
    (["--out", "/dev/null/plan.yaml"], "--out='/dev/null/plan.yaml' is invalid"),  # FileExistsError traceback
    (["--train-config", "tiny-test"], "--train-config='tiny-test' is invalid"),  # ignored without --emit
])
def test_plan_flags(capsys, flags, needle):
    assert needle in one_line_error(capsys, PLAN + flags)


def test_plan_train_config_is_read_before_the_search(capsys, tmp_path, monkeypatch):
    import meshwright.launcher.planner.search as search_mod

    bad = tmp_path / "t.yaml"
    bad.write_text("- 1\n")

    def no_search(*a, **k):
        raise AssertionError("searched before reading --train-config")

    monkeypatch.setattr(search_mod, "search", no_search)
    line = one_line_error(capsys, PLAN + ["--emit", "megatron", "--train-config", str(bad)])
    assert "holds list" in line


@pytest.mark.timeout(60)
def test_plan_huge_global_batch_is_refused_not_a_hang(capsys):
    argv = PLAN.copy()
    argv[argv.index("--global-batch") + 1] = str(10**11)
    assert "global-batch=100000000000 is invalid" in one_line_error(capsys, argv)


# ---- train: nothing written, nothing left on refused input ------------------------------------------------

def test_bad_resume_from_writes_nothing(capsys, tmp_path):
    out = tmp_path / "fresh" / "run"
    line = one_line_error(capsys, [*TRAIN, f"out_dir={out}", "--resume-from", str(tmp_path)])
    assert "resume=" in line
    assert not (tmp_path / "fresh").exists()  # config.yaml and model.yaml were written before the refusal


def test_refused_plan_leaves_no_new_out_dir(capsys, tmp_path):
    out = tmp_path / "new" / "run"
    assert "plan='nope.yaml' is invalid" in one_line_error(capsys, [*TRAIN, f"out_dir={out}", "--plan", "nope.yaml"])
    assert not (tmp_path / "new").exists()  # was left holding .meshwright.lock
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("x")
    one_line_error(capsys, [*TRAIN, f"out_dir={keep}", "--plan", "nope.yaml"])
    assert (keep / "notes.txt").read_text() == "x"  # an existing directory is never removed


# ---- checkpoints, HF directories, export ------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("audit-run"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = load_model_config(MICRO)
    return save_hf(build_model(cfg, seed=0), cfg, tmp_path_factory.mktemp("audit-hf") / "hf")


def test_export_refuses_a_truncated_checkpoint(capsys, tmp_path, run_dir):
    run = shutil.copytree(run_dir, tmp_path / "run")
    for f in (run / "ckpt").glob("step_*/*.distcp"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    line = one_line_error(capsys, ["export", "--hf", str(tmp_path / "hf"), str(run)])  # exported it before
    assert "truncated" in line and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("out", ["/dev/null", "/dev/null/hf"])
def test_export_output_path(capsys, run_dir, out):
    assert f"--hf='{out}' is invalid" in one_line_error(capsys, ["export", "--hf", out, str(run_dir)])


@pytest.mark.parametrize("damage,needle", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]), "truncated"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 10), "truncated"),
    (lambda d: (d / "model.safetensors.index.json").write_text("{not json"), "weight_map"),
])
def test_damaged_hf_directory_is_one_line(capsys, tmp_path, hf_dir, damage, needle):
    d = shutil.copytree(hf_dir, tmp_path / "hf")
    damage(d)
    line = one_line_error(capsys, [*TRAIN, f"out_dir={tmp_path / 'o'}", f"init_from={d}"])
    assert line.startswith("meshwright train: error: init_from=") and needle in line


@pytest.mark.parametrize("change,extra", [
    ({"hidden_size": 32, "intermediate_size": 64}, []),  # config.json narrower than its weights
    ({}, ["model={d_model: 32, ffn_hidden: 64}"]),  # a model override narrowing the checkpoint's shape
])
def test_checkpoint_larger_than_the_model_is_refused(capsys, tmp_path, hf_dir, change, extra):
    """A model narrower than the checkpoint's weights loaded their top-left corner and trained silently."""
    d = shutil.copytree(hf_dir, tmp_path / "hf")
    cj = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cj, **change}))
    line = one_line_error(capsys, [*TRAIN, f"out_dir={tmp_path / 'o'}", f"init_from={d}", "seq_len=32", *extra])
    assert "init_from: tok_embeddings.weight has shape" in line


# ---- report, data prepare ---------------------------------------------------------------------------------

def test_report_damaged_run_dirs(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n[1]\n')
    assert "log.jsonl:2 holds list" in one_line_error(capsys, ["report", str(run)])  # was an AttributeError
    (run / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "plan.yaml").write_text("- 1\n")
    assert "plan.yaml holding list" in one_line_error(capsys, ["report", str(run)])
    (run / "plan.yaml").unlink()
    assert "--out='/dev/null' is invalid" in one_line_error(capsys, ["report", str(run), "--out", "/dev/null"])


def test_report_skips_records_with_non_numeric_values(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": "x", "loss": "y"}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(run)]) == 0  # was "TypeError: can't multiply sequence by non-int of type 'float'"
    assert (run / "report.md").is_file()


def test_data_prepare_unusable_out(capsys, tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello world\n" * 20)
    line = one_line_error(capsys, ["data", "prepare", str(src), "--out", "/dev/null/x", "--no-progress"])
    assert "--out='/dev/null/x' is invalid" in line  # NotADirectoryError traceback


def test_data_prepare_bpe_vocab_is_bounded(capsys, tmp_path):
    pytest.importorskip("tokenizers")
    src = tmp_path / "a.txt"
    src.write_text("hello world\n" * 20)
    line = one_line_error(capsys, ["data", "prepare", str(src), "--out", str(tmp_path / "d"), "--tokenizer", "bpe",
                                   "--vocab-size", str(10**11), "--no-progress"])
    assert "vocab_size=100000000000 is invalid" in line  # aborted the process inside the Rust BPE trainer


# ---- launch, profile --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,train,needle", [
    ([], ["tiny-test", "steps=-1"], "steps=-1 is invalid"),  # dry-run printed commands for a config that fails
    ([], ["nope"], "'nope' is not a known preset"),
    ([], ["tiny-test", "--plan", "missing.yaml"], "plan='missing.yaml' is invalid"),
    (["--connect-timeout", "0"], ["tiny-test"], "--connect-timeout=0.0 is invalid"),
    (["--ssh-key", "/nonexistent/key"], ["tiny-test"], "--ssh-key='/nonexistent/key' is invalid"),
])
def test_launch_checks_before_any_host_starts(capsys, tmp_path, flags, train, needle):
    hosts = tmp_path / "hosts"
    hosts.write_text("n0 slots=2\nn1 slots=2\n")
    argv = ["launch", "--hosts", str(hosts), "--dry-run", *flags, "--", "train", *train]
    assert needle in one_line_error(capsys, argv)


@pytest.mark.parametrize("argv,needle", [
    (["profile", "model", "--model", "tiny", "--iters", "0"], "--iters=0 is invalid"),  # wrote a NaN profile
    (["profile", "hardware", "--timeout-s", "-1"], "--timeout-s=-1.0 is invalid"),
    (["profile", "hardware", "--out", "."], "--out='.' is invalid"),  # measured, then IsADirectoryError
])
def test_profile_flags(capsys, argv, needle):
    assert needle in one_line_error(capsys, argv)


# ---- YAML shapes ------------------------------------------------------------------------------------------

BOMB = "predicted:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"  {c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.timeout(60)
def test_yaml_alias_bomb_in_a_plan_is_refused(capsys, tmp_path):
    """Nine nested aliases of nine items: 10^9 values once a plan is copied or written (train hung, memory grew)."""
    plan = tmp_path / "p.yaml"
    plan.write_text("version: 1\nmodel: tiny\nseq_len: 64\nglobal_batch: 8\nmicro_batch: 4\n"
                    "layers:\n  - {repeat: 4}\n" + BOMB)
    line = one_line_error(capsys, [*TRAIN, f"out_dir={tmp_path / 'o'}", "--plan", str(plan)])
    assert "expands to more than" in line and not (tmp_path / "o").exists()


def test_yaml_alias_cycle_is_refused(capsys, tmp_path):
    """A mapping that contains itself: every walk of it (copy, write) recursed without end."""
    plan = tmp_path / "p.yaml"
    plan.write_text("version: 1\nmodel: tiny\nseq_len: 64\nglobal_batch: 8\nmicro_batch: 4\n"
                    "layers:\n  - {repeat: 4}\npredicted: &p {a: *p}\n")
    line = one_line_error(capsys, [*TRAIN, f"out_dir={tmp_path / 'o'}", "--plan", str(plan)])
    assert "contains it" in line and not (tmp_path / "o").exists()


def test_duplicate_keys_in_an_override_mapping(capsys, tmp_path):
    line = one_line_error(capsys, [*TRAIN, f"out_dir={tmp_path / 'o'}", "model={n_layers: 2, n_layers: 3}"])
    assert "'n_layers' appears twice" in line  # the last one won silently


def test_unknown_key_in_a_yaml_hostfile(capsys, tmp_path):
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text("hosts:\n  - {name: n0, slot: 8}\n")  # `slot`: was launched with the default 1 slot
    argv = ["launch", "--hosts", str(hosts), "--dry-run", "--workdir", "/w", "--", "train", "tiny-test"]
    assert "hosts[0].slot=8 is invalid" in one_line_error(capsys, argv)


def test_max_files_without_default_is_refused(capsys, tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello world\n")
    argv = ["data", "prepare", str(src), "--out", str(tmp_path / "d"), "--max-files", "3", "--no-progress"]
    assert "--max-files=3 is invalid" in one_line_error(capsys, argv)  # was ignored: every input was tokenized
    assert not (tmp_path / "d").exists()


def test_seq_len_beyond_the_model_is_refused_before_the_distributed_runtime(monkeypatch):
    """Under torchrun the distributed runtime was built (process group, model, init_from) before seq_len failed."""
    import meshwright.train.build as build

    def no_runtime(*a, **k):
        raise AssertionError("built the distributed runtime")

    monkeypatch.setattr(build, "build_distributed_runtime", no_runtime)
    job = build.TrainingJob.resolve(load_train_config("tiny-test", {"seq_len": 512}))
    job.world_size = 2
    with pytest.raises(ConfigError, match=r"^seq_len=512 is invalid; valid: at most model.max_seq_len=256 \(or raise "
                                          r"model\.max_seq_len: its rotary tables follow it\)$"):
        build.build_runtime(job)


@pytest.mark.parametrize("overrides,missing,plan,needle", [
    ({"dp_backend": "deepspeed"}, "deepspeed", None, "dp_backend='deepspeed' is invalid"),
    ({"tp_backend": "megatron"}, "megatron", "configs/plans/tiny-tp2.yaml", "tp_backend='megatron' is invalid"),
])
def test_missing_optional_stack_is_one_line_before_the_runtime(monkeypatch, overrides, missing, plan, needle):
    """The GPU image lacks deepspeed and megatron-core: a run naming them was an ImportError deep in the runtime."""
    import sys

    import meshwright.train.build as build

    def no_runtime(*a, **k):
        raise AssertionError("built the distributed runtime")

    monkeypatch.setattr(build, "build_distributed_runtime", no_runtime)
    for name in [m for m in list(sys.modules) if m == missing or m.startswith(missing + ".")] + [missing]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed (an earlier test may have imported it)
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    job = build.TrainingJob.resolve(load_train_config("tiny-test", overrides), plan)
    job.world_size = 2
    with pytest.raises(ConfigError, match=needle):
        build.build_runtime(job)


@pytest.mark.parametrize("override,missing", [("tensorboard=true", "tensorboard"), ("wandb=offline", "wandb")])
def test_missing_sink_package_is_said_before_the_model_is_built(capsys, tmp_path, monkeypatch, override, missing):
    import sys

    import meshwright.train.build as build

    def no_job(*a, **k):
        raise AssertionError("resolved the model and plan before checking the sink packages")

    for name in [m for m in list(sys.modules) if m == missing or m.startswith(missing + ".")] + [missing]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed (an earlier test may have imported it)
    monkeypatch.setattr(build.TrainingJob, "resolve", no_job)
    line = one_line_error(capsys, [*TRAIN, f"out_dir={tmp_path / 'o'}", override])
    assert f"needs the {missing} package" in line and not (tmp_path / "o").exists()


# ---- profiles fed to `meshwright plan` --------------------------------------------------------------------

@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit-profiles")
    hw, mp = root / "hw.json", root / "mp.json"
    assert main(["profile", "hardware", "--out", str(hw), "--sizes", "64,128", "--iters", "1"]) == 0
    assert main(["profile", "model", "--model", "tiny", "--out", str(mp), "--batch-sizes", "1,2", "--seq-lens", "16,32",
                 "--iters", "1"]) == 0
    return json.loads(hw.read_text()), json.loads(mp.read_text())


NAN = float("nan")


@pytest.mark.parametrize("which,damage,needle", [
    ("hw", lambda d: d["derived"]["peak_tflops"].update(fp32=NAN), "derived.peak_tflops="),  # NaN passed `v <= 0`
    ("hw", lambda d: d["derived"].update(intra_bw_gbps=NAN), "derived.intra_bw_gbps=nan"),
    ("hw", lambda d: d["derived"].update(overlap_slowdown=float("inf")), "derived.overlap_slowdown=inf"),
    ("hw", lambda d: d["derived"]["peak_tflops"].update(fp32=True), "derived.peak_tflops="),
    ("hw", lambda d: d["derived"].update(contention="x"), "derived.contention='x'"),  # ValueError traceback
    ("mp", lambda d: d.update(entries=[1, 2]), "entries[0]=1 is invalid"),  # TypeError traceback
    ("mp", lambda d: d.pop("model"), "model-profile.model=None is invalid"),  # KeyError traceback
    ("mp", lambda d: d.update(matmul_ref=NAN), "matmul_ref=nan is invalid"),  # TypeError with a hardware profile
    ("mp", lambda d: d["entries"][0]["fwd_fit"].update(a=NAN), "fwd_fit="),  # NaN step times, silently
    ("mp", lambda d: d["entries"][0].update(act_bytes_per_token="x"), "act_bytes_per_token='x'"),
])
def test_damaged_profiles(capsys, tmp_path, profiles, which, damage, needle):
    hw, mp = json.loads(json.dumps(profiles[0])), json.loads(json.dumps(profiles[1]))
    damage(hw if which == "hw" else mp)
    (tmp_path / "hw.json").write_text(json.dumps(hw))
    (tmp_path / "mp.json").write_text(json.dumps(mp))
    argv = ["plan", "--model", "tiny", "--cluster", "local-cpu", "--seq-len", "32", "--global-batch", "8", "--top", "1",
            "--hardware-profile", str(tmp_path / "hw.json"), "--model-profile", str(tmp_path / "mp.json")]
    assert needle in one_line_error(capsys, argv)


def test_damaged_profile_cache_is_measured_again(tmp_path, monkeypatch):
    """`plan: auto` with a garbled cached profile was a one-line dead end on rank 0 (and a hang of the other ranks
    waiting for its broadcast): the cache is derived data, so it is measured again."""
    from meshwright.launcher.profiling import auto as ap

    monkeypatch.setenv("MESHWRIGHT_CACHE_DIR", str(tmp_path))
    cfg = load_model_config("tiny")
    ap.auto_profiles(cfg, 1, 32, 2)
    for f in tmp_path.iterdir():
        f.write_text("{garbled")
    hw, prof = ap.auto_profiles(cfg, 1, 32, 2)
    assert hw["kind"] == "meshwright-hardware-profile" and prof["entries"][0]["tp"] == 1
    assert all(json.loads(f.read_text())["version"] == 1 for f in tmp_path.iterdir())


# ---- memory ----------------------------------------------------------------------------------------------

def test_hopeless_micro_batch_is_refused_before_any_allocation():
    """micro_batch x seq_len whose logits and block inputs alone exceed the device (an OOM kill, or CUDA's OOM
    traceback, after the model was built); a lower bound, so real micro-batches pass."""
    from meshwright.train.build import check_memory

    tiny = load_model_config("tiny")
    with pytest.raises(ConfigError, match=r"^micro_batch='16,777,216 tokens per micro-batch' is invalid; valid: fewer"):
        check_memory(tiny, 1, available=20 * 2**30, micro_tokens=2**24)  # 24 GiB of logits and block inputs
    check_memory(tiny, 1, available=20 * 2**30, micro_tokens=2**24, loss_chunk_tokens=4096)  # chunked logits: 16 GiB
    check_memory(load_model_config("llama3-8b"), 8, available=80 * 2**30, micro_tokens=16 * 8192)  # a real one


@pytest.mark.parametrize("error", ["OutOfMemoryError", "cpu"])
def test_out_of_memory_during_training_is_one_line(capsys, monkeypatch, tmp_path, error):
    import torch

    import meshwright.train.build as build  # commands/train imports it when it runs (--help stays torch-free)

    def oom(*a, **k):
        if error == "cpu":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 68719476736 bytes.\\nmore detail")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB.\\nGPU 0 has ...")

    monkeypatch.setattr(build, "run_training", oom)
    line = one_line_error(capsys, [*TRAIN, f"out_dir={tmp_path / 'o'}"])
    assert "error: out of memory (" in line and "micro_batch" in line


@pytest.mark.timeout(60)
def test_cluster_size_is_bounded_not_a_hang(capsys):
    argv = ["plan", "--model", "tiny", "--cluster", "dgx-h100-80g", "--seq-len", "64", "--global-batch", "8",
            "--nodes", str(10**9), "--top", "1"]
    assert "cluster.nodes=1000000000 is invalid" in one_line_error(capsys, argv)  # hung enumerating divisors
