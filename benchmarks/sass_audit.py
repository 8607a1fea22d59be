"""Read the machine code the GPU would run for COAT's FP8 cast kernels, on a machine without a GPU (#18).

Why: on an H200 (2026-11-28) the casts with Triton's own fp32 -> FP8 conversion gave NaN gradients, and the PTX
looked right. The SASS did not: for the transposed copy of an fp32 tile, ptxas split each converted pair into bytes
from the fp32 *input* register instead of the conversion's result. Triton compiles for sm_90 without a driver, and
its wheel carries ptxas and nvdisasm, so that SASS can be produced and checked anywhere. The check: no byte
extraction (``LOP3 & 0xffff``, ``SHF.R.U32.HI`` by 8, ``PRMT`` packing bytes) reads a register last used as the fp32
value being converted (compared or clamped against +-FMAX, with nothing written to it in between). A heuristic on
straight-line code, aimed at that fault; the GPU tests remain the proof.

It also counts what each thread runs per element: these kernels are bound by instructions as much as by memory (on
the H200 the GPU's conversion, ~10 fewer instructions per element than the integer encoder, made them 1.4x faster),
so the count is the deterministic half of their speed. Dividing each value by its scale cost ~10 more; the kernels
multiply by the scale's inverse instead (fp8_quant.activation_scales).

    python benchmarks/sass_audit.py [--arch 90] [--kernels PATH]   # every cast-kernel variant; exit 1 if one is flagged
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "meshwright" / "optim" / "_coat_triton_kernels.py"
FORMATS = {"e4m3": (3, 7, 448.0), "e5m2": (2, 15, 57344.0)}  # mantissa bits, bias, largest finite value
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)\s+([^;]*);")
_REGISTER = re.compile(r"^-?\|?(R\d+)")
_FLOAT_READS = ("FSETP", "FMNMX", "FSEL", "FCHK")  # how the clamp of q against +-FMAX reads its registers
_NO_DESTINATION = ("ST", "STG", "STS", "STL", "BAR", "BRA", "EXIT", "RED", "ATOM", "ATOMG", "BSYNC", "BSSY", "CALL",
                   "RET", "FSETP", "ISETP", "FCHK", "WARPSYNC", "NOP")
_BYTE_PACKING = ("0x7604", "0x3340", "0x5410")


def _register(operand: str) -> str | None:
    m = _REGISTER.match(operand)
    return m.group(1) if m else None


def fp32_byte_extractions(sass: str) -> list[str]:
    """The byte extractions of ``sass`` (nvdisasm output) whose source register holds an fp32 value being converted."""
    floats: set[str] = set()
    flagged = []
    for line in sass.splitlines():
        m = _INSTRUCTION.search(line)
        if not m:
            continue
        op, operands = m.group(1), [o.strip() for o in m.group(2).split(",") if o.strip()]
        base = op.split(".")[0]
        if base in _FLOAT_READS:
            floats.update(r for r in map(_register, operands) if r)
        if base == "LOP3" and "0xffff" in operands or op.startswith("SHF.R.U32.HI") and operands[2:3] == ["0x8"]:
            sources = operands[1:]
        elif base == "PRMT" and any(o in operands for o in _BYTE_PACKING):
            sources = operands[1:2]  # the last operand may be the destination's own bytes, kept
        else:
            sources = []
        if any(_register(o) in floats for o in sources):
            flagged.append(line.strip())
        if operands and base not in _NO_DESTINATION:
            destination = _register(operands[0])
            if destination:
                floats.discard(destination)
    return flagged


def instructions_per_element(sass: str, elements_per_thread: int) -> tuple[float, int]:
    """(instructions each thread runs per element, IEEE-division checks among them) of a straight-line kernel: the
    instructions before the first ``EXIT`` (after it: the slow paths, out of line) over the elements each thread
    holds. ``FCHK`` opens each IEEE division's fast path: one per element is what dividing every value by its scale
    costs (~10 instructions each), a few per thread is the scale's own division."""
    ops = [m.group(1) for m in map(_INSTRUCTION.search, sass.splitlines()) if m]
    straight = ops[:ops.index("EXIT")] if "EXIT" in ops else ops
    return len(straight) / elements_per_thread, sum(op.startswith("FCHK") for op in straight)


def elements_per_thread(kernel: str) -> int:
    """A cast kernel's tile over its threads (each kernel runs one tile per program, fp8_triton's tiles and warps)."""
    from meshwright.memory import fp8_triton

    tile = fp8_triton.TILE if kernel == "cast_tensor_kernel" else fp8_triton.GROUP_TILE
    return tile[0] * tile[1] // (fp8_triton.NUM_WARPS * 32)


