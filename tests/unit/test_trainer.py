"""Trainer: LR schedule, loss falls, gradient accumulation equals one big batch, run log and summary,
NaN handling, optimizer dispatch."""

import json
import math

import pytest
import torch
from _train_helpers import make_trainer, prepared_corpus

from meshwright.config import load_train_config
from meshwright.errors import ConfigError
from meshwright.train.local_runtime import LocalRuntime
from meshwright.train.trainer import NonFiniteLoss, build_optimizer, lr_at

LOG_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "seq_len", "tokens_per_s", "tokens_per_s_per_device", "step_s", "mfu",
            "tflops_per_device"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_corpus(tmp_path_factory.mktemp("data"))


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = load_train_config({"steps": 100, "warmup_steps": 10, "lr": 1e-3, "min_lr": 1e-4})
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(55, cfg) == pytest.approx(5.5e-4)  # half-way through the cosine: the mean of lr and min_lr
    assert lr_at(100, cfg) == pytest.approx(1e-4)


def test_loss_falls_and_log_has_every_field(data, tmp_path):
    trainer = make_trainer(data, tmp_path, steps=30, warmup_steps=3, eval_every=10)
    summary = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all(LOG_KEYS <= set(r) for r in records)
    assert [r["step"] for r in records if "eval_loss" in r] == [10, 20, 30]
    assert records[-1]["loss"] < records[0]["loss"] - 1.5  # ~5.5 (uniform over bytes) -> below 4
    assert records[-1]["eval_loss"] < records[0]["loss"] - 1.0
    assert records[-1]["tokens"] == 30 * 8 * 32
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["final_loss"] == summary["final_loss"] == records[-1]["loss"]
    # MFU is consistent with the model's FLOPs and the cluster preset's peak (local-cpu fp32 = 0.16 TFLOP/s)
    r = records[-1]
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * trainer.flops_per_token / 0.16e12)
    assert r["tflops_per_device"] == pytest.approx(r["tokens_per_s"] * trainer.flops_per_token / 1e12)


def test_gradient_accumulation_matches_one_big_batch(data, tmp_path):
    one = make_trainer(data, tmp_path / "a", micro_batch=8, steps=4, eval_every=0)
    four = make_trainer(data, tmp_path / "b", micro_batch=2, steps=4, eval_every=0)
    assert (one.accum_steps, four.accum_steps) == (1, 4)
    s1, s4 = one.fit(), four.fit()
    assert s4["final_loss"] == pytest.approx(s1["final_loss"], rel=1e-5)
    for p, q in zip(one.runtime.model.parameters(), four.runtime.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_grad_clipping_bounds_the_update(data, tmp_path):
    trainer = make_trainer(data, tmp_path, grad_clip=0.01)
    trainer.runtime.forward_backward(trainer.train_loader.next_batch())
    before = trainer.runtime.clip_grad_norm_(0.01)
    after = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in trainer.runtime.model.parameters()))
    assert before > 0.1 and after == pytest.approx(0.01, rel=1e-3)


class PoisonedRuntime(LocalRuntime):
    """Returns a NaN loss (and NaN gradients) on its third step."""

    calls = 0

    def forward_backward_lazy(self, micro_batches):  # what the trainer calls
        loss = super().forward_backward_lazy(micro_batches)
        type(self).calls += 1
        if type(self).calls == 3:
            next(self.model.parameters()).grad.fill_(float("nan"))
            return torch.full_like(loss, float("nan"))
        return loss


def test_nan_policy_stop_raises_one_line(data, tmp_path):
    PoisonedRuntime.calls = 0
    trainer = make_trainer(data, tmp_path, runtime_cls=PoisonedRuntime, nan_policy="stop")
    with pytest.raises(NonFiniteLoss, match=r"step 3: loss=nan .*nan_policy=skip") as exc:
        trainer.fit()
    assert isinstance(exc.value, ConfigError) and "\n" not in str(exc.value)


