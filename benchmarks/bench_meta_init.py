"""Build time of the initial weights (issue 16, meta init): the ``stream`` scheme (one CPU RNG stream replayed
module by module on every rank) against ``keyed`` (each rank draws its own tiles on its device).

A llama2-7b-shaped model with ``--layers`` layers. World 1 (gloo on CPU, NCCL on CUDA): the plan of gpu_check's
llama7b_planned section (tp1 pp1 dp1, full recompute); under torchrun ``--layout`` fsdp (ZeRO-3, embeddings
too), tp or pp over all ranks. Times ``DistributedRuntime`` construction (built on ``meta``, then materialised)
and, at world 1, ``build_model`` for the one-process run. Prints one JSON line per (scheme, what) from rank 0.

    PYTHONPATH=. python benchmarks/bench_meta_init.py --layers 2 --init stream keyed --threads 1
    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/bench_meta_init.py --layers 2 --layout fsdp --what runtime

``--tp-backend megatron`` and ``--savers`` (FP8 activations on even layers, WTA-CRS on odd ones) pick the layouts
built on meta since meta init covers them; ``--full-build`` switches meta init off (the whole model first, as
those layouts were built before) for a side-by-side on the same machine; ``--count-build-bytes`` counts the fresh
bytes of the whole runtime construction (both paths), and every line carries the process's peak RSS.

``--init-from DIR`` loads a Hugging Face checkpoint into the runtime (``init_from``); ``--write-checkpoint DIR``
(one process, no torchrun) first writes one with the model's shapes (``--set d_model=2048 ...`` overrides
fields of the preset), e.g. for megatron-core tp2 from a llama-shaped checkpoint (issue 16):

    PYTHONPATH=. python benchmarks/bench_meta_init.py --layers 2 --set d_model=2048 n_heads=16 n_kv_heads=16 \
        ffn_hidden=5504 vocab_size=8000 --write-checkpoint /tmp/ckpt
    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/bench_meta_init.py --layers 2 --set d_model=2048 n_heads=16 \
        n_kv_heads=16 ffn_hidden=5504 vocab_size=8000 --layout tp --tp-backend megatron --init stream --init-from /tmp/ckpt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import threading
import time

import torch
import torch.distributed as dist

from torch.utils._python_dispatch import TorchDispatchMode

import meshwright.parallel.runtime as runtime_mod
from meshwright.config import load_model_config
from meshwright.models import build_model
from meshwright.parallel.runtime import DistributedRuntime, init_distributed
from meshwright.parallel.teardown import shutdown
from meshwright.plan import plan_from_dict


class FreshBytes(TorchDispatchMode):
    """Bytes of every fresh tensor (an op output aliasing no input, not on meta) created while active; DTensors count
    their shard."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ret, t in zip(func._schema.returns, out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and ret.alias_info is None and t.device.type != "meta":
                self.total += getattr(t, "_local_tensor", t).untyped_storage().nbytes()
        return out


def metered_materialize(meter: FreshBytes):
    """``materialize`` as the runtime calls it, under ``meter``."""
    original = runtime_mod.materialize

    def run(*args, **kwargs):
        with meter:
            return original(*args, **kwargs)
    return run


