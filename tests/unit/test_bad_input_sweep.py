"""A second bad-input sweep of the CLI (after test_bad_input_audit.py): each case is one line on stderr naming the
field, exit 2, said before any work. Before the fixes these were tracebacks from a library (tokenizers' bare
``Exception``), or a flag that was silently ignored. CLI calls run in-process (``cli.main``)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from _train_helpers import one_line_error, trained_run
from meshwright.cli import main


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture()
def text(tmp_path) -> str:
    src = tmp_path / "a.txt"
    src.write_text("hello world\n" * 20)
    return str(src)


# ---- tokenizer.json files (data prepare --tokenizer, train data.tokenizer) ---------------------------------

@pytest.mark.parametrize("content", ["", "[1, 2]\n", '{"model":', "\x00\x01garbage"])
def test_damaged_tokenizer_json_is_one_line(capsys, tmp_path, text, content):
    pytest.importorskip("tokenizers")
    tok = tmp_path / "tokenizer.json"
    tok.write_text(content)
    argv = ["data", "prepare", text, "--out", str(tmp_path / "out"), "--tokenizer", str(tok), "--no-progress"]
    line = one_line_error(capsys, argv)  # was tokenizers' bare Exception ("EOF while parsing a value ...")
    assert f"data.tokenizer='{tok}' is invalid" in line and "tokenizer.json" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config", ["{not json", "[1]"])
def test_damaged_tokenizer_config_json_is_one_line(capsys, tmp_path, text, config):
    tokenizers = pytest.importorskip("tokenizers")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(config)
    argv = ["data", "prepare", text, "--out", str(tmp_path / "out"), "--tokenizer", str(model_dir), "--no-progress"]
    line = one_line_error(capsys, argv)  # was json's JSONDecodeError / AttributeError ('list' has no 'get')
    assert f"data.tokenizer='{model_dir}" in line and "tokenizer_config.json" in line


def test_train_with_a_damaged_tokenizer_json_writes_nothing(capsys, tmp_path):
    pytest.importorskip("tokenizers")
    tok = tmp_path / "tokenizer.json"
    tok.write_text("")
    line = one_line_error(capsys, ["train", "tiny-test", f"out_dir={tmp_path / 'run'}", f"data.tokenizer={tok}"])
    assert f"data.tokenizer='{tok}' is invalid" in line
    assert not (tmp_path / "run").exists()


# ---- meshwright plan --virtual-stages ------------------------------------------------------------------------

PLAN = ["plan", "--model", "tiny", "--cluster", "local-cpu", "--seq-len", "64", "--global-batch", "8", "--top", "1"]


@pytest.mark.parametrize("flags,needle", [
    # gpipe/1f1b run one chunk per rank: the flag was dropped and a plan printed as if it had been honoured
    (["--virtual-stages", "2", "--schedule", "1f1b"], "virtual-stages=2 is invalid; valid: used only with --schedule interleaved_1f1b"),
    (["--virtual-stages", "2", "--schedule", "gpipe"], "virtual-stages=2 is invalid"),
    # interleaving with 1 chunk or more chunks than layers: every pipeline was dropped, pp=1 came back (the
    # pipelines listed as "mb=1 is already out of memory")
    (["--virtual-stages", "1", "--schedule", "interleaved_1f1b"], "virtual-stages=1 is invalid; valid: at least 2"),
    (["--virtual-stages", "100", "--schedule", "interleaved_1f1b"], "virtual-stages=100 is invalid; valid: at most 2"),
    (["--virtual-stages", "3"], "virtual-stages=3 is invalid; valid: at most 2"),
    (["--virtual-stages", "2", "--pp", "1"], "virtual-stages=2 is invalid; valid: none here"),
])
def test_plan_virtual_stages_no_layout_can_take(capsys, flags, needle):
    assert needle in one_line_error(capsys, [*PLAN, *flags])


def test_plan_virtual_stages_that_fit_are_used(capsys):
    assert main([*PLAN, "--virtual-stages", "2", "--schedule", "interleaved_1f1b", "--pp", "2", "--any-runtime",
                 "--json"]) == 0
    pipeline = json.loads(capsys.readouterr().out)["plan"]["pipeline"]
    assert (pipeline["schedule"], pipeline["virtual_stages"]) == ("interleaved_1f1b", 2)


# ---- empty output paths --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return trained_run(tmp_path_factory.mktemp("sweep-run"))


def test_export_to_an_empty_path_is_refused(capsys, tmp_path, run_dir):
    line = one_line_error(capsys, ["export", str(run_dir), "--hf", ""])  # Path('') is '.': wrote into the cwd
    assert "--hf='' is invalid; valid: a directory (a non-empty path)" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [[*PLAN, "--out", ""], ["profile", "model", "--model", "tiny", "--out", ""]])
def test_empty_out_file_is_named_as_empty(capsys, argv):
    assert "--out='' is invalid; valid: a file path (a non-empty path)" in one_line_error(capsys, argv)


# ---- export never replaces another model's files ---------------------------------------------------------------

def test_export_refuses_a_directory_holding_another_model(capsys, tmp_path, run_dir):
    from safetensors.torch import save_file
    import torch

    base = tmp_path / "base"  # e.g. the run's own init_from directory, written by transformers
    base.mkdir()
    save_file({"w": torch.ones(2)}, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text('{"model_type": "llama"}')
    before = {f.name: f.read_bytes() for f in base.iterdir()}
    line = one_line_error(capsys, ["export", str(run_dir), "--hf", str(base)])  # replaced both files silently
    assert f"--hf='{base}' is invalid" in line and "config.json, model.safetensors" in line
    assert {f.name: f.read_bytes() for f in base.iterdir()} == before

    shards = tmp_path / "sharded"  # a single-file export beside shards: two models in one directory
    shards.mkdir()
    (shards / "model.safetensors.index.json").write_text("{}")
    assert "model.safetensors.index.json" in one_line_error(capsys, ["export", str(run_dir), "--hf", str(shards)])


def test_export_may_replace_its_own_earlier_export(capsys, tmp_path, run_dir):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "README.md").write_text("notes")  # not a model file: kept, not a reason to refuse
    assert main(["export", str(run_dir), "--hf", str(out)]) == 0
    assert main(["export", str(run_dir), "--hf", str(out)]) == 0
    assert sorted(f.name for f in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


# ---- profile hardware --dtypes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtypes,needle", [
    ("", "dtypes='' is invalid"),  # was taken as the default dtypes
    ("fp8", "--dtypes='fp8' is invalid; valid: at least one dtype"),  # off an FP8 GPU: wrote a profile plan refuses
])
def test_profile_hardware_dtypes_that_measure_nothing(capsys, tmp_path, dtypes, needle):
    import torch

    if dtypes == "fp8" and torch.cuda.is_available():
        pytest.skip("a GPU may measure fp8")
    out = tmp_path / "hw.json"
    line = one_line_error(capsys, ["profile", "hardware", "--dtypes", dtypes, "--sizes", "8", "--iters", "1",
                                   "--out", str(out)])
    assert needle in line and not out.exists()


# ---- launch --python / --workdir ------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--python", "--workdir"])
def test_launch_empty_python_or_workdir(capsys, tmp_path, flag):
    hosts = tmp_path / "hosts"
    hosts.write_text("n0 slots=1\n")
    argv = ["launch", "--hosts", str(hosts), "--dry-run", flag, "", "--", "train", "tiny-test"]
    assert f"{flag}='' is invalid" in one_line_error(capsys, argv)  # printed `exec ''` / `cd ''` host commands


# ---- data prepare --vocab-size ---------------------------------------------------------------------------------

def test_data_prepare_vocab_size_without_bpe(capsys, tmp_path, text):
    argv = ["data", "prepare", text, "--out", str(tmp_path / "out"), "--vocab-size", "5", "--no-progress"]
    line = one_line_error(capsys, argv)  # prepared a 256-id byte data set, the size ignored
    assert "--vocab-size=5 is invalid; valid: used only with --tokenizer bpe" in line
    assert not (tmp_path / "out").exists()
    assert main(["data", "prepare", text, "--out", str(tmp_path / "out"), "--no-progress"]) == 0  # the default


# ---- launch: the distributed runtime's refusals, said before any host starts (fifth sweep, session 35) ----------
# `launch` checked the train command's config, overrides and plan file, but not what the distributed runtime
# refuses: the dry run printed the commands (rc 0) and a real launch started every host, where each rank failed
# on its own (megatron with sp, LoRA or DeepSpeed with compile, LoRA on ep experts, meft, DeepSpeed's ZeRO-0, a
# batch the default dp layout cannot split).

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture()
def two_slots(tmp_path) -> str:
    hosts = tmp_path / "hosts"
    hosts.write_text("n0 slots=2\n")
    return str(hosts)


@pytest.fixture()
def moe_tp2_plan(tmp_path) -> str:
    plan = tmp_path / "moe-tp2.yaml"
    plan.write_text("version: 1\nmodel: tiny-moe\nseq_len: 64\nglobal_batch: 8\nmicro_batch: 4\n"
                    "layers:\n  - {tp: 2, dp: 1, repeat: 4}\n")
    return str(plan)


@pytest.fixture()
def zero1_plan(tmp_path) -> str:
    plan = tmp_path / "zero1.yaml"
    plan.write_text((CONFIGS / "plans/tiny-dp2.yaml").read_text().replace("zero: 0", "zero: 1"))
    return str(plan)


@pytest.mark.parametrize("train,needle", [
    (["tp_backend=megatron", "--plan", str(CONFIGS / "plans/tiny-tp2.yaml")],
     "layers[0].sp=True is invalid; valid: false with tp_backend=megatron"),
    (["model=tiny-moe", "tp_backend=megatron", "--plan", "MOE_TP2"], "tp_backend='megatron' is invalid; valid: dtensor "
     "for MoE layers"),
    (["lora.rank=4", "compile=true"], "compile=True is invalid; valid: false with lora under the distributed runtime"),
    (["lora.rank=4", "compile=true", "--plan", "auto"], "compile=True is invalid; valid: false with lora"),
    (["init_from=/models/only-on-the-hosts", "lora.rank=4", "compile=true"], "compile=True is invalid"),
    (["model=tiny-moe", "lora.targets=[wq,w1]", "--plan", str(CONFIGS / "plans/tiny-moe-ep2.yaml")],
     "lora.targets=['wq', 'w1'] is invalid; valid: attention (wq, wk, wv, wo) or expert targets"),
    (["meft.adapter_dim=8"], "meft='set' is invalid; valid: null under the distributed runtime"),
    (["dp_backend=deepspeed", "compile=true"], "compile=True is invalid; valid: false with dp_backend=deepspeed"),
    (["dp_backend=deepspeed"], "layers[0].zero=0 is invalid; valid: 1, 2 or 3 with dp_backend=deepspeed"),
    (["dp_backend=deepspeed", "init_from=/models/only-on-the-hosts"], "init_from='/models/only-on-the-hosts' is "
     "invalid; valid: null with dp_backend deepspeed"),
    (["global_batch=6", "micro_batch=6"], "global_batch=6 is invalid; valid: a multiple of world_size*micro_batch=2*6"),
    (["seq_len=512"], "seq_len=512 is invalid; valid: at most model.max_seq_len=256"),  # failed deep in each rank
    (["grow_positions=copy"], "grow_positions='copy' is invalid; valid: null for a llama model"),
    (["init_from=CONFIG_JSON"], "init_from='CONFIG_JSON' is invalid; valid: a Hugging Face model directory"),
])
def test_launch_refuses_what_the_distributed_runtime_would(capsys, tmp_path, two_slots, moe_tp2_plan, zero1_plan,
                                                           train, needle):
    config_json = tmp_path / "config.json"  # here, a file: not a model directory (one absent may be on the hosts)
    config_json.write_text("{}")
    subst = {"MOE_TP2": moe_tp2_plan, "ZERO1": zero1_plan, "CONFIG_JSON": str(config_json)}
    train = [a.replace("CONFIG_JSON", subst["CONFIG_JSON"]) if "CONFIG_JSON" in a else subst.get(a, a) for a in train]
    needle = needle.replace("CONFIG_JSON", str(config_json))
    argv = ["launch", "--hosts", two_slots, "--dry-run", "--", "train", "tiny-test", *train]
    assert needle in one_line_error(capsys, argv)  # was rc 0: every rank of every host failed instead


@pytest.mark.parametrize("train", [[], ["lora.rank=4"], ["lora.rank=4", "--plan", "auto"],
                                   ["tp_backend=megatron", "lora.rank=4", "--plan", "TP2_NO_SP"],
                                   ["dp_backend=deepspeed", "--plan", "ZERO1"],  # DeepSpeed checkpoints its ZeRO-1
                                   ["--plan", "ZERO1"],  # ... and so does torch's (parallel/zero1_state.py)
                                   ["init_from=/models/only-on-the-hosts"]])  # a base on the hosts' own disks
def test_launch_accepts_what_the_distributed_runtime_runs(capsys, tmp_path, two_slots, zero1_plan, train):
    plan = tmp_path / "tp2.yaml"
    plan.write_text((CONFIGS / "plans/tiny-tp2.yaml").read_text().replace("sp: true", "sp: false"))
    train = [{"TP2_NO_SP": str(plan), "ZERO1": zero1_plan}.get(a, a) for a in train]
    assert main(["launch", "--hosts", two_slots, "--dry-run", "--", "train", "tiny-test", *train]) == 0
    assert "torch.distributed.run" in capsys.readouterr().out


@pytest.mark.parametrize("train,needle", [
    (["tp_backend=megatron", "--plan", str(CONFIGS / "plans/tiny-tp2.yaml")], "layers[0].sp=True is invalid"),
])
def test_train_under_a_world_says_the_runtime_refusal_before_the_process_group(capsys, tmp_path, monkeypatch,
                                                                                zero1_plan, train, needle):
    """Under torchrun's WORLD_SIZE (no process group yet) megatron's sp refusal came from DistributedRuntime, after the
    process group (without rendezvous variables, a 'launch it with torchrun' line for a plan torchrun refuses)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        monkeypatch.delenv(k, raising=False)
    out = tmp_path / "run"
    train = [zero1_plan if a == "ZERO1" else a for a in train]
    line = one_line_error(capsys, ["train", "tiny-test", f"out_dir={out}", *train])
    assert needle in line
    assert not out.exists()


