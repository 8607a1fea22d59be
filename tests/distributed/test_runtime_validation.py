"""One-process checks of the runtime's validation, recomputation bytes and DeepSpeed config (no torchrun)."""

from __future__ import annotations

import types

import pytest
import torch

from meshwright.config import load_model_config
from meshwright.errors import ConfigError
from meshwright.memory.accounting import count_saved_bytes
from meshwright.models import build_model, lm_loss
from meshwright.parallel.deepspeed_backend import deepspeed_config
from meshwright.parallel.recompute import apply_recompute
from meshwright.parallel.runtime import build_distributed_runtime
from meshwright.parallel.support import check_runtime_support
from meshwright.plan import plan_from_dict, validate_plan

CFG = load_model_config({"name": "t", "vocab_size": 256, "d_model": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
                         "ffn_hidden": 128, "max_seq_len": 64})


def _plan(**kw):
    base = {"seq_len": 16, "global_batch": 8, "micro_batch": 2, "layers": [{"repeat": 4}]}
    return plan_from_dict({**base, **kw})


@pytest.mark.parametrize("kw, world, tp_backend, dp_backend, match", [
    ({"layers": [{"tp": 3, "repeat": 4}]}, 3, "dtensor", "torch", r"^layers\[0\]\.tp=3 is invalid; valid: a divisor of n_heads=4"),
    ({"layers": [{"tp": 2, "repeat": 4}]}, 4, "dtensor", "torch", r"^layers\[0\]: tp\*dp\*cp = 2\*1\*1 = 2 but each pipeline stage has 4 devices"),
    ({"pipeline": {"degree": 3}, "layers": [{"repeat": 4}]}, 2, "dtensor", "torch", r"^pipeline\.degree=3 is invalid; valid: a divisor of world size 2"),
    ({"pipeline": {"degree": 2, "microbatches": 3}, "layers": [{"repeat": 4}]}, 2, "dtensor", "torch", r"^pipeline\.microbatches=3 is invalid; valid: 4"),
    ({"layers": [{"tp": 2, "sp": True, "repeat": 4}]}, 2, "megatron", "torch", r"^layers\[0\]\.sp=True is invalid; valid: false with tp_backend=megatron"),
    ({"layers": [{"tp": 2, "zero": 1, "repeat": 4}]}, 2, "dtensor", "torch", r"^layers\[0\]\.zero=1 is invalid"),
    ({"layers": [{"tp": 2, "repeat": 4}]}, 2, "dtensor", "deepspeed", r"^dp_backend='deepspeed' is invalid"),
    ({"layers": [{"dp": 2, "zero": 1, "repeat": 2}, {"dp": 2, "zero": 3, "repeat": 2}]}, 2, "dtensor", "deepspeed", r"^layers\[\*\]\.zero="),
    ({"embedding": {"tp": 2}, "layers": [{"dp": 2, "repeat": 4}]}, 2, "dtensor", "torch", r"^embedding\.tp=2 is invalid"),
    ({"layers": [{"dp": 2, "repeat": 4}]}, 2, "jax", "torch", r"^tp_backend='jax' is invalid; valid: dtensor, megatron"),
])
def test_invalid_plans_fail_with_one_line(kw, world, tp_backend, dp_backend, match) -> None:
    plan = _plan(**kw)
    with pytest.raises(ConfigError, match=match) as e:
        validate_plan(plan, CFG, world)
        check_runtime_support(plan, CFG, tp_backend, dp_backend)
    assert "\n" not in str(e.value)


def test_valid_layerwise_plan_passes() -> None:
    plan = _plan(layers=[{"tp": 2}, {"dp": 2, "zero": 3}, {"dp": 2, "zero": 2}, {"tp": 2, "sp": True}])
    validate_plan(plan, CFG, 2)
    check_runtime_support(plan, CFG, "dtensor", "torch")


def _saved(mode: str) -> int:
    model = build_model(CFG, seed=0)
    for block in model.layers.values():
        apply_recompute(block, mode)
    x = torch.randint(0, 256, (2, 16))
    with count_saved_bytes(model) as sb:
        loss = lm_loss(model(x), x)
    loss.backward()
    return sb.total


def test_recompute_saves_fewer_bytes_and_same_grads() -> None:
    none, sel, full = _saved("none"), _saved("selective"), _saved("full")
    # selective checkpointing stashes matmul outputs in its own frame, which saved_tensors_hooks do
    # not see: the metric shows what autograd keeps outside the checkpointed regions
    assert full <= sel < none and full < none / 4, (none, sel, full)
    grads = []
    for mode in ("none", "full", "selective"):
        model = build_model(CFG, seed=0)
        for block in model.layers.values():
            apply_recompute(block, mode)
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        lm_loss(model(x), x).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert torch.allclose(grads[0], grads[2], rtol=1e-5, atol=1e-7)
    assert set(dict(build_model(CFG, seed=0).named_parameters())) == set(dict(model.named_parameters()))


def test_deepspeed_config_is_fp32_zero_with_torch_optimizer() -> None:
    cfg = deepspeed_config(3, micro_batch=2, grad_accum=2, dp=2)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["train_batch_size"] == 8
    assert cfg["zero_allow_untested_optimizer"] and not cfg["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="^zero=0 is invalid"):
        deepspeed_config(0, 1, 1, 1)


@pytest.mark.parametrize("field, value, match", [
    ("loss_chunk_tokens", 8, r"^loss_chunk_tokens=8 is invalid; valid: 0 with dp_backend=deepspeed .*or dp_backend=torch$"),
    ("compile", True, r"^compile=True is invalid; valid: false with dp_backend=deepspeed"),
])
def test_deepspeed_refuses_chunked_loss_and_compile_before_any_group(field, value, match) -> None:
    """The chunked loss runs under dp_backend=torch (every layout, tests/distributed/fullspeed_2rank.py); the DeepSpeed
    engine wraps the model and its head, so it is refused there, in one line and before a process group is made."""
    train_cfg = types.SimpleNamespace(**{"dp_backend": "deepspeed", "compile": False, "loss_chunk_tokens": 0, field: value})
    with pytest.raises(ConfigError, match=match) as e:
        build_distributed_runtime(train_cfg, CFG, _plan(layers=[{"dp": 2, "zero": 3, "repeat": 4}]))
    assert "\n" not in str(e.value)
    assert not torch.distributed.is_initialized()
