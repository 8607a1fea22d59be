"""bench_fp8_casts_gpu's bit report: which FP8 copy differs from the reference, and whether it holds NaN codes the
reference has not (the question the H200's NaN with the GPU's FP8 conversion left open, 2026-11-28)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_fp8_casts_gpu as bench  # noqa: E402
from meshwright.optim import fp8_quant  # noqa: E402


def test_the_report_names_the_transposed_copy_and_its_nan_codes():
    x = torch.randn(6, 10)
    ref = fp8_quant.quantize_per_tensor_t(x, torch.float8_e4m3fn)
    assert bench._differences(ref, ref, x) == {"codes": 0, "scales": 0, "q": {"codes": 0, "new_nan_codes": 0},
                                               "qt": {"codes": 0, "new_nan_codes": 0}}
    q, qt, scale = (t.clone() for t in ref)
    qt.view(torch.uint8)[3, 4] = 0x7F  # q^T[3, 4] is x[4, 3]
    diff = bench._differences((q, qt, scale), ref, x)
    assert diff["codes"] == 1 and diff["q"]["codes"] == 0
    assert diff["qt"] == {"codes": 1, "new_nan_codes": 1}
    assert diff["first"]["in"] == "qt" and diff["first"]["at"] == [3, 4] and diff["first"]["x"] == float(x[4, 3])


def test_e5m2_nan_codes_are_told_from_infinities():
    codes = torch.tensor([0x7C, 0xFC, 0x7D, 0xFF, 0x7B], dtype=torch.uint8)
    assert bench._nan_codes(codes, torch.float8_e5m2) == 2
    assert bench._nan_codes(torch.tensor([0x7F, 0xFF, 0x7E], dtype=torch.uint8), torch.float8_e4m3fn) == 2