def test_launch_deepspeed_with_an_unsplittable_pdsh_ssh_args_append(capsys, tmp_path, monkeypatch):
    """The user's PDSH_SSH_ARGS_APPEND is re-quoted into the ssh wrapper: an unclosed quote was shlex's ValueError
    traceback (after every other check), now one line naming the variable; nothing starts."""
    pytest.importorskip("deepspeed.launcher.runner")
    if shutil.which("pdsh") is None or shutil.which("ssh") is None:
        pytest.skip("needs pdsh and ssh on PATH (run_deepspeed checks them first)")
    import meshwright.commands.launch as launch_mod

    started: list = []
    monkeypatch.setattr(launch_mod, "_run_passing_signals_on", lambda *a, **k: started.append(a) or 0)
    hosts = tmp_path / "hostfile"
    hosts.write_text("n0 slots=1\nn1 slots=1\n")
    argv = ["launch", "--hosts", str(hosts), "--launcher", "deepspeed", "--workdir", str(tmp_path), "--python",
            sys.executable, "--", "train", "tiny-test"]
    monkeypatch.setenv("PDSH_SSH_ARGS_APPEND", "-o 'ProxyJump=gw")
    line = one_line_error(capsys, argv)
    assert "PDSH_SSH_ARGS_APPEND=\"-o 'ProxyJump=gw\" is invalid; valid: ssh options that split into words" in line
    assert not started
    monkeypatch.setenv("PDSH_SSH_ARGS_APPEND", "-o 'ProxyJump=gw'")
    assert main(argv) == 0 and started
