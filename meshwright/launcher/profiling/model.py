"""`meshwright profile model`: per-layer time and memory of a model's blocks on this device.

For each tp degree a block is built with the shapes one tp rank holds (n_heads/tp query heads,
n_kv_heads/tp KV heads, ffn/tp hidden units; the collectives are the cost model's job). Forward and
backward are timed at several batch sizes and sequence lengths and fitted by least squares to
``t = a + b*tokens + c*tokens*seq`` (fixed overhead, matmuls, attention) — a fit, not one point.
Saved-activation bytes per token are measured with ``count_saved_bytes`` (saved_tensors_hooks) with
no recomputation; under full recomputation a block keeps only its input (h values per token).
The planner uses the profile to calibrate achieved FLOP/s and activation bytes; without one, the
cluster preset and the analytic formulas in ``cost_model`` stand in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from meshwright.config import ModelConfig
from meshwright.config.io import read_versioned_json, to_dict, write_json_atomic
from meshwright.errors import ConfigError, invalid
from meshwright.launcher.planner import cost_model as cm
from meshwright.launcher.profiling.blocks import rope_for, shard_block
from meshwright.launcher.profiling.hardware import finite_number, measure_matmul, rank_and_world
from meshwright.launcher.profiling.overhead import overhead_fits, profile_runtime_overheads
from meshwright.memory.accounting import count_saved_bytes

MODEL_PROFILE_VERSION = 1
KIND = "meshwright-model-profile"


def saved_bytes_per_token(block: nn.Module, cfg: ModelConfig, batch: int, seq: int, device: torch.device,
                          dtype: str = "fp32") -> float:
    """Bytes the block saves for backward per token (no recomputation) in the training precision, measured
    with saved_tensors_hooks at ``batch`` and ``2*batch`` sequences: the slope. Under autocast the bf16 weight
    copies are saved too, once per forward whatever the tokens; the cost model counts them as weight copies."""

    def total(b: int) -> float:
        x = torch.randn(b, seq, cfg.d_model, device=device, requires_grad=True)
        rope = rope_for(cfg, seq, device)
        # the block input counts: its norm saves it, and nothing upstream keeps it for backward
        with count_saved_bytes(block, exclude=[*rope] if rope else []) as sb, training_mode(device, dtype):
            y = block(x, rope)
        del y
        return float(sb.total)

    if dtype == "fp32":
        return total(batch) / (batch * seq)
    return (total(2 * batch) - total(batch)) / (batch * seq)


def _distributed() -> bool:

    return rank_and_world()[1] > 1


def default_tps(cfg: ModelConfig, limit: int = 2) -> list[int]:
    """The tp degrees a profile covers by default: 1 and 2 (up to ``limit``) where they split the heads and FFN."""
    return [t for t in (1, 2) if t <= limit and cfg.n_heads % t == 0 and cfg.kv_heads % t == 0 and cfg.ffn_dim % t == 0]


PROFILE_DTYPES = ("fp32", "bf16")


def training_mode(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """The precision the runtime trains in (train/local_runtime.py): fp32 parameters under bf16 autocast
    for ``bf16``, plain fp32 otherwise. Profiles are taken the same way so their times match the run."""
    if dtype not in PROFILE_DTYPES:
        raise invalid("dtype", dtype, ", ".join(PROFILE_DTYPES))
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_block(block: nn.Module, cfg: ModelConfig, batch: int, seq: int, device: torch.device, iters: int = 3,
               dtype: str = "fp32") -> tuple[float, float]:
    """Median forward and backward seconds of one block in the training precision (under torchrun every
    rank times it at once)."""
    x = torch.randn(batch, seq, cfg.d_model, device=device, requires_grad=True)
    rope = rope_for(cfg, seq, device)
    fwd, bwd = [], []
    if _distributed():
        import torch.distributed as dist

        dist.barrier()
    for i in range(iters + 1):
        t0 = time.perf_counter()
        with training_mode(device, dtype):
            y = block(x, rope)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        y.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        if i:  # first run warms up
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return float(np.median(fwd)), float(np.median(bwd))


def fit_time(points: list[dict[str, float]], key: str) -> dict[str, float]:
    """Least-squares fit of t = a + b*tokens + c*tokens*seq (non-negative coefficients where possible)."""
    A = np.array([[1.0, p["tokens"], p["tokens"] * p["seq"]] for p in points])
    y = np.array([p[key] for p in points])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    pred = A @ coef
    rel = float(np.max(np.abs(pred - y) / np.maximum(y, 1e-12))) if len(y) else 0.0
    return {"a": float(coef[0]), "b": float(coef[1]), "c": float(coef[2]), "max_rel_err": rel}


def predict_time(fit: dict[str, float], tokens: float, seq: int) -> float:
    return fit["a"] + fit["b"] * tokens + fit["c"] * tokens * seq


def default_profile_dtype(device: torch.device) -> str:
    """bf16 on GPUs (how the runtime trains there), fp32 on CPUs (bf16 matmuls are ~70x slower there)."""
    return "bf16" if device.type == "cuda" else "fp32"


def allocator_headroom(device: torch.device) -> Optional[float]:
    """Reserved-but-unallocated memory at the peak as a fraction of the allocated peak (CUDA caching
    allocator); None off CUDA or before anything was allocated."""
    if device.type != "cuda":
        return None
    alloc = torch.cuda.max_memory_allocated(device)
    return (torch.cuda.max_memory_reserved(device) - alloc) / alloc if alloc else None


def profile_model(cfg: ModelConfig, batch_sizes: list[int], seq_lens: list[int], tps: list[int],
                  device: Optional[torch.device] = None, iters: int = 3, progress: bool = True,
                  dtype: Optional[str] = None, lora: Any = None) -> dict[str, Any]:
    """Profile the dense (and MoE, if any) block kinds of ``cfg`` for each tp degree, in the training
    precision ``dtype`` (default: bf16 autocast on GPU, fp32 on CPU; recorded in the profile). With ``lora`` (a
    LoraConfig, recorded too) the blocks are timed as a LoRA run runs them: adapters on, base frozen (no dW; the
    adapters' small GEMMs and element-wise ops, which a plain block's fit would miss).

    Under torchrun (collective: every rank calls it) all ranks measure at once, as they will run, and
    ``runtime_overheads`` adds the runtime's own TP/SP and ZeRO-2/3 blocks (runtime_profile)."""
    from tqdm import tqdm

    device = device or torch.device("cpu")
    dtype = dtype or default_profile_dtype(device)
    training_mode(device, dtype)  # validates the name
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if len(batch_sizes) * len(seq_lens) < 3:
        raise invalid("batch-sizes x seq-lens", f"{len(batch_sizes)}x{len(seq_lens)}", "at least 3 points for the 3-term fit")
    if max(seq_lens) > cfg.max_seq_len:
        raise invalid("seq-lens", max(seq_lens), f"at most max_seq_len={cfg.max_seq_len}")
    kinds = [("dense", next((i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)), None)),
             ("moe", next((i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)), None))]
    entries = []
    jobs = [(k, i, tp) for k, i in kinds if i is not None for tp in tps]
    for kind, index, tp in tqdm(jobs, desc="model profile", disable=not progress):
        torch.manual_seed(0)
        block = shard_block(cfg, index, tp).to(device)
        if lora is not None:
            from meshwright.memory.lora import apply_lora

            apply_lora(block, lora.rank, lora.targets, lora.alpha, dropout=lora.dropout, seed=0)
        points = []
        for b in batch_sizes:
            for s in seq_lens:
                f, bw = time_block(block, cfg, b, s, device, iters, dtype)
                points.append({"batch": b, "seq": s, "tokens": b * s, "fwd_s": f, "bwd_s": bw})
        b0, s0 = batch_sizes[0], seq_lens[-1]
        act = saved_bytes_per_token(block, cfg, b0, s0, device, dtype)
        entries.append({
            "kind": kind, "layer_index": index, "tp": tp, "points": points,
            "fwd_fit": fit_time(points, "fwd_s"), "bwd_fit": fit_time(points, "bwd_s"),
            "param_bytes": sum(p.numel() * p.element_size() for p in block.parameters()),
            "act_bytes_per_token": {"none": act, "full": cfg.d_model * 4.0},
            "act_seq_len": s0,
        })

    # a matmul reference taken now: planning divides by it and multiplies by the hardware profile's
    # figure for the same size, so load or contention that differs between the two runs cancels
    ref = measure_matmul(device, [dtype], [128, 256, 512], iters)
    out = {"version": MODEL_PROFILE_VERSION, "kind": KIND, "model": to_dict(cfg), "device": device.type,
           "dtype": dtype, "mode": "autocast" if dtype == "bf16" else "fp32", "torch": torch.__version__,
           "entries": entries, "matmul_ref": ref, "world_size": 1}
    if lora is not None:
        out["lora"] = to_dict(lora)
    headroom = allocator_headroom(device)
    if headroom is not None:
        out["allocator_headroom"] = headroom
    if _distributed():
        import torch.distributed as dist


        out["world_size"] = dist.get_world_size()
        out["runtime_overheads"] = profile_runtime_overheads(cfg, batch_sizes, seq_lens, tps, device, iters)
    return out


