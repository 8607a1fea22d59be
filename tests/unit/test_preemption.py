"""The preemption grace (train/preemption.py, ``preempt_grace_s``): the stop-time estimate and its one-line
warning, the trainer asking for it once a stop would not fit, and eager agreement (the stop decided in the step
the signal arrived, one step sooner with several ranks). The signal path end to end is in
tests/e2e/test_fault_injection.py."""

from __future__ import annotations

import os
import signal

import pytest
import torch.distributed as dist

from _train_helpers import make_trainer, prepared_corpus
from meshwright.config import load_train_config
from meshwright.config.io import to_dict
from meshwright.errors import ConfigError
from meshwright.train.preemption import Preemption, grace_warning


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_corpus(tmp_path_factory.mktemp("data"))


def test_grace_warning_adds_the_steps_to_the_boundary_and_the_checkpoint():
    line = grace_warning(30.0, 12.0, 10.0, 2, sooner=True)  # 2 x 12 + 10 = 34 > 30
    assert line is not None and "\n" not in line
    assert "a stop (SIGTERM/SIGUSR1) may take 34.0 s here (2 step(s) of 12.0 s" in line
    assert "+ the checkpoint 10.0 s), more than preempt_grace_s=30" in line
    assert "stops are now decided one step sooner" in line and "--signal=USR1@51" in line
    assert "one step sooner" not in grace_warning(30.0, 12.0, 10.0, 2, sooner=False)
    assert "the checkpoint (not timed yet)" in grace_warning(20.0, 12.0, None, 2, sooner=False)
    assert grace_warning(30.0, 12.0, 6.0, 2, sooner=True) is None  # 30: fits
    assert grace_warning(0.0, 1e6, 1e6, 3, sooner=True) is None  # 0: the check is off
    assert "ckpt_async, or a smaller ckpt_every" in grace_warning(20.0, 12.0, None, 2, sooner=False)
    on = grace_warning(20.0, 12.0, None, 2, sooner=False, ckpt_async=True)  # advised what was already on
    assert "ckpt_async" not in on and on.endswith("its lead, or a smaller ckpt_every so less is lost")


def test_preempt_grace_s_round_trips_and_bad_values_name_the_field(tmp_path):
    base = {"model": "tiny", "out_dir": str(tmp_path)}
    assert load_train_config(base).preempt_grace_s == 30.0  # torchrun's SIGTERM-to-SIGKILL
    cfg = load_train_config({**base, "preempt_grace_s": 90})
    assert load_train_config(to_dict(cfg)).preempt_grace_s == 90.0
    for bad in (-1, "soon", float("inf")):
        with pytest.raises(ConfigError, match="preempt_grace_s"):
            load_train_config({**base, "preempt_grace_s": bad})


def test_preempt_signals_round_trip_and_bad_values_name_the_field(tmp_path):
    base = {"model": "tiny", "out_dir": str(tmp_path)}
    assert load_train_config(base).preempt_signals == ["SIGTERM", "SIGUSR1", "SIGHUP"]
    cfg = load_train_config({**base, "preempt_signals": ["SIGUSR2", "SIGTERM"]})
    assert load_train_config(to_dict(cfg)).preempt_signals == ["SIGUSR2", "SIGTERM"]
    assert load_train_config({**base, "preempt_signals": []}).preempt_signals == []
    for bad, where in (("SIGTERM", "preempt_signals="), (["SIGINT"], r"preempt_signals\[0\]='SIGINT'"),
                       (["SIGTERM", "USR1"], r"preempt_signals\[1\]='USR1'"),
                       (["SIGHUP", "SIGHUP"], r"preempt_signals\[1\]='SIGHUP'"), (["SIGKILL"], "preempt_signals")):
        with pytest.raises(ConfigError, match=where) as err:
            load_train_config({**base, "preempt_signals": bad})
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="SIGINT is Ctrl-C's"):
        load_train_config({**base, "preempt_signals": ["SIGINT"]})


