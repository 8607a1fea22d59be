"""Run reports: read a run directory (log.jsonl, summary.json, plan.yaml) and write HTML + Markdown.

Both formats come from one model: a list of ``Table`` and ``Figure`` sections, each rendered by
``to_markdown``/``to_html``, so the two cannot drift apart. The HTML is self-contained (plots embedded
as base64 PNG) so it can be mailed or archived; the Markdown links PNG files written beside it.
Plots are drawn only for metrics the run logged with enough points to show a trend (a lone reading
goes to the totals table instead); axes carry units, MFU is in %, throughput is smoothed and marked
with its steady-state value, and estimates (codecarbon's CPU/RAM model) say they are estimates.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from meshwright.config.io import load_yaml, read_text
from meshwright.errors import ConfigError, invalid

MIN_POINTS = 3  # fewer readings than this: a number in the totals table, not a plot


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]
    style: str = "-"  # matplotlib line style
    alpha: float = 1.0


@dataclass
class Figure:
    """One plot: title, labelled axes with units, its series and horizontal reference lines."""

    name: str
    title: str
    ylabel: str
    series: list[Series]
    hlines: list[tuple[float, str]] = field(default_factory=list)
    caption: str = ""
    png: bytes = b""

    def to_markdown(self) -> list[str]:
        out = [f"### {self.title}", "", f"![{self.title}](report_{self.name}.png)"]
        return out + (["", f"*{self.caption}*"] if self.caption else [])

    def to_html(self) -> str:
        cap = f"<figcaption>{html.escape(self.caption)}</figcaption>" if self.caption else ""
        return (f"<figure><h3>{html.escape(self.title)}</h3><img alt='{html.escape(self.title)}' "
                f"src='data:image/png;base64,{base64.b64encode(self.png).decode()}'>{cap}</figure>")


@dataclass
class Table:
    """One table: title, column names, rows of already-formatted cells, and a footnote."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""
    lead: str = ""  # a sentence above the table
    collapsed: bool = False  # HTML <details>: reference material rather than the headline

    def to_markdown(self) -> list[str]:
        esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
        out = [f"## {self.title}", ""] + ([self.lead, ""] if self.lead else [])
        out += ["| " + " | ".join(esc(c) for c in self.columns) + " |", "|" + "---|" * len(self.columns)]
        out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in self.rows]
        return out + (["", f"*{self.note}*"] if self.note else [])

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in self.rows)
        table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        lead = f"<p>{html.escape(self.lead)}</p>" if self.lead else ""
        note = f"<p class='note'>{html.escape(self.note)}</p>" if self.note else ""
        if self.collapsed:
            return f"<details><summary>{html.escape(self.title)}</summary>{lead}{table}{note}</details>"
        return f"<h2>{html.escape(self.title)}</h2>{lead}{table}{note}"


Section = Union[Table, Figure]


# ---- reading -------------------------------------------------------------------------------------

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
                row = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break  # a run killed mid-write leaves a torn last line
                raise ConfigError(f"{log_path}:{i + 1} is not valid JSON; valid: one JSON object per line") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{log_path}:{i + 1} holds {type(row).__name__}; valid: one JSON object per line")
            rows.append(row)
    summary, plan = {}, None
    try:
        if (run / "summary.json").is_file():
            summary = json.loads(read_text(run / "summary.json", "run_dir summary.json"))
        if (run / "plan.yaml").is_file():
            plan = load_yaml(read_text(run / "plan.yaml", "run_dir plan.yaml"))
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"run_dir={str(run)!r} has a malformed summary.json or plan.yaml "
                          f"({str(exc).splitlines()[0]}); valid: files written by `meshwright train`") from None
    for name, value in (("summary.json", summary), ("plan.yaml", plan)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"run_dir={str(run)!r} has a {name} holding {type(value).__name__}; valid: a mapping, "
                              f"as `meshwright train` writes")
    return {"rows": rows, "summary": summary, "plan": plan, "dir": run}


