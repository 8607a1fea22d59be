"""One precision policy for every runtime: which dtype the weights are stored in, which dtype the matmuls
run in, which dtype gradients are reduced in.

``TrainConfig.dtype`` picks it. ``bf16`` is mixed precision with fp32 master weights: parameters and the
optimizer stay fp32, the forward/backward matmuls run in bf16 (``torch.autocast``), FSDP2 all-gathers bf16
copies of its shards (``MixedPrecisionPolicy(param_dtype=bf16)``) and reduces gradients in fp32, DeepSpeed
gets its ``bf16`` section. ``fp32`` computes in fp32 everywhere (no autocast at all).

The policy is honoured on every device, CPU included: ``dtype: bf16`` on CPU really computes in bf16
(slow there for small matmuls: ~3 GFLOP/s at 256x256 on the reference CPU against ~47 in fp32); configs
that want CPU speed say ``dtype: fp32``
(the default, and what ``make run`` uses). The trainer reports MFU against the peak of ``compute_dtype``,
the dtype the matmuls actually ran in.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from meshwright.errors import invalid

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PrecisionPolicy:
    """Dtypes of one run, named as in ``ClusterSpec.peak_tflops`` (fp32, bf16)."""

    param_dtype: str = "fp32"  # dtype of the unsharded weights the forward sees (FSDP2 all-gathers in it)
    compute_dtype: str = "fp32"  # dtype of the matmuls (autocast); MFU uses this dtype's peak
    reduce_dtype: str = "fp32"  # dtype of gradient reductions across data parallelism
    master_dtype: str = "fp32"  # dtype of the stored parameters the optimizer updates (fp32 master weights)

    @classmethod
    def from_dtype(cls, dtype: str) -> "PrecisionPolicy":
        """The policy a train config's ``dtype`` names."""
        if dtype not in DTYPES:
            raise invalid("dtype", dtype, " | ".join(DTYPES))
        if dtype == "fp32":
            return cls()
        return cls(param_dtype=dtype, compute_dtype=dtype, reduce_dtype="fp32", master_dtype="fp32")

    @property
    def mixed(self) -> bool:
        return self.compute_dtype != "fp32"

    def torch_dtype(self, which: str = "compute_dtype") -> torch.dtype:
        return DTYPES[getattr(self, which)]

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The autocast region the forward (and its recomputation) runs in; a no-op context for fp32."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.torch_dtype())

    def fsdp_policy(self) -> Any:
        """FSDP2's ``MixedPrecisionPolicy`` (None for fp32: FSDP2's default, no casts)."""
        if not self.mixed:
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.torch_dtype("param_dtype"),
                                    reduce_dtype=self.torch_dtype("reduce_dtype"))

    def deepspeed_sections(self) -> dict[str, Any]:
        """DeepSpeed's ``bf16``/``fp16`` config sections (bf16: bf16 weights, fp32 master copy in the optimizer)."""
        return {"fp16": {"enabled": False}, "bf16": {"enabled": self.compute_dtype == "bf16"}}


def apply_autocast(module: nn.Module, policy: PrecisionPolicy, device_type: str) -> nn.Module:
    """Run ``module.forward`` inside the policy's autocast region, in place (names and hooks unchanged).

    Applied to whole stage modules before DDP/pipelining wrap them, so every layout (DDP, FSDP2, DTensor
    TP/SP, megatron-core TP, pipeline stages, recomputation) computes in the same dtype."""
    if not policy.mixed:
        return module
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with policy.autocast(device_type):
            return inner(*args, **kwargs)

    module.forward = forward
    return module
