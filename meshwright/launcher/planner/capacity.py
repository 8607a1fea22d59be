"""Capacity planning: from a predicted throughput to days, device-hours, energy, CO2 and cost.

Power bases (``power_basis``), each multiplied by the data centre's PUE:
- ``node`` (default): per device idle + utilisation x (TDP - idle) from the cluster preset, plus each node's
  host power (CPUs, NICs, fans). Utilisation defaults to the fraction of the step the devices compute.
- ``tdp``: GPU TDP x device-hours, nothing else: how the Llama 2 and Llama 3 model cards count ("peak power
  capacity per GPU device"), so their figures can be reproduced (with pue=1).
- ``measured``: a measured average power per device (NVML, ``meshwright train``'s energy log) x device-hours.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from meshwright.config import ClusterSpec
from meshwright.errors import invalid
from meshwright.tools.energy import validate_grid

DEFAULT_PUE = 1.1  # hyperscale data-centre fleet average is ~1.1-1.2 (Google 2023 environmental report: 1.10)
DEFAULT_GRID = 0.385  # kgCO2e/kWh, US average 2023 (EPA eGRID / EIA); Llama-2's report implies 0.423


@dataclass
class Capacity:
    train_tokens: float
    days: float
    device_hours: float
    energy_mwh: float
    tco2e: float
    cost_usd: float | None
    power_w_per_device: float
    utilisation: float
    pue: float
    grid_intensity: float
    goodput: float = 1.0

    def as_dict(self) -> dict:
        return asdict(self)


def device_power_w(cluster: ClusterSpec, utilisation: float) -> float:
    if not 0.0 <= utilisation <= 1.0:
        raise invalid("utilisation", utilisation, "a number in [0, 1]")
    return cluster.idle_w + utilisation * (cluster.tdp_w - cluster.idle_w)


POWER_BASES = ("node", "tdp", "measured")


def power_per_device_w(cluster: ClusterSpec, utilisation: float, basis: str = "node",
                       measured_w: float | None = None) -> tuple[float, float]:
    """(W per device, W per node of host power) under ``basis`` (see the module docstring)."""
    if basis not in POWER_BASES:
        raise invalid("power_basis", basis, ", ".join(POWER_BASES))
    if basis == "tdp":
        return cluster.tdp_w, 0.0
    if basis == "measured":
        if measured_w is None or measured_w <= 0:
            raise invalid("measured_power_w", measured_w, "a positive average W per device (needed by power_basis=measured)")
        return measured_w, 0.0
    return device_power_w(cluster, utilisation), cluster.host_power_w


def check_capacity_inputs(train_tokens: float | None, pue: float, grid_intensity: float,
                          price_per_device_hour: float | None, goodput: float, power_basis: str,
                          measured_power_w: float | None) -> None:
    """The user's capacity inputs, one line per mistake (NaN included); `meshwright plan` calls it before searching."""
    if not 0.0 < goodput <= 1.0:
        raise invalid("goodput", goodput, "a number in (0, 1]")
    if train_tokens is not None and not 0 < train_tokens < math.inf:
        raise invalid("train_tokens", train_tokens, "a positive, finite number of tokens")
    validate_grid(pue, grid_intensity)
    if price_per_device_hour is not None and not 0 <= price_per_device_hour < math.inf:
        raise invalid("price_per_device_hour", price_per_device_hour, "a non-negative, finite number of USD")
    if power_basis not in POWER_BASES:
        raise invalid("power_basis", power_basis, ", ".join(POWER_BASES))
    if measured_power_w is not None and not 0 < measured_power_w < math.inf:
        raise invalid("measured_power_w", measured_power_w, "a positive, finite average W per device")
    if power_basis == "measured" and measured_power_w is None:
        raise invalid("measured_power_w", measured_power_w, "a positive average W per device (needed by power_basis=measured)")


def capacity_plan(cluster: ClusterSpec, tokens_per_s: float, train_tokens: float, utilisation: float = 1.0,
                  pue: float = DEFAULT_PUE, grid_intensity: float = DEFAULT_GRID,
                  price_per_device_hour: float | None = None, goodput: float = 1.0,
                  power_basis: str = "node", measured_power_w: float | None = None) -> Capacity:
    """What training ``train_tokens`` tokens at ``tokens_per_s`` on ``cluster`` costs.

    ``goodput`` is the fraction of wall-clock time spent on useful steps (failures, restarts,
    evaluation and checkpoints take the rest); published large runs report roughly 0.7-0.9.
    """
    check_capacity_inputs(train_tokens, pue, grid_intensity, price_per_device_hour, goodput, power_basis, measured_power_w)
    if tokens_per_s <= 0:
        raise invalid("tokens_per_s", tokens_per_s, "a positive predicted throughput")
    seconds = train_tokens / (tokens_per_s * goodput)
    hours = seconds / 3600.0
    devices = cluster.world_size
    power, host = power_per_device_w(cluster, utilisation, power_basis, measured_power_w)
    it_energy_wh = hours * (devices * power + cluster.nodes * host)
    energy_mwh = it_energy_wh * pue / 1e6
    return Capacity(
        train_tokens=train_tokens, days=seconds / 86400.0, device_hours=hours * devices,
        energy_mwh=energy_mwh, tco2e=energy_mwh * grid_intensity,  # MWh x kg/kWh = t
        cost_usd=None if price_per_device_hour is None else hours * devices * price_per_device_hour,
        power_w_per_device=power, utilisation=utilisation, pue=pue, grid_intensity=grid_intensity, goodput=goodput,
    )


def parse_tokens(text: str | float | int) -> float:
    """'2T', '300B', '1.5e12' -> tokens."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().upper()
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    try:
        if s and s[-1] in mult:
            return float(s[:-1]) * mult[s[-1]]
        return float(s)
    except ValueError:
        raise invalid("train_tokens", text, "a number of tokens such as 2T, 300B or 1.5e12") from None
