"""pipeline.stage_io and FixedOutput: each stage's input/output declared up front as meta tensors (what
``PipelineStage(input_args=, output_args=)`` takes instead of a shape-inference forward), and a stage held to them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meshwright.errors import ConfigError
from meshwright.parallel.pipeline import FixedOutput, stage_io


def test_stage_io_chains_the_stages_on_meta_tensors() -> None:
    tokens = torch.zeros(2, 16, dtype=torch.long)  # one micro-batch of token ids
    io = stage_io(tokens, 64, [torch.bfloat16, torch.float32], [False, True], 256, torch.bfloat16)
    assert len(io) == 3
    assert all(t.device.type == "meta" and t.is_contiguous() for s in io for t in (s.input, s.output))
    assert (io[0].input.shape, io[0].input.dtype, io[0].input.requires_grad) == ((2, 16), torch.long, False)
    # stage i's input is stage i-1's output: same shape, dtype and (torch 2.13 sends input grads for these) grad flag
    for prev, nxt in zip(io, io[1:]):
        assert nxt.input is prev.output
    assert [(s.output.dtype, s.output.requires_grad) for s in io[:2]] == [(torch.bfloat16, False), (torch.float32, True)]
    assert io[1].output.shape == (2, 16, 64)
    assert (io[2].output.shape, io[2].output.dtype) == ((2, 16, 256), torch.bfloat16)


class Twice(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], dim=-1).transpose(0, 1).transpose(0, 1)


def test_fixed_output_casts_a_dtype_it_was_not_told_and_refuses_a_shape() -> None:
    declared = torch.empty(2, 3, 8, device="meta", dtype=torch.bfloat16)
    stage = FixedOutput(Twice(), 1, declared)
    out = stage(torch.randn(2, 3, 4))
    assert out.dtype == torch.bfloat16 and out.is_contiguous() and stage.casts == 1
    with pytest.raises(ConfigError, match=r"^pipeline stage 1 output shape=\(2, 5, 8\) is invalid; valid: \(2, 3, 8\)"):
        stage(torch.randn(2, 5, 4))
    same = FixedOutput(Twice(), 0, torch.empty(2, 3, 8, device="meta"))
    same(torch.randn(2, 3, 4))
    assert same.casts == 0
