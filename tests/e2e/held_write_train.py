"""Run `meshwright train ARGS` (the real CLI entry, ``cli.run``) with one background checkpoint held; used by
test_fault_injection.py's Ctrl-C tests.

``MESHWRIGHT_TEST_HOLD=STEP:DIR``: ckpt_async's writer of checkpoint STEP waits (at most 120 s) until DIR/release
exists; DIR/held appears when it starts waiting."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import hold_checkpoint_write  # noqa: E402


if __name__ == "__main__":
    step, _, where = os.environ["MESHWRIGHT_TEST_HOLD"].partition(":")
    hold_checkpoint_write(int(step), Path(where))
    from meshwright.cli import run

    sys.argv = ["meshwright", "train", *sys.argv[1:]]
    run()
