"""Energy metering with a fake NVML (recorded counters, wrap, missing counter) and offline codecarbon."""

import socket

import pytest

from meshwright.errors import ConfigError
from meshwright.tools.energy import (
    EnergyAccountant, HostEnergyMeter, NvmlEnergyMeter, counter_delta_mj, validate_grid,
)


class FakeNvml:
    """Plays back recorded counter readings (mJ) and power readings (mW) per device."""

    class NVMLError(Exception):
        pass

    def __init__(self, counters: dict[int, list[int]] | None = None, power_mw: dict[int, float] | None = None):
        self.counters = {k: list(v) for k, v in (counters or {}).items()}
        self.power_mw = power_mw or {}
        self.n = len(set(self.counters) | set(self.power_mw))

    def nvmlDeviceGetCount(self):
        return self.n

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if h not in self.counters:
            raise self.NVMLError("Not Supported")
        seq = self.counters[h]
        return seq.pop(0) if len(seq) > 1 else seq[0]

    def nvmlDeviceGetPowerUsage(self, h):
        return self.power_mw[h]

    def nvmlDeviceGetName(self, h):
        return b"FakeGPU"

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("M", (), {"total": 80 * 2**30})()

    def nvmlDeviceGetPowerManagementLimit(self, h):
        return 700_000


def test_counter_delta_and_wrap():
    assert counter_delta_mj(1_000, 6_000) == 5_000
    assert counter_delta_mj((1 << 64) - 1_000, 4_000) == 5_000


def test_nvml_counter_meter_sums_devices_and_handles_wrap():
    # probe reading, start reading, stop reading for each device; device 1 wraps
    fake = FakeNvml(counters={0: [10, 1_000, 251_000], 1: [5, (1 << 64) - 2_000, 48_000]})
    meter = NvmlEnergyMeter(fake)
    assert meter.has_counter == [True, True]
    meter.start()
    joules = meter.stop()
    assert joules == pytest.approx([250.0, 50.0])


def test_missing_counter_falls_back_to_power_sampling():
    fake = FakeNvml(power_mw={0: 300_000.0})  # 300 W, no counter
    meter = NvmlEnergyMeter(fake, sample_s=3600)  # thread will not tick during the test
    assert meter.has_counter == [False]
    meter.start()
    meter.sample_once(2.0)
    meter.sample_once(0.5)
    assert meter.stop() == pytest.approx([750.0])
    assert meter.facts()[0]["name"] == "FakeGPU"


class FakeTask:
    def __init__(self, cpu_kwh, ram_kwh):
        self.cpu_energy, self.ram_energy = cpu_kwh, ram_kwh


class FakeTracker:
    def __init__(self):
        self.calls = []

    def start(self):
        self.calls.append("start")

    def start_task(self, name):
        self.calls.append(name)

    def stop_task(self):
        return FakeTask(1e-3, 5e-4)

    def stop(self):
        self.calls.append("stop")


def test_accountant_windows_exclude_paused_time():
    fake = FakeNvml(counters={0: [0, 0, 100_000, 100_000, 300_000]})
    tracker = FakeTracker()
    acc = EnergyAccountant(nvml=fake, host=HostEnergyMeter(tracker_factory=lambda: tracker))
    acc.resume()
    with acc.paused():  # e.g. evaluation: the 100 J -> 100 J reading pair is skipped entirely
        pass
    totals = acc.close()
    # windows: [0 -> 100_000 mJ] and [100_000 -> 300_000 mJ]
    assert totals.gpu_j == pytest.approx(300.0)
    assert totals.cpu_j == pytest.approx(2 * 3600.0)  # 2 windows x 1e-3 kWh
    assert totals.ram_j == pytest.approx(2 * 1800.0)
    d = totals.as_dict(tokens=1000, pue=1.2, grid_intensity=0.4)
    assert d["j_per_token"] == pytest.approx((300 + 7200 + 3600) / 1000)
    assert d["co2_kg"] == pytest.approx((300 + 7200 + 3600) / 3.6e6 * 1.2 * 0.4)
    assert tracker.calls[0] == "start" and tracker.calls[-1] == "stop"


def test_no_nvml_says_so_and_continues(caplog):
    acc = EnergyAccountant(nvml=None, host=None)
    acc.resume()
    totals = acc.close()
    assert totals.gpu_source == "none" and totals.total_j == 0.0


def test_codecarbon_offline_makes_no_network_connections(monkeypatch):
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled by test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    meter = HostEnergyMeter()
    meter.start()
    sum(i * i for i in range(200_000))
    cpu_j, ram_j = meter.stop()
    meter.close()
    assert attempts == []
    assert cpu_j >= 0.0 and ram_j >= 0.0 and cpu_j + ram_j > 0.0


@pytest.mark.parametrize("pue,grid,field", [(0.9, 0.4, "pue"), (1.2, -1.0, "grid_intensity"), (1.2, 5.0, "grid_intensity")])
def test_bad_grid_inputs_rejected(pue, grid, field):
    with pytest.raises(ConfigError, match=f"^{field}="):
        validate_grid(pue, grid)
