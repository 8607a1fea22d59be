"""What the training stack that will run a plan does differently: precision policy and overlap rules.

A prediction describes one stack (``meshwright plan --stack``): meshwright's own runtime, Megatron-LM,
DeepSpeed or torchtitan. Each keeps weights, gradients and optimizer states in different dtypes, reduces
gradients in different dtypes and overlaps different communication, which moves memory by several bytes
per parameter and step time by 10-25% at scale. Exports (planner/export) read the same ``Stack``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from meshwright.errors import invalid


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter (or per element) a precision policy keeps; why each number is what it is in ``PRECISIONS``."""

    name: str
    param_bytes: float  # stored parameters (sharded by ZeRO-3)
    grad_bytes: float  # gradient buffer (sharded by ZeRO-2/3)
    master_bytes: float  # fp32 master copy kept by the optimizer (sharded by ZeRO-1+)
    weight_copy_bytes: float  # compute-dtype copies of the rank's weights kept alive (autocast cache), not dp-sharded
    gather_bytes: float  # per element of an all-gathered ZeRO-3 layer
    reduce_bytes: float  # per element of the data-parallel gradient reduction
    dtype: str = "bf16"  # the training dtype (TrainConfig.dtype) the policy describes
    master_zero: tuple[int, ...] = (0, 1, 2, 3)  # the ZeRO stages at which the optimizer keeps the master copy
    zero_floor: int = 0  # the optimizer shards as at least this ZeRO stage (BF16_Optimizer: ZeRO-1 built in)
    # DeepSpeed's BF16_Optimizer (runtime/bf16_optimizer.py): after the last backward the engine all-reduces the whole
    # gradient-accumulation buffer over dp (pipe/engine.py _exec_reduce_grads -> engine.py buffered_allreduce_fallback:
    # an all-reduce, not a reduce-scatter), and after each step ``update_lp_params`` all-gathers the updated bf16
    # parameters from their dp partitions (utils.py all_gather_dp_groups); neither overlaps backward
    step_gather: bool = False
    # the ZeRO stages whose layers run under FSDP2 with ``MixedPrecisionPolicy(param_dtype)``: every all-gather first
    # copies the rank's fp32 shard into a compute-dtype buffer (_fsdp_collectives._get_param_all_gather_inputs), so the
    # weights reach the forward in the compute dtype and autocast casts none of them; a ``reduce_dtype`` narrower than
    # the stored gradients casts the reduce-scatter output back (foreach_reduce's _to_dtype_if_needed)
    shard_cast_zero: tuple[int, ...] = ()

    def gathers_after_step(self, zero: int) -> bool:
        """Whether the optimizer at ZeRO-``zero`` is BF16_Optimizer's reduce-then-gather (``step_gather``): ZeRO-0/1,
        the stages DeepSpeed builds it at (ZeRO-2/3 build its ZeRO optimizers)."""
        return self.step_gather and zero <= 1

    def master_at(self, zero: int) -> float:
        """Bytes per parameter of the master copy at ZeRO-``zero`` (before its dp sharding)."""
        return self.master_bytes if zero in self.master_zero else 0.0


