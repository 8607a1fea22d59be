"""grow_positions under FSDP2 (ZeRO-3 on 2 gloo ranks): the learned position table and its AdamW moments are DTensors
sharded by rows there; a resume at a longer max_seq_len reads the saved (shorter) table whole on each rank, grows it
and lays it out as the run's shard (checkpoint.grow_swapped). The run resumed that way matches the one-process
resume of the same checkpoint (tests/unit/test_grow_positions.py covers the table itself). The short run and its resume
share one launch (tests/distributed/cli_runs.py), each with a process group of its own, with the runs of other modules
(conftest.cli_launch, cli_launch.py); the step-2 run directory is copied for the one-process resume between them."""

from __future__ import annotations

import json

import pytest


@pytest.mark.timeout(1200)
def test_fsdp2_resume_grows_the_sharded_table_as_one_process_does(cli_launch) -> None:
    from meshwright.config import load_train_config
    from meshwright.train.build import run_training

    tmp_path = cli_launch[1] / "grow"  # runs 7-8 of the shared launch (cli_launch.py): the short run, then grown
    sharded = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    one = json.loads((tmp_path / f"cfg64.json").read_text())
    run_training(load_train_config({**one, "out_dir": str(tmp_path / "one")}), resume=True, allow_config_change=True)
    alone = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert [r["seq_len"] for r in sharded] == [32, 32, 64, 64]
    for a, b in zip(sharded[2:], alone[2:]):  # the grown steps: the same weights and moments, another layout
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