class RssPeaks:
    """Peak anonymous and file-backed resident memory (``/proc/self/status`` RssAnon/RssFile, sampled every 2 ms
    on a thread): the page cache of a memory-mapped checkpoint counts in ``ru_maxrss`` but is shared between the
    ranks of a host, the anonymous memory (the tensors) is each rank's own. Zeros where /proc is absent."""

    def __init__(self) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._sample()
        self.start = dict(self.peak)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    key = line.split(":", 1)[0]
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)
        except OSError:
            self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.002)

    def __enter__(self) -> "RssPeaks":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


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
    ap.add_argument("--layout", default="single", choices=["single", "fsdp", "tp", "pp"])
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--count-bytes", action="store_true", help="count the bytes materialisation allocates (slower)")
    ap.add_argument("--count-build-bytes", action="store_true", help="count the bytes the whole construction allocates")
    ap.add_argument("--tp-backend", default="dtensor", choices=["dtensor", "megatron"])
    ap.add_argument("--savers", action="store_true", help="FP8 activations on even layers, WTA-CRS (0.5) on odd ones")
    ap.add_argument("--full-build", action="store_true", help="meta init off: the whole model first (the old path)")
    ap.add_argument("--set", nargs="+", default=[], metavar="FIELD=INT", help="override integer fields of the preset")
    ap.add_argument("--init-from", default=None, help="a Hugging Face checkpoint directory to load (init_from)")
    ap.add_argument("--write-checkpoint", default=None, help="write the model (seed 1234) there as a HF checkpoint, exit")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_model_config(args.model)
    fields = {k: getattr(base, k) for k in base.__dataclass_fields__}
    fields.update({k: int(v) for k, v in (item.split("=", 1) for item in args.set)})
    suffix = "-".join([f"{args.layers}l"] + [item.replace("=", "") for item in args.set])
    cfg = load_model_config({**fields, "n_layers": args.layers, "name": f"{base.name}-{suffix}"})
    if args.write_checkpoint:
        from meshwright.models.hf_weights import save_hf

        save_hf(build_model(cfg, seed=1234, init="keyed"), cfg, args.write_checkpoint)
        print(json.dumps({"wrote": args.write_checkpoint, "model": cfg.name, "params": cfg.num_params()}))
        return
    if "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    device = init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    layer = {"single": {"recompute": "full"}, "fsdp": {"dp": world, "zero": 3}, "tp": {"tp": world}, "pp": {}}[args.layout]
    savers = [{"fp8_act": True} if i % 2 == 0 else {"wta_crs": 0.5} for i in range(cfg.n_layers)]
    pd = {"model": cfg.name, "seq_len": 128, "global_batch": world, "micro_batch": 1,
          "layers": [{**layer, "savers": savers[i]} for i in range(cfg.n_layers)] if args.savers
          else [{**layer, "repeat": cfg.n_layers}]}
    if args.full_build:
        runtime_mod.supports_meta_init = lambda *a, **k: False
    if args.layout == "fsdp":
        pd["embedding"] = {"zero": 3}
    if args.layout == "pp":
        pd["pipeline"] = {"degree": world, "schedule": "1f1b", "microbatches": world}
        pd["global_batch"] = world
    whats = args.what if world == 1 else ["runtime"]
    for init in args.init:
        for what in whats:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            if what == "runtime":
                meter, original = FreshBytes(), runtime_mod.materialize
                if args.count_bytes:
                    runtime_mod.materialize = metered_materialize(meter)
                build = FreshBytes() if args.count_build_bytes else contextlib.nullcontext()
                try:
                    with build, RssPeaks() as peaks:
                        rt = DistributedRuntime(cfg, plan_from_dict(pd), seed=1234, device=device, init=init,
                                                tp_backend=args.tp_backend, init_from=args.init_from)
                finally:
                    runtime_mod.materialize = original
                _sync()
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                extra = {"peak_rss_anon_gb": round(peaks.peak["RssAnon"] / 2**30, 2),
                         "peak_rss_file_gb": round(peaks.peak["RssFile"] / 2**30, 2),
                         "start_rss_anon_gb": round(peaks.start["RssAnon"] / 2**30, 2),
                         "start_rss_file_gb": round(peaks.start["RssFile"] / 2**30, 2),
                         "meta_init": rt.meta_init, "local_params": sum(
                    (p.to_local() if hasattr(p, "to_local") else p).numel() for p in rt.parameters())}
                if args.count_bytes:
                    extra["materialize_fresh_bytes"] = meter.total
                if args.count_build_bytes:
                    extra["build_fresh_bytes"] = build.total
                rt.close()
                del rt
            else:
                target = device if init == "keyed" else None
                build_model(cfg, seed=1234, init=init, device=target).to(device)  # dropped once timed
                _sync()
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                extra = {}
            slowest = torch.tensor([dt], device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            if rank == 0:
                print(json.dumps({"model": cfg.name, "params": cfg.num_params(), "init": init, "what": what,
                                  "layout": args.layout, "tp_backend": args.tp_backend, "savers": args.savers,
                                  "init_from": args.init_from is not None,
                                  "world": world, "device": str(device),
                                  "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                                  "threads": torch.get_num_threads(), "seconds": round(dt, 2), "cpu_s": round(cpu, 2),
                                  "slowest_rank_s": round(float(slowest), 2), **extra}), flush=True)
    shutdown()  # each runtime was closed once measured: collect, then destroy (parallel/teardown.py)


if __name__ == "__main__":
    main()
