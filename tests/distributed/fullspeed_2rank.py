"""Two-rank checks of issue 16 (one torchrun launch): under each layout the matmuls run in bf16 when the
precision policy says so, and the losses track the one-process bf16 run; ``compile`` composes with the
layouts; meta-device initialisation gives the one-process model's weights bitwise, megatron-core tp and
per-layer memory savers (FP8 activations/GEMMs, WTA-CRS) included.

Tolerance (bf16): relative loss error <= BF16_RTOL per step over STEPS steps. bf16 keeps 8 mantissa bits
(~4e-3 relative per rounding); layouts sum partial products in other orders and FSDP2 reduces gradients
in fp32 while the one-process run accumulates them in place, so they differ by a few 1e-3 at most.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from parity_lib import (
    CFG,
    MAX_NORM,
    MICRO,
    RTOL,
    SEED,
    SEQ,
    STEPS,
    Report,
    check_runtime,
    failure,
    full_grads,
    init,
    make_opt,
    plan,
    reference,
    rel,
    run_worker,
    shard,
    uniform,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from meshwright.config import load_model_config
from meshwright.memory.fp8_activations import FP8Linear
from meshwright.memory.wta_crs import WTACRSLinear
from meshwright.models import build_model
from meshwright.parallel import runtime as runtime_mod
from meshwright.parallel.runtime import DistributedRuntime, apply_plan_savers
from meshwright.plan import plan_from_dict
from meshwright.train.local_runtime import LocalRuntime
from meshwright.train.precision import PrecisionPolicy

BF16_RTOL = 5e-3


BF16_CASES = {
    "bf16_dp2_ddp": (plan(uniform(dp=2)), "dtensor"),
    "bf16_dp2_zero3_fsdp": (plan(uniform(dp=2, zero=3), embedding={"zero": 3}), "dtensor"),
    "bf16_tp2_dtensor": (plan(uniform(tp=2)), "dtensor"),
    "bf16_tp2_sp_recompute": (plan(uniform(tp=2, sp=True, recompute="full")), "dtensor"),
    "bf16_pp2_1f1b": (plan(uniform(), pipeline={"degree": 2, "schedule": "1f1b", "microbatches": 4}), "dtensor"),
}


# compile: true composed with each layout (aot_eager: dynamo + AOTAutograd trace the same graphs inductor would
# get, without its C++ build per rank); fp32 losses within COMPILE_RTOL of the one-process eager run
COMPILE_RTOL = 1e-4
COMPILE_CASES = {
    "compile_dp2_zero3_fsdp_recompute": plan(uniform(dp=2, zero=3, recompute="full"), embedding={"zero": 3}),
    "compile_tp2_sp": plan(uniform(tp=2, sp=True)),
    "compile_pp2_1f1b": plan(uniform(), pipeline={"degree": 2, "schedule": "1f1b", "microbatches": 4}),
}


# compile with megatron-core tp (train/compile.py compile_megatron_tp_block): per block the norms, the attention core
# (RoPE, GQA repeat, SDPA) and the MLP gating compiled, megatron's parallel linears eager between them; eval loss,
# 3 steps' losses and grad norms and the first step's gradients within parity_lib.RTOL = 1e-5 of the one-process
# eager run (fp32), plain and under full recompute (the compiled parts rerun inside the checkpoint)
MEGATRON_COMPILE_CASES = {
    "compile_megatron_tp2": plan(uniform(tp=2)),
    "compile_megatron_tp2_recompute": plan(uniform(tp=2, recompute="full")),
}


# the head inside the loss: under compile the last stage's output projection runs in the compiled loss graph (DDP,
# FSDP2 with the head itself FSDP-wrapped, the last pipeline stage); loss_chunk_tokens runs head + loss per chunk of
# HEAD_CHUNK tokens (a micro-batch's 2 x 16 = 32 tokens -> 12, 12, 8: the last chunk shorter), eager and compiled.
# Eval loss, 3 steps' losses and grad norms, and the first step's gradients match the one-process eager run within
# parity_lib.RTOL = 1e-5 (fp32: only the order of reductions differs)
HEAD_CHUNK = 12
FSDP_HEAD = plan(uniform(dp=2, zero=3), embedding={"zero": 3})  # embedding.zero 3: the head is FSDP2-wrapped too
PP2 = plan(uniform(), pipeline={"degree": 2, "schedule": "1f1b", "microbatches": 4})
HEAD_CASES = {
    "headloss_compile_dp2_ddp": (plan(uniform(dp=2)), "aot_eager", 0),
    "headloss_compile_dp2_zero3_fsdp": (FSDP_HEAD, "aot_eager", 0),
    "headloss_compile_pp2_1f1b": (PP2, "aot_eager", 0),
    "chunked_dp2_zero3_fsdp": (FSDP_HEAD, None, HEAD_CHUNK),
    "chunked_compile_dp2_zero3_fsdp": (FSDP_HEAD, "aot_eager", HEAD_CHUNK),
    "chunked_compile_pp2_1f1b": (PP2, "aot_eager", HEAD_CHUNK),
    "chunked_tp2_sp": (plan(uniform(tp=2, sp=True)), None, HEAD_CHUNK),
    "chunked_pp2_interleaved": (plan(uniform(), pipeline={"degree": 2, "schedule": "interleaved_1f1b", "microbatches": 4,
                                                          "virtual_stages": 2}), None, HEAD_CHUNK),
    "chunked_megatron_tp2": (plan(uniform(tp=2)), None, HEAD_CHUNK, "megatron"),  # the head stays a plain replica
}
# bf16 with the chunked loss: the head, now called by the loss outside the stage's forward, still computes in bf16
# (the loss enters the policy's autocast region itself) and the losses track the one-process bf16 run
BF16_CHUNKED = {"bf16_chunked_dp2_zero3_fsdp": FSDP_HEAD}


# meta-device init: every parameter equals the one-process build_model(CFG, seed) bitwise
META_CASES = {
    "meta_tp2_sp": plan(uniform(tp=2, sp=True)),
    "meta_dp2_zero3_fsdp": plan(uniform(dp=2, zero=3), embedding={"zero": 3}),
    "meta_dp2_zero2_fsdp": plan(uniform(dp=2, zero=2)),
    "meta_pp2_1f1b": plan(uniform(), pipeline={"degree": 2, "schedule": "1f1b", "microbatches": 4}),
    "meta_pp2_interleaved": plan(uniform(), pipeline={"degree": 2, "schedule": "interleaved_1f1b", "microbatches": 4,
                                                      "virtual_stages": 2}),
}

# ... with per-layer savers (they swap module classes, add no parameters and draw nothing at apply time): FP8
# activations (+ FP8 GEMMs) on some layers, WTA-CRS on others, none on one; weights bitwise the one-process model
# with the same savers, first-step gradients those of the same layout built from the full model (within RTOL)
def with_savers(**kw) -> list[dict]:
    """Layer 0 FP8 activations + FP8 GEMMs (on the shards under tp), 1 WTA-CRS, 2 none, 3 FP8 activations."""
    fp8_0 = {"fp8_act": True, "fp8_gemm": True}
    return [{**kw, **s} for s in ({"savers": fp8_0}, {"savers": {"wta_crs": 0.5}}, {}, {"savers": {"fp8_act": True}})]


META_SAVER_CASES = {
    "meta_savers_tp2_sp": plan(with_savers(tp=2, sp=True)),
    "meta_savers_dp2_zero3_fsdp": plan(with_savers(dp=2, zero=3), embedding={"zero": 3}),
    "meta_savers_pp2_1f1b": plan(with_savers(), pipeline={"degree": 2, "schedule": "1f1b", "microbatches": 4}),
}

# ... and megatron-core tp (built on meta too: its parallel linears are made there, materialize fills the shards)
MEGATRON_META_CASES = {"meta_megatron_tp2": plan(uniform(tp=2))}

# keyed init (models/init.py) with 16x16 tiles, so the tiny model's parameters are cut into many tiles and every
# shard boundary falls on a tile edge: each rank draws exactly its shards' values (no tile is drawn twice)
KEYED_TILE = 16
KEYED_CASES = {
    "keyed_tp2_sp": plan(uniform(tp=2, sp=True)),
    "keyed_dp2_zero3_fsdp": plan(uniform(dp=2, zero=3), embedding={"zero": 3}),
    "keyed_pp2_1f1b": plan(uniform(), pipeline={"degree": 2, "schedule": "1f1b", "microbatches": 4}),
    "keyed_savers_tp2_sp": plan(with_savers(tp=2, sp=True)),
    "keyed_savers_pp2_1f1b": plan(with_savers(), pipeline={"degree": 2, "schedule": "1f1b", "microbatches": 4}),
}
KEYED_MEGATRON_CASES = {"keyed_megatron_tp2": plan(uniform(tp=2))}
# MoE with expert parallelism, also built on meta now: expert shards are plain tensors cut by hand
KEYED_MOE = load_model_config({"name": "tiny-moe-par", "arch": "llama", "vocab_size": 256, "d_model": 32,
                               "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "moe_ffn_hidden": 48,
                               "n_experts": 4, "top_k": 2, "max_seq_len": 64})
KEYED_MOE_CASES = {"keyed_moe_ep2_dp2": {**plan([{"dp": 2, "ep": 2, "repeat": 2}]), "model": "tiny-moe-par"}}


class AllocMeter(TorchDispatchMode):
    """Bytes of every fresh tensor (an op output that aliases no input: not a view, not in-place; not on meta)
    created while active; a DTensor counts its local shard. Deterministic, unlike the allocator's peak on a shared host."""

    def __init__(self) -> None:
        super().__init__()
        self.total = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, t in zip(func._schema.returns, outs):
            if isinstance(t, torch.Tensor) and ret.alias_info is None and t.device.type != "meta":
                n = (t._local_tensor if isinstance(t, DTensor) else t).untyped_storage().nbytes()
                self.total += n
                self.largest = max(self.largest, n)
        return out


