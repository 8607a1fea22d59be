"""The planner's cost model: every term a small named function of shapes, degrees and hardware.

Times are seconds, sizes bytes, bandwidths bytes/s (per device, one direction). Communication uses
the alpha-beta model of ring collectives (Thakur et al. 2005; NCCL's "bus bandwidth" convention):
an all-reduce over n ranks moves 2(n-1)/n of the buffer through every link and pays 2(n-1) latencies.
Ranks are ordered tp (fastest), then dp/ep, then pp (slowest), as Megatron-LM orders them, so a group
of ``n`` ranks at ``stride`` stays inside one node when ``n*stride <= devices_per_node``.

Activation memory follows Korthikanti et al. 2022 ("Reducing activation recomputation"): per layer
a part replicated over the tp group (norms and the inputs of the first linears) and a part sharded by
tp; sequence parallelism shards the replicated part too. The coefficients are those of *our* blocks
(flash/efficient attention, so no 5as^2b score term), checked against saved bytes measured with
``saved_tensors_hooks`` in tests/unit/test_cost_model.py.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from meshwright.config import ClusterSpec, ModelConfig
from meshwright.errors import invalid
from meshwright.launcher.planner.stack import PRECISIONS, Precision, Stack, get_stack, precision_for_dtype
from meshwright.memory.fp8_bytes import block_saved_bytes_split
from meshwright.models.capped_flex_rule import flex_capped
from meshwright.optim.coat_bytes import coat_state_bytes_per_param
from meshwright.tools.flops import head_fwd_flops, layer_fwd_flops, model_flops_per_token

GIB = 1024**3

# Saved elements per token per layer, in units of d_model (h) and FFN width (f), for our blocks:
# (replicated over tp without SP, sharded by tp) x (h, f). Measured on CPU with count_saved_bytes.
ACT_COEF = {
    "llama": {"rep_h": 6.0, "shard_h": 4.0, "shard_f": 4.0},  # 2 RMSNorms (x, x*rsqrt, out); q, rotated q/k, o; SwiGLU 4f
    "gpt2": {"rep_h": 4.0, "shard_h": 4.0, "shard_f": 2.0},  # Korthikanti's 10 + 24/t without dropout masks
}
# Extra saved bytes per token per layer under bf16 autocast with fp32 parameters (meshwright's runtime), in units
# of d_model, beyond ACT_COEF at 2 bytes: norms and residual adds stay fp32 and the bf16 casts feeding the
# matmuls are saved next to them. Measured on CPU with count_saved_bytes (slope over two batch sizes, weight
# copies excluded): llama2-7b block 227,336 vs 169,984 B/token (+14.0 h); gpt2-small 30,628 vs 24,576 (+7.9 h).
AUTOCAST_EXTRA_H = {"llama": 14.0, "gpt2": 8.0}
# What a *compiled* block saves (TrainConfig.compile: torch.compile per block; AOTAutograd's min-cut partitioner
# keeps matmul inputs/outputs and recomputes the cheap pointwise ops in backward, so it saves far less than eager
# autocast). Per token per layer: x = fp32 block inputs (4 B per value, outside the tp region); rep = compute-dtype
# h-wide tensors outside the tp region (norm outputs, the attention projection's output); q = q-wide tensors inside it
# (q, attention output; k and v after the GQA repeat without recomputation), kv = k and v before it, f = FFN-wide ones; stats = fp32 norm statistics (B); lse = attention's fp32
# log-sum-exp per head. Measured on CPU with count_saved_bytes under bf16 autocast (inductor and
# aot_eager_decomp_partition save the same tensors; benchmarks/results/planner_gpu.md), pinned by
# tests/unit/test_compiled_memory.py. selective keeps what meshwright's SAC policy must save (matmul and attention
# outputs) and no weight copy; full keeps the block input only.
COMPILED_ACT = {
    # silu(w1)*w3 saved, not silu; k and v saved after the GQA repeat (q-wide: q 4, kv 0; measured with 1, 2, 4 kv heads)
    "llama": {"none": {"x": 1, "rep": 3, "q": 4, "kv": 0, "f": 3, "stats": 8, "lse": 1},
              "selective": {"x": 1, "rep": 1, "q": 2, "kv": 2, "f": 2, "stats": 0, "lse": 1},
              "full": {"x": 1, "rep": 0, "q": 0, "kv": 0, "f": 0, "stats": 0, "lse": 0}},
    "gpt2": {"none": {"x": 1, "rep": 3, "q": 2, "kv": 2, "f": 2, "stats": 16, "lse": 1},
             "selective": {"x": 1, "rep": 1, "q": 2, "kv": 2, "f": 1, "stats": 0, "lse": 1},
             "full": {"x": 1, "rep": 0, "q": 0, "kv": 0, "f": 0, "stats": 0, "lse": 0}},
}
# What a compiled MoE block saves (MoE models are llama-style). Every MoE block, at any ep, is compiled in parts
# (train/compile.py compile_moe_block): attention, norms and the experts' SwiGLU compiled, the router, the all-to-alls
# (ep>1) and the combine eager, so the fp32 residual entering the MoE is kept next to the block input (x: 2) and the
# router's fp32 logits and the z-loss's logsumexp are saved (router_f 2, z 2). Per token: x, rep, q, kv, stats, lse
# as COMPILED_ACT (q: 3 = q and k, v after the GQA repeat, so kv: 0); router_f / router_c: fp32 / compute-dtype E-wide
# tensors (probabilities; logits); z: fp32 values; slot: bytes per top-k slot (fp32 gate, int64 expert; +1 bool keep
# mask with a capacity factor). Per routed token (an assignment the capacity limit kept, counted on the rank whose
# expert runs it): e_h / e_f compute-dtype h- / expert-FFN-wide tensors (the expert's input rows and its output; w1
# and w3 outputs and their SwiGLU product), e_idx int64 indices, e_gate the compute-dtype gate (measured the same at
# ep=1 and over a one-rank ep group). Under recomputation the checkpoint wraps the block eagerly with the compiled
# parts inside: selective keeps SAC's MUST_SAVE outputs (wq/wk/wv/wo, SDPA output + lse, router logits; w1/w3/w2 per
# routed token), full the fp32 block input. Router and experts are tp-replicated (no SP on MoE blocks), so only
# q/kv/lse split by tp. (Compiled whole, an ep=1 block saved 16 B a token and 128 B a routed token less without
# recomputation, but took ~18 graphs and 15 graph breaks, and nothing compiled under recomputation.) Measured on CPU
# with count_saved_bytes under bf16 autocast (slope over batch sizes; benchmarks/results/planner_gpu.md), pinned by
# tests/unit/test_compiled_memory.py.
_MOE_KEYS = ("x", "rep", "q", "kv", "stats", "lse", "router_f", "router_c", "z", "slot", "e_h", "e_f", "e_idx", "e_gate")
_MOE_SELECTIVE = dict(zip(_MOE_KEYS, (1, 1, 2, 2, 0, 1, 0, 1, 0, 0, 1, 2, 0, 0)))
_MOE_FULL = dict(zip(_MOE_KEYS, (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)))
COMPILED_MOE_ACT = {"none": dict(zip(_MOE_KEYS, (2, 3, 3, 0, 8, 1, 2, 0, 2, 12, 3, 3, 2, 1))),
                    "selective": _MOE_SELECTIVE, "full": _MOE_FULL}
# What an *eager* MoE block saves under bf16 autocast with fp32 parameters (meshwright's runtime; the same at ep=1 and
# over an expert-parallel group), in COMPILED_MOE_ACT's units; autocast's extras are inside (no AUTOCAST_EXTRA_H on
# MoE blocks). none: x 4 (block input, both norms' x*rsqrt, the residual entering the MoE), rep 4 (autocast casts the
# attention norm's output once per q/k/v linear, the ffn norm's once for the router), q 4 (q, k, v after rope and the
# GQA repeat, SDPA output), router_f 2 (softmax probabilities, the fp32 logits), z 2 (logsumexp, top-k sum), slot 12
# (int64 expert + fp32 probability per top-k slot); per routed token e_h 4 (each expert's rows cast once for w1 and
# once for w3, the concatenated output, the gated rows), e_f 4 (w1, w3, silu, their product), two int64 indices, the
# gate. selective / full: SAC's outputs / the block input, as compiled (the checkpoint runs eager). Measured on CPU
# with count_saved_bytes (+ SAC's cache), benchmarks/results/planner_gpu.md; pinned by tests/unit/test_compiled_memory.py.
EAGER_MOE_ACT = {"none": dict(zip(_MOE_KEYS, (4, 4, 4, 0, 8, 1, 2, 0, 2, 12, 4, 4, 2, 1))),
                 "selective": _MOE_SELECTIVE, "full": _MOE_FULL}
# An fp32 run (no autocast) has none of autocast's casts in EAGER_MOE_ACT: the attention norm's output is saved once
# for q/k/v and the ffn norm's once for the router (rep 2, not 4), each expert's rows once for w1 and w3 (e_h 3, not
# 4). Measured on CPU in fp32 with count_saved_bytes (exact, ep=1 and a one-rank ep group, capacity on/off); selective
# and full save no casts and are the same. Pinned by tests/unit/test_compiled_memory.py.
EAGER_MOE_ACT_FP32 = {**EAGER_MOE_ACT, "none": {**EAGER_MOE_ACT["none"], "rep": 2, "e_h": 3}}


def eager_moe_act(recompute: str, elem_bytes: int) -> dict[str, float]:
    """What an eager MoE block saves (``_MOE_KEYS`` counts) in a run whose compute dtype is ``elem_bytes`` wide:
    fp32 (4) saves no autocast casts."""
    return (EAGER_MOE_ACT_FP32 if elem_bytes == 4 else EAGER_MOE_ACT)[recompute]


# Share of activation bytes that are inputs of linear layers (what WTA-CRS samples).
LINEAR_INPUT_SHARE = 0.4
# Share of saved activation bytes COAT stores in FP8 (the rest, e.g. norm statistics, stays high precision).
FP8_ACT_SHARE = 0.75
FP8_GROUP = 128  # COAT per-group quantisation: one fp32 scale per 128 values
# Flash attention (fused kernel, causal): it computes only the unmasked half of the score and context matmuls, at
# a fraction of the dense peak that grows with head_dim and sequence length (short causal sequences waste tiles):
# Hardware.flash_eff_max * d/(d+64) * s/(s+512).
# Hopper: PyTorch >= 2.11 with cuDNN > 9.15 (the cu130 wheels ship 9.19) runs SDPA on sm90 with cuDNN's attention,
# not FlashAttention-2 (``check_prefer_cudnn_attention`` in sdp_utils.cpp); cuDNN's kernel is FlashAttention-3
# class (wgmma + TMA). FA2's own bars (FA3 paper: ~17% of 989 TFLOP/s at head_dim 64, seq 1k; ~30% at 128, 4k) gave
# 0.5, which put meshwright's compiled 1.3B llama on one H100 20% slow (0.295 predicted vs 0.246 s measured,
# 2026-11-26). 0.7 is the least-squares fit (log ratio) over the three compiled one-GPU runs measured
# (gpt2-small and the 1.3B llama on an H100, llama2-7b on an H200): measured/predicted 1.12, 0.90, 1.06
# (benchmarks/results/gpu_h100.md). On A100 (no cuDNN preference) FA2 reaches 50-73% of peak (Dao 2023): 0.9.
# Backward runs 5 of the kernel's matmuls to the forward's 2 (2.5x its FLOPs).
FLASH_EFF_HOPPER, FLASH_EFF_OTHER = 0.7, 0.9


@dataclass(frozen=True)
class Hardware:
    """What the cost model needs to know about one device and its links."""

    peak_flops: float  # per device, compute dtype
    matmul_efficiency: float  # achieved fraction of peak on large matmuls
    devices_per_node: int
    intra_bw: float  # bytes/s
    intra_lat: float  # s
    inter_bw: float
    inter_lat: float
    memory_bytes: float
    compute_dtype: str = "bf16"
    overlap_slowdown: float = 0.1  # extra time when compute and communication overlap (fraction of the overlapped part)
    overhead_bytes: float = 1.0 * GIB  # CUDA context, NCCL buffers, allocator slack
    fragmentation: float = 0.05  # fraction of the rest lost to allocator fragmentation
    efficiency_half_width: float = 128.0  # matmul width at which efficiency halves (small shards run slower)
    act_scale: float = 1.0  # measured / analytic activation bytes (from a model profile)
    mem_bw: float = 1.6e12  # achieved device-memory bandwidth (bytes/s) for memory-bound elementwise kernels
    layer_overhead_s: float = 0.0  # fixed fwd+bwd cost per block per microbatch (dispatch/launch), from a model profile
    # attention kernels: "flash" (fused, scores never reach device memory: meshwright's SDPA, Megatron since 2023)
    # or "materialized" (b·a·s² scores written and read by softmax/dropout kernels: Megatron-LM 2021)
    attention: str = "flash"
    # per-rank slowdown when all ranks compute at once vs alone (profile ``contention``): >1 when ranks share
    # cores; pipeline ranks idle during fill and drain then free them for the others
    contention: float = 1.0
    # per-layer, per-microbatch framework overhead of parallel layouts, (key, a, b): a + b*tokens seconds,
    # keys tp2 / tp2sp / zero2 / zero3 (runtime_profile.overhead_key), measured by a model profile under torchrun
    strategy_overheads: tuple[tuple[str, float, float], ...] = ()
    # the stack that runs the plan (planner/stack.py): precision policy and overlap rules. The plain defaults
    # are the analytic textbook model (16 B/param, bf16 reduction, overlap everything, no runtime buffers);
    # hardware_from_cluster applies a real stack's rules.
    precision: str = "bf16"
    runtime_buffers: bool = False  # count the loss's fp32 buffers and the backward working set of one layer
    dp_overlap: bool = True
    tp_wgrad_overlap: bool = False
    pipeline_slowdown: float = 1.0
    stack: str = "analytic"
    fp8_peak_flops: float = 0.0  # FP8 tensor-core matmul FLOP/s (0: none or unknown), for savers.fp8_gemm
    # a model profile timed the blocks (profiling/model.py): their fits already hold the memory-bound kernels and the
    # attention core, so layer_costs adds neither; the work outside the blocks (loss, optimizer step, gradient
    # accumulation, the head's weight cast) is still costed at mem_bw
    block_time_measured: bool = False
    # TrainConfig.compile (meshwright's runtime): blocks compiled (COMPILED_ACT) and the loss compiled (no fp32 logits)
    compiled: bool = False
    # TrainConfig.loss_chunk_tokens (meshwright's runtime): the last stage's head + loss run per chunk of this many
    # tokens under checkpointing (models/chunked_loss.py), so only one chunk's logits exist and backward recomputes
    # each chunk's head matmul; 0: the whole microbatch's logits at once
    loss_chunk_tokens: int = 0
    grads_set_to_none: bool = False  # Stack.grads_set_to_none: gradients do not exist before the first backward
    # the stack's reduction buckets (Stack.buffer_elements) in the compute dtype, allocated at the backward peak: per
    # ZeRO stage 0..3, and the fewest of them (counted as overhead; the rest per layer: zero_buffer_bytes)
    stack_buffers: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    stack_buffer_bytes: float = 0.0
    # Stack.zero3_live_elements: gathered ZeRO-3 parameters kept live at once (DeepSpeed's budget); 0: one layer + prefetch
    zero3_live_params: float = 0.0
    # Stack.pipeline_zero0_precision, and whether the plan costed has a pipeline (``for_pipeline``): bf16 ZeRO-0 layers
    # then keep that precision's states (DeepSpeed's pipeline engine builds BF16_Optimizer)
    pipeline_zero0_precision: str = ""
    pipeline_defers_fsdp_sync: bool = False  # Stack.pipeline_defers_fsdp_sync (read where ``pipelined``)
    fsdp_zero2: bool = False  # Stack.fsdp_zero2: ZeRO-2 layers store sharded parameters and keep their gathered weights
    pipeline_reduces_after_schedule: bool = False  # Stack.pipeline_reduces_after_schedule (read where ``pipelined``)
    reduces_after_backward_zero: tuple[int, ...] = ()  # Stack.reduces_after_backward_zero
    dp1_plain: bool = False  # Stack.dp1_plain: a dp=1 layer is a plain module at any ZeRO stage (``runtime_zero_plan``)
    zero_runs_as: tuple[int, int, int, int] = (0, 1, 2, 3)  # Stack.zero_runs_as: the ZeRO stage run per planned one
    head_kept_gathered: bool = False  # Stack.head_kept_gathered: the FSDP2 head's gathered weights live through the step
    # Stack.experts_tp_sharded / expert_compute_tp_split: a rank holds expert params / (tp * ep) (else / ep), and runs
    # its tp share of the experts' FLOPs (else them all). The analytic default shards both, as Megatron does
    experts_tp_sharded: bool = True
    expert_compute_tp_split: bool = True
    # the plan costed is not one DDP module on meshwright's runtime (``for_reduction``): its ZeRO-0/1 layers are reduced
    # after backward by the manual all-reduce whatever their own tp and ep (``reduces_after_backward``)
    manual_dp: bool = False
    pipelined: bool = False
    flash_eff_max: float = FLASH_EFF_OTHER  # the SDPA flash kernel's best fraction of peak on this device (see FLASH_EFF_*)
    # torch's device type of the run ("cuda" or "cpu"): whether a compiled run's capped attention can take the flex
    # path (``capped_scores``; torch's CPU flex_attention has no backward)
    device_type: str = "cuda"
    # LoRA (TrainConfig.lora): the share of the model's parameters that train (adapters, modules_to_save; the adapters
    # counted in the total). The frozen rest has weights only: no gradients, no optimizer state (model_state_bytes).
    # Where ``lora`` is set the plan's layers and ends count their own (a block's adapters, the ends' modules_to_save);
    # this even spread is the default of model_state_bytes called without them
    trainable_fraction: float = 1.0
    # LoRA's step (memory/lora_cost.py ``LoraStep``): no dW of the frozen base (nor dX before the first adapter), the
    # adapters' narrow GEMMs, gradients reduced and stepped for the trainable parameters only; None: full training
    lora: Any = None

    @property
    def elem_bytes(self) -> int:
        return 4 if self.compute_dtype in ("fp32", "tf32") else 2

    @property
    def mixed_precision(self) -> bool:
        return self.elem_bytes == 2

    @property
    def policy(self) -> Precision:
        """The precision policy in force: fp32 compute keeps everything in fp32 whatever the stack (a stack's own fp32
        policy, ``Stack.fp32_precision``, where ``apply_stack`` set one)."""
        p = PRECISIONS[self.precision]
        return p if self.elem_bytes == 2 or p.dtype == "fp32" else PRECISIONS["fp32"]

    def policy_at(self, zero: int) -> Precision:
        """The precision policy of a layer's model states at ZeRO-``zero``: ``policy``, but under a pipeline engine
        that builds another optimizer for bf16 ZeRO-0 (``pipeline_zero0_precision``), that one's."""
        if zero == 0 and self.pipelined and self.pipeline_zero0_precision and self.elem_bytes == 2:
            return PRECISIONS[self.pipeline_zero0_precision]
        return self.policy

    def dp_overlapped(self, zero: int, tp: int = 1, ep: int = 1) -> bool:
        """Whether per-step DP traffic of a layer at ZeRO-``zero`` (of degrees ``tp``, ``ep``) runs under the last
        backward: the stack overlaps it, and the optimizer does not reduce after backward and gather after the step
        (``Precision.step_gather``), nor the pipeline schedule reduce after every backward (``fsdp_deferred``;
        DeepSpeed's pipeline engine at any ZeRO stage: ``Stack.pipeline_reduces_after_schedule``), nor the runtime
        outside DDP (``reduces_after_backward``)."""
        return (self.dp_overlap and not self.policy_at(zero).gathers_after_step(zero) and not self.fsdp_deferred(zero)
                and not (self.pipelined and self.pipeline_reduces_after_schedule)
                and not self.reduces_after_backward(zero, tp, ep))

    def reduces_after_backward(self, zero: int, tp: int = 1, ep: int = 1) -> bool:
        """Whether the stack's runtime reduces a ZeRO-``zero`` layer's gradients after the last backward because no
        DDP wraps it (``Stack.reduces_after_backward_zero``: meshwright's ``_finish_grads`` on pp>1 plans, tp>1 and
        ep>1 layers)."""
        return zero in self.reduces_after_backward_zero and (self.pipelined or self.manual_dp or tp > 1 or ep > 1)

    def fsdp_deferred(self, zero: int) -> bool:
        """Whether a layer at ZeRO-``zero`` is an FSDP2 module whose gather, reduction and resharding the pipeline
        schedule defers to once per step (``Stack.pipeline_defers_fsdp_sync`` on a pp>1 plan)."""
        return self.pipelined and self.pipeline_defers_fsdp_sync and zero in self.policy_at(zero).shard_cast_zero


