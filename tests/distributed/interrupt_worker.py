"""Run `meshwright train ARGS` (the real CLI: ``cli.main`` and its one-line errors) on a torchrun rank, for
test_interrupt_torchrun.py, which signals torchrun or kills a rank while this runs.

``MESHWRIGHT_TEST_HOLD=STEP:DIR``: this rank's background writer (ckpt_async) of checkpoint STEP touches
DIR/held.rankR, then waits (at most 120 s of quiet-box time) until DIR/release exists: a save is in flight exactly when the test
signals. ``MESHWRIGHT_TEST_EXIT=DIR``: the rank's exit status goes to DIR/exit.rankR (torchrun does not report the
statuses of workers it shut down on a signal)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import hold_checkpoint_write  # noqa: E402


if __name__ == "__main__":
    rank = os.environ["RANK"]
    if os.environ.get("MESHWRIGHT_TEST_HOLD"):
        step, _, where = os.environ["MESHWRIGHT_TEST_HOLD"].partition(":")
        hold_checkpoint_write(int(step), Path(where), f"held.rank{rank}")
    from meshwright.cli import run

    if os.environ.get("MESHWRIGHT_TEST_EXIT"):
        import meshwright.parallel.mesh as mesh

        exit_worker = mesh.exit_worker

        def recording_exit(code: int = 0) -> None:
            (Path(os.environ["MESHWRIGHT_TEST_EXIT"]) / f"exit.rank{rank}").write_text(f"{code}\n")
            exit_worker(code)

        mesh.exit_worker = recording_exit
    sys.argv = ["meshwright", "train", *sys.argv[1:]]
    run()