def full_value(rt, p: torch.Tensor) -> torch.Tensor:
    """A parameter's full tensor (collective over its tp group): DTensors gathered, megatron's plain shards
    all-gathered along their dim, anything else as it is."""
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        return p.full_tensor().detach()
    if p in rt._megatron_shards:
        dim, tp = rt._megatron_shards[p]
        parts = [torch.empty_like(p) for _ in range(tp)]
        dist.all_gather(parts, p.detach().contiguous(), group=rt.meshes.tp_mesh(tp).get_group())
        return torch.cat(parts, dim=dim)
    return p.detach()


def has_savers(pd: dict) -> bool:
    return any(s.savers.fp8_act or s.savers.wta_crs is not None for s in plan_from_dict(pd).layer_strategies())


def saver_kinds(chunks) -> dict[int, set[str]]:
    """{layer: the savers its modules carry} over this rank's blocks: proof the savers were applied to the meta
    model (and survived the layout and the materialisation)."""
    out: dict[int, set[str]] = {}
    for chunk in chunks:
        for key, block in chunk.layers.items():
            mods = list(block.modules())
            out[int(key)] = ({"fp8"} if any(isinstance(m, FP8Linear) for m in mods) else set()) | \
                            ({"wta"} if any(isinstance(m, WTACRSLinear) for m in mods) else set())
    return out


