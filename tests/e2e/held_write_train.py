"""Run `meshwright train ARGS` (the real CLI entry, ``cli.run``) with one background checkpoint held; used by
test_fault_injection.py's Ctrl-C tests.

``MESHWRIGHT_TEST_HOLD=STEP:DIR``: ckpt_async's writer of checkpoint STEP waits (at most 120 s) until DIR/release
exists; DIR/held appears when it starts waiting."""

import os
import sys
import threading
import time
from pathlib import Path


def hold(step: int, where: Path) -> None:
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    write = _FileSystemWriter.write_data
    tmp_name = f"step_{step:06d}.tmp"

    def held_write(self, plan, planner):
        if threading.current_thread() is not threading.main_thread() and Path(str(self.path)).name == tmp_name:
            (where / "held").touch()
            deadline = time.monotonic() + 120
            while not (where / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return write(self, plan, planner)

    _FileSystemWriter.write_data = held_write


if __name__ == "__main__":
    step, _, where = os.environ["MESHWRIGHT_TEST_HOLD"].partition(":")
    hold(int(step), Path(where))
    from meshwright.cli import run

    sys.argv = ["meshwright", "train", *sys.argv[1:]]
    run()
