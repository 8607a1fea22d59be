"""Shared pieces of the torchrun parity scripts: data, the one-process reference, full gradients.

Tolerance: relative L2 error ||x - ref|| / ||ref|| <= 1e-5 for losses, gradients and grad norms
(fp32 on CPU; reductions in a different order differ by ~1e-7 relative).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from typing import Callable
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: patience

from meshwright.config import load_model_config  # noqa: E402
from patience import pg_timeout  # noqa: E402,F401 - the workers' gloo timeouts, stretched by the box's load
from meshwright.models import build_model, lm_loss  # noqa: E402

RTOL = 1e-5
SEED = 7
CFG = load_model_config({"name": "tiny-par", "arch": "llama", "vocab_size": 256, "d_model": 64, "n_layers": 4,
                         "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 128, "max_seq_len": 64})
# Qwen3's layout: q/k head norms (tp-replicated weights on tp-sharded heads), head_dim independent of d_model/n_heads
QK_CFG = load_model_config({**CFG.__dict__, "name": "tiny-par-qk", "qk_norm": True, "attn_head_dim": 24})
# Gemma's layout on top of it: (1+w) norms (post norms too: tp-replicated, sequence-split under sp), GeGLU, scaled
# embeddings, the query scalar, capped scores (the explicit attention path on tp-local heads) and logits, a window of 5
# on all but every 2nd block with its own rope base (sequences of 16)
GEMMA_CFG = load_model_config({**QK_CFG.__dict__, "name": "tiny-par-gemma", "norm_unit_offset": True,
                               "mlp_act": "gelu_tanh", "scale_embeddings": True, "query_pre_attn_scalar": 16,
                               "post_norms": True, "attn_softcap": 5.0, "final_softcap": 3.0, "sliding_window": 5,
                               "global_every": 2, "rope_local_theta": 100.0})
SEQ, GLOBAL, MICRO, STEPS, MAX_NORM, LR = 16, 8, 2, 3, 0.5, 1e-2


def plan(layers, pipeline=None, embedding=None) -> dict:
    """A Plan mapping for the tiny parity model (batch shape of ``batch``/``shard``)."""
    d = {"model": "tiny-par", "seq_len": 16, "global_batch": GLOBAL, "micro_batch": MICRO, "layers": layers}
    if pipeline:
        d["pipeline"] = pipeline
    if embedding:
        d["embedding"] = embedding
    return d


def uniform(**kw) -> list[dict]:
    """One strategy for every layer of the parity model."""
    return [{**kw, "repeat": CFG.n_layers}]


def init(timeout_s: int = 60) -> tuple[int, int]:
    """The default gloo group, ``timeout_s`` on a quiet box (stretched by the load: tests/patience.py)."""
    dist.init_process_group("gloo", timeout=pg_timeout(timeout_s))
    torch.set_num_threads(1)
    return dist.get_rank(), dist.get_world_size()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    tok = torch.randint(0, CFG.vocab_size, (GLOBAL, SEQ + 1), generator=g)
    return tok[:, :-1], tok[:, 1:]


def shard(step: int, dp_rank: int, dp_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = batch(step)
    per = GLOBAL // dp_size
    x, y = x[dp_rank * per:(dp_rank + 1) * per], y[dp_rank * per:(dp_rank + 1) * per]
    return [(x[i:i + MICRO], y[i:i + MICRO]) for i in range(0, per, MICRO)]


def make_opt(groups):
    return torch.optim.AdamW(groups, lr=LR, weight_decay=0.1)


def reference(steps: int = STEPS, model=None, opt=None, start: int = 0) -> list[dict]:
    """One-process run: per step the loss, the full gradients (before clipping) and the grad norm."""
    model = model or build_model(CFG, seed=SEED)
    opt = opt or make_opt([{"params": [p for p in model.parameters() if p.dim() >= 2]},
                          {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}])
    out = []
    for step in range(start, start + steps):
        x, y = batch(step)
        loss = lm_loss(model(x), y)
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM))
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append({"loss": float(loss.detach()), "grads": grads, "norm": norm})
    return out


def dp_copies_reference(copies: list, steps: int, after_step: Callable[[list], dict] | None = None) -> list[dict]:
    """The exact objective of data parallelism in one process: ``dp = len(copies)`` copies of one model (same
    weights), copy r on data shard r, (LM + aux) / (micro-batches x dp) per micro-batch; per step the logged LM loss,
    the trainable gradients summed over the copies (before clipping), the grad norm; AdamW on copy 0's trainable
    parameters (the runtime's groups: matrices decayed, vectors not), copied to the others after each step.
    ``after_step(copies)`` adds fields to a step's row (e.g. router statistics of the copies' last forwards)."""
    dp, m0 = len(copies), copies[0]
    trainable = [(n, q) for n, q in m0.named_parameters() if q.requires_grad]
    opt = make_opt([{"params": [q for _, q in trainable if q.dim() >= 2]},
                    {"params": [q for _, q in trainable if q.dim() < 2], "weight_decay": 0.0}])
    out = []
    for step in range(steps):
        lm_total = 0.0
        for r, model in enumerate(copies):
            micro = shard(step, r, dp)
            for x, y in micro:
                loss = lm_loss(model(x), y)
                aux = model.aux_loss()
                ((loss if aux is None else loss + aux) / (len(micro) * dp)).backward()
                lm_total += float(loss.detach()) / (len(micro) * dp)
        frozen_grads = [n for c in copies for n, q in c.named_parameters()
                        if not q.requires_grad and q.grad is not None]
        assert not frozen_grads, f"the one-process reference gave frozen parameters gradients: {frozen_grads[:3]}"
        grads = {}
        for n, q in trainable:
            gs = [dict(c.named_parameters())[n].grad for c in copies]
            grads[n] = sum(g for g in gs if g is not None)
            q.grad = grads[n].clone()
        for c in copies[1:]:
            c.zero_grad(set_to_none=True)
        norm = float(torch.nn.utils.clip_grad_norm_([q for _, q in trainable], MAX_NORM))
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for c in copies[1:]:
                for a, b in zip(c.parameters(), m0.parameters()):
                    a.copy_(b)
        out.append({"loss": lm_total, "grads": {k: v.detach().clone() for k, v in grads.items()}, "norm": norm,
                    **(after_step(copies) if after_step is not None else {})})
    return out


def load_perturbed(model, path, adapters: Callable | None = None) -> tuple:
    """Resume the checkpoint at ``path`` in one process into ``model`` whose trainable parameters were first moved
    (+0.5), so only a load that overwrites them passes: (LocalRuntime, its AdamW, the checkpoint's meta).
    ``adapters(rt)`` gives the AdapterScope of an adapter-only checkpoint."""
    from meshwright.train.checkpoint import load_runtime
    from meshwright.train.local_runtime import LocalRuntime

    with torch.no_grad():  # other values than the run's: the checkpoint must overwrite them
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    rt = LocalRuntime(model)
    opt = rt.build_optimizer(make_opt)
    meta = load_runtime(path, rt, opt, adapters=adapters(rt) if adapters is not None else None)
    return rt, opt, meta


def rel(a: torch.Tensor | float, b: torch.Tensor | float, floor: float = 1e-30) -> float:
    """||a - b|| / ||b||, the denominator at least ``floor`` (:func:`grad_floor` for a parameter's gradient)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(floor))


# Some gradients are zero in exact arithmetic and only rounding in fp32: a key projection's bias (softmax ignores a
# score shift common to a row, so the bias's gradient sums dS rows that sum to 0). Their relative error compares
# two roundings and says nothing (0.38 on one CPU, below 1e-3 on another, same code). A parameter's gradient error is
# therefore taken relative to its own norm, or to this fraction of the whole gradient's norm if that is larger.
GRAD_FLOOR = 1e-4


def grad_floor(grads: dict[str, torch.Tensor]) -> float:
    """GRAD_FLOOR x the norm of all of ``grads`` together (the reference run's gradients)."""
    return GRAD_FLOOR * float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))


