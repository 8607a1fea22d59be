"""The training loop. It drives any ``Runtime`` (one process or a parallel layout) and never looks inside.

Per optimiser step: set the LR (warmup + cosine to ``min_lr``), take this rank's micro-batches of the
global batch, ``runtime.forward_backward`` (gradient accumulation / pipeline schedule), clip, step.
Around it: eval loss every ``eval_every`` steps, a JSONL run log and ``summary.json`` (main rank only),
a tqdm bar, NaN/inf handling per ``nan_policy``, and atomic DCP checkpoints with exact resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from meshwright.config import ClusterSpec, ModelConfig, TrainConfig
from meshwright.config.io import to_dict
from meshwright.data.fingerprint import check_resume_data, data_label
from meshwright.data.loader import SequenceLoader
from meshwright.errors import ConfigError, PeerLost, first_line, invalid
from meshwright.memory.meft import log_fields
from meshwright.optim import CoatAdamW
from meshwright.tools.energy import EnergyAccountant, EnergyTotals
from meshwright.memory.lora_cost import lora_step
from meshwright.tools.flops import full_training_flops_per_token, hardware_flops_per_token, model_flops_per_token
from meshwright.tools.mfu import mfu as compute_mfu
from meshwright.tools.sinks import Sinks, open_sinks
from meshwright.train.async_checkpoint import AsyncCheckpointer, CheckpointAbandoned, CheckpointPeerLost, peer_lost
from meshwright.train.checkpoint import latest_checkpoint, load_latest, load_runtime, save_checkpoint
from meshwright.train.compile import fast_adamw_kwargs
from meshwright.train.faults import fault_point
from meshwright.train.lora_base import AdapterScope
from meshwright.train.peft_init import STATE_KEY as INIT_ADAPTER_KEY, start_record
from meshwright.train.preemption import Preemption, grace_warning
from meshwright.train.run_dir import reopen_log
from meshwright.train.runtime import Runtime


class NonFiniteLoss(ConfigError):
    """Loss or gradient norm became NaN/inf with ``nan_policy: stop`` (printed as one line by the CLI)."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR for 0-based ``step``: linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(cfg: TrainConfig, runtime: Runtime) -> torch.optim.Optimizer:
    """AdamW (or COAT's FP8-state AdamW) over ``runtime.param_groups``; the runtime may wrap it or turn the
    multi-tensor kernels off where its parameters cannot share them."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        device = next(iter(runtime.parameters()), torch.empty(0)).device.type
        fast = {**kwargs, **fast_adamw_kwargs(device)}  # fused on CUDA, foreach on CPU
        make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] = lambda groups: torch.optim.AdamW(groups, **fast)  # noqa: E731
    elif cfg.optimizer == "coat_adamw":
        make = lambda groups: CoatAdamW(groups, **kwargs)  # noqa: E731
    else:
        raise invalid("optimizer", cfg.optimizer, "'adamw' or 'coat_adamw'")
    return runtime.build_optimizer(make)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` can skip a non-finite step without the host looking first: torch's fused
    Adam/AdamW read a ``found_inf`` tensor (the hook GradScaler uses) and leave parameters, moments and the
    step count untouched where it is 1. Then the loss and norm are read back after the step is queued.
    Plain tensors only: the flag is a plain tensor, which DTensor parameters (FSDP2, TP) refuse to mix with."""
    groups = optimizer.param_groups
    return (type(optimizer) in (torch.optim.AdamW, torch.optim.Adam) and all(g.get("fused") for g in groups)
            and not any(isinstance(p, DTensor) for g in groups for p in g["params"]))


