"""Capacity arithmetic on a hand case, and report generation from a recorded run."""

import json

import pytest

from meshwright.config import load_cluster
from meshwright.errors import ConfigError
from meshwright.launcher.planner.capacity import capacity_plan, parse_tokens
from meshwright.tools.report import write_report


def test_capacity_hand_case():
    cluster = load_cluster("dgx-a100-80g", nodes=2)  # 16 x A100: TDP 400 W, idle 60 W, host 3300 W/node
    cap = capacity_plan(cluster, tokens_per_s=100_000, train_tokens=8.64e9, utilisation=0.5,
                        pue=1.2, grid_intensity=0.4, price_per_device_hour=2.0)
    # 8.64e9 / 1e5 = 86,400 s = 1 day = 24 h; 16 devices -> 384 device-hours
    assert cap.days == pytest.approx(1.0)
    assert cap.device_hours == pytest.approx(384.0)
    # device power 60 + 0.5 x 340 = 230 W; IT power 16 x 230 + 2 x 3300 = 10,280 W -> 246.72 kWh; x 1.2 PUE
    assert cap.power_w_per_device == pytest.approx(230.0)
    assert cap.energy_mwh == pytest.approx(10_280 * 24 * 1.2 / 1e6)
    assert cap.tco2e == pytest.approx(cap.energy_mwh * 0.4)
    assert cap.cost_usd == pytest.approx(768.0)
    half = capacity_plan(cluster, tokens_per_s=100_000, train_tokens=8.64e9, goodput=0.5)
    assert half.days == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="^goodput=0"):
        capacity_plan(cluster, tokens_per_s=100_000, train_tokens=8.64e9, goodput=0)


def test_token_parsing_and_errors():
    assert parse_tokens("2T") == 2e12 and parse_tokens("300B") == 3e11 and parse_tokens("1.5e12") == 1.5e12
    with pytest.raises(ConfigError, match="train_tokens='lots'"):
        parse_tokens("lots")
    cluster = load_cluster("dgx-h100-80g")
    with pytest.raises(ConfigError, match="^pue="):
        capacity_plan(cluster, 1e5, 1e9, pue=0.5)
    with pytest.raises(ConfigError, match="^grid_intensity="):
        capacity_plan(cluster, 1e5, 1e9, grid_intensity=-0.1)


def test_report_from_recorded_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 5.0 - 0.1 * s, "tokens_per_s": 1000 + s, "mfu": 0.1, "power_w": 50.0,
             "energy_j": 10.0 * s, "memory_gib": [1.0, 1.1]} for s in range(1, 11)]
    rows[-1]["eval_loss"] = 4.2
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run / "summary.json").write_text(json.dumps({"tokens_per_s": 1005.0, "step_s": 0.5, "mfu": 0.1}))
    (run / "plan.yaml").write_text("version: 1\nmodel: tiny\npredicted: {step_s: 0.4, tokens_per_s: 1200.0}\n")
    paths = write_report(run)
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 6  # loss, throughput, mfu, power, energy, memory
    md = paths["markdown"].read_text()
    assert "| step time (s) | 0.4 | 0.5 | +25.0% |" in md
    for name in ("loss", "throughput", "mfu", "power", "energy", "memory"):
        assert paths[f"plot_{name}"].read_bytes()[:4] == b"\x89PNG"


def test_report_rejects_missing_run(tmp_path):
    with pytest.raises(ConfigError, match="has no log.jsonl"):
        write_report(tmp_path)


def test_plan_cli_capacity_section(capsys):
    from meshwright.cli import main

    args = ["plan", "--model", "gpt2-small", "--cluster", "dgx-a100-80g", "--nodes", "1", "--seq-len", "1024",
            "--global-batch", "64", "--json", "--train-tokens", "10B", "--pue", "1.2", "--grid-intensity", "0.4",
            "--price-per-device-hour", "2.5"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    cap, pred = out["capacity"], out["predicted"]
    days = 1e10 / pred["tokens_per_s"] / 86400
    assert cap["days"] == pytest.approx(days, rel=1e-5)
    assert cap["device_hours"] == pytest.approx(days * 24 * 8, rel=1e-5)
    assert cap["cost_usd"] == pytest.approx(cap["device_hours"] * 2.5, rel=1e-5)
    assert cap["tco2e"] == pytest.approx(cap["energy_mwh"] * 0.4, rel=1e-5)
    assert set(cap) >= {"days", "device_hours", "energy_mwh", "tco2e", "cost_usd"}
    assert main(args[:-6] + ["--train-tokens", "10B", "--pue", "0.5"]) == 2
    assert "pue=0.5 is invalid" in capsys.readouterr().err


def test_power_basis_tdp_reproduces_the_llama2_model_card_by_hand():
    """Llama 2 70B card: 1,720,320 A100-80GB GPU-hours at 400 W (TDP), 291.42 tCO2eq. power_basis=tdp counts
    device-hours x TDP only, so the card's energy (688.1 MWh) and its implied grid intensity come back."""
    from meshwright.launcher.planner.capacity import power_per_device_w

    cluster = load_cluster("dgx-a100-80g", nodes=2)
    hours = 1_720_320 / 16
    tokens_per_s = 1e6
    train = tokens_per_s * hours * 3600
    cap = capacity_plan(cluster, tokens_per_s, train, utilisation=0.3, pue=1.0, grid_intensity=291.42 / 688.128,
                        power_basis="tdp")
    assert cap.device_hours == pytest.approx(1_720_320)
    assert cap.energy_mwh == pytest.approx(1_720_320 * 400 / 1e6)
    assert cap.tco2e == pytest.approx(291.42)
    node = capacity_plan(cluster, tokens_per_s, train, utilisation=0.3, pue=1.0, power_basis="node")
    assert node.energy_mwh != cap.energy_mwh  # idle..TDP by utilisation + host power
    meas = capacity_plan(cluster, tokens_per_s, train, pue=1.0, power_basis="measured", measured_power_w=350.0)
    assert meas.energy_mwh == pytest.approx(1_720_320 * 350 / 1e6)
    with pytest.raises(ConfigError, match="measured_power_w"):
        capacity_plan(cluster, tokens_per_s, train, power_basis="measured")
    with pytest.raises(ConfigError, match="power_basis"):
        power_per_device_w(cluster, 0.5, "wall")
