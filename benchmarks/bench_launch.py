"""Launch overhead and recovery: time from the command to the first training step, and after a SIGKILL.

Side by side in one run, on this machine only (127.0.0.1/127.0.0.2 as two "nodes", a throw-away sshd):
  * plain ``torchrun`` (1 node x 2 ranks; 2 local torchruns x 1 rank)  vs  ``meshwright launch`` over SSH
    with the same layout;
  * recovery: SIGKILL rank 1 right after checkpoint step 4 under ``--max-restarts 1``; time from the
    kill to the first training step of the restarted attempt (which resumed from the checkpoint).
"First step" = the moment ``log.jsonl`` first holds a step record (``log_every=1``). Wall-clock times on
a shared 2-core box: read the ratios, not the absolute seconds.

    .venv/bin/python benchmarks/bench_launch.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from helpers import free_port  # noqa: E402
from sshd import start_sshd  # noqa: E402

PY = sys.executable
TRAIN = ["train", "tiny-test", "steps=6", "log_every=1", "eval_every=0", "data.max_files=20"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
for _k in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
    ENV.pop(_k, None)


def max_step(log: Path) -> int:
    try:
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        return max((json.loads(ln)["step"] for ln in lines), default=0)
    except (OSError, ValueError, KeyError):
        return 0


def spawn(cmd: list[str]) -> subprocess.Popen:
    log = tempfile.NamedTemporaryFile("w+", prefix="bench-launch-", suffix=".log", delete=False)
    p = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    p.log_path = log.name  # type: ignore[attr-defined]
    return p


def wait_all(procs: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            raise
        if p.returncode != 0:
            tail = Path(p.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
            raise RuntimeError(f"{p.args[:6]}... exited {p.returncode}:\n{tail}")
        os.unlink(p.log_path)  # type: ignore[attr-defined]


def time_to_first_step(cmds: list[list[str]], out_dir: Path, timeout: float = 180) -> float:
    log = out_dir / "log.jsonl"
    t0 = time.monotonic()
    procs = [spawn(c) for c in cmds]
    while max_step(log) < 1:
        if time.monotonic() - t0 > timeout or any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            raise RuntimeError(f"no first step in {out_dir}")
        time.sleep(0.01)
    first = time.monotonic() - t0
    wait_all(procs, timeout)
    return first


def torchrun_cmd(nnodes: int, node_rank: int, nproc: int, port: int, out: Path, restarts: int = 0) -> list[str]:
    return [PY, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
            f"--nproc-per-node={nproc}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=bench",
            f"--max-restarts={restarts}", "--monitor-interval=0.2", "-m", "meshwright.cli", *TRAIN, f"out_dir={out}"]


def launch_cmd(hostfile: Path, server, out: Path, extra: list[str] | None = None) -> list[str]:
    return [PY, "-m", "meshwright.cli", "launch", "--hosts", str(hostfile), "--ssh-port", str(server.port),
            "--ssh-key", str(server.key), "--python", PY, "--workdir", str(REPO), "--rdzv-port", str(free_port()),
            "--env", "OMP_NUM_THREADS=1", "--env", f"PYTHONPATH={REPO}", *(extra or []), "--", *TRAIN, f"out_dir={out}"]


def recovery_s(tmp: Path, i: int, kill_after: int = 4) -> tuple[float, float]:
    """(seconds from SIGKILL to the restarted attempt's first step, steps redone)."""
    out = tmp / f"recover{i}"
    cmd = torchrun_cmd(1, 0, 2, free_port(), out, restarts=1)
    cmd[cmd.index("steps=6")] = "steps=40"
    cmd += [f"ckpt_every={kill_after}"]
    proc = spawn(cmd)
    agent, log = psutil.Process(proc.pid), out / "log.jsonl"
    ckpt = out / "ckpt" / f"step_{kill_after:06d}" / "trainer_state.json"
    deadline = time.monotonic() + 120
    while not ckpt.is_file() and time.monotonic() < deadline:
        time.sleep(0.01)
    victim = next(c for c in agent.children(recursive=True) if c.environ().get("RANK") == "1")
    reached = max_step(log)
    victim.send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    seen_truncated = False
    while time.monotonic() - t_kill < 120:  # the resumed attempt rewrites log.jsonl up to the checkpoint
        s = max_step(log)
        seen_truncated = seen_truncated or s <= kill_after
        if seen_truncated and s > kill_after:
            break
        time.sleep(0.005)
    rec = time.monotonic() - t_kill
    wait_all([proc])
    return rec, max(reached - kill_after, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as d:
        tmp = Path(d)
        server = start_sshd(tmp / "sshd")
        try:
            hf1, hf2 = tmp / "hosts1", tmp / "hosts2"
            hf1.write_text("127.0.0.1 slots=2\n")
            hf2.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
            rows: dict[str, list[float]] = {k: [] for k in ("torchrun 1x2", "launch 1x2", "torchrun 2x1", "launch 2x1")}
            recov, redone = [], []
            for i in range(args.repeats):
                port = free_port()
                rows["torchrun 1x2"].append(time_to_first_step([torchrun_cmd(1, 0, 2, port, tmp / f"t1_{i}")], tmp / f"t1_{i}"))
                rows["launch 1x2"].append(time_to_first_step([launch_cmd(hf1, server, tmp / f"l1_{i}")], tmp / f"l1_{i}"))
                port = free_port()
                rows["torchrun 2x1"].append(time_to_first_step(
                    [torchrun_cmd(2, r, 1, port, tmp / f"t2_{i}") for r in (0, 1)], tmp / f"t2_{i}"))
                rows["launch 2x1"].append(time_to_first_step([launch_cmd(hf2, server, tmp / f"l2_{i}")], tmp / f"l2_{i}"))
                r, lost = recovery_s(tmp, i)
                recov.append(r)
                redone.append(lost)
                print(f"repeat {i}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in rows.items())
                      + f", recovery {r:.2f}s", flush=True)
        finally:
            server.stop()
    med = {k: statistics.median(v) for k, v in rows.items()}
    print("\n| layout | plain torchrun: s to first step | meshwright launch (SSH): s to first step | ratio |")
    print("|---|---|---|---|")
    for layout, a, b in (("1 node x 2 ranks", "torchrun 1x2", "launch 1x2"), ("2 nodes x 1 rank", "torchrun 2x1", "launch 2x1")):
        print(f"| {layout} | {med[a]:.2f} | {med[b]:.2f} | {med[b] / med[a]:.2f}x |")
    print(f"\nrecovery after SIGKILL of rank 1 (torchrun --max-restarts 1, ckpt_every 4): median {statistics.median(recov):.2f} s "
          f"from kill to the restarted attempt's first step (runs {', '.join(f'{x:.2f}' for x in recov)}); "
          f"steps past the checkpoint redone: {redone}; plain startup to first step for the same layout: "
          f"{med['torchrun 1x2']:.2f} s (ratio {statistics.median(recov) / med['torchrun 1x2']:.2f}x)")


if __name__ == "__main__":
    main()