PRECISIONS = {
    # fp32 everywhere (CPU runs, or TrainConfig.dtype=fp32)
    "fp32": Precision("fp32", 4, 4, 0, 0, 4, 4, dtype="fp32"),
    # DeepSpeed 0.19.8 in fp32 (``bf16.enabled: false``): fp32 everywhere, but its ZeRO optimizers clone each rank's
    # fp32 parameter partition as a master copy all the same (4/dp B per parameter): ZeRO-1/2 always
    # (runtime/zero/stage_1_and_2.py single_partition_of_fp32_groups), ZeRO-3 too (stage3.py _create_fp32_partitions
    # means to reuse a partition already in fp32 on the device, but compares a torch.device with the device's name, a
    # str, which is never equal). ZeRO-0 runs the plain torch optimizer (engine.py _do_optimizer_sanity_check): none.
    # Measured in tests/distributed/parity_deepspeed.py
    "deepspeed_fp32": Precision("deepspeed_fp32", 4, 4, 4, 0, 4, 4, dtype="fp32", master_zero=(1, 2, 3)),
    # fp32 parameters + torch.autocast(bf16): meshwright's runtime on GPU (train/local_runtime.py). Autocast caches
    # one bf16 copy of every weight it casts until the forward leaves autocast; backward keeps them as saved inputs.
    # Its ZeRO-2/3 layers are FSDP2 modules with MixedPrecisionPolicy(bf16, fp32) (parallel/data_parallel.py
    # apply_fsdp): their weights arrive in bf16 from the all-gather, which casts the fp32 shard and carries bf16
    "autocast": Precision("autocast", 4, 4, 0, 2, 2, 4, shard_cast_zero=(2, 3)),
    # bf16 parameters, fp32 main gradients and fp32 master weights: Megatron-LM (18 B/param; 6 + 12/dp with the
    # distributed optimizer), gradients reduced in fp32 (--accumulate-allreduce-grads-in-fp32)
    "bf16_fp32_grads": Precision("bf16_fp32_grads", 2, 4, 4, 0, 2, 4),
    # bf16 parameters and gradients, fp32 master in the optimizer: DeepSpeed bf16 (16 B/param, the ZeRO paper's
    # count) reducing in bf16; also the planner's plain analytic default
    "bf16": Precision("bf16", 2, 2, 4, 0, 2, 2),
    # DeepSpeed's BF16_Optimizer (bf16 with data_types.grad_accum_dtype=fp32 at ZeRO-1, BLOOM-176B's setup): the bf16
    # gradients plus a full fp32 accumulation buffer (2 + 4 B, not sharded: it implements ZeRO-1 only), fp32 master and
    # states sharded. Measured on DeepSpeed 0.19.8 (tests/distributed/parity_deepspeed.py). The fp32 buffer is
    # all-reduced in the engine's communication_data_type, which is bf16 when bf16 is on and the config names none
    # (engine.py communication_data_type; allreduce_bucket casts the buffer to it and back), as the export writes it:
    # 2 B per element on the wire; then the bf16 parameters are all-gathered after the step (step_gather)
    "bf16_fp32_accum": Precision("bf16_fp32_accum", 2, 6, 4, 0, 2, 2, step_gather=True),
    # the same optimizer with bf16 accumulation: what DeepSpeed's pipeline engine builds for bf16 at ZeRO-0 (engine.py
    # _do_optimizer_sanity_check); bf16 gradients kept (zeroed, not freed) plus a full bf16 accumulation buffer, fp32
    # master and states sharded over dp as at ZeRO-1: 6 + 12/dp B/param. Measured on DeepSpeed 0.19.8 with a 2-stage
    # PipelineModule (tests/distributed/parity_deepspeed.py). Communication: the bf16 accumulation buffer all-reduced
    # whole over dp after the last backward (in place, bf16 on the wire), then the bf16 parameters all-gathered after
    # the step (step_gather): ZeRO-1's all-gather on top of ZeRO-0's all-reduce, none of it overlapped
    "bf16_bf16_accum": Precision("bf16_bf16_accum", 2, 4, 4, 0, 2, 2, zero_floor=1, step_gather=True),
    # FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32 sharded parameters, gradients and
    # states; layers all-gathered in bf16 (torchtitan, which applies fully_shard at every ZeRO stage: over a one-rank
    # shard mesh for its DDP-like layouts, where the "all-gather" is the cast alone)
    "fsdp_mixed": Precision("fsdp_mixed", 4, 4, 0, 0, 2, 4, shard_cast_zero=(0, 1, 2, 3)),
}