def _tool(name: str) -> str | None:
    """A CUDA binary Triton's wheel carries (ptxas, nvdisasm), else one on PATH."""
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def available() -> bool:
    """Whether this machine can compile for NVIDIA GPUs and disassemble (Triton with its NVIDIA backend)."""
    try:
        import triton.backends.compiler as backends
        import triton.compiler as compiler
    except ImportError:
        return False
    return (hasattr(backends, "GPUTarget") and hasattr(compiler, "ASTSource") and _tool("nvdisasm") is not None
            and _tool("ptxas") is not None)


def _kernels_module(path: Path = KERNELS):
    """The kernels file executed as its own module (Triton decides at decoration time whether to interpret)."""
    spec = importlib.util.spec_from_file_location("_coat_kernels_for_sass", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cast_kernel_sass(kernel: str, x_dtype: str, fmt: str, hw: bool = True, arch: int = 90,
                     kernels: Path = KERNELS) -> str:
    """SASS of ``cast_tensor_kernel`` (with its transpose) or ``cast_groups_kernel`` for ``x_dtype`` (fp32, bf16,
    fp16) and ``fmt`` (e4m3, e5m2), specialised as a launch on 16-aligned tensors with 16-divisible sizes is."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from meshwright.memory import fp8_triton

    mbits, bias, fmax = FORMATS[fmt]
    module = _kernels_module(kernels)
    if kernel == "cast_tensor_kernel":
        signature = {"x_ptr": f"*{x_dtype}", "q_ptr": "*u8", "qt_ptr": "*u8", "amax_ptr": "*i32", "scale_ptr": "*fp32",
                     "M": "i32", "N": "i32"}
        constants = {"TRANSPOSE": True, "BLOCK_M": fp8_triton.TILE[0], "BLOCK_N": fp8_triton.TILE[1]}
    elif kernel == "cast_groups_kernel":
        signature = {"x_ptr": f"*{x_dtype}", "q_ptr": "*u8", "s_ptr": "*fp32", "M": "i32", "N": "i32"}
        constants = {"GROUP": 16, "BLOCK_M": fp8_triton.GROUP_TILE[0], "BLOCK_N": fp8_triton.GROUP_TILE[1]}
    else:
        raise ValueError(f"kernel={kernel!r} is invalid; valid: cast_tensor_kernel, cast_groups_kernel")
    constants.update(FMAX=fmax, MBITS=mbits, BIAS=bias, HW=hw)
    fn = getattr(module, kernel)
    signature.update({name: "constexpr" for name in fn.arg_names if name not in signature})
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(signature) - len(constants))}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=aligned)
    compiled = triton_compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": fp8_triton.NUM_WARPS})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        return subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], check=True, capture_output=True, text=True,
                              timeout=120).stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (89: Ada, 90: Hopper)")
    p.add_argument("--kernels", type=Path, default=KERNELS, help="another version of _coat_triton_kernels.py")
    args = p.parse_args(argv)
    if not args.kernels.is_file():
        p.error(f"--kernels={str(args.kernels)!r} is not a file; "
                "valid: a copy of meshwright/optim/_coat_triton_kernels.py")
    if not available():
        print("sass_audit: needs Triton with its NVIDIA backend (ptxas, nvdisasm)", file=sys.stderr)
        return 2
    bad = 0
    for kernel in ("cast_tensor_kernel", "cast_groups_kernel"):
        for x_dtype in ("fp32", "bf16", "fp16"):
            for fmt in FORMATS:
                sass = cast_kernel_sass(kernel, x_dtype, fmt, arch=args.arch, kernels=args.kernels)
                flagged = fp32_byte_extractions(sass)
                bad += bool(flagged)
                per_element, divisions = instructions_per_element(sass, elements_per_thread(kernel))
                encoder = cast_kernel_sass(kernel, x_dtype, fmt, hw=False, arch=args.arch, kernels=args.kernels)
                per_element_encoder = instructions_per_element(encoder, elements_per_thread(kernel))[0]
                print(f"{kernel:20s} {x_dtype:5s} {fmt}: {per_element:5.1f} instructions per element "
                      f"({per_element_encoder:.1f} with the encoder), "
                      f"{divisions} divisions per thread, {sass.count('F2FP')} conversions, "
                      f"{len(flagged)} byte extractions from fp32 values" + (f" e.g. {flagged[0]}" if flagged else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
