"""One run per out_dir and nothing lost in it: the lock, fresh/resume/overwrite rules, the saved-config check,
the crash-safe log rewrite, a summary after a kill past the final checkpoint, and full disks as one line."""

import errno
import json

import pytest
import torch.distributed.checkpoint as dcp

from _train_helpers import MICRO, prepared_corpus
from meshwright.config import load_train_config
from meshwright.errors import ConfigError
from meshwright.train.build import run_training
from meshwright.train.run_dir import RunLock, read_log


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_corpus(tmp_path_factory.mktemp("data"))


def cfg(data, out, **overrides):
    return load_train_config({
        "model": MICRO, "data": {"path": str(data)}, "seq_len": 32, "global_batch": 8, "micro_batch": 4,
        "steps": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "eval_every": 0, "eval_batches": 1,
        "log_every": 1, "ckpt_every": 2, "out_dir": str(out), "progress": False, "energy": False, **overrides,
    })


def steps_logged(out):
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_a_second_run_into_a_locked_out_dir_is_one_line(data, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with RunLock(tmp_path):
        with pytest.raises(ConfigError) as err:
            run_training(cfg(data, tmp_path))
    assert "\n" not in str(err.value) and "locked" in str(err.value) and "out_dir=" in str(err.value)
    assert not (tmp_path / "log.jsonl").exists()
    run_training(cfg(data, tmp_path, steps=2))  # released: the next run goes ahead
    assert steps_logged(tmp_path) == [1, 2]


def test_fresh_run_into_another_runs_dir_refuses_unless_resume_or_overwrite(data, tmp_path):
    run_training(cfg(data, tmp_path, steps=6))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as err:
        run_training(cfg(data, tmp_path, steps=4))
    assert "\n" not in str(err.value) and "step_000006" in str(err.value) and "--overwrite" in str(err.value)
    assert (tmp_path / "ckpt" / "step_000006").is_dir()  # nothing touched
    summary = run_training(cfg(data, tmp_path, steps=4), overwrite=True)
    assert summary["steps"] == 4 and not summary["resumed"]
    ckpts = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_000002", "step_000004"]  # the old run's step_000006 is gone; the new ones survived
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_000004"
    assert (tmp_path / "notes.txt").read_text() == "mine"  # not meshwright's: kept
    assert steps_logged(tmp_path) == [1, 2, 3, 4]


def test_overwrite_removes_every_file_a_run_writes_and_nothing_else(tmp_path):
    """remove_outputs: meshwright's own names only (model.yaml and its .tmp were left behind before)."""
    from meshwright.train.run_dir import OUTPUTS, remove_outputs

    for name in OUTPUTS:
        (tmp_path / name).write_text("x")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "model.yml").write_text("mine")
    remove_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.yml", "notes.txt"]
    assert {"model.yaml", "model.yaml.tmp", "config.yaml", "plan.yaml", "log.jsonl", "summary.json"} <= set(OUTPUTS)


def test_overwrite_of_an_undeletable_ckpt_dir_is_one_line(tmp_path, monkeypatch):
    """--overwrite where the old run's files cannot go (a read-only ckpt/; as root a chmod does not stop rmtree, so
    the refusal is raised by the patched call) was a bare PermissionError traceback; a ckpt/ that is a mount point
    (rmdir: EBUSY) was one too, though it is empty once cleared and may stay."""
    import os
    from pathlib import Path

    from meshwright.train import run_dir

    def old_run() -> None:
        (tmp_path / "ckpt" / "step_000002").mkdir(parents=True, exist_ok=True)
        (tmp_path / "ckpt" / "step_000002" / "trainer_state.json").write_text("{}")
        (tmp_path / "ckpt" / "latest").write_text("step_000002\n")

    def refused(path, *a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    old_run()
    monkeypatch.setattr(run_dir.shutil, "rmtree", refused)
    with pytest.raises(ConfigError) as err:
        run_dir.remove_outputs(tmp_path)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"--overwrite: out_dir={str(tmp_path)!r} could "
                                                                     "not be cleared: Permission denied")
    assert "step_000002" in str(err.value)
    monkeypatch.undo()

    def busy(self):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(self))

    monkeypatch.setattr(Path, "rmdir", busy)
    run_dir.remove_outputs(tmp_path)  # cleared; the empty mount point stays
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"] and not any((tmp_path / "ckpt").iterdir())


def test_resume_refuses_a_changed_config_unless_told(data, tmp_path):
    run_training(cfg(data, tmp_path, steps=4))
    with pytest.raises(ConfigError) as err:
        run_training(cfg(data, tmp_path, steps=6, lr=1e-2), resume=True)
    assert "\n" not in str(err.value) and str(err.value).startswith("lr=0.01") and "--allow-config-change" in str(err.value)
    summary = run_training(cfg(data, tmp_path, steps=6), resume=True)  # more steps is a continuation
    assert summary["resumed"] and summary["steps_this_run"] == 2
    summary = run_training(cfg(data, tmp_path, steps=7, lr=1e-2), resume=True, allow_config_change=True)
    assert summary["steps_this_run"] == 1


def test_log_rewrite_drops_torn_lines_and_keeps_records_up_to_the_checkpoint(data, tmp_path):
    run_training(cfg(data, tmp_path, steps=4))
    log = tmp_path / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 5, "loss": 1.2')  # a kill mid-write of step 5's record
    assert [json.loads(x)["step"] for x in read_log(log, 10)] == [1, 2, 3, 4]
    (tmp_path / "ckpt" / "latest").write_text("step_000002\n")  # resume from step 2: records 3.. are redone
    run_training(cfg(data, tmp_path, steps=5), resume=True)
    assert steps_logged(tmp_path) == [1, 2, 3, 4, 5]
    assert not (tmp_path / "log.jsonl.tmp").exists()


