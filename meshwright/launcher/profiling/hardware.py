"""`meshwright profile hardware`: measure what the cost model assumes, on the machines you have.

One process profiles the local device (matmul throughput per dtype and size). Under torchrun it also
times all-reduce / all-gather / reduce-scatter / all-to-all for every power-of-two group size, with
consecutive and strided ranks (intra- and inter-node groups when there are several nodes), point-to-
point sends, and how much a matmul and an all-reduce slow each other down when overlapped. Bus
bandwidth follows the nccl-tests convention; latency and bandwidth come from a two-size alpha-beta fit.
GPU facts come from nvidia-ml-py with a clean fallback when there is no driver. The result is a
versioned JSON file; ``load_hardware_profile`` validates version and fields.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from meshwright.config.io import read_versioned_json, write_json_atomic
from meshwright.errors import ConfigError
from meshwright.memory.fp8_gemm import ALIGN, scaled_mm_supported

HARDWARE_PROFILE_VERSION = 1
KIND = "meshwright-hardware-profile"
REQUIRED_DERIVED = ("peak_tflops", "intra_bw_gbps", "intra_latency_us", "inter_bw_gbps", "inter_latency_us",
                    "overlap_slowdown")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP8 = "fp8"  # E4M3 x E4M3 -> bf16 through torch._scaled_mm (per-tensor scales), where the GPU has FP8 tensor cores
FP8_SKIPPED = "skipped: needs a CUDA GPU of compute capability >= 8.9 (FP8 tensor cores for torch._scaled_mm)"


def gpu_facts() -> dict[str, Any]:
    """Name, memory and power limit of GPU 0 from NVML; ``available: false`` with the reason otherwise."""
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
        return {"available": False, "reason": f"nvidia-ml-py not importable: {exc}"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"NVML unavailable ({exc.__class__.__name__})"}
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        try:
            power = pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000.0
        except pynvml.NVMLError:
            power = None
        return {"available": True, "name": name.decode() if isinstance(name, bytes) else name,
                "memory_gib": mem.total / 1024**3, "power_limit_w": power,
                "count": pynvml.nvmlDeviceGetCount()}
    finally:
        pynvml.nvmlShutdown()


def cuda_memory_gib(device: torch.device) -> Optional[float]:
    """The memory CUDA says the device holds (``total_memory``), the most one process there can ever reach, its CUDA
    context and NCCL buffers included; None on CPU. The planner's budget is capped at it: a cluster preset states the
    datasheet's 80 GB for an A100 or H100, more than such a device lets a process allocate, and a plan predicted to
    fill the preset's budget would not fit."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 1024**3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 1, min_sample_s: float = 0.0,
          best: bool = False) -> float:
    """Median (``best``: minimum) seconds of one call of ``fn`` over ``iters`` samples after ``warmup`` calls.

    With ``min_sample_s`` each sample repeats ``fn`` until it lasts that long, so processes that
    measure at the same time (all ranks after a barrier) really do overlap: that is how they run in
    training, and on an oversubscribed host it is the only honest per-rank figure.
    """
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(device)
    once = (time.perf_counter() - t0) / max(warmup, 1)
    reps = max(1, int(min_sample_s / max(once, 1e-9)) + 1) if min_sample_s > 0 else 1
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / reps)
    samples.sort()
    return samples[0] if best else samples[len(samples) // 2]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the running job; (0, 1) without an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        dist.barrier()


def _rate_in_window(fn: Callable[[], Any], device: torch.device, window_s: float, windows: int = 3) -> float:
    """Seconds per call of ``fn`` per rank when every rank calls it at once, for about ``window_s``.

    Every rank makes the same number of calls after one barrier, and a window lasts until the slowest
    rank is done (an all-reduce MAX of elapsed times): a rank that starts late or is starved lengthens
    the window instead of letting the others run with spare cores. Best of ``windows`` windows, since
    interference from outside the job and start skew only ever lengthen one.
    """
    import torch.distributed as dist

    fn()  # warm-up (allocation, first-call costs)
    _sync(device)
    once = _time(fn, device, 1, warmup=0, min_sample_s=min(0.02, window_s / 4))
    count = torch.tensor([window_s / max(once, 1e-9)], dtype=torch.float64, device=device)
    dist.all_reduce(count)  # the same number of calls on every rank: the ranks' mean estimate
    calls = max(1, int(count.item() / dist.get_world_size()))
    best = float("inf")
    for _ in range(max(windows, 1)):
        _barrier()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        best = min(best, float(elapsed.item()) / calls)
    return best


def _solo_seconds(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Seconds per call of ``fn`` on rank 0 while the other ranks wait (in a barrier)."""
    import torch.distributed as dist

    _barrier()
    t = _time(fn, device, iters, min_sample_s=0.02, best=True) if dist.get_rank() == 0 else 0.0
    _barrier()
    return t


def measure_matmul(device: torch.device, dtypes: list[str], sizes: list[int], iters: int = 3,
                   window_s: float = 0.15) -> list[dict[str, Any]]:
    """Achieved TFLOP/s of an n x n x n matmul per dtype and size. Under torchrun every rank measures
    in the same wall-clock window (``window_s``): the per-rank throughput when all ranks compute, which
    is below the one-process figure when ranks share cores, memory bandwidth or power; rank 0 then
    measures alone (``solo_seconds``), and their ratio is the profile's ``contention``."""
    together = rank_and_world()[1] > 1
    out = []
    for name in dtypes:
        if name not in DTYPES and name != FP8:
            raise ConfigError(f"dtypes={name!r} is invalid; valid: {', '.join([*DTYPES, FP8])}")
        if name == FP8 and not scaled_mm_supported(device):
            continue  # the profile says why (profile_hardware's "fp8_matmul")
        for n in sizes:
            if name == FP8:
                if n % ALIGN:
                    continue
                fn = _fp8_matmul(n, device)
            else:
                a = torch.randn(n, n, device=device, dtype=DTYPES[name])
                b = torch.randn(n, n, device=device, dtype=DTYPES[name])
                fn = lambda: a @ b  # noqa: E731
            t = (_rate_in_window(fn, device, window_s, windows=max(iters, 3)) if together
                 else _time(fn, device, max(iters, 3), min_sample_s=0.02, best=True))
            row = {"dtype": name, "n": n, "seconds": t, "tflops": 2 * n**3 / t / 1e12, "concurrent": together}
            if together:
                row["solo_seconds"] = _solo_seconds(fn, device, iters)
            out.append(row)
    return out


def _fp8_matmul(n: int, device: torch.device) -> Callable[[], Any]:
    """An n x n x n FP8 GEMM as COAT's linear layers run it: E4M3 operands, per-tensor scales, bf16 out."""
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
    one = torch.ones((), device=device)
    return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


def alpha_beta(v1: float, t1: float, v2: float, t2: float, hops: float) -> tuple[float, float]:
    """Bandwidth (bytes/s) and per-hop latency (s) from times of two volumes: t = hops*lat + v/bw."""
    bw = (v2 - v1) / max(t2 - t1, 1e-12)
    lat = max((t1 - v1 / bw) / max(hops, 1), 0.0)
    return bw, lat


BUS_FACTOR = {  # bytes through each link per byte of buffer (nccl-tests PERFORMANCE.md)
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
}
HOPS = {"all_reduce": lambda n: 2 * (n - 1), "all_gather": lambda n: n - 1, "reduce_scatter": lambda n: n - 1,
        "all_to_all": lambda n: n - 1}


def _collective(op: str, numel: int, n: int, group: Any, device: torch.device) -> Callable[[], Any]:
    import torch.distributed as dist

    if op == "all_reduce":
        x = torch.ones(numel, device=device)
        return lambda: dist.all_reduce(x, group=group)
    if op == "all_gather":
        x = torch.ones(numel // n, device=device)
        out = torch.empty(numel // n * n, device=device)
        return lambda: dist.all_gather_into_tensor(out, x, group=group)
    if op == "reduce_scatter":
        x = torch.ones(numel // n * n, device=device)
        out = torch.empty(numel // n, device=device)
        if device.type == "cpu":  # gloo has no reduce_scatter_tensor: all-reduce then keep our slice (upper bound)
            return lambda: dist.all_reduce(x, group=group)
        return lambda: dist.reduce_scatter_tensor(out, x, group=group)
    if op == "all_to_all":
        x = torch.ones(numel // n * n, device=device)
        out = torch.empty_like(x)
        return lambda: dist.all_to_all_single(out, x, group=group)
    raise ConfigError(f"op={op!r} is invalid; valid: {', '.join(BUS_FACTOR)}")


def rank_groups(world: int, per_node: int) -> list[dict[str, Any]]:
    """Power-of-two groups of consecutive and strided ranks, each tagged intra/inter node."""
    groups = []
    size = 2
    while size <= world:
        for stride in sorted({1, world // size}):
            if size * stride > world:
                continue
            ranks_list = [[block + off + k * stride for k in range(size)]
                          for block in range(0, world, size * stride) for off in range(stride)]
            span = size * stride
            groups.append({"size": size, "stride": stride, "ranks": ranks_list,
                           "scope": "intra" if span <= per_node else "inter"})
        size *= 2
    return groups


def measure_collectives(device: torch.device, per_node: int, sizes_mb: tuple[float, float] = (0.0625, 4.0),
                        ops: tuple[str, ...] = tuple(BUS_FACTOR), iters: int = 3,
                        progress: bool = False) -> list[dict[str, Any]]:
    """Time each collective for every group layout; every rank must call this (new_group is collective)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    out = []
    layouts = rank_groups(world, per_node)
    try:
        from tqdm import tqdm
        it = tqdm(layouts, desc="collectives", disable=not progress or rank != 0)
    except ImportError:  # pragma: no cover
        it = layouts
    for g in it:
        mine = None
        for ranks in g["ranks"]:
            pg = dist.new_group(ranks)
            if rank in ranks:
                mine = pg
        n = g["size"]
        for op in ops:
            times = []
            for mb in sizes_mb:
                numel = max(int(mb * 2**20 / 4) // n * n, n)
                fn = _collective(op, numel, n, mine, device)
                times.append((numel * 4, _time(fn, device, iters)))
            (v1, t1), (v2, t2) = times
            bus = BUS_FACTOR[op](n)
            bw, lat = alpha_beta(v1 * bus, t1, v2 * bus, t2, HOPS[op](n))
            out.append({"op": op, "group_size": n, "stride": g["stride"], "scope": g["scope"],
                        "bytes": [v1, v2], "seconds": [t1, t2],
                        "busbw_gbps": v2 * bus / t2 / 1e9, "fit_bw_gbps": bw / 1e9, "latency_us": lat * 1e6})
        dist.barrier()
    return out


def measure_p2p(device: torch.device, nbytes: int = 4 * 2**20, iters: int = 3) -> Optional[dict[str, Any]]:
    """Rank 0 -> 1 send/recv bandwidth (all ranks call; ranks > 1 idle)."""
    import torch.distributed as dist

    if dist.get_world_size() < 2:
        return None
    rank = dist.get_rank()
    x = torch.ones(nbytes // 4, device=device)

    def once() -> None:
        if rank == 0:
            dist.send(x, 1)
            dist.recv(x, 1)
        elif rank == 1:
            dist.recv(x, 0)
            dist.send(x, 0)

    t = _time(once, device, iters)
    return {"bytes": nbytes, "seconds_round_trip": t, "bw_gbps": 2 * nbytes / t / 1e9}


def measure_overlap(device: torch.device, n: int = 512, numel: int = 2**20, iters: int = 3) -> dict[str, float]:
    """Slowdown of overlapped matmul + all-reduce vs. the longer of the two alone, relative to the shorter."""
    import torch.distributed as dist

    a = torch.randn(n, n, device=device)
    x = torch.ones(numel, device=device)
    t_mm = _time(lambda: a @ a, device, iters)
    t_ar = _time(lambda: dist.all_reduce(x), device, iters)

    def both() -> None:
        w = dist.all_reduce(x, async_op=True)
        a @ a
        w.wait()

    t_both = _time(both, device, iters)
    slowdown = max(t_both - max(t_mm, t_ar), 0.0) / max(min(t_mm, t_ar), 1e-9)
    return {"matmul_s": t_mm, "allreduce_s": t_ar, "both_s": t_both, "slowdown": min(slowdown, 1.0)}


def derive(matmul: list[dict], collectives: list[dict], overlap: Optional[dict], fallback: dict[str, float]) -> dict[str, Any]:
    """The figures the planner reads: best matmul TFLOP/s per dtype, intra/inter bandwidth and latency
    (largest all-reduce group of each scope), overlap slowdown. Missing scopes keep ``fallback``."""
    peak: dict[str, float] = {}
    for m in matmul:
        peak[m["dtype"]] = max(peak.get(m["dtype"], 0.0), m["tflops"])
    d: dict[str, Any] = {"peak_tflops": peak, **fallback, "measured": []}
    for scope in ("intra", "inter"):
        rows = [c for c in collectives if c["op"] == "all_reduce" and c["scope"] == scope]
        if rows:
            best = max(rows, key=lambda c: (c["group_size"], c["busbw_gbps"]))
            d[f"{scope}_bw_gbps"] = best["busbw_gbps"]
            d[f"{scope}_latency_us"] = best["latency_us"]
            d["measured"].append(scope)
    if "inter" not in d["measured"] and "intra" in d["measured"] and fallback.get("_single_node"):
        d["inter_bw_gbps"], d["inter_latency_us"] = d["intra_bw_gbps"], d["intra_latency_us"]
    d.pop("_single_node", None)
    d["overlap_slowdown"] = overlap["slowdown"] if overlap else fallback.get("overlap_slowdown", 0.1)
    d["contention"] = contention(matmul)
    return d


def contention(matmul: list[dict]) -> float:
    """How much slower a rank computes when all ranks compute than when it runs alone (median over the
    matmul sizes, at least 1): ~1 on GPUs, ranks / cores on an oversubscribed CPU host."""
    ratios = sorted(m["seconds"] / m["solo_seconds"] for m in matmul if m.get("solo_seconds"))
    return max(1.0, ratios[len(ratios) // 2]) if ratios else 1.0


def profile_hardware(dtypes: list[str], sizes: list[int], per_node: Optional[int] = None, cluster: Any = None,
                     iters: int = 3, progress: bool = True) -> dict[str, Any]:
    """Profile this process's device and, when torch.distributed is initialised, the links between ranks."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    matmul = measure_matmul(device, dtypes, sizes, iters)
    collectives: list[dict] = []
    p2p = overlap = None
    world = rank_and_world()[1]
    per_node = per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world > 1:
        collectives = measure_collectives(device, per_node, iters=iters, progress=progress)
        p2p = measure_p2p(device, iters=iters)
        overlap = measure_overlap(device, iters=iters)
    fallback: dict[str, Any] = {"intra_bw_gbps": 10.0, "intra_latency_us": 10.0, "inter_bw_gbps": 1.0,
                                "inter_latency_us": 50.0, "overlap_slowdown": 0.1, "_single_node": world <= per_node}
    if cluster is not None:
        fallback.update(intra_bw_gbps=cluster.intra_node_bw_gbps, intra_latency_us=cluster.intra_node_latency_us,
                        inter_bw_gbps=cluster.inter_node_bw_gbps, inter_latency_us=cluster.inter_node_latency_us)
    return {
        "version": HARDWARE_PROFILE_VERSION, "kind": KIND,
        "host": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "device": {"type": device.type, "gpu": gpu_facts(), "memory_gib": cuda_memory_gib(device)},
        "world_size": world, "devices_per_node": per_node,
        "matmul": matmul, "collectives": collectives, "p2p": p2p, "overlap": overlap,
        "fp8_matmul": ("measured" if any(m["dtype"] == FP8 for m in matmul)
                       else FP8_SKIPPED if FP8 in dtypes else "not requested"),
        "derived": derive(matmul, collectives, overlap, fallback),
    }


def save_hardware_profile(profile: dict[str, Any], path: str | Path) -> None:
    write_json_atomic(profile, path)


def load_hardware_profile(path: str | Path) -> dict[str, Any]:
    """Read and validate a hardware profile; one-line ConfigError naming the bad field."""
    data = read_versioned_json(path, "hardware-profile", KIND, HARDWARE_PROFILE_VERSION, "meshwright profile hardware")
    d = data.get("derived")
    if not isinstance(d, dict):
        raise ConfigError("hardware-profile.derived is required; valid: a mapping with " + ", ".join(REQUIRED_DERIVED))
    for key in REQUIRED_DERIVED:
        if key not in d:
            raise ConfigError(f"hardware-profile.derived.{key} is required; valid: a mapping with " + ", ".join(REQUIRED_DERIVED))
    if not isinstance(d["peak_tflops"], dict) or not d["peak_tflops"] or any(
            not finite_number(v) or v <= 0 for v in d["peak_tflops"].values()):  # NaN/bool passed `v <= 0`
        raise ConfigError(f"hardware-profile.derived.peak_tflops={d['peak_tflops']!r} is invalid; valid: a mapping dtype -> positive TFLOP/s")
    for key in REQUIRED_DERIVED[1:]:
        v = d[key]
        if not finite_number(v) or v < 0 or (key.endswith("bw_gbps") and v == 0):
            raise ConfigError(f"hardware-profile.derived.{key}={v!r} is invalid; valid: a finite non-negative number (bandwidth > 0)")
    if "contention" in d and not (finite_number(d["contention"]) and d["contention"] > 0):
        raise ConfigError(f"hardware-profile.derived.contention={d['contention']!r} is invalid; valid: a positive number")
    device = data.get("device")
    memory = device.get("memory_gib") if isinstance(device, dict) else None
    if memory is not None and not (finite_number(memory) and memory > 0):
        raise ConfigError(f"hardware-profile.device.memory_gib={memory!r} is invalid; valid: a positive number of GiB "
                          "(the device's memory as CUDA reports it), or null on CPU")
    return data


def finite_number(v: Any) -> bool:
    """A real JSON number: not a bool, NaN or infinity (``json`` reads NaN and Infinity)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@contextlib.contextmanager
def distributed_from_env(timeout_s: float = 120.0) -> Iterator[bool]:
    """Join the torchrun job for the body (``init_distributed_from_env``) and leave it afterwards;
    yields whether this process is the one that writes results (rank 0, or the only process)."""
    import torch.distributed as dist

    joined = init_distributed_from_env(timeout_s)
    try:
        yield rank_and_world()[0] == 0
    finally:
        if joined:  # what the body built (FSDP/TP modules of a profile) is collected before the group goes
            from meshwright.parallel.teardown import shutdown

            shutdown()


def init_distributed_from_env(timeout_s: float = 120.0) -> bool:
    """Join the torchrun job if there is one (gloo on CPU, nccl on GPU); return whether we did."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True