def full_grads(rt) -> dict[str, torch.Tensor]:
    """This rank's gradients as full tensors keyed by the plain model's names (collective per stage)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in rt.model.named_parameters():
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            g = g.full_tensor()
        elif p in getattr(rt, "_megatron_shards", {}):
            dim, tp = rt._megatron_shards[p]
            group = rt.meshes.tp_mesh(tp).get_group()
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g.contiguous(), group=group)
            g = torch.cat(parts, dim=dim)
        out[name] = g.detach().clone()
    return out


class Report:
    """Collects per-case results on rank 0 and writes them as JSON for the pytest wrapper."""

    def __init__(self, path: str | None) -> None:
        self.path, self.cases = path, {}
        self._last = time.perf_counter()

    def add(self, name: str, ok: bool, detail: dict) -> None:
        """Record a case; ``wall_s`` (seconds since the previous case was added) says where a slow launch spends
        its time -- for reading, never for asserting."""
        now = time.perf_counter()
        self.cases[name] = {"ok": ok, **detail, "wall_s": round(now - self._last, 2)}
        self._last = now

    def gather_and_write(self) -> None:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.cases)
        if dist.get_rank() == 0 and self.path:
            merged: dict = {}
            for r, part in enumerate(parts):
                for k, v in part.items():
                    m = merged.setdefault(k, {"ok": True, "ranks": {}})
                    m["ok"] = m["ok"] and v["ok"]
                    m["ranks"][r] = v
            Path(self.path).write_text(json.dumps(merged, indent=1, default=str))


def count_chunk_forwards(rt) -> list[int]:
    """A live count of the forwards each of ``rt``'s pipeline chunks runs (a pre-hook on each chunk)."""
    calls = [0] * len(rt.chunks)
    for i, chunk in enumerate(rt.chunks):
        chunk.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def stage_casts(rt) -> int:
    """Outputs the pipeline stages of ``rt`` had to cast to their declared dtype (pipeline.FixedOutput): 0 when
    ``DistributedRuntime._stage_io`` knew the layout's dtypes."""
    stages = [st for sched in rt._schedules.values() for st in getattr(sched, "_stages", [getattr(sched, "_stage", None)])]
    return sum(getattr(st.submod, "casts", 0) for st in stages if st is not None)


