"""Two plain processes (not torchrun, which would kill the survivor first) on a gloo group, each with an
AsyncCheckpointer: checkpoint 1 is written, then rank 1 dies where MODE says: ``write`` inside its background write
of checkpoint 2, ``stage`` before it joins the save of checkpoint 2 (rank 0's save fails in its own collectives),
``sync`` before it joins a synchronous ``save_runtime`` of checkpoint 2, ``load`` inside its read of checkpoint 1
(``load_runtime``). Rank 0 prints what its save, wait or load raised, as one JSON line. Used by tests/unit/test_async_checkpoint.py.

    python async_peer_lost_worker.py RANK PORT ROOT MODE
"""

import json
import os
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import _FileSystemWriter

from meshwright.train.async_checkpoint import AsyncCheckpointer
from meshwright.train.checkpoint import load_runtime, save_runtime, step_dir
from meshwright.train.checkpoint_io import SafeFileSystemReader
from meshwright.train.local_runtime import LocalRuntime

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from patience import pg_timeout  # noqa: E402


class TwoRanks(LocalRuntime):
    """A replicated model on two ranks: only what AsyncCheckpointer asks of a runtime."""

    def barrier(self) -> None:
        dist.barrier()


def main(rank: int, port: str, root: str, mode: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=pg_timeout(60))  # 60 s on a quiet box, stretched under load
    torch.manual_seed(0)
    rt = TwoRanks(torch.nn.Linear(8, 8))
    rt.rank, rt.world_size = rank, 2
    opt = torch.optim.AdamW(rt.parameters())
    ckpt = AsyncCheckpointer(rt)
    ckpt.save(root, 1, opt, {})
    ckpt.wait()
    dist.barrier()  # rank 0 (the main) has published checkpoint 1: its wait returns after the rename, rank 1's before
    write = _FileSystemWriter.write_data

    def dying(self, plan, planner):
        if rank == 1 and threading.current_thread() is not threading.main_thread():
            os._exit(9)  # a lost node, in the middle of the background write
        return write(self, plan, planner)

    read = SafeFileSystemReader.read_data

    def dying_read(self, plan, planner):
        if rank == 1:
            os._exit(9)  # a lost node, in the middle of the ranks' read of a checkpoint
        return read(self, plan, planner)

    if mode == "write":
        _FileSystemWriter.write_data = dying
    elif mode == "load":
        SafeFileSystemReader.read_data = dying_read
    elif rank == 1:
        os._exit(9)  # a lost node, before it joins the next save
    try:
        if mode == "load":
            load_runtime(step_dir(Path(root), 1), rt, opt)
        elif mode == "sync":
            save_runtime(step_dir(Path(root), 2), rt, opt, {"step": 2})
        else:
            ckpt.save(root, 2, opt, {})
            ckpt.wait()
        print(json.dumps({"error": None}), flush=True)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        print(json.dumps({"error": str(exc), "type": type(exc).__name__}), flush=True)
    os._exit(0)  # no teardown of a group whose peer is gone


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
