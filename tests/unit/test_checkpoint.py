"""Checkpoints: DCP round trip in one process (no process group), atomic layout with a `latest` pointer,
keep-last-K, and bitwise-identical resume of the loss trajectory."""

import json
import shutil

import pytest
import torch
import torch.distributed as dist

from _train_helpers import make_trainer, prepared_corpus
from meshwright.train.checkpoint import latest_checkpoint, list_checkpoints, load_runtime, save_checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_corpus(tmp_path_factory.mktemp("data"))


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def test_round_trip_without_process_group(data, tmp_path):
    assert not dist.is_initialized()
    a = make_trainer(data, tmp_path / "a", steps=3, eval_every=0)
    a.fit()  # writes ckpt/step_000003 at the end
    ckpt = latest_checkpoint(tmp_path / "a" / "ckpt")
    assert ckpt is not None and ckpt.name == "step_000003"
    assert (ckpt / ".metadata").is_file() and (ckpt / "rng_rank00000.pt").is_file()
    b = make_trainer(data, tmp_path / "b", steps=3, eval_every=0)
    state = load_runtime(ckpt, b.runtime, b.optimizer)
    assert state["step"] == 3 and state["train_loader"]["consumed"] == 3 * 8
    for (name, p), q in zip(a.runtime.model.named_parameters(), b.runtime.model.parameters()):
        assert torch.equal(p, q), name
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k][field], sb[k][field])


def test_resume_continues_the_exact_loss_trajectory(data, tmp_path):
    straight = make_trainer(data, tmp_path / "straight", steps=10, ckpt_every=5, eval_every=5)
    straight.fit()
    # a second run resumes from the step-5 checkpoint of a copy and must replay steps 6..10 bit for bit
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    ckpt = tmp_path / "resumed" / "ckpt"
    shutil.rmtree(ckpt / "step_000010")
    (ckpt / "latest").write_text("step_000005\n")
    torch.manual_seed(999)  # resume must restore the RNG, not depend on the caller's
    resumed = make_trainer(data, tmp_path / "resumed", steps=10, ckpt_every=5, eval_every=5)
    summary = resumed.fit(resume=True)
    assert summary["resumed"] and summary["steps_this_run"] == 5
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(b) == list(range(1, 11))  # the log keeps steps 1..5 and appends 6..10
    assert [a[s] for s in range(6, 11)] == [b[s] for s in range(6, 11)]  # exact float equality
    for p, q in zip(straight.runtime.model.parameters(), resumed.runtime.model.parameters()):
        assert torch.equal(p, q)
    assert summary["eval_loss"] == json.loads((tmp_path / "straight" / "summary.json").read_text())["eval_loss"]


def test_atomic_layout_latest_pointer_and_keep_last(data, tmp_path):
    t = make_trainer(data, tmp_path, steps=4, eval_every=0)
    root = tmp_path / "ckpt"
    for step in range(1, 5):
        t.step = step
        save_checkpoint(root, step, t.runtime, t.optimizer, t.trainer_state(), keep=2)
    assert [p.name for p in list_checkpoints(root)] == ["step_000003", "step_000004"]
    assert (root / "latest").read_text().strip() == "step_000004"
    # a crash mid-write leaves only a .tmp directory, which is never picked up
    (root / "step_000009.tmp").mkdir()
    (root / "step_000009.tmp" / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(root).name == "step_000004"
    # a dangling pointer falls back to the newest complete checkpoint
    (root / "latest").write_text("step_000007\n")
    assert latest_checkpoint(root).name == "step_000004"
    assert not list(tmp_path.glob("**/*.tmp/.metadata"))


def test_resume_without_checkpoint_starts_fresh(data, tmp_path):
    t = make_trainer(data, tmp_path, steps=2, eval_every=0)
    assert t.resume() is False and t.step == 0


def test_tied_embeddings_round_trip(data, tmp_path):
    from _train_helpers import MICRO

    tied = {**MICRO, "tie_embeddings": True}
    a = make_trainer(data, tmp_path / "a", model=tied, steps=2, eval_every=0)
    a.fit()
    b = make_trainer(data, tmp_path / "b", model=tied, steps=2, eval_every=0)
    load_runtime(latest_checkpoint(tmp_path / "a" / "ckpt"), b.runtime, b.optimizer)
    assert b.runtime.model.output.weight is b.runtime.model.tok_embeddings.weight
    assert torch.equal(a.runtime.model.output.weight, b.runtime.model.output.weight)


def test_loading_keeps_this_layouts_optimizer_kernels_and_the_checkpoints_hyper_parameters(data, tmp_path):
    """A checkpoint restores the writer's param_groups. Its `foreach` (dp2 on CPU: True) overrode the tp2 runtime's
    foreach=False for its mix of DTensor and plain parameters, and the resumed run failed its first step with
    "got mixed torch.Tensor and DTensor"; the kernel keys are this process's choice, the rest is the checkpoint's."""
    a = make_trainer(data, tmp_path / "a", steps=2, eval_every=0)
    a.fit()
    assert a.optimizer.param_groups[0]["foreach"] is True
    b = make_trainer(data, tmp_path / "b", steps=2, eval_every=0)
    for group in b.optimizer.param_groups:  # what DistributedRuntime.build_optimizer does for a mixed layout
        group.update(foreach=False, fused=False, betas=(0.5, 0.5))
    load_runtime(latest_checkpoint(tmp_path / "a" / "ckpt"), b.runtime, b.optimizer)
    for group in b.optimizer.param_groups:
        assert group["foreach"] is False and group["fused"] is False
        assert tuple(group["betas"]) == tuple(a.optimizer.param_groups[0]["betas"])  # hyper-parameters: loaded
