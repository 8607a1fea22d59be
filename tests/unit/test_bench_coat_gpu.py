"""The prepared GPU benchmark of #18 runs end to end on CPU with tiny sizes (the GPU run is for later).

These runs take no profiler trace (``--trace-steps 0``): on CPU the default 3 traced steps cost ~20 s of CPU per run
(most of it in the profiler's ``key_averages``), and the trace of this very configuration (bf16_adamw,coat, 2 steps)
is what tests/unit/test_kernel_breakdown.py asserts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_coat_gpu  # noqa: E402


def test_smoke_run_reports_every_figure_and_the_ratios(capsys):
    doc = bench_coat_gpu.main(["--smoke", "--inline", "--steps", "2", "--configs", "bf16_adamw,coat",
                               "--trace-steps", "0"])
    assert doc["device"] == "cpu" and doc["steps"] == 2 and doc["batch"] == 2 and doc["seq"] == 32
    base, coat = doc["results"]
    assert coat["note"] == "FP8 GEMM backend: emulate"
    for r in (base, coat):
        assert r["tokens_per_s"] > 0 and r["optimizer_step_s"] > 0 and 4 < r["first_loss"] < 7
    assert abs(coat["first_loss"] - base["first_loss"]) < 0.01  # same batches, same init, FP8 GEMMs
    # which FP8 conversion the Triton casts kept: none on CPU (they run on CUDA only), the mode as shipped
    assert coat["fp8_conversion"] == {"mode": "checked", "gpu_conversion_agreed": [], "gpu_conversion_refused": []}
    assert "fp8_conversion" not in base
    assert set(doc["vs_bf16_adamw"]["coat"]) == {"throughput_x", "optimizer_step_x_of_adamw",
                                                 "loss_last10_diff_pct", "val_loss_diff_pct"}
    assert '"vs_bf16_adamw"' in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_blocks_compile_scope_compiles_each_block_and_trains_as_the_eager_run():
    """``--compile-scope blocks`` (the trainer's compile: true): every block compiled in place, the same first loss
    as eager; its compile time does not grow with the depth as the whole model's does (one graph serves all)."""
    argv = ["--smoke", "--inline", "--steps", "2", "--configs", "coat", "--trace-steps", "0"]
    eager = bench_coat_gpu.main(argv)["results"][0]
    doc = bench_coat_gpu.main(argv + ["--compile", "--compile-scope", "blocks"])
    assert doc["compile"] and doc["compile_scope"] == "blocks"
    (r,) = doc["results"]
    assert r["compiled_blocks"] == [4, 4]  # compiled blocks of tiny's four
    assert abs(r["first_loss"] - eager["first_loss"]) < 1e-3


def test_bad_configs_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        bench_coat_gpu.main(["--smoke", "--configs", "bf16_adamw,fp4"])
    assert "--configs='bf16_adamw,fp4' is invalid; valid:" in capsys.readouterr().err


def test_fewer_steps_for_one_configuration_drop_its_loss_comparison():
    doc = bench_coat_gpu.main(["--smoke", "--inline", "--steps", "3", "--configs", "bf16_adamw,coat",
                               "--steps-for", "coat=2", "--trace-steps", "0"])
    base, coat = doc["results"]
    assert (base["steps"], coat["steps"]) == (3, 2)
    # throughput and memory still compare; losses after different step counts do not
    assert set(doc["vs_bf16_adamw"]["coat"]) == {"throughput_x", "optimizer_step_x_of_adamw"}


@pytest.mark.parametrize("bad", ["coat", "fp4=2", "coat=0", "coat=x"])
def test_bad_steps_for_is_a_one_line_error(capsys, bad):
    with pytest.raises(SystemExit):
        bench_coat_gpu.main(["--smoke", "--steps-for", bad])
    assert f"--steps-for={bad!r} is invalid: give NAME=N pairs" in capsys.readouterr().err


def test_a_repeated_baseline_is_averaged_and_its_spread_reported():
    """Two bf16 runs (the 300-step loss moved 4.3% between identical H200 runs): the baseline is their mean, their
    spread is reported, and a configuration run twice is told apart by its run number."""
    def run(name, loss, val, step_s=0.25, steps=300):
        return {"name": name, "step_s": step_s, "tokens_per_s": 16384 / step_s, "optimizer_step_s": 0.01,
                "loss_last10": loss, "val_loss": val, "steps": steps, "peak_reserved_gib": 50.0}

    results = [run("coat", 1.80, 1.90), run("bf16_adamw", 1.90, 2.00), run("bf16_adamw", 1.80, 1.90),
               run("coat", 1.85, 1.95), run("bf16_adamw", 1.00, 1.00, steps=60)]  # another length: left out
    out = bench_coat_gpu.ratios(results)
    assert out["bf16_adamw_runs"] == {"runs": 2, "loss_last10_spread_pct": round(100 * 0.1 / 1.85, 2),
                                      "val_loss_spread_pct": round(100 * 0.1 / 1.95, 2), "step_s_spread_pct": 0.0}
    assert out["coat#1"]["loss_last10_diff_pct"] == round(100 * (1.80 / 1.85 - 1), 2)
    assert out["coat#2"]["val_loss_diff_pct"] == 0.0
    assert out["bf16_adamw#3"] == {"throughput_x": 1.0, "optimizer_step_x_of_adamw": 1.0, "memory_x_lower": 1.0}
    assert out["coat_runs"] == {"runs": 2, "loss_last10_diff_pct": round(100 * (1.825 / 1.85 - 1), 2),
                                "val_loss_diff_pct": round(100 * (1.925 / 1.95 - 1), 2),
                                "loss_last10_spread_pct": round(100 * 0.05 / 1.825, 2), "throughput_x": 1.0}
    assert "bf16_adamw_runs" not in bench_coat_gpu.ratios(results[:2])
