"""Pipeline parallelism with ``torch.distributed.pipelining``: cut stages, build the schedule.

Stages are cut from the plain model at the Plan's boundaries by deleting the other layers from the
ModuleDict and dropping the embedding (all but the first stage) and the head (all but the last),
torchtitan's convention: parameter names stay those of the plain model, so checkpoints reshard.
With ``interleaved_1f1b`` each rank holds ``virtual_stages`` chunks: stage ``pp_rank + k*pp``.

Every stage is built with its input and output fixed up front (``StageIO``: meta tensors, from the micro-batch's
shape and the precision policy, never from a forward): given neither, torch's ``PipelineStage`` infers them at a
stage's first step by a real forward (torch 2.13: and an input-only backward) on an uninitialised buffer, which runs
the stage's collectives (ep all-to-alls, tp all-reduces) on garbage and moves whatever a forward updates (router
statistics, FP8 amax histories, LeMo predictors). ``FixedOutput`` holds each stage to its declared output.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from meshwright.errors import invalid
from meshwright.models.decoder import Decoder

# torch.distributed.pipelining imports torch._dynamo, inductor and triton (~3 s of CPU per process): it is imported by
# build_schedule, i.e. only by ranks that pipeline (pp > 1), not by every rank that imports the runtime.
SCHEDULE_CLASSES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B"}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageIO:
    """One stage's positional input and output as meta tensors (shape, dtype, contiguous strides, requires_grad):
    what ``PipelineStage(input_args=, output_args=)`` takes instead of inferring them by a forward."""

    input: torch.Tensor
    output: torch.Tensor


def meta(shape: Sequence[int], dtype: torch.dtype, requires_grad: bool = False) -> torch.Tensor:
    """A contiguous meta tensor: no storage, no compute."""
    return torch.empty(tuple(shape), dtype=dtype, device="meta", requires_grad=requires_grad and dtype.is_floating_point)


def stage_io(tokens: torch.Tensor, d_model: int, boundary_dtypes: Sequence[torch.dtype],
             boundary_grads: Sequence[bool], last_width: int, last_dtype: torch.dtype) -> list[StageIO]:
    """Every stage's ``StageIO`` of a pipeline of ``len(boundary_dtypes) + 1`` stages on micro-batches of
    ``tokens`` (one micro-batch's token ids, any device): stage 0 takes them, stage i > 0 the hidden states
    (mb, seq, ``d_model``) stage i-1 returns in ``boundary_dtypes[i-1]`` (requiring grad where
    ``boundary_grads[i-1]``: torch 2.13 sends input gradients only for those); the last stage returns
    (mb, seq, ``last_width``) in ``last_dtype`` (logits, or the hidden states its loss applies the head to). All
    contiguous: the schedule's micro-batches must be too (torch 2.11 compares stage 0's inputs' strides, and every
    stage's outputs', with the declared ones at each forward; ``FixedOutput`` makes outputs contiguous)."""
    mb_seq = tuple(tokens.shape)
    n = len(boundary_dtypes) + 1
    hidden = [meta((*mb_seq, d_model), dt, rg) for dt, rg in zip(boundary_dtypes, boundary_grads)]
    out = []
    for i in range(n):
        inp = meta(mb_seq, tokens.dtype) if i == 0 else hidden[i - 1]
        last = meta((*mb_seq, last_width), last_dtype, True)
        out.append(StageIO(inp, hidden[i] if i < n - 1 else last))
    return out


class FixedOutput(nn.Module):
    """Holds a stage to its declared output: the next stage received into a buffer of that shape and dtype, so a
    shape that differs is an error here (not a size mismatch, or a hang, inside the p2p transport), and a dtype
    that differs (a layout the dtype rule of ``DistributedRuntime._stage_io`` does not know) is cast to the declared
    one, with a warning, and counted in ``casts``."""

    def __init__(self, module: nn.Module, stage: int, declared: torch.Tensor) -> None:
        super().__init__()
        self.module = module
        self.stage = stage
        self.declared = declared
        self.casts = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        if out.shape != self.declared.shape:
            raise invalid(f"pipeline stage {self.stage} output shape", tuple(out.shape),
                          f"{tuple(self.declared.shape)}, the shape declared to the next stage (micro-batch, "
                          "sequence, width): every micro-batch of a step must have one shape")
        if out.dtype != self.declared.dtype:
            if not self.casts:
                log.warning("pipeline stage %d returns %s where %s was declared: cast (a precision layout the "
                            "stage dtype rule does not know)", self.stage, out.dtype, self.declared.dtype)
            self.casts += 1
            out = out.to(self.declared.dtype)
        return out.contiguous()


def stage_ids(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """Stage indices held by ``pp_rank`` (looped placement, as interleaved 1F1B expects)."""
    return [pp_rank + k * pp for k in range(virtual_stages)]


def cut_stage(model: Decoder, start: int, end: int, first: bool, last: bool) -> Decoder:
    """A copy of ``model`` holding layers [start, end) only, the embedding iff first, the head iff last."""
    stage = copy.deepcopy(model)
    for name in list(stage.layers.keys()):
        if not start <= int(name) < end:
            del stage.layers[name]
    if not first:
        stage.tok_embeddings = None
        stage.pos_embeddings = None
    if not last:
        stage.norm = None
        stage.output = None
    return stage


class HiddenOutput(nn.Module):
    """The last stage returning its final hidden states (``return_hidden``): the schedule's ``loss_fn`` then
    applies the head with the loss (compiled together, or chunked). Holds the chunk as a submodule only for
    the schedule; names, state dicts and optimizers keep using the chunk itself."""

    def __init__(self, chunk: Decoder) -> None:
        super().__init__()
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chunk(x, return_hidden=True)


def build_schedule(chunks: list[nn.Module], ids: list[int], n_stages: int, schedule: str, n_microbatches: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device,
                   pp_group: dist.ProcessGroup, io: Sequence[StageIO] | None = None):
    """The torch pipelining schedule running ``chunks`` (stage ``ids``) over ``pp_group``. ``io``: every stage's
    ``StageIO`` (indexed by stage id; ``stage_io``): each chunk runs in a ``FixedOutput`` and no stage infers
    shapes by a forward. None: torch infers them at the first step (a forward, torch 2.13 also an input-only
    backward, on an uninitialised buffer) -- for callers that cannot know them up front."""
    if schedule not in SCHEDULE_CLASSES:
        raise invalid("pipeline.schedule", schedule, ", ".join(SCHEDULE_CLASSES))
    if io is not None and len(io) != n_stages:
        raise invalid("pipeline stage io", f"{len(io)} stages", f"one StageIO per stage ({n_stages})")
    from torch.distributed import pipelining

    if io is None:
        stages = [pipelining.PipelineStage(c, i, n_stages, device, group=pp_group) for c, i in zip(chunks, ids)]
    else:
        stages = [pipelining.PipelineStage(FixedOutput(c, i, io[i].output), i, n_stages, device,
                                           input_args=io[i].input, output_args=io[i].output, group=pp_group)
                  for c, i in zip(chunks, ids)]
    cls = getattr(pipelining, SCHEDULE_CLASSES[schedule])
    if schedule == "interleaved_1f1b":
        return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
    return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
