"""The flat optimizer layout of checkpoints (train/optim_layout.py), in one process: one key per parameter and
setting, and checkpoints of the nested layout earlier meshwright versions wrote (written here the old way) still
load, their group settings given to this run's groups by position even where the saved ``params`` lists name other
parameters (what DCP kept of a pipeline run: one stage's lists)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from meshwright.config import load_model_config
from meshwright.errors import ConfigError
from meshwright.models import build_model, lm_loss
from meshwright.train.checkpoint import load_runtime, save_runtime
from meshwright.train.checkpoint_io import read_metadata_file
from meshwright.train.local_runtime import LocalRuntime

CFG = load_model_config({"name": "tiny-layout", "arch": "llama", "vocab_size": 64, "d_model": 32, "n_layers": 2,
                         "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "max_seq_len": 16})


def make_opt(groups):
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    tok = torch.randint(0, CFG.vocab_size, (4, 9), generator=torch.Generator().manual_seed(step))
    return tok[:, :-1], tok[:, 1:]


def train(rt: LocalRuntime, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    out = []
    for step in steps:
        x, y = batch(step)
        loss = lm_loss(rt.model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(float(loss.detach()))
    return out


class NestedRuntime(LocalRuntime):
    """A one-process runtime that checkpoints as meshwright did before the flat layout (``get_optimizer_state_dict``
    without ``flatten_optimizer_state_dict``); ``keep_params`` cuts every group's saved ``params`` list to the FQNs
    it names, as DCP kept one pipeline stage's lists."""

    keep_params: set[str] | None = None

    def checkpoint_state(self, optimizer):
        osd = get_optimizer_state_dict(self.model, optimizer)
        if self.keep_params is not None:
            for g in osd["param_groups"]:
                g["params"] = [f for f in g["params"] if f in self.keep_params]
        return {"model": self.model_state(), "optim": osd}


def fresh(seed: int = 1) -> tuple[LocalRuntime, torch.optim.Optimizer]:
    rt = LocalRuntime(build_model(CFG, seed=seed))
    return rt, rt.build_optimizer(make_opt)


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer, kernels: bool = True) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for field, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][field]), (k, field)
    skip = {"foreach", "fused", "capturable", "differentiable"} if not kernels else set()
    for ga, gb in zip(sa["param_groups"], sb["param_groups"]):
        assert {k: v for k, v in ga.items() if k not in skip} == {k: v for k, v in gb.items() if k not in skip}


def saved_and_straight(tmp_path, runtime_cls=LocalRuntime, keep_params=None):
    """A run saved after 2 steps (by ``runtime_cls``) and the losses of its steps 3-4 (the uninterrupted run)."""
    rt = runtime_cls(build_model(CFG, seed=7))
    rt.keep_params = keep_params
    opt = rt.build_optimizer(make_opt)
    train(rt, opt, range(2))
    path = save_runtime(tmp_path / "ckpt", rt, opt, meta={"step": 2})
    snapshot = {k: v.clone() for k, v in rt.model.state_dict().items()}, _copy(opt)
    return path, snapshot, train(rt, opt, range(2, 4))


def _copy(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    model = build_model(CFG, seed=7)
    twin = make_opt([{"params": [p for p in model.parameters() if p.dim() >= 2]},
                     {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}])
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own tensors: the run goes on in place
    return twin


def resume(path, snapshot, straight) -> None:
    rt, opt = fresh(seed=3)
    for g in opt.param_groups:  # other settings than the run's: the load must set them
        g["lr"], g["weight_decay"] = 0.5, 0.25
    assert load_runtime(path, rt, opt)["step"] == 2
    model_sd, saved_opt = snapshot
    for k, v in rt.model.state_dict().items():
        assert torch.equal(v, model_sd[k]), k
    assert_same_state(saved_opt, opt)
    assert train(rt, opt, range(2, 4)) == straight  # one process: the same steps, bit for bit


def test_checkpoints_are_flat_and_resume_exactly(tmp_path) -> None:
    path, snapshot, straight = saved_and_straight(tmp_path)
    keys = read_metadata_file(path / ".metadata").state_dict_metadata
    names = [n for n, _ in build_model(CFG, seed=0).named_parameters()]
    for n in names:  # every parameter's settings under its own key; no group index, no params list
        want = {f"optim.param_groups.{n}.lr", f"optim.param_groups.{n}.weight_decay", f"optim.state.{n}.exp_avg"}
        assert want <= set(keys), n
    assert not any(k.startswith("optim.param_groups.0.") for k in keys)
    resume(path, snapshot, straight)


def test_nested_checkpoint_of_earlier_versions_resumes_exactly(tmp_path) -> None:
    path, snapshot, straight = saved_and_straight(tmp_path, NestedRuntime)
    keys = read_metadata_file(path / ".metadata").state_dict_metadata
    assert "optim.param_groups.0.params" in keys and "optim.param_groups.1.weight_decay" in keys  # the old layout
    resume(path, snapshot, straight)


def test_nested_pipeline_checkpoint_with_one_stages_lists_resumes_exactly(tmp_path) -> None:
    """A pp2 checkpoint of the nested layout: DCP kept stage 0's ``params`` lists (embedding, layer 0), so the lists
    name none of layer 1's parameters; by position the vectors' group still gets weight_decay 0.0, the matrices' 0.1."""
    names = [n for n, _ in build_model(CFG, seed=0).named_parameters()]
    stage0 = {n for n in names if n.startswith(("tok_embeddings", "layers.0."))}
    assert stage0
    path, snapshot, straight = saved_and_straight(tmp_path, NestedRuntime, keep_params=stage0)
    resume(path, snapshot, straight)


def test_nested_checkpoint_with_other_group_count_is_one_line(tmp_path) -> None:
    path, _, _ = saved_and_straight(tmp_path, NestedRuntime)
    rt = LocalRuntime(build_model(CFG, seed=3))
    opt = make_opt([{"params": list(rt.model.parameters())}])  # one group where the run had two
    with pytest.raises(ConfigError) as info:
        load_runtime(path, rt, opt)
    msg = str(info.value)
    assert "\n" not in msg and "2 param group(s), this run's 1" in msg and "valid:" in msg


class MixedKernels(LocalRuntime):
    """Saves a group whose parameters carry different ``foreach`` values, as a pp2 run whose stages chose
    differently (a stage mixing DTensor and plain parameters turns foreach off) leaves them after a one-process
    load collects both stages' parameters in one group."""

    keep_params = None

    def checkpoint_state(self, optimizer):
        state = super().checkpoint_state(optimizer)
        first = next(k for k in state["optim"] if k.endswith(".foreach"))
        state["optim"] = {**state["optim"], first: True}
        return state


def test_kernel_settings_stay_this_runs(tmp_path) -> None:
    path, snapshot, straight = saved_and_straight(tmp_path, MixedKernels)
    rt, opt = fresh(seed=3)
    for g in opt.param_groups:
        g["foreach"] = False
    load_runtime(path, rt, opt)  # torch alone refuses the group ("should have the same saved param_group value")
    assert [g["foreach"] for g in opt.param_groups] == [False, False]
    assert_same_state(snapshot[1], opt, kernels=False)
    assert train(rt, opt, range(2, 4)) == straight
