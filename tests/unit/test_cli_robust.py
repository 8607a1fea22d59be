"""Session 33's robustness sweep of the CLI: help and argument errors without torch, `plan --model DIR` of a
Hugging Face checkpoint directory, and the careless-user inputs that were a traceback or a wrong line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(argv: list[str]) -> tuple[int, str, set[str]]:
    """Run ``python -X importtime -m meshwright.cli ARGV`` in a fresh interpreter: exit code, stderr without the
    import-time lines, and the top-level packages it imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "meshwright.cli", *argv], capture_output=True,
                          text=True, env=env, timeout=120, cwd=ROOT)
    mods, rest = set(), []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:"):
            mods.add(line.rsplit("|", 1)[-1].strip().split(".")[0])
        else:
            rest.append(line)
    return proc.returncode, "\n".join(rest), mods


@pytest.mark.parametrize("argv, rc", [
    (["--help"], 0),
    (["plan", "--help"], 0),
    (["train", "--help"], 0),
    (["export", "--help"], 0),
    (["completion", "bash"], 0),
    (["plan", "--model", "tiny"], 2),                             # argparse: required flags missing
    (["train", "tiny-test", "--bogus"], 2),                       # train's own flag check after the overrides
    (["train", "tiny-test", "steps=abc"], 2),                     # a bad override value
])
def test_help_completion_and_argument_errors_do_not_import_torch(argv, rc):
    """`meshwright --help` imported torch through commands/train.py (build, checkpoint): 6-9 s on this machine."""
    code, err, mods = _imports(argv)
    assert code == rc, err
    assert "torch" not in mods and "transformers" not in mods, sorted(mods)
    if rc == 2:
        assert "Traceback" not in err and err.strip()


@pytest.fixture()
def hf_dir(tmp_path):
    """A tiny Llama checkpoint directory's config.json (planning reads no weights)."""
    import transformers

    d = tmp_path / "tiny-llama"
    transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128).save_pretrained(d)
    return d


PLAN_ARGS = ["--cluster", "local-cpu", "--devices-per-node", "1", "--seq-len", "64", "--global-batch", "8",
             "--micro-batch", "4", "--top", "1"]


