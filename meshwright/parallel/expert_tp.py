"""Expert tensor parallelism (Megatron-core's ETP, its default: expert_tensor_parallel_size = tp).

Under tp > 1 every routed expert is split over the tp group like a dense SwiGLU MLP: w1/w3 (gate/up, stacked
(E, hidden, d_model)) by output columns -- ``Shard(1)`` -- and w2 (down, (E, d_model, hidden)) by input rows --
``Shard(2)`` -- as DTensors on the tp mesh, so checkpoints (DCP), FSDP2, meta initialisation and ``init_from`` treat
them like the dense tp weights. The MoE block's tokens are tp-replicated (no sequence parallelism on MoE layers), so
every tp rank routes the same tokens identically and runs its hidden slice of every expert; the block sums the partial
outputs over tp once, on the combined (tokens, d_model) output, and sums the experts' input gradient and the gate
weights' gradient in backward (``models/moe.py``: Megatron's f/g pair). Expert parallelism (``expert_parallel.py``)
then slices dim 0 of these local shards: an expert weight is sharded over ep x tp.

Expert LoRA adapters (``memory/lora.py`` ``ExpertAdapter``) stay whole on every tp rank (rank x (in + out) per expert,
small); each rank applies the rows of its hidden slice (``moe._low_rank``), so their gradients are partial over tp and
are summed over the tp group (``adapter_params``, the runtime's tp-partial bucket).

The megatron-core tp backend (``megatron_tp.py``) has no MoE path: MoE layers with tp > 1 are refused there
(``support.check_runtime_support``).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from meshwright.errors import invalid
from meshwright.models.moe import GroupedExperts, MoE, expert_adapters

# the dim each stacked expert weight is split on over tp: gate/up by output columns, down by input rows
EXPERT_TP_DIMS = {"w1": 1, "w3": 1, "w2": 2}


def apply_expert_tp(moe: MoE, tp_mesh: DeviceMesh, name: str = "feed_forward") -> None:
    """Shard ``moe``'s (``GroupedExperts``) weights over the 1-D ``tp_mesh`` and make the block reduce over it."""
    experts = moe.experts
    if not isinstance(experts, GroupedExperts):
        raise invalid(f"{name}.experts", type(experts).__name__, "GroupedExperts (expert tp before expert parallelism)")
    tp = tp_mesh.size()
    if experts.hidden % tp:
        raise invalid("tp", tp, f"a divisor of the experts' hidden size moe_ffn_hidden={experts.hidden} "
                      "(experts are split over tp)")
    for w, dim in EXPERT_TP_DIMS.items():
        p = getattr(experts, w)
        experts.register_parameter(w, nn.Parameter(distribute_tensor(p, tp_mesh, [Shard(dim)]),
                                                   requires_grad=p.requires_grad))
    experts.tp_index = (tp_mesh.get_local_rank(), tp)
    moe.tp_group = tp_mesh.get_group()


def adapter_params(moe: MoE) -> list[nn.Parameter]:
    """The trainable expert adapter parameters of an expert-tp block: their gradients are partial over tp."""
    return [p for a in expert_adapters(moe.experts) if a is not None for p in (a.lora_A, a.lora_B) if p.requires_grad]