def check_runtime(rt, ref: list[dict], steps: int = STEPS, start: int = 0, check_grads: bool = True, opt=None) -> dict:
    """Train ``steps`` steps on ``rt``; compare loss, grads (first step) and grad norm with ``ref``. Under pp also
    count each chunk's forwards: exactly one per micro-batch of every eval and step (torch's shape-inference pass,
    a forward on an uninitialised buffer at each schedule's first step, would add one per schedule)."""
    opt = opt or rt.build_optimizer(make_opt)
    pp = rt.meshes.pp > 1
    calls = count_chunk_forwards(rt) if pp else []
    n_mb = len(shard(start, rt.dp_rank, rt.dp_size))
    worst = {"loss": 0.0, "grad": 0.0, "norm": 0.0, "eval": 0.0}
    worst_name = ""
    # eval_loss before the first update sees the same weights and batch as the reference's first loss
    worst["eval"] = rel(rt.eval_loss(shard(start, rt.dp_rank, rt.dp_size)), ref[0]["loss"])
    for k in range(steps):
        step = start + k
        loss = rt.forward_backward(shard(step, rt.dp_rank, rt.dp_size))
        worst["loss"] = max(worst["loss"], rel(loss, ref[k]["loss"]))
        if check_grads and k == 0:
            for name, g in full_grads(rt).items():
                e = rel(g, ref[k]["grads"][name])
                if e > worst["grad"]:
                    worst["grad"], worst_name = e, name
        norm = rt.clip_grad_norm_(MAX_NORM)
        worst["norm"] = max(worst["norm"], rel(norm, ref[k]["norm"]))
        rt.optimizer_step(opt)
    ok = all(v <= RTOL for v in worst.values()) and all(math.isfinite(v) for v in worst.values())
    from meshwright.parallel.data_parallel import sharded_state_bytes

    extra = {}
    if pp:
        extra = {"chunk_forwards": list(calls), "chunk_forwards_expected": [(1 + steps) * n_mb] * len(calls),
                 "stage_casts": stage_casts(rt)}
        ok = ok and extra["chunk_forwards"] == extra["chunk_forwards_expected"] and extra["stage_casts"] == 0
    return {"ok": ok, **worst, "worst_grad_param": worst_name, "opt": opt, "opt_state_bytes": sharded_state_bytes(opt),
            **extra}


def failure(label: str, exc: BaseException) -> dict:
    """A failed case's result (error and traceback tail), also printed to stderr for the pytest log; call
    it inside the ``except`` block so the traceback is the case's."""
    res = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()[-3000:]}
    print(f"[rank{dist.get_rank()}] {label} failed:\n{res['tb']}", file=sys.stderr, flush=True)
    return res


def run_worker(main: Callable[[], None]) -> None:
    """Run a torchrun worker's ``main`` and end the process without C++ teardown: gloo on torch 2.13
    sometimes aborts at interpreter exit after a finished run (``meshwright.parallel.mesh.exit_worker``)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    from meshwright.parallel.mesh import exit_worker

    exit_worker(0)


def full_state(rt, opt) -> dict:
    """Collective (where a process group exists): the state a checkpoint holds (``checkpoint_state``'s keys, flattened as DCP flattens them:
    ``model.<fqn>``, ``optim.state.<fqn>.exp_avg``, ``optim.param_groups.<fqn>.lr``, ...) as full tensors and plain
    values, every rank's entries merged (pipeline stages, ZeRO-1 owners): whatever the layout, equal bit for bit
    after an exact save and resharded load. The kernel settings (foreach, ...) are the layout's own and left out."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.tensor import DTensor

    from meshwright.train.checkpoint import KERNEL_KEYS

    flat, _ = flatten_state_dict(rt.checkpoint_state(opt))
    mine = {}
    for key in sorted(flat):
        if key.startswith("optim.param_groups.") and key.rsplit(".", 1)[-1] in KERNEL_KEYS:
            continue
        v = flat[key]
        v = v.full_tensor() if isinstance(v, DTensor) else v
        mine[key] = v.detach().clone() if torch.is_tensor(v) else v
    if not dist.is_initialized():  # one process: the whole state is here
        return mine
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def state_diff(a: dict, b: dict) -> list[str]:
    """The keys where two ``full_state``s differ (missing on one side, another shape, value or setting); [] if equal."""
    out = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        same = (torch.is_tensor(x) and torch.is_tensor(y) and x.shape == y.shape and x.dtype == y.dtype
                and torch.equal(x, y)) if torch.is_tensor(x) or torch.is_tensor(y) else x == y
        if not same:
            out.append(k)
    return out