def expected_kinds(pd: dict, layers) -> dict[int, set[str]]:
    strategies = plan_from_dict(pd).layer_strategies()
    return {i: ({"fp8"} if strategies[i].savers.fp8_act else set()) | ({"wta"} if strategies[i].savers.wta_crs else set())
            for i in layers}


def full_build_grads(pd: dict, cfg, init: str, tp_backend: str = "dtensor") -> dict[str, torch.Tensor]:
    """First-step full gradients of the same layout (savers included) built the old way: the whole model first,
    then cut and sharded (meta init switched off)."""
    old = runtime_mod.supports_meta_init
    runtime_mod.supports_meta_init = lambda *a: False
    try:
        rt = DistributedRuntime(cfg, plan_from_dict(pd), seed=SEED, init=init, tp_backend=tp_backend)
    finally:
        runtime_mod.supports_meta_init = old
    assert not rt.meta_init
    rt.forward_backward(shard(0, rt.dp_rank, rt.dp_size))
    grads = full_grads(rt)
    rt.close()
    return grads


def saver_reference(pd: dict, cfg, init: str) -> nn.Module:
    """The one-process model with the Plan's savers (same seed and scheme): the values meta init must give."""
    model = build_model(cfg, seed=SEED, init=init)
    apply_plan_savers(model, plan_from_dict(pd), SEED)
    return model


