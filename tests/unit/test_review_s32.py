"""Session 32's careless-user review: each test fails before its fix (see the commit that added it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from _train_helpers import one_line_error

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


# ---- an output path that is one of the command's own inputs ------------------------------------------------

def _model_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "my model.yaml"
    shutil.copyfile(ROOT / "configs" / "models" / "tiny.yaml", path)
    return path


@pytest.mark.parametrize("flag", ["--model", "--cluster", "--train-config"])
def test_plan_out_is_not_one_of_its_inputs(capsys, tmp_path, flag):
    """`plan --model m.yaml --out m.yaml` replaced the user's model config with the plan, silently."""
    inputs = {"--model": _model_yaml(tmp_path), "--cluster": tmp_path / "c.yaml", "--train-config": tmp_path / "t.yaml"}
    shutil.copyfile(ROOT / "configs" / "clusters" / "local-cpu.yaml", inputs["--cluster"])
    shutil.copyfile(ROOT / "configs" / "train" / "tiny-test.yaml", inputs["--train-config"])
    before = {k: p.read_bytes() for k, p in inputs.items()}
    argv = ["plan", "--model", str(inputs["--model"]), "--cluster", str(inputs["--cluster"]), "--seq-len", "64",
            "--global-batch", "8", "--out", f"./{inputs[flag].name}"]
    if flag == "--train-config":
        argv += ["--emit", "megatron", "--train-config", str(inputs[flag])]
    line = one_line_error(capsys, argv)
    assert f"--out='./{inputs[flag].name}' is invalid" in line and flag in line
    assert {k: p.read_bytes() for k, p in inputs.items()} == before


def test_profile_model_out_is_not_its_model(capsys, tmp_path):
    model = _model_yaml(tmp_path)
    before = model.read_bytes()
    line = one_line_error(capsys, ["profile", "model", "--model", str(model), "--out", str(model),
                                   "--batch-sizes", "1,2", "--seq-lens", "16,32", "--iters", "1", "--tp", "1"])
    assert "--out=" in line and "--model" in line
    assert model.read_bytes() == before


# ---- export --hf carries the tokenizer the data was encoded with, whatever form data.path takes ------------

def _tokenizer(folder: Path, vocab: int, files: int) -> Path:
    from meshwright.data.corpus import stdlib_files
    from meshwright.data.tokenizer import BPETokenizer

    folder.mkdir(parents=True, exist_ok=True)
    texts = [f.read_text(errors="replace") for f in stdlib_files(files)]
    BPETokenizer.train(texts, vocab).save(folder / "tokenizer.json")
    return folder


