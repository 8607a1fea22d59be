"""Render `meshwright report RUN_DIR` in headless chromium and save a screenshot (to look at the report
as a reader sees it). Usage: python benchmarks/report_screenshot.py RUN_DIR [OUT.png] [--height PX]"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from meshwright.tools.report import write_report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("out", nargs="?", default=None, help="PNG path (default RUN_DIR/report_screenshot.png)")
    p.add_argument("--height", type=int, default=3000)
    a = p.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("no chromium found: apt-get install -y chromium", file=sys.stderr)
        return 1
    paths = write_report(a.run_dir)
    out = Path(a.out or Path(a.run_dir) / "report_screenshot.png").resolve()
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1200,{a.height}", f"--screenshot={out}", paths["html"].resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
