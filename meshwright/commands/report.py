"""`meshwright report RUN_DIR`: a self-contained HTML and a Markdown report of a training run."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write an HTML/Markdown report (plots, plan, predicted vs measured, energy) of a run",
                       description="Read RUN_DIR/log.jsonl, summary.json and plan.yaml; write report.html and report.md.")
    p.add_argument("run_dir", help="directory written by `meshwright train` (holds log.jsonl)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meshwright.tools.report import write_report

    paths = write_report(args.run_dir, args.out)
    print(f"wrote {paths['html']} and {paths['markdown']}")
    return 0
