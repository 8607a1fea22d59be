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