def test_a_run_killed_after_its_final_checkpoint_gets_its_summary_on_resume(data, tmp_path):
    first = run_training(cfg(data, tmp_path, steps=4))
    (tmp_path / "summary.json").unlink()  # as if killed between the final checkpoint and the summary
    summary = run_training(cfg(data, tmp_path, steps=4), resume=True)
    assert summary["steps_this_run"] == 0 and summary["steps"] == 4
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["final_loss"] == first["final_loss"] and written["resumed"] is True


def test_disk_full_during_a_checkpoint_is_one_line_and_leaves_no_tmp(data, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp, "save", full)
    with pytest.raises(ConfigError) as err:
        run_training(cfg(data, tmp_path, steps=2))
    assert "\n" not in str(err.value) and "no space left on device" in str(err.value)
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_out_dir_that_is_a_file_or_unwritable_is_one_line(data, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError) as err:
        run_training(cfg(data, f))
    assert str(err.value).startswith("out_dir=") and "a file" in str(err.value)
    with pytest.raises(ConfigError) as err:
        run_training(cfg(data, f / "sub"))
    assert str(err.value).startswith("out_dir=") and "\n" not in str(err.value)


def test_cli_flags_overwrite_and_allow_config_change(data, tmp_path, capsys):
    from meshwright.cli import main

    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"model": MICRO, "data": {"path": str(data)}, "seq_len": 32, "global_batch": 8,
                                    "micro_batch": 4, "steps": 2, "warmup_steps": 1, "eval_every": 0, "log_every": 1,
                                    "out_dir": str(tmp_path / "out"), "progress": False, "energy": False}))
    assert main(["train", str(cfg_file)]) == 0
    assert main(["train", str(cfg_file)]) == 2  # another run's checkpoints: refused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert main(["train", str(cfg_file), "steps=3", "--overwrite"]) == 0  # flags after the overrides work too
    assert main(["train", str(cfg_file), "steps=4", "lr=0.01", "--resume"]) == 2
    assert "--allow-config-change" in capsys.readouterr().err
    assert main(["train", str(cfg_file), "steps=4", "lr=0.01", "--resume", "--allow-config-change"]) == 0



def test_a_resume_the_checkpoint_refuses_leaves_the_run_files_intact(data, tmp_path):
    """--allow-config-change with another model passes the saved-config check but not the checkpoint's shapes; the
    refused run used to rewrite config.yaml/model.yaml first, so `export` then read the run's checkpoints into the
    refused model."""
    from meshwright.train.hf_export import export_hf

    run_training(cfg(data, tmp_path / "run", steps=2))
    before = {n: (tmp_path / "run" / n).read_text() for n in ("config.yaml", "model.yaml")}
    with pytest.raises(ConfigError) as err:
        run_training(cfg(data, tmp_path / "run", steps=3, model={**MICRO, "d_model": 128}), resume=True,
                     allow_config_change=True)
    assert "does not fit this run" in str(err.value)
    assert {n: (tmp_path / "run" / n).read_text() for n in before} == before
    export_hf(tmp_path / "run", tmp_path / "hf")  # the run's own model: exports


def test_export_into_a_model_the_checkpoint_does_not_fit_is_one_line(data, tmp_path):
    """DCP's CheckpointException is a BaseException: `except Exception` let it out of `export` as a traceback."""
    from meshwright.train.hf_export import export_hf

    run_training(cfg(data, tmp_path / "run", steps=2))
    model_yaml = tmp_path / "run" / "model.yaml"
    model_yaml.write_text(model_yaml.read_text().replace("d_model: 64", "d_model: 128"))  # edited by hand
    with pytest.raises(ConfigError) as err:
        export_hf(tmp_path / "run", tmp_path / "hf")
    assert "\n" not in str(err.value) and "model.yaml" in str(err.value) and "step_000002" in str(err.value)


def test_ctrl_c_during_a_checkpoint_write_is_an_interruption(data, tmp_path, monkeypatch, capsys):
    """DCP wraps a KeyboardInterrupt in a CheckpointException: Ctrl-C mid-write was reported as `checkpoint ... could
    not be written: CheckpointException: KeyboardInterrupt` with exit 2, as if the disk had failed."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from meshwright.cli import main

    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"model": MICRO, "data": {"path": str(data)}, "seq_len": 32, "global_batch": 8,
                                    "micro_batch": 4, "steps": 4, "warmup_steps": 1, "eval_every": 0, "log_every": 1,
                                    "ckpt_every": 2, "out_dir": str(tmp_path / "out"), "progress": False,
                                    "energy": False}))
    real, calls = FileSystemWriter.write_data, []

    def ctrl_c_on_the_second_save(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(FileSystemWriter, "write_data", ctrl_c_on_the_second_save)
    assert main(["train", str(cfg_file)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "meshwright train: interrupted"
    ckpt = tmp_path / "out" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_000002"]  # no partial step_000004.tmp
    monkeypatch.setattr(FileSystemWriter, "write_data", real)
    assert main(["train", str(cfg_file), "--resume"]) == 0
    assert steps_logged(tmp_path / "out") == [1, 2, 3, 4]
