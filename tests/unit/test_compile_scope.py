"""``compile_scope: model`` (train/compile.py): the whole Decoder forward, head and loss as ONE compiled graph in
LocalRuntime, the A/B knob against the per-block compile of issue #16. It gives the eager losses and gradients within
test_compile.py's 1e-4 relative over 3 steps (aot_eager: dynamo + AOTAutograd, fp32 and bf16 autocast; inductor,
fp32, as test_compile.py), in one graph without breaks; where it cannot apply it is refused in one line naming what is supported."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from _train_helpers import MICRO
from meshwright.config import TrainConfig, load_model_config, load_train_config
from meshwright.config.io import dump_yaml, from_dict
from meshwright.errors import ConfigError
from meshwright.models import build_model
from meshwright.parallel.recompute import apply_recompute
from meshwright.plan import default_plan
from meshwright.train.build import TrainingJob, build_runtime
from meshwright.train.compile import fast_adamw_kwargs
from meshwright.train.local_runtime import LocalRuntime

RTOL = 1e-4  # test_compile.py's tolerance for compiled vs eager losses over a few steps
MOE = {"name": "m", "arch": "llama", "vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 4, "ffn_hidden": 64,
       "moe_ffn_hidden": 48, "n_experts": 4, "top_k": 2, "max_seq_len": 32}


def _steps(rt: LocalRuntime, steps: int = 3) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """Losses and gradients of ``steps`` optimiser steps on one batch (the loss must fall)."""
    opt = torch.optim.AdamW(rt.param_groups(0.1), lr=3e-3, **fast_adamw_kwargs("cpu"))
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(3))
    losses, grads = [], []
    for _ in range(steps):
        losses.append(rt.forward_backward([(x[:, :-1], x[:, 1:])]))
        grads.append({n: p.grad.detach().clone() for n, p in rt.model.named_parameters()})
        rt.clip_grad_norm_(1.0)
        rt.optimizer_step(opt)
    return losses, grads


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend,dtype", [("aot_eager", "fp32"), ("aot_eager", "bf16"), ("inductor", "fp32")])
def test_model_scope_matches_eager_in_one_graph(backend: str, dtype: str) -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = build_model(MICRO, seed=5)
    rt = LocalRuntime(model, dtype=dtype, compile_backend=backend, compile_scope="model")
    assert rt.model_loss is not None and rt.head_loss is None
    assert not any(b._compiled_call_impl is not None for b in rt.model.layers.values())  # no per-block graphs
    comp, comp_grads = _steps(rt)
    eager, eager_grads = _steps(LocalRuntime(build_model(MICRO, seed=5), dtype=dtype))
    assert all(abs(a - b) <= RTOL * abs(a) for a, b in zip(comp, eager)), (comp, eager)
    assert eager[-1] < eager[0]  # it trains
    for g_c, g_e in zip(comp_grads, eager_grads):
        for name, ref in g_e.items():
            assert float((g_c[name] - ref).norm() / ref.norm()) <= RTOL, name
    # one frame (embedding, blocks, norm, head, loss) traced whole: no break, one graph for all 3 steps
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert counters["stats"]["calls_captured"] > 20 * MICRO["n_layers"], dict(counters["stats"])  # the blocks' ops too


@pytest.mark.timeout(300)
def test_model_scope_eval_runs_compiled_and_matches_eager() -> None:
    """eval_loss (no_grad, eval mode) goes through the same compiled function and gives the eager loss."""
    torch._dynamo.reset()
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(4))
    batches = [(x[:, :-1], x[:, 1:])]
    comp = LocalRuntime(build_model(MICRO, seed=2), compile_backend="aot_eager", compile_scope="model")
    eager = LocalRuntime(build_model(MICRO, seed=2))
    a, b = comp.eval_loss(batches), eager.eval_loss(batches)
    assert abs(a - b) <= 1e-5 * abs(b), (a, b)
    assert comp.model.training  # eval mode restored


def test_model_scope_refusals_in_the_runtime() -> None:
    """Where one whole-model graph cannot apply, LocalRuntime refuses in one line naming what is supported."""
    cases = {
        "compile is off": dict(model=build_model(MICRO, seed=0), compile_backend=None),
        "loss_chunk_tokens=16": dict(model=build_model(MICRO, seed=0), compile_backend="aot_eager", loss_chunk_tokens=16),
        "an MoE model": dict(model=build_model(load_model_config(MOE), seed=0), compile_backend="aot_eager"),
    }
    wrapped = build_model(MICRO, seed=0)
    apply_recompute(wrapped.layers["0"], "full")
    cases["blocks wrapped by recompute"] = dict(model=wrapped, compile_backend="aot_eager")
    for reason, kwargs in cases.items():
        with pytest.raises(ConfigError) as exc:
            LocalRuntime(**kwargs, compile_scope="model")
        msg = str(exc.value)
        assert "\n" not in msg and msg.startswith("compile_scope='model' is invalid; valid: 'blocks', or 'model' only")
        assert reason in msg, msg
    with pytest.raises(ConfigError, match="compile_scope='graph' is invalid; valid: blocks | model"):
        LocalRuntime(build_model(MICRO, seed=0), compile_scope="graph")


def test_compile_scope_config_field() -> None:
    """A TrainConfig field like the others: default "blocks", strict values, YAML round-trip, and "model" only
    with compile: true and no loss chunks."""
    assert TrainConfig().compile_scope == "blocks"
    cfg = load_train_config({"compile": True, "compile_scope": "model"})
    assert cfg.compile_scope == "model"
    assert from_dict(TrainConfig, yaml.safe_load(dump_yaml(cfg))) == cfg
    with pytest.raises(ConfigError, match="compile_scope='whole' is invalid; valid: one of 'blocks', 'model'"):
        load_train_config({"compile_scope": "whole"})
    with pytest.raises(ConfigError, match=r"compile_scope='model' is invalid; valid: .*compile=False"):
        load_train_config({"compile_scope": "model"})
    with pytest.raises(ConfigError, match=r"compile_scope='model' is invalid; valid: .*loss_chunk_tokens=64"):
        load_train_config({"compile": True, "compile_scope": "model", "loss_chunk_tokens": 64})
    assert from_dict(TrainConfig, {"compile": True}).compile_scope == "blocks"


def test_model_scope_refused_for_the_distributed_runtime_and_moe() -> None:
    """build_runtime refuses "model" before anything is built where the distributed runtime would run it
    (torchrun world > 1, a Plan with recompute) or the model is MoE."""
    cfg = load_train_config({"model": MICRO, "compile": True, "compile_scope": "model", "seq_len": 32,
                             "global_batch": 2, "micro_batch": 2})
    model_cfg, cluster = load_model_config(MICRO), object()
    recompute = default_plan(model_cfg, 1, 32, 2, 2)
    recompute.layers = [dataclasses.replace(s, recompute="full") for s in recompute.layers]
    jobs = {
        "world size 2": TrainingJob(cfg, model_cfg, cluster, world_size=2),
        "a Plan with recompute": TrainingJob(cfg, model_cfg, cluster, world_size=1, plan=recompute),
        "n_experts=4": TrainingJob(dataclasses.replace(cfg, model=MOE), load_model_config(MOE), cluster, world_size=1),
    }
    for reason, job in jobs.items():
        with pytest.raises(ConfigError) as exc:
            build_runtime(job)
        assert "\n" not in str(exc.value) and reason in str(exc.value), str(exc.value)
