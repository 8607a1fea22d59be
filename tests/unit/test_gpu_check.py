"""benchmarks/gpu_check.py --cpu-smoke: the one-GPU check's plumbing (sections in subprocesses, the planner's
prediction next to the measurement, one JSON report) runs on CPU with tiny sizes. The GPU figures need a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _cpu_smoke(tmp_path: Path, sections: str, timeout: int) -> tuple[dict, str]:
    """Run ``gpu_check.py --cpu-smoke --only sections``: (the report it wrote, its stdout)."""
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(out),
                           "--only", sections], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.timeout(300)
def test_cpu_smoke_report(tmp_path) -> None:
    report, stdout = _cpu_smoke(tmp_path, "gpt2_trainer_eager,gpt2_plain_compiled", 280)
    assert json.loads(stdout) == report  # one JSON document on stdout
    trainer, plain = report["results"]["gpt2_trainer_eager"], report["results"]["gpt2_plain_compiled"]
    assert trainer["runtime"] == "LocalRuntime" and trainer["compute_dtype"] == "fp32"
    assert trainer["tokens_per_s"] > 0 and plain["tokens_per_s"] > 0 and trainer["predicted_step_s"] > 0
    assert report["summary"]["gpt2_trainer_eager_over_plain_compiled"] == round(
        trainer["tokens_per_s"] / plain["tokens_per_s"], 3)


@pytest.mark.timeout(400)
def test_cpu_smoke_compile_scope_model_section(tmp_path) -> None:
    """gpt2_trainer_compiled_model (issue #16's blocks-vs-model A/B): the trainer built with compile_scope model,
    compiled (inductor, tiny model) even in the smoke, next to the per-block section in the summary."""
    report, _ = _cpu_smoke(tmp_path, "gpt2_trainer_compiled_model,gpt2_trainer_compiled", 380)
    model, blocks = report["results"]["gpt2_trainer_compiled_model"], report["results"]["gpt2_trainer_compiled"]
    assert model["compile_scope"] == "model" and model["compile"] is True and model["runtime"] == "LocalRuntime"
    assert blocks["compile_scope"] == "blocks" and model["predicted_for_compile_scope"] == "blocks"
    assert model["tokens_per_s"] > 0 and model["loss_last"] < model["loss_first"]
    assert report["summary"]["gpt2_trainer_model_scope_over_blocks_scope"] == round(
        model["tokens_per_s"] / blocks["tokens_per_s"], 3)


def test_unknown_section_is_one_line_error() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--only", "nope"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and "--only='nope' is invalid; valid:" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.timeout(600)
def test_gpu_check_trainer_section_on_cuda(tmp_path) -> None:
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(out),
                           "--only", "gpt2_trainer_compiled"], capture_output=True, text=True, timeout=580, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]["gpt2_trainer_compiled"]
    assert res["compute_dtype"] == "bf16" and res["peak_reserved_gib"] > 0
