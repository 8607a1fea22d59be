"""The SASS check of COAT's FP8 cast kernels (benchmarks/sass_audit.py): it flags the fault the H200 hit, and the
kernels as shipped compile for sm_90 without it, with the GPU's conversion instructions where asked (#18)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import sass_audit  # noqa: E402

# cast_tensor_kernel (fp32 input, E4M3, with its transpose) as Triton 3.6's ptxas compiled Triton's own conversion
# for sm_90, excerpted: R26 holds q = x / scale (the division's slow path returns it in R0); the clamp reads it; then
# its low half is masked and shifted as if it were a converted pair, and the byte packed for the transposed copy
BUGGY = """
        /*1760*/                   FFMA R26, R26, R3, R0 ;
        /*17a0*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath) ;
        /*17b0*/                   IMAD.MOV.U32 R26, RZ, RZ, R0 ;
        /*2470*/                   FSETP.GT.AND P4, PT, R26.reuse, 448, PT ;
        /*2480*/                   FMNMX.NAN R4, R26.reuse, -448, !PT ;
        /*2490*/                   LOP3.LUT R26, R26, 0xffff, RZ, 0xc0, !PT ;
        /*24a0*/                   FSEL R4, R4, 448, !P4 ;
        /*24d0*/                   F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C R4, R4, R13, RZ ;
        /*2610*/                   SHF.R.U32.HI R18, RZ, 0x8, R26 ;
"""
# the same with the byte taken from the conversion's result (R4, after the F2FP)
_TAKEN = "        /*2490*/                   LOP3.LUT R26, R26, 0xffff, RZ, 0xc0, !PT ;\n"
_CONVERTED = "        /*24e0*/                   LOP3.LUT R26, R4, 0xffff, RZ, 0xc0, !PT ;\n"
FIXED = BUGGY.replace(_TAKEN, "").replace("        /*2610*/", _CONVERTED + "        /*2610*/")


def test_the_audit_flags_a_byte_taken_from_the_fp32_value_being_converted():
    flagged = "/*2490*/                   LOP3.LUT R26, R26, 0xffff, RZ, 0xc0, !PT ;"
    assert sass_audit.fp32_byte_extractions(BUGGY) == [flagged]
    assert "/*24e0*/" in FIXED and "/*2490*/" not in FIXED
    assert sass_audit.fp32_byte_extractions(FIXED) == []


@pytest.mark.skipif(not sass_audit.available(), reason="needs Triton with its NVIDIA backend (ptxas, nvdisasm)")
@pytest.mark.timeout(180)
def test_shipped_cast_kernels_convert_on_the_gpu_from_the_conversions_results():
    """The variant the H200 got wrong (fp32 input, transposed copy) and a bf16 one: with HW the GPU's conversion
    instructions (F2FP) and no byte from an fp32 value; without HW, none (the integer encoder)."""
    for x_dtype, fmt in (("fp32", "e4m3"), ("bf16", "e5m2")):
        sass = sass_audit.cast_kernel_sass("cast_tensor_kernel", x_dtype, fmt)
        assert f"F2FP.SATFINITE.{fmt.upper()}" in sass, (x_dtype, fmt)  # the format asked for
        assert sass_audit.fp32_byte_extractions(sass) == [], (x_dtype, fmt)
    encoder = sass_audit.cast_kernel_sass("cast_tensor_kernel", "fp32", "e4m3", hw=False)
    assert "F2FP" not in encoder


@pytest.mark.skipif(not sass_audit.available(), reason="needs Triton with its NVIDIA backend (ptxas, nvdisasm)")
@pytest.mark.timeout(180)
def test_cast_kernels_multiply_by_the_inverse_scale_not_divide_per_element():
    """No IEEE division per element (each is an FCHK and ~10 instructions): the scales' own divisions only, a few per
    thread against the 32 elements each holds, and the per-element budget that leaves (Triton 3.6 and 3.9: 15-19
    instructions per element with the GPU's conversion; dividing per element made it 27-47)."""
    for kernel in ("cast_tensor_kernel", "cast_groups_kernel"):
        sass = sass_audit.cast_kernel_sass(kernel, "bf16", "e4m3")
        per_element, divisions = sass_audit.instructions_per_element(sass, sass_audit.elements_per_thread(kernel))
        assert divisions <= sass_audit.elements_per_thread(kernel) // 8, (kernel, divisions)
        assert per_element < 24, (kernel, per_element)
        # each element converted once: Triton 3.6 ran a bf16 transposing cast's whole conversion twice (64 per thread)
        assert sass.count("F2FP") == sass_audit.elements_per_thread(kernel), (kernel, sass.count("F2FP"))


def test_instructions_per_element_count_the_straight_line_code():
    sass = BUGGY + "        /*2700*/                   EXIT ;\n" + BUGGY
    per_element, divisions = sass_audit.instructions_per_element(sass, 3)
    assert per_element == 9 / 3 and divisions == 0
    assert sass_audit.instructions_per_element(sass.replace("FSETP.GT", "FCHK"), 1)[1] == 1


def test_a_missing_kernels_file_is_a_one_line_error(capsys, tmp_path):
    with pytest.raises(SystemExit):
        sass_audit.main(["--kernels", str(tmp_path / "nope.py")])
    err = capsys.readouterr().err
    assert f"--kernels={str(tmp_path / 'nope.py')!r} is not a file; valid: a copy of" in err
