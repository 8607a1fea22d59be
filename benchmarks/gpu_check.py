"""One-GPU check of issue 16: is meshwright's trainer as fast as a plain compiled loop on one NVIDIA GPU?

Prints ONE JSON report (and writes it to --out): for gpt2-small (batch 16 x 1024, bf16) and a ~1.3B llama
(d_model 2048, 22 layers, 16 heads, ffn 5632, vocab 32000, batch 4 x 4096): tokens/s, MFU (PaLM FLOPs over
the cluster preset's dense bf16 peak), peak ``max_memory_reserved`` of

- the meshwright trainer: ``Trainer.train_step`` on the runtime ``meshwright train`` builds (LocalRuntime)
  with ``compile: true`` (``--extra``: also eager, compiled with ``loss_chunk_tokens``, and compiled with
  ``compile_scope: model``: the whole Decoder, head and loss as one graph instead of one graph per block),
- the same Decoder in a plain loop (torch.compile of the whole model, fused AdamW, bf16 autocast),
- Hugging Face ``GPT2LMHeadModel`` (eager, sdpa) for gpt2-small,

with the planner's predicted step time and memory for that one-GPU layout next to the measured ones; then
it plans llama2-7b for this card (``meshwright plan``) and trains that layout for a few steps.

Each section runs in its own subprocess (a clean CUDA allocator per measurement, an OOM or a crash costs one
section only), with its own timeout; the whole check is sized to finish in under 8 minutes on an H100/H200.
deepspeed, megatron-core, codecarbon and fabric are blocked in every section, as on the bare GPU image.

    python benchmarks/gpu_check.py [--out report.json] [--extra] [--only gpt2_trainer_compiled,...]
    python benchmarks/gpu_check.py --cpu-smoke     # tiny sizes, fp32, no compile (but for compile_scope model): the
                                                   # plumbing on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import io
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
MARK = "GPU_CHECK_RESULT "
BLOCKED = ("deepspeed", "megatron", "codecarbon", "fabric", "invoke", "paramiko")
LLAMA_1B = {"name": "llama-1.3b", "arch": "llama", "vocab_size": 32000, "d_model": 2048, "n_layers": 22, "n_heads": 16,
            "n_kv_heads": 16, "ffn_hidden": 5632, "max_seq_len": 4096, "tie_embeddings": False}
TINY_LLAMA = {"name": "tiny-llama", "arch": "llama", "vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 4,
              "n_kv_heads": 4, "ffn_hidden": 128, "max_seq_len": 64, "tie_embeddings": False}

# per workload: model, batch, seq, timed steps, warm-up steps (GPU) and the tiny CPU twin
WORKLOADS = {
    "gpt2": {"gpu": ("gpt2-small", 16, 1024, 20, 5), "cpu": ("tiny-gpt2", 2, 64, 2, 1)},
    "llama1b": {"gpu": (LLAMA_1B, 4, 4096, 8, 3), "cpu": (TINY_LLAMA, 2, 64, 2, 1)},
}
DEFAULT_SECTIONS = ("gpt2_trainer_compiled", "gpt2_plain_compiled", "gpt2_hf_eager", "llama1b_trainer_compiled",
                    "llama1b_plain_compiled", "llama7b_planned")
EXTRA_SECTIONS = ("gpt2_trainer_eager", "gpt2_trainer_compiled_chunked",  # --extra (about 4 more minutes)
                  "gpt2_trainer_compiled_model", "gpt2_plain_compiled_with_loss", "llama1b_trainer_coat")
# the trainer and the plain loop again, with torch.profiler over 3 steps after the timed ones: device-busy
# fraction, host waits and the costliest host ops (where a gap between the two comes from)
TRACE_SECTIONS = ("gpt2_trainer_traced", "gpt2_plain_traced")
SECTIONS = DEFAULT_SECTIONS + EXTRA_SECTIONS + TRACE_SECTIONS
# caps, not estimates (expected: 40-90 s per section on an H100/H200, about 6 minutes in all)
TIMEOUT_S = {"llama7b_planned": 240, "llama1b_trainer_compiled": 180, "llama1b_plain_compiled": 150, "llama1b_trainer_coat": 240,
             "gpt2_trainer_compiled": 150, "gpt2_trainer_compiled_chunked": 150, "gpt2_trainer_compiled_model": 150,
             "gpt2_plain_compiled": 120, "gpt2_plain_compiled_with_loss": 150}


# ---- helpers run inside a section subprocess ------------------------------------------------------------
def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cluster() -> str:
    """The preset whose peak, memory bandwidth and memory describe this machine (H100/H200 share the dense bf16
    peak; the H200's HBM is 1.4x faster, which the planner's memory-bound terms use)."""
    if _device() != "cuda":
        return "local-cpu"
    import torch

    return "dgx-h200-141g" if "H200" in torch.cuda.get_device_name(0) else "dgx-h100-80g"


def _memory_budget_gib() -> float:
    import torch

    if not torch.cuda.is_available():
        return 1.0
    return round(torch.cuda.get_device_properties(0).total_memory / 2**30 * 0.93, 1)


def _reset_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _memory() -> dict[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return {"peak_reserved_gib": None, "peak_allocated_gib": None}
    return {"peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_steps(step: Callable[[], Any], warm: int, steps: int) -> tuple[float, float, list[Any]]:
    """(seconds per timed step, warm-up seconds, every step's result): ``warm`` untimed steps, then ``steps``."""
    t0 = time.perf_counter()
    out = []
    for i in range(warm + steps):
        if i == warm:
            _sync()
            t = time.perf_counter()
        out.append(step())
    _sync()
    return (time.perf_counter() - t) / steps, t - t0, out


def _time_trainer(it: Iterator[dict[str, Any]], warm: int, steps: int) -> tuple[float, float, list[float]]:
    """``_time_steps`` for the trainer, over ``Trainer.steps()`` as ``fit`` runs it: a step's loss may be read
    back after the next step is queued, so no sync is added; each yielded step has been read back, so the
    window from the last warm-up step's read-back to the last timed step's holds exactly the timed steps."""
    t0 = time.perf_counter()
    losses = [next(it)["loss"] for _ in range(warm)]
    if not warm:
        _sync()
    t = time.perf_counter()
    losses += [next(it)["loss"] for _ in range(steps)]
    return (time.perf_counter() - t) / steps, t - t0, losses


def _trace(step: Callable[[], Any], steps: int = 3) -> dict[str, Any]:
    """Where a step's time goes: wall time per step, device-busy time per step (kernels and copies, summed)
    and the host calls that wait for the device (syncs), from torch.profiler over ``steps`` steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(REPO / "benchmarks"))
    from kernel_breakdown import breakdown

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    _sync()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync()
        wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / steps
    waits = {e.key: e.count // steps for e in events if any(k in e.key for k in ("Synchronize", "cudaMemcpy", "item"))}
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {"trace_wall_step_s": round(wall, 5), "trace_device_busy_s": round(device_us / 1e6, 5),
            "trace_busy_fraction": round(device_us / 1e6 / wall, 3) if wall else None, "trace_host_waits": waits,
            "trace_top_cpu_ms": {e.key[:60]: round(e.self_cpu_time_total / 1e3 / steps, 2) for e in top},
            "trace_kernels": breakdown(prof, steps)}


def _loss_of(forward: Callable[[Any], Any], dev: str, dtype: str) -> Callable[[Any, Any], Any]:
    """bf16 autocast forward, then the fp32 cross-entropy."""
    import torch
    import torch.nn.functional as F

    def loss_fn(inp: Any, tgt: Any) -> Any:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = forward(inp)
        return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())

    return loss_fn


def _step_of(loss_fn: Callable[[Any, Any], Any], model: Any, opt: Any, x: Any) -> Callable[[], Any]:
    """One plain training step around ``loss_fn``: backward, clip, optimizer step."""
    import torch

    def step() -> Any:
        loss = loss_fn(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _loop_step(forward: Callable[[Any], Any], model: Any, opt: Any, x: Any, dtype: str) -> Callable[[], Any]:
    """One plain training step: bf16 autocast forward, fp32 loss, backward, clip, optimizer step."""
    return _step_of(_loss_of(forward, x.device.type, dtype), model, opt, x)


def _loop_step_compiled_loss(model: Any, opt: Any, x: Any, dtype: str) -> Callable[[], Any]:
    """The plain step with forward, head and loss as one ``torch.compile`` graph (the stronger plain baseline: inductor
    fuses the cross-entropy over the logits and pads an unaligned head, as the trainer's compiled loss does)."""
    import torch

    return _step_of(torch.compile(_loss_of(model, x.device.type, dtype)), model, opt, x)


def _rates(model_cfg: Any, batch: int, seq: int, seconds_per_step: float, dtype: str) -> dict[str, float]:
    from meshwright.config import load_cluster
    from meshwright.tools.flops import model_flops_per_token
    from meshwright.tools.mfu import mfu

    tps = batch * seq / seconds_per_step
    return {"step_s": round(seconds_per_step, 5), "tokens_per_s": round(tps),
            "mfu": round(mfu(tps, float(model_flops_per_token(model_cfg, seq, "palm")), load_cluster(_cluster()), dtype), 4)}


def _plan_cli(model: Any, seq: int, batch: int, out_dir: Path, *constraints: str) -> dict[str, Any]:
    """``meshwright plan --json`` for one device of this machine; returns its JSON (with the Plan's path)."""
    from meshwright.cli import main as cli

    model_ref = model
    if isinstance(model, dict):
        from meshwright.config.io import write_yaml
        from meshwright.config import load_model_config

        model_ref = str(out_dir / f"{model['name']}.yaml")
        write_yaml(load_model_config(model), model_ref)
    plan_path = out_dir / f"plan_{model_ref if isinstance(model, str) else model['name']}.yaml"
    argv = ["plan", "--model", str(model_ref), "--cluster", _cluster(), "--nodes", "1", "--devices-per-node", "1",
            "--memory-budget-gib", str(_memory_budget_gib()), "--seq-len", str(seq), "--global-batch", str(batch),
            "--json", "--out", str(plan_path), *constraints]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli(argv)
    if rc not in (0, None):
        raise RuntimeError(f"meshwright plan exited {rc}: {' '.join(argv)}")
    out = json.loads(buf.getvalue())
    out["plan_path"] = str(plan_path)
    return out


def _predicted(plan_json: dict[str, Any]) -> dict[str, Any]:
    p = plan_json.get("predicted") or {}
    return {"predicted_step_s": p.get("step_s"), "predicted_memory_gib": p.get("memory_gib_max"),
            "predicted_reserved_gib": (p.get("breakdown") or {}).get("mem_reserved_gib"),
            "predicted_mfu": p.get("mfu"), "layout": plan_json.get("layout")}


def _trainer_run(model: Any, batch: int, seq: int, steps: int, warm: int, dtype: str, compile_: bool, tmp: Path,
                 plan: str | None = None, micro_batch: int | None = None, loss_chunk: int = 0,
                 trace: bool = False, compile_scope: str = "blocks", optimizer: str | None = None) -> dict[str, Any]:
    """``Trainer.train_step`` on the runtime ``meshwright train`` builds for this config (no eval, logging or
    checkpoint in the timed window). lr 3e-4: the default preset's 3e-3 is for tiny models and, with one
    warm-up step, made llama2-7b's loss climb (11.5 -> 29.7 in three steps on the H200)."""
    from meshwright.config import load_train_config
    from meshwright.data.loader import build_loaders
    from meshwright.train.build import TrainingJob, build_runtime
    from meshwright.train.trainer import Trainer

    cfg = load_train_config({"model": model, "cluster": _cluster(), "seq_len": seq, "global_batch": batch,
                             "micro_batch": micro_batch or batch, "steps": warm + steps + (3 if trace else 0),
                             "warmup_steps": 1, "lr": 3e-4,
                             "dtype": dtype, "compile": compile_, "compile_scope": compile_scope,
                             "loss_chunk_tokens": loss_chunk, "plan": plan,
                             "eval_every": 0, "energy": False, "progress": False, "auto_profile": False,
                             "out_dir": str(tmp / "run"), "data": {"path": "default", "max_files": 120},
                             **({"optimizer": optimizer} if optimizer else {})})
    t_build = time.perf_counter()
    job = TrainingJob.resolve(cfg)
    runtime = build_runtime(job)
    train, val, _ = build_loaders(cfg, job.model.vocab_size, runtime.dp_rank, runtime.dp_size, False)
    trainer = Trainer(cfg, runtime, train, val, job.model, job.cluster, out_dir=tmp / "run", print_fn=lambda s: None)
    build_s = time.perf_counter() - t_build
    _reset_memory()
    it = trainer.steps()
    dt, warmup_s, losses = _time_trainer(it, warm, steps)
    traced = _trace(it.__next__) if trace else {}
    out = {**traced, **_rates(job.model, batch, seq, dt, runtime.compute_dtype), **_memory(), "compute_dtype": runtime.compute_dtype,
           "runtime": type(runtime).__name__, "init": getattr(runtime, "init", None), "warmup_s": round(warmup_s, 1),
           "build_s": round(build_s, 1),
           "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4), "compile": compile_,
           "loss_chunk_tokens": loss_chunk, "compile_scope": compile_scope}
    from meshwright.memory.fp8_activations import FP8Linear

    out["fp8_linears"] = sum(isinstance(m, FP8Linear) and m._fp8_gemm is not None for m in runtime.model.modules())
    out["optimizer"] = type(trainer.optimizer).__name__
    trainer.close()  # the optimizer, the trainer's groups and the runtime (DDP first) before any teardown
    return out


def _plain_loop(model_cfg: Any, batch: int, seq: int, steps: int, warm: int, dtype: str, compile_: bool,
                trace: bool = False, with_loss: bool = False) -> dict[str, Any]:
    """The same Decoder in a minimal loop: torch.compile(model), fused AdamW, bf16 autocast, fp32 loss."""
    import torch

    from meshwright.config import load_model_config
    from meshwright.models import build_model

    cfg = load_model_config(model_cfg)
    dev = _device()
    model = build_model(cfg, device=dev, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **({"fused": True} if dev == "cuda" else {}))
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=dev)
    _reset_memory()
    if with_loss:  # forward, head and loss in one compiled graph
        step = _loop_step_compiled_loss(model, opt, x, dtype)
    else:
        step = _loop_step(torch.compile(model) if compile_ else model, model, opt, x, dtype)
    dt, warmup_s, losses = _time_steps(step, warm, steps)
    traced = _trace(step) if trace else {}
    return {**traced, **_rates(cfg, batch, seq, dt, dtype), **_memory(), "warmup_s": round(warmup_s, 1), "compile": compile_,
            "loss_last": round(float(losses[-1]), 4)}


def _hf_loop(batch: int, seq: int, steps: int, warm: int, dtype: str, smoke: bool) -> dict[str, Any]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from meshwright.config import load_model_config

    dev = _device()
    if smoke:
        hf_cfg = GPT2Config(n_positions=seq, n_embd=64, n_layer=2, n_head=4, vocab_size=256, attn_implementation="sdpa")
    else:
        hf_cfg = GPT2Config(n_positions=1024, attn_implementation="sdpa")
    model = GPT2LMHeadModel(hf_cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **({"fused": True} if dev == "cuda" else {}))
    x = torch.randint(0, hf_cfg.vocab_size, (batch, seq + 1), device=dev)
    _reset_memory()
    dt, _, _ = _time_steps(_loop_step(lambda inp: model(inp).logits, model, opt, x, dtype), warm, steps)
    ref = load_model_config("tiny-gpt2" if smoke else "gpt2-small")  # same shape: same FLOPs per token
    return {**_rates(ref, batch, seq, dt, dtype), **_memory(), "params": sum(p.numel() for p in model.parameters())}


def _coat_trainer(model: Any, batch: int, seq: int, steps: int, warm: int, dtype: str, compile_: bool,
                  tmp: Path) -> dict[str, Any]:
    """COAT as users run it: ``meshwright train`` with a Plan whose every block has FP8 activations and FP8 GEMMs and
    whose optimizer keeps FP8 states (CoatAdamW), one device, beside the planner's prediction of that Plan. The
    issue-18 figures come from a plain loop (bench_coat_gpu.py); this is the trainer's path (per-block compile,
    DistributedRuntime, the planned savers)."""
    from meshwright.config import load_cluster, load_model_config
    from meshwright.launcher.planner import cost_model as cm
    from meshwright.plan import LayerStrategy, OptimizerSpec, Plan, Savers

    cfg = load_model_config(model)
    plan = Plan(model=cfg.name, cluster=_cluster(), seq_len=seq, global_batch=batch, micro_batch=batch,
                layers=[LayerStrategy(savers=Savers(fp8_act=True, fp8_gemm=True), repeat=cfg.n_layers)],
                optimizer=OptimizerSpec(states="fp8"))
    hw = cm.hardware_from_cluster(load_cluster(_cluster()))
    pred = cm.evaluate_plan(plan, cfg, dataclasses.replace(hw, compiled=compile_), 1)
    path = tmp / "plan_coat.yaml"
    plan.save(path)
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())})
    res = _trainer_run(model, batch, seq, steps, warm, dtype, compile_, tmp, plan=str(path), micro_batch=batch,
                       optimizer="coat_adamw")
    return {**res, "predicted_step_s": round(pred.step_s, 5), "predicted_memory_gib": round(max(pred.memory_gib), 3),
            "layout": "COAT: fp8_act + fp8_gemm on every block, fp8 optimizer states"}


