"""Session 33's robustness sweep of the CLI: help and argument errors without torch, `plan --model DIR` of a
Hugging Face checkpoint directory, and the careless-user inputs that were a traceback or a wrong line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(argv: list[str]) -> tuple[int, str, set[str]]:
    """Run ``python -X importtime -m meshwright.cli ARGV`` in a fresh interpreter: exit code, stderr without the
    import-time lines, and the top-level packages it imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "meshwright.cli", *argv], capture_output=True,
                          text=True, env=env, timeout=120, cwd=ROOT)
    mods, rest = set(), []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:"):
            mods.add(line.rsplit("|", 1)[-1].strip().split(".")[0])
        else:
            rest.append(line)
    return proc.returncode, "\n".join(rest), mods


@pytest.mark.parametrize("argv, rc", [
    (["--help"], 0),
    (["plan", "--help"], 0),
    (["train", "--help"], 0),
    (["export", "--help"], 0),
    (["completion", "bash"], 0),
    (["plan", "--model", "tiny"], 2),                             # argparse: required flags missing
    (["train", "tiny-test", "--bogus"], 2),                       # train's own flag check after the overrides
    (["train", "tiny-test", "steps=abc"], 2),                     # a bad override value
])
def test_help_completion_and_argument_errors_do_not_import_torch(argv, rc):
    """`meshwright --help` imported torch through commands/train.py (build, checkpoint): 6-9 s on this machine."""
    code, err, mods = _imports(argv)
    assert code == rc, err
    assert "torch" not in mods and "transformers" not in mods, sorted(mods)
    if rc == 2:
        assert "Traceback" not in err and err.strip()
