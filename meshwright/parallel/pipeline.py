"""Pipeline parallelism with ``torch.distributed.pipelining``: cut stages, build the schedule.

Stages are cut from the plain model at the Plan's boundaries by deleting the other layers from the
ModuleDict and dropping the embedding (all but the first stage) and the head (all but the last),
torchtitan's convention: parameter names stay those of the plain model, so checkpoints reshard.
With ``interleaved_1f1b`` each rank holds ``virtual_stages`` chunks: stage ``pp_rank + k*pp``.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from meshwright.errors import invalid
from meshwright.models.decoder import Decoder

# torch.distributed.pipelining imports torch._dynamo, inductor and triton (~3 s of CPU per process): it is imported by
# build_schedule, i.e. only by ranks that pipeline (pp > 1), not by every rank that imports the runtime.
SCHEDULE_CLASSES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B"}


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
                   pp_group: dist.ProcessGroup):
    """The torch pipelining schedule running ``chunks`` (stage ``ids``) over ``pp_group``."""
    if schedule not in SCHEDULE_CLASSES:
        raise invalid("pipeline.schedule", schedule, ", ".join(SCHEDULE_CLASSES))
    from torch.distributed import pipelining

    stages = [pipelining.PipelineStage(c, i, n_stages, device, group=pp_group) for c, i in zip(chunks, ids)]
    cls = getattr(pipelining, SCHEDULE_CLASSES[schedule])
    if schedule == "interleaved_1f1b":
        return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
    return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
