"""A real training run carries its accounting end to end: energy windows, HFU, memory, report."""

import json

from meshwright.cli import main
from meshwright.train.build import run_training
from meshwright.config import load_train_config


def test_training_logs_energy_hfu_memory_and_reports(tmp_path):
    out = tmp_path / "run"
    cfg = load_train_config("tiny-test", {"out_dir": str(out), "energy": True, "energy_every": 4, "log_every": 2,
                                          "steps": 12, "progress": False})
    summary = run_training(cfg, plan_ref="auto")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    energy_rows = [r for r in rows if "energy_j" in r]
    assert [r["step"] for r in energy_rows] == [4, 8, 12]  # every energy_every steps, same on every rank
    joules = [r["energy_j"] for r in energy_rows]
    assert joules == sorted(joules) and joules[0] > 0  # cumulative, measured (codecarbon CPU+RAM here)
    assert all(r["power_w"] > 0 for r in energy_rows)
    assert all(isinstance(r["memory_gib"], list) and r["memory_gib"][0] > 0 for r in rows)
    assert all(r["hfu"] >= r["mfu"] > 0 for r in rows)
    assert summary["energy_j"] >= joules[-1] * 0.5 and summary["j_per_token"] > 0
    assert summary["co2_kg"] == summary["kwh"] * cfg.grid_intensity
    assert summary["energy_gpu_source"] == "none"  # no NVML on this machine: said once, then skipped
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    for title in ("Loss", "Throughput", "Model FLOPs utilisation", "Power", "Cumulative energy", "Memory"):
        assert f"<h3>{title}</h3>" in html
    assert "Predicted vs measured" in html  # plan auto wrote the plan with its predictions
