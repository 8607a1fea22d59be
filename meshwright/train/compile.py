"""``compile: true``: torch.compile per transformer block and for the head + loss, plus the fast AdamW kernels.

Blocks are compiled in place with ``nn.Module.compile`` (parameter names, hooks and state-dict keys stay
those of the plain model, so checkpoints reshard), after tensor parallelism and recomputation and before
FSDP2 wraps them: torchtitan's order, in which each block is one graph that FSDP2's hooks surround.
Compiling per block rather than the whole model keeps the graphs small and identical across layers
(one compilation serves every block) and lets pipeline stages cut the model anywhere.

``compile_scope: model`` (one process only) is the A/B experiment against that choice: the whole Decoder forward,
head and loss in ONE graph (``compiled_model_loss``), as a plain ``torch.compile(model)`` loop does, so the block
boundaries fuse and the embedding runs inside the graph (issue #16).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from meshwright.errors import invalid
from meshwright.models import lm_loss
from meshwright.models.chunked_loss import chunk_loss_sum
from meshwright.models.moe import GroupedExperts, MoE, moe_layers

BACKENDS = ("inductor", "aot_eager", "eager")
SCOPES = ("blocks", "model")  # compile_scope: per transformer block (+ head and loss), or the whole model in one graph
MODEL_SCOPE_SUPPORTED = "'blocks', or 'model' only for a dense model in one process, with compile: true, " \
    "loss_chunk_tokens: 0 and no recompute or per-layer savers"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise invalid("compile_backend", backend, " | ".join(BACKENDS))
    return backend


def compile_block(block: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile ``block``'s call in place (``nn.Module.compile``); its forward may already be wrapped by recompute."""
    block.compile(backend=check_backend(backend))
    return block