def _read_back(loss: torch.Tensor, norm: torch.Tensor) -> tuple[float, float]:
    """(loss, grad norm) as floats in one device-to-host copy."""
    pair = torch.stack([loss.detach().to(torch.float64), norm.detach().to(device=loss.device, dtype=torch.float64)])
    a, b = pair.tolist()
    return a, b


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class Trainer:
    """Runs ``cfg.steps`` optimiser steps of ``runtime`` on ``train_loader``; see the module docstring."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, train_loader: SequenceLoader,
                 val_loader: SequenceLoader | None, model_cfg: ModelConfig, cluster: ClusterSpec,
                 out_dir: str | Path | None = None, keep_checkpoints: int | None = None,
                 print_fn: Callable[[str], None] | None = None) -> None:
        self.cfg, self.runtime, self.model_cfg, self.cluster = cfg, runtime, model_cfg, cluster
        self.train_loader, self.val_loader = train_loader, val_loader
        self.out_dir = Path(out_dir if out_dir is not None else cfg.out_dir)
        self.ckpt_dir = self.out_dir / "ckpt"
        self.keep_checkpoints = keep_checkpoints if keep_checkpoints is not None else cfg.keep_checkpoints
        self.print = print_fn or (lambda s: tqdm.write(s, file=sys.stdout))
        per_step = cfg.micro_batch * runtime.dp_size
        if cfg.global_batch % per_step:
            raise invalid("global_batch", cfg.global_batch, f"a multiple of micro_batch*dp_size = {cfg.micro_batch}*{runtime.dp_size}")
        self.accum_steps = cfg.global_batch // per_step
        if train_loader.micro_batches_per_step != self.accum_steps:
            raise invalid("train_loader", train_loader.micro_batches_per_step, f"{self.accum_steps} micro-batches per step")
        self.optimizer = build_optimizer(cfg, runtime)
        self.step = 0
        self.skipped_steps = 0
        self._skips_on_device: bool | None = None  # skips_on_device(self.optimizer), decided at the first step
        self._overlap_everywhere = False  # _skips_on_device on every rank (see may_overlap)
        self.overlap_readback = True  # fit reads a step's loss back after queueing the next (see may_overlap)
        self.preemption = Preemption()  # fit opens its own: preempt_signals stop at a step with a checkpoint
        self._stopping = False  # a stop agreed by every rank (preemption.py)
        self._saved_step = -1  # the step of this process's last checkpoint (fit's final save skips a second one)
        self._slowest_step_s = 0.0  # the slowest step this session after the first (preempt_grace_s)
        self._ckpt_s: float | None = None  # how long the last checkpoint took to be in place (preempt_grace_s)
        self._grace_warned = False
        self._last_done = 0.0  # perf_counter at the last read-back
        self.tokens_per_step = cfg.global_batch * cfg.seq_len
        # The model owns its FLOPs; the convention is named in the config so MFU is comparable across tools. A LoRA
        # run counts what its step executes (no dW of the frozen base: ~4N, docs/finetune.md), and keeps full
        # training's count beside it (``full_flops_per_token``, ``mfu_full``) for comparison with full fine-tuning.
        lora = lora_step(model_cfg, cfg.lora) if getattr(cfg, "lora", None) is not None else None
        self.flops_per_token = float(model_flops_per_token(model_cfg, cfg.seq_len, cfg.flops_convention, lora))
        self.full_flops_per_token = float(full_training_flops_per_token(model_cfg, cfg.seq_len, cfg.flops_convention))
        self.lora_flops = lora is not None
        plan = runtime.plan
        recompute = [s.recompute for s in plan.layer_strategies()] if plan is not None else "none"
        self.hw_flops_per_token = float(hardware_flops_per_token(model_cfg, cfg.seq_len, recompute, cfg.flops_convention,
                                                                 lora))
        self._eval_batches = None
        self._per_source_batches: dict[str, list[Any]] | None = None  # data.eval_per_source, built at the first eval
        self.eval_per_source: dict[str, float] | None = None  # each mixture source's eval loss, at the last eval
        self.eval_batch_count = self._eval_batch_count()
        self.energy: EnergyAccountant | None = None
        self.allow_data_change = False  # --allow-config-change: resume onto data other than the checkpoint's
        # the step and loader position this session started from: a resume may have changed seq_len, global_batch
        # or the data, so tokens are counted from there (train_loader.tokens_at), not as step * tokens_per_step
        self._base_step, self._base_consumed = 0, 0
        self.resumed_from: Path | None = None  # the checkpoint resume() loaded
        # ckpt_async: saves stage to CPU memory and write in the background (collective: the same on every rank)
        # lora: which tensors a checkpoint carries and the base they train on (adapter-only checkpoints: lora_base.py)
        self.adapters = (AdapterScope.for_run(cfg, model_cfg, self._init_scheme(), self._device_type())
                         if getattr(cfg, "lora", None) is not None else None)
        # lora.init_adapter: the PEFT adapter this run started from, recorded in every checkpoint (train/peft_init.py):
        # settled by fit once it knows whether it resumes (_settle_init_adapter): a fresh start hashes it once (rank 0),
        # a resume keeps the record of the checkpoint it loads and never reads the directory (it may be gone by then)
        self.init_adapter: dict[str, Any] | None = None
        self.async_ckpt = (AsyncCheckpointer(runtime, cfg.ckpt_staging, notify=self.print if runtime.is_main else None)
                           if cfg.ckpt_async else None)

    def close(self) -> None:
        """Let go of every process group the trainer holds -- preemption's and the async checkpointer's gloo groups,
        the optimizer (ZeRO-1 keeps the stage group; its states are DTensors, whose meshes keep theirs) -- then close
        the runtime (DDP first). Called before the group is destroyed, on every way out (parallel/teardown.py);
        idempotent, the trainer is unusable after it. A save still in flight was waited for by ``fit``; an abandoned
        one keeps its own reference to its group (and the process ends without teardown)."""
        self.preemption.close()
        if self.async_ckpt is not None:
            self.async_ckpt.group = None
            self.async_ckpt = None
        self.__dict__.pop("optimizer", None)
        self.runtime.close()

    # ---- pieces ----------------------------------------------------------------------------------
    def _device_type(self) -> str:
        return next(iter(self.runtime.parameters()), torch.empty(0)).device.type

    def _init_scheme(self) -> str:
        """How the runtime's initial weights were made (models/init.py); a runtime built by a caller (tests) that
        does not say: what ``init`` resolves to on its device."""
        from meshwright.models.init import resolve_init

        return getattr(self.runtime, "init", None) or resolve_init(self.cfg.init, self._device_type())

    def set_lr(self, step: int) -> float:
        lr = lr_at(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def _eval_batch_count(self) -> int:
        """``eval_batches``, clamped to one pass over the validation split: the val loader does not shuffle and
        wraps around, so further batches only repeat windows already scored (and are held in memory). The split's
        size is known only once the data is loaded, after the config was validated, so this is a note, not an error."""
        n = self.cfg.eval_batches
        if self.val_loader is None or n <= self.val_loader.batches_per_pass:
            return n
        one_pass = self.val_loader.batches_per_pass
        if self.runtime.is_main:
            self.print(f"note: eval_batches={n} clamped to {one_pass}: the validation split holds "
                       f"{self.val_loader.n_windows:,} sequences of {self.cfg.seq_len} tokens, {one_pass} batch(es) of "
                       f"global_batch={self.cfg.global_batch}; more would only repeat them")
        return one_pass

    def evaluate(self) -> float | None:
        if self.val_loader is None or self.cfg.eval_batches <= 0:
            return None
        if self._eval_batches is None:
            self._eval_batches = self.val_loader.fixed_batches(self.eval_batch_count)
        with self._not_training():
            loss = self.runtime.eval_loss(self._eval_batches)
            if getattr(self.cfg.data, "eval_per_source", False):
                labels = self.cfg.data.source_labels()
                if len(labels) == 1:  # one data set (data.path or a one-source mixture): its batches are the blend's
                    self.eval_per_source = {labels[0]: loss}
                else:
                    self.eval_per_source = {label: self.runtime.eval_loss(batches)
                                            for label, batches in self._source_eval_batches().items()}
            return loss

    def _source_eval_batches(self) -> dict[str, list[Any]]:
        """``data.eval_per_source``: each mixture source's own validation batches, built once (at most one pass
        of that source's split, as for the blended set)."""
        if self._per_source_batches is None:
            loaders = [self.val_loader.alone(j) for j in range(len(self.val_loader.sources))]
            self._per_source_batches = {
                loader.labels[0]: loader.fixed_batches(min(self.eval_batch_count, loader.batches_per_pass))
                for loader in loaders}
        return self._per_source_batches

    def _not_training(self) -> Any:
        """Excludes evaluation and checkpoint I/O from the energy windows (J/token counts training only)."""
        return self.energy.paused() if self.energy is not None else contextlib.nullcontext()

    def throughput(self, tokens: float, seconds: float) -> dict[str, float]:
        world = max(self.runtime.world_size, 1)
        tps = tokens / seconds if seconds > 0 else 0.0
        per_device_flops = tps * self.flops_per_token / world
        return {
            "tokens_per_s": tps, "tokens_per_s_per_device": tps / world,
            "mfu": compute_mfu(tps, self.flops_per_token, self.cluster, self.runtime.compute_dtype, world),
            "hfu": compute_mfu(tps, self.hw_flops_per_token, self.cluster, self.runtime.compute_dtype, world),
            "tflops_per_device": per_device_flops / 1e12,
        }

    def _energy_snapshot(self, last: dict[str, float]) -> dict[str, Any]:
        """Close the current energy window, sum it over ranks (collective), and reopen it."""
        if self.energy is None:
            return {}
        self.energy.pause()
        t = self.energy.totals
        world = max(self.runtime.world_size, 1)
        total_j = self.runtime.all_reduce_mean(t.total_j) * world
        seconds = t.seconds
        self.energy.resume()
        d_j, d_s = total_j - last.get("j", 0.0), seconds - last.get("s", 0.0)
        last.update(j=total_j, s=seconds)
        return {"energy_j": total_j, "power_w": d_j / d_s if d_s > 0 else None}

    def _memory_per_rank(self, reserved: bool = False) -> list[float]:
        """Peak memory of every rank in GiB (CUDA max allocated on GPUs -- ``reserved``: what the caching
        allocator held, the figure the planner predicts and an OOM is about -- process peak RSS on CPU). Collective."""
        if torch.cuda.is_available():
            local = (torch.cuda.max_memory_reserved() if reserved else torch.cuda.max_memory_allocated()) / 2**30
        else:
            local = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
        if dist.is_available() and dist.is_initialized() and self.runtime.world_size > 1:
            out: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(out, round(local, 4))
            return [float(x) for x in out]
        return [round(local, 4)]

    def _extra_log_fields(self) -> dict[str, Any]:
        """Runtime-specific metrics (router statistics of MoE layers, MEFT reconstruction error)."""
        out = self.runtime.extra_log_fields()
        if self.cfg.meft is not None:
            out.update(log_fields(self.runtime.model))
        return out

    def _settle_init_adapter(self, resumed_state: dict[str, Any] | None) -> None:
        """``init_adapter``'s record: on a resume the checkpoint's (or, from a checkpoint without one, the path alone:
        the directory is not read); on a fresh start rank 0's hash, shared with every rank (collective then)."""
        path = getattr(getattr(self.cfg, "lora", None), "init_adapter", None)
        if path is None:
            return
        if resumed_state is not None:
            record = resumed_state.get(INIT_ADAPTER_KEY)
            self.init_adapter = record if isinstance(record, dict) else {"path": str(Path(path).absolute()),
                                                                         "fingerprint": None}
        else:
            self.init_adapter = start_record(path, self.runtime.is_main, self.runtime.broadcast_text)

    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "train_loader": self.train_loader.state_dict(),
                "lr": lr_at(max(self.step - 1, 0), self.cfg), "config": to_dict(self.cfg),
                **({INIT_ADAPTER_KEY: self.init_adapter} if self.init_adapter is not None else {})}

    def save(self) -> Path:
        """Checkpoint this step. With ``ckpt_async`` it returns once the state is staged; ``wait_for_save`` waits
        for the write."""
        with self._not_training():
            if self.async_ckpt is not None:
                path = self.async_ckpt.save(self.ckpt_dir, self.step, self.optimizer, self.trainer_state(),
                                            keep=self.keep_checkpoints, adapters=self.adapters)
            else:
                t0 = time.perf_counter()
                path = save_checkpoint(self.ckpt_dir, self.step, self.runtime, self.optimizer, self.trainer_state(),
                                       keep=self.keep_checkpoints, adapters=self.adapters)
                self._ckpt_s = time.perf_counter() - t0
        self._saved_step = self.step
        return path

    def wait_for_save(self, interrupted: bool = False) -> None:
        """Block until a background checkpoint is complete and in place (its error raised); no-op when synchronous.
        ``interrupted``: a Ctrl-C stopped the run, so the wait says so and the next Ctrl-C abandons the save."""
        if self.async_ckpt is not None:
            with self._not_training():
                self.async_ckpt.close(interrupted)

    def _complete_save_in_flight(self, error: BaseException | None = None) -> None:
        """The error path: the checkpoint in flight is finished (it is complete data) before ``error`` goes on, and
        before the caller tears down the process group its writer uses."""
        try:
            self.wait_for_save(interrupted=isinstance(error, KeyboardInterrupt))
        except CheckpointAbandoned:  # a repeated Ctrl-C gave it up (its line is printed); the first error goes on
            pass
        except KeyboardInterrupt:  # Ctrl-C during the wait: the checkpoint completed, and the run stops anyway
            pass
        except Exception as exc:  # noqa: BLE001 - the first error is the one to report; this one is named
            if error is None or not self._peer_lost(error):  # a peer lost: its one line says what is resumed
                self.print(f"warning: the checkpoint in flight was not completed: {exc}")

    def _peer_lost(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a collective failing because another rank is gone (or timed out), with several ranks."""
        if self.runtime.world_size <= 1:
            return False
        return isinstance(exc, CheckpointPeerLost) or (isinstance(exc, (RuntimeError, OSError)) and peer_lost(exc))

    def _stopped_by(self, exc: BaseException) -> BaseException | None:
        """What to raise instead of ``exc`` on the way out of ``fit``: a peer lost becomes one line naming this rank,
        the step and the checkpoint to resume from (``PeerLost``); a Ctrl-C is said once, with that checkpoint, by
        the main rank (and goes on). None: ``exc`` goes on as it is."""
        interrupted = isinstance(exc, KeyboardInterrupt)
        if not (interrupted and self.runtime.is_main) and not self._peer_lost(exc):
            return None
        latest = latest_checkpoint(self.ckpt_dir)
        resume = (f"{latest.name} is the latest complete checkpoint: `meshwright train ... --resume` continues from "
                  f"it" if latest is not None else "no checkpoint was completed: a new run starts from step 0")
        if interrupted:
            self.print(f"interrupted during step {self.step} of {self.cfg.steps}; {resume}")
            return None
        first = re.sub(r"^\[[^\]]*\] ", "", first_line(exc))
        first = first.split(". ")[0][:200]  # gloo's first sentence ("Connection reset by peer"), not its advice
        return PeerLost(f"rank {self.runtime.rank} of {self.runtime.world_size}: training stopped during step "
                        f"{self.step}: a peer rank was lost or a collective timed out ({type(exc).__name__}: "
                        f"{first}); valid: find why that rank stopped (its log), then resume: {resume}")

    def resume(self, path: str | Path | None = None) -> bool:
        """Load ``path`` (or the latest checkpoint in out_dir/ckpt); False when there is none."""
        grow = self.cfg.grow_positions  # a learned position table saved smaller than this model's (models/positions.py)
        if path is not None:
            target, state = Path(path), load_runtime(path, self.runtime, self.optimizer, grow_positions=grow,
                                                     adapters=self.adapters)
        else:  # a damaged newest checkpoint falls back to the previous complete one, with a warning
            found = load_latest(self.ckpt_dir, self.runtime, self.optimizer, warn=self.print, grow_positions=grow,
                                adapters=self.adapters)
            if found is None:
                return False
            target, state = found
        if state["step"] > self.cfg.steps:
            raise invalid("steps", self.cfg.steps, f"at least the checkpoint's step {state['step']} ({target})")
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._settle_init_adapter(state)  # where this run's adapters started, not where they are now
        data_note = check_resume_data(state["train_loader"].get("data"), self.train_loader.data_fingerprint,
                                      data_label(self.cfg.data), str(target), self.allow_data_change)
        loader_note = self.train_loader.load_state_dict(state["train_loader"], data_changed=self.allow_data_change)
        notes = [n for n in (data_note, loader_note) if n is not None]  # one line: what changed, then where it goes on
        if notes and self.runtime.is_main:
            self.print("; ".join([notes[0], *(n.removeprefix("note: ") for n in notes[1:])]))
        grown = state.get("grown_positions")
        if grown and self.runtime.is_main:
            (old, new), states = grown[0], len(grown) - 1
            self.print(f"note: the learned position table grew from {old} to {new} rows by grow_positions="
                       f"{grow}{f', its {states} optimizer moment(s) alike' if states else ''}")
        self._base_step, self._base_consumed = self.step, self.train_loader.consumed
        self.resumed_from = target  # --resume-from another run's checkpoint was reported as this run's ckpt/
        return True

    def train_step(self) -> dict[str, Any]:
        """One optimiser step: LR, this rank's micro-batches, forward/backward, clip, step (or skip on NaN),
        and its loss and gradient norm read back before returning."""
        return self._resolve(self._queue_step())

    def _queue_step(self) -> "_QueuedStep":
        """Queue one optimiser step. Where the optimizer skips a non-finite step on the device (fused AdamW's
        ``found_inf``) the host does not wait: the loss and norm stay on the device until ``_resolve``.
        Elsewhere they are read back first, and the host skips the update on NaN/inf."""
        cfg, rt = self.cfg, self.runtime
        lr = self.set_lr(self.step)
        t0 = time.perf_counter()
        batches = self.train_loader.next_batch()
        loss_t = rt.forward_backward_lazy(batches)
        norm_t = rt.clip_grad_norm_lazy(cfg.grad_clip)
        if self._skips_on_device is None:
            self._skips_on_device = skips_on_device(self.optimizer)
            # collective, same point on every rank: overlap only where all ranks can, or their log collectives
            # and the next step's would cross (pipeline stages with DTensor blocks on one stage, plain on another)
            self._overlap_everywhere = rt.all_reduce_mean(float(self._skips_on_device)) == 1.0
        self.step += 1
        q = _QueuedStep(self.step, lr, t0, loss_t, norm_t)
        if self._skips_on_device:
            self.optimizer.found_inf = (~(torch.isfinite(loss_t) & torch.isfinite(norm_t))).float()  # type: ignore[attr-defined]
            try:
                rt.optimizer_step(self.optimizer)
            finally:
                del self.optimizer.found_inf  # type: ignore[attr-defined]
            return q
        q.loss, q.grad_norm = _read_back(loss_t, norm_t)
        if math.isfinite(q.loss) and math.isfinite(q.grad_norm):
            rt.optimizer_step(self.optimizer)
        else:
            rt.zero_grad(self.optimizer)
        q.done_at = time.perf_counter()
        return q

    def _resolve(self, q: "_QueuedStep") -> dict[str, Any]:
        """Read step ``q``'s loss and norm back (the one host sync of a step), count it against ``nan_policy``,
        and time it: from its start, or from the previous step's read-back when it was queued before that
        (then the interval is what the device took, with the host's work hidden under it)."""
        cfg = self.cfg
        if q.loss is None:
            q.loss, q.grad_norm = _read_back(q.loss_t, q.norm_t)
            q.done_at = time.perf_counter()
        loss, grad_norm = q.loss, q.grad_norm
        start = max(q.t0, self._last_done)
        step_s = q.done_at - start
        self._last_done = q.done_at
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if not finite:
            if cfg.nan_policy == "stop":
                raise NonFiniteLoss(f"step {q.step}: loss={loss} grad_norm={grad_norm} is not finite "
                                    f"(nan_policy='stop'); valid: a lower lr, grad_clip>0, or nan_policy=skip")
            self.skipped_steps += 1
            if self.skipped_steps > cfg.max_skipped:
                raise NonFiniteLoss(f"step {q.step}: {self.skipped_steps} non-finite steps skipped, more than "
                                    f"max_skipped={cfg.max_skipped} (nan_policy='skip'); valid: a lower lr, "
                                    f"grad_clip>0, or a larger max_skipped")
        return {"loss": loss, "grad_norm": grad_norm, "lr": q.lr, "step_s": step_s, "finite": finite, "step": q.step,
                "early_s": start - q.t0}  # queued before the previous read-back: counted in that step's step_s

    def steps(self) -> Iterator[dict[str, Any]]:
        """Train to ``cfg.steps``, yielding each step's ``train_step`` record in order. Where ``may_overlap``
        allows, step N is yielded after step N+1 is queued; otherwise before, so what the caller does with it
        (eval, a checkpoint) sees the weights of step N and nothing later."""
        pending: _QueuedStep | None = None  # queued on the device, read back after the next is queued
        try:
            while self.step < self.cfg.steps and not self._stopping:
                queued = self._queue_step()
                if pending is not None:
                    earlier, pending = pending, None
                    yield self._resolve(earlier)
                if self.may_overlap(queued.step):
                    pending = queued
                else:
                    yield self._resolve(queued)
            if pending is not None:  # a stop agreed while a step was in flight: that step is finished first
                earlier, pending = pending, None
                yield self._resolve(earlier)
        except Exception:
            if pending is not None:  # the last good step keeps its record when the next one fails
                earlier, pending = pending, None
                yield self._resolve(earlier)
            raise

    def may_overlap(self, step: int) -> bool:
        """Whether step ``step``'s read-back may wait until step ``step + 1`` is queued, so the device never
        idles while the host reads, logs and launches the next step. Only where the device itself skips a
        non-finite update (the host's late look changes nothing it would have done: under ``nan_policy: stop``
        the run still stops at step ``step``, with no checkpoint after it), with no per-step statistics that
        the next forward would overwrite (MoE routers, MEFT), and never at a step followed by eval, a
        checkpoint or the end. The same on every rank: the log's collectives must come in the same order."""
        cfg = self.cfg
        if not (self.overlap_readback and self._overlap_everywhere):
            return False
        if self.model_cfg.n_experts or cfg.meft is not None or step >= cfg.steps:
            return False
        return not ((cfg.eval_every > 0 and step % cfg.eval_every == 0) or (cfg.ckpt_every and step % cfg.ckpt_every == 0))

    # ---- the loop --------------------------------------------------------------------------------
    def _open_log(self, resumed: bool, run: "_RunStats") -> Any:
        """Main rank: log.jsonl for this session; on resume the records past the checkpoint are dropped (they
        will be redone) by an atomic rewrite (``run_dir.reopen_log``), and the kept ones seed the summary."""
        if not self.runtime.is_main:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fh, kept = reopen_log(self.out_dir / "log.jsonl", self.step if resumed else None)
        if resumed and self.step >= self.cfg.steps:  # nothing to train: the summary comes from the log
            run.seed_from_log(kept)
        return fh

    def fit(self, resume: bool | str | Path = False, before_steps: Callable[[], None] | None = None) -> dict[str, Any]:
        """Train to ``cfg.steps``; returns (and on the main rank writes) the summary. ``before_steps`` runs once the
        resume has loaded (or there was none): a refused resume must not rewrite the run's files first."""
        try:
            return self._fit(resume, before_steps)
        except BaseException as exc:
            instead = self._stopped_by(exc)
            if instead is None:
                raise
            raise instead from None

    def _fit(self, resume: bool | str | Path, before_steps: Callable[[], None] | None) -> dict[str, Any]:
        resumed = self._resume_for_fit(resume)
        if before_steps is not None:
            before_steps()
        run = _RunStats(first_step=self.step)
        log = self._open_log(resumed, run)
        self._sinks = open_sinks(self.cfg, self.out_dir, to_dict(self.cfg)) if log is not None else Sinks()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="train", unit="step", file=sys.stderr,
                   disable=not (self.cfg.progress and self.runtime.is_main), mininterval=1.0, dynamic_ncols=True)
        self._start_energy()
        try:
            with Preemption(self.runtime.world_size, self.cfg.preempt_signals) as self.preemption:
                for out in self.steps():
                    self._after_step(run, log, bar, out)
                if self._stopping:  # its checkpoint follows: a signal reaching this rank late must not kill it there
                    self.preemption.hold()
        except BaseException as exc:
            self.preemption.release()
            self._complete_save_in_flight(exc)
            raise
        finally:
            bar.close()
            if log is not None:
                log.close()
            self._sinks.close()
            if self.energy is not None:
                self.energy.pause()
        try:
            try:  # the last ckpt_every checkpoint may still be in flight here too (an error in the final eval)
                if run.eval_loss is None and self.cfg.eval_every == 0 and not self._stopping:
                    run.eval_loss = self.evaluate()
                if self.step > run.first_step and self._saved_step != self.step:
                    self.save()
            except BaseException as exc:
                self._complete_save_in_flight(exc)
                raise
            self.wait_for_save()  # the run's last checkpoint is on disk and `latest` names it before fit returns
            if self._stopping and self.runtime.is_main:  # every rank stopped at this step: said once
                self.print(f"stopped at step {self.step} of {self.cfg.steps}: {self.preemption.name} received; "
                           f"checkpoint saved{self.preemption.took()}, continue with `meshwright train ... --resume`")
            return self._finish(run, resumed)  # the summary too: written before a late signal takes effect
        finally:
            self.preemption.release()  # held (a stop): the signals' own handlers again

    def _resume_for_fit(self, resume: bool | str | Path) -> bool:
        resumed = bool(resume) and self.resume(None if resume is True else resume)
        if not resumed:  # a fresh start: the adapter it starts from is recorded (hashed once, rank 0)
            self._settle_init_adapter(None)
        if resume and not resumed and self.runtime.is_main:  # a typo in out_dir, or killed before a checkpoint
            self.print(f"note: --resume found no checkpoint in {self.ckpt_dir}: starting at step 0")
        if resumed and self.runtime.is_main:
            self.print(f"resumed from {self.resumed_from} at step {self.step}")
            if self.step >= self.cfg.steps:
                self.print(f"checkpoint is already at step {self.step} = steps; nothing to train (raise steps=...)")
        return resumed

    def _start_energy(self) -> None:
        if self.cfg.energy:  # each rank meters its own GPU (LOCAL_RANK); sums happen at snapshots
            local = [int(os.environ.get("LOCAL_RANK", "0"))] if torch.cuda.is_available() else None
            self.energy = EnergyAccountant(device_indices=local, nvml="auto" if local is not None else None)
            self.energy.resume()

    def _after_step(self, run: "_RunStats", log: Any, bar: Any, out: dict[str, Any]) -> None:
        """What follows a read-back step: the log record, eval, a checkpoint, the progress bar."""
        cfg, step = self.cfg, out["step"]
        run.record_step(out, self.tokens_per_step, step)
        if not self._stopping and step < cfg.steps and self.preemption.agreed():
            self._stopping = True  # steps() finishes the step in flight, if any; fit() saves after it
        is_eval = cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.steps)
        will_log = (step % cfg.log_every == 0 or step == run.first_step + 1 or step == cfg.steps
                    or is_eval or not out["finite"] or self._stopping)  # the log ends where the checkpoint is
        # collective on every rank; read before eval so router stats describe the training batch
        extra = self._extra_log_fields() if will_log else {}
        if is_eval:
            run.eval_loss = self.evaluate()
        if will_log:
            rec = self._log_record(run, out, extra, is_eval)
            run.records.append(rec)
            if log is not None:
                log.write(json.dumps(rec) + "\n")
                log.flush()
                self._sinks.write(rec)  # TensorBoard / W&B, when the config switches them on
            run.interval_s, run.interval_tokens = 0.0, 0
        fault_point("step")
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
            self.save()  # never overlapped (may_overlap): self.step == step, nothing else queued
        if step > run.first_step + 1:  # the first step pays one-off costs
            self._check_grace(out["step_s"])
        bar.set_postfix(loss=f"{run.loss:.3f}", lr=f"{run.lr:.2e}", refresh=False)
        bar.update(1)

    def _check_grace(self, step_s: float) -> None:
        """``preempt_grace_s``: once a stop (steps to the boundary + the last checkpoint's time, write included:
        a stop waits for it) would not fit, warn once and ask every rank for stops decided in the same step."""
        self._slowest_step_s = max(self._slowest_step_s, step_s)
        if self.async_ckpt is not None and self.async_ckpt.last is not None:
            self._ckpt_s = self.async_ckpt.last.write_s
        if self._grace_warned:
            return
        steps = self.preemption.steps_to_boundary(self.overlap_readback and self._overlap_everywhere)
        line = grace_warning(self.cfg.preempt_grace_s, self._slowest_step_s, self._ckpt_s, steps,
                             sooner=self.preemption.world_size > 1 and not self.preemption.eager,
                             ckpt_async=self.async_ckpt is not None)
        if line is None:
            return
        self._grace_warned = True
        self.preemption.want_eager = True
        if self.runtime.is_main:
            self.print(line)

    def _log_record(self, run: "_RunStats", out: dict[str, Any], extra: dict[str, Any], is_eval: bool) -> dict[str, Any]:
        cfg = self.cfg
        # seq_len on every record: a resume may change it (--allow-config-change), and losses at another length are
        # another series (tools/report.py draws them apart)
        rec = {"step": out["step"], "loss": _finite(out["loss"]), "lr": out["lr"], "grad_norm": _finite(out["grad_norm"]),
               "tokens": self.tokens_at(out["step"]), "seq_len": cfg.seq_len,
               "step_s": run.interval_s / max(run.interval_tokens / self.tokens_per_step, 1),
               **self.throughput(run.interval_tokens, run.interval_s)}
        if out["step"] % cfg.energy_every == 0 or out["step"] == cfg.steps:  # same steps on every rank
            rec.update(self._energy_snapshot(run.energy_last))
        rec["memory_gib"] = self._memory_per_rank()
        rec.update(self._tokens_per_source(out["step"]))
        rec.update(extra)
        if is_eval and run.eval_loss is not None:
            rec["eval_loss"] = run.eval_loss
            if self.eval_per_source is not None:
                rec["eval_loss_per_source"] = self.eval_per_source
        if not out["finite"]:
            rec["skipped"] = True
        return rec

    def _consumed_at(self, step: int) -> int:
        """The train loader's position after ``step`` steps."""
        return self._base_consumed + (step - self._base_step) * self.cfg.global_batch

    def tokens_at(self, step: int) -> int:
        """Training tokens after ``step`` steps, earlier sessions' (another seq_len or global_batch) included."""
        return self.train_loader.tokens_at(self._consumed_at(step))

    def _tokens_per_source(self, step: int) -> dict[str, Any]:
        """A mixture's tokens per source after ``step`` steps (closed form: data/blend.py), for the log and summary."""
        per_source = getattr(self.train_loader, "tokens_per_source", None)
        if per_source is None:
            return {}
        return {"tokens_per_source": per_source(self._consumed_at(step))}

    def _finish(self, run: "_RunStats", resumed: bool) -> dict[str, Any]:
        """The run's summary (throughput over steady-state steps, memory, energy); written by the main rank."""
        cfg, rt = self.cfg, self.runtime
        steady_s, steady_tokens = run.steady_s, run.steady_tokens
        if steady_s == 0.0:  # a single step this session: report it rather than nothing
            steady_s = sum(r["step_s"] for r in run.records[-1:])
            steady_tokens = self.tokens_per_step * (self.step - run.first_step)
        summary = {
            "model": self.model_cfg.name, "params": self.model_cfg.num_params(), "steps": self.step,
            "stopped_by": self.preemption.name if self._stopping else None,
            "steps_this_run": self.step - run.first_step, "tokens": self.tokens_at(self.step), "seq_len": cfg.seq_len,
            "train_s": steady_s, "step_s": steady_s / max(steady_tokens / self.tokens_per_step, 1),
            "world_size": rt.world_size, "dp_size": rt.dp_size, "dtype": cfg.dtype, "compute_dtype": rt.compute_dtype,
            "flops_per_token": self.flops_per_token,
            "peak_tflops_per_device": self.cluster.peak_flops(rt.compute_dtype) / 1e12,
            **self.throughput(steady_tokens, steady_s),
            "first_loss": run.first_loss, "final_loss": run.last_loss, "eval_loss": run.eval_loss,
            "skipped_steps": self.skipped_steps, "resumed": resumed, "flops_convention": cfg.flops_convention,
            "hw_flops_per_token": self.hw_flops_per_token,
            # LoRA: flops_per_token / mfu count the executed step; these, full training's 6N count (docs/finetune.md)
            **({"flops_definition": "lora_executed", "full_flops_per_token": self.full_flops_per_token,
                "mfu_full": compute_mfu(steady_tokens / steady_s if steady_s > 0 else 0.0, self.full_flops_per_token,
                                        self.cluster, rt.compute_dtype, max(rt.world_size, 1))}
               if self.lora_flops else {}),
            "init": getattr(rt, "init", None),  # the initial weights: stream | keyed draws, or pretrained (init_from)
        }
        summary.update(self._tokens_per_source(self.step))
        if self.eval_per_source is not None:
            summary["eval_loss_per_source"] = self.eval_per_source
        memory = self._memory_per_rank()
        summary.update({"memory_gib_per_rank": memory, "peak_memory_gib": max(memory)})
        if torch.cuda.is_available():  # same ranks on every rank: the gather is collective
            summary["peak_reserved_gib"] = max(self._memory_per_rank(reserved=True))
        summary.update(self._energy_summary(run))
        # a run killed after its final checkpoint gets its summary when resumed
        if rt.is_main and (summary["steps_this_run"] > 0 or (resumed and not (self.out_dir / "summary.json").is_file())):
            tmp = self.out_dir / "summary.json.tmp"  # atomic: a kill never leaves half a summary
            tmp.write_text(json.dumps(summary, indent=1) + "\n")
            os.replace(tmp, self.out_dir / "summary.json")
            self.print(format_summary(summary))
        return summary

    def _energy_summary(self, run: "_RunStats") -> dict[str, Any]:
        """Energy of all ranks over this session's training windows (collective); {} when metering is off."""
        if self.energy is None:
            return {}
        rt = self.runtime
        totals = self.energy.close()
        world = max(rt.world_size, 1)
        summed = {k: rt.all_reduce_mean(getattr(totals, k)) * world for k in ("gpu_j", "cpu_j", "ram_j")}
        all_ranks = EnergyTotals(**summed, seconds=totals.seconds, gpu_source=totals.gpu_source)
        tokens = max(self.tokens_per_step * (self.step - run.first_step), 1)
        self.energy = None
        return all_ranks.as_dict(tokens, self.cfg.pue, self.cfg.grid_intensity)