def apply_stack(hw: Hardware, stack: Stack | str) -> Hardware:
    """``hw`` with the memory and overlap rules of ``stack`` training in ``hw.compute_dtype``."""
    st = get_stack(stack) if isinstance(stack, str) else stack
    buffers = tuple(st.buffer_elements(z) * hw.elem_bytes for z in range(4))
    return dataclasses.replace(hw, precision=precision_for_dtype(hw.compute_dtype, st.name), runtime_buffers=st.runtime_buffers,
                               dp_overlap=st.dp_overlap, tp_wgrad_overlap=st.tp_wgrad_overlap,
                               pipeline_slowdown=st.pipeline_slowdown, stack=st.name,
                               grads_set_to_none=st.grads_set_to_none,
                               stack_buffers=buffers, stack_buffer_bytes=min(buffers),
                               zero3_live_params=st.zero3_live_elements(),
                               pipeline_zero0_precision=st.pipeline_zero0_precision,
                               pipeline_defers_fsdp_sync=st.pipeline_defers_fsdp_sync, pipelined=False,
                               fsdp_zero2=st.fsdp_zero2, pipeline_reduces_after_schedule=st.pipeline_reduces_after_schedule,
                               reduces_after_backward_zero=st.reduces_after_backward_zero, dp1_plain=st.dp1_plain,
                               zero_runs_as=st.zero_runs_as, head_kept_gathered=st.head_kept_gathered,
                               experts_tp_sharded=st.experts_tp_sharded,
                               expert_compute_tp_split=st.expert_compute_tp_split)


def for_pipeline(hw: Hardware, pp: int) -> Hardware:
    """``hw`` costing a plan of ``pp`` pipeline stages (the same object where that changes nothing): the stack's
    pipeline engine may keep other model states (``Hardware.policy_at``), its FSDP2 layers sync once per step
    (``Hardware.fsdp_deferred``), its data-parallel reduction may wait for the whole schedule (``dp_overlapped``),
    or its runtime reduce outside DDP (``Hardware.reduces_after_backward``)."""
    pipelined = pp > 1 and (bool(hw.pipeline_zero0_precision) or hw.pipeline_defers_fsdp_sync
                            or hw.pipeline_reduces_after_schedule or bool(hw.reduces_after_backward_zero))
    return hw if hw.pipelined == pipelined else dataclasses.replace(hw, pipelined=pipelined)


def for_reduction(hw: Hardware, plan: Any) -> Hardware:
    """``hw`` costing ``plan`` on a stack whose runtime reduces some ZeRO stages after backward outside DDP
    (``Stack.reduces_after_backward_zero``), with ``manual_dp`` set where the pp=1 plan as a whole is not one DDP
    module: meshwright wraps a stage in DDP only when every layer is tp=1, ep=1 and at one ZeRO-0/1 stage, and the
    ends below ZeRO-2 (parallel/runtime.py ``uniform_ddp``); otherwise, e.g. ZeRO-0 layers beside ZeRO-2/3 ones, its
    ``_finish_grads`` all-reduces them after the last backward. A property of the whole plan the per-layer search
    cannot see: its layer costs take the overlapped reduction, and the assembled plan pays the exposed one here (as a
    pp>1 plan does through ``for_pipeline``). The same object where nothing changes."""
    manual = False
    if hw.reduces_after_backward_zero and plan.pipeline.degree == 1:
        layers = plan.layers
        manual = not (all(s.tp == 1 and s.ep == 1 and s.zero in (0, 1) for s in layers)
                      and len({s.zero for s in layers}) == 1 and plan.embedding.zero < 2)
    return hw if hw.manual_dp == manual else dataclasses.replace(hw, manual_dp=manual)


def plan_precision(plan: Any, hw: Hardware) -> str:
    """The precision policy (``PRECISIONS`` name) a plan's model states keep on ``hw``'s stack: ``hw.policy``, or the
    one the stack's pipeline engine builds for its ZeRO stages (``policy_at``; several joined by "+" where layers and
    embedding differ)."""
    piped = for_pipeline(hw, plan.pipeline.degree)
    names = dict.fromkeys(piped.policy_at(z).name for z in [s.zero for s in plan.layers] + [plan.embedding.zero])
    return "+".join(names)


def device_memory_gib(cluster: ClusterSpec, profile: Optional[dict[str, Any]] = None) -> float:
    """What one device holds: the preset's ``memory_gib``, or a hardware profile's measured figure where that is
    smaller (``device.memory_gib``, CUDA's ``total_memory``; profiles before that field have none)."""
    device = profile.get("device") if profile else None
    measured = device.get("memory_gib") if isinstance(device, dict) else None
    return cluster.memory_gib if measured is None else min(cluster.memory_gib, measured)


def hardware_from_cluster(cluster: ClusterSpec, profile: Optional[dict[str, Any]] = None,
                          memory_budget_gib: Optional[float] = None, stack: str = "meshwright",
                          dtype: Optional[str] = None, compile: bool = False, loss_chunk_tokens: int = 0) -> Hardware:
    """ClusterSpec (preset figures) overridden by a measured hardware profile's ``derived`` figures, and by its
    device's memory where that is below the preset's (``device_memory_gib``), with the
    memory and overlap rules of the ``stack`` that will run the plan in ``dtype`` (TrainConfig.dtype; default
    bf16 where the device lists it, fp32 on CPUs, where bf16 matmuls are ~70x slower), ``compile``
    (TrainConfig.compile) and ``loss_chunk_tokens`` (TrainConfig.loss_chunk_tokens), both meshwright's runtime only."""
    cpu = cluster.device == "cpu"
    if dtype is not None and dtype not in ("fp32", "bf16"):
        raise invalid("dtype", dtype, "fp32 or bf16")
    if compile and stack != "meshwright":
        raise invalid("compile", True, f"false with stack={stack!r} (compile describes meshwright's runtime)")
    if not isinstance(loss_chunk_tokens, int) or loss_chunk_tokens < 0:
        raise invalid("loss_chunk_tokens", loss_chunk_tokens, "0 (plain loss) or a positive number of tokens")
    if loss_chunk_tokens and stack != "meshwright":
        raise invalid("loss_chunk_tokens", loss_chunk_tokens,
                      f"0 with stack={stack!r} (the chunked loss is meshwright's runtime)")
    dtype = dtype or ("fp32" if cpu else ("bf16" if "bf16" in cluster.peak_tflops else "fp32"))
    mem_bw = 0.8 * cluster.memory_bw_gbps * 1e9 if cluster.memory_bw_gbps else device_memory_bw(cluster.device)
    hw = Hardware(
        mem_bw=mem_bw,
        peak_flops=cluster.peak_flops(dtype) * cluster.clock_fraction,
        matmul_efficiency=0.85 if cpu else 0.75,
        devices_per_node=cluster.devices_per_node,
        intra_bw=cluster.intra_node_bw_gbps * 1e9, intra_lat=cluster.intra_node_latency_us * 1e-6,
        inter_bw=cluster.inter_node_bw_gbps * 1e9, inter_lat=cluster.inter_node_latency_us * 1e-6,
        memory_bytes=cluster.memory_gib * GIB, compute_dtype=dtype,
        overhead_bytes=(0.05 if cpu else 1.0) * GIB, efficiency_half_width=8.0 if cpu else 128.0,
        fp8_peak_flops=0.0 if cpu else cluster.peak_tflops.get("fp8", 0.0) * 1e12,
        # CUDA caching allocator: max_memory_reserved was 6.2-7.3% above max_memory_allocated in three runs on an
        # H200 (gpt2-small, a 1.3B and a 7B llama; benchmarks/results/planner_gpu.md)
        fragmentation=0.05 if cpu else 0.065, compiled=compile, loss_chunk_tokens=loss_chunk_tokens,
        flash_eff_max=FLASH_EFF_HOPPER if any(k in cluster.device.upper() for k in ("H100", "H200")) else FLASH_EFF_OTHER,
        device_type="cpu" if cpu else "cuda",
    )
    if profile:
        d = profile["derived"]
        peak = d["peak_tflops"].get(dtype) or max(d["peak_tflops"].values())
        hw = dataclasses.replace(
            hw, peak_flops=peak * 1e12, matmul_efficiency=1.0,
            fp8_peak_flops=d["peak_tflops"]["fp8"] * 1e12 if "fp8" in d["peak_tflops"] else hw.fp8_peak_flops,
            intra_bw=d["intra_bw_gbps"] * 1e9, intra_lat=d["intra_latency_us"] * 1e-6,
            inter_bw=d["inter_bw_gbps"] * 1e9, inter_lat=d["inter_latency_us"] * 1e-6,
            overlap_slowdown=d["overlap_slowdown"], contention=float(d.get("contention", 1.0)),
        )
        hw = dataclasses.replace(hw, memory_bytes=device_memory_gib(cluster, profile) * GIB)
    if memory_budget_gib is not None:
        if not 0 < memory_budget_gib < float("inf"):  # NaN too: it made every layout "not fit"
            raise invalid("memory_budget_gib", memory_budget_gib, "a positive, finite number of GiB")
        hw = dataclasses.replace(hw, memory_bytes=memory_budget_gib * GIB)
    return apply_stack(hw, stack)


def device_memory_bw(device: str) -> float:
    """Achieved memory bandwidth (~80% of the datasheet figure) for the devices we know."""
    name = device.upper()
    if "H100" in name or "H200" in name:
        return 0.8 * (4.8e12 if "H200" in name else 3.35e12)
    if "A100" in name:
        return 0.8 * (2.039e12 if "80" in name else 1.555e12)
    if device == "cpu":
        return 20e9
    return 1.6e12


# ---- communication primitives ----------------------------------------------------------------------

def link(hw: Hardware, group_size: int, stride: int) -> tuple[float, float]:
    """(bandwidth, latency) of a group of ``group_size`` ranks ``stride`` apart: NVLink inside a node, else IB."""
    if group_size * stride <= hw.devices_per_node:
        return hw.intra_bw, hw.intra_lat
    return hw.inter_bw, hw.inter_lat


def allreduce_s(nbytes: float, n: int, bw: float, lat: float) -> float:
    """Ring all-reduce of an ``nbytes`` buffer: 2(n-1)/n bytes per link and 2(n-1) latency hops."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) * lat + 2 * (n - 1) / n * nbytes / bw


def allgather_s(nbytes: float, n: int, bw: float, lat: float) -> float:
    """Ring all-gather producing an ``nbytes`` buffer (each rank holds nbytes/n): (n-1)/n bytes per link."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) * lat + (n - 1) / n * nbytes / bw


def reduce_scatter_s(nbytes: float, n: int, bw: float, lat: float) -> float:
    """Ring reduce-scatter of an ``nbytes`` buffer: same volume as an all-gather."""
    return allgather_s(nbytes, n, bw, lat)


def alltoall_s(nbytes: float, n: int, bw: float, lat: float) -> float:
    """All-to-all where each rank sends ``nbytes`` in total, (n-1)/n of it off-rank."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) * lat + (n - 1) / n * nbytes / bw


def p2p_s(nbytes: float, bw: float, lat: float) -> float:
    """One point-to-point send."""
    return lat + nbytes / bw if nbytes > 0 else 0.0


def overlap_s(compute_s: float, comm_s: float, slowdown: float) -> float:
    """Wall time of compute and communication that overlap: the longer one, plus a contention penalty
    on the overlapped part (measured by ``meshwright profile hardware`` as ``overlap_slowdown``)."""
    return max(compute_s, comm_s) + slowdown * min(compute_s, comm_s)


def exposed_s(compute_s: float, comm_s: float, slowdown: float) -> float:
    """Time communication adds on top of ``compute_s`` when it is overlapped with it."""
    return overlap_s(compute_s, comm_s, slowdown) - compute_s


# ---- compute ---------------------------------------------------------------------------------------

# Elements read + written per token per layer by memory-bound kernels in one forward pass (norms,
# residual adds, bias/dropout, activation functions, rotary embeddings), counted from our blocks.
ELEMENTWISE_COEF = {"llama": {"h": 16.0, "f": 5.0}, "gpt2": {"h": 20.0, "f": 4.0}}


def elementwise_s(cfg: ModelConfig, index: int, tokens: float, tp: int, sp: bool, hw: Hardware) -> float:
    """Forward time of the memory-bound (non-matmul) kernels of one block: bytes moved / bandwidth.
    The h-wide part is replicated over tp unless SP splits it; the FFN-wide part is sharded by tp (an MoE block's
    experts: where the stack splits their work over tp, ``Hardware.expert_compute_tp_split``)."""
    c = ELEMENTWISE_COEF[cfg.arch]
    moe = cfg.is_moe_layer(index)
    f = cfg.top_k * cfg.expert_ffn_dim if moe else cfg.ffn_dim
    f_tp = tp if not moe or hw.expert_compute_tp_split else 1
    elems = c["h"] * cfg.d_model / (tp if sp else 1) + c["f"] * f / f_tp
    return elems * tokens * hw.elem_bytes / hw.mem_bw


# Bytes per attention-score element moved in one forward pass when scores are materialized (2-byte
# elements): QK^T writes (2), fused scale-mask-softmax reads and writes (4), dropout reads and writes (4)
# plus a 1-byte mask, the context matmul reads (2). Korthikanti et al.'s 5 B/element saved for backward
# is the stored subset of these.
SCORE_BYTES_PER_ELEM_FWD = 13.0


def capped_scores(cfg: ModelConfig, hw: Hardware) -> bool:
    """Whether meshwright's runtime computes this model's attention scores explicitly: Gemma 2's ``attn_softcap``, which
    SDPA cannot apply (models/layers.py ``capped_attention``), so the scores reach memory whatever ``hw.attention`` --
    unless the run takes the compiled flex path, which saves what flash SDPA saves. The rule is the runtime's own
    (models/capped_flex.py ``flex_capped``: compiled, no dropout, CUDA; training needs gradients)."""
    if cfg.attn_softcap is None or hw.stack != "meshwright":
        return False
    return not flex_capped(hw.compiled, hw.device_type, needs_grad=True, dropout=cfg.dropout)


def score_elements(cfg: ModelConfig, tokens: float, seq_len: int, tp: int, hw: Hardware) -> float:
    """Attention-score elements a tp rank writes to memory for ``tokens`` tokens: (heads / tp) x seq per
    token with materialized kernels (or capped scores), none with flash kernels."""
    if hw.attention not in ("flash", "materialized"):
        raise invalid("attention", hw.attention, "flash or materialized")
    if hw.attention == "flash" and not capped_scores(cfg, hw):
        return 0.0
    return tokens * cfg.n_heads / tp * seq_len


def attention_scores_s(cfg: ModelConfig, tokens: float, seq_len: int, tp: int, hw: Hardware) -> float:
    """Forward time of the memory-bound passes over materialized attention scores (0 with flash kernels)."""
    return score_elements(cfg, tokens, seq_len, tp, hw) * SCORE_BYTES_PER_ELEM_FWD * hw.elem_bytes / 2 / hw.mem_bw


def attention_score_bytes(cfg: ModelConfig, tokens: float, seq_len: int, tp: int, recompute: str, hw: Hardware) -> float:
    """Bytes of materialized attention scores saved for backward (Korthikanti et al.'s 5·a·s²·b with 2-byte
    elements: softmax output, dropout mask, dropout output); 0 with flash kernels or when the attention
    core is recomputed (selective, full). Capped scores (``capped_scores``): ``capped_score_bytes`` per element, and
    under selective recompute the QK^T product itself, which meshwright's SAC policy keeps as a bmm output (from the
    policy: its cache is invisible to count_saved_bytes' hooks, so this one is not measured)."""
    capped = capped_scores(cfg, hw)
    if recompute == "selective" and capped:  # SAC (parallel/recompute.py) saves every bmm output: the raw scores
        return score_elements(cfg, tokens, seq_len, tp, hw) * hw.elem_bytes
    if recompute != "none":
        return 0.0
    per = capped_score_bytes(hw.elem_bytes) if capped else 2.5 * hw.elem_bytes
    return score_elements(cfg, tokens, seq_len, tp, hw) * per


def capped_score_bytes(elem_bytes: int) -> float:
    """Bytes per score element the capped attention path saves: tanh's output (compute dtype), the fp32 softmax and,
    below fp32, its cast back for the context matmul. Measured with count_saved_bytes (d_model 64, 4 heads, sequences
    of 16 and 32): 8 B per element in fp32 and under bf16 autocast, this formula exactly, less the 4 B per head and
    token of SDPA's log-sum-exp, which the capped path does not save (tests/unit/test_hf_gemma.py)."""
    return elem_bytes + 4.0 + (elem_bytes if elem_bytes < 4 else 0.0)


# Passes over the logits per element (bytes) of the loss, forward + backward: the compiled loss reads the
# compute-dtype logits twice and writes their gradient once (3 x elem bytes); the eager fp32 loss casts them up (2+4),
# log-softmaxes (two reads + a write, 12), then backward writes the nll gradient (4), log-softmax backward reads two
# fp32 tensors, reduces and writes (16), and casts back (4+2): 44 B.
EAGER_LOSS_BYTES = 44.0
# Of those, the forward's (the chunked loss reruns it in backward): eager cast (2+4) and log-softmax (12), 18 B;
# compiled, one read of the compute-dtype logits.
EAGER_LOSS_FWD_BYTES = 18.0


def loss_s(cfg: ModelConfig, tokens: float, tp: int, hw: Hardware) -> float:
    """Memory-bound time of the loss over one microbatch's logits (with the forward the chunked loss reruns);
    meshwright's runtime only, like ``optimizer_step_s`` (the other stacks' fused vocab-parallel losses are left to their calibration)."""
    if hw.stack != "meshwright":
        return 0.0
    per = 3.0 * hw.elem_bytes if hw.compiled else EAGER_LOSS_BYTES
    if loss_chunked(hw):  # checkpointed chunks: backward reruns each chunk's forward
        per += 1.0 * hw.elem_bytes if hw.compiled else EAGER_LOSS_FWD_BYTES
    return tokens * cfg.vocab_size / tp * per / hw.mem_bw


def autocast_casts(zero: int, hw: Hardware) -> bool:
    """Whether autocast casts the weights of a layer at ZeRO-``zero``: the policy keeps fp32 weights that autocast
    caches compute-dtype copies of, and the layer is not an FSDP2 module that hands it compute-dtype weights
    (``Precision.shard_cast_zero``; autocast casts only fp32 tensors)."""
    p = hw.policy_at(zero)
    return p.weight_copy_bytes > 0 and zero not in p.shard_cast_zero


def reshards_after_forward(zero: int, hw: Hardware) -> bool:
    """Whether a layer at ZeRO-``zero`` (an FSDP2 one where the policy says so) frees its gathered weights after
    forward and gathers them again for backward: ZeRO-3 (meshwright: ``reshard_after_forward=(zero == 3)``,
    parallel/data_parallel.py) and torchtitan's layers without a pipeline; not ZeRO-2 (gathered once per step) nor
    torchtitan's on pp>1 layouts (``Hardware.fsdp_deferred``)."""
    return zero != 2 and not hw.fsdp_deferred(zero)


