"""Model FLOPs utilisation (MFU): achieved model FLOP/s over the devices' peak FLOP/s.

MFU = tokens/s x model FLOPs per token / (peak FLOP/s of one device for the compute dtype x devices).
FLOPs per token come from the model (``Decoder.flops_per_token``, PaLM convention); the peak comes
from the ClusterSpec preset. Recomputation does not count (that would be HFU).
"""

from __future__ import annotations

from meshwright.config import ClusterSpec
from meshwright.tools.flops import utilization


def mfu(tokens_per_s: float, flops_per_token: float, cluster: ClusterSpec, dtype: str = "fp32", n_devices: int = 1) -> float:
    """Fraction of peak (0..1) for ``n_devices`` devices of ``cluster`` computing in ``dtype``."""
    return utilization(tokens_per_s, flops_per_token, cluster.peak_flops(dtype), max(n_devices, 1))
