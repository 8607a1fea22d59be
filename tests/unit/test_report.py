"""Run reports people read: one table model behind Markdown and HTML, units and %, smoothed throughput,
lr and grad-norm plots, estimates marked, no empty predicted-vs-measured rows, the plan per stage; and
the HTML rendered in a real headless browser (skipped where chromium is absent)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from meshwright.tools.report import Table, plan_table, smooth, write_report


def _run_dir(tmp_path, n=40, energy_every=4, plan=True):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    rows = []
    for s in range(1, n + 1):
        r = {"step": s, "loss": 5.0 / s ** 0.3, "lr": 1e-3 * min(1, s / 5), "grad_norm": 2.0 / s ** 0.5,
             "tokens_per_s": 1000.0 + (150 if s % 2 else -150), "mfu": 0.0118, "hfu": 0.0118, "memory_gib": [1.0, 1.2]}
        if s % energy_every == 0:
            r.update({"power_w": 50.0 + s, "energy_j": 100.0 * s})
        rows.append(r)
    rows[-1]["eval_loss"] = 3.1
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = {"model": "tiny", "params": 850000, "steps": n, "tokens": n * 512, "world_size": 2, "dp_size": 2,
               "tokens_per_s": 1001.0, "tokens_per_s_per_device": 500.5, "step_s": 0.5, "mfu": 0.0118, "hfu": 0.0118,
               "peak_tflops_per_device": 0.16, "dtype": "fp32", "first_loss": 5.0, "final_loss": 1.5, "eval_loss": 3.1,
               "peak_memory_gib": 1.2, "energy_j": 4000.0, "gpu_j": 0.0, "cpu_j": 450.0, "ram_j": 3550.0,
               "energy_gpu_source": "none", "j_per_token": 0.2, "co2_kg": 0.0004, "pue": 1.0, "grid_intensity": 0.385}
    (run / "summary.json").write_text(json.dumps(summary))
    if plan:
        (run / "plan.yaml").write_text(
            "version: 1\nmodel: tiny\nseq_len: 64\nglobal_batch: 8\nmicro_batch: 1\n"
            "pipeline: {degree: 2, schedule: 1f1b, microbatches: 4, stages: [[0, 1], [1, 4]]}\n"
            "layers: [{tp: 1, dp: 1, zero: 0, recompute: full, repeat: 1}, {tp: 1, dp: 1, zero: 0, recompute: none, repeat: 3}]\n"
            "predicted: {step_s: 0.4, tokens_per_s: 1250.0, memory_gib: [0.5, 0.7]}\n")
    return run


def test_markdown_and_html_come_from_one_table_model(tmp_path):
    paths = write_report(_run_dir(tmp_path))
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    # same tables, same columns: the HTML keeps the error column the old renderer dropped
    md_heads = re.findall(r"^## (.+)$", md, re.M)
    html_heads = re.findall(r"<h2>(.+?)</h2>", page) + re.findall(r"<summary>(.+?)</summary>", page)
    assert [h for h in md_heads if h != "Plots"] == [h for h in html_heads if h != "Plots"]
    assert "<th>error</th>" in page and "| quantity | predicted | measured | error |" in md
    assert "| step time (s) | 0.4 | 0.5 | +25.0% |" in md and "<td>+25.0%</td>" in page
    # curated totals: MFU in %, energy marked as an estimate, the raw dump last and collapsed
    assert "| MFU | 1.18% |" in md and "<td>1.18%</td>" in page
    assert "estimate: no GPU metered" in md and "| energy: CPU (kJ) | 0.45 | estimate (codecarbon) |" in md
    assert md.index("## Totals") < md.index("## All summary fields") and "<details><summary>All summary fields" in page


def test_plots_cover_lr_grad_norm_and_skip_lone_readings(tmp_path):
    paths = write_report(_run_dir(tmp_path, n=40))
    assert {k[5:] for k in paths if k.startswith("plot_")} == {
        "loss", "throughput", "mfu", "lr", "grad_norm", "power", "energy", "memory"}
    short = write_report(_run_dir(tmp_path / "short", n=6, energy_every=4))  # one energy reading
    assert "plot_power" not in short and "plot_energy" not in short and "plot_lr" in short


def test_smoothing_and_steady_state():
    assert smooth([1.0, 3.0, 1.0, 3.0, 1.0, 3.0], window=2) == [1.0, 2.0, 2.0, 2.0, 2.0, 2.0]


def test_predicted_vs_measured_has_no_empty_rows(tmp_path):
    md = write_report(_run_dir(tmp_path, plan=False))["markdown"].read_text()
    assert "Predicted vs measured" not in md and "None" not in md


def test_a_gpu_runs_memory_is_compared_with_what_the_allocator_reserves(tmp_path):
    """On a GPU the run's peak is the caching allocator's (max_memory_allocated, max_memory_reserved) and the plan's
    total adds the CUDA context and fragmentation, so the report compares the predicted reserve (the breakdown's
    ``mem_reserved_gib``, largest rank) with ``max_memory_reserved``; on CPU, the process peak with the total."""
    from meshwright.tools.report import predicted_vs_measured

    plan = {"predicted": {"step_s": 1.0, "memory_gib": [70.2, 75.0],
                          "breakdown": {"mem_reserved_gib": 73.5, "mem_overhead_gib": 1.0}}}
    cpu = {"step_s": 1.1, "peak_memory_gib": 76.0}
    gpu = {**cpu, "peak_memory_gib": 69.0, "peak_reserved_gib": 74.1}
    assert [r[0].split(" (")[0] for r in predicted_vs_measured(cpu, plan)] == ["step time", "memory"]
    assert predicted_vs_measured(cpu, plan)[1][1:] == (75.0, 76.0)
    assert predicted_vs_measured(gpu, plan)[1] == ("memory reserved (GiB, max rank: torch.cuda.max_memory_reserved)",
                                                   73.5, 74.1)
    assert len(predicted_vs_measured(gpu, {"predicted": {"step_s": 1.0, "memory_gib": 75.0}})) == 1  # no breakdown
    run = _run_dir(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "peak_reserved_gib": 1.3}))
    md = write_report(run)["markdown"].read_text()
    assert "| peak reserved (GiB) | 1.3 | max over ranks, torch.cuda.max_memory_reserved |" in md
    assert "torch.cuda.max_memory_allocated" in md and "process peak" not in md


def test_plan_per_stage_table(tmp_path):
    import yaml

    plan = yaml.safe_load((_run_dir(tmp_path) / "plan.yaml").read_text())
    t = plan_table(plan)
    assert t.rows == [["0", "0", "1", "tp1 dp1 ZeRO-0, recompute full", "0.50"],
                      ["1", "1-3", "3", "tp1 dp1 ZeRO-0, recompute none", "0.70"]]
    assert "2 pipeline stages, 1f1b" in t.lead


def test_table_escapes_cells():
    t = Table("T", ["a", "b"], [["x|y", "<b>"]])
    assert "x\\|y" in "\n".join(t.to_markdown()) and "&lt;b&gt;" in t.to_html()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless chromium (apt-get install -y chromium)")
def test_report_renders_in_a_headless_browser(tmp_path):
    """Screenshot of report.html in chromium: the page renders, with its plots, to a non-blank image."""
    import matplotlib.image as mpimg

    paths = write_report(_run_dir(tmp_path))
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,2600", f"--screenshot={shot}", paths["html"].as_uri()],
                   check=True, capture_output=True, timeout=120)
    img = mpimg.imread(shot)
    assert img.shape[:2] == (2600, 1200)
    ink = (img[..., :3].mean(axis=2) < 0.9).mean()  # share of non-white pixels: tables, text and plots
    assert ink > 0.02