def save_model_profile(profile: dict[str, Any], path: str | Path) -> None:
    write_json_atomic(profile, path)


def load_model_profile(path: str | Path) -> dict[str, Any]:
    """Read and validate a model profile (version, kind, entries with fits)."""
    data = read_versioned_json(path, "model-profile", KIND, MODEL_PROFILE_VERSION, "meshwright profile model")
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("model-profile.entries is required; valid: a non-empty list")
    if not isinstance(data.get("model"), dict):
        raise ConfigError(f"model-profile.model={data.get('model')!r} is invalid; valid: the profiled ModelConfig "
                          f"(re-run `meshwright profile model`)")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ConfigError(f"model-profile.entries[{i}]={e!r} is invalid; valid: a mapping")
        for key in ("kind", "tp", "fwd_fit", "bwd_fit", "act_bytes_per_token", "act_seq_len"):
            if key not in e:
                raise ConfigError(f"model-profile.entries[{i}].{key} is required")
        for fit in ("fwd_fit", "bwd_fit"):
            if not isinstance(e[fit], dict) or not all(finite_number(e[fit].get(k)) for k in ("a", "b", "c")):
                raise ConfigError(f"model-profile.entries[{i}].{fit}={e[fit]!r} is invalid; valid: finite a, b, c")
        act = e["act_bytes_per_token"]
        if not isinstance(act, dict) or not finite_number(act.get("none")):
            raise ConfigError(f"model-profile.entries[{i}].act_bytes_per_token={act!r} is invalid; valid: a mapping "
                              f"with a finite 'none'")
    ref = data.get("matmul_ref")
    if ref is not None and (not isinstance(ref, list) or not all(
            isinstance(m, dict) and "dtype" in m and "n" in m and finite_number(m.get("tflops")) for m in ref)):
        raise ConfigError(f"model-profile.matmul_ref={ref!r} is invalid; valid: a list of {{dtype, n, tflops}}")
    return data