@dataclass(frozen=True)
class Stack:
    """Per-stack rules the cost model applies (``cost_model.apply_stack``)."""

    name: str
    precision: str  # PRECISIONS key of bf16 training
    dp_overlap: bool  # gradient reduction overlapped with backward (DDP buckets, --overlap-grad-reduce, overlap_comm)
    tp_wgrad_overlap: bool  # backward TP collectives overlapped with weight-gradient matmuls
    pipeline_slowdown: float  # step-time factor of the stack's pipeline engine on pp>1 layouts
    runtime_buffers: bool = True  # loss buffers and the backward working set counted
    # gradients freed between steps (``zero_grad(set_to_none=True)`` with no DDP bucket or fp32 main-grad buffer):
    # a one-microbatch, one-stage, dp=1 step holds its activations before any gradient exists
    grads_set_to_none: bool = False
    # DeepSpeed's ZeRO buffer sizes (written by ``plan --emit deepspeed``, counted by the cost model); None elsewhere
    deepspeed: Optional["DeepSpeedSizes"] = None
    # gradient-reduction buckets of reduce_bucket_size the stack holds at the backward peak, per ZeRO stage 0..3
    reduce_buckets: tuple[int, int, int, int] = (0, 0, 0, 0)
    fp32_precision: str = "fp32"  # PRECISIONS key of fp32 training (TrainConfig.dtype=fp32, and CPU runs)
    # PRECISIONS key of bf16 ZeRO-0 layers under the stack's pipeline engine (pp>1) where it builds another optimizer
    pipeline_zero0_precision: str = ""
    # on pp>1 layouts the stack's FSDP2 layers sync once per step: torchtitan runs them under
    # torch.distributed.pipelining, whose stages turn gradient sync and resharding off for every microbatch but the
    # last (pipelining/stage.py backward_maybe_with_nosync: set_requires_gradient_sync(False),
    # set_reshard_after_backward(False); perform_reduce_grad after all backwards), and its fsdp_reshard_after_forward
    # "default" (= not pp_enabled, which its export writes) keeps the weights gathered after forward: one all-gather
    # and one reduce-scatter per step, the stage's compute-dtype weights and its unsharded gradients accumulated in
    # reduce_dtype (_fsdp_param.py accumulate_unsharded_grad_if_needed) alive through the step
    pipeline_defers_fsdp_sync: bool = False
    # ZeRO-2 layers are FSDP2 modules with reshard_after_forward=False (meshwright's apply_fsdp; torchtitan's
    # fsdp_reshard_after_forward "never", what its export writes for ZeRO-2): the stored parameters are sharded over dp
    # as at ZeRO-3 and the all-gathered weights (``Precision.gather_bytes``: bf16 under MixedPrecisionPolicy, fp32
    # without one) stay alive from the step's first forward to its last backward. DeepSpeed's ZeRO-2 keeps whole
    # parameters and no gathered copy. Measured: tests/distributed/state_bytes_worker.py
    fsdp_zero2: bool = False
    # on pp>1 layouts the stack's pipeline engine reduces data-parallel gradients once, after the whole schedule:
    # DeepSpeed's TrainSchedule issues ReduceTiedGrads, ReduceGrads and OptimizerStep after the last BackwardPass
    # (runtime/pipe/schedule.py), and PipelineEngine holds the gradient-accumulation boundary False through every
    # BackwardPass (pipe/engine.py is_gradient_accumulation_boundary returns _force_grad_boundary, which only
    # _exec_reduce_grads sets), so ZeRO-1's overlap_comm hooks (stage_1_and_2.py reduce_ready_partitions_and_remove_grads:
    # only at the boundary) reduce nothing during backward; the engine's enable_backward_allreduce is False. The
    # reduction is exposed, not overlapped with the last backward. (deepspeed-fp32-accum plans ZeRO-1 only, whose
    # BF16_Optimizer reduces after backward with or without a pipeline: ``Precision.step_gather``; not set there)
    pipeline_reduces_after_schedule: bool = False
    # ZeRO stages whose layers the stack's runtime reduces after backward, not overlapped with it, wherever it does not
    # wrap the stage in DDP. meshwright's (parallel/runtime.py): DDP's bucket hooks overlap the all-reduce with
    # backward only on uniform layouts (pp=1, every layer tp=1 at one ZeRO-0/1 stage, no ep); a ZeRO-0/1 layer of a
    # pp>1 plan (torch's pipelining stages are no DDP modules), of tp>1 (DTensor parameters) or of ep>1 is instead
    # summed by ``_finish_grads``' bucketed all-reduce (data_parallel.all_reduce_grads) after the last backward.
    # FSDP2 layers (ZeRO-2/3) reduce-scatter from their backward hooks at any pp: overlapped. Read per layer by
    # ``Hardware.dp_overlapped`` (pp>1 through ``for_pipeline``, as pipeline_reduces_after_schedule). Not seen per
    # layer: the ZeRO-0/1 layers of a pp=1 plan that is not one DDP module (ZeRO levels mixed, some layer tp>1, the ends
    # at ZeRO-2/3: manual there too), charged where the whole plan is costed (``cost_model.for_reduction``)
    reduces_after_backward_zero: tuple[int, ...] = ()
    # the layouts the stack runs, as a union of search constraint sets (``search.Constraints`` field -> value, each a
    # tuple of pairs); empty: every layout the search builds (meshwright's own runtime narrows through
    # ``Constraints.runtime_compatible``). The one source of truth for ``search()`` under ``hw.stack`` and for
    # ``plan --emit``/``--stack`` (export/stacks.py ``stack_constraints``, which also drops Megatron's FSDP2 set for
    # tied embeddings)
    runs: tuple[tuple[tuple[str, Any], ...], ...] = ()
    # a layer with no data parallelism (dp=1) is a plain module whatever its ZeRO stage: meshwright's runtime wraps no
    # FSDP2 and builds no sharded optimizer there (parallel/runtime.py ``_apply_layers``: ``s.dp == 1`` is skipped;
    # ``_apply_outer``: the ends of a one-rank stage), so ZeRO-1/2/3 at dp=1 hold and do what ZeRO-0 does (no gathered
    # copy, autocast's weight cache as at ZeRO-0). DeepSpeed builds its ZeRO optimizer at any dp (its fp32 partition
    # clone is measured at dp=1 too): not set there
    dp1_plain: bool = False
    # the ZeRO stage the stack runs for each planned one (0..3): torchtitan has no ZeRO-1/2, and ``plan --emit
    # torchtitan`` writes a ZeRO-1/2 plan as FSDP with ``fsdp_reshard_after_forward: "never"``, which its
    # distributed/fsdp.py (get_fsdp_reshard_after_forward_policy) turns into fully_shard(reshard_after_forward=False)
    # on the blocks and the untied embedding (the norm and head never reshard unless "always"): sharded parameters,
    # gradients and states, the gathered weights kept from forward to backward. That is ZeRO-2 as ``fsdp_zero2``
    # costs it, so a ZeRO-1 plan for torchtitan is costed as ZeRO-2 (``cost_model.runtime_zero_plan``)
    zero_runs_as: tuple[int, int, int, int] = (0, 1, 2, 3)
    # the head (with the final norm, and the tied embedding where tied) keeps its gathered weights from forward to
    # backward at every ZeRO stage: torchtitan's apply_fsdp_to_decoder shards [norm, lm_head] (tied: with
    # tok_embeddings) with reshard_after_forward only under "always", which its export never writes
    head_kept_gathered: bool = False
    # how the stack lays an MoE block's routed experts over the tp group. ``experts_tp_sharded``: each expert's weights
    # are split over tp, so a rank holds (and reduces, and steps) expert params / (tp * ep). Megatron-core shards them
    # over expert_tensor_parallel_size, which defaults to tp (model_parallel_config.py) and which
    # ``plan --emit megatron`` writes as tp; torchtitan (the pinned b5bcd76) TP-shards them at ep=1 and at ep>1 lets
    # the EP group borrow the tp ranks and FSDP-shard the rest over efsdp = dp_shard*cp*tp/ep, which at FSDP holds the
    # same E/(dp*tp) per rank; meshwright's runtime splits them too (parallel/expert_tp.py: w1/w3 by hidden columns,
    # w2 by hidden rows, DTensors on the tp mesh, then sliced over ep). False: every tp rank holds its ep share whole
    # (params / ep): DeepSpeed MoE without enable_expert_tensor_parallelism (moe/layer.py)
    experts_tp_sharded: bool = True
    # each tp rank runs 1/tp of the experts' FLOPs: by weights where they are sharded, by tokens where DeepSpeed's
    # MOELayer drops the duplicate tokens over tp (sharded_moe.py drop_tokens on the capacity dim, gathered after) and
    # where torchtitan's EP region splits them, and by weights in meshwright's runtime (expert tp: each tp rank runs
    # its hidden slice of every expert on the same, tp-replicated tokens, the partial outputs summed over tp)
    expert_compute_tp_split: bool = True

    def buffer_elements(self, zero: int) -> float:
        """Elements of the reduction buckets allocated per rank at the backward peak at ZeRO-``zero`` (compute dtype)."""
        return self.reduce_buckets[zero] * self.deepspeed.reduce_bucket_size if self.deepspeed else 0.0

    def zero3_live_elements(self) -> float:
        """Elements of all-gathered ZeRO-3 parameters the stack may keep live at once (0: one layer at a time)."""
        return self.deepspeed.live_parameters() if self.deepspeed else 0.0


