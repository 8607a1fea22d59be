"""Energy metering: GPUs through NVML's cumulative energy counter, CPU/RAM through codecarbon (offline).

Design:
- ``NvmlEnergyMeter`` reads ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since driver load) per device;
  where a board lacks the counter it samples ``nvmlDeviceGetPowerUsage`` in a thread and integrates.
  The NVML module is injected, so tests drive it with recorded counter values (wrap included).
- ``HostEnergyMeter`` wraps codecarbon's ``OfflineEmissionsTracker`` only: the online tracker calls
  out to the network, which meshwright never does unasked.
- ``EnergyAccountant`` sums both over *measurement windows*: the trainer pauses it during evaluation
  and checkpointing so J/token covers training steps only.
- Without NVML (CPU machines) it says so once and carries on with the host meter alone.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from meshwright.errors import invalid

log = logging.getLogger("meshwright.energy")
COUNTER_BITS = 64  # nvmlDeviceGetTotalEnergyConsumption returns an unsigned long long (mJ)


def validate_grid(pue: float, grid_intensity: float) -> None:
    if not (isinstance(pue, (int, float)) and 1.0 <= pue <= 3.0):
        raise invalid("pue", pue, "a number in [1.0, 3.0] (power usage effectiveness of the data centre)")
    if not (isinstance(grid_intensity, (int, float)) and 0.0 <= grid_intensity <= 2.0):
        raise invalid("grid_intensity", grid_intensity, "a number in [0, 2] kgCO2e per kWh")


def counter_delta_mj(start: int, end: int, bits: int = COUNTER_BITS) -> int:
    """Difference of a monotonically increasing counter that may have wrapped once."""
    return end - start if end >= start else (1 << bits) - start + end


def load_nvml() -> Any | None:
    """Import and initialise pynvml; None (said once by the caller) where no driver is present."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception as exc:  # NVMLError_LibraryNotFound, ImportError, driver mismatch ...
        log.debug("NVML unavailable: %s", exc)
        return None


class NvmlEnergyMeter:
    """Per-device GPU energy from NVML counters, with a power-sampling fallback."""

    def __init__(self, nvml: Any, device_indices: list[int] | None = None, sample_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.nvml = nvml
        count = nvml.nvmlDeviceGetCount()
        self.indices = list(range(count)) if device_indices is None else list(device_indices)
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices]
        self.sample_s = sample_s
        self.clock = clock
        self.has_counter = [self._probe_counter(h) for h in self.handles]
        self._start: list[int | None] = [None] * len(self.handles)
        self._sampled_j = [0.0] * len(self.handles)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def _probe_counter(self, handle: Any) -> bool:
        try:
            self.nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            return True
        except Exception:
            return False

    def start(self) -> None:
        for i, h in enumerate(self.handles):
            if self.has_counter[i]:
                self._start[i] = int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h))
        if not all(self.has_counter) and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample_loop, daemon=True)
            self._thread.start()

    def sample_once(self, dt: float) -> None:
        """Integrate power over ``dt`` seconds for devices without a counter (used by the thread and tests)."""
        for i, h in enumerate(self.handles):
            if not self.has_counter[i]:
                watts = self.nvml.nvmlDeviceGetPowerUsage(h) / 1000.0
                with self._lock:
                    self._sampled_j[i] += watts * dt

    def _sample_loop(self) -> None:
        last = self.clock()
        while not self._stop.wait(self.sample_s):
            now = self.clock()
            self.sample_once(now - last)
            last = now

    def stop(self) -> list[float]:
        """Joules per device since ``start``."""
        out = []
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2)
            self._thread = None
        for i, h in enumerate(self.handles):
            if self.has_counter[i]:
                end = int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h))
                start = self._start[i] if self._start[i] is not None else end
                out.append(counter_delta_mj(start, end) / 1000.0)
            else:
                with self._lock:
                    out.append(self._sampled_j[i])
                    self._sampled_j[i] = 0.0
        return out

    def facts(self) -> list[dict[str, Any]]:
        """Name, memory and power limit of each device (for reports and the hardware profile)."""
        rows = []
        for h in self.handles:
            name = self.nvml.nvmlDeviceGetName(h)
            rows.append({
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "memory_gib": self.nvml.nvmlDeviceGetMemoryInfo(h).total / 2**30,
                "power_limit_w": self.nvml.nvmlDeviceGetPowerManagementLimit(h) / 1000.0,
            })
        return rows