def speed_ratio(profile: dict[str, Any], hardware_profile: Optional[dict[str, Any]]) -> float:
    """How much faster the hardware-profiled processes ran matmuls than the model-profiling process
    (same dtype and sizes); 1.0 when either side lacks the measurements."""
    if not hardware_profile or not profile.get("matmul_ref"):
        return 1.0
    ref = {(m["dtype"], m["n"]): m["tflops"] for m in profile["matmul_ref"]}
    ratios = [m["tflops"] / ref[(m["dtype"], m["n"])] for m in hardware_profile.get("matmul", [])
              if (m["dtype"], m["n"]) in ref and ref[(m["dtype"], m["n"])] > 0]
    return float(np.median(ratios)) if ratios else 1.0


def lora_block_flops_delta(cfg: ModelConfig, lora: dict[str, Any], index: int, seq_len: int) -> float:
    """Executed minus full-training FLOPs per token of a profiled LoRA block (its input needs a gradient, as
    ``time_block``'s does: every dX runs)."""
    from meshwright.config.io import from_dict
    from meshwright.config.schema import LoraConfig
    from meshwright.memory.lora_cost import lora_step

    step = lora_step(cfg, from_dict(LoraConfig, lora))
    return 6.0 * step.active_adapter(index) - 2.0 * step.no_wgrad[index]