@dataclass
class _QueuedStep:
    """An optimiser step queued on the device: its loss and gradient norm still there (``loss`` None) or
    already read back (``loss``, ``grad_norm``, ``done_at`` set)."""

    step: int
    lr: float
    t0: float
    loss_t: torch.Tensor
    norm_t: torch.Tensor
    loss: float | None = None
    grad_norm: float | None = None
    done_at: float = 0.0


@dataclass
class _RunStats:
    """What ``fit`` accumulates over one session: losses, log-interval and steady-state timings, records."""

    first_step: int
    first_loss: float | None = None
    last_loss: float | None = None
    eval_loss: float | None = None
    loss: float = math.nan
    lr: float = 0.0
    interval_s: float = 0.0
    interval_tokens: int = 0
    steady_s: float = 0.0
    steady_tokens: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    energy_last: dict[str, float] = field(default_factory=dict)

    def seed_from_log(self, kept: list[dict[str, Any]]) -> None:
        """Losses of the records kept from an earlier session, for a summary when nothing is left to train."""
        losses = [r["loss"] for r in kept if r.get("loss") is not None]
        if losses:
            self.first_loss, self.last_loss = losses[0], losses[-1]
        evals = [r["eval_loss"] for r in kept if r.get("eval_loss") is not None]
        self.eval_loss = evals[-1] if evals else None
        self.records.extend(kept[-1:])

    def record_step(self, out: dict[str, Any], tokens: int, step: int) -> None:
        self.loss, self.lr = out["loss"], out["lr"]
        if out["finite"]:
            self.first_loss = out["loss"] if self.first_loss is None else self.first_loss
            self.last_loss = out["loss"]
        self.interval_s += out["step_s"]
        self.interval_tokens += tokens
        if step > self.first_step + 1:  # the first step pays one-off allocation costs
            self.steady_s += out["step_s"]
            if step == self.first_step + 2:  # its start was counted in the first step's interval (overlapped)
                self.steady_s += out.get("early_s", 0.0)
            self.steady_tokens += tokens


def format_summary(s: dict[str, Any]) -> str:
    def num(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    return (f"summary: {s['model']} ({s['params'] / 1e6:.2f}M params), {s['steps']} steps, {s['tokens']:,} tokens | "
            f"{s['tokens_per_s']:,.0f} tokens/s ({s['tokens_per_s_per_device']:,.0f}/device) | "
            f"{s['tflops_per_device'] * 1e3:.1f} GFLOP/s/device | MFU {100 * s['mfu']:.1f}% "
            + (f"(LoRA step's FLOPs; {100 * s['mfu_full']:.1f}% counting full training's) " if "mfu_full" in s else "")
            + f"of "
            f"{s['peak_tflops_per_device'] * 1e3:.0f} GFLOP/s {s.get('compute_dtype', s['dtype'])} peak | "
            f"loss {num(s['first_loss'], '.3f')} -> {num(s['final_loss'], '.3f')} | eval loss {num(s['eval_loss'], '.3f')}"
            + (f" | energy {s['energy_j']:,.0f} J ({s['j_per_token'] * 1e3:.2f} mJ/token, GPU: {s['energy_gpu_source']}), "
               f"{s['co2_kg'] * 1e3:.3f} gCO2e" if s.get("energy_j") is not None else ""))
