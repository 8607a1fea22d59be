"""LoRA adapters: start equal to the base, train only the adapters, keep parameter names."""

from __future__ import annotations

import pytest
import torch

from meshwright.config import ModelConfig
from meshwright.errors import ConfigError
from meshwright.memory.lora import LoRALinear, apply_lora, lora_parameters
from meshwright.models import build_model, lm_loss

CFG = ModelConfig(name="t", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)


def test_adapted_model_starts_bit_identical_and_keeps_names():
    base, lora = build_model(CFG, seed=0), build_model(CFG, seed=0)
    names = set(lora.state_dict())
    adapted = apply_lora(lora, rank=4)
    assert len(adapted) == 4 * CFG.n_layers and all(isinstance(lora.get_submodule(n), torch.nn.Linear) for n in adapted)
    assert names < set(lora.state_dict())
    assert base.load_state_dict(lora.state_dict(), strict=False).unexpected_keys  # only lora_A/B extra
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(base(x), lora(x))


def test_only_adapters_train_and_count_is_rank_times_in_plus_out():
    m = build_model(CFG, seed=0)
    apply_lora(m, rank=4, targets=("wq", "wv"))
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(m)}
    d, kv = CFG.d_model, CFG.kv_heads * CFG.head_dim
    assert sum(p.numel() for p in trainable) == CFG.n_layers * 4 * ((d + d) + (d + kv))
    opt = torch.optim.SGD(trainable, lr=0.5)
    x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for _ in range(2):
        opt.zero_grad()
        lm_loss(m(x), y).backward()
        opt.step()
    for n, p in m.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == ("lora_" in n), n


def test_lora_linear_matches_explicit_low_rank_update():
    m = build_model(CFG, seed=0)
    apply_lora(m, rank=2, alpha=4.0)
    wq = m.layers["0"].attention.wq
    assert isinstance(wq, LoRALinear)
    with torch.no_grad():
        wq.lora_B.normal_()
    x = torch.randn(3, CFG.d_model)
    merged = wq.weight + 2.0 * wq.lora_B @ wq.lora_A
    torch.testing.assert_close(wq(x), x @ merged.t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, field", [({"rank": 0}, "lora.rank"), ({"rank": 100}, "lora.rank"),
                                           ({"rank": 2, "targets": ("nope",)}, "lora.targets"),
                                           ({"rank": 2, "alpha": -1.0}, "lora.alpha")])
def test_bad_arguments_are_one_line_errors(kwargs, field):
    with pytest.raises(ConfigError) as exc:
        apply_lora(build_model(CFG, seed=0), **kwargs)
    assert str(exc.value).startswith(field) and "\n" not in str(exc.value)