def _series(rows: list[dict[str, Any]], key: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, list):  # per-rank values: plot the max, keep the detail in the table
            v = max(v) if v else None
        if not _number(v) or not _number(r.get("step")):  # hand-edited or foreign records are skipped, not plotted
            continue
        xs.append(r["step"])
        ys.append(v * scale)
    return xs, ys


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def smooth(ys: list[float], window: int = 0) -> list[float]:
    """Trailing moving average (window ~ a tenth of the run, at least 3 readings)."""
    w = window or max(3, len(ys) // 10)
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= w:
            acc -= ys[i - w]
        out.append(acc / min(i + 1, w))
    return out


# ---- sections ------------------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.3g}%"


def figures(rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[Figure]:
    """The plots this run's log supports (each needs MIN_POINTS readings)."""
    out: list[Figure] = []

    def add(name: str, title: str, ylabel: str, series: list[Series], **kw: Any) -> None:
        series = [s for s in series if len(s.xs) >= MIN_POINTS]
        if series and len(series[0].xs) >= MIN_POINTS:
            out.append(Figure(name, title, ylabel, series, **kw))

    loss = loss_figure(rows)
    if loss is not None:
        out.append(loss)
    xs, tps = _series(rows, "tokens_per_s")
    steady = summary.get("tokens_per_s")
    add("throughput", "Throughput", "tokens/s (all devices)",
        [Series("per log interval", xs, tps, alpha=0.35), Series("smoothed (moving average)", xs, smooth(tps))],
        hlines=[(steady, f"steady state {_fmt(steady)} tokens/s")] if steady else [],
        caption="steady state = tokens/s over the steps after warm-up, as in the totals table")
    mfu, hfu = _series(rows, "mfu", 100), _series(rows, "hfu", 100)
    same = hfu[1] == mfu[1]
    add("mfu", "Model FLOPs utilisation", "% of peak FLOP/s",
        [Series("MFU = HFU (no recomputation)" if same else "MFU", *mfu)] + ([] if same else [Series("HFU", *hfu, style="--")]),
        caption="HFU counts recomputed FLOPs too; it equals MFU without recomputation")
    add("lr", "Learning rate", "learning rate", [Series("lr", *_series(rows, "lr"))])
    add("grad_norm", "Gradient norm", "global L2 norm (before clipping)", [Series("grad norm", *_series(rows, "grad_norm"))])
    add("power", "Power", "W (all metered devices)", [Series("power", *_series(rows, "power_w"))],
        caption=_energy_caption(summary))
    add("energy", "Cumulative energy", "kJ", [Series("energy", *_series(rows, "energy_j", 1e-3))],
        caption=_energy_caption(summary))
    add("memory", "Memory", "GiB (max over ranks)",
        [Series("allocated", *_series(rows, "memory_gib")), Series("peak", *_series(rows, "peak_memory_gib"), style="--")])
    return out


def seq_len_segments(rows: list[dict[str, Any]]) -> list[tuple[Any, list[dict[str, Any]]]]:
    """The log cut where ``seq_len`` changes (a resume with --allow-config-change): [(seq_len, rows), ...] in step
    order. One segment when it never changed, or when no record says (logs from before the field)."""
    known = {r.get("seq_len") for r in rows if _number(r.get("seq_len"))}
    if len(known) < 2:
        return [(next(iter(known), None), rows)]
    out: list[tuple[Any, list[dict[str, Any]]]] = []
    for r in rows:
        key = r.get("seq_len") if _number(r.get("seq_len")) else None
        if not out or out[-1][0] != key:
            out.append((key, []))
        out[-1][1].append(r)
    return out


def loss_figure(rows: list[dict[str, Any]]) -> Optional[Figure]:
    """Train and eval loss; one pair of series per ``seq_len`` when a resume changed it: a loss per token at another
    context length is not the same quantity (longer contexts predict better), so the lines are not joined."""
    segments = seq_len_segments(rows)
    if len(_series(rows, "loss")[0]) < MIN_POINTS:
        return None
    if len(segments) == 1:
        return Figure("loss", "Loss", "cross-entropy (nats/token)",
                      [Series("train loss", *_series(rows, "loss"))]
                      + [Series("eval loss", *ev, style="o-") for ev in [_series(rows, "eval_loss")] if ev[0]])
    series = []
    for seq_len, part in segments:
        tag = f"seq_len {seq_len}" if seq_len is not None else "seq_len not logged"
        train, ev = _series(part, "loss"), _series(part, "eval_loss")
        if train[0]:
            series.append(Series(f"train loss ({tag})", *train))
        if ev[0]:
            series.append(Series(f"eval loss ({tag})", *ev, style="o-"))
    changes = ", ".join(f"{a} -> {b} at step {part[0].get('step')}"
                        for (a, _), (b, part) in zip(segments, segments[1:]))
    return Figure("loss", "Loss", "cross-entropy (nats/token)", series,
                  caption=f"seq_len changed ({changes}): losses at different sequence lengths are separate series, "
                          f"not comparable across the change")


def _energy_caption(summary: dict[str, Any]) -> str:
    src = summary.get("energy_gpu_source", "none")
    if src in (None, "none"):
        return "no GPU metered: CPU and RAM energy are codecarbon estimates"
    return f"GPU energy measured ({src}); CPU and RAM parts are codecarbon estimates"


def render_plots(figs: list[Figure]) -> None:
    """Draw each figure into its ``png`` (matplotlib is imported here: an optional, heavy dependency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for f in figs:
        fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=110)
        for s in f.series:
            marker = "o" if len(s.xs) < 30 or "o" in s.style else None
            ax.plot(s.xs, s.ys, s.style.replace("o", "") or "-", marker=marker, markersize=3, label=s.label, alpha=s.alpha)
        for y, label in f.hlines:
            ax.axhline(y, color="grey", linestyle=":", linewidth=1.2, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f.ylabel)
        ax.grid(alpha=0.3)
        if f.name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if len(f.series) + len(f.hlines) > 1 or f.series[0].label.startswith("MFU"):
            ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        f.png = buf.getvalue()


def totals_table(summary: dict[str, Any]) -> Table:
    """The headline figures, curated and in units; every field remains in the collapsed 'all fields' table."""
    s = summary
    rows: list[list[str]] = []

    def row(label: str, value: Any, note: str = "", fmt: Callable[[Any], str] = _fmt) -> None:
        if value is not None:
            rows.append([label, fmt(value), note])

    row("model", s.get("model"), f"{s['params'] / 1e6:,.2f}M parameters" if s.get("params") else "")
    row("devices", s.get("world_size"), f"data-parallel {s['dp_size']}" if s.get("dp_size") else "")
    row("steps", s.get("steps"), f"{s['tokens']:,} tokens" if s.get("tokens") else "")
    row("throughput (tokens/s)", s.get("tokens_per_s"), "steady state: steps after warm-up")
    row("tokens/s per device", s.get("tokens_per_s_per_device"))
    row("step time (s)", s.get("step_s"))
    peak = s.get("peak_tflops_per_device")
    row("MFU", s.get("mfu"), f"of {peak:g} TFLOP/s {s.get('dtype', '')} peak per device" if peak else "", _pct)
    if s.get("mfu_full") is not None:  # a LoRA run: MFU above counts its step's FLOPs (~4N); this, full training's 6N
        row("MFU on full training's FLOPs", s.get("mfu_full"), "LoRA: the MFU above counts the FLOPs its step runs", _pct)
    if s.get("hfu") is not None and s.get("hfu") != s.get("mfu"):
        row("HFU", s.get("hfu"), "counts recomputed FLOPs", _pct)
    row("TFLOP/s per device", s.get("tflops_per_device"))
    if s.get("first_loss") is not None and s.get("final_loss") is not None:
        rows.append(["loss", f"{s['first_loss']:.4g} -> {s['final_loss']:.4g}", "first -> last training step"])
    row("eval loss", s.get("eval_loss"), f"at seq_len {s['seq_len']}" if s.get("seq_len") else "")
    if s.get("peak_reserved_gib") is not None:  # a GPU run: the caching allocator's figures
        row("peak memory (GiB)", s.get("peak_memory_gib"), "max over ranks, torch.cuda.max_memory_allocated")
        row("peak reserved (GiB)", s["peak_reserved_gib"], "max over ranks, torch.cuda.max_memory_reserved")
    else:
        row("peak memory (GiB)", s.get("peak_memory_gib"), "max over ranks, process peak incl. framework")
    if s.get("energy_j") is not None:
        gpu_src = s.get("energy_gpu_source") or "none"
        row("energy (kJ)", s["energy_j"] / 1e3, "GPU measured + CPU/RAM estimated" if gpu_src != "none"
            else "estimate: no GPU metered, codecarbon CPU/RAM model")
        row("energy: GPU (kJ)", s.get("gpu_j", 0) / 1e3 if gpu_src != "none" else None, f"measured ({gpu_src})")
        row("energy: CPU (kJ)", (s.get("cpu_j") or 0) / 1e3, "estimate (codecarbon)")
        row("energy: RAM (kJ)", (s.get("ram_j") or 0) / 1e3, "estimate (codecarbon)")
        row("energy per token (mJ)", None if s.get("j_per_token") is None else s["j_per_token"] * 1e3)
        row("CO2 (g)", None if s.get("co2_kg") is None else s["co2_kg"] * 1e3,
            f"at {s.get('grid_intensity')} kg/kWh, PUE {s.get('pue')}")
    return Table("Totals", ["metric", "value", "note"], rows)


def predicted_vs_measured(summary: dict[str, Any], plan: dict[str, Any] | None) -> list[tuple[str, Any, Any]]:
    """Rows where both the plan's prediction and the run's measurement exist (nothing to compare otherwise)."""
    pred = (plan or {}).get("predicted") or {}
    pred = pred if isinstance(pred, dict) else {}  # a hand-edited plan.yaml: non-numbers are skipped, as in the log
    rows = []
    breakdown = pred.get("breakdown") if isinstance(pred.get("breakdown"), dict) else {}
    if summary.get("peak_reserved_gib") is not None:  # a GPU run: what the cost model predicts the allocator reserves
        memory = ("memory reserved (GiB, max rank: torch.cuda.max_memory_reserved)",
                  breakdown.get("mem_reserved_gib"), summary.get("peak_reserved_gib"))
    else:  # CPU: the process's peak RSS against the whole prediction (framework overhead included)
        memory = ("memory (GiB, max rank; measured = process peak incl. framework)", pred.get("memory_gib"),
                  summary.get("peak_memory_gib"))
    for label, p, m in [("step time (s)", pred.get("step_s"), summary.get("step_s")),
                        ("tokens/s", pred.get("tokens_per_s"), summary.get("tokens_per_s")),
                        ("MFU", pred.get("mfu"), summary.get("mfu")), memory]:
        if isinstance(p, list):
            p = max((v for v in p if _number(v)), default=None)
        if isinstance(m, list):
            m = max((v for v in m if _number(v)), default=None)
        if _number(p) and _number(m):
            rows.append((label, p, m))
    return rows


def pvm_table(summary: dict[str, Any], plan: dict[str, Any] | None) -> Optional[Table]:
    rows = []
    for label, p, m in predicted_vs_measured(summary, plan):
        err = f"{(m - p) / p:+.1%}" if isinstance(p, (int, float)) and isinstance(m, (int, float)) and p else "n/a"
        fmt = _pct if label == "MFU" else _fmt
        rows.append([label, fmt(p), fmt(m), err])
    return Table("Predicted vs measured", ["quantity", "predicted", "measured", "error"], rows,
                 note="error = (measured - predicted) / predicted") if rows else None


def _strategy(s: dict[str, Any]) -> str:
    out = f"tp{s.get('tp', 1)}{'+sp' if s.get('sp') else ''} dp{s.get('dp', 1)} ZeRO-{s.get('zero', 0)}"
    if s.get("dp_shard"):
        out += f" (HSDP {s['dp_shard']})"
    if s.get("ep", 1) > 1:
        out += f" ep{s['ep']}"
    out += f", recompute {s.get('recompute', 'none')}"
    sv = s.get("savers") or {}
    on = [k for k, v in sv.items() if v]
    return out + (f", savers {'+'.join(on)}" if on else "")


def plan_table(plan: dict[str, Any]) -> Optional[Table]:
    """The plan as one row per pipeline stage and strategy run: layers, strategy, predicted memory."""
    layers: list[dict[str, Any]] = []
    for entry in plan.get("layers") or []:
        layers += [entry] * int(entry.get("repeat", 1))
    if not layers:
        return None
    pl = plan.get("pipeline") or {}
    degree, v = int(pl.get("degree", 1)), int(pl.get("virtual_stages", 1))
    n = len(layers)
    stages = pl.get("stages") or []
    if not stages:
        k = degree * v
        base, extra = divmod(n, k)
        bounds, start = [], 0
        for i in range(k):
            end = start + base + (1 if i < extra else 0)
            bounds.append([start, end])
            start = end
        stages = bounds
    pred = plan.get("predicted") if isinstance(plan.get("predicted"), dict) else {}
    mem = pred.get("memory_gib") if isinstance(pred.get("memory_gib"), list) else []
    mem = [m if _number(m) else None for m in mem]
    rows = []
    for r in range(degree):
        first = True
        for j, (a, b) in enumerate(stages):
            if j % degree != r:
                continue
            i = a
            while i < b:
                k = i
                while k + 1 < b and _strategy(layers[k + 1]) == _strategy(layers[i]):
                    k += 1
                gib = mem[r] if first and r < len(mem) else None
                rows.append([str(r) if first else "", f"{i}-{k}" if k > i else str(i), str(k - i + 1),
                             _strategy(layers[i]), "" if gib is None else f"{gib:.2f}"])
                first = False
                i = k + 1
    lead = (f"{degree} pipeline stages, {pl.get('schedule', '1f1b')}"
            + (f" with {v} virtual stages per rank" if v > 1 else "")
            + f", {pl.get('microbatches', 1)} microbatches of {plan.get('micro_batch')}; seq {plan.get('seq_len')}, "
            f"global batch {plan.get('global_batch')}") if degree > 1 else (
        f"no pipeline; micro-batch {plan.get('micro_batch')}, seq {plan.get('seq_len')}, global batch {plan.get('global_batch')}")
    return Table("Plan", ["stage", "layers", "count", "strategy", "predicted memory (GiB)"], rows, lead=lead)


def build_sections(run: dict[str, Any]) -> list[Section]:
    """The report's content, in reading order (rendered identically to Markdown and HTML)."""
    summary, plan, rows = run["summary"], run["plan"], run["rows"]
    sections: list[Section] = []
    if summary:
        sections.append(totals_table(summary))
    pvm = pvm_table(summary, plan)
    if pvm:
        sections.append(pvm)
    figs = figures(rows, summary)
    render_plots(figs)
    sections += figs
    if plan:
        pt = plan_table(plan)
        if pt:
            sections.append(pt)
    if summary:
        sections.append(Table("All summary fields", ["field", "value"], [[k, _fmt(v)] for k, v in summary.items()],
                              collapsed=True))
    return sections


CSS = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222;padding:0 1em}"
       "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 10px;text-align:left}"
       "th{background:#f3f3f3}img{max-width:100%}figure{display:inline-block;width:48%;margin:.5%;vertical-align:top}"
       "figure h3{font-size:1em;margin:.2em 0}figcaption,.note{font-size:.85em;color:#555}details{margin:1em 0}")


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.html and report.md (+ PNGs) for a run; returns their paths."""
    run = read_run(run_dir)
    out = Path(out_dir) if out_dir else run["dir"]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise invalid("--out", str(out), f"a writable directory ({exc.strerror or exc})") from None
    sections = build_sections(run)
    title = f"meshwright run report: {run['dir'].name}"
    md = [f"# {title}", ""]
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
         f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    figs = [s for s in sections if isinstance(s, Figure)]
    for s in sections:
        if isinstance(s, Figure) and s is figs[0]:
            md += ["## Plots", ""]
            h.append("<h2>Plots</h2>")
        if isinstance(s, Figure):
            (out / f"report_{s.name}.png").write_bytes(s.png)
        md += s.to_markdown() + [""]
        h.append(s.to_html())
    h.append("</body></html>")
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text("\n".join(md))
    html_path.write_text("\n".join(h))
    return {"html": html_path, "markdown": md_path, **{f"plot_{f.name}": out / f"report_{f.name}.png" for f in figs}}
