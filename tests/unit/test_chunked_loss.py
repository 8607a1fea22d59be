"""The chunked loss (models/chunked_loss.py): the plain loss's value and gradients (within 1e-5 relative,
fp32), and the tokens x vocab logits are never saved for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _train_helpers import MICRO
from meshwright.memory.accounting import count_saved_bytes
from meshwright.models import build_model, lm_loss
from meshwright.models.chunked_loss import chunked_lm_loss
from meshwright.train.local_runtime import LocalRuntime

B, S, D, V = 2, 24, 32, 300


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(D, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g) * 0.1)
    h = torch.randn(B, S, D, generator=g, requires_grad=True)
    t = torch.randint(0, V, (B, S), generator=g)
    return head, h, t


@pytest.mark.parametrize("chunk", [7, 16, 48, 1000])
def test_value_and_grads_equal_the_plain_loss(chunk: int) -> None:
    head, h, t = _inputs()
    plain = lm_loss(head(h), t)
    gh, gw = torch.autograd.grad(plain, (h, head.weight))
    chunked = chunked_lm_loss(h, head, t, chunk)
    ch, cw = torch.autograd.grad(chunked, (h, head.weight))
    assert abs(float(chunked) - float(plain)) <= 1e-5 * abs(float(plain))
    assert rel(ch, gh) <= 1e-5 and rel(cw, gw) <= 1e-5


def test_logits_are_not_saved_for_backward() -> None:
    head, h, t = _inputs()
    logits_bytes = B * S * V * 4
    with count_saved_bytes(head) as plain:
        lm_loss(head(h), t).backward()
    with count_saved_bytes(head) as chunked:
        chunked_lm_loss(h, head, t, 8).backward()
    assert plain.total >= logits_bytes  # the plain loss keeps (at least) the fp32 logits
    assert chunked.total < B * S * V  # not even one byte per logit: only token-sized tensors at most
    with pytest.raises(ValueError, match="chunk_tokens=0 is invalid"):
        chunked_lm_loss(h, head, t, 0)


def test_local_runtime_with_chunked_loss_matches_plain_and_saves_less() -> None:
    cfg = dict(MICRO)
    x = torch.randint(0, cfg["vocab_size"], (2, 33), generator=torch.Generator().manual_seed(1))
    batch = [(x[:, :-1], x[:, 1:])]
    out = {}
    for chunk in (0, 16):
        rt = LocalRuntime(build_model(cfg, seed=4), loss_chunk_tokens=chunk)
        with count_saved_bytes(rt.model) as sb:
            loss = rt.forward_backward(batch)
        out[chunk] = (loss, {n: p.grad.clone() for n, p in rt.model.named_parameters()}, sb.total,
                      rt.eval_loss(batch))
    (l0, g0, s0, e0), (l1, g1, s1, e1) = out[0], out[16]
    assert abs(l1 - l0) <= 1e-5 * abs(l0) and abs(e1 - e0) <= 1e-5 * abs(e0)
    assert max(rel(g1[n], g0[n]) for n in g0) <= 1e-5
    # the plain loss saves one fp32 tokens x vocab tensor (log-softmax); the chunked one saves a few scalars instead
    assert s0 - s1 >= 0.99 * 2 * 32 * cfg["vocab_size"] * 4
