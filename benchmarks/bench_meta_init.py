"""Build time of the initial weights (issue 16, meta init): the ``stream`` scheme (one CPU RNG stream replayed
module by module on every rank) against ``keyed`` (each rank draws its own tiles on its device).

One process, world 1 (gloo on CPU, NCCL on CUDA), a llama2-7b-shaped model with ``--layers`` layers and the plan
of gpu_check's llama7b_planned section (tp1 pp1 dp1, full recompute): ``DistributedRuntime`` construction, which
materialises on ``meta``, and ``build_model`` for the one-process run. Prints one JSON line per (scheme, what).

    PYTHONPATH=. python benchmarks/bench_meta_init.py --layers 2 --init stream keyed
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist

from meshwright.config import load_model_config
from meshwright.models import build_model
from meshwright.parallel.runtime import DistributedRuntime, init_distributed
from meshwright.plan import plan_from_dict


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--init", nargs="+", default=["stream", "keyed"], choices=["stream", "keyed"])
    ap.add_argument("--what", nargs="+", default=["runtime", "one_process"], choices=["runtime", "one_process"])
    args = ap.parse_args()
    base = load_model_config(args.model)
    cfg = load_model_config({**{k: getattr(base, k) for k in base.__dataclass_fields__}, "n_layers": args.layers,
                             "name": f"{base.name}-{args.layers}l"})
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())})
    device = init_distributed()
    pd = {"model": cfg.name, "seq_len": 128, "global_batch": 1, "micro_batch": 1,
          "layers": [{"recompute": "full", "repeat": cfg.n_layers}]}
    for init in args.init:
        for what in args.what:
            t0 = time.perf_counter()
            if what == "runtime":
                rt = DistributedRuntime(cfg, plan_from_dict(pd), seed=1234, device=device, init=init)
                _sync()
                dt = time.perf_counter() - t0
                extra = {"meta_init": rt.meta_init}
                rt.close()
                del rt
            else:
                target = device if init == "keyed" else None
                build_model(cfg, seed=1234, init=init, device=target).to(device)  # dropped once timed
                _sync()
                dt = time.perf_counter() - t0
                extra = {}
            print(json.dumps({"model": cfg.name, "params": cfg.num_params(), "init": init, "what": what,
                              "device": str(device), "threads": torch.get_num_threads(), "seconds": round(dt, 2),
                              **extra}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
