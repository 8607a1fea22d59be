"""The seam between the trainer and a model layout.

The trainer (``meshwright/trainer.py``) never knows whether it drives one process or a hybrid
data/tensor/pipeline/expert-parallel layout: it talks to a ``Runtime``. ``LocalRuntime`` (one process)
lives in ``meshwright/local_runtime.py``; ``meshwright/parallel/`` provides the distributed one built from a Plan.
"""

from __future__ import annotations

import abc
from typing import Any, Iterable

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), each (micro_batch, seq_len) int64


class Runtime(abc.ABC):
    """What the trainer needs from a (possibly parallel) model layout.

    Contract:
    - ``model`` is the (wrapped) module; ``parameters()`` are the tensors the optimiser updates on this rank.
    - ``dp_rank``/``dp_size`` tell the data loader which shard of each global batch this rank reads.
    - ``forward_backward`` consumes this rank's micro-batches of one optimiser step (gradient
      accumulation or a pipeline schedule), leaves gradients ready for the optimiser (already
      reduced across data parallelism), and returns the step's mean loss averaged over all ranks.
    - ``model_state``/``load_model_state`` expose state dicts keyed by the plain model's parameter
      names, so checkpoints written under one layout load under another.
    """

    model: nn.Module
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abc.abstractmethod
    def parameters(self) -> Iterable[nn.Parameter]: ...

    @abc.abstractmethod
    def forward_backward(self, micro_batches: list[Batch]) -> float: ...

    @abc.abstractmethod
    def eval_loss(self, micro_batches: list[Batch]) -> float: ...

    @abc.abstractmethod
    def clip_grad_norm_(self, max_norm: float) -> float: ...

    def build_optimizer(self, make: Any) -> torch.optim.Optimizer:
        """``make(param_groups)`` builds the optimiser; distributed backends may wrap it (DeepSpeed)."""
        return make(self.param_groups())

    def param_groups(self, weight_decay: float | None = None) -> list[dict[str, Any]]:
        """Decay matrices, not norms/biases/embeddings-as-vectors (the GPT-2/nanoGPT convention)."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups: list[dict[str, Any]] = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        if weight_decay is not None:
            groups[0]["weight_decay"] = weight_decay
        return [g for g in groups if g["params"]]

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @abc.abstractmethod
    def model_state(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def load_model_state(self, state: dict[str, Any]) -> None: ...

    def all_reduce_mean(self, value: float) -> float:
        return value

    def barrier(self) -> None:
        return None

    def saved_activation_bytes(self) -> int | None:
        """Bytes saved for backward during the last step on this rank, if the runtime measured them."""
        return None

    def close(self) -> None:
        return None


class TorchDistributedCollectives:
    """``all_reduce_mean``/``barrier`` over the default process group, shared by the distributed runtimes
    (listed before ``Runtime`` in their bases so these override its one-process defaults)."""

    device: torch.device
    world_size: int

    def all_reduce_mean(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()