@dataclass(frozen=True)
class DeepSpeedSizes:
    """The ZeRO buffer sizes (elements) ``plan --emit deepspeed`` writes and the planner counts, DeepSpeed 0.19.8's
    defaults written out so that the config that runs is the one predicted (runtime/zero/config.py).

    What each costs at the backward peak (runtime/zero/stage3.py, partitioned_param_coordinator.py; measured in
    tests/distributed/parity_deepspeed.py): ZeRO-1/2 hold two buckets of ``reduce_bucket_size`` with overlap_comm,
    ZeRO-3 one (``ipg_buckets``, one per gradient dtype), ZeRO-0 none. ZeRO-3 keeps gathered parameters live up to
    ``stage3_max_live_parameters`` (prefetches of ``stage3_prefetch_bucket_size`` stop there) and keeps those it
    will reuse within ``stage3_max_reuse_distance`` elements of the trace whatever the live count: the larger of
    the two bounds the live parameters (measured: the bound plus part of the module in use). Parameters of at most
    ``stage3_param_persistence_threshold`` elements stay whole on every rank: the norms (and biases), under 0.1% of a
    7B+ model's parameters, not counted."""

    reduce_bucket_size: int = 500_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    stage3_param_persistence_threshold: int = 100_000

    def live_parameters(self) -> float:
        """The most gathered ZeRO-3 parameter elements DeepSpeed keeps live (the module in use aside)."""
        return float(max(self.stage3_max_live_parameters, self.stage3_max_reuse_distance))

    def zero_config(self, zero: int) -> dict[str, int]:
        """The ``zero_optimization`` entries of these sizes at ZeRO-``zero`` (none at ZeRO-0)."""
        out = {"reduce_bucket_size": self.reduce_bucket_size} if zero >= 1 else {}
        if zero == 3:
            out.update({k: getattr(self, k) for k in ("stage3_prefetch_bucket_size", "stage3_max_live_parameters",
                                                      "stage3_max_reuse_distance", "stage3_param_persistence_threshold")})
        return out


