"""grow_positions under FSDP2 (ZeRO-3 on 2 gloo ranks): the learned position table and its AdamW moments are DTensors
sharded by rows there; a resume at a longer max_seq_len reads the saved (shorter) table whole on each rank, grows it
and lays it out as the run's shard (checkpoint.grow_swapped). The run resumed that way matches the one-process
resume of the same checkpoint (tests/unit/test_grow_positions.py covers the table itself). The short run and its resume
share one launch (tests/distributed/cli_runs.py), each with a process group of its own; the step-2 run directory is
copied for the one-process resume between them."""

from __future__ import annotations

import json

import pytest

from helpers import REPO, run_torchrun

GPT2 = {"name": "g", "arch": "gpt2", "vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden": 64,
        "max_seq_len": 32}


def _files(tmp_path, seq_len: int, **overrides) -> tuple[str, str]:
    model = {**GPT2, "max_seq_len": seq_len}
    plan = {"version": 1, "model": model, "seq_len": seq_len, "global_batch": 4, "micro_batch": 2,
            "layers": [{"dp": 2, "zero": 3, "repeat": 2}], "embedding": {"tp": 1, "zero": 3}}
    cfg = {"model": model, "data": {"path": "default", "max_files": 20}, "seq_len": seq_len, "global_batch": 4,
           "micro_batch": 2, "steps": 2, "warmup_steps": 1, "eval_every": 0, "log_every": 1, "energy": False,
           "progress": False, "out_dir": str(tmp_path / "run"), **overrides}
    paths = tmp_path / f"plan{seq_len}.json", tmp_path / f"cfg{seq_len}.json"
    paths[0].write_text(json.dumps(plan))
    paths[1].write_text(json.dumps(cfg))
    return str(paths[0]), str(paths[1])


@pytest.mark.timeout(600)
def test_fsdp2_resume_grows_the_sharded_table_as_one_process_does(tmp_path) -> None:
    from meshwright.config import load_train_config
    from meshwright.train.build import run_training

    plan32, cfg32 = _files(tmp_path, 32)
    plan64, cfg64 = _files(tmp_path, 64, steps=4, grow_positions="copy")
    run_torchrun(REPO / "tests" / "distributed" / "cli_runs.py", 2,
                 ["train", cfg32, "--plan", plan32,
                  "::", f"--copy={tmp_path / 'run'}:{tmp_path / 'one'}",  # the step-2 run, for the one-process resume
                  "train", cfg64, "--plan", plan64, "--resume", "--allow-config-change"], timeout=500)
    sharded = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    one = json.loads((tmp_path / f"cfg64.json").read_text())
    run_training(load_train_config({**one, "out_dir": str(tmp_path / "one")}), resume=True, allow_config_change=True)
    alone = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert [r["seq_len"] for r in sharded] == [32, 32, 64, 64]
    for a, b in zip(sharded[2:], alone[2:]):  # the grown steps: the same weights and moments, another layout
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