def compile_moe_block(block: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile an MoE block's parts, torchtitan's way: the attention and both norms, and the experts' SwiGLU
    (``experts.mlp``, dynamic row counts: each expert gets a different number of tokens). Routing, the token
    all-to-alls under ep>1 (custom autograd functions with uneven splits read on the host, which dynamo does not
    trace) and the weighted combine stay eager between them. Why at ep=1 too: compiled whole, the block is cut by
    dynamo at the routing's data-dependent ops (bincount, ``.tolist()``, ``.item()``) into ~18 graphs with 15 graph
    breaks, and under selective/full recompute the break inside the checkpointed forward makes dynamo run the
    checkpoint eagerly, so nothing compiles; in parts it is 3 graphs, no break, in every recompute mode
    (benchmarks/results/planner_gpu.md)."""
    backend = check_backend(backend)
    mlp = getattr(getattr(block.feed_forward, "experts", None), "mlp", None)
    if not isinstance(mlp, nn.Module):
        raise ValueError(f"{type(block).__name__} has no MoE experts (feed_forward.experts.mlp)")
    for part in (block.attention_norm, block.attention, block.ffn_norm):
        part.compile(backend=backend)
        _without_ddp_split(part)
    mlp.compile(backend=backend, dynamic=True)
    _without_ddp_split(mlp)
    return block


def _without_ddp_split(part: nn.Module) -> None:
    """Compile ``part`` (already ``nn.Module.compile``d) without dynamo's DDPOptimizer, which splits a graph at DDP's
    bucket boundaries. Why: a part runs inside the block's eager checkpoint, and under selective recompute + DDP the
    split graphs reach AOTAutograd's partitioner without their checkpoint ids (torch 2.13: ``cleanup_recompute_tags``
    fails comparing None ids; measured at ep=1 with DDP over dp4). A part is small (a norm, the attention, one
    expert's SwiGLU): DDP's own hooks still reduce its gradients bucket by bucket."""
    part._compiled_call_impl = torch._dynamo.config.patch(optimize_ddp=False)(part._compiled_call_impl)


def compile_expert_parallel_block(block: nn.Module, backend: str = "inductor") -> nn.Module:
    """``compile_moe_block`` for a block whose experts are expert-parallel (refuses local ``GroupedExperts``)."""
    experts = getattr(block.feed_forward, "experts", None)
    if experts is None or isinstance(experts, GroupedExperts):
        raise ValueError(f"{type(block).__name__} has no expert-parallel experts (feed_forward.experts.mlp)")
    return compile_moe_block(block, backend)


def compile_layer(block: nn.Module, backend: str = "inductor", megatron_tp: bool = False) -> nn.Module:
    """Compile one transformer block the way its layout allows: an MoE block in parts (``compile_moe_block``, any
    ep), a megatron-core tp>1 block in parts (``compile_megatron_tp_block``), any other block whole."""
    if isinstance(getattr(block, "feed_forward", None), MoE):
        return compile_moe_block(block, backend)
    if megatron_tp:
        return compile_megatron_tp_block(block, backend)
    return compile_block(block, backend)


def compile_megatron_tp_block(block: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile the parts of a megatron-core tensor-parallel block that run no collective: both norms, the attention
    core between the QKV and output projections (RoPE, GQA repeat, SDPA) and the MLP's activation/gating between
    its two linears. megatron-core's ``ColumnParallelLinear``/``RowParallelLinear`` stay eager between them: their
    all-reduces run in custom autograd functions that dynamo does not trace (torchtitan's sub-module compile)."""
    backend = check_backend(backend)
    core = getattr(block.attention, "core", None)
    act = getattr(block.feed_forward, "act", None)
    if not isinstance(core, nn.Module) or not isinstance(act, nn.Module):
        raise ValueError(f"{type(block).__name__} has no attention.core or feed_forward.act to compile apart")
    for part in (block.attention_norm, core, block.ffn_norm, act):
        part.compile(backend=backend)
    return block


def compile_blocks(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile every transformer block of a Decoder (or a pipeline stage cut from one): ``compile_layer``."""
    for block in model.layers.values():
        compile_layer(block, backend)
    return model


def head_lm_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``lm_loss(head(hidden), targets)``: the output projection and the loss as one function to compile."""
    return lm_loss(head(hidden), targets)


def compiled_head_loss(backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """The output projection compiled together with the loss. Why: left eager, the head is a plain cuBLAS
    GEMM, and a vocabulary that is not a multiple of 8 (gpt2's 50257) makes it an unaligned one that runs
    far below peak; inside the graph inductor pads it (``shape_padding``) and fuses the fp32 upcast and
    log-softmax onto it. On an H200 the eager head left gpt2-small's trainer with ~16 ms more GPU work per
    step than a whole-model compiled loop (0.72x its tokens/s, 2026-11-26)."""
    return torch.compile(head_lm_loss, backend=check_backend(backend))


def model_lm_loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The whole Decoder forward (embedding, blocks, final norm) then ``head_lm_loss``: one function to compile."""
    return head_lm_loss(model.output, model(tokens, return_hidden=True), targets)


def check_model_scope(model: nn.Module, backend: str | None, loss_chunk_tokens: int = 0) -> None:
    """Refuse (one line) ``compile_scope: model`` where one whole-model graph cannot apply: no compile backend,
    a chunked loss (a Python loop over chunks), an MoE model (routing breaks the graph), or blocks whose forward
    recompute or a saver has wrapped (they are built around per-block graphs)."""
    reason = None
    if backend is None:
        reason = "compile is off"
    elif loss_chunk_tokens:
        reason = f"loss_chunk_tokens={loss_chunk_tokens}"
    elif moe_layers(model):
        reason = "an MoE model"
    elif any("forward" in vars(b) for b in getattr(model, "layers", {}).values()):
        reason = "blocks wrapped by recompute or a per-layer saver"
    elif getattr(model, "tok_embeddings", None) is None or getattr(model, "output", None) is None:
        reason = "a model without its embedding or head (a pipeline stage)"
    if reason is not None:
        raise invalid("compile_scope", "model", f"{MODEL_SCOPE_SUPPORTED} (here: {reason})")


def compiled_model_loss(backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """``model_lm_loss`` compiled as one graph: ``(model, tokens, targets) -> loss``. Why: the trainer's per-block
    compile leaves the embedding, positional add and dropout eager, fuses nothing across block boundaries and
    launches one graph per block; a plain ``torch.compile(model)`` loop has none of that. This measures the
    difference in the trainer itself (benchmarks/gpu_check.py ``gpt2_trainer_compiled_model``)."""
    return torch.compile(model_lm_loss, backend=check_backend(backend))


def compiled_chunk_loss(backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """The chunked loss's per-chunk head + loss, compiled (shapes marked dynamic: the last chunk is shorter)."""
    return torch.compile(chunk_loss_sum, backend=check_backend(backend), dynamic=None)


def fast_adamw_kwargs(device_type: str) -> dict[str, Any]:
    """AdamW's multi-tensor kernels: ``fused=True`` on CUDA (one kernel for all parameters), ``foreach=True``
    on CPU (grouped ops; bitwise equal to the per-parameter loop there, so fp32 CPU runs do not change)."""
    return {"fused": True} if device_type == "cuda" else {"foreach": True}