# DeepSpeed's pipeline engine refuses ZeRO-2/3 (runtime/pipe/engine.py asserts zero_optimization_stage() <= 1) and
# runs one 1F1B-like schedule with one model chunk per rank; at pp=1 every ZeRO stage runs, HSDP only at ZeRO-3 (ZeRO++
# hpZ: ZeRO-2 shards over all dp ranks)
DEEPSPEED_RUNS = ((("pp", 1), ("hsdp", False), ("virtual_stages", 1)), (("pp", 1), ("zero", 3), ("virtual_stages", 1)),
                  (("zero", 0), ("schedule", "1f1b"), ("virtual_stages", 1)),
                  (("zero", 1), ("schedule", "1f1b"), ("virtual_stages", 1)))

STACKS = {
    "meshwright": Stack("meshwright", "autocast", dp_overlap=True, tp_wgrad_overlap=False, pipeline_slowdown=1.0,
                        grads_set_to_none=True, fsdp_zero2=True, reduces_after_backward_zero=(0, 1), dp1_plain=True),
    # Megatron-LM defaults: no --overlap-grad-reduce; async TP all-reduce / SP all-gather overlap the wgrad GEMMs
    # It runs DDP or the distributed optimizer (ZeRO-0/1) with any pp/ep, or torch FSDP2 (--use-torch-fsdp2: ZeRO-3, no
    # HSDP flag) with pp=1 and ep=1 (validate_args); no GPipe schedule
    "megatron": Stack("megatron", "bf16_fp32_grads", dp_overlap=False, tp_wgrad_overlap=True, pipeline_slowdown=1.0,
                      runs=((("zero", 0),), (("zero", 1),), (("zero", 3), ("pp", 1), ("ep", 1), ("hsdp", False)))),
    # DeepSpeed's pipeline engine ran 23-27% slower than Megatron's on the same shapes (BLOOM/MT-NLG reports, issue 17).
    # Its ZeRO optimizer reduces gradients through two buckets of reduce_bucket_size (5e8 elements) with overlap_comm at
    # ZeRO-1/2, as the export writes it: 2.0e9 bytes in bf16 during backward; one at ZeRO-3, none at ZeRO-0 (its bf16
    # optimizer reduces after backward; measured, DeepSpeed 0.19.8). Under its pipeline engine bf16 ZeRO-0 is
    # BF16_Optimizer with bf16 accumulation (bf16_bf16_accum)
    "deepspeed": Stack("deepspeed", "bf16", dp_overlap=True, tp_wgrad_overlap=False, pipeline_slowdown=1.25,
                       deepspeed=DeepSpeedSizes(), reduce_buckets=(0, 2, 2, 1), fp32_precision="deepspeed_fp32",
                       pipeline_zero0_precision="bf16_bf16_accum", pipeline_reduces_after_schedule=True,
                       runs=DEEPSPEED_RUNS, experts_tp_sharded=False),
    # the same with data_types.grad_accum_dtype=fp32 (BF16_Optimizer, ZeRO-1 built in, no reduction buckets)
    "deepspeed-fp32-accum": Stack("deepspeed-fp32-accum", "bf16_fp32_accum", dp_overlap=True, tp_wgrad_overlap=False,
                                  pipeline_slowdown=1.25, deepspeed=DeepSpeedSizes(),
                                  runs=((("zero", 1), ("schedule", "1f1b"), ("virtual_stages", 1)),),
                                  experts_tp_sharded=False),
    # torchtitan applies replicate (DDP, ZeRO-0) or fully_shard (ZeRO-3, also as HSDP); it has no ZeRO-1/2 setting.
    # Its EP group takes its ranks from dp_shard*cp*tp (parallel_dims.py: efsdp = dp_shard*cp*tp/ep, FSDP over efsdp
    # whenever ep > 1): under replicate (dp_shard=1) only from tp, with each rank's experts sharded over tp/ep, not the
    # planned ep over dp with tp-sharded experts; so ZeRO-0 runs ep=1 only
    "torchtitan": Stack("torchtitan", "fsdp_mixed", dp_overlap=True, tp_wgrad_overlap=False, pipeline_slowdown=1.0,
                        pipeline_defers_fsdp_sync=True, fsdp_zero2=True,
                        runs=((("zero", 0), ("ep", 1)), (("zero", 3),)),
                        zero_runs_as=(0, 2, 2, 3), head_kept_gathered=True),
}


def get_stack(name: str) -> Stack:
    """The rules of a stack by name, with a one-line error for unknown names."""
    if name not in STACKS:
        raise invalid("stack", name, ", ".join(STACKS))
    return STACKS[name]


def precision_for_dtype(dtype: str, stack: str = "meshwright") -> str:
    """Precision policy of ``stack`` training in ``dtype`` (TrainConfig.dtype): fp32 runs keep fp32 throughout, with
    whatever master copy the stack's optimizer keeps all the same (``Stack.fp32_precision``)."""
    st = get_stack(stack)
    return st.fp32_precision if dtype in ("fp32", "tf32") else st.precision