def keyed_case(pd: dict, cfg=CFG, tp_backend: str = "dtensor") -> dict:
    """Initial weights bitwise equal to the one-process keyed model; then one step's gradients match it. Each rank
    draws exactly the values of its own shards (``values_drawn``); materialising allocates its shards (and the RoPE
    tables), and while drawing no tensor above one tile: no full-size tensor of a sharded parameter, no copy of
    the model, exists on a rank at any moment (counted by AllocMeter, the fresh tensors' bytes)."""
    from torch.distributed.tensor import DTensor

    from meshwright.models import init as keyed
    from meshwright.parallel import meta_init

    old_tile, old_fill = keyed.TILE, meta_init.init_keyed
    keyed.TILE = KEYED_TILE
    meters = {"draw": AllocMeter(), "to_empty": AllocMeter()}
    drawn = []
    old_to_empty = meta_init._to_empty

    def metered_fill(named, specs, seed, boxes=None):
        with meters["draw"]:
            drawn.append(old_fill(named, specs, seed, boxes))
        return drawn[-1]

    def metered_to_empty(chunks, device):
        with meters["to_empty"]:
            old_to_empty(chunks, device)

    meta_init.init_keyed, meta_init._to_empty = metered_fill, metered_to_empty
    savers = has_savers(pd)
    try:
        ref_model = saver_reference(pd, cfg, "keyed") if savers else build_model(cfg, seed=SEED, init="keyed")
        ref = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
        specs = ref_model.init_specs()
        ref_step = reference(steps=1, model=ref_model)[0] if cfg is CFG and not savers else None  # dense: lm_loss alone
        rt = DistributedRuntime(cfg, plan_from_dict(pd), seed=SEED, init="keyed", tp_backend=tp_backend)
    finally:
        keyed.TILE, meta_init.init_keyed, meta_init._to_empty = old_tile, old_fill, old_to_empty
    mismatched, local_numel, local_normal, local_bytes = [], 0, 0, 0
    # shards cut by hand: an ep expert's compared with its box's slice of one process; megatron's (boxed too) are
    # all-gathered by full_value, an independent check of their place
    boxes = {n: b for n, b in rt.shard_boxes.items() if ".experts." in n}
    for name, p in rt.model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        local_numel += local.numel()
        local_bytes += local.numel() * local.element_size()
        local_normal += local.numel() if specs[name].kind == "normal" else 0
        full = full_value(rt, p)
        want = ref[name]
        if name in boxes:
            want = want[tuple(slice(o, o + n) for o, n in zip(boxes[name][1], p.shape))]
        if not torch.equal(full, want):
            mismatched.append(name)
    total = sum(p.numel() for p in ref.values())
    buffer_bytes = sum(b.numel() * b.element_size() for c in rt.chunks for b in c.buffers())  # RoPE tables
    grad_rel = 0.0
    kinds = saver_kinds(rt.chunks)
    if ref_step is not None:
        rt.forward_backward(shard(0, rt.dp_rank, rt.dp_size))
        grad_rel = max(rel(g, ref_step["grads"][n]) for n, g in full_grads(rt).items())
    elif savers:  # the savers change the gradients: the reference is the same layout built from the full model
        rt.forward_backward(shard(0, rt.dp_rank, rt.dp_size))
        grads = full_grads(rt)
    rt.close()
    if savers:
        keyed.TILE = KEYED_TILE  # the same tiles as above: the values depend on the tile size
        try:
            want = full_build_grads(pd, cfg, "keyed", tp_backend)
        finally:
            keyed.TILE = old_tile
        grad_rel = max(rel(g, want[n]) for n, g in grads.items())
    tile_bytes = KEYED_TILE * KEYED_TILE * 4
    draw, alloc = meters["draw"], meters["to_empty"]
    ok = (rt.meta_init and rt.init == "keyed" and not mismatched and grad_rel <= RTOL and local_numel < total
          and drawn == [local_normal]  # exactly this rank's shards of the drawn parameters, nothing else
          # while drawing: no tensor above one tile (the reused buffer); all together (with the device mesh's
          # small index tensors) under a tenth of this rank's share, where a full copy would exceed it
          and draw.largest <= tile_bytes and draw.total < local_bytes / 10
          and alloc.total == local_bytes + buffer_bytes  # to_empty: this rank's shards and RoPE tables, no more
          and kinds == expected_kinds(pd, kinds))  # the savers are on this rank's blocks (none where the Plan has none)
    return {"ok": ok, "mismatched": mismatched[:5], "local_fraction": local_numel / total, "grad_rel": grad_rel,
            "saver_kinds": {k: sorted(v) for k, v in kinds.items()},
            "values_drawn": drawn, "local_normal_numel": local_normal, "draw_alloc_bytes": draw.total,
            "draw_largest_bytes": draw.largest, "to_empty_bytes": alloc.total, "local_param_bytes": local_bytes,
            "buffer_bytes": buffer_bytes,
            "model_bytes": total * 4}