def apply_model_profile(hw: cm.Hardware, profile: dict[str, Any], cfg: ModelConfig,
                        hardware_profile: Optional[dict[str, Any]] = None) -> cm.Hardware:
    """Calibrate the cost model with a measured profile of the same model shapes: achieved FLOP/s of a
    tp=1 dense block (largest profiled point), its fixed per-block cost, the measured/analytic
    activation-bytes ratio and, from a profile taken under torchrun, the framework overhead of the
    runtime's TP/SP and ZeRO-2/3 layers. With a hardware profile, times are rescaled by ``speed_ratio``."""
    shape = {k: profile["model"].get(k) for k in ("d_model", "n_heads", "ffn_hidden", "arch")}
    ours = {"d_model": cfg.d_model, "n_heads": cfg.n_heads, "ffn_hidden": cfg.ffn_hidden, "arch": cfg.arch}
    if shape != ours:
        raise invalid("model-profile", f"{profile['model'].get('name')} {shape}", f"a profile of {cfg.name} {ours}")
    pdtype = profile.get("dtype", "fp32")
    if pdtype != hw.compute_dtype:
        raise invalid("model-profile.dtype", pdtype,
                      f"{hw.compute_dtype}, the training dtype (re-run `meshwright profile model --dtype {hw.compute_dtype}`)")
    e = next((x for x in profile["entries"] if x["kind"] == "dense" and x["tp"] == 1), profile["entries"][0])
    big = max(e["points"], key=lambda p: p["tokens"]) if e.get("points") else {"tokens": 1024, "seq": e["act_seq_len"]}
    t = predict_time(e["fwd_fit"], big["tokens"], big["seq"]) + predict_time(e["bwd_fit"], big["tokens"], big["seq"])
    flops = 3 * cm.layer_fwd_flops(cfg, e["layer_index"] or 0, big["tokens"], big["seq"]) / e["tp"]
    analytic = cm.activation_bytes(cfg, e["layer_index"] or 0, 1.0, e["tp"], False, "none", 2 if pdtype == "bf16" else 4)
    if pdtype == "bf16":  # profiled under autocast, as the runtime trains
        analytic += cm.autocast_extra_act_bytes(cfg, 1.0, e["tp"], False, "none")
    scale = e["act_bytes_per_token"]["none"] / analytic if analytic else 1.0
    # the measured time already contains the memory-bound kernels: no separate elementwise term
    # the fits' intercepts are the per-block fixed cost (op dispatch, kernel launches)
    if profile.get("lora") is not None:  # the blocks were timed as a LoRA run runs them: calibrate on their FLOPs
        if hw.lora is None:
            raise invalid("model-profile.lora", profile["lora"], "null for a run without lora: (a profile of plain blocks)")
        flops += lora_block_flops_delta(cfg, profile["lora"], e["layer_index"] or 0, big["seq"]) * big["tokens"] / e["tp"]
    ratio = speed_ratio(profile, hardware_profile)
    overhead = (max(e["fwd_fit"]["a"], 0.0) + max(e["bwd_fit"]["a"], 0.0)) / ratio
    t_var = max(t / ratio - overhead, 1e-12)
    eff = min(max(flops / t_var / hw.peak_flops, 1e-4), 1.0)

    scale = 1.0 if hw.compiled else scale  # the profile measures eager blocks; compiled ones save COMPILED_ACT
    # The profile's allocator_headroom is not used for the fragmentation: it is measured after many block shapes
    # ran in one process, which fragments the cache far more than a training run's one shape does (it put
    # gpt2-small's --plan auto prediction 25% above the reserved memory measured on an H200, 2026-11-26).
    return dataclasses.replace(hw, matmul_efficiency=eff, efficiency_half_width=0.0, act_scale=scale,
                               block_time_measured=True, layer_overhead_s=overhead,
                               strategy_overheads=overhead_fits(profile, cfg, hw, ratio))