class _QuietCodecarbon(logging.Filter):
    """Drop codecarbon's INFO/WARNING chatter (one tracker per rank is intended); keep errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


class HostEnergyMeter:
    """CPU + RAM energy of this process via codecarbon's OfflineEmissionsTracker (no network)."""

    def __init__(self, country_iso_code: str = "USA", tracker_factory: Callable[..., Any] | None = None) -> None:
        self._factory = tracker_factory
        self.country = country_iso_code
        self._tracker: Any | None = None
        self._window = 0

    def _make(self) -> Any:
        if self._factory is not None:
            return self._factory()
        for name in ("codecarbon", "apscheduler"):
            logging.getLogger(name).setLevel(logging.ERROR)
        from codecarbon import OfflineEmissionsTracker

        cc_log = logging.getLogger("codecarbon")
        if not any(isinstance(f, _QuietCodecarbon) for f in cc_log.filters):
            cc_log.addFilter(_QuietCodecarbon())  # it re-raises its own level inside the constructor

        return OfflineEmissionsTracker(
            country_iso_code=self.country, log_level="error", output_methods=[],
            measure_power_secs=10, tracking_mode="process", allow_multiple_runs=True,
        )

    def start(self) -> None:
        if self._tracker is None:
            self._tracker = self._make()
            self._tracker.start()
        self._window += 1
        self._tracker.start_task(f"window-{self._window}")

    def stop(self) -> tuple[float, float]:
        """(cpu_j, ram_j) used in the window since ``start``."""
        data = self._tracker.stop_task()
        return float(data.cpu_energy) * 3.6e6, float(data.ram_energy) * 3.6e6

    def close(self) -> None:
        if self._tracker is not None:
            try:
                self._tracker.stop()
            except Exception:  # codecarbon may complain when the last task already stopped
                pass
            self._tracker = None


@dataclass
class EnergyTotals:
    gpu_j: float = 0.0
    cpu_j: float = 0.0
    ram_j: float = 0.0
    gpu_j_per_device: list[float] = field(default_factory=list)
    seconds: float = 0.0
    gpu_source: str = "none"

    @property
    def total_j(self) -> float:
        return self.gpu_j + self.cpu_j + self.ram_j

    def as_dict(self, tokens: int = 0, pue: float = 1.0, grid_intensity: float = 0.0) -> dict[str, Any]:
        """The run-summary fields: joules by source, J/token, kWh (x PUE) and kgCO2e."""
        kwh = self.total_j / 3.6e6 * pue
        out = {
            "energy_j": self.total_j, "gpu_j": self.gpu_j, "cpu_j": self.cpu_j, "ram_j": self.ram_j,
            "energy_measured_s": self.seconds, "energy_gpu_source": self.gpu_source,
            "j_per_token": self.total_j / tokens if tokens else None,
            "kwh": kwh, "co2_kg": kwh * grid_intensity, "pue": pue, "grid_intensity": grid_intensity,
        }
        if self.gpu_j_per_device:
            out["gpu_j_per_device"] = self.gpu_j_per_device
        return out


class EnergyAccountant:
    """Sums device and host energy over training windows; ``pause()`` around eval and checkpoints."""

    def __init__(self, nvml: Any | None = "auto", host: HostEnergyMeter | None | str = "auto",
                 device_indices: list[int] | None = None) -> None:
        if nvml == "auto":
            nvml = load_nvml()
            if nvml is None:
                log.warning("NVML not available (no NVIDIA driver): GPU energy is not measured on this machine")
        self.gpu = NvmlEnergyMeter(nvml, device_indices) if nvml is not None else None
        if host == "auto":
            try:
                host = HostEnergyMeter()
            except Exception as exc:  # codecarbon missing or broken: say so, continue
                log.warning("codecarbon unavailable (%s): CPU/RAM energy not measured", exc)
                host = None
        self.host = host
        self.totals = EnergyTotals(gpu_source=("nvml-counter" if self.gpu and all(self.gpu.has_counter)
                                               else "nvml-power-sampling" if self.gpu else "none"))
        self._running = False
        self._t0 = 0.0

    def resume(self) -> None:
        if self._running:
            return
        self._running = True
        self._t0 = time.monotonic()
        if self.gpu is not None:
            self.gpu.start()
        if self.host is not None:
            try:
                self.host.start()
            except Exception as exc:
                log.warning("host energy meter failed to start (%s); continuing without it", exc)
                self.host = None

    def pause(self) -> None:
        if not self._running:
            return
        self._running = False
        self.totals.seconds += time.monotonic() - self._t0
        if self.gpu is not None:
            per_dev = self.gpu.stop()
            if not self.totals.gpu_j_per_device:
                self.totals.gpu_j_per_device = [0.0] * len(per_dev)
            self.totals.gpu_j_per_device = [a + b for a, b in zip(self.totals.gpu_j_per_device, per_dev)]
            self.totals.gpu_j += sum(per_dev)
        if self.host is not None:
            cpu, ram = self.host.stop()
            self.totals.cpu_j += cpu
            self.totals.ram_j += ram

    class _Paused:
        def __init__(self, acc: "EnergyAccountant") -> None:
            self.acc = acc
            self.was = False

        def __enter__(self) -> None:
            self.was = self.acc._running
            self.acc.pause()

        def __exit__(self, *exc: object) -> None:
            if self.was:
                self.acc.resume()

    def paused(self) -> "_Paused":
        """Context manager: exclude evaluation/checkpointing from the energy window."""
        return EnergyAccountant._Paused(self)

    def close(self) -> EnergyTotals:
        self.pause()
        if self.host is not None:
            self.host.close()
        return self.totals
