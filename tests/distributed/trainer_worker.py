"""Run `meshwright train` (the real CLI entry) on every torchrun rank; used by test_trainer_torchrun.py."""

import sys

from meshwright.cli import main

if __name__ == "__main__":
    from meshwright.parallel.mesh import exit_worker

    exit_worker(main(["train", *sys.argv[1:]]))