def weight_copy_bytes(zero: int, hw: Hardware) -> float:
    """Compute-dtype weight copies per parameter alive through the step: autocast's cache (kept by backward as saved
    inputs), or an FSDP2 layer's gathered compute-dtype weights where it keeps them from forward to backward
    (``reshards_after_forward``); where it reshards they are the per-layer transient (ZeRO-3:
    ``zero3_transient_bytes``; a one-rank shard's, one layer at a time, not counted)."""
    if fsdp_layer(zero, hw):
        return gathered_weight_bytes(zero, hw)
    return hw.policy_at(zero).weight_copy_bytes


def head_copy_bytes(zero: int, hw: Hardware) -> float:
    """Compute-dtype copies per head parameter alive through the step: ``weight_copy_bytes``, or the head's gathered
    weights where the stack never reshards an FSDP2 head after forward (``Hardware.head_kept_gathered``)."""
    if hw.head_kept_gathered and fsdp_layer(zero, hw):
        return hw.policy_at(zero).gather_bytes
    return weight_copy_bytes(zero, hw)


def embedding_copy_bytes(zero: int, hw: Hardware) -> float:
    """Gathered weights per input-embedding parameter alive through the step: an FSDP2 embedding that keeps them from
    forward to backward (``gathered_weight_bytes``: ZeRO-2 as FSDP2). The lookup itself casts nothing (autocast runs
    embeddings in fp32). Measured with the blocks: tests/distributed/state_bytes_worker.py."""
    return gathered_weight_bytes(zero, hw)


def fsdp_layer(zero: int, hw: Hardware) -> bool:
    """Whether a layer at ZeRO-``zero`` is an FSDP2 module: one the policy's MixedPrecisionPolicy casts
    (``Precision.shard_cast_zero``), or a ZeRO-2 layer of a stack that runs ZeRO-2 as FSDP2 (``Hardware.fsdp_zero2``,
    fp32 included, where FSDP2 casts nothing)."""
    return zero in hw.policy_at(zero).shard_cast_zero or (zero == 2 and hw.fsdp_zero2)


def stores_sharded_params(zero: int, hw: Hardware) -> bool:
    """Whether a layer at ZeRO-``zero`` stores its parameters sharded over dp: ZeRO-3, and ZeRO-2 where it is an FSDP2
    module (``Hardware.fsdp_zero2``: fully_shard shards the parameters whatever reshard_after_forward says; what
    it keeps gathered from forward to backward is ``gathered_weight_bytes``)."""
    return zero >= 3 or (zero == 2 and hw.fsdp_zero2)


def gathered_weight_bytes(zero: int, hw: Hardware) -> float:
    """Bytes per parameter of the gathered weights an FSDP2 layer at ZeRO-``zero`` keeps from forward to backward
    (its all-gather outputs, in ``gather_bytes``; part of ``weight_copy_bytes``); 0 where the layer is not FSDP2 or
    frees them after forward (``reshards_after_forward``: ZeRO-3's gathered layer is ``zero3_transient_bytes``)."""
    return hw.policy_at(zero).gather_bytes if fsdp_layer(zero, hw) and not reshards_after_forward(zero, hw) else 0.0


def weight_traffic_mb_s(param_count: float, recompute: str, hw: Hardware, zero: int = 0,
                        trained: Optional[float] = None) -> float:
    """Autocast's per-microbatch passes over the weights: each forward casts every fp32 weight to the compute dtype
    (read 4, write 2 B; again when recomputation reruns the forward in a new autocast region: the cast cache lives
    for one region, and torch.utils.checkpoint's recomputation enters its own; selective recomputation reruns the
    casts too, meshwright's policy saving only matmul and attention outputs) and backward casts each weight gradient
    up to fp32 (2 + 4 B: ToCopyBackward): ``trained`` of them (LoRA; default all). 0 for policies that keep compute-dtype weights and for FSDP2 layers
    (``fsdp_cast_s``)."""
    if not autocast_casts(zero, hw):
        return 0.0
    passes = 6.0 * (2 if recompute != "none" else 1)
    if trained is None:
        return param_count * (passes + 6.0) / hw.mem_bw
    return (param_count * passes + trained * 6.0) / hw.mem_bw  # layer_costs_columns: the same floats


def fsdp_cast_s(param_count: float, dp: int, zero: int, hw: Hardware) -> tuple[float, float]:
    """FSDP2 MixedPrecisionPolicy's casts of one layer (``param_count`` parameters on its tp/ep shard, sharded over
    ``dp``) as (per microbatch, per step) seconds at the memory bandwidth; (0, 0) outside ``Precision.shard_cast_zero``.

    Each all-gather copies the rank's fp32 shard into the compute-dtype all-gather input (read ``param_bytes``, write
    ``gather_bytes`` per shard element; torch 2.13 _fsdp_collectives._get_param_all_gather_inputs), as often as the
    layer is gathered: per microbatch in forward, and again in backward where it reshards after forward
    (``reshards_after_forward``: ZeRO-3, as ``dp_comm_s`` counts, and torchtitan's DDP-like ZeRO-0 layers, fully_shard
    over a one-rank shard mesh whose unshard is the cast of the whole weight, both without a pipeline); ZeRO-2 once per
    step (kept gathered until the last backward, as ``dp_comm_s`` counts), and so torchtitan's layers on pp>1 layouts
    (``Hardware.fsdp_deferred``). A ``reduce_bytes`` narrower than the stored gradient casts each reduce-scatter's
    output (one shard) back up (``_to_dtype_if_needed``).
    The copy into the flat all-gather buffer, the copy-out and the reduce-scatter copy-in (which converts the
    compute-dtype gradients to ``reduce_dtype`` as it copies) are FSDP's at any precision and not counted."""
    p = hw.policy_at(zero)
    if zero not in p.shard_cast_zero:
        return 0.0, 0.0
    shard = param_count / (dp if zero >= 2 else 1)
    gather = shard * (p.param_bytes + p.gather_bytes)
    back = shard * (p.reduce_bytes + p.grad_bytes) if p.reduce_bytes < p.grad_bytes else 0.0
    if hw.fsdp_deferred(zero):  # one gather and one reduction per step
        return 0.0, (gather + back) / hw.mem_bw
    if zero == 2:
        return back / hw.mem_bw, gather / hw.mem_bw
    return ((2.0 if reshards_after_forward(zero, hw) else 1.0) * gather + back) / hw.mem_bw, 0.0


def grad_accumulation_s(param_count: float, dp: int, zero: int, hw: Hardware) -> tuple[float, float]:
    """Gradient accumulation of one layer (``param_count`` on its tp/ep shard) as (per microbatch after the first, per
    step) seconds: ``grad_accumulate_s`` of the gradient the rank keeps (sharded at ZeRO-2/3), or, where the pipeline
    schedule defers FSDP2's reduction (``Hardware.fsdp_deferred``), the unsharded compute-dtype gradient added into
    its ``reduce_dtype`` accumulator (read ``gather_bytes`` + ``reduce_bytes``, write ``reduce_bytes``) after the
    first microbatch's cast into it (read ``gather_bytes``, write ``reduce_bytes``) once per step; under DeepSpeed's
    BF16_Optimizer (``Precision.gathers_after_step``) its own passes, ``bf16_optimizer_passes_s``."""
    if hw.fsdp_deferred(zero):
        p = hw.policy_at(zero)
        return (param_count * (p.gather_bytes + 2 * p.reduce_bytes) / hw.mem_bw,
                param_count * (p.gather_bytes + p.reduce_bytes) / hw.mem_bw)
    if hw.policy_at(zero).gathers_after_step(zero):
        return bf16_optimizer_passes_s(param_count, dp, zero, hw)
    return grad_accumulate_s(param_count / (dp if zero >= 2 else 1), hw), 0.0


# DeepSpeed's BF16_Optimizer (runtime/bf16_optimizer.py, DeepSpeed 0.19.8, immediate_grad_update off: its default)
# passes over a rank's parameters, bytes per parameter with ``a`` the accumulation buffer's element size
# (``Precision.grad_bytes - param_bytes``), ``l`` the bf16 weights' and gradients' (``param_bytes``), ``r`` the
# reduction's (``reduce_bytes``). Per microbatch, every one (first included): backward_prologue / the pipeline
# engine's _exec_backward_pass zero the bf16 gradients (clear_lp_grads: write l), then update_hp_grads adds each into
# the buffer (``hp_grad.add_(lp.grad.to(hp_dtype))``: read l, and where a != l the cast's temporary: write a, read a;
# read a, write a). Per step, the whole buffer: the reduction (engine.py allreduce_no_retain -> allreduce_and_copy:
# flatten a bucket (read a, write a), cast it to the communication dtype where r != a (read a, write r) and back
# (read r, write a), copy it out (read a, write a)), the norm (get_grads_for_norm: read a), clipping (the export writes
# gradient_clipping: read a, write a) and clear_hp_grads (write a); per step, the rank's dp partition: where a is not
# fp32 the partition cast up for the fp32 step (read a, write 4), and update_lp_params' copy into the bf16 partition
# (read 4, write l). The fp32 step itself is kept out for DeepSpeed as for the other stacks (``optimizer_step_s``).
def bf16_optimizer_passes_s(param_count: float, dp: int, zero: int, hw: Hardware) -> tuple[float, float]:
    """BF16_Optimizer's own passes over ``param_count`` parameters (a layer's, on its tp shard) as (per microbatch after
    the first, per step) seconds at the memory bandwidth; the first microbatch's pass is in the per-step figure."""
    p = hw.policy_at(zero)
    a, lp, r = p.grad_bytes - p.param_bytes, p.param_bytes, p.reduce_bytes
    per_mb = lp + lp + (2 * a if a != lp else 0) + 2 * a
    reduction = 4 * a + (a + r + r + a if r != a else 0)
    whole = reduction + a + 2 * a + a
    part = (a + 4 if a != 4 else 0) + 4 + lp
    step = param_count * (per_mb + whole + part / max(dp, 1))
    return param_count * per_mb / hw.mem_bw, step / hw.mem_bw


def grad_accumulate_s(param_count: float, hw: Hardware) -> float:
    """One accumulation of a microbatch's fp32 weight gradients into ``.grad`` (read 4 + 4, write 4 B), paid by every
    microbatch after the first under autocast, and under FSDP2 mixed precision, which adds each microbatch's
    reduce-scattered shard into the sharded ``.grad`` (foreach_reduce: ``grad._local_tensor += new_sharded_grad``);
    stacks with fused main-gradient accumulation pay nothing. LoRA: pass the trainable parameters only (the frozen base
    has no gradient)."""
    if hw.policy.weight_copy_bytes <= 0 and not hw.policy.shard_cast_zero:
        return 0.0
    return param_count * 12.0 / hw.mem_bw


def optimizer_step_s(param_count: float, dp: int, zero: int, states: str, hw: Hardware) -> float:
    """The optimizer step over this rank's share of ``param_count`` parameters: memory-bound. Fused AdamW reads the
    fp32 weights (or master copy), the gradient, m and v and writes the weights, m and v back (+ the compute-dtype
    weights when a master copy exists); gradient clipping reads the gradients once more. Counted for meshwright's
    runtime, where it was checked on an H200; for the other stacks it would move the published runs the wrong way
    (Megatron-LM 2021's 1.7-18B runs, already predicted 9-15% slow, by 1-2% more), so their calibration keeps it out.
    LoRA: pass the trainable parameters only (the optimizer holds no frozen weight)."""
    if hw.stack != "meshwright":
        return 0.0
    if states == "fp8":  # CoatAdamW: its per-group exponent math, not its bytes, sets its time (COAT_STEP_OVER_ADAMW)
        return optimizer_step_s(param_count, dp, zero, "fp32", hw) * COAT_STEP_OVER_ADAMW
    p = hw.policy
    n = param_count / (dp if zero >= 1 else 1)
    master = p.master_bytes or p.param_bytes
    nbytes = 2 * master + (p.param_bytes if p.master_bytes else 0) + 2 * p.grad_bytes + 2 * optimizer_state_bytes(states)
    return n * nbytes / hw.mem_bw


# CoatAdamW's Triton step against torch's fused AdamW, kernel time for kernel time: 10.04 against 10.47 ms per step on
# the 1.3B llama (1.26 B parameters) on one H200 (2026-11-27, gpu_h200.md). It moves 20.4 bytes per parameter to
# AdamW's 32, but its dynamic-range expansion (per-group min/max, exponents, FP8 codes) makes it compute-bound: costed
# by bytes it was predicted at 0.64x AdamW's time.
COAT_STEP_OVER_ADAMW = 0.96


FLASH_BWD_OVER_FWD = 2.5
# A GEMM whose dimension breaks 16-byte alignment (e.g. gpt2's vocabulary of 50257 bf16 values) cannot use the
# aligned tensor-core kernels: nanoGPT's padding of 50257 to 50304 made GPT-2 small ~25-30% faster, i.e. its head ran
# at about half speed. Megatron-LM, DeepSpeed and torchtitan configs pad the vocabulary; meshwright keeps it as given.
UNALIGNED_GEMM_EFFICIENCY = 0.5


def flash_kernels(hw: Hardware) -> bool:
    """Whether the attention core is costed as a causal FlashAttention-2 kernel: meshwright's runtime with flash
    attention (PyTorch's SDPA flash backend is FlashAttention-2). The other stacks' fused attention (cuDNN /
    TransformerEngine, FlashAttention-3 class on H100) and materialized attention keep the dense-matmul count, which
    the published runs calibrate (benchmarks/bench_published_runs.py)."""
    return hw.attention == "flash" and hw.stack == "meshwright" and hw.mixed_precision  # FA2 runs in bf16/fp16 only


def flash_attention_fwd_s(cfg: ModelConfig, tokens: float, seq_len: int, tp: int, hw: Hardware) -> float:
    """Forward time of the causal flash-attention core: half of ``attention_core_fwd_flops`` at the kernel's
    efficiency (``FLASH_EFF_HOPPER`` / ``FLASH_EFF_OTHER``)."""
    d = cfg.head_dim
    eff = hw.flash_eff_max * d / (d + 64.0) * seq_len / (seq_len + 512.0)
    return 0.5 * attention_core_fwd_flops(cfg, tokens, seq_len, tp) / (hw.peak_flops * eff)


def head_passes(hw: Hardware) -> float:
    """Forward-sized passes of the head matmul per microbatch: forward + backward (3; LoRA: no dW of a frozen head,
    ``LoraStep.head_passes``), plus the forward that the chunked loss recomputes in backward (+1)."""
    base = hw.lora.head_passes() if hw.lora is not None else 3.0
    return base + (1.0 if loss_chunked(hw) else 0.0)