@pytest.mark.parametrize("fused", [False, True], ids=["host-checks-first", "fused-skips-on-device"])
def test_nan_policy_skip_leaves_weights_untouched(data, tmp_path, fused):
    """Both skip paths: the host reads loss and norm before stepping (foreach AdamW), or torch's fused AdamW
    skips on the device from a ``found_inf`` flag and the host reads back after the step (the CUDA path)."""
    PoisonedRuntime.calls = 0
    trainer = make_trainer(data, tmp_path, runtime_cls=PoisonedRuntime, nan_policy="skip", steps=5)
    if fused:  # what build_optimizer picks on CUDA; fused AdamW runs on CPU too
        trainer.optimizer = torch.optim.AdamW(trainer.runtime.param_groups(trainer.cfg.weight_decay), fused=True)
    snapshots, states = [], []
    orig = trainer.runtime.forward_backward_lazy

    def spy(batches):
        snapshots.append([p.detach().clone() for p in trainer.runtime.model.parameters()])
        states.append([{k: v.clone() for k, v in st.items()} for st in trainer.optimizer.state.values()])
        return orig(batches)

    trainer.runtime.forward_backward_lazy = spy
    summary = trainer.fit()
    assert trainer._skips_on_device is fused
    assert summary["skipped_steps"] == 1 and summary["steps"] == 5
    # weights (and Adam moments, step counts) before step 4 equal those before step 3: the NaN step changed nothing
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(states[2], states[3]) for k in a)
    assert not hasattr(trainer.optimizer, "found_inf")
    assert all(torch.isfinite(p).all() for p in trainer.runtime.model.parameters())
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in records] == [False, False, True, False, False]
    assert records[2]["loss"] is None


def test_build_optimizer_dispatch(data, tmp_path):
    trainer = make_trainer(data, tmp_path)
    opt = build_optimizer(trainer.cfg, trainer.runtime)
    assert isinstance(opt, torch.optim.AdamW)
    decay = {g.get("weight_decay", trainer.cfg.weight_decay) for g in opt.param_groups}
    assert decay == {0.0, trainer.cfg.weight_decay}  # norms are not decayed
    from meshwright.optim import CoatAdamW

    coat = load_train_config({"optimizer": "coat_adamw"})
    assert isinstance(build_optimizer(coat, trainer.runtime), CoatAdamW)


def test_build_runtime_picks_local_or_distributed(monkeypatch):
    from meshwright.train.build import TrainingJob, build_runtime

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_train_config("tiny-test")
    assert isinstance(build_runtime(cfg), LocalRuntime)
    assert isinstance(build_runtime(cfg, "auto"), LocalRuntime)  # one device: the plan needs nothing parallel
    assert not TrainingJob.resolve(cfg).distributed
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun (the distributed branch is run in tests/distributed)
    assert TrainingJob.resolve(cfg).distributed
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is invalid") as exc:
        build_runtime(cfg)
    assert "\n" not in str(exc.value)


def _fused(trainer):
    """What build_optimizer picks on CUDA (fused AdamW, which skips non-finite steps on the device); it runs on CPU too."""
    trainer.optimizer = torch.optim.AdamW(trainer.runtime.param_groups(trainer.cfg.weight_decay), fused=True)
    return trainer


def test_readback_overlaps_the_next_step_except_at_boundaries(data, tmp_path):
    """With the device skipping non-finite steps, fit reads step N's loss after step N+1 is queued (the device
    never idles on the host), except where eval, a checkpoint or the end follow step N. The records, the
    weights and the checkpoint are those of the run that reads every step back at once."""
    kw = dict(steps=9, eval_every=4, ckpt_every=6, log_every=1)
    lagged, eager = (_fused(make_trainer(data, tmp_path / n, **kw)) for n in ("lagged", "eager"))
    eager.overlap_readback = False
    events = []
    queue, resolve = lagged._queue_step, lagged._resolve

    def spy_queue():
        q = queue()
        events.append(("queue", q.step))
        return q

    def spy_resolve(q):
        events.append(("read", q.step))
        return resolve(q)

    lagged._queue_step, lagged._resolve = spy_queue, spy_resolve
    lagged.fit()
    eager.fit()
    order = {e: i for i, e in enumerate(events)}
    overlapped = [n for n in range(1, 9) if order[("queue", n + 1)] < order[("read", n)]]
    assert overlapped == [1, 2, 3, 5, 7]  # not 4 (eval), 6 (checkpoint); 9 is the last
    logs = [[json.loads(line) for line in (tmp_path / n / "log.jsonl").read_text().splitlines()] for n in ("lagged", "eager")]
    assert [r["step"] for r in logs[0]] == list(range(1, 10))
    for a, b in zip(*logs):
        assert (a["step"], a["loss"], a["grad_norm"], a["lr"], a.get("eval_loss")) == \
               (b["step"], b["loss"], b["grad_norm"], b["lr"], b.get("eval_loss"))
    assert all(torch.equal(p, q) for p, q in zip(lagged.runtime.model.parameters(), eager.runtime.model.parameters()))
    assert all(r["step_s"] > 0 for r in logs[0])