class LinearDtypes:
    """Forward hooks on every nn.Linear: the dtypes of their outputs (the matmul's result dtype)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.seen: set[str] = set()
        self.calls = 0
        self.handles = [m.register_forward_hook(self._hook) for mod in modules for m in mod.modules()
                        if isinstance(m, nn.Linear) or type(m).__name__ in ("ColumnParallelLinear", "RowParallelLinear")]

    def _hook(self, module: nn.Module, args: tuple, out) -> None:
        out = out[0] if isinstance(out, tuple) else out
        self.seen.add(str(out.dtype).replace("torch.", ""))
        self.calls += 1

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def train(rt, steps: int = STEPS) -> list[float]:
    opt = rt.build_optimizer(make_opt)
    losses = []
    for step in range(steps):
        losses.append(rt.forward_backward(shard(step, rt.dp_rank, rt.dp_size)))
        rt.clip_grad_norm_(MAX_NORM)
        rt.optimizer_step(opt)
    return losses


def bf16_reference() -> list[float]:
    """The one-process bf16 run (LocalRuntime, 4 micro-batches of 2 per step, as dp=1 reads them)."""
    return train(LocalRuntime(build_model(CFG, seed=SEED), dtype="bf16"))


def bf16_case(pd: dict, backend: str, ref: list[float], loss_chunk_tokens: int = 0) -> dict:
    rt = DistributedRuntime(CFG, plan_from_dict(pd), tp_backend=backend, seed=SEED,
                            precision=PrecisionPolicy.from_dtype("bf16"), loss_chunk_tokens=loss_chunk_tokens)
    meter = LinearDtypes(rt.chunks)
    losses = train(rt)
    meter.close()
    rt.close()
    worst = max(rel(a, b) for a, b in zip(losses, ref))
    ok = meter.seen == {"bfloat16"} and meter.calls > 0 and worst <= BF16_RTOL
    return {"ok": ok, "linear_out_dtypes": sorted(meter.seen), "linear_calls": meter.calls, "loss_rel": worst,
            "losses": losses, "ref": ref, "compute_dtype": rt.compute_dtype}


def compile_case(pd: dict, ref: list[dict]) -> dict:
    rt = DistributedRuntime(CFG, plan_from_dict(pd), seed=SEED, compile_backend="aot_eager")
    compiled = [b for c in rt.chunks for b in c.layers.values() if b._compiled_call_impl is not None]
    losses = train(rt)
    rt.close()
    worst = max(rel(a, r["loss"]) for a, r in zip(losses, ref))
    return {"ok": worst <= COMPILE_RTOL and len(compiled) > 0, "loss_rel": worst, "compiled_blocks": len(compiled)}


class TracedCalls:
    """Forward pre-hooks counting [calls inside a compiled graph, eager calls] per group of modules. A tensor
    bumped in place: a Python counter read while dynamo traces becomes a guard that every call breaks."""

    def __init__(self, groups: dict[str, list[nn.Module]]) -> None:
        self.calls = {g: torch.zeros(2, dtype=torch.int64) for g in groups}
        self.sizes = {g: len(mods) for g, mods in groups.items()}
        self.handles = [m.register_forward_pre_hook(lambda mod, args, c=self.calls[g]: self._pre(c))
                        for g, mods in groups.items() for m in mods]

    @staticmethod
    def _pre(counter: torch.Tensor) -> None:
        counter[0 if torch.compiler.is_compiling() else 1] += 1

    def close(self) -> dict[str, dict[str, int]]:
        for h in self.handles:
            h.remove()
        return {g: {"modules": self.sizes[g], "compiled": int(c[0]), "eager": int(c[1])} for g, c in self.calls.items()}


def megatron_compile_case(pd: dict, ref: list[dict]) -> dict:
    """Parity with the one-process eager run (check_runtime), and where each part ran: every call of the compiled
    parts (norms, attention core, MLP gating) inside a compiled graph, every call of megatron-core's parallel
    linears eager; no block compiled whole."""
    torch._dynamo.reset()  # fresh recompile budget: past dynamo's limit a part would fall back to eager silently
    rt = DistributedRuntime(CFG, plan_from_dict(pd), seed=SEED, compile_backend="aot_eager", tp_backend="megatron")
    blocks = [b for c in rt.chunks for b in c.layers.values()]
    parts = [m for b in blocks for m in (b.attention_norm, b.attention.core, b.ffn_norm, b.feed_forward.act)]
    linears = [m for b in blocks for m in b.modules() if type(m).__name__ in ("Column", "Row")]
    meter = TracedCalls({"compiled_parts": parts, "megatron_linears": linears})
    res = check_runtime(rt, ref)
    res.pop("opt")
    rt.close()
    calls = meter.close()
    cp, ml = calls["compiled_parts"], calls["megatron_linears"]
    where = (len(linears) == 7 * len(blocks) > 0 and all(m._compiled_call_impl is not None for m in parts)
             and not any(b._compiled_call_impl is not None for b in blocks)
             and cp["compiled"] > 0 and cp["eager"] == 0 and ml["eager"] > 0 and ml["compiled"] == 0)
    return {**res, "ok": res["ok"] and where, "calls": calls, "blocks": len(blocks)}


def head_case(pd: dict, backend: str | None, chunk: int, ref: list[dict], tp_backend: str = "dtensor") -> dict:
    """Parity with the one-process eager run (check_runtime), and where the head ran: a pre-hook on the last stage's
    head records whether dynamo was tracing it (compile: every call inside the compiled loss graph) and, eager, the
    rows it was given (chunked: at most HEAD_CHUNK tokens a call, the short last chunk among them; never the batch)."""
    torch._dynamo.reset()  # fresh recompile budget: a runtime past dynamo's limit would fall back to eager silently
    rt = DistributedRuntime(CFG, plan_from_dict(pd), seed=SEED, compile_backend=backend, loss_chunk_tokens=chunk,
                            tp_backend=tp_backend)
    # calls [inside a compiled graph, eager]: a tensor bumped in place, since a Python list or int read while tracing
    # becomes a guard that every call breaks (recompiles until dynamo's limit, then eager: the check would fail)
    calls = torch.zeros(2, dtype=torch.int64)
    rows: list[int] = []  # eager calls only: never traced

    def pre(mod, args) -> None:
        if torch.compiler.is_compiling():
            calls[0] += 1
        else:
            calls[1] += 1
            rows.append(args[0].numel() // args[0].shape[-1])

    head = rt.chunks[rt.stage_ids.index(rt.n_stages - 1)].output if rt.has_last else None
    if head is not None:
        head.register_forward_pre_hook(pre)
    res = check_runtime(rt, ref)
    res.pop("opt")
    rt.close()
    compiled, eager = calls.tolist()
    where = True
    if head is not None:  # the ranks holding the last stage
        where = compiled > 0 and eager == 0 if backend is not None else eager > 0 and compiled == 0
        if chunk and backend is None:
            where = where and max(rows) <= chunk and (MICRO * SEQ) % chunk in rows
    return {**res, "ok": res["ok"] and where and rt.head_loss is not None, "head_calls_compiled": compiled,
            "head_calls_eager": eager, "head_rows": sorted(set(rows)), "has_head": head is not None}


def meta_case(pd: dict, ref_step: dict, tp_backend: str = "dtensor") -> dict:
    """Initial weights bitwise equal to one process; then one step's gradients match it (buckets built
    before materialisation must point at the materialised parameters). With savers in the Plan: the one-process
    model with the same savers, and the gradients of the same layout built from the full model."""
    from torch.distributed.tensor import DTensor

    savers = has_savers(pd)
    rt = DistributedRuntime(CFG, plan_from_dict(pd), seed=SEED, tp_backend=tp_backend)
    ref = dict((saver_reference(pd, CFG, "stream") if savers else build_model(CFG, seed=SEED)).named_parameters())
    kinds = saver_kinds(rt.chunks)
    mismatched, local_numel = [], 0
    for name, p in rt.model.named_parameters():
        local_numel += (p.to_local() if isinstance(p, DTensor) else p).numel()
        if not torch.equal(full_value(rt, p), ref[name].detach()):
            mismatched.append(name)
    total = sum(p.numel() for p in ref.values())
    rt.forward_backward(shard(0, rt.dp_rank, rt.dp_size))
    grads = full_grads(rt)
    rt.close()
    want = full_build_grads(pd, CFG, "stream", tp_backend) if savers else ref_step["grads"]
    grad_rel = max(rel(g, want[n]) for n, g in grads.items())
    # the savers act: these gradients differ from the saver-free one-process model's (same weights, same data)
    effect = max(rel(g, ref_step["grads"][n]) for n, g in grads.items()) if savers else None
    ok = (rt.meta_init and not mismatched and local_numel < total and grad_rel <= RTOL  # no rank holds every parameter
          and kinds == expected_kinds(pd, kinds) and (effect is None or effect > 1e-4))
    return {"ok": ok, "mismatched": mismatched[:5], "meta_init": rt.meta_init, "local_fraction": local_numel / total,
            "grad_rel": grad_rel, "saver_effect": effect, "saver_kinds": {k: sorted(v) for k, v in kinds.items()}}


def bf16_deepspeed_case(ref: list[float]) -> dict:
    """DeepSpeed's own bf16 mode (bf16 weights, fp32 master copy in its optimizer) from the same policy."""
    import types

    from meshwright.parallel.deepspeed_backend import DeepSpeedRuntime

    train_cfg = types.SimpleNamespace(global_batch=8, micro_batch=2, dtype="bf16")
    rt = DeepSpeedRuntime(CFG, plan_from_dict(plan(uniform(dp=2, zero=3))), train_cfg=train_cfg, seed=SEED)
    losses = train(rt, steps=2)  # the engine exists once the optimizer is built: hook its module after the fact
    meter = LinearDtypes([rt.engine.module])
    rt.eval_loss(shard(0, rt.dp_rank, rt.dp_size))
    meter.close()
    worst = max(rel(a, b) for a, b in zip(losses, ref))
    ok = meter.seen == {"bfloat16"} and worst <= BF16_RTOL and rt.ds_config["bf16"]["enabled"]
    return {"ok": ok, "linear_out_dtypes": sorted(meter.seen), "loss_rel": worst, "losses": losses, "ref": ref[:2]}


