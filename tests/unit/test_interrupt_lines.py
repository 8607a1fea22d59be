"""The lines an interrupted or broken multi-rank run ends with (docs/training.md, "Interrupting a run"): a Ctrl-C
says which rank it stopped, a lost peer is one line naming the rank, the step and the checkpoint to resume from
(exit 1), not a gloo traceback per rank. The runs themselves: tests/distributed/test_interrupt_torchrun.py."""

from __future__ import annotations

import pytest

from _train_helpers import make_trainer, prepared_corpus
from meshwright.errors import PeerLost

GLOO = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:6335: "
        "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application.")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_corpus(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("env, line", [
    ({"WORLD_SIZE": "2", "RANK": "1"}, "meshwright train: interrupted (rank 1 of 2)"),
    ({"WORLD_SIZE": "1", "RANK": "0"}, "meshwright train: interrupted"),
])
def test_ctrl_c_is_one_line_naming_the_rank_exit_130(monkeypatch, capsys, env, line):
    import meshwright.commands.train as train
    from meshwright.cli import main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_run", interrupted)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["train", "tiny-test"]) == 130
    assert capsys.readouterr().err.splitlines() == [line]


def test_a_lost_peer_is_one_line_exit_1(monkeypatch, capsys):
    import meshwright.commands.train as train
    from meshwright.cli import main

    def lost(args):
        raise PeerLost("rank 0 of 2: training stopped during step 5: a peer rank was lost")

    monkeypatch.setattr(train, "_run", lost)
    assert main(["train", "tiny-test"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "meshwright train: error: rank 0 of 2: training stopped during step 5: a peer rank was lost"]


def test_the_trainer_turns_a_collective_failing_on_a_lost_peer_into_one_line(data, tmp_path):
    t = make_trainer(data, tmp_path, steps=4, ckpt_every=2, eval_every=0)
    t.fit()
    assert t._stopped_by(RuntimeError(GLOO)) is None  # one process: no peer to lose
    t.runtime.rank, t.runtime.world_size = 1, 2
    err = t._stopped_by(RuntimeError(GLOO))
    assert isinstance(err, PeerLost) and "\n" not in str(err)
    assert str(err) == (
        "rank 1 of 2: training stopped during step 4: a peer rank was lost or a collective timed out (RuntimeError: "
        "Read error [127.0.0.1]:6335: Connection reset by peer); valid: find why that rank stopped (its log), then "
        "resume: step_000004 is the latest complete checkpoint: `meshwright train ... --resume` continues from it")
    assert t._stopped_by(RuntimeError("shape mismatch")) is None  # other errors go on as they are
    assert t._stopped_by(ValueError("by peer")) is None
