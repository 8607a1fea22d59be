"""Static instruction count of CoatAdamW's Triton kernel for sm_90, without a GPU (Triton compiles the cubin
offline; ``cuobjdump -sass`` from Triton's wheel lists it). The kernel has no loops, so the count divided by the
elements one thread owns is its per-element work: a way to see what a change costs before a GPU run.

    python benchmarks/coat_sass_count.py [--unaligned] [--math fast|precise]

Prints one JSON line: SASS and MUFU instructions (total and per element) and registers per thread, for the
default launch (8 groups of 128 per program, 4 warps, e4m3 moments with range expansion).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshwright.optim import coat_triton  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unaligned", action="store_true", help="the launch for addresses/sizes off 16 bytes")
    ap.add_argument("--math", choices=("fast", "precise"), default="fast")
    args = ap.parse_args()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = coat_triton.kernels(False).coat_adamw_kernel
    sig = {"base32": "*fp32", "base8": "*u8", "ptrs": "*i64", "work": "*i32"}
    sig.update({n: "fp32" for n in ("decay", "neg_step", "bc2_sqrt", "w1", "beta2", "c2", "eps", "k_min",
                                    "m_target", "v_target")})
    aligned = not args.unaligned
    const = dict(GROUP=128, GP2=128, BLOCK_G=coat_triton.BLOCK_GROUPS, EXPAND=True, M_MBITS=3, M_BIAS=7,
                 M_E5M2=False, M_FMAX=448.0, V_MBITS=3, V_BIAS=7, V_E5M2=False, V_FMAX=448.0,
                 MATH=coat_triton._MATH_CODES[args.math], ALIGNED=aligned)
    sig.update({c: "constexpr" for c in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(4)} if aligned else {}
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": coat_triton.NUM_WARPS, "enable_fp_fusion": False})
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([str(tool), "-sass", cubin], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([str(tool), "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    instr = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/\s+\S", ln) and "NOP" not in ln]
    mufu = sum("MUFU" in ln for ln in instr)
    per_thread = coat_triton.BLOCK_GROUPS * 128 / (32 * coat_triton.NUM_WARPS)
    regs = re.search(r"REG:(\d+)", res)
    print(json.dumps({"aligned": aligned, "math": args.math, "sass": len(instr), "sass_per_element":
                      round(len(instr) / per_thread, 1), "mufu_per_element": round(mufu / per_thread, 1),
                      "registers": int(regs.group(1)) if regs else None, "triton": triton.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