def run_section(name: str, smoke: bool) -> dict[str, Any]:
    """One measurement, in this (sub)process."""
    for m in BLOCKED:
        sys.modules[m] = None  # type: ignore[assignment]
    dtype, compile_ = ("fp32", False) if smoke else ("bf16", True)
    kind = "cpu" if smoke else "gpu"
    tmp = Path(tempfile.mkdtemp(prefix=f"gpu_check_{name}_"))
    work = name.split("_")[0]
    if work in WORKLOADS:
        model, batch, seq, steps, warm = WORKLOADS[work][kind]
    if name == "gpt2_trainer_traced":
        return _trainer_run(model, batch, seq, steps, warm, dtype, compile_, tmp, trace=True)
    if name == "gpt2_plain_traced":
        return _plain_loop(model, batch, seq, steps, warm, dtype, compile_, trace=True)
    if name in ("gpt2_trainer_eager", "gpt2_trainer_compiled", "gpt2_trainer_compiled_chunked", "gpt2_trainer_compiled_model",
                "llama1b_trainer_compiled"):
        scope = "model" if name.endswith("_model") else "blocks"
        # compile_scope model exists only compiled: the CPU smoke compiles it too (inductor, tiny model), as it checks
        # that section's plumbing; the other smoke sections stay eager
        compiled = (compile_ or scope == "model") and not name.endswith("eager")
        chunk = (seq * batch // 4) if name.endswith("chunked") else 0  # four chunks: 1/4 of the logits at a time
        try:  # the planner's prediction for this very layout (one device, no recompute, one micro-batch)
            predicted = _predicted(_plan_cli(model, seq, batch, tmp, "--tp", "1", "--pp", "1", "--dp", "1",
                                             "--recompute", "none", "--micro-batch", str(batch),
                                             *(["--compile"] if compiled else []),
                                             *(["--loss-chunk-tokens", str(chunk)] if chunk else [])))
        except Exception as e:  # e.g. the planner predicts it does not fit: measure anyway
            predicted = {"plan_error": f"{type(e).__name__}: {str(e)[:300]}"}
        if scope == "model":  # the planner models per-block graphs only: its figures are those of compile_scope blocks
            predicted["predicted_for_compile_scope"] = "blocks"
        res = _trainer_run(model, batch, seq, steps, warm, dtype, compiled, tmp, loss_chunk=chunk, compile_scope=scope)
        return {**res, **predicted}
    if name == "llama1b_trainer_coat":
        return _coat_trainer(model, batch, seq, steps, warm, dtype, compile_, tmp)
    if name in ("gpt2_plain_compiled", "llama1b_plain_compiled"):
        return _plain_loop(model, batch, seq, steps, warm, dtype, compile_)
    if name == "gpt2_plain_compiled_with_loss":  # compiled on CPU too: the section exists to compile the loss
        return {**_plain_loop(model, batch, seq, steps, warm, dtype, True, with_loss=True), "compile": True}
    if name == "gpt2_hf_eager":
        return _hf_loop(batch, seq, steps, warm, dtype, smoke)
    if name == "llama7b_planned":
        model, seq, batch = ("tiny", 64, 4) if smoke else ("llama2-7b", 4096, 4)
        plan = _plan_cli(model, seq, batch, tmp, *(["--compile"] if compile_ else []))
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
        from meshwright.plan import load_plan

        mb = load_plan(plan["plan_path"]).micro_batch
        res = _trainer_run(model, batch, seq, 2, 1, dtype, compile_, tmp, plan=plan["plan_path"], micro_batch=mb)
        return {**res, **_predicted(plan), "micro_batch": mb}
    raise ValueError(f"section={name!r} is invalid; valid: {', '.join(SECTIONS)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the orchestrator -----------------------------------------------------------------------------------
def _spawn(name: str, smoke: bool, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name] + (["--cpu-smoke"] if smoke else [])
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": round(time.perf_counter() - t0, 1)}
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return {**json.loads(line[len(MARK):]), "wall_s": round(time.perf_counter() - t0, 1)}
    tail = (proc.stderr or proc.stdout)[-600:]
    return {"error": f"rc={proc.returncode}: {tail}", "wall_s": round(time.perf_counter() - t0, 1)}


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str = "tokens_per_s") -> float | None:
    if a.get(key) and b.get(key):
        return round(a[key] / b[key], 3)
    return None


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios side by side, and the issue's targets next to them."""
    r = results
    out: dict[str, Any] = {
        "gpt2_trainer_compiled_over_plain_compiled": _ratio(r.get("gpt2_trainer_compiled", {}), r.get("gpt2_plain_compiled", {})),
        "gpt2_trainer_eager_over_plain_compiled": _ratio(r.get("gpt2_trainer_eager", {}), r.get("gpt2_plain_compiled", {})),
        "gpt2_trainer_chunked_over_plain_compiled": _ratio(r.get("gpt2_trainer_compiled_chunked", {}),
                                                           r.get("gpt2_plain_compiled", {})),
        # compile_scope model vs blocks: what the per-block compile costs against one whole-model graph
        "gpt2_trainer_model_scope_over_plain_compiled": _ratio(r.get("gpt2_trainer_compiled_model", {}),
                                                               r.get("gpt2_plain_compiled", {})),
        "gpt2_trainer_model_scope_over_blocks_scope": _ratio(r.get("gpt2_trainer_compiled_model", {}),
                                                             r.get("gpt2_trainer_compiled", {})),
        # against the stronger plain baseline: forward, head and loss in one compiled graph
        "gpt2_trainer_compiled_over_plain_compiled_with_loss": _ratio(r.get("gpt2_trainer_compiled", {}),
                                                                      r.get("gpt2_plain_compiled_with_loss", {})),
        "gpt2_trainer_compiled_over_hf_eager": _ratio(r.get("gpt2_trainer_compiled", {}), r.get("gpt2_hf_eager", {})),
        "llama1b_trainer_compiled_over_plain_compiled": _ratio(r.get("llama1b_trainer_compiled", {}),
                                                               r.get("llama1b_plain_compiled", {})),
        "llama1b_trainer_mfu": r.get("llama1b_trainer_compiled", {}).get("mfu"),
        # COAT through the trainer against the bf16 trainer: throughput, and memory as "x lower"
        "llama1b_trainer_coat_over_compiled": _ratio(r.get("llama1b_trainer_coat", {}), r.get("llama1b_trainer_compiled", {})),
        "llama1b_trainer_coat_memory_x_lower": _ratio(r.get("llama1b_trainer_compiled", {}), r.get("llama1b_trainer_coat", {}),
                                                       "peak_reserved_gib"),
        "targets": {"gpt2_trainer_over_plain_compiled": ">= 0.95", "llama1b_mfu": ">= 0.55 (PaLM, 989.5 TFLOP/s bf16)",
                    "llama7b_planned": "trains without OOM"},
    }
    for name, res in r.items():
        if res.get("predicted_step_s") and res.get("step_s"):
            out[f"{name}_measured_over_predicted_step_s"] = round(res["step_s"] / res["predicted_step_s"], 3)
        if res.get("predicted_memory_gib") and res.get("peak_reserved_gib"):
            out[f"{name}_measured_over_predicted_memory"] = round(res["peak_reserved_gib"] / res["predicted_memory_gib"], 3)
        if res.get("predicted_reserved_gib") and res.get("peak_reserved_gib"):  # like with like: the allocator's peak
            out[f"{name}_measured_over_predicted_reserved"] = round(res["peak_reserved_gib"] / res["predicted_reserved_gib"], 3)
    out["llama7b_planned_trained"] = "error" not in r.get("llama7b_planned", {"error": "not run"})
    return out


def _report(env: dict[str, Any], results: dict[str, dict[str, Any]], t0: float) -> str:
    return json.dumps({"env": env, "results": results, "summary": summarise(results),
                       "total_s": round(time.perf_counter() - t0, 1)}, indent=1)


def _sdpa_backends() -> dict[str, str]:
    """The kernel SDPA picks for each check's attention shape (bf16, causal): the planner's attention term depends on it
    (cuDNN's attention on Hopper with torch >= 2.11, FlashAttention-2 elsewhere; launcher/planner/cost_model.py)."""
    import torch
    from torch.nn.attention import SDPBackend

    names = {int(getattr(SDPBackend, n)): n.lower() for n in dir(SDPBackend) if n.isupper()}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for label, heads, seq, d in (("gpt2 (d64, s1024)", 12, 1024, 64), ("llama (d128, s4096)", 16, 4096, 128)):
        q = torch.empty(1, heads, seq, d, device=dev, dtype=torch.bfloat16)
        out[label] = names.get(int(torch._fused_sdp_choice(q, q, q, is_causal=True)), "?")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny sizes, fp32, no compile but for compile_scope model (CPU plumbing check)")
    ap.add_argument("--only", default="", help=f"comma-separated sections (default: {','.join(DEFAULT_SECTIONS)})")
    ap.add_argument("--extra", action="store_true", help=f"also run {', '.join(EXTRA_SECTIONS)}")
    ap.add_argument("--out", default=None, help="also write the JSON report here")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one section in this process
    args = ap.parse_args(argv)
    if args.section:
        print(MARK + json.dumps(run_section(args.section, args.cpu_smoke)), flush=True)
        return 0
    names = [s for s in args.only.split(",") if s] or list(DEFAULT_SECTIONS + (EXTRA_SECTIONS if args.extra else ()))
    bad = [n for n in names if n not in SECTIONS]
    if bad:
        ap.error(f"--only={bad[0]!r} is invalid; valid: {', '.join(SECTIONS)}")
    import torch

    t0 = time.perf_counter()
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "cpu_smoke": args.cpu_smoke, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "sdpa_backend": _sdpa_backends()}
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        results[name] = _spawn(name, args.cpu_smoke, TIMEOUT_S.get(name, 100) * (3 if args.cpu_smoke else 1))
        print(f"[{time.perf_counter() - t0:6.1f}s] {name}: {json.dumps(results[name])[:300]}", file=sys.stderr, flush=True)
        text = _report(env, results, t0)
        if args.out:  # after every section: a check cut short by an outer timeout still leaves what it measured
            Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
