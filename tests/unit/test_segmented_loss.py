"""Segmented LM head + cross entropy: same loss and gradients as the full logits, fewer saved bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meshwright.config import ModelConfig
from meshwright.errors import ConfigError
from meshwright.memory.accounting import count_saved_bytes
from meshwright.memory.segmented_loss import segmented_cross_entropy, segmented_lm_loss
from meshwright.models import build_model, lm_loss


@pytest.mark.parametrize("chunk", [1, 7, 40, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_loss_and_grads_equal_unsegmented(chunk, bias):
    head = nn.Linear(16, 50, bias=bias)
    h = torch.randn(2, 20, 16, requires_grad=True)
    y = torch.randint(0, 50, (2, 20))
    y[0, 3] = y[1, 7] = -100  # ignored positions
    ref = F.cross_entropy(head(h).flatten(0, 1), y.flatten(), ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, [h, *head.parameters()])
    got = segmented_cross_entropy(h, head, y, chunk_size=chunk)
    got_grads = torch.autograd.grad(got, [h, *head.parameters()])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


def test_model_loss_and_parameter_grads_equal_lm_loss():
    cfg = ModelConfig(name="t", d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, max_seq_len=64)
    a, b = build_model(cfg, seed=0), build_model(cfg, seed=0)
    x, y = torch.randint(0, 256, (2, 64)), torch.randint(0, 256, (2, 64))
    la, lb = lm_loss(a(x), y), segmented_lm_loss(b, x, y, chunk_size=24)
    torch.testing.assert_close(lb, la, atol=1e-6, rtol=1e-6)
    la.backward()
    lb.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-7, rtol=1e-5, msg=n)


def test_full_logits_are_never_saved():
    head = nn.Linear(32, 1000, bias=False)
    h = torch.randn(1, 256, 32, requires_grad=True)
    y = torch.randint(0, 1000, (1, 256))
    with count_saved_bytes(head) as full:
        F.cross_entropy(head(h).flatten(0, 1), y.flatten())
    with count_saved_bytes(head) as seg:
        segmented_cross_entropy(h, head, y, chunk_size=64)
    logits_bytes = 256 * 1000 * 4
    assert full.total >= logits_bytes  # log-softmax of all logits is kept
    assert seg.total < logits_bytes / 20  # hidden (256x32 floats), targets, count
    assert seg.total == h.numel() * 4 + y.numel() * 8 + 8


def test_bad_chunk_and_shape_are_one_line_errors():
    head = nn.Linear(8, 10)
    h, y = torch.randn(2, 4, 8), torch.randint(0, 10, (2, 4))
    for bad in (0, -3, 2.5):
        with pytest.raises(ConfigError, match=r"lemo.loss_chunk=.* is invalid; valid: a positive integer"):
            segmented_cross_entropy(h, head, y, chunk_size=bad)
    with pytest.raises(ConfigError, match="targets.shape"):
        segmented_cross_entropy(h, head, y[:, :3], chunk_size=2)