@pytest.mark.parametrize("named", ["none", "other"])
def test_export_carries_the_tokenizer_of_a_prepared_data_directory(tmp_path, named):
    """init_from + data.path a directory from `data prepare --tokenizer MODEL` (finetune.md's "by hand" route): the
    export had no tokenizer (AutoTokenizer failed on it); with data.tokenizer naming another tokenizer (not read for a
    prepared directory) it shipped that one, not the one the data was encoded with."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import torch
    from tokenizers import Tokenizer

    from meshwright.cli import main
    from meshwright.config import load_train_config
    from meshwright.data.corpus import stdlib_files
    from meshwright.train.build import run_training

    hf = tmp_path / "hf model"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64)).save_pretrained(hf)
    _tokenizer(hf, 600, 5)
    other = _tokenizer(tmp_path / "other", 520, 3)
    data = tmp_path / "data"
    assert main(["data", "prepare", *map(str, stdlib_files(20)), "--tokenizer", str(hf), "--out", str(data),
                 "--no-progress"]) == 0
    run = tmp_path / "run"
    run_training(load_train_config({
        "init_from": str(hf), "data": {"path": str(data), **({"tokenizer": str(other)} if named == "other" else {})},
        "seq_len": 32, "global_batch": 4, "micro_batch": 4, "steps": 1, "warmup_steps": 1, "eval_every": 0,
        "eval_batches": 1, "out_dir": str(run), "progress": False, "energy": False}))
    out = tmp_path / "exported"
    assert main(["export", str(run), "--hf", str(out)]) == 0
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    want = Tokenizer.from_file(str(hf / "tokenizer.json"))
    text = "def main(argv):\n    return sorted(argv)\n"
    assert loaded(text)["input_ids"] == want.encode(text).ids


# ---- Ctrl-C while the command is still starting (importing torch takes seconds on a busy machine) ----------

def test_ctrl_c_while_the_command_starts_is_one_line(capsys, monkeypatch):
    """A Ctrl-C in the first seconds of `data prepare` (building the parser imports torch: 3-16 s on this shared
    CPU) was a 40-line KeyboardInterrupt traceback through importlib, not `interrupted` and exit 130."""
    from meshwright import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    try:
        rc = cli.main(["data", "prepare", "x.txt", "--out", "d"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main (a traceback)")
    assert rc == 130
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == ["meshwright: interrupted"]


# ---- --resume with nothing to resume ------------------------------------------------------------------------

def test_resume_that_finds_no_checkpoint_says_it_starts_at_step_0(tmp_path):
    """`train ... --resume` onto an out_dir without a checkpoint (a typo in out_dir, a run killed before its first
    checkpoint: its log is then replaced) trained from step 0 without a word."""
    from _train_helpers import make_trainer, prepared_corpus

    t = make_trainer(prepared_corpus(tmp_path), tmp_path / "run", steps=1, warmup_steps=1, eval_every=0)
    said: list[str] = []
    t.print = said.append
    t.fit(resume=True)
    assert t.step == 1
    notes = [s for s in said if s.startswith("note: --resume")]
    assert notes == [f"note: --resume found no checkpoint in {tmp_path / 'run' / 'ckpt'}: starting at step 0"]


# ---- a cache variable pointing somewhere unusable -------------------------------------------------------------

def test_unusable_meshwright_cache_names_the_variable(capsys, tmp_path, monkeypatch):
    """MESHWRIGHT_CACHE at a file was `path='.../x' is unusable (File exists)`: the variable that chose it unnamed
    (and under `plan: auto`, said only after the profiles were measured)."""
    from meshwright.errors import ConfigError
    from meshwright.tools.cache import profile_cache

    (tmp_path / "a file").write_text("x")
    monkeypatch.delenv("MESHWRIGHT_CACHE_DIR", raising=False)  # conftest points it at a temp dir
    monkeypatch.setenv("MESHWRIGHT_CACHE", str(tmp_path / "a file"))
    line = one_line_error(capsys, ["data", "prepare", "--default", "--max-files", "2", "--no-progress"])
    assert f"MESHWRIGHT_CACHE='{tmp_path / 'a file'}' is invalid" in line and "valid: a writable directory" in line
    with pytest.raises(ConfigError, match=r"^MESHWRIGHT_CACHE='.*a file' is invalid \(Not a directory for .*profiles"):
        profile_cache(create=True)
    monkeypatch.setenv("MESHWRIGHT_CACHE_DIR", str(tmp_path / "a file" / "p"))
    with pytest.raises(ConfigError, match=r"^MESHWRIGHT_CACHE_DIR='.*a file/p' is invalid"):
        profile_cache(create=True)
    assert (tmp_path / "a file").read_text() == "x"


# ---- SIGTERM (a scheduler's stop) during data prepare ---------------------------------------------------------

def test_sigterm_during_data_prepare_leaves_no_temp_directory(tmp_path):
    """`data prepare` killed by SIGTERM (Slurm's preemption, `timeout`) left its hidden `.OUT.tmp-*` directory
    beside --out, as large as the tokens written so far, which nothing ever removed; Ctrl-C already cleaned it."""
    import subprocess
    import sys

    (tmp_path / "a.txt").write_text("hello world\n" * 100)
    script = (
        "import os, signal, sys\n"
        "import meshwright.data.prepare\n"
        "p = sys.modules['meshwright.data.prepare']  # the package exports a function of that name\n"
        "real = p._write\n"
        "def dying(tmp, *a, **k):\n"
        "    (tmp / 'tokens.bin').write_bytes(b'x' * 4096)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(tmp, *a, **k)\n"
        "p._write = dying\n"
        "from meshwright.cli import main\n"
        "sys.exit(main(['data', 'prepare', 'a.txt', '--out', 'out', '--no-progress']))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 143, (proc.returncode, proc.stderr[-2000:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == ["meshwright data: terminated (SIGTERM); nothing "
                                                                     "written"]


# ---- plan --emit --train-config: a preset, and a config for another run ---------------------------------------

def test_plan_emit_takes_a_train_config_preset(capsys):
    """`--train-config tiny-test` (a preset, as `train tiny-test` takes) became `config path='tiny-test' does not
    exist` when the dtype it sets started being read from the raw file."""
    from meshwright.cli import main

    argv = ["plan", "--model", "tiny", "--cluster", "dgx-a100-80g", "--seq-len", "64", "--global-batch", "8",
            "--emit", "megatron", "--train-config", "tiny-test"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "--train-iters 12 " in capsys.readouterr().out  # tiny-test's steps


@pytest.mark.parametrize("flags, needle", [
    (["--model", "llama2-7b"], "--model='llama2-7b' is invalid; valid: the model --train-config"),
    (["--seq-len", "128"], "--seq-len=128 is invalid; valid: 64 as --train-config"),
    (["--global-batch", "1024"], "--global-batch=1024 is invalid; valid: 8 as --train-config"),
])
def test_plan_emit_refuses_a_train_config_of_another_run(capsys, tmp_path, flags, needle):
    """The export wrote the plan's model, sequence and batch with --train-config's steps and schedule, made for
    another model or batch (tiny-test's 12 steps of 8x64 under a llama2-7b layout at 1024x4096), without a word."""
    train = tmp_path / "t.yaml"
    shutil.copyfile(ROOT / "configs" / "train" / "tiny-test.yaml", train)
    base = {"--model": "tiny", "--seq-len": "64", "--global-batch": "8"}
    base.update(dict(zip(flags[::2], flags[1::2])))
    argv = ["plan", "--cluster", "dgx-a100-80g", *[x for kv in base.items() for x in kv], "--emit", "megatron",
            "--train-config", str(train)]
    line = one_line_error(capsys, argv)
    assert needle in line and str(train) in line


def test_fresh_run_into_a_directory_with_only_a_log_names_it_plainly(tmp_path):
    """It said `it holds another run's a log.jsonl`."""
    from meshwright.errors import ConfigError
    from meshwright.train.run_dir import check_fresh_or_overwrite

    (tmp_path / "log.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"it holds another run's log\.jsonl; use --resume"):
        check_fresh_or_overwrite(tmp_path, resume=False, overwrite=False)


def test_checkpoint_without_checksums_is_a_one_line_warning(tmp_path, capsys):
    """A checkpoint without checksums.json (older, or the file removed) loaded with Python's UserWarning: two lines,
    a source path and the code line `return path, load_runtime(...)`, not the `warning: ...` line of the others."""
    import warnings

    from _train_helpers import make_trainer, prepared_corpus
    from meshwright.train.checkpoint import latest_checkpoint

    data = prepared_corpus(tmp_path)
    make_trainer(data, tmp_path / "run", steps=1, warmup_steps=1, eval_every=0).fit()
    step = latest_checkpoint(tmp_path / "run" / "ckpt")
    (step / "checksums.json").unlink()
    t = make_trainer(data, tmp_path / "run", steps=2, warmup_steps=1, eval_every=0)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert t.resume() is True
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == [f"warning: checkpoint {step} has no checksums.json (written before checksums, or removed); "
                   f"loading it unverified"]