def test_no_overlap_where_the_host_must_look_first(data, tmp_path):
    """Host-side skipping (foreach AdamW, CPU's default) reads every step back before the next: the host must
    see a NaN before it steps. A fused optimizer may overlap (decided at the first step)."""
    host = make_trainer(data, tmp_path / "b", steps=3)
    host.train_step()
    fused = _fused(make_trainer(data, tmp_path / "c", steps=3))
    fused.train_step()
    assert (host.may_overlap(1), fused.may_overlap(1), fused.may_overlap(3)) == (False, True, False)


def test_nan_policy_stop_with_overlapped_readback_stops_at_that_step(data, tmp_path):
    """The device skipped the NaN step; the host learns of it one step late and still names that step,
    writes no record past the last good one and no checkpoint."""
    PoisonedRuntime.calls = 0
    trainer = _fused(make_trainer(data, tmp_path, runtime_cls=PoisonedRuntime, nan_policy="stop", steps=6))
    with pytest.raises(NonFiniteLoss, match=r"step 3: loss=nan"):
        trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_steady_state_timing_counts_the_second_step_when_the_first_is_overlapped(data, tmp_path, monkeypatch):
    """The summary's steady state excludes the first step, not the second: where step 1 is read back after
    step 2 was queued, the time spent queueing step 2 still counts. A fake clock that advances one second
    per forward/backward (all the work there is, on CPU) makes every step take exactly 1 s."""
    import types

    import meshwright.train.trainer as trainer_mod

    clock = [0.0]
    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    summaries = {}
    for name, overlap in (("lagged", True), ("eager", False)):
        trainer = _fused(make_trainer(data, tmp_path / name, steps=5, eval_every=0, log_every=1))
        trainer.overlap_readback = overlap
        orig = trainer.runtime.forward_backward_lazy

        def timed(batches, orig=orig):
            clock[0] += 1.0
            return orig(batches)

        trainer.runtime.forward_backward_lazy = timed
        summaries[name] = trainer.fit()
    assert summaries["eager"]["train_s"] == pytest.approx(4.0)  # steps 2..5, 1 s each
    assert summaries["lagged"]["train_s"] == pytest.approx(4.0)
    assert summaries["lagged"]["step_s"] == pytest.approx(1.0)


def test_overlapped_run_resumes_on_the_exact_trajectory(data, tmp_path):
    """Fused AdamW (overlapped read-back between checkpoints): resuming the step-4 checkpoint replays steps
    5..10 bit for bit, the log keeps steps 1..4 and the loader continues where the checkpoint left it."""
    import shutil

    kw = dict(steps=10, ckpt_every=4, eval_every=5)
    straight = _fused(make_trainer(data, tmp_path / "straight", **kw))
    straight.fit()
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    ckpt = tmp_path / "resumed" / "ckpt"
    for name in ("step_000008", "step_000010"):
        shutil.rmtree(ckpt / name)
    (ckpt / "latest").write_text("step_000004\n")
    resumed = _fused(make_trainer(data, tmp_path / "resumed", **kw))
    summary = resumed.fit(resume=True)
    assert summary["steps_this_run"] == 6 and resumed._overlap_everywhere
    logs = [[json.loads(line) for line in (tmp_path / n / "log.jsonl").read_text().splitlines()] for n in ("straight", "resumed")]
    assert [r["step"] for r in logs[1]] == list(range(1, 11))
    assert [(r["loss"], r["grad_norm"], r.get("eval_loss")) for r in logs[0]] == \
           [(r["loss"], r["grad_norm"], r.get("eval_loss")) for r in logs[1]]
    assert all(torch.equal(p, q) for p, q in zip(straight.runtime.model.parameters(), resumed.runtime.model.parameters()))


class FailingRuntime(LocalRuntime):
    """Raises (as an out-of-memory error would) in its third forward/backward."""

    calls = 0

    def forward_backward_lazy(self, micro_batches):
        type(self).calls += 1
        if type(self).calls == 3:
            raise RuntimeError("simulated out of memory")
        return super().forward_backward_lazy(micro_batches)


def test_a_failing_step_keeps_the_overlapped_record_of_the_step_before(data, tmp_path):
    """Step 2 is still on the device (overlapped) when step 3 fails: its record is written before the error
    propagates, and no checkpoint is written."""
    FailingRuntime.calls = 0
    trainer = _fused(make_trainer(data, tmp_path, runtime_cls=FailingRuntime, steps=6, eval_every=0))
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] is not None for r in records)
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())
