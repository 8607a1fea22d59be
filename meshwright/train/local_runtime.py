"""LocalRuntime: the whole model in one process (the reference every parallel layout must match)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch
from torch import nn

from meshwright.errors import invalid
from meshwright.models import lm_loss
from meshwright.models.moe import moe_layers, router_stats
from meshwright.train.compile import SCOPES, check_model_scope, compile_blocks, compiled_model_loss
from meshwright.train.head_loss import head_loss
from meshwright.train.precision import PrecisionPolicy
from meshwright.train.runtime import Batch, Runtime, batch_to_device


class LocalRuntime(Runtime):
    """One process, one device: gradient accumulation over micro-batches, clipping, eval."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", dtype: str = "fp32",
                 compile_backend: str | None = None, loss_chunk_tokens: int = 0, compile_scope: str = "blocks") -> None:
        """``compile_backend``: torch.compile each block and the loss with it (None: eager); with
        ``compile_scope="model"`` the whole forward, head and loss as one graph instead (train/compile.py).
        ``loss_chunk_tokens`` > 0: head + loss per chunk of tokens, the whole logits never exist."""
        self.plan: Any = None  # the Plan this process was started with, if any (written to out_dir/plan.yaml)
        self.init: str | None = None  # the initial weights' scheme (models/init.py), when train/build.py built them
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.model.train()
        # bf16: autocast with fp32 master weights, on every device (train/precision.py says why)
        self.precision = PrecisionPolicy.from_dtype(dtype)
        self.compute_dtype = self.precision.compute_dtype
        self.model_loss: Callable[..., torch.Tensor] | None = None  # compile_scope "model": (model, tokens, targets) -> loss, one compiled graph
        self.head_loss = None
        if compile_scope not in SCOPES:
            raise invalid("compile_scope", compile_scope, " | ".join(SCOPES))
        if compile_scope == "model":
            check_model_scope(self.model, compile_backend, loss_chunk_tokens)
            self.model_loss = compiled_model_loss(compile_backend)
        else:
            if compile_backend is not None:
                compile_blocks(self.model, compile_backend)
            # compile and/or chunked loss: the head runs with the loss (None: eager logits, then lm_loss)
            self.head_loss = head_loss(compile_backend, loss_chunk_tokens)
        self._moe = bool(moe_layers(self.model))
        self._last_aux: torch.Tensor | None = None  # mean auxiliary (balance + z) loss of the last step, MoE only

    def _autocast(self) -> contextlib.AbstractContextManager:
        return self.precision.autocast(self.device.type)

    def parameters(self) -> Iterable[nn.Parameter]:
        return self.model.parameters()

    def _lm_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x, y = batch_to_device(inputs, self.device), batch_to_device(targets, self.device)
        if self.model_loss is not None:
            return self.model_loss(self.model, x, y)
        if self.head_loss is not None:
            return self.head_loss(self.model.output, self.model(x, return_hidden=True), y)
        return lm_loss(self.model(x), y)

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(LM loss, auxiliary MoE loss or None): the objective is their sum, the log shows them apart."""
        with self._autocast():
            loss = self._lm_loss(inputs, targets)
            aux = self.model.aux_loss() if hasattr(self.model, "aux_loss") else None
        return loss, aux

    def forward_backward_lazy(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Mean LM loss over the micro-batches, on the device (the auxiliary loss is trained on but logged
        apart, as the distributed runtime does); gradients accumulate as the mean of (LM + aux) too (/ n each)."""
        n = len(micro_batches)
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # as the float sum it replaces
        total_aux = torch.zeros((), dtype=torch.float64, device=self.device)
        for inputs, targets in micro_batches:
            loss, aux = self._loss(inputs, targets)
            ((loss if aux is None else loss + aux) / n).backward()
            total += loss.detach().double()
            if aux is not None:
                total_aux += aux.detach().double()
        self._last_aux = total_aux / n if self._moe else None
        return total / n

    def forward_backward(self, micro_batches: list[Batch]) -> float:
        return float(self.forward_backward_lazy(micro_batches))

    def extra_log_fields(self) -> dict[str, Any]:
        """Router statistics of the last forward and the auxiliary loss, as ``DistributedRuntime`` logs them."""
        if not self._moe:
            return {}
        aux = None if self._last_aux is None else float(self._last_aux)
        return {**router_stats(self.model), "aux_loss": aux}

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[Batch]) -> float:
        was_training = self.model.training
        self.model.eval()
        try:
            with self._autocast():
                losses = [self._lm_loss(x, y).item() for x, y in micro_batches]
        finally:
            self.model.train(was_training)
        return sum(losses) / max(len(losses), 1)

    def clip_grad_norm_lazy(self, max_norm: float) -> torch.Tensor:
        """Total gradient 2-norm before clipping, on the device; ``max_norm <= 0`` only measures it. The clip
        factor stays on the device too (``clip_grads_with_norm_``); multi-tensor kernels on accelerators, the
        per-tensor loop on CPU (as before: CPU trajectories stay bitwise)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        foreach = self.device.type != "cpu"
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, error_if_nonfinite=False, foreach=foreach)
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=foreach)
        return norm

    def clip_grad_norm_(self, max_norm: float) -> float:
        return float(self.clip_grad_norm_lazy(max_norm))

    def model_state(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)
