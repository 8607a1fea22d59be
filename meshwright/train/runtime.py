"""The seam between the trainer and a model layout.

The trainer (``meshwright/train/trainer.py``) never knows whether it drives one process or a hybrid
data/tensor/pipeline/expert-parallel layout: it talks to a ``Runtime``. ``LocalRuntime`` (one process)
lives in ``meshwright/train/local_runtime.py``; ``meshwright/parallel/`` provides the distributed one built from a Plan.
Optional features (the Plan it runs, extra log fields, checkpoint state) are declared here with defaults,
so callers never probe a runtime with hasattr.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

if TYPE_CHECKING:
    from meshwright.plan import Plan

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), each (micro_batch, seq_len) int64


def batch_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch tensor on ``device`` without a host sync on CUDA: a copy from pageable memory waits for
    every kernel already queued, a pinned one with ``non_blocking`` does not."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Runtime(abc.ABC):
    """What the trainer needs from a (possibly parallel) model layout.

    Contract:
    - ``model`` is the (wrapped) module; ``parameters()`` are the tensors the optimiser updates on this rank.
    - ``dp_rank``/``dp_size`` tell the data loader which shard of each global batch this rank reads.
    - ``forward_backward`` consumes this rank's micro-batches of one optimiser step (gradient
      accumulation or a pipeline schedule), leaves gradients ready for the optimiser (already
      reduced across data parallelism), and returns the step's mean loss averaged over all ranks.
    - ``forward_backward_lazy``/``clip_grad_norm_lazy`` do the same but return 0-dim tensors on the device,
      not read back: on a GPU every read-back is a host sync that idles the device while Python launches
      the next kernels, so the trainer reads loss and norm once per step, after the optimiser step is queued.
      Runtimes that can defer the read implement these and derive the float versions from them.
    - ``model_state``/``load_model_state`` expose state dicts keyed by the plain model's parameter
      names, so checkpoints written under one layout load under another.
    """

    model: nn.Module
    plan: "Plan | None" = None  # the layout this runtime runs (written to out_dir/plan.yaml); None = one process
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    compute_dtype: str = "fp32"  # the dtype the matmuls run in (train/precision.py): MFU uses its peak

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

    def forward_backward_lazy(self, micro_batches: list[Batch]) -> torch.Tensor:
        """``forward_backward``'s mean loss as a 0-dim tensor (this default reads it back first)."""
        return torch.tensor(self.forward_backward(micro_batches), dtype=torch.float64)

    def clip_grad_norm_lazy(self, max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_``'s total norm as a 0-dim tensor (this default reads it back first)."""
        return torch.tensor(self.clip_grad_norm_(max_norm), dtype=torch.float64)

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
        self.zero_grad(optimizer)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the step's gradients: freed (``set_to_none``), so a step starts with none; runtimes whose gradients
        live in a persistent buffer (DDP's bucket views) zero them in place instead."""
        optimizer.zero_grad(set_to_none=True)

    @abc.abstractmethod
    def model_state(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def load_model_state(self, state: dict[str, Any]) -> None: ...

    def all_reduce_mean(self, value: float) -> float:
        return value

    def barrier(self) -> None:
        return None

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's ``text`` on every rank (the others pass None): what one rank read or refused, said the same
        everywhere. One process: ``text`` itself."""
        assert text is not None
        return text

    def checkpoint_state(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """{"model"[, "optim"]} for ``dcp.save``, also the template ``dcp.load`` fills in place: the model part
        from ``model_state()``, the optimizer part from DCP, keyed by the same parameter names. Runtimes whose
        optimizer is not a torch optimizer (DeepSpeed) or that refuse some states override it."""
        state: dict[str, Any] = {"model": self.model_state()}
        if optimizer is not None:
            state["optim"] = get_optimizer_state_dict(self.model, optimizer)
        return state

    def load_checkpoint_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer | None) -> None:
        """Set a state filled by ``dcp.load`` back, through the same hooks ``checkpoint_state`` used."""
        self.load_model_state(state["model"])
        if optimizer is not None:
            set_optimizer_state_dict(self.model, optimizer, state["optim"])

    def extra_log_fields(self) -> dict[str, Any]:
        """Runtime-specific metrics for the run log (router statistics of MoE layers). Collective where distributed."""
        return {}

    def saved_activation_bytes(self) -> int | None:
        """Bytes saved for backward during the last step on this rank, if the runtime measured them."""
        return None

    def close(self) -> None:
        """Drop whatever of this runtime holds a process group (distributed runtimes), before the group is destroyed
        (parallel/teardown.py). Idempotent; one process holds none."""
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

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's ``text`` (UTF-8 bytes: nothing is pickled) on every rank of the default group; collective."""
        import torch.distributed as dist

        data = text.encode() if dist.get_rank() == 0 and text is not None else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=0)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device) if data
               else torch.zeros(int(size.item()), dtype=torch.uint8, device=self.device))
        dist.broadcast(buf, src=0)
        return bytes(buf.cpu().tolist()).decode()
