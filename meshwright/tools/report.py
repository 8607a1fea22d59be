"""Run reports: read a run directory (log.jsonl, summary.json, plan.yaml) and write HTML + Markdown.

The HTML is self-contained (plots embedded as base64 PNG) so it can be mailed or archived; the
Markdown links PNG files written beside it. Plots are drawn only for metrics the run logged.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import yaml

from meshwright.config.io import read_text
from meshwright.errors import ConfigError

PLOTS: list[tuple[str, str, list[str]]] = [
    ("loss", "Loss", ["loss", "eval_loss"]),
    ("throughput", "Tokens/s", ["tokens_per_s"]),
    ("mfu", "MFU / HFU", ["mfu", "hfu"]),
    ("power", "Power (W)", ["power_w"]),
    ("energy", "Cumulative energy (J)", ["energy_j"]),
    ("memory", "Memory per rank (GiB)", ["memory_gib", "peak_memory_gib"]),
]


def read_run(run_dir: str | Path) -> dict[str, Any]:
    run = Path(run_dir)
    log_path = run / "log.jsonl"
    if not log_path.is_file():
        raise ConfigError(f"run_dir={str(run)!r} has no log.jsonl; valid: a directory written by `meshwright train`")
    rows = []
    lines = read_text(log_path, "run_dir log.jsonl").splitlines()
    for i, line in enumerate(lines):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break  # a run killed mid-write leaves a torn last line
                raise ConfigError(f"{log_path}:{i + 1} is not valid JSON; valid: one JSON object per line") from None
    summary, plan = {}, None
    try:
        if (run / "summary.json").is_file():
            summary = json.loads(read_text(run / "summary.json", "run_dir summary.json"))
        if (run / "plan.yaml").is_file():
            plan = yaml.safe_load(read_text(run / "plan.yaml", "run_dir plan.yaml"))
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"run_dir={str(run)!r} has a malformed summary.json or plan.yaml "
                          f"({str(exc).splitlines()[0]}); valid: files written by `meshwright train`") from None
    return {"rows": rows, "summary": summary, "plan": plan, "dir": run}


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[Any]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if v is None or "step" not in r:
            continue
        if isinstance(v, list):  # per-rank values: plot the max, keep the detail in the table
            v = max(v) if v else None
            if v is None:
                continue
        xs.append(r["step"])
        ys.append(v)
    return xs, ys


def render_plots(rows: list[dict[str, Any]]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    for name, title, keys in PLOTS:
        series = {k: _series(rows, k) for k in keys}
        series = {k: v for k, v in series.items() if v[0]}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        for k, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=k)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        out[name] = buf.getvalue()
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def predicted_vs_measured(summary: dict[str, Any], plan: dict[str, Any] | None) -> list[tuple[str, Any, Any]]:
    pred = (plan or {}).get("predicted") or {}
    rows = []
    for label, pkey, mkey in [("step time (s)", "step_s", "step_s"), ("tokens/s", "tokens_per_s", "tokens_per_s"),
                              ("MFU", "mfu", "mfu"), ("memory (GiB, max rank; measured = process peak incl. framework)", "memory_gib", "peak_memory_gib")]:
        p, m = pred.get(pkey), summary.get(mkey)
        if isinstance(p, list):
            p = max(p) if p else None
        if isinstance(m, list):
            m = max(m) if m else None
        if p is not None or m is not None:
            rows.append((label, p, m))
    return rows


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.html and report.md (+ PNGs) for a run; returns their paths."""
    run = read_run(run_dir)
    out = Path(out_dir) if out_dir else run["dir"]
    out.mkdir(parents=True, exist_ok=True)
    plots = render_plots(run["rows"])
    summary, plan = run["summary"], run["plan"]
    pvm = predicted_vs_measured(summary, plan)
    title = f"meshwright run report: {run['dir'].name}"

    md = [f"# {title}", "", "## Totals", "", "| metric | value |", "|---|---|"]
    md += [f"| {k} | {_fmt(v)} |" for k, v in summary.items()]
    if pvm:
        md += ["", "## Predicted vs measured", "", "| quantity | predicted | measured | error |", "|---|---|---|---|"]
        for label, p, m in pvm:
            err = f"{(m - p) / p:+.1%}" if isinstance(p, (int, float)) and isinstance(m, (int, float)) and p else "n/a"
            md.append(f"| {label} | {_fmt(p)} | {_fmt(m)} | {err} |")
    md += ["", "## Plots", ""]
    for name in plots:
        (out / f"report_{name}.png").write_bytes(plots[name])
        md.append(f"![{name}](report_{name}.png)")
    if plan is not None:
        md += ["", "## Plan", "", "```yaml", yaml.safe_dump(plan, sort_keys=False).rstrip(), "```"]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n")

    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
         "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}</style></head><body>",
         f"<h1>{html.escape(title)}</h1><h2>Totals</h2><table>"]
    h += [f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in summary.items()]
    h.append("</table>")
    if pvm:
        h.append("<h2>Predicted vs measured</h2><table><tr><th>quantity</th><th>predicted</th><th>measured</th></tr>")
        h += [f"<tr><td>{html.escape(l)}</td><td>{html.escape(_fmt(p))}</td><td>{html.escape(_fmt(m))}</td></tr>" for l, p, m in pvm]
        h.append("</table>")
    h.append("<h2>Plots</h2>")
    for name, png in plots.items():
        h.append(f"<h3>{name}</h3><img alt='{name}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    if plan is not None:
        h.append(f"<h2>Plan</h2><pre>{html.escape(yaml.safe_dump(plan, sort_keys=False))}</pre>")
    h.append("</body></html>")
    html_path = out / "report.html"
    html_path.write_text("\n".join(h))
    return {"html": html_path, "markdown": md_path, **{f"plot_{k}": out / f"report_{k}.png" for k in plots}}
