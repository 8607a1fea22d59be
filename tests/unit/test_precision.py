"""The precision policy (train/precision.py): what `dtype` means, that LocalRuntime honours it on CPU,
and that MFU is computed against the peak of the dtype the matmuls actually ran in."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from _train_helpers import MICRO, make_trainer, prepared_corpus
from meshwright.config import load_cluster, load_train_config
from meshwright.errors import ConfigError
from meshwright.models import build_model
from meshwright.train.build import build_runtime
from meshwright.train.local_runtime import LocalRuntime
from meshwright.train.precision import PrecisionPolicy, apply_autocast


def test_policy_from_dtype() -> None:
    fp32 = PrecisionPolicy.from_dtype("fp32")
    assert not fp32.mixed and fp32.fsdp_policy() is None and fp32.deepspeed_sections()["bf16"] == {"enabled": False}
    bf16 = PrecisionPolicy.from_dtype("bf16")
    assert (bf16.param_dtype, bf16.compute_dtype, bf16.reduce_dtype, bf16.master_dtype) == ("bf16", "bf16", "fp32", "fp32")
    mp = bf16.fsdp_policy()
    assert mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32
    assert bf16.deepspeed_sections()["bf16"] == {"enabled": True}
    with pytest.raises(ConfigError, match=r"dtype='fp8' is invalid; valid: fp32 \| bf16"):
        PrecisionPolicy.from_dtype("fp8")


def _linear_out_dtypes(model: nn.Module, run) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda _m, _a, out: seen.add(out.dtype)) for m in model.modules()
             if isinstance(m, nn.Linear)]
    run()
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_local_runtime_matmuls_run_in_the_policy_dtype_on_cpu(dtype: str, expected: torch.dtype) -> None:
    rt = LocalRuntime(build_model(MICRO, seed=0), dtype=dtype)
    x = torch.randint(0, 256, (2, 16))
    seen = _linear_out_dtypes(rt.model, lambda: rt.forward_backward([(x, x)]))
    assert seen == {expected}
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in rt.model.parameters())  # fp32 master
    assert rt.compute_dtype == dtype


def test_apply_autocast_wraps_forward_in_place() -> None:
    model = build_model(MICRO, seed=0)
    names = [n for n, _ in model.named_parameters()]
    apply_autocast(model, PrecisionPolicy.from_dtype("bf16"), "cpu")
    assert [n for n, _ in model.named_parameters()] == names
    x = torch.randint(0, 256, (1, 8))
    assert _linear_out_dtypes(model, lambda: model(x)) == {torch.bfloat16}
    plain = build_model(MICRO, seed=0)
    assert apply_autocast(plain, PrecisionPolicy(), "cpu").forward.__func__ is type(plain).forward  # fp32: untouched


def test_build_runtime_honours_bf16_on_cpu(tmp_path) -> None:
    cfg = load_train_config({"model": MICRO, "dtype": "bf16", "seq_len": 16, "global_batch": 2, "micro_batch": 2,
                             "out_dir": str(tmp_path), "progress": False})
    rt = build_runtime(cfg)
    assert rt.compute_dtype == "bf16"


@pytest.mark.parametrize("runtime_dtype", ["bf16", "fp32"])
def test_summary_records_compute_dtype_and_mfu_uses_its_peak(tmp_path, runtime_dtype: str) -> None:
    """`dtype: bf16` in the config with a runtime computing in ``runtime_dtype``: the summary names the dtype
    as run and divides by that dtype's peak (before: bf16's peak even when fp32 ran, 1805% MFU on CPU)."""
    data = prepared_corpus(tmp_path)
    tr = make_trainer(data, tmp_path / "run", runtime_cls=lambda m: LocalRuntime(m, dtype=runtime_dtype),
                      dtype="bf16", steps=3, eval_every=0, energy=False)
    summary = tr.fit()
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    peak = load_cluster("local-cpu").peak_flops(runtime_dtype)
    assert written["dtype"] == "bf16" and written["compute_dtype"] == runtime_dtype
    assert summary["peak_tflops_per_device"] == pytest.approx(peak / 1e12)
    expected = summary["tokens_per_s"] * summary["flops_per_token"] / peak
    assert summary["mfu"] == pytest.approx(expected, rel=1e-9)
