"""Run a benchmark's own workers under torchrun on this host and read back what they measured.

A distributed benchmark re-launches its own file with ``--worker OUT``; rank 0 of the workers writes a JSON there.
One place for that launch, so every such benchmark runs its ranks alike (one thread each, the repo on the path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_workers(script: str, nproc: int, args: list[str], timeout: float = 900, quiet: bool = False) -> Any:
    """``script`` under ``torchrun --standalone --nproc-per-node=nproc`` with ``args`` and ``--worker OUT``; returns
    the JSON its rank 0 wrote to OUT (a temporary file). ``quiet``: the workers' stdout is dropped."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "workers.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(Path(script).resolve()), *args, "--worker", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        subprocess.run(cmd, check=True, timeout=timeout, env=env, cwd=REPO,
                       stdout=subprocess.DEVNULL if quiet else None)
        return json.loads(out.read_text())


def run_one_in_subprocess(script: str, name: str, argv: list[str], timeout: float | None = None,
                          key: str = "name") -> dict[str, Any]:
    """``script --one NAME argv...`` in a fresh interpreter (its own allocator, compile cache and module state): the
    last JSON line it prints, or ``{key: name, "error": ...}`` with its last stderr line (or the timeout). The repo
    goes first on PYTHONPATH, which keeps carried packages (torchao) after it."""
    cmd = [sys.executable, str(script), "--one", name, *argv]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": path})
    except subprocess.TimeoutExpired:
        return {key: name, "error": f"timed out after {timeout:g} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {key: name, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