def main() -> None:
    init()
    out = sys.argv[1] if len(sys.argv) > 1 else None
    only = set(sys.argv[2].split(",")) if len(sys.argv) > 2 and sys.argv[2] else None
    report = Report(out)
    ref = bf16_reference()
    ref32 = reference()
    cases = {**{name: (lambda pd=pd, backend=backend: bf16_case(pd, backend, ref))
                for name, (pd, backend) in BF16_CASES.items()},
             **{name: (lambda pd=pd: meta_case(pd, ref32[0])) for name, pd in {**META_CASES, **META_SAVER_CASES}.items()},
             **{name: (lambda pd=pd: meta_case(pd, ref32[0], "megatron")) for name, pd in MEGATRON_META_CASES.items()},
             **{name: (lambda pd=pd: keyed_case(pd)) for name, pd in KEYED_CASES.items()},
             **{name: (lambda pd=pd: keyed_case(pd, tp_backend="megatron")) for name, pd in KEYED_MEGATRON_CASES.items()},
             **{name: (lambda pd=pd: keyed_case(pd, KEYED_MOE)) for name, pd in KEYED_MOE_CASES.items()},
             **{name: (lambda pd=pd: compile_case(pd, ref32)) for name, pd in COMPILE_CASES.items()},
             **{name: (lambda pd=pd: megatron_compile_case(pd, ref32)) for name, pd in MEGATRON_COMPILE_CASES.items()},
             **{name: (lambda args=args: head_case(*args[:3], ref32, *args[3:])) for name, args in HEAD_CASES.items()},
             **{name: (lambda pd=pd: bf16_case(pd, "dtensor", ref, HEAD_CHUNK)) for name, pd in BF16_CHUNKED.items()},
             "bf16_deepspeed_zero3": lambda: bf16_deepspeed_case(ref)}
    for name, run in cases.items():
        if only and name not in only:
            continue
        try:
            res = run()
        except Exception as e:
            res = failure(f"case {name}", e)
        report.add(name, res["ok"], res)
        dist.barrier()
    if only is None or "bf16_megatron_cpu_refused" in only:
        try:
            DistributedRuntime(CFG, plan_from_dict(plan(uniform(tp=2))), tp_backend="megatron", seed=SEED,
                               precision=PrecisionPolicy.from_dtype("bf16"))
            res = {"ok": False, "error": "megatron tp with bf16 on CPU was accepted"}
        except Exception as e:  # megatron-core's backward ignores CPU autocast: refused with a one-line error
            msg = str(e)
            res = {"ok": "dtype" in msg and "megatron" in msg and "\n" not in msg, "error": msg}
        report.add("bf16_megatron_cpu_refused", res["ok"], res)
    report.gather_and_write()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)
    run_worker(main)
