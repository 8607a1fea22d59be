"""The device-time breakdown the GPU benchmarks record (benchmarks/kernel_breakdown.py): kernels sorted by kind."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_coat_gpu  # noqa: E402
from kernel_breakdown import category, summarise  # noqa: E402

# kernel names as CUDA profiles of torch 2.11 on Hopper print them (cuBLAS, FlashAttention, cuDNN SDPA, inductor,
# ATen, fused AdamW, meshwright's CoatAdamW Triton step)
NAMES = {
    "nvjet_tst_192x192_64x4_2x1_v_bz_coopA_NNT": "gemm",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas":
        "gemm",
    "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(Params)": "gemm",
    "void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t>>": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0": "attention",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>": "optimizer",
    "coat_adamw_kernel": "optimizer",
    "triton_red_fused_abs_amax_0": "triton_fp8_cast",
    "triton_poi_fused__to_copy_clamp_div_1": "triton_fp8_cast",
    "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_2": "triton_other",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "aten_pointwise",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MaxOps<float>>>": "aten_pointwise",
    "Memcpy DtoD (Device -> Device)": "copy",
    "Memset (Device)": "copy",
    "aten::_scaled_mm": "gemm",
    "aten::mm": "gemm",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::mul": "aten_pointwise",
    "some_unknown_kernel": "other",
}


@pytest.mark.parametrize("name,kind", NAMES.items())
def test_each_kind_of_kernel_is_recognised(name, kind):
    assert category(name) == kind


def test_summary_is_per_step_and_splits_the_gemms_by_fp8():
    items = [("nvjet_tst_a", 600.0, 6), ("nvjet_tst_b", 200.0, 2), ("triton_red_fused_abs_amax_0", 100.0, 4),
             ("flash_bwd", 100.0, 2)]
    out = summarise(items, steps=2, fp8_gemm_us=500.0, top=2)
    assert out["busy_s"] == pytest.approx(0.0005)
    assert out["by_category_s"] == {"gemm": 0.0004, "triton_fp8_cast": 0.00005, "attention": 0.00005}
    assert out["share"]["gemm"] == 0.8
    assert (out["gemm_fp8_s"], out["gemm_not_fp8_s"]) == (0.00025, 0.00015)
    assert [k["name"] for k in out["top_kernels"]] == ["nvjet_tst_a", "nvjet_tst_b"]
    assert out["top_kernels"][0]["calls_per_step"] == 3


def test_the_coat_benchmark_records_the_breakdown_after_its_figures():
    doc = bench_coat_gpu.main(["--smoke", "--inline", "--steps", "2", "--configs", "bf16_adamw,coat,bf16_adamw",
                               "--trace-steps", "1"])
    assert "trace" not in doc["results"].pop()  # a repeated configuration is not traced again
    for r in doc["results"]:
        trace = r["trace"]["trace_kernels"]
        assert r["trace"]["trace_wall_step_s"] > 0 and trace["source"].startswith("cpu operators")
        assert trace["by_category_s"]["gemm"] > 0 and trace["busy_s"] > 0 and trace["top_kernels"]
    # the FP8 GEMMs are emulated on CPU (dequantise + matmul): no _scaled_mm either way
    assert all(r["trace"]["trace_kernels"]["gemm_fp8_s"] == 0 for r in doc["results"])


def test_no_trace_when_asked_for_none():
    doc = bench_coat_gpu.main(["--smoke", "--inline", "--steps", "2", "--configs", "bf16_adamw", "--trace-steps", "0"])
    assert "trace" not in doc["results"][0]