def test_plan_model_takes_an_hf_checkpoint_directory_and_train_and_emit_agree(hf_dir, tmp_path, capsys):
    from meshwright.cli import main
    from meshwright.config import load_train_config
    from meshwright.errors import ConfigError
    from meshwright.plan import load_plan
    from meshwright.train.build import resolve_model_config
    from meshwright.train.plan_match import check_plan_matches

    out = tmp_path / "plan.yaml"
    assert main(["plan", "--model", str(hf_dir), *PLAN_ARGS, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("meshwright plan: tiny-llama on 1 x 1 local-cpu")
    plan = load_plan(out)
    assert plan.model == "tiny-llama"  # what init_from: DIR names the model
    train = {"init_from": str(hf_dir), "data": {"path": "default"}, "seq_len": 64, "global_batch": 8, "micro_batch": 4,
             "steps": 5, "warmup_steps": 1, "lr": 1e-4, "min_lr": 1e-5}
    cfg = load_train_config(train)
    check_plan_matches(plan, cfg, resolve_model_config(cfg), 1, str(out))  # `train --plan` accepts it
    other = load_train_config({**train, "micro_batch": 2})
    with pytest.raises(ConfigError, match="micro_batch"):  # and still checks it
        check_plan_matches(plan, other, resolve_model_config(other), 1, str(out))
    # --emit with the fine-tuning config: the same model, no "another model" refusal
    (tmp_path / "ft.yaml").write_text("\n".join(f"{k}: {v}" for k, v in train.items() if k != "data") +
                                      "\ndata: {path: default}\n")
    assert main(["plan", "--model", str(hf_dir), *PLAN_ARGS, "--emit", "megatron",
                 "--train-config", str(tmp_path / "ft.yaml")]) == 0
    args = capsys.readouterr().out
    assert "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128" in args
    assert "--num-query-groups 2" in args and "--train-iters 5" in args


def test_plan_model_directory_without_config_json_is_one_line(tmp_path, capsys):
    from _train_helpers import one_line_error

    line = one_line_error(capsys, ["plan", "--model", str(tmp_path), *PLAN_ARGS])
    assert f"model={str(tmp_path)!r} is invalid" in line and "holding config.json" in line


def test_train_model_naming_a_checkpoint_directory_points_to_init_from(hf_dir):
    """`model: DIR` would now read DIR's config.json and train it from random weights: refused, naming init_from."""
    from meshwright.config import load_train_config
    from meshwright.errors import ConfigError
    from meshwright.train.build import resolve_model_config

    with pytest.raises(ConfigError, match=r"model='.*tiny-llama' is invalid; valid: init_from: .*tiny-llama to "):
        resolve_model_config(load_train_config({"model": str(hf_dir)}))
    assert resolve_model_config(load_train_config({"model": str(hf_dir / "config.json")})).n_layers == 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from _train_helpers import trained_run

    return trained_run(tmp_path_factory.mktemp("robust-run"))


@pytest.mark.parametrize("flag", ["--hf", "--peft"])
@pytest.mark.parametrize("where", ["ckpt/step_000002", "ckpt", "ckpt/step_000002/sub", "hf"])
def test_export_into_the_runs_checkpoints_or_companions_is_refused(run, capsys, flag, where):
    """`export RUN --hf RUN/ckpt/step_000002` wrote the model into the checkpoint: the run's pruning (or
    --overwrite) then deleted the user's export with the step directory. RUN/hf is the run's own companions."""
    from _train_helpers import one_line_error

    out = run / where
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    line = one_line_error(capsys, ["export", str(run), flag, str(out)])
    assert f"{flag}={str(out)!r} is invalid; valid: a directory " in line and str(run / "export") in line
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before  # nothing written


def test_export_beside_the_run_still_works(run, capsys):
    from meshwright.cli import main

    assert main(["export", str(run), "--hf", str(run / "export")]) == 0
    assert (run / "export" / "model.safetensors").is_file()


@pytest.mark.parametrize("text", ["init_from=", "out_dir= ", "lora.rank="])
def test_an_empty_override_value_is_refused_not_read_as_null(text):
    """`train tiny-test init_from=$CKPT` with CKPT unset read '' as YAML null and trained from random weights."""
    from meshwright.config import parse_override
    from meshwright.errors import ConfigError

    key = text.split("=")[0]
    with pytest.raises(ConfigError, match=rf"override='{text}' is invalid; valid: {key}=VALUE, or {key}=null"):
        parse_override(text)
    assert parse_override(f"{key}=null") == (key, None)  # clearing a field is still one word away


@pytest.mark.parametrize("argv, rc", [(["completion", "bash"], 141), (["plan", "--help"], 0)])
def test_a_reader_that_closed_the_pipe_is_a_quiet_exit(argv, rc):
    """`meshwright plan ... | head -3` ended in a BrokenPipeError traceback (or 'Exception ignored' lines at exit);
    a command's output is 141 (128 + SIGPIPE, as a shell reports for cat), argparse's help keeps its 0 (its
    writer swallows the error)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "meshwright.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == rc, err
    assert err == ""


def _saved(tmp_path, **kw):
    """A checkpoint directory whose trainer_state.json records the config of a run with ``kw``."""
    import json

    from meshwright.config import load_train_config
    from meshwright.config.io import to_dict

    ckpt = tmp_path / "ckpt" / "step_000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "config": to_dict(load_train_config(
        {"out_dir": str(tmp_path), **kw}))}))
    return ckpt


LORA = {"rank": 4, "targets": ["wq", "wv"]}


@pytest.mark.parametrize("was, now, allow, expected", [
    (LORA, None, False, "lora=None is invalid; valid: {'rank': 4"),                    # the section forgotten
    (LORA, None, True, "lora=None is invalid; valid: {'rank': 4"),                     # cannot load either way
    (None, LORA, True, "lora={'rank': 4"),                                             # a full run resumed as LoRA
    (LORA, {**LORA, "rank": 8}, True, "lora.rank=8 is invalid; valid: 4 as in the checkpoint"),
    (LORA, {**LORA, "targets": ["wq"]}, False, "lora.targets=['wq'] is invalid; valid: ['wq', 'wv']"),
    (LORA, {**LORA, "alpha": 16.0}, False, "lora.alpha=16.0 is invalid; valid: None as in the checkpoint"),
    (LORA, {**LORA, "alpha": 16.0}, True, None),                                       # the scale may be changed
    (LORA, {**LORA, "dropout": 0.1}, True, None),
    (LORA, LORA, False, None),
])
def test_resume_with_another_lora_section_is_named_before_anything_is_built(tmp_path, was, now, allow, expected):
    """It was a checkpoint-fit error after the model was built: "optimizer state 'state.tok_embeddings.weight.step'
    is not in the checkpoint" for a LoRA run resumed without its lora: section."""
    from meshwright.config import load_train_config
    from meshwright.errors import ConfigError
    from meshwright.train.run_dir import check_resume_config

    ckpt = _saved(tmp_path, lora=was)
    cfg = load_train_config({"out_dir": str(tmp_path), "lora": now})
    if expected is None:
        check_resume_config(cfg, str(ckpt), allow)
        return
    with pytest.raises(ConfigError) as err:
        check_resume_config(cfg, str(ckpt), allow)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value), str(err.value)