def test_preemption_records_the_signals_it_is_given_and_leaves_the_others_alone():
    """``preempt_signals: [SIGUSR2]`` (submitit's): SIGUSR2 is recorded, SIGTERM/SIGUSR1/SIGHUP keep the handlers
    they had; all are restored on exit."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)}
    with Preemption(1, ["SIGUSR2"]) as p:
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
            assert signal.getsignal(s) is before[s]
        assert p.agreed() is False
        os.kill(os.getpid(), signal.SIGUSR2)
        assert p.agreed() is True and p.name == "SIGUSR2"
    assert {s: signal.getsignal(s) for s in before} == before
    with Preemption(1) as p:  # the default set
        assert {signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)} == {p._record}
        os.kill(os.getpid(), signal.SIGHUP)  # pytest's output is no terminal: nothing is redirected
        assert p.agreed() is True and p.name == "SIGHUP"


def test_a_held_preemption_keeps_recording_after_its_context_until_released():
    """hold() (a stop agreed: its checkpoint is written after the context): a signal arriving then is recorded, not
    its default action (which killed the rank mid-checkpoint); release() restores the previous handlers. Leaving on
    an error releases at once."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}
    with Preemption(1) as p:
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.agreed() is True
        p.hold()
    assert signal.getsignal(signal.SIGUSR1) == p._record
    os.kill(os.getpid(), signal.SIGUSR1)  # another host's stop, late: recorded (this process lives on)
    assert p.name == "SIGUSR1"
    p.release()
    p.release()
    assert {s: signal.getsignal(s) for s in before} == before
    with pytest.raises(RuntimeError):
        with Preemption(1) as p:
            p.hold()
            raise RuntimeError("a peer lost")
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.timeout(120)
def test_a_stop_holds_the_signals_through_the_checkpoint_and_the_summary(data, tmp_path, monkeypatch):
    """A stop agreed at step 2: the final checkpoint and the summary are written with the stop signals still
    recorded (a late one from another host is no kill), and the previous handlers are back once fit returns."""
    t = make_trainer(data, tmp_path, steps=6, ckpt_every=0, eval_every=0)
    before = signal.getsignal(signal.SIGTERM)
    seen: dict[str, object] = {}
    real_save, real_finish, real_agreed = t.save, t._finish, Preemption.agreed

    def agreed(self):
        if t.step == 2 and self.signum is None:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_agreed(self)

    def save(*a, **k):
        seen["save"] = signal.getsignal(signal.SIGTERM)
        return real_save(*a, **k)

    def finish(*a, **k):
        seen["finish"] = signal.getsignal(signal.SIGTERM)
        return real_finish(*a, **k)

    monkeypatch.setattr(Preemption, "agreed", agreed)
    monkeypatch.setattr(t, "save", save)
    monkeypatch.setattr(t, "_finish", finish)
    summary = t.fit()
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 2
    assert seen["save"] == t.preemption._record and seen["finish"] == t.preemption._record
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_ignored_signal_stays_ignored():
    """`nohup meshwright train ...` ignores SIGHUP so that the run outlives the terminal: the preemption leaves it
    ignored (a hang-up then neither stops nor kills the run); the other signals are handled as usual."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with Preemption(1) as p:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == p._record
            os.kill(os.getpid(), signal.SIGHUP)
            assert p.agreed() is False
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("grace, warned, ckpt_async", [(1e-9, True, False), (1e-9, True, True), (1e9, False, False),
                                                      (0.0, False, False)], ids=["exceeded", "async", "fits", "off"])
def test_the_trainer_warns_once_with_its_measured_step_and_checkpoint(data, tmp_path, grace, warned, ckpt_async):
    """Any step exceeds a grace of 1e-9 s and none 1e9 s: the warning (once, with the measured step and the step-2
    checkpoint's time) and the request for eager agreement follow the measurement, not the test's clock. It
    advised ckpt_async to a run that had it on."""
    t = make_trainer(data, tmp_path, steps=5, ckpt_every=2, eval_every=0, preempt_grace_s=grace, ckpt_async=ckpt_async)
    lines: list[str] = []
    t.print = lines.append
    t.fit()
    found = [x for x in lines if x.startswith("warning: a stop")]
    assert len(found) == (1 if warned else 0), lines
    assert t.preemption.want_eager is warned
    if warned:  # one process: the step running, then the checkpoint timed at step 2 (before the check there)
        assert "(1 step(s) of " in found[0], found[0]
        assert ckpt_async or "the checkpoint (not timed" not in found[0], found[0]  # async: its write may still run
        assert "one step sooner" not in found[0]  # nothing to gain with one rank
        assert ("ckpt_async, or" in found[0]) is not ckpt_async, found[0]


@pytest.fixture()
def one_rank_group(tmp_path):
    """A one-rank gloo group: Preemption(world_size=2) then runs its all-reduce path against it."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_eager_agreement_stops_one_step_sooner_and_switches_at_the_same_call(one_rank_group):
    with Preemption(world_size=2) as lagged:
        assert not lagged.agreed()
        os.kill(os.getpid(), signal.SIGTERM)  # recorded by the handler; arrives before the next call
        assert lagged.signum == signal.SIGTERM
        assert not lagged.agreed()  # this call's flag is read at the next one
        assert lagged.agreed()
        assert lagged.steps_to_boundary(overlapped=False) == 2
    with Preemption(world_size=2) as eager:
        eager.want_eager = True
        assert not eager.agreed() and not eager.eager  # the request travels in this call's all-reduce
        os.kill(os.getpid(), signal.SIGTERM)
        assert eager.agreed() and eager.eager  # read at once: the same call decides
        assert eager.steps_to_boundary(overlapped=False) == 1 and eager.steps_to_boundary(overlapped=True) == 2
    with Preemption(world_size=1) as one:
        assert one.steps_to_boundary(overlapped=False) == 1


class _Work:
    """A stand-in for the last step's flag all-reduce: records how it is waited for, fails like gloo with a peer gone."""

    def __init__(self, fails: bool) -> None:
        self.fails, self.waits = fails, []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        if self.fails:
            raise RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:6335: Connection reset by peer")
        return True


def test_leaving_on_an_error_neither_replaces_it_nor_waits_unbounded_for_the_flag_all_reduce():
    """Ctrl-C (or a lost peer) mid-run: the other ranks may never issue this step's flag all-reduce, or be gone. Its
    wait is bounded and its failure does not replace the error on its way out (it was a gloo traceback instead of
    the one 'interrupted' line, or held the rank until the group's timeout). A normal exit still finishes it."""
    from datetime import timedelta

    from meshwright.train.preemption import EXIT_WAIT_S

    failing = _Work(fails=True)
    with pytest.raises(KeyboardInterrupt):
        with Preemption() as p:
            p._pending = (failing, None)
            raise KeyboardInterrupt
    assert failing.waits == [timedelta(seconds=EXIT_WAIT_S)] and p._pending is None
    done = _Work(fails=False)
    with Preemption() as p:
        p._pending = (done, None)
    assert done.waits == [None] and p._pending is None
