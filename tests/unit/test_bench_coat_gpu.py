"""The prepared GPU benchmark of #18 runs end to end on CPU with tiny sizes (the GPU run is for later)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_coat_gpu  # noqa: E402


def test_smoke_run_reports_every_figure_and_the_ratios(capsys):
    doc = bench_coat_gpu.main(["--smoke", "--inline", "--steps", "2", "--configs", "bf16_adamw,coat"])
    assert doc["device"] == "cpu" and doc["steps"] == 2 and doc["batch"] == 2 and doc["seq"] == 32
    base, coat = doc["results"]
    assert coat["note"] == "FP8 GEMM backend: emulate"
    for r in (base, coat):
        assert r["tokens_per_s"] > 0 and r["optimizer_step_s"] > 0 and 4 < r["first_loss"] < 7
    assert abs(coat["first_loss"] - base["first_loss"]) < 0.01  # same batches, same init, FP8 GEMMs
    assert set(doc["vs_bf16_adamw"]["coat"]) == {"throughput_x", "optimizer_step_x_of_adamw",
                                                 "loss_last10_diff_pct", "val_loss_diff_pct"}
    assert '"vs_bf16_adamw"' in capsys.readouterr().out


def test_bad_configs_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        bench_coat_gpu.main(["--smoke", "--configs", "bf16_adamw,fp4"])
    assert "--configs='bf16_adamw,fp4' is invalid; valid:" in capsys.readouterr().err
