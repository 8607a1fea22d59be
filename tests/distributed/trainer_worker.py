"""Run `meshwright train` (the real CLI entry) on every torchrun rank; used by test_trainer_torchrun.py.

``MESHWRIGHT_TEST_HOLD_CKPT_WRITE=N`` (with ``ckpt_async=true``): the background checkpoint writer is held until the
training thread has finished step N, so the first checkpoint is written after later optimizer steps changed the
weights; each rank prints whether that checkpoint was already in place when step N was reached."""

import os
import sys
from pathlib import Path

from meshwright.cli import main


def hold_background_writes(until: int) -> None:
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    from meshwright.train.trainer import Trainer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
    from helpers import held_background_writes

    release, held_write = held_background_writes(120)
    after_step = Trainer._after_step

    def releasing_after_step(self, run, log, bar, out):
        if out["step"] == until and not release.is_set():
            done = sorted(p.name for p in self.ckpt_dir.glob("step_*"))
            print(f"rank {self.runtime.rank} at step {until}: checkpoints {done}", flush=True)
            release.set()
        after_step(self, run, log, bar, out)

    _FileSystemWriter.write_data, Trainer._after_step = held_write, releasing_after_step


if __name__ == "__main__":
    from meshwright.parallel.mesh import exit_worker

    if os.environ.get("MESHWRIGHT_TEST_HOLD_CKPT_WRITE"):
        hold_background_writes(int(os.environ["MESHWRIGHT_TEST_HOLD_CKPT_WRITE"]))
    exit_worker(main(["train", *sys.argv[1:]]))