def head_s(cfg: ModelConfig, tokens: float, tp: int, hw: Hardware) -> float:
    """Forward + backward time of the output projection (and its recomputation under the chunked loss); unaligned
    vocabularies run slower on meshwright."""
    t = compute_s(head_fwd_flops(cfg, tokens) / tp * head_passes(hw), hw, min(cfg.d_model, cfg.vocab_size / tp))
    # compiled, the head runs inside the loss's graph (train/head_loss.py), where inductor pads the GEMM: gpt2-small's
    # trainer step fell from 61 ms (eager head, H200) to 40 ms (head in the compiled loss, H100), 2026-11-26
    if hw.stack == "meshwright" and hw.mixed_precision and not hw.compiled and (cfg.vocab_size // tp) % 8:
        t /= UNALIGNED_GEMM_EFFICIENCY
    return t


def matmul_efficiency(hw: Hardware, width: float) -> float:
    """Achieved fraction of peak for a matmul whose smallest sharded dimension is ``width``.

    Small shards (high tp) keep the device less busy: efficiency = e_max * w / (w + w_half).
    """
    return hw.matmul_efficiency * width / (width + hw.efficiency_half_width)


def fp8_matmul_speedup(hw: Hardware) -> float:
    """FP8 over compute-dtype matmul throughput (measured by ``profile hardware`` or the cluster preset's
    ``peak_tflops.fp8``); 1.0 without FP8 tensor cores or with fp32 compute (nothing to speed up)."""
    if hw.fp8_peak_flops <= 0 or not hw.mixed_precision:
        return 1.0
    return max(1.0, hw.fp8_peak_flops / hw.peak_flops)  # both peaks (preset) or both measured (profile)


# COAT's FP8 casts (savers.fp8_act, fp8_gemm) are memory-bound passes the bf16 block does not make: amax reductions,
# casts, transposed FP8 copies for torch._scaled_mm, the 1 x 16 group casts of saved norm/SwiGLU inputs, backward
# dequantisation. fp8_cast_bytes_per_token counts their bytes analytically (the runtime's memory/fp8_activations.py
# path); they run at this fraction of ``mem_bw``: the net extra device time of COAT's compiled 1.3B llama on one H200
# over bf16, 78.6 ms per step for 22 blocks at 16,384 tokens (FP8-cast kernels 84.6 ms, other element-wise 5.7 ms
# fewer; benchmarks/results/gpu_h200.md, 2026-11-27), over the bytes counted here (4.96 GB per block with its weights'
# casts). One fit to one run: the planner had charged the casts nothing, and predicted that run 1.38x faster than bf16
# where it ran at 0.996x (its FP8 GEMMs saved 78 ms and its casts cost as much). Those were inductor's casts; since
# 2026-11-28 the runtime casts with Triton kernels, 1.4-3.2x faster on their own (gpu_h200.md, stop 39), which would
# make this ~0.6: not refitted until the model runs with them (benchmarks/results/gpu_next.md), so COAT's predicted
# step is pessimistic by up to ~35 ms on that run.
FP8_CAST_BW_FRACTION = 0.36
FP8_WEIGHT_CAST_BYTES = 11.0  # per weight per microbatch: fp32 read twice (amax, cast), FP8 written, transposed copy


def fp8_cast_bytes_per_token(cfg: ModelConfig, index: int, tp: int, gemm: bool, residual_bytes: int) -> float:
    """Bytes the FP8 casts of block ``index`` move per token, forward + backward, on one tp rank.

    Linear inputs: the two norm outputs (``residual_bytes`` each: fp32 beside fp32 weights under autocast), read by the
    column-parallel linears whole; the attention and SwiGLU outputs (2 bytes) by the row-parallel ones, tp-sharded.
    With FP8 GEMMs (``gemm``) each input is cast per tensor with its transpose ((2 b + 3) bytes per element: amax read,
    cast read, FP8 and transposed FP8 written) and each linear's output gradient likewise in E5M2 (7 bytes per bf16
    element); with FP8 storage only, the inputs the block saves are cast once ((2 b + 1) bytes) and dequantised in
    backward (3 bytes; wo keeps its bf16 input). Both: the 1 x 16 group copies of the norm and SwiGLU inputs, written
    by the fused forwards (1.25 bytes per element)."""
    d, f = cfg.d_model, cfg.ffn_dim / tp
    q, kv = cfg.n_heads * cfg.head_dim / tp, 2 * cfg.kv_heads * cfg.head_dim / tp
    gelu = cfg.arch == "gpt2"  # one up-projection, GELU: its input is the group-cast one
    up = f if gelu else 2 * f
    groups = 1.25 * (2 * d + up)
    if gemm:
        inputs = 2 * (2 * residual_bytes + 3) * d + 7 * q + 7 * f
        grads = 7 * (q + kv + d + up + d)
        return inputs + grads + groups
    stored = 2 * (2 * residual_bytes + 1) * d + 5 * f
    return stored + 3 * (2 * d + f) + groups


def fp8_cast_s(cfg: ModelConfig, index: int, tokens: float, tp: int, gemm: bool, hw: Hardware) -> float:
    """Seconds per microbatch (forward + backward) of block ``index``'s FP8 casts (:func:`fp8_cast_bytes_per_token`),
    plus, with FP8 GEMMs, the casts of its weights (once per microbatch)."""
    residual = 4 if hw.mixed_precision and hw.policy.param_bytes >= 4 else hw.elem_bytes
    nbytes = fp8_cast_bytes_per_token(cfg, index, tp, gemm, residual) * tokens
    if gemm:
        nbytes += FP8_WEIGHT_CAST_BYTES * cfg.layer_params(index) / tp
    return nbytes / (hw.mem_bw * FP8_CAST_BW_FRACTION)


def compute_s(flops: float, hw: Hardware, width: float) -> float:
    """Seconds for ``flops`` of matmul work with shard width ``width``."""
    return flops / (hw.peak_flops * matmul_efficiency(hw, width))


def recompute_extra_fwd_fraction(cfg: ModelConfig, index: int, seq_len: int, mode: str) -> float:
    """Extra forward work of recomputation as a fraction of the layer's forward FLOPs.

    full: the whole forward again; selective: the attention core (scores and context), as in
    Korthikanti et al. 2022; none: nothing.
    """
    if mode == "none":
        return 0.0
    if mode == "full":
        return 1.0
    if mode == "selective":
        attn = 4.0 * seq_len * cfg.n_heads * cfg.head_dim
        return attn / (2.0 * cfg.layer_params(index, active_only=True) + attn)
    raise invalid("recompute", mode, "none, selective or full")


def strategy_overhead_s(hw: Hardware, tp: int, sp: bool, zero: int, dp: int, tokens: float) -> float:
    """Framework overhead (DTensor dispatch, FSDP hooks) one layer adds per microbatch under (tp, sp, zero).

    Uses the profiled layout of the same tp, else the largest profiled tp below it (the overhead is per
    op, not per byte); a layout the profile did not cover adds nothing.
    """
    if not hw.strategy_overheads:
        return 0.0
    fits = {k: (a, b) for k, a, b in hw.strategy_overheads}
    total = 0.0
    if tp > 1:
        suffix = "sp" if sp else ""
        have = [t for t in range(2, tp + 1) if f"tp{t}{suffix}" in fits]
        if have:
            a, b = fits[f"tp{max(have)}{suffix}"]
            total += a + b * tokens
    if zero >= 2 and dp > 1 and f"zero{zero}" in fits:
        a, b = fits[f"zero{zero}"]
        total += a + b * tokens
    return total


# ---- per-layer communication -----------------------------------------------------------------------

def tp_comm_s(tokens: float, cfg: ModelConfig, tp: int, sp: bool, recompute: str, hw: Hardware) -> float:
    """TP (Megatron) collectives of one layer for one microbatch, forward + backward (+ recompute).

    Without SP: 2 all-reduces of the (tokens x h) activation forward and 2 backward. With SP each
    all-reduce becomes an all-gather + reduce-scatter pair: the same bus volume, as Korthikanti et al.
    note. Full recomputation repeats the forward collectives.
    """
    if tp <= 1:
        return 0.0
    nbytes = tokens * cfg.d_model * hw.elem_bytes
    bw, lat = link(hw, tp, 1)
    one = (allgather_s(nbytes, tp, bw, lat) + reduce_scatter_s(nbytes, tp, bw, lat)) if sp else allreduce_s(nbytes, tp, bw, lat)
    n = 4 + (2 if recompute == "full" else 0)
    return n * one


def attention_core_fwd_flops(cfg: ModelConfig, tokens: float, seq_len: int, tp: int) -> float:
    """Forward FLOPs of the attention core (QK^T and AV) for ``tokens`` queries over ``seq_len`` keys on a tp rank:
    n_heads x head_dim wide (not d_model: Qwen3-0.6B's 16 heads of 128 are twice its d_model of 1024)."""
    return 4.0 * tokens * seq_len * cfg.n_heads * cfg.head_dim / tp


def cp_ring_s(tokens: float, cfg: ModelConfig, tp: int, cp: int, hw: Hardware) -> float:
    """Ring attention's traffic per layer and microbatch (Liu et al. 2023; Megatron-LM context parallelism):
    each of cp-1 steps passes the local K and V chunk (tokens x 2 x kv_heads/tp x head_dim) to the next rank
    forward, and K, V plus their gradients backward: 3 chunk-passes per step. Ranks sit tp apart."""
    if cp <= 1:
        return 0.0
    kv = tokens * 2 * cfg.kv_heads / tp * cfg.head_dim * hw.elem_bytes
    bw, lat = link(hw, cp, tp)
    return 3 * (cp - 1) * p2p_s(kv, bw, lat)


def ep_alltoall_bytes(tokens: float, cfg: ModelConfig, elem_bytes: int) -> float:
    """Bytes one rank sends in one dispatch (or combine) all-to-all: tokens x hidden x top_k."""
    return tokens * cfg.d_model * cfg.top_k * elem_bytes


def ep_comm_s(tokens: float, cfg: ModelConfig, ep: int, tp: int, recompute: str, hw: Hardware) -> float:
    """EP all-to-alls of one MoE layer per microbatch: dispatch + combine forward, twice backward."""
    if ep <= 1:
        return 0.0
    bw, lat = link(hw, ep, tp)
    n = 4 + (2 if recompute == "full" else 0)
    return n * alltoall_s(ep_alltoall_bytes(tokens, cfg, hw.elem_bytes), ep, bw, lat)


def dp_comm_s(param_count: float, dp: int, zero: int, stride: int, hw: Hardware,
              trained: Optional[float] = None) -> tuple[float, float]:
    """DP gradient/parameter traffic of one layer as (per microbatch, per step) seconds.

    ``param_count`` is the layer's parameters on one tp/ep shard. ZeRO-0 and 1: one all-reduce (ZeRO-1
    = reduce-scatter + all-gather, the same volume) per step; under DeepSpeed's BF16_Optimizer
    (``Precision.step_gather``) an all-reduce of the whole gradient buffer and an all-gather of the parameters.
    ZeRO-2: gradients are reduce-scattered every microbatch (they cannot be accumulated unsharded) and
    parameters all-gathered once per step. ZeRO-3: parameters all-gathered for forward and backward and
    gradients reduce-scattered every microbatch (Rajbhandari et al. 2020: 1.5x the volume of DP per
    microbatch); one all-gather where the layer keeps its gathered weights from forward to backward
    (``reshards_after_forward``). FSDP2 layers whose sync the pipeline schedule defers (``Hardware.fsdp_deferred``):
    one all-gather and one reduce-scatter per step (ZeRO-0/1, replicated: one all-reduce), after all backwards.
    ``trained``: the parameters that have gradients (LoRA: adapters; default all): only theirs are reduced (DDP
    buckets and FSDP2 reduce-scatters skip ``requires_grad=False``), while ZeRO-2/3 still gather every weight.
    """
    if dp <= 1:
        return 0.0, 0.0
    p = hw.policy_at(zero)
    grads = (param_count if trained is None else trained) * p.reduce_bytes  # the stacks reduce fp32 main gradients (Megatron, FSDP2 reduce_dtype)
    params = param_count * p.gather_bytes
    bw, lat = link(hw, dp, stride)
    ag = allgather_s(params, dp, bw, lat)
    rs = reduce_scatter_s(grads, dp, bw, lat)
    if p.gathers_after_step(zero):  # BF16_Optimizer: the whole buffer all-reduced, then the params gathered after the step
        return 0.0, allreduce_s(grads, dp, bw, lat) + ag
    if hw.fsdp_deferred(zero):  # the pipeline schedule's one gather and one reduction (all-reduce where replicated)
        return 0.0, (ag + rs if zero >= 2 else allreduce_s(grads, dp, bw, lat))
    if zero <= 1:
        return 0.0, allreduce_s(grads, dp, bw, lat)
    if zero == 2:
        return rs, ag
    return (2 if reshards_after_forward(zero, hw) else 1) * ag + rs, 0.0


def hsdp_allreduce_s(param_count: float, dp: int, shard: int, stride: int, hw: Hardware) -> float:  # grads: pass trained
    """HSDP's extra traffic per microbatch: after the reduce-scatter inside each shard group, every rank
    all-reduces its 1/shard of the gradients with the same shard of the other dp/shard replicas (ranks
    ``stride*shard`` apart, usually on another node)."""
    replicas = dp // shard
    if replicas <= 1:
        return 0.0
    bw, lat = link(hw, replicas, stride * shard)
    return allreduce_s(param_count / shard * hw.policy.reduce_bytes, replicas, bw, lat)


def redistribution_s(tokens: float, cfg: ModelConfig, prev: tuple[int, bool], cur: tuple[int, bool], hw: Hardware) -> float:
    """Cost of changing layout between consecutive layers with different (tp, sp): the activation is
    re-gathered over the larger tp group, forward and backward (Galvatron's transformation cost)."""
    if prev == cur:
        return 0.0
    t = max(prev[0], cur[0])
    nbytes = tokens * cfg.d_model * hw.elem_bytes
    bw, lat = link(hw, t, 1)
    return 2 * allgather_s(nbytes, t, bw, lat)


def pp_p2p_s(tokens: float, cfg: ModelConfig, tp: int, sp: bool, hw: Hardware, cross_node: bool) -> float:
    """One stage boundary per microbatch: activation forward + gradient backward (sharded by tp with SP,
    Megatron's scatter-gather optimisation)."""
    nbytes = tokens * cfg.d_model * hw.elem_bytes / (tp if sp else 1)
    bw, lat = (hw.inter_bw, hw.inter_lat) if cross_node else (hw.intra_bw, hw.intra_lat)
    return 2 * p2p_s(nbytes, bw, lat)


# ---- pipeline schedule -----------------------------------------------------------------------------

def bubble_fraction(pp: int, microbatches: int, schedule: str, virtual_stages: int = 1) -> float:
    """Idle fraction relative to the ideal time: (p-1)/m for GPipe and 1F1B, (p-1)/(v m) interleaved."""
    if pp <= 1:
        return 0.0
    v = virtual_stages if schedule == "interleaved_1f1b" else 1
    return (pp - 1) / (v * microbatches)


def pipeline_step_s(stage_mb_s: list[float], microbatches: int, schedule: str, virtual_stages: int = 1,
                    contention: float = 1.0) -> float:
    """Step time of a pipeline whose rank ``i`` spends ``stage_mb_s[i]`` on one microbatch (fwd+bwd).

    The slowest rank paces the steady state; filling and draining crosses every other rank once
    (divided by v for interleaving). Balanced stages give (m + (p-1)/v) t, the textbook bubble.
    ``stage_mb_s`` are times with every rank busy; where ranks share compute (``contention`` > 1, e.g.
    more ranks than CPU cores) the few ranks working during fill and drain run up to that much faster.
    """
    slowest = max(stage_mb_s)
    rest = sum(stage_mb_s) - slowest
    v = virtual_stages if schedule == "interleaved_1f1b" else 1
    return microbatches * slowest + rest / v / max(contention, 1.0)


def inflight_microbatches(schedule: str, pp: int, stage: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Microbatches whose activations stage ``stage`` holds at the peak.

    GPipe keeps all m; 1F1B keeps pp - stage (PipeDream-Flush); interleaved 1F1B keeps
    (pp - stage) + (v-1) * pp / v chunks' worth in units of a full stage (Narayanan et al. 2021).
    """
    if pp <= 1:
        return 1.0
    if schedule == "gpipe":
        return float(microbatches)
    k = min(pp - stage, microbatches)
    if schedule == "interleaved_1f1b" and virtual_stages > 1:
        return min(float(microbatches), k + (virtual_stages - 1) * pp / virtual_stages)
    return float(k)


# ---- memory ----------------------------------------------------------------------------------------

def optimizer_bytes_per_param(states: str, mixed_precision: bool) -> float:
    """AdamW: fp32 m and v (8 B) or COAT FP8 m and v (2 B + one fp32 scale per 128 values each),
    plus a 4 B fp32 master copy under mixed precision."""
    if states == "fp32":
        b = 8.0
    elif states == "fp8":
        b = coat_state_bytes_per_param(FP8_GROUP)
    else:
        raise invalid("optimizer.states", states, "fp32 or fp8")
    return b + (4.0 if mixed_precision else 0.0)


def optimizer_state_bytes(states: str, name: str = "adamw") -> float:
    """Optimizer state per parameter without the master copy: AdamW keeps m and v (fp32: 8 B; COAT FP8:
    2 B + group metadata). The master copy belongs to the precision policy (``Precision.master_at``)."""
    if name != "adamw":
        raise invalid("optimizer.name", name, "adamw")
    return optimizer_bytes_per_param(states, False)


def model_state_bytes(param_count: float, dp: int, zero: int, states: str, hw: Hardware,
                      trained: Optional[float] = None) -> dict[str, float]:
    """Parameters, gradients and optimizer states of ``param_count`` (already tp/ep-sharded) parameters
    on one device: ZeRO-1 shards optimizer states over dp, ZeRO-2 also gradients, ZeRO-3 also parameters (and
    ZeRO-2 too where it is FSDP2, ``stores_sharded_params``; its gathered weights are ``gathered_weight_bytes``).
    Gradients and optimizer states only for ``trained`` of them (LoRA, per layer: a block's adapters, counted in
    ``param_count``; the ends' modules_to_save), by default ``hw.trainable_fraction`` of them (1 without LoRA)."""
    p = hw.policy_at(zero)
    deferred = hw.fsdp_deferred(zero)  # the unsharded gradients accumulated in reduce_dtype until the step's reduction
    zero = max(zero, p.zero_floor)
    if trained is None:
        trained = param_count * hw.trainable_fraction  # LoRA: the frozen base keeps its weights only
    return {
        "params": param_count * p.param_bytes / (dp if stores_sharded_params(zero, hw) else 1),
        "grads": trained * (p.reduce_bytes if deferred else p.grad_bytes / (dp if zero >= 2 else 1)),
        "optimizer": trained * (optimizer_state_bytes(states) + p.master_at(zero)) / (dp if zero >= 1 else 1),
    }


def check_recompute(recompute: str) -> None:
    """The activation formulas' one check of their recompute mode."""
    if recompute not in ("none", "selective", "full"):
        raise invalid("recompute", recompute, "none, selective or full")


def fp8_counted_block(cfg: ModelConfig, index: int, fp8_act: bool, recompute: str) -> bool:
    """Whether block ``index`` is costed by the tensor-by-tensor FP8 count (``block_saved_bytes_split``): a dense
    block with FP8 activations and no recomputation. Such a block saves no autocast casts, and compiled it saves the
    same count: its FP8 casts are opaque operators there (memory/fp8_ops.py), so inductor's partitioner keeps their FP8
    outputs (bench_fp8_compiled_saved.py, results/fp8_compiled.md: llama d512 22.20 B per token per d_model eager and
    compiled, gpt2 21.59; 25.07 and 22.09 compiled when the casts were traced inline). Both measured."""
    return fp8_act and recompute == "none" and not cfg.is_moe_layer(index)


def activation_bytes(cfg: ModelConfig, index: int, tokens: float, tp: int, sp: bool, recompute: str,
                     elem_bytes: int, fp8_act: bool = False, wta_crs: Optional[float] = None,
                     lemo: Optional[float] = None) -> float:
    """Bytes block ``index`` saves for backward for ``tokens`` tokens of one microbatch.

    Dense blocks: Korthikanti et al. 2022 structure: rep_h*h replicated over tp (sharded by SP) plus
    (shard_h*h + shard_f*f)/tp; full recompute keeps only the block input (sharded with SP); selective drops the
    attention core's q/k/v/out copies. MoE blocks: what the eager block was measured to save under autocast
    (``EAGER_MOE_ACT``, per token and per routed token: ``moe_block_bytes``), so ``autocast_extra_act_bytes`` is
    not added to them.
    """
    c = ACT_COEF[cfg.arch]
    h = cfg.d_model
    check_recompute(recompute)
    if cfg.is_moe_layer(index):  # measured, autocast included (EAGER_MOE_ACT; fp32: EAGER_MOE_ACT_FP32)
        nbytes = moe_block_bytes(cfg, eager_moe_act(recompute, elem_bytes), tokens, tp, elem_bytes)
    else:
        rep = c["rep_h"] * h / (tp if sp else 1)
        ffn = c["shard_f"] * cfg.ffn_dim / tp
        attn = c["shard_h"] * cfg.n_heads * cfg.head_dim / tp  # q-wide tensors (h unless head_dim != h/heads)
        per_token = {"full": h / (tp if sp else 1), "selective": rep + ffn, "none": rep + attn + ffn}[recompute]
        nbytes = per_token * tokens * elem_bytes
    fp8_counted = fp8_counted_block(cfg, index, fp8_act, recompute)
    if fp8_counted:  # what the FP8 block saves, tensor by tensor (equals count_saved_bytes under bf16 autocast too)
        norms, core = block_saved_bytes_split(cfg, True, elem_bytes)
        nbytes = (norms / (tp if sp else 1) + core / tp) * tokens
    nbytes += qk_norm_act_bytes(cfg, tp, recompute, elem_bytes, compiled=False) * tokens
    nbytes += post_norm_act_bytes(cfg, recompute, elem_bytes) / (tp if sp else 1) * tokens
    if lemo is not None:
        nbytes *= lemo
    if wta_crs is not None and recompute != "full":
        nbytes *= 1.0 - LINEAR_INPUT_SHARE * (1.0 - wta_crs)
    if fp8_act and not fp8_counted and recompute != "full":
        hi = nbytes * (1 - FP8_ACT_SHARE)
        lo = nbytes * FP8_ACT_SHARE / elem_bytes
        nbytes = hi + lo * (1 + 4.0 / FP8_GROUP)
    return nbytes


def qk_norm_act_bytes(cfg: ModelConfig, tp: int, recompute: str, elem_bytes: int, compiled: bool) -> float:
    """Bytes per token Qwen3's q/k head norms add to a block's saved activations (0 without ``qk_norm``), inside the tp
    region. Eager, each norm keeps its fp32 input and its pre-weight output in the compute dtype, (4 + elem) bytes per
    q/k value, plus the fp32 1/rms per head; compiled, only the compute-dtype input and the 1/rms. Selective recompute
    (element-wise ops recomputed) and full recompute keep none. Measured on CPU with count_saved_bytes under bf16
    autocast (d_model 64, 4 q and 4 kv heads of 16 and of 24, tests/unit/test_cost_model.py): eager +800 and +1184 B
    per token, compiled +288 and +416, these formulas exactly."""
    if not cfg.qk_norm or recompute != "none":
        return 0.0
    width = (cfg.n_heads + cfg.kv_heads) * cfg.head_dim
    per_value = elem_bytes if compiled else 4.0 + elem_bytes
    return (per_value * width + 4.0 * (cfg.n_heads + cfg.kv_heads)) / tp


def post_norm_act_bytes(cfg: ModelConfig, recompute: str, elem_bytes: int) -> float:
    """Bytes per token Gemma 2/3's post-attention and post-MLP norms (``post_norms``) add to an eager block's saved
    activations, outside the tp region: each keeps its input upcast to fp32 and its normalised output (fp32 where it
    scales by 1 + weight, ``norm_unit_offset``; else in the compute dtype) over d_model, plus its fp32 1/rms. Full
    recompute keeps none; selective recomputes only the attention core, so they stay. Measured with count_saved_bytes
    (d_model 64, tests/unit/test_hf_gemma.py): +1032 B per token in fp32, +776 (Llama-style) and +1032 ((1 + w)) under
    bf16 autocast, these formulas exactly."""
    if not cfg.post_norms or recompute == "full":
        return 0.0
    out = 4.0 if cfg.norm_unit_offset else float(elem_bytes)
    return 2.0 * ((4.0 + out) * cfg.d_model + 4.0)


def autocast_extra_act_bytes(cfg: ModelConfig, tokens: float, tp: int, sp: bool, recompute: str) -> float:
    """What autocast adds to ``activation_bytes`` at 2 bytes: fp32 norm/residual tensors and saved bf16 casts
    (``AUTOCAST_EXTRA_H``), h-wide and outside the tp region (split by SP); full recompute keeps only the fp32
    block input (2 more bytes per value)."""
    per_token = 2.0 * cfg.d_model if recompute == "full" else AUTOCAST_EXTRA_H[cfg.arch] * cfg.d_model
    return per_token * tokens / (tp if sp else 1)


def compiled_activation_bytes(cfg: ModelConfig, tokens: float, tp: int, sp: bool, recompute: str,
                              elem_bytes: int) -> float:
    """Bytes a compiled block (``COMPILED_ACT``) saves for backward for ``tokens`` tokens: the fp32 block input, the
    compute-dtype tensors outside the tp region (split by SP) and inside it (split by tp), norm statistics and the
    attention log-sum-exp."""
    check_recompute(recompute)
    c = COMPILED_ACT[cfg.arch][recompute]
    h, rep_div = cfg.d_model, (tp if sp else 1)
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    outside = 4.0 * c["x"] * h + elem_bytes * c["rep"] * h + c["stats"]
    inside = elem_bytes * (c["q"] * q + c["kv"] * kv + c["f"] * cfg.ffn_dim) + 4.0 * c["lse"] * cfg.n_heads
    return (outside / rep_div + inside / tp + qk_norm_act_bytes(cfg, tp, recompute, elem_bytes, compiled=True)) * tokens


def routed_tokens(cfg: ModelConfig, tokens: float) -> float:
    """Token-expert assignments an MoE layer keeps for ``tokens`` tokens: top_k each, at most the capacity
    ceil(c*T*k/E) per expert when a capacity factor c < 1 caps them (the planner assumes balanced routing)."""
    return tokens * cfg.top_k * min(1.0, cfg.capacity_factor or 1.0)


def compiled_moe_activation_bytes(cfg: ModelConfig, tokens: float, tp: int, recompute: str, elem_bytes: int,
                                  routed: Optional[float] = None) -> float:
    """Bytes a compiled MoE block (``COMPILED_MOE_ACT``: compiled in parts at every ``ep``, so ``ep`` does not change
    it) saves for backward for ``tokens`` tokens of which ``routed`` token-expert assignments run on this rank's experts
    (default ``routed_tokens``): the attention part as a compiled dense block's (q/kv/lse split by tp), the router's
    per-token and per-top-k-slot tensors, and the experts' per routed token (their d_model-wide rows whole on every tp
    rank, their hidden-wide ones split by expert tp)."""
    check_recompute(recompute)
    qk = qk_norm_act_bytes(cfg, tp, recompute, elem_bytes, compiled=True) * tokens
    return moe_block_bytes(cfg, COMPILED_MOE_ACT[recompute], tokens, tp, elem_bytes, routed) + qk


def moe_block_bytes(cfg: ModelConfig, c: dict[str, float], tokens: float, tp: int, elem_bytes: int,
                    routed: Optional[float] = None) -> float:
    """Bytes an MoE block saving ``c`` (``_MOE_KEYS`` counts: ``COMPILED_MOE_ACT`` / ``EAGER_MOE_ACT``) keeps for
    ``tokens`` tokens and ``routed`` token-expert assignments on this rank's experts (default ``routed_tokens``). Under
    tp the experts' hidden-wide tensors (``e_f``) are this rank's slice (expert tp: parallel/expert_tp.py); the routed
    rows (``e_h``) and the router's tensors stay whole on every tp rank (tp-replicated tokens)."""
    h, e, eb = cfg.d_model, cfg.n_experts, elem_bytes
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    slot = c["slot"] + (1 if c["slot"] and cfg.capacity_factor is not None else 0)  # the keep mask
    outside = (4.0 * c["x"] * h + eb * c["rep"] * h + c["stats"] + 4.0 * c["router_f"] * e + eb * c["router_c"] * e
               + 4.0 * c["z"] + slot * cfg.top_k)
    inside = eb * (c["q"] * q + c["kv"] * kv) + 4.0 * c["lse"] * cfg.n_heads
    expert = eb * (c["e_h"] * h + c["e_f"] * cfg.expert_ffn_dim / tp + c["e_gate"]) + 8.0 * c["e_idx"]
    if routed is None:
        routed = routed_tokens(cfg, tokens)
    return (outside + inside / tp) * tokens + expert * routed


def compiled_block_bytes(cfg: ModelConfig, index: int, tokens: float, tp: int, sp: bool, recompute: str,
                         elem_bytes: int) -> float:
    """``compiled_moe_activation_bytes`` for an MoE block, ``compiled_activation_bytes`` for a dense one."""
    if cfg.is_moe_layer(index):
        return compiled_moe_activation_bytes(cfg, tokens, tp, recompute, elem_bytes)
    return compiled_activation_bytes(cfg, tokens, tp, sp, recompute, elem_bytes)


def compiled_layer(cfg: ModelConfig, index: int, savers: Any, hw: Hardware) -> bool:
    """Whether block ``index`` is costed as compiled: a compiled run's blocks, dense (``COMPILED_ACT``) or MoE
    (``COMPILED_MOE_ACT``), without FP8/WTA-CRS savers (those keep the eager figures)."""
    return hw.compiled and not savers.fp8_act and savers.wta_crs is None


def embedding_param_count(cfg: ModelConfig, first: bool, last: bool, tp: int) -> float:
    """Parameters of the embedding (first stage) and the untied head + final norm (last stage), tp-sharded."""
    n = 0.0
    if first:
        n += cfg.vocab_size * cfg.d_model / tp
        if cfg.arch == "gpt2":
            n += cfg.max_seq_len * cfg.d_model
    if last:
        n += cfg.norm_params()
        if not cfg.tie_embeddings or not first:
            n += cfg.vocab_size * cfg.d_model / tp
    return n


EAGER_LOSS_PEAK_BYTES = 12.0  # per logit, meshwright's eager loss at its backward peak (loss_peak_bytes)


def logits_bytes(cfg: ModelConfig, tokens: float, tp: int, elem_bytes: int) -> float:
    """Logits of one microbatch on the last stage: the head's output plus the fp32 copy the loss keeps."""
    return tokens * cfg.vocab_size / tp * (elem_bytes + 4)


def loss_buffer_bytes(cfg: ModelConfig, tokens: float, tp: int) -> float:
    """What cross-entropy adds at the start of backward beyond ``logits_bytes``: the fp32 log-probabilities it
    saved and the fp32 gradient of the logits (4 + 4 B per vocabulary entry per token)."""
    return tokens * cfg.vocab_size / tp * 8.0


def loss_chunked(hw: Hardware) -> bool:
    """Whether the last stage runs head + loss per chunk of tokens (meshwright's runtime, ``loss_chunk_tokens`` > 0)."""
    return hw.loss_chunk_tokens > 0 and hw.stack == "meshwright"


def loss_peak_bytes(cfg: ModelConfig, tokens: float, tp: int, hw: Hardware) -> float:
    """Logits-sized buffers alive on the last stage at the loss's peak. Eager: the head's output and its fp32 copy
    (``logits_bytes``), plus the log-probabilities and fp32 gradient (``loss_buffer_bytes``) on real stacks. Compiled
    loss (train/compile.py, the head inside the compiled graph): the fused kernel saves only the compute-dtype logits
    and writes their gradient in the compute dtype, so 2 x elem bytes per logit (measured: 0.03 B per logit saved
    beyond the logits on CPU). Chunked (``loss_chunk_tokens``, models/chunked_loss.py): the same per-logit bytes,
    eager or compiled, but over one chunk of at most ``loss_chunk_tokens`` tokens: each chunk runs under
    checkpointing, so its logits are dropped after its forward and rebuilt one chunk at a time in backward."""
    if loss_chunked(hw):
        tokens = min(tokens, float(hw.loss_chunk_tokens))
    if hw.compiled:
        return tokens * cfg.vocab_size / tp * 2 * hw.elem_bytes
    if hw.stack == "meshwright" and hw.runtime_buffers:
        # our eager lm_loss: nothing keeps the head's output or its fp32 copy past the forward (log_softmax saves
        # only its result), so the peak is in backward: the saved fp32 log-probabilities, their gradient and the
        # logits' fp32 gradient, 12 B per logit (gpt2-small eager bf16 on an H200: ~11.5 B per logit measured);
        # Gemma's final soft-capping keeps tanh's output (the capped logits, compute dtype) for backward besides
        capped = hw.elem_bytes if cfg.final_softcap is not None else 0.0
        return tokens * cfg.vocab_size / tp * (EAGER_LOSS_PEAK_BYTES + capped)
    b = logits_bytes(cfg, tokens, tp, hw.elem_bytes)
    if hw.runtime_buffers:
        b += loss_buffer_bytes(cfg, tokens, tp)
    return b


def backward_working_bytes(cfg: ModelConfig, index: int, tokens: float, tp: int, sp: bool, recompute: str,
                           elem_bytes: int, compiled: bool = False) -> float:
    """Transient memory while one block runs backward: the activations recomputation rebuilds for it
    (all of them under full, the attention core under selective) plus the gradients of its widest pair of
    FFN activations (2 f/tp per token; an MoE block's experts: 2 f_e/tp per routed token, expert tp). A maximum
    over the rank's layers, like a ZeRO-3 gather buffer.
    A compiled block's recomputation rebuilds what its compiled graphs save (an MoE block's: its compiled parts')."""
    if compiled:
        none = compiled_block_bytes(cfg, index, tokens, tp, sp, "none", elem_bytes)
        kept = compiled_block_bytes(cfg, index, tokens, tp, sp, recompute, elem_bytes)
    else:
        none = activation_bytes(cfg, index, tokens, tp, sp, "none", elem_bytes)
        kept = activation_bytes(cfg, index, tokens, tp, sp, recompute, elem_bytes)
    if cfg.is_moe_layer(index):  # each tp rank runs its hidden slice of the experts on the routed assignments
        return (none - kept) + routed_tokens(cfg, tokens) * 2.0 * cfg.expert_ffn_dim / tp * elem_bytes
    return (none - kept) + tokens * 2.0 * cfg.ffn_dim / tp * elem_bytes


def embedding_static_bytes(cfg: ModelConfig, first: bool, last: bool, tp: int, dp: int, zero: int, states: str,
                           hw: Hardware) -> float:
    """Model states of the embedding (first rank) and head (last rank), plus the compute-dtype copy of the head
    weight where the policy keeps one (``weight_copy_bytes``; the embedding lookup runs in fp32 under autocast)."""
    if not (first or last):
        return 0.0
    n = embedding_param_count(cfg, first, last, tp)
    trained = lora_embedding_trained(cfg, hw, first, last, tp) if hw.lora is not None else None
    total = sum(model_state_bytes(n, dp, zero, states, hw, trained).values())
    table = cfg.vocab_size * cfg.d_model / tp
    if last:
        total += table * head_copy_bytes(zero, hw)
    if first and not (last and cfg.tie_embeddings):  # an untied (or other-stage) input embedding's own weights
        total += table * embedding_copy_bytes(zero, hw)
    return total


def framework_overhead_bytes(hw: Hardware, used_bytes: float) -> float:
    """Runtime context and buffers (the stack's reduction buckets among them) plus allocator fragmentation."""
    return hw.overhead_bytes + hw.stack_buffer_bytes + hw.fragmentation * used_bytes


def zero_buffer_bytes(hw: Hardware, zero: Any) -> Any:
    """A layer's share of the stack's reduction buckets beyond ``stack_buffer_bytes`` (the fewest any ZeRO stage
    holds): DeepSpeed holds none at ZeRO-0, two at ZeRO-1/2 and one at ZeRO-3. Counted as transient, a maximum over
    the rank's layers, so a rank of one ZeRO stage counts that stage's buckets once (``zero``: an int or an array)."""
    return np.asarray(hw.stack_buffers)[zero] - hw.stack_buffer_bytes


def zero3_transient_bytes(cfg: ModelConfig, index: int, shard_params: Any, hw: Hardware, parts: dict) -> Any:
    """What a ZeRO-3 layer adds while it runs (``shard_params``: its parameters on this rank, a float or an array).

    By default the all-gathered layer, the prefetched next one and (with runtime buffers) its unsharded gradient
    before the reduce-scatter. A stack with a live-parameter budget (DeepSpeed: ``DeepSpeedSizes.live_parameters``)
    keeps gathered parameters up to it, the layer in use and its prefetches included, at most the whole model on the
    rank (scaled by this layer's tp/ep sharding), plus the layer's unsharded gradient before it is copied into the
    reduction bucket."""
    gb = hw.policy.gather_bytes
    if not hw.zero3_live_params:
        return shard_params * gb * (3 if hw.runtime_buffers else 2)
    total = parts.get("num_params")
    if total is None:
        total = parts["num_params"] = float(cfg.num_params())
    whole = total * shard_params / max(cfg.layer_params(index), 1)
    return (np.minimum(hw.zero3_live_params, whole) + shard_params) * gb


# ---- whole-plan evaluation -------------------------------------------------------------------------

@dataclass
class Prediction:
    """Predicted figures of one plan; ``breakdown`` names the terms so users can check them."""

    step_s: float
    tokens_per_s: float
    tflops_per_device: float
    mfu: float
    hfu: float
    memory_gib: list[float]
    fits: bool
    breakdown: dict[str, float] = field(default_factory=dict)

    def to_dict(self, digits: int = 6) -> dict[str, Any]:
        r = lambda x: float(f"{x:.{digits}g}")  # noqa: E731 - stable significant-digit rounding for goldens
        return {
            "step_s": r(self.step_s), "tokens_per_s": r(self.tokens_per_s),
            "tflops_per_device": r(self.tflops_per_device), "mfu": r(self.mfu), "hfu": r(self.hfu),
            "memory_gib": [r(m) for m in self.memory_gib], "memory_gib_max": r(max(self.memory_gib)),
            "fits": self.fits, "breakdown": {k: r(v) for k, v in sorted(self.breakdown.items())},
        }


def lora_layer_key(hw: Hardware, index: int) -> tuple:
    """What sets block ``index``'s LoRA compute (the first block skips more dX than the rest); () without LoRA."""
    return hw.lora.layer_key(index) if hw.lora is not None else ()


def layer_costs(cfg: ModelConfig, index: int, s: Any, mb_samples: float, seq_len: int, hw: Hardware,
                states: str = "fp32", prev: Optional[tuple[int, bool]] = None,
                parts: Optional[dict[tuple, Any]] = None, lean: bool = False) -> Any:
    """All cost terms of block ``index`` under LayerStrategy ``s`` for a microbatch of ``mb_samples``
    sequences on this rank: per-microbatch compute and exposed communication, per-step DP traffic,
    static memory and activation bytes per microbatch.

    ``lean``: only what the search's DP reads, as a tuple (``layer_microbatch_s``, ``layer_step_dp_s`` + the optimizer
    step, accumulation per microbatch, static, activation and transient bytes) without building the dict.

    ``parts``: a cache of the terms that depend on a few of the strategy's fields (compute on tp/sp/recompute,
    shards and states on tp/dp/ZeRO, activations on tp/sp/recompute/savers), keyed by those fields, the layer's
    kind and the tokens: for one model, hardware and sequence length only (the search's memo)."""
    tokens = mb_samples * seq_len / s.cp  # context parallelism splits each sequence over cp ranks
    moe = cfg.is_moe_layer(index)
    sv = s.savers
    lemo = sv.lemo if sv.lemo is not None else 1.0
    if parts is None:
        parts = {}
    key = ("compute", moe, tokens, seq_len, s.tp, s.sp, s.recompute, s.ep, s.cp, sv.fp8_gemm, sv.lemo,
           lora_layer_key(hw, index), sv.fp8_act)
    comp = parts.get(key)
    if comp is None:
        comp = parts[key] = _compute_terms(cfg, index, moe, s, tokens, seq_len, lemo, hw)
    fwd, compute_mb, model_flops_mb, hw_flops_mb, comm_mb = comp
    overhead_mb = strategy_overhead_s(hw, s.tp, s.sp, s.zero, s.dp, tokens * lemo)
    if prev is not None:
        comm_mb += redistribution_s(tokens, cfg, prev, (s.tp, s.sp), hw)
    key = ("shard", moe, s.tp, s.dp, s.zero, s.dp_shard, s.ep, s.cp, states, lora_layer_key(hw, index))
    shard = parts.get(key)
    if shard is None:
        shard = parts[key] = _shard_terms(cfg, index, moe, s, states, hw)
    shard_params, dp_mb, dp_step, states_b, opt_step, accum_mb, cast_mb = shard
    compiled = compiled_layer(cfg, index, sv, hw)
    key = ("act", moe, tokens, seq_len, s.tp, s.sp, s.recompute, sv.fp8_act, sv.wta_crs, sv.lemo)
    acts = parts.get(key)
    if acts is None:
        acts = parts[key] = _activation_terms(cfg, index, s, tokens, seq_len, lemo, compiled, hw)
    act, working = acts
    gathered = float(zero3_transient_bytes(cfg, index, shard_params, hw, parts)) if s.zero >= 3 else 0.0
    gathered += float(zero_buffer_bytes(hw, s.zero))
    copies = shard_params * weight_copy_bytes(s.zero, hw)  # compute-dtype copies of the weights in use
    compute_mb += weight_traffic_mb_s(shard_params, s.recompute, hw, s.zero, trained=(
        hw.lora.trained_on_rank(index, s.tp, s.ep) if hw.lora is not None else None))
    if hw.policy.shard_cast_zero:  # fsdp_cast_s (added as layer_costs_columns adds it: the same floats)
        compute_mb += cast_mb
    if compiled and s.recompute != "none":
        # a compiled checkpointed block saves no weight copy (the casts are recomputed): one layer's at a time
        working += copies if hw.runtime_buffers else 0.0
        copies = 0.0
    if lean:
        return (microbatch_s(compute_mb, comm_mb, overhead_mb, dp_mb, hw),
                step_dp_s(compute_mb, fwd, dp_step, hw, hw.dp_overlapped(s.zero, s.tp, s.ep)) + opt_step,
                accum_mb, sum(states_b.values()) + copies, act, gathered + working)
    return {
        "compute_mb": compute_mb, "fwd_mb": fwd, "comm_mb": comm_mb, "overhead_mb": overhead_mb, "dp_mb": dp_mb, "dp_step": dp_step,
        "dp_overlapped": hw.dp_overlapped(s.zero, s.tp, s.ep), "cast_mb": cast_mb,
        "static_bytes": sum(states_b.values()) + copies, "act_bytes": act, "gathered_bytes": gathered,
        "transient_bytes": gathered + working, "copy_bytes": copies,
        "model_flops_mb": model_flops_mb, "hw_flops_mb": hw_flops_mb, "shard_params": shard_params,
        "opt_step": opt_step, "accum_mb": accum_mb,
        **{f"{k}_bytes": v for k, v in states_b.items()},
    }


class StrategyColumns:
    """One list of strategies (of one block kind) as columns, built once per list: the fields ``layer_costs_columns``
    reads per strategy, and per group of strategies that share a cost term (compute on tp/sp/recompute/ep/cp/FP8 GEMM/
    LeMo/FP8 activations (their casts) and dp, which sets the tokens; shards on tp/dp/ZeRO/HSDP/ep/cp; activations on
    tp/sp/recompute/savers and dp/cp; framework overhead on tp/sp/ZeRO/dp/cp/LeMo) one representative and each
    strategy's group index."""

    # the fields each group shares, as positions in __init__'s per-strategy rows
    GROUPS = {"compute": (0, 1, 2, 3, 4, 5, 6, 7, 10),  # tp, sp, recompute, ep, cp, FP8 GEMM, LeMo, dp, FP8 act (casts)
              "shard": (0, 7, 8, 9, 3, 4),  # tp, dp, ZeRO, HSDP shard, ep, cp
              "act": (0, 1, 2, 10, 11, 6, 7, 4),  # tp, sp, recompute, FP8 activations, WTA-CRS, LeMo, dp, cp
              "overhead": (0, 1, 8, 7, 4, 6)}  # tp, sp, ZeRO, dp, cp, LeMo

    def __init__(self, cfg: ModelConfig, index: int, strategies: list[Any], hw: Hardware) -> None:
        self.strategies = strategies
        n = len(strategies)
        rows = [(s.tp, s.sp, s.recompute, s.ep, s.cp, s.savers.fp8_gemm, s.savers.lemo, s.dp, s.zero, s.dp_shard,
                 s.savers.fp8_act, s.savers.wta_crs) for s in strategies]
        self.reps: dict[str, list[Any]] = {}
        idx = {}
        for name, fields in self.GROUPS.items():
            # group numbers in order of first appearance; a group's representative is its first strategy
            groups: dict[tuple, int] = {}
            keys = map(operator.itemgetter(*fields), rows)
            idx[name] = np.fromiter((groups.setdefault(k, len(groups)) for k in keys), dtype=np.intp, count=n)
            self.reps[name] = [strategies[i] for i in np.unique(idx[name], return_index=True)[1].tolist()]
        rc_on = np.fromiter((s.recompute != "none" for s in strategies), dtype=bool, count=n)
        compiled = np.fromiter((compiled_layer(cfg, index, s.savers, hw) for s in strategies), dtype=bool, count=n)
        self.idx = idx
        self.classes = [(s.tp, s.sp) for s in strategies]
        self.max_dp_cp = max((s.dp * s.cp for s in strategies), default=1)
        self.tp_sp_cp = sorted({(s.tp, s.sp, s.cp) for s in strategies})
        self.zero = np.array([s.zero for s in strategies], dtype=np.intp)
        self.zero3 = self.zero >= 3
        # weight_traffic_mb_s's reads and writes (0 where autocast casts nothing: autocast_casts)
        casts = np.fromiter((autocast_casts(s.zero, hw) for s in strategies), dtype=bool, count=n)
        self.cast_factor = np.where(casts, np.where(rc_on, 6.0 * 2 + 6.0, 6.0 * 1 + 6.0), 0.0)
        self.copy_bytes = np.fromiter((weight_copy_bytes(s.zero, hw) for s in strategies), dtype=float, count=n)
        self.dp_overlapped = np.fromiter((hw.dp_overlapped(s.zero, s.tp, s.ep) for s in strategies), dtype=bool, count=n)
        self.compiled_rc = compiled & rc_on
        self.blocks: list["StrategyColumns"] = []  # the lists this one concatenates (``concat``), if any

    @classmethod
    def concat(cls, blocks: list["StrategyColumns"]) -> "StrategyColumns":
        """The columns of the blocks' strategies one after another, from theirs (no Python step per strategy). For
        blocks that share no group (the search's: one tp degree each, and every group key holds tp), the groups and
        their order are those ``__init__`` finds in the concatenated list; ``layer_costs_columns`` reads the blocks'
        cached terms, so lists that share a block cost it once."""
        self = cls.__new__(cls)
        self.blocks = list(blocks)
        self.strategies = [s for b in blocks for s in b.strategies]
        self.reps = {name: [s for b in blocks for s in b.reps[name]] for name in cls.GROUPS}
        self.idx = {}
        for name in cls.GROUPS:
            offsets = np.cumsum([0] + [len(b.reps[name]) for b in blocks[:-1]])
            self.idx[name] = np.concatenate([b.idx[name] + off for b, off in zip(blocks, offsets.tolist())]
                                            or [np.zeros(0, dtype=np.intp)])
        self.classes = [c for b in blocks for c in b.classes]
        self.max_dp_cp = max((b.max_dp_cp for b in blocks if b.strategies), default=1)
        self.tp_sp_cp = sorted({x for b in blocks for x in b.tp_sp_cp})
        self.zero = np.concatenate([b.zero for b in blocks] or [np.zeros(0, dtype=np.intp)])
        for name in ("zero3", "cast_factor", "copy_bytes", "dp_overlapped", "compiled_rc"):
            setattr(self, name, np.concatenate([getattr(b, name) for b in blocks] or [np.zeros(0)]))
        return self


def layer_costs_columns(cfg: ModelConfig, index: int, cols: StrategyColumns, mb_dp: float, seq_len: int,
                        hw: Hardware, states: str, parts: dict[tuple, Any]) -> np.ndarray:
    """``layer_costs(..., lean=True, parts=parts)`` of every strategy of ``cols`` at ``mb_dp / s.dp`` sequences per
    microbatch, as a (6, n) array (the lean tuple's fields in rows), without a Python step per strategy: each
    term is computed once per group that shares it, then the per-strategy arithmetic runs on whole arrays. The same
    operations in the same order, so the same floats (tests/unit/test_search.py checks it against ``layer_costs``).

    The terms that depend on the tokens (compute, overhead, activations) and those that depend on the state format
    (shards) are kept in ``parts`` per list of strategies, gathered per strategy: a search costs each list at every
    micro-batch in both state formats, and each half is then built once, not once per pair."""
    by_tokens = _token_columns(cfg, index, cols, mb_dp, seq_len, hw, parts)
    by_states = _state_columns(cfg, index, cols, states, hw, parts)
    fwd, compute_mb, comm_mb, overhead_mb, act_b, working = by_tokens
    shard_params, dp_mb, dp_step, states_b, opt_step, accum_mb, cast_mb = by_states
    slowdown = hw.overlap_slowdown
    gathered = np.where(cols.zero3, zero3_transient_bytes(cfg, index, shard_params, hw, parts), 0.0)
    gathered = gathered + zero_buffer_bytes(hw, cols.zero)
    copies = shard_params * cols.copy_bytes
    if hw.policy.weight_copy_bytes > 0:  # weight_traffic_mb_s
        if hw.lora is not None:  # the gradients cast up: the adapters' only
            trained = hw.lora.trained_on_rank(index, np.array([tp for tp, _ in cols.classes], dtype=float),
                                              np.array([s.ep for s in cols.strategies], dtype=float))
            compute_mb = compute_mb + np.where(cols.cast_factor > 0, shard_params * (cols.cast_factor - 6.0)
                                               + trained * 6.0, 0.0) / hw.mem_bw
        else:
            compute_mb = compute_mb + shard_params * cols.cast_factor / hw.mem_bw
    if hw.policy.shard_cast_zero:  # fsdp_cast_s
        compute_mb = compute_mb + cast_mb
    if hw.runtime_buffers:
        working = np.where(cols.compiled_rc, working + copies, working)
    copies = np.where(cols.compiled_rc, 0.0, copies)
    # microbatch_s and step_dp_s (exposed_s: overlap_s less the compute)
    mb_s = (compute_mb + comm_mb + overhead_mb
            + (np.maximum(compute_mb, dp_mb) + slowdown * np.minimum(compute_mb, dp_mb) - compute_mb))
    if hw.dp_overlap:
        bwd = compute_mb - fwd
        overlapped = np.maximum(bwd, dp_step) + slowdown * np.minimum(bwd, dp_step) - bwd
        step = np.where(cols.dp_overlapped, overlapped, dp_step)
    else:
        step = dp_step
    return np.stack([mb_s, step + opt_step, accum_mb, states_b + copies, act_b, gathered + working])


def _token_columns(cfg: ModelConfig, index: int, cols: StrategyColumns, mb_dp: float, seq_len: int, hw: Hardware,
                   parts: dict[tuple, Any]) -> tuple[np.ndarray, ...]:
    """``layer_costs_columns``' terms that depend on the tokens, per strategy: forward, compute and communication
    seconds and framework overhead per microbatch, activation bytes and the backward working set. Cached in ``parts``
    per list (per block of a concatenated one)."""
    key = ("columns-tokens", cols, mb_dp, seq_len)
    got = parts.get(key)
    if got is None:
        if cols.blocks:
            got = tuple(np.concatenate(x) for x in zip(*(_token_columns(cfg, index, b, mb_dp, seq_len, hw, parts)
                                                          for b in cols.blocks)))
        else:
            got = _token_columns_of(cfg, index, cols, mb_dp, seq_len, hw, parts)
        parts[key] = got
    return got


def _token_columns_of(cfg: ModelConfig, index: int, cols: StrategyColumns, mb_dp: float, seq_len: int, hw: Hardware,
                      parts: dict[tuple, Any]) -> tuple[np.ndarray, ...]:
    """``_token_columns`` of one list of strategies."""
    moe = cfg.is_moe_layer(index)

    def tokens_of(s: Any) -> float:
        return mb_dp / s.dp * seq_len / s.cp

    reps = cols.reps
    comp = np.empty((3, len(reps["compute"])))
    for g, s in enumerate(reps["compute"]):
        tokens, sv = tokens_of(s), s.savers
        key = ("compute", moe, tokens, seq_len, s.tp, s.sp, s.recompute, s.ep, s.cp, sv.fp8_gemm, sv.lemo,
               lora_layer_key(hw, index), sv.fp8_act)
        c = parts.get(key)
        if c is None:
            c = parts[key] = _compute_terms(cfg, index, moe, s, tokens, seq_len, sv.lemo if sv.lemo is not None else 1.0,
                                            hw)
        comp[0, g], comp[1, g], comp[2, g] = c[0], c[1], c[4]  # forward, compute, communication seconds
    over = np.empty(len(reps["overhead"]))
    for g, s in enumerate(reps["overhead"]):
        lemo = s.savers.lemo if s.savers.lemo is not None else 1.0
        over[g] = strategy_overhead_s(hw, s.tp, s.sp, s.zero, s.dp, tokens_of(s) * lemo)
    act = np.empty((2, len(reps["act"])))
    for g, s in enumerate(reps["act"]):
        tokens, sv = tokens_of(s), s.savers
        key = ("act", moe, tokens, seq_len, s.tp, s.sp, s.recompute, sv.fp8_act, sv.wta_crs, sv.lemo)
        a = parts.get(key)
        if a is None:
            a = parts[key] = _activation_terms(cfg, index, s, tokens, seq_len, sv.lemo if sv.lemo is not None else 1.0,
                                               compiled_layer(cfg, index, sv, hw), hw)
        act[0, g], act[1, g] = a
    fwd, compute_mb, comm_mb = comp[:, cols.idx["compute"]]
    act_b, working = act[:, cols.idx["act"]]
    return fwd, compute_mb, comm_mb, over[cols.idx["overhead"]], act_b, working


def _state_columns(cfg: ModelConfig, index: int, cols: StrategyColumns, states: str, hw: Hardware,
                   parts: dict[tuple, Any]) -> np.ndarray:
    """``layer_costs_columns``' shard terms per strategy (``_shard_terms``' fields, the state bytes summed): they
    depend on the state format, not on the tokens. Cached in ``parts`` per list (per block of a concatenated one)."""
    key = ("columns-states", cols, states)
    got = parts.get(key)
    if got is None:
        if cols.blocks:
            got = np.concatenate([_state_columns(cfg, index, b, states, hw, parts) for b in cols.blocks], axis=1)
        else:
            got = _state_columns_of(cfg, index, cols, states, hw, parts)
        parts[key] = got
    return got


def _state_columns_of(cfg: ModelConfig, index: int, cols: StrategyColumns, states: str, hw: Hardware,
                      parts: dict[tuple, Any]) -> np.ndarray:
    """``_state_columns`` of one list of strategies."""
    moe = cfg.is_moe_layer(index)
    reps = cols.reps["shard"]
    shard = np.empty((7, len(reps)))
    for g, s in enumerate(reps):
        key = ("shard", moe, s.tp, s.dp, s.zero, s.dp_shard, s.ep, s.cp, states, lora_layer_key(hw, index))
        sh = parts.get(key)
        if sh is None:
            sh = parts[key] = _shard_terms(cfg, index, moe, s, states, hw)
        shard[:, g] = (sh[0], sh[1], sh[2], sum(sh[3].values()), sh[4], sh[5], sh[6])
    return shard[:, cols.idx["shard"]]


def expert_params(cfg: ModelConfig) -> int:
    """Parameters of one MoE block's routed experts (SwiGLU w1/w3/w2 of each), the part tp and ep may shard."""
    return cfg.n_experts * 3 * cfg.d_model * cfg.expert_ffn_dim


def block_replicated_params(cfg: ModelConfig) -> int:
    """Parameters of any block every tp rank holds whole (every stack's tp: DTensor, megatron-core, torchtitan): its
    norms (two, four with Gemma's post norms; GPT-2's LayerNorms with their biases; ``SequenceParallel`` keeps them
    replicated too), Qwen3/Gemma 3's q/k head norms, and GPT-2's attention output bias (a row-parallel linear's bias
    is added once, after the reduction: ``RowwiseParallel`` and megatron's ``RowParallelLinear`` hold it whole)."""
    row_bias = cfg.d_model if cfg.arch == "gpt2" else 0
    return cfg.block_norms() * cfg.norm_params() + cfg.qk_norm_params() + row_bias


def dense_replicated_params(cfg: ModelConfig) -> int:
    """Parameters of a dense block every tp rank holds whole: ``block_replicated_params`` and GPT-2's MLP output
    (w2, row-parallel) bias."""
    return block_replicated_params(cfg) + (cfg.d_model if cfg.arch == "gpt2" else 0)


def dense_params_on_rank(cfg: ModelConfig, index: int, tp: Any) -> Any:
    """A dense block's parameters on one of ``tp`` ranks (before any ZeRO sharding): the linear layers' weights and
    column-parallel biases split over tp, ``dense_replicated_params`` whole (they were divided by tp until stop 37:
    a tp8 llama2-7b block's 8,192 norm weights counted 1,024). ``tp`` may be an array."""
    rep = dense_replicated_params(cfg)
    return (cfg.layer_params(index) - rep) / tp + rep


def moe_replicated_params(cfg: ModelConfig) -> int:
    """Parameters of an MoE block every tp rank holds whole: the router (d_model x n_experts) and
    ``block_replicated_params`` (norms, Qwen3's q/k head norms: plain, tp-replicated tensors in the runtime,
    parallel/tensor_parallel.py)."""
    return cfg.d_model * cfg.n_experts + block_replicated_params(cfg)


def moe_dense_params_on_rank(cfg: ModelConfig, index: int, tp: int) -> float:
    """An MoE block's non-expert parameters on one tp rank: the attention split over tp, the router and norms whole
    (``moe_replicated_params``)."""
    rep = moe_replicated_params(cfg)
    return (cfg.layer_params(index) - expert_params(cfg) - rep) / tp + rep


def expert_tp(tp: int, hw: Hardware) -> int:
    """The share of the tp group an expert's weights are split over: ``tp`` where the stack shards them
    (``Stack.experts_tp_sharded``: meshwright, Megatron-core, torchtitan), 1 where every tp rank holds them whole
    (DeepSpeed MoE)."""
    return tp if hw.experts_tp_sharded else 1


def expert_params_on_rank(cfg: ModelConfig, tp: int, ep: int, hw: Hardware) -> float:
    """Routed-expert parameters of one MoE block one rank holds at (``tp``, ``ep``), before any ZeRO sharding."""
    return expert_params(cfg) / (ep * expert_tp(tp, hw))


def expert_fwd_flops(cfg: ModelConfig, tokens: float) -> float:
    """Forward FLOPs of one MoE block's routed experts for ``tokens`` tokens (top_k SwiGLU experts each: 2 per
    active weight), the part of ``layer_fwd_flops`` a stack may not split over tp (``Stack.expert_compute_tp_split``)."""
    return 2.0 * cfg.top_k * 3 * cfg.d_model * cfg.expert_ffn_dim * tokens


def _compute_terms(cfg: ModelConfig, index: int, moe: bool, s: Any, tokens: float, seq_len: int, lemo: float,
                   hw: Hardware) -> tuple[float, float, float, float, float]:
    """layer_costs' compute and TP/CP/EP collectives per microbatch (before the weights' traffic): forward seconds,
    compute seconds, model and hardware FLOPs, communication seconds."""
    model_fwd = layer_fwd_flops(cfg, index, tokens, seq_len) / s.tp  # the rank's share of the work, counted once
    fwd_flops = model_fwd  # what the rank executes: its tp share, and its experts whole where a stack replicates them
    if moe and not hw.expert_compute_tp_split and s.tp > 1:
        fwd_flops += expert_fwd_flops(cfg, tokens) * (1.0 - 1.0 / s.tp)
    extra = recompute_extra_fwd_fraction(cfg, index, seq_len, s.recompute)
    ffn_width = cfg.expert_ffn_dim / expert_tp(s.tp, hw) if moe else cfg.ffn_dim / s.tp
    width = min(cfg.d_model, ffn_width, cfg.n_heads // s.tp * cfg.head_dim)
    matmul_flops = fwd_flops
    attn = 0.0
    if flash_kernels(hw) and not hw.block_time_measured:  # the attention core runs in its own kernel, not at matmul speed
        matmul_flops -= attention_core_fwd_flops(cfg, tokens, seq_len, s.tp)
        attn = flash_attention_fwd_s(cfg, tokens * lemo, seq_len, s.tp, hw)
    fp8_gemm = s.savers.fp8_gemm and not moe
    if fp8_gemm:  # COAT FP8 GEMMs: the linear layers' share runs at FP8 throughput
        linear = 2 * tokens * cfg.layer_params(index) / s.tp
        matmul_flops = matmul_flops - linear + linear / fp8_matmul_speedup(hw)
    matmul = compute_s(matmul_flops * lemo, hw, width)
    memory_bound = 0.0 if hw.block_time_measured else (
        elementwise_s(cfg, index, tokens * lemo, s.tp, s.sp, hw) + attention_scores_s(cfg, tokens * lemo, seq_len, s.tp, hw))
    fwd = matmul + attn + memory_bound
    extra_mm = extra_mem = extra_attn = extra
    if s.recompute == "selective" and hw.stack == "meshwright":
        # meshwright's SAC policy keeps matmul and attention outputs: backward reruns the memory-bound ops only
        extra_mm, extra_mem, extra_attn = 0.0, 1.0, 0.0
    elif attn > 0 and s.recompute != "none":
        # full reruns the whole forward (attention included); selective (Korthikanti) reruns the attention core
        extra_mm, extra_attn = (1.0, 1.0) if s.recompute == "full" else (0.0, 1.0)
    # backward is 2x forward for matmuls (input and weight gradients) but ~1x for memory-bound kernels
    compute_mb = (matmul * (3.0 + extra_mm) + attn * (1.0 + FLASH_BWD_OVER_FWD + extra_attn)
                  + memory_bound * (2.0 + extra_mem) + hw.layer_overhead_s)
    if s.savers.fp8_act and not moe:  # COAT's casts: a model profile times plain blocks, so its fits hold none of them
        compute_mb += fp8_cast_s(cfg, index, tokens * lemo, s.tp, fp8_gemm, hw)
    model_flops_mb = model_fwd * 3.0
    hw_flops_mb = fwd_flops * lemo * (3.0 + (0.0 if s.recompute == "selective" and hw.stack == "meshwright" else extra))
    if hw.lora is not None:
        lora_mb, lora_flops, lora_hw_flops = lora_compute_terms(cfg, index, tokens, seq_len, s.tp, extra_mm, width, hw)
        compute_mb += lora_mb * lemo
        model_flops_mb += lora_flops
        hw_flops_mb += lora_hw_flops * lemo
    comm_mb = tp_comm_s(tokens * lemo, cfg, s.tp, s.sp, s.recompute, hw)
    if hw.tp_wgrad_overlap and comm_mb > 0:
        # the 2 backward collectives run under the weight-gradient matmuls (1x forward matmul time)
        bwd_comm = comm_mb * 2.0 / (4 + (2 if s.recompute == "full" else 0))
        comm_mb = comm_mb - bwd_comm + exposed_s(matmul, bwd_comm, hw.overlap_slowdown)
    if s.cp > 1:
        comm_mb += exposed_s(3.0 * compute_s(attention_core_fwd_flops(cfg, tokens, seq_len, s.tp), hw, cfg.head_dim),
                             cp_ring_s(tokens, cfg, s.tp, s.cp, hw), hw.overlap_slowdown)
    if moe:
        comm_mb += ep_comm_s(tokens * lemo, cfg, s.ep, s.tp, s.recompute, hw)
    return fwd, compute_mb, model_flops_mb, hw_flops_mb, comm_mb


def lora_compute_terms(cfg: ModelConfig, index: int, tokens: float, seq_len: int, tp: int, extra_mm: float,
                       width: float, hw: Hardware) -> tuple[float, float, float]:
    """What a LoRA step changes in block ``index``'s compute per microbatch (``hw.lora``, memory/lora_cost.py):
    seconds (the frozen base's dW and the dX nothing needs, removed at the block's GEMM width; the adapters' GEMMs,
    forward + dA + dB + their dX, added at the rank's width, their forward again under full recomputation), model
    FLOPs and hardware FLOPs."""
    st = hw.lora
    delta = st.layer_flops_delta(cfg, index, seq_len) * tokens / tp
    experts = st.expert_flops(index)  # the expert adapters' per token (their top_k experts')
    base = delta - (6.0 * st.adapter[index] - 2.0 * st.no_dgrad_adapter[index] + experts) * tokens / tp  # <= 0
    # the adapters' GEMMs on this rank: the factors tp replicates (a column base's A, a row base's B) run whole on
    # every rank (``LoraStep.on_rank``), the others split; the expert adapters run with their experts
    # (``expert_adapter_tp``: under expert tp gate_up's A and down's B whole on every rank, as the linear ones'
    # replicated factors; they were divided by tp until stop 37); the model FLOPs count the work once (``delta``)
    e_tp, e_rep = expert_adapter_tp(tp, hw)
    adapters = (6.0 * st.on_rank(index, tp) - 2.0 * st.no_dgrad_adapter_on_rank(index, tp)
                + st.expert_flops_on_rank(index, e_tp, e_rep)) * tokens
    active = st.on_rank(index, tp) + st.expert_active_on_rank(index, e_tp, e_rep)
    repeat = 2.0 * active * tokens * extra_mm
    seconds = compute_s(adapters + repeat, hw, st.rank) + compute_s(base, hw, width)
    if not hw.block_time_measured:  # a profile of LoRA blocks timed them (profiling/model.py)
        seconds += lora_elementwise_s(st, index, tokens, extra_mm, hw, tp)
    return seconds, delta, base + adapters + repeat


def expert_adapter_tp(tp: int, hw: Hardware) -> tuple[int, int]:
    """How one of ``tp`` ranks runs the expert adapters' work, as (``tp`` for their hidden-sliced factors, ``tp`` for
    the others) of ``LoraStep.expert_flops_on_rank``: under expert tp (``Hardware.experts_tp_sharded``, meshwright's
    models/moe.py ``_low_rank``) gate_up's B and down's A on the rank's hidden slice, gate_up's A and down's B whole
    (tp, 1); where the stack splits the experts' work by tokens (DeepSpeed MoE) all of it (tp, tp); where it does not
    split it, none (1, 1)."""
    if not hw.expert_compute_tp_split:
        return 1, 1
    return (tp, 1) if hw.experts_tp_sharded else (tp, tp)


# Elements an eager adapter (memory/lora.py LoRALinear) moves per token besides its GEMMs' FLOPs, in units of its
# input (in) and output (out) widths: forward reads x for A (in), writes B's output, scales it (read + write) and adds
# it to the base's (2 reads + write): in + 6 out; backward scales the gradient (read + write), reads it for dB and for
# the low-rank gradient, reads x for dA, writes the input gradient and adds it to the base's (2 reads + write):
# 5 in + 4 out. The rank-wide tensors are left out. On a 2-core CPU a rank-8 LoRA block of d_model 384 ran ~20% above
# its FLOPs' share for this traffic (benchmarks/results/lora_cost.md).
LORA_ELEM_IN, LORA_ELEM_OUT = 6.0, 10.0


def lora_elementwise_s(st: Any, index: int, tokens: float, extra_mm: float, hw: Hardware, tp: int = 1) -> float:
    """Memory-bound time of block ``index``'s adapters per microbatch on one of ``tp`` ranks (``LORA_ELEM_*``; their
    forward part again under full recomputation), at the widths the rank moves (``LoraStep.widths_on_rank``)."""
    w_in, w_out = st.widths_on_rank(index, tp, *expert_adapter_tp(tp, hw))
    fwd = w_in * 1.0 + w_out * 6.0
    total = w_in * LORA_ELEM_IN + w_out * LORA_ELEM_OUT + extra_mm * fwd
    return total * tokens * hw.elem_bytes / hw.mem_bw


def _shard_terms(cfg: ModelConfig, index: int, moe: bool, s: Any, states: str, hw: Hardware
                 ) -> tuple[float, float, float, dict[str, float], float, float, float]:
    """layer_costs' terms of one rank's shard: parameters on it (attention/dense MLP split by tp, experts by ep and,
    where the stack shards them, by tp: ``expert_params_on_rank``), DP traffic per microbatch and per step, model-state bytes, optimizer step (with FSDP2's per-step casts) and
    gradient accumulation, and FSDP2's casts per microbatch (``fsdp_cast_s``)."""
    # LoRA: the adapters' gradients only, as one tp rank holds them (``LoraStep.on_rank``: a column base's A and a row
    # base's B whole on every rank, the other factor split with the base)
    lora_rank = hw.lora.on_rank(index, s.tp) if hw.lora is not None else None
    if moe:
        dense = moe_dense_params_on_rank(cfg, index, s.tp)  # "dense": the block's non-expert parameters on this rank
        exp_rank = expert_params_on_rank(cfg, s.tp, s.ep, hw)
        shard_params = dense + exp_rank
        trained = lora_rank  # LoRA's linear adapters sit on the dense part (attention): split as tp places them,
        # replicated over ep like it; the expert adapters go with their experts (/ ep, reduced over the edp group)
        exp_trained = hw.lora.expert_on_rank(index, s.ep) if hw.lora is not None else None
        dpc = s.dp * s.cp  # weights are replicated over cp ranks: gradients reduce over dp*cp
        dp_dense_mb, dp_dense_step = dp_comm_s(dense, dpc, s.zero, s.tp, hw, trained)
        dp_exp_mb, dp_exp_step = dp_comm_s(exp_rank, dpc // s.ep, s.zero, s.tp * s.ep, hw, exp_trained)
        dp_mb, dp_step = dp_dense_mb + dp_exp_mb, dp_dense_step + dp_exp_step
        adapters = trained or 0.0  # LoRA: the adapters' weights beside the base, and theirs the only gradients
        states_b = model_state_bytes(dense + adapters, dpc, s.zero, states, hw, trained)
        exp_b = model_state_bytes(exp_rank + (exp_trained or 0.0), dpc // s.ep, s.zero, states, hw, exp_trained)
        states_b = {k: states_b[k] + exp_b[k] for k in states_b}
        cast_dense, cast_dense_step = fsdp_cast_s(dense, dpc, s.zero, hw)
        cast_exp, cast_exp_step = fsdp_cast_s(exp_rank, dpc // s.ep, s.zero, hw)
        cast_mb, cast_step = cast_dense + cast_exp, cast_dense_step + cast_exp_step
    else:
        shard_params = dense_params_on_rank(cfg, index, s.tp)  # the norms (and row biases) whole on every tp rank
        trained = lora_rank
        group = s.dp_shard or s.dp * s.cp  # HSDP: ZeRO state and gathers inside groups of dp_shard ranks
        dp_mb, dp_step = dp_comm_s(shard_params, group, s.zero, s.tp, hw, trained)
        if group < s.dp:
            dp_mb += hsdp_allreduce_s(shard_params if trained is None else trained, s.dp, group, s.tp, hw)
        states_b = model_state_bytes(shard_params + (trained or 0.0), group, s.zero, states, hw, trained)
        cast_mb, cast_step = fsdp_cast_s(shard_params, group, s.zero, hw)
    zero_dp = s.dp_shard or s.dp * s.cp
    # the optimizer steps the trainable ones only (LoRA: the block's adapters, its experts' too)
    stepped = shard_params if lora_rank is None else hw.lora.trained_on_rank(index, s.tp, s.ep if moe else 1)
    if moe and lora_rank is None and s.ep > 1 and s.zero >= 1:
        # ZeRO-1/2/3 under ep: the experts' gradients and states are sharded over their edp group (dp*cp/ep ranks:
        # parallel/expert_fsdp.py; Megatron's distributed optimizer), the rest over dp*cp
        accum_mb, accum_step = (sum(x) for x in zip(grad_accumulation_s(dense, s.dp * s.cp, s.zero, hw),
                                                      grad_accumulation_s(exp_rank, dpc // s.ep, s.zero, hw)))
        opt_step = (optimizer_step_s(dense, s.dp * s.cp, s.zero, states, hw)
                    + optimizer_step_s(exp_rank, dpc // s.ep, s.zero, states, hw) + cast_step + accum_step)
        return shard_params, dp_mb, dp_step, states_b, opt_step, accum_mb, cast_mb
    accum_mb, accum_step = grad_accumulation_s(stepped, zero_dp, s.zero, hw)
    opt_step = (optimizer_step_s(stepped, zero_dp if not moe else s.dp * s.cp, s.zero, states, hw) + cast_step
                + accum_step)
    return shard_params, dp_mb, dp_step, states_b, opt_step, accum_mb, cast_mb


def _activation_terms(cfg: ModelConfig, index: int, s: Any, tokens: float, seq_len: int, lemo: float, compiled: bool,
                      hw: Hardware) -> tuple[float, float]:
    """layer_costs' activation bytes per microbatch and the backward working set (before weight copies)."""
    if compiled:
        act = hw.act_scale * compiled_block_bytes(cfg, index, tokens * lemo, s.tp, s.sp, s.recompute, hw.elem_bytes)
    else:
        act = hw.act_scale * activation_bytes(cfg, index, tokens, s.tp, s.sp, s.recompute, hw.elem_bytes,
                                              s.savers.fp8_act, s.savers.wta_crs, s.savers.lemo)
        fp8_block = fp8_counted_block(cfg, index, s.savers.fp8_act, s.recompute)
        # EAGER_MOE_ACT holds autocast's casts; an FP8 block saves none (its own casts replace them: measured)
        if hw.policy.weight_copy_bytes > 0 and not cfg.is_moe_layer(index) and not fp8_block:
            act += hw.act_scale * autocast_extra_act_bytes(cfg, tokens * lemo, s.tp, s.sp, s.recompute)
    act += attention_score_bytes(cfg, tokens * lemo, seq_len, s.tp, s.recompute, hw)
    working = (backward_working_bytes(cfg, index, tokens * lemo, s.tp, s.sp, s.recompute, hw.elem_bytes, compiled)
               * hw.act_scale if hw.runtime_buffers else 0.0)
    return act, working


def layer_microbatch_s(c: dict[str, float], hw: Hardware) -> float:
    """Time one layer adds to its rank per microbatch: compute, TP/EP collectives, framework overhead and
    the part of per-microbatch DP traffic (ZeRO-2/3) that compute does not hide."""
    return microbatch_s(c["compute_mb"], c["comm_mb"], c["overhead_mb"], c["dp_mb"], hw)


def microbatch_s(compute: float, comm: float, overhead: float, dp_mb: float, hw: Hardware) -> float:
    """``layer_microbatch_s`` from its terms."""
    return compute + comm + overhead + exposed_s(compute, dp_mb, hw.overlap_slowdown)


def layer_step_dp_s(c: dict[str, float], hw: Hardware) -> float:
    """Per-step DP traffic of one layer left exposed after overlapping it with the last backward (all of it
    when the stack reduces gradients after backward, e.g. Megatron-LM without --overlap-grad-reduce)."""
    return step_dp_s(c["compute_mb"], c["fwd_mb"], c["dp_step"], hw, c["dp_overlapped"])


def step_dp_s(compute: float, fwd: float, dp_step: float, hw: Hardware, overlapped: bool) -> float:
    """``layer_step_dp_s`` from its terms (``overlapped``: ``Hardware.dp_overlapped`` of the layer's ZeRO stage)."""
    if not overlapped:
        return dp_step
    return exposed_s(compute - fwd, dp_step, hw.overlap_slowdown)


def reduce_copy_bytes(cfg: ModelConfig, index: int, s: Any, hw: Hardware) -> float:
    """The flat copy meshwright's manual all-reduce makes of block ``index``'s largest gradient group after the last
    backward (parallel/data_parallel.py ``all_reduce_grads``: one ``torch.cat`` of the group's local gradients,
    reduced and copied back; a bucketed reduction would change the ring's summation order at dp > 2). Its groups
    (parallel/runtime.py ``_apply_layers``): the block's non-expert gradients over its dp group, and under ep its
    expert shards over the edp group. 0 where the layer is not reduced after backward (``reduces_after_backward``,
    the predicate its time cost reads: DDP's bucket views or FSDP2 otherwise) or has no dp group. Measured with the
    CPU profiler in tests/distributed/state_bytes_worker.py (one block's gradients: 0.818 B per model parameter
    of tiny-par, as counted here)."""
    if s.dp <= 1 or not hw.reduces_after_backward(s.zero, s.tp, s.ep):
        return 0.0
    st = hw.lora  # LoRA: the adapters alone have gradients (the linear ones with the dense part, the experts' with
    # their experts)
    if cfg.is_moe_layer(index) and s.ep > 1:
        dense = moe_dense_params_on_rank(cfg, index, s.tp)
        if st is not None:
            largest = max(st.on_rank(index, s.tp), st.expert_on_rank(index, s.ep))
        else:
            largest = max(dense, expert_params_on_rank(cfg, s.tp, s.ep, hw))
    else:
        largest = st.trained_on_rank(index, s.tp) if st is not None else dense_params_on_rank(cfg, index, s.tp)
    return largest * hw.policy_at(s.zero).grad_bytes


@dataclass
class _RankTotals:
    """Per pipeline rank sums of one plan, filled layer by layer (``_add_layers``) then by the ends."""

    pp: int
    mb_s: list[float] = field(default_factory=list)  # seconds per microbatch
    step_s: list[float] = field(default_factory=list)  # exposed per-step DP traffic
    static: list[float] = field(default_factory=list)  # bytes
    act: list[float] = field(default_factory=list)  # bytes per microbatch in flight
    transient: list[float] = field(default_factory=list)  # max over layers: ZeRO-3 gather + backward working set
    grads: list[float] = field(default_factory=list)  # gradient bytes (part of static)
    copies: list[float] = field(default_factory=list)  # autocast weight copies (part of static)
    # max over the rank's groups: the flat gradient copy of the manual all-reduce after the last backward, when the
    # activations are gone (``reduce_copy_bytes``)
    reduce_copy: list[float] = field(default_factory=list)
    model_flops: float = 0.0
    hw_flops: float = 0.0
    comm: float = 0.0
    compute: float = 0.0
    dp: float = 0.0
    overhead: float = 0.0

    def __post_init__(self) -> None:
        for name in ("mb_s", "step_s", "static", "act", "transient", "grads", "copies", "reduce_copy"):
            setattr(self, name, [0.0] * self.pp)


def _microbatches(plan: Any, strategies: list[Any]) -> int:
    max_dp = max(s.dp for s in strategies)  # ``plan.layers`` (repeat blocks) give the same maximum
    return plan.pipeline.microbatches if plan.pipeline.degree > 1 else plan.global_batch // (max_dp * plan.micro_batch)


def _add_layers(t: _RankTotals, plan: Any, cfg: ModelConfig, hw: Hardware, strategies: list[Any], m: int,
                memo: dict[Any, Any]) -> None:
    """Every block's costs on the rank that holds it (identical layers computed once; ``memo`` may carry them
    over from other plans of the same model and hardware)."""
    pp = plan.pipeline
    states = plan.optimizer.states
    max_dp = max(s.dp for s in strategies)
    ranges = plan.stage_ranges(cfg.n_layers)
    # per layer: its pipeline rank, whether it starts a stage (no redistribution from the layer before) and whether
    # it is an MoE block; shared by the plans of one layout (``memo`` holds one model's costs)
    lkey = ("layer_layout", pp.degree, tuple(ranges), cfg.n_layers, cfg.n_experts, cfg.moe_every)
    layout = memo.get(lkey)
    if layout is None:
        stage_of = {i: j % pp.degree for j, (a, b) in enumerate(ranges) for i in range(a, b)}
        starts = {a for a, _ in ranges}
        layout = memo[lkey] = [(stage_of[i], i == 0 or i in starts, cfg.is_moe_layer(i)) for i in range(len(strategies))]
    skeys: dict[int, tuple] = {}  # per strategy object (a repeat block expands to one object)
    # per cost key the terms this plan adds (they depend on m too, so they live for this call only)
    adds: dict[tuple, tuple[float, ...]] = {}
    t_mb, t_step, t_static, t_grads, t_copies, t_act, t_transient = t.mb_s, t.step_s, t.static, t.grads, t.copies, t.act, t.transient
    # the plan-wide sums in locals (the same additions in the same order), written back after the loop
    model_flops_t, hw_flops_t, comm_t, compute_t, overhead_t, dp_t = t.model_flops, t.hw_flops, t.comm, t.compute, t.overhead, t.dp
    key = None
    for i, (s, (r, start, moe)) in enumerate(zip(strategies, layout)):
        before = None if start else strategies[i - 1]
        if (before is s and key is not None and key[2] == (s.tp, s.sp) and key[0] == moe
                and key[3] == lora_layer_key(hw, i)):
            add = adds[key]  # the same strategy after itself: the previous layer's key (most layers of a plan)
        else:
            prev = (before.tp, before.sp) if before is not None else None
            mb_samples = plan.micro_batch * max_dp / s.dp
            skey = skeys.get(id(s))
            if skey is None:
                skey = skeys[id(s)] = (s.tp, s.sp, s.dp, s.zero, s.dp_shard, s.ep, s.cp, s.recompute, s.savers.fp8_act,
                                       s.savers.fp8_gemm, s.savers.wta_crs, s.savers.lemo, mb_samples, plan.seq_len, states)
            key = (moe, skey, prev, lora_layer_key(hw, i))
            add = adds.get(key)
            if add is None:
                c = memo.get(key)
                if c is None:
                    c = memo[key] = layer_costs(cfg, i, s, mb_samples, plan.seq_len, hw, states, prev)
                add = adds[key] = (layer_microbatch_s(c, hw), layer_step_dp_s(c, hw) + c["opt_step"] + (m - 1) * c["accum_mb"],
                                   c["static_bytes"], c["grads_bytes"], c["copy_bytes"], c["act_bytes"], c["transient_bytes"],
                                   c["model_flops_mb"] * m, c["hw_flops_mb"] * m, c["comm_mb"] * m, c["compute_mb"] * m,
                                   c["overhead_mb"] * m, c["dp_step"] + c["dp_mb"] * m,
                                   reduce_copy_bytes(cfg, i, s, hw))
        (mb, step, static, grads, copies, act, transient, model_flops, hw_flops, comm, compute, overhead, dp,
         flat) = add
        t_mb[r] += mb
        t_step[r] += step
        t_static[r] += static
        t_grads[r] += grads
        t_copies[r] += copies
        t_act[r] += act
        if transient > t_transient[r]:
            t_transient[r] = transient
        if flat > t.reduce_copy[r]:
            t.reduce_copy[r] = flat
        model_flops_t += model_flops
        hw_flops_t += hw_flops
        comm_t += comm
        compute_t += compute
        overhead_t += overhead
        dp_t += dp
    t.model_flops, t.hw_flops, t.comm, t.compute, t.overhead, t.dp = model_flops_t, hw_flops_t, comm_t, compute_t, overhead_t, dp_t


def _layer_totals(plan: Any, cfg: ModelConfig, hw: Hardware, m: int, cache: dict[Any, Any]) -> _RankTotals:
    """A fresh copy of the blocks' per-rank sums (``_add_layers``), computed once per blocks-and-pipeline layout in
    ``cache``: plans that differ only in their embedding (the search scores several ZeRO levels for it) share them.
    The blocks are expanded to one strategy per layer only to compute them."""
    pp = plan.pipeline
    key = ("layers", tuple((s.tp, s.sp, s.dp, s.zero, s.dp_shard, s.ep, s.cp, s.recompute, s.savers.fp8_act, s.savers.fp8_gemm,
                            s.savers.wta_crs, s.savers.lemo, s.repeat) for s in plan.layers),
           pp.degree, pp.virtual_stages, tuple(tuple(r) for r in pp.stages), plan.micro_batch, plan.seq_len,
           plan.optimizer.states, m)
    done = cache.get(key)
    if done is None:
        done = cache[key] = _RankTotals(pp.degree)
        _add_layers(done, plan, cfg, hw, plan.layer_strategies(), m, cache)
    t = copy.copy(done)
    for name in ("mb_s", "step_s", "static", "act", "transient", "grads", "copies", "reduce_copy"):
        setattr(t, name, list(getattr(done, name)))
    return t


def tied_embedding_grad_s(cfg: ModelConfig, tp: int, pp: int, world_per_stage: int, hw: Hardware) -> float:
    """Per-step all-reduce of the tied word-embedding gradient between the first and last pipeline stage
    (Megatron-LM keeps a copy of the embedding on the last stage and sums the two gradients)."""
    if pp <= 1 or not cfg.tie_embeddings:
        return 0.0
    bw, lat = link(hw, 2, world_per_stage * (pp - 1))
    return allreduce_s(cfg.vocab_size * cfg.d_model / tp * hw.policy.reduce_bytes, 2, bw, lat)


def _add_ends(t: _RankTotals, plan: Any, cfg: ModelConfig, hw: Hardware, strategies: list[Any], m: int,
              world_size: int, cache: Optional[dict[Any, Any]] = None) -> float:
    """Embedding on the first rank, head (+ its compute) on the last; returns the head's tokens per microbatch.
    The additions are computed once per (head tokens, embedding layout, states, pipeline, m) in ``cache`` (one
    model's and hardware's) and replayed in the same order."""
    pp, emb = plan.pipeline, plan.embedding
    per_stage = world_size // pp.degree
    max_dp = max(s.dp for s in strategies)
    s_last = strategies[-1]
    head_tokens = plan.micro_batch * plan.seq_len * max_dp / s_last.dp / s_last.cp
    key = ("ends", head_tokens, emb.tp, emb.zero, plan.optimizer.states, pp.degree, per_stage, m)
    ops = cache.get(key) if cache is not None else None
    if ops is None:
        ops = _ends_ops(plan, cfg, hw, head_tokens, m, per_stage)
        if cache is not None:
            cache[key] = ops
    for name, r, val in ops:
        if r is None:
            setattr(t, name, getattr(t, name) + val)
        elif name == "reduce_copy":  # a maximum over the rank's groups
            t.reduce_copy[r] = max(t.reduce_copy[r], val)
        else:
            getattr(t, name)[r] += val
    return head_tokens


def _ends_ops(plan: Any, cfg: ModelConfig, hw: Hardware, head_tokens: float, m: int, per_stage: int
              ) -> list[tuple[str, Optional[int], float]]:
    """``_add_ends``' additions in order: (_RankTotals field, rank or None for a plan-wide sum, value)."""
    pp, emb = plan.pipeline, plan.embedding
    last = pp.degree - 1
    ops: list[tuple[str, Optional[int], float]] = []
    head_flops = head_fwd_flops(cfg, head_tokens) / emb.tp
    ops.append(("mb_s", last, head_s(cfg, head_tokens, emb.tp, hw)))
    ops.append(("mb_s", last, loss_s(cfg, head_tokens, emb.tp, hw)))
    ops.append(("model_flops", None, head_flops * (hw.lora.head_passes() if hw.lora is not None else 3.0) * m))
    ops.append(("hw_flops", None, head_flops * head_passes(hw) * m))
    emb_dp = per_stage // emb.tp
    for r in {0, last}:
        ops.append(("static", r, embedding_static_bytes(cfg, r == 0, r == last, emb.tp, emb_dp, emb.zero,
                                                        plan.optimizer.states, hw)))
        n = embedding_param_count(cfg, r == 0, r == last, emb.tp)
        trained = lora_embedding_trained(cfg, hw, r == 0, r == last, emb.tp) if hw.lora is not None else n
        ops.append(("grads", r, model_state_bytes(n, emb_dp, emb.zero, plan.optimizer.states, hw,
                                                  trained if hw.lora is not None else None)["grads"]))
        if r == last:
            ops.append(("copies", r, cfg.vocab_size * cfg.d_model / emb.tp * head_copy_bytes(emb.zero, hw)))
        if r == 0 and not (r == last and cfg.tie_embeddings):  # as embedding_static_bytes counts them
            ops.append(("copies", r, cfg.vocab_size * cfg.d_model / emb.tp * embedding_copy_bytes(emb.zero, hw)))
        if per_stage > 1 and hw.reduces_after_backward(emb.zero):  # the ends' one group (``_apply_outer``)
            ops.append(("reduce_copy", r, trained * hw.policy_at(emb.zero).grad_bytes))
        per_mb, step = dp_comm_s(n, emb_dp, emb.zero, emb.tp, hw, trained)
        ops.append(("step_s", r, step + (tied_embedding_grad_s(cfg, emb.tp, pp.degree, per_stage, hw) if trained else 0.0)))
        cast_mb, cast_step = fsdp_cast_s(n, emb_dp, emb.zero, hw)  # FSDP2 gathers both ends in the compute dtype
        deferred = hw.fsdp_deferred(emb.zero)
        accum = (grad_accumulation_s(trained, emb_dp, emb.zero, hw)
                 if deferred or hw.policy_at(emb.zero).gathers_after_step(emb.zero) else (grad_accumulate_s(trained, hw), 0.0))
        ops.append(("step_s", r, optimizer_step_s(trained, emb_dp, emb.zero, plan.optimizer.states, hw)
                    + (m - 1) * accum[0] + accum[1] + cast_step))
        # the head's cast under autocast (the lookup reads fp32); its gradient's cast where it trains (LoRA)
        head = cfg.vocab_size * cfg.d_model / emb.tp if hw.lora is not None and r == last else None
        head_trained = head if head is not None and hw.lora.head_trainable else (0.0 if head is not None else None)
        ops.append(("mb_s", r, weight_traffic_mb_s(n if r == last else 0.0, "none", hw, emb.zero, trained=head_trained)
                    + cast_mb))
        ops.append(("mb_s", r, per_mb))  # embedding/head ZeRO-2/3 traffic: small, counted as exposed
    return ops


def lora_embedding_trained(cfg: ModelConfig, hw: Hardware, first: bool, last: bool, tp: int) -> float:
    """Of ``embedding_param_count``'s parameters, those a LoRA run trains (``modules_to_save``: the token embedding
    on the first rank, the head on the last; tied, one weight). Learned positions (gpt2) stay frozen."""
    st, table = hw.lora, cfg.vocab_size * cfg.d_model / tp
    if cfg.tie_embeddings:
        return table if (first or last) and st.embedding_trainable else 0.0
    return (table if first and st.embedding_trainable else 0.0) + (table if last and st.head_trainable else 0.0)


def grads_absent_at_peak(plan: Any, hw: Hardware, strategies: list[Any], m: int) -> bool:
    """True when no gradient exists while the activations peak: a stack that frees gradients between steps
    (``grads_set_to_none``), one microbatch per step (no accumulation), one pipeline stage and no data parallelism
    (DDP buckets and sharded-gradient buffers persist). The peak is then at the start of backward, before the
    gradients of the large activation holders exist, or at its end, once the activations are gone."""
    return hw.grads_set_to_none and m == 1 and plan.pipeline.degree == 1 and all(s.dp == 1 for s in strategies)


def _memory_gib(t: _RankTotals, plan: Any, cfg: ModelConfig, hw: Hardware, m: int, head_tokens: float,
                strategies: list[Any]) -> tuple[list[float], dict[str, float]]:
    """Peak memory per pipeline rank: states, in-flight activations, the largest transient, the loss's buffers
    on the last rank, framework overhead and allocator headroom; and the terms of the largest rank (GiB)."""
    pp = plan.pipeline
    v = pp.virtual_stages if pp.schedule == "interleaved_1f1b" else 1
    last = pp.degree - 1
    no_grads = grads_absent_at_peak(plan, hw, strategies, m)
    mem, parts = [], []
    for r in range(pp.degree):
        inflight = inflight_microbatches(pp.schedule, pp.degree, r, m, v)
        loss = loss_peak_bytes(cfg, head_tokens, plan.embedding.tp, hw) if r == last else 0.0
        used = t.static[r] + inflight * t.act[r] + t.transient[r] + loss
        absent = 0.0
        if no_grads:
            absent = min(t.grads[r], used - (t.static[r] + t.transient[r]))
            used -= absent
        # after the last backward the activations are gone and the manual all-reduce copies its largest group
        used = max(used, t.static[r] + t.reduce_copy[r])
        over = framework_overhead_bytes(hw, used)
        mem.append((used + over) / GIB)
        parts.append((inflight, loss, used, absent, over))
    r = max(range(pp.degree), key=lambda r: mem[r])  # the terms of the largest rank only
    inflight, loss, used, absent, over = parts[r]
    terms = {"mem_states_gib": (t.static[r] - t.copies[r]) / GIB, "mem_weight_copies_gib": t.copies[r] / GIB,
             "mem_activations_gib": inflight * t.act[r] / GIB, "mem_transient_gib": t.transient[r] / GIB,
             "mem_loss_gib": loss / GIB, "mem_grads_absent_gib": absent / GIB,  # subtracted
             "mem_overhead_gib": over / GIB,
             # what torch.cuda.max_memory_reserved should report: the rest (CUDA context, NCCL) is outside
             "mem_reserved_gib": (used + hw.fragmentation * used + hw.stack_buffer_bytes) / GIB}
    return mem, terms


def runtime_zero_plan(plan: Any, hw: Hardware, world_size: int) -> Any:
    """``plan`` with the ZeRO stage the stack runs for each part: the stage it runs for the planned one
    (``Hardware.zero_runs_as``: torchtitan's ZeRO-1 is exported as FSDP that keeps its gathered weights, ZeRO-2 as
    ``fsdp_zero2`` costs it), and, where ``Hardware.dp1_plain`` (meshwright), ZeRO-0 for a block at dp=1 and for the
    ends of a one-rank stage: nothing is sharded there, so a user's ZeRO-2 at dp=1 holds no FSDP2 gathered copy and
    ZeRO-1/3 no more than ZeRO-0. ``plan`` itself where nothing changes."""
    runs_as = hw.zero_runs_as

    def zero_of(zero: int, plain: bool) -> int:
        return 0 if plain and hw.dp1_plain else runs_as[zero]

    layers = [s if zero_of(s.zero, s.dp == 1) == s.zero else
              dataclasses.replace(s, zero=zero_of(s.zero, s.dp == 1), dp_shard=s.dp_shard if s.dp > 1 else None)
              for s in plan.layers]
    emb = plan.embedding
    emb_zero = zero_of(emb.zero, world_size // plan.pipeline.degree == 1)
    if emb_zero != emb.zero:
        emb = dataclasses.replace(emb, zero=emb_zero)
    if emb is plan.embedding and all(a is b for a, b in zip(layers, plan.layers)):
        return plan
    return dataclasses.replace(plan, layers=layers, embedding=emb)


def runs_zero1(plan: Any, hw: Hardware, world_size: int) -> bool:
    """Whether meshwright's runtime runs ``plan`` (as ``runtime_zero_plan`` leaves it) with its ZeRO-1: one
    ``ZeroRedundancyOptimizer`` per stage (parallel/runtime.py ``zero1``: every block tp=1 at ZeRO-1, the ends below
    ZeRO-2, more than one rank per stage)."""
    return (hw.stack == "meshwright" and world_size // plan.pipeline.degree > 1 and plan.embedding.zero < 2
            and all(s.tp == 1 and s.zero == 1 for s in plan.layers))


def zero1_states_correction(t: _RankTotals, plan: Any, cfg: ModelConfig, hw: Hardware, world_size: int,
                            cache: dict[Any, Any]) -> None:
    """Under meshwright's ZeRO-1 each rank holds the optimizer states of the whole parameters it owns
    (launcher/planner/zero1_partition.py), the ends' included: the blocks' ``/ dp`` share and the ends' count (whole
    at ``embedding.zero`` 0) are replaced, per pipeline rank, by the largest dp rank's share. LoRA runs keep the
    ``/ dp`` count (their partition is over the adapters)."""
    if hw.lora is not None or not runs_zero1(plan, hw, world_size):
        return
    from meshwright.launcher.planner.zero1_partition import stage_state_numels

    pp, emb, states = plan.pipeline, plan.embedding, plan.optimizer.states
    per_stage = world_size // pp.degree
    ranges = plan.stage_ranges(cfg.n_layers)
    n_stages = len(ranges)
    share = stage_state_numels(cfg, plan, per_stage, cache)
    for r in range(pp.degree):
        ids = range(r, n_stages, pp.degree)
        blocks = sum(cfg.layer_params(j) for i in ids for j in range(*ranges[i]))
        ends = embedding_param_count(cfg, 0 in ids, n_stages - 1 in ids, 1)
        counted = (model_state_bytes(blocks, per_stage, 1, states, hw)["optimizer"]
                   + model_state_bytes(ends, per_stage, emb.zero, states, hw)["optimizer"])
        t.static[r] += model_state_bytes(share[r], 1, 1, states, hw)["optimizer"] - counted


def zero1_broadcast_correction(t: _RankTotals, plan: Any, cfg: ModelConfig, hw: Hardware, world_size: int,
                               cache: dict[Any, Any]) -> None:
    """Under meshwright's ZeRO-1 (``runs_zero1``) DDP all-reduces the whole gradients as at ZeRO-0 (``dp_comm_s``'s
    one all-reduce), and then ``ZeroRedundancyOptimizer.step`` broadcasts every parameter from the rank that stepped it
    to the others (torch's ``_broadcast_params_from_rank``: one ``broadcast`` per parameter, no bucket view; the
    runtime waits for them before the next forward): per pipeline rank its stage's parameters in their stored dtype
    once over the link, plus one latency per parameter. Exposed per step (after backward, nothing to hide behind).
    LoRA: the adapters (and trained ends) alone, with one latency per block. Not measured; the alpha-beta model."""
    if not runs_zero1(plan, hw, world_size):
        return
    from meshwright.launcher.planner.zero1_partition import model_params

    pp = plan.pipeline.degree
    dp = world_size // pp
    bw, lat = link(hw, dp, 1)
    nbytes = hw.policy_at(1).param_bytes
    ranges = plan.stage_ranges(cfg.n_layers)
    n_stages = len(ranges)
    layers, ends = model_params(cfg, cache)
    for r in range(pp):
        ids = range(r, n_stages, pp)
        blocks = [j for i in ids for j in range(*ranges[i])]
        mods = (("tok_embeddings", "pos_embeddings") if 0 in ids else ()) + (("norm", "output") if n_stages - 1 in ids
                                                                            else ())
        if hw.lora is not None:
            numel = sum(hw.lora.trained_on_rank(j, 1) for j in blocks) + lora_embedding_trained(
                cfg, hw, 0 in ids, n_stages - 1 in ids, 1)
            count = len(blocks)
        else:
            held = [e for j in blocks for e in layers[j]] + [e for k in mods for e in ends.get(k, [])]
            numel, count = sum(n for n, _ in held), len(held)
        sec = (dp - 1) / dp * numel * nbytes / bw + count * lat
        t.step_s[r] += sec
        t.dp += sec


def evaluate_plan(plan: Any, cfg: ModelConfig, hw: Hardware, world_size: int,
                  cache: Optional[dict[Any, Any]] = None) -> Prediction:
    """Predict step time, throughput, MFU/HFU and memory per pipeline stage of a (validated) Plan.

    ``cache``: a dict the caller keeps while it evaluates many plans of *one* model on *one* Hardware (the search
    does): per-layer costs and the model's FLOPs per token are then computed once for all of them."""
    cache = {} if cache is None else cache
    plan = runtime_zero_plan(plan, hw, world_size)
    piped = for_pipeline(hw, plan.pipeline.degree)
    if piped is not hw:  # other model states than ``hw`` counts: costs of their own
        hw, cache = piped, cache.setdefault(("pipelined", piped.pipelined), {})
    reduced = for_reduction(hw, plan)
    if reduced is not hw:  # ZeRO-0/1 layers reduced after backward: their step costs of their own
        hw, cache = reduced, cache.setdefault(("manual_dp", reduced.manual_dp), {})
    # the repeat blocks, not one strategy per layer: what is read of them here (the first and last layer's fields, the
    # largest dp, whether every dp is 1) is the same, and the per-layer sums expand them once per layout (cached)
    strategies = plan.layers
    pp = plan.pipeline
    m = _microbatches(plan, strategies)
    v = pp.virtual_stages if pp.schedule == "interleaved_1f1b" else 1
    t = _layer_totals(plan, cfg, hw, m, cache)
    head_tokens = _add_ends(t, plan, cfg, hw, strategies, m, world_size, cache)
    zero1_states_correction(t, plan, cfg, hw, world_size, cache)
    zero1_broadcast_correction(t, plan, cfg, hw, world_size, cache)
    rank_mb = t.mb_s
    if pp.degree > 1:
        cross = world_size // pp.degree >= hw.devices_per_node
        s0 = strategies[0]
        p2p = pp_p2p_s(plan.micro_batch * plan.seq_len / s0.cp, cfg, s0.tp, s0.sp, hw, cross) * v
        rank_mb = [x + p2p for x in rank_mb]
    step = pipeline_step_s(rank_mb, m, pp.schedule, v, hw.contention)
    if pp.degree > 1:
        step *= hw.pipeline_slowdown
    step += max(t.step_s)
    mem, mem_terms = _memory_gib(t, plan, cfg, hw, m, head_tokens, strategies)
    tokens = plan.global_batch * plan.seq_len
    # MFU uses the model's own FLOPs per token (PaLM convention); HFU counts recomputation too.
    fkey = ("flops_per_token", plan.seq_len)
    if fkey not in cache:  # LoRA: the FLOPs its step executes (tools/flops.py), as the trainer's log counts them
        cache[fkey] = (model_flops_per_token(cfg, plan.seq_len, lora=hw.lora) if hw.lora is not None
                       else cfg.flops_per_token(plan.seq_len))
    mfu_flops = cache[fkey] * tokens
    ratio = t.hw_flops / t.model_flops if t.model_flops else 1.0
    peak = hw.peak_flops
    return Prediction(
        step_s=step, tokens_per_s=tokens / step, tflops_per_device=mfu_flops / step / world_size / 1e12,
        mfu=mfu_flops / step / world_size / peak, hfu=mfu_flops * ratio / step / world_size / peak,
        memory_gib=mem, fits=max(mem) * GIB <= hw.memory_bytes,
        breakdown={"compute_s": t.compute / pp.degree, "tp_ep_comm_s": t.comm / pp.degree,
                   "dp_comm_s": t.dp / pp.degree, "framework_overhead_s": t.overhead / pp.degree,
                   "bubble_fraction": bubble_fraction(pp.degree, m, pp.schedule, v), "microbatches": float(m),
                   **mem_terms},
    )
