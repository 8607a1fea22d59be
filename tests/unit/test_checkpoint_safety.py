"""A checkpoint is data, never code, and damage to it is named in one line: hostile .metadata and byte items
are refused without running anything, every file is checksummed, a damaged newest checkpoint falls back to
the previous one, and a checkpoint of another model or optimizer is named."""

import json
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from _train_helpers import MICRO, make_trainer, prepared_corpus
from meshwright.errors import ConfigError
from meshwright.train.checkpoint import latest_checkpoint, load_runtime
from meshwright.train.checkpoint_io import (
    CheckpointCorrupt, SafeFileSystemReader, SafeLoadPlanner, read_metadata_file, write_manifest,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def two_ckpts(data, tmp_path_factory):
    """A run with checkpoints at steps 2 and 4 (copied per test, never modified)."""
    out = tmp_path_factory.mktemp("run")
    make_trainer(data, out, steps=4, ckpt_every=2, eval_every=0, warmup_steps=1).fit()
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


class _Touch:
    """Unpickling this calls open(path, 'w'): the file appears iff the unpickler ran attacker-chosen code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def one_line(exc):
    return "\n" not in str(exc) and "Traceback" not in str(exc)


def test_metadata_that_would_run_code_is_refused_and_nothing_runs(data, two_ckpts, tmp_path):
    run = _copy(two_ckpts, tmp_path / "run")
    ckpt = latest_checkpoint(run / "ckpt")
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Touch(marker)))
    write_manifest(ckpt)  # an attacker rewrites the checksums too: they do not make a file trusted
    t = make_trainer(data, tmp_path / "b", steps=4, eval_every=0, warmup_steps=1)
    with pytest.raises(ConfigError) as err:
        load_runtime(ckpt, t.runtime, t.optimizer)
    assert not marker.exists()
    assert one_line(err.value) and "io.open is not a DCP metadata class" in str(err.value) and ".metadata" in str(err.value)
    with pytest.raises(CheckpointCorrupt):
        read_metadata_file(ckpt / ".metadata")
    assert not marker.exists()


def test_byte_items_are_loaded_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    dcp.save({"x": {"a": _Touch(marker)}, "w": torch.ones(2)}, checkpoint_id=str(tmp_path / "c"))
    assert not marker.exists()
    state = {"x": {"a": None}, "w": torch.zeros(2)}
    with pytest.raises(BaseException) as err:  # DCP wraps the refusal in its CheckpointException
        dcp.load(state, storage_reader=SafeFileSystemReader(str(tmp_path / "c")), planner=SafeLoadPlanner())
    assert not marker.exists()
    assert "refused" in str(err.value)
    # plain data in byte items still loads
    dcp.save({"x": {"lr": 0.1, "betas": (0.9, 0.95), "name": "a"}, "w": torch.ones(2)}, checkpoint_id=str(tmp_path / "d"))
    state = {"x": {"lr": None, "betas": None, "name": None}, "w": torch.zeros(2)}
    dcp.load(state, storage_reader=SafeFileSystemReader(str(tmp_path / "d")), planner=SafeLoadPlanner())
    assert state["x"] == {"lr": 0.1, "betas": (0.9, 0.95), "name": "a"} and torch.equal(state["w"], torch.ones(2))


def _truncate(f):
    f.write_bytes(f.read_bytes()[: max(len(f.read_bytes()) // 2, 1)])


def _zero(f):
    f.write_bytes(bytes(len(f.read_bytes())))


def _garble(f):
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))


DAMAGE = [("__0_0.distcp", _truncate), ("__0_0.distcp", _garble), (".metadata", _zero), (".metadata", _truncate),
          ("trainer_state.json", _garble), ("rng_rank00000.pt", _truncate), ("checksums.json", _garble)]


@pytest.mark.parametrize("name,damage", DAMAGE, ids=[f"{n}-{d.__name__[1:]}" for n, d in DAMAGE])
def test_damage_is_one_line_and_resume_falls_back_to_the_previous_checkpoint(data, two_ckpts, tmp_path, name, damage):
    run = _copy(two_ckpts, tmp_path / "run")
    newest = run / "ckpt" / "step_000004"
    damage(newest / name)
    with pytest.raises(ConfigError) as err:  # the checkpoint alone: one line naming the file
        t = make_trainer(data, run, steps=4, eval_every=0, warmup_steps=1)
        load_runtime(newest, t.runtime, t.optimizer)
    assert one_line(err.value) and "step_000004" in str(err.value)
    assert str(err.value).endswith("; valid: an intact checkpoint (a resume falls back to the newest intact step_*; "
                                   "--resume-from and export can name another)")  # what to do, as every one-line error
    warnings = []
    t = make_trainer(data, run, steps=4, eval_every=0, warmup_steps=1)
    t.print = warnings.append
    assert t.resume() is True and t.step == 2  # fell back to step 2
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and "step_000004" in warnings[0]
    assert "valid:" not in warnings[0]  # the fall-back warning says the damage and what it does instead


def test_all_checkpoints_damaged_is_one_line(data, two_ckpts, tmp_path):
    run = _copy(two_ckpts, tmp_path / "run")
    for step in ("step_000002", "step_000004"):
        _garble(run / "ckpt" / step / "__0_0.distcp")
    t = make_trainer(data, run, steps=4, eval_every=0, warmup_steps=1)
    t.print = lambda s: None
    with pytest.raises(ConfigError) as err:
        t.resume()
    assert one_line(err.value) and "step_000004" in str(err.value) and "SHA-256" in str(err.value)


def test_binary_latest_pointer_falls_back_to_newest_complete(two_ckpts, tmp_path):
    run = _copy(two_ckpts, tmp_path / "run")
    (run / "ckpt" / "latest").write_bytes(b"\xff\xfe\x00garbage")
    assert latest_checkpoint(run / "ckpt").name == "step_000004"
    (run / "ckpt" / "latest").write_text("../../etc\n")
    assert latest_checkpoint(run / "ckpt").name == "step_000004"


def test_a_checkpoint_of_another_model_or_optimizer_is_named(data, two_ckpts, tmp_path):
    ckpt = two_ckpts / "ckpt" / "step_000004"
    bigger = make_trainer(data, tmp_path / "a", model={**MICRO, "n_layers": 3}, steps=4, eval_every=0, warmup_steps=1)
    with pytest.raises(ConfigError) as err:
        load_runtime(ckpt, bigger.runtime, bigger.optimizer)
    assert one_line(err.value) and "layers.2." in str(err.value) and "model parameter" in str(err.value)
    wider = make_trainer(data, tmp_path / "b", model={**MICRO, "ffn_hidden": 96}, steps=4, eval_every=0, warmup_steps=1)
    with pytest.raises(ConfigError) as err:
        load_runtime(ckpt, wider.runtime, wider.optimizer)
    assert one_line(err.value) and "shape" in str(err.value) and "(128, 64)" in str(err.value)
    smaller = make_trainer(data, tmp_path / "c", model={**MICRO, "n_layers": 1}, steps=4, eval_every=0, warmup_steps=1)
    with pytest.raises(ConfigError) as err:
        load_runtime(ckpt, smaller.runtime, smaller.optimizer)
    assert one_line(err.value) and "lacks" in str(err.value) and "layers.1." in str(err.value)
    coat = make_trainer(data, tmp_path / "d", optimizer="coat_adamw", steps=4, eval_every=0, warmup_steps=1)
    with pytest.raises(ConfigError) as err:
        load_runtime(ckpt, coat.runtime, coat.optimizer)
    assert one_line(err.value) and "optimizer state" in str(err.value)


def test_checksums_are_written_with_every_checkpoint(two_ckpts):
    ckpt = two_ckpts / "ckpt" / "step_000004"
    files = json.loads((ckpt / "checksums.json").read_text())["files"]
    assert set(files) == {p.name for p in ckpt.iterdir() if p.name != "checksums.json"}
    assert all(len(e["sha256"]) == 64 for e in files.values())


def test_a_checkpoint_that_cannot_be_swapped_in_is_its_own_one_line_and_leaves_no_tmp(data, tmp_path, monkeypatch):
    """The final rename of step_N.tmp into place (an unwritable ckpt/, chattr +i as root) raised a bare OSError: the
    CLI's generic "path ... is unusable" line, and the .tmp stayed. Now the checkpoint's own line and no .tmp."""
    import os

    from meshwright.train.checkpoint import STEP_RE

    real = os.replace

    def refuse_swap(src, dst, *a, **k):
        if str(src).endswith(".tmp") and STEP_RE.match(os.path.basename(str(dst))):
            raise PermissionError(1, "Operation not permitted", str(src), None, str(dst))
        return real(src, dst, *a, **k)

    t = make_trainer(data, tmp_path / "run", steps=4, eval_every=0, warmup_steps=1)
    t.fit()
    good = latest_checkpoint(tmp_path / "run" / "ckpt")
    monkeypatch.setattr(os, "replace", refuse_swap)
    with pytest.raises(ConfigError) as err:
        t.save()
    line = str(err.value)
    assert one_line(err.value) and line.startswith(f"checkpoint {good} could not be written: PermissionError")
    assert "; valid: a writable" in line
    assert sorted(p.name for p in (tmp_path / "run" / "ckpt").iterdir()) == ["latest", good.name]  # the old one back


def test_a_checkpoint_named_by_its_pointer_or_its_ckpt_dir_is_the_one_latest_names(tmp_path):
    """--resume-from and export given ckpt/latest or ckpt/ (what users tab-complete to) were refused in one line;
    they mean the checkpoint `latest` names. Other paths are left to their own checks."""
    from meshwright.train.checkpoint import follow_pointer

    ckpt = tmp_path / "run" / "ckpt"
    for step in ("step_000002", "step_000004"):
        (ckpt / step).mkdir(parents=True)
        (ckpt / step / "trainer_state.json").write_text("{}")
    (ckpt / "latest").write_text("step_000002\n")
    assert follow_pointer(ckpt / "latest") == ckpt / "step_000002"
    assert follow_pointer(ckpt) == ckpt / "step_000002"
    for other in (ckpt / "step_000004", tmp_path / "run", tmp_path / "missing"):
        assert follow_pointer(other) == other


@pytest.mark.parametrize("cut", ["half", "last_byte", "missing"])
def test_a_truncated_shard_without_checksums_is_found_from_the_metadata_and_resume_falls_back(
        data, two_ckpts, tmp_path, capsys, cut):
    """A checkpoint without checksums.json (an older meshwright, another tool) has no hashes to verify: its
    .metadata's offsets and lengths say how long each .distcp must be, so a short or missing shard is named in one
    line and a resume falls back, as with checksums (it went to DCP, which failed deep inside torch)."""
    run = _copy(two_ckpts, tmp_path / "run")
    for step in ("step_000002", "step_000004"):
        (run / "ckpt" / step / "checksums.json").unlink()
    newest = run / "ckpt" / "step_000004"
    shard = newest / "__0_0.distcp"
    size = shard.stat().st_size
    if cut == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[: size // 2 if cut == "half" else size - 1])
    t = make_trainer(data, run, steps=4, eval_every=0, warmup_steps=1)
    with pytest.raises(CheckpointCorrupt) as err:
        load_runtime(newest, t.runtime, t.optimizer)
    assert one_line(err.value) and str(shard) in str(err.value)
    assert ("is missing" if cut == "missing" else f"is truncated: {shard.stat().st_size} bytes, its .metadata "
            f"places data up to byte {size}") in str(err.value)
    warnings = []
    t = make_trainer(data, run, steps=4, eval_every=0, warmup_steps=1)
    t.print = warnings.append
    assert t.resume() is True and t.step == 2  # fell back to step 2, itself loaded unverified
    assert len(warnings) == 1 and warnings[0].startswith("warning: checkpoint file") and str(shard) in warnings[0]
    assert "no checksums.json" in capsys.readouterr().err  # step 2 is still said to be unverified


def test_export_of_a_truncated_shard_without_checksums_names_the_file(tmp_path):
    """export read it with DCP and said the checkpoint 'does not hold the plain model' (a torch zip error)."""
    from _train_helpers import trained_run
    from meshwright.train.hf_export import export_hf

    run = trained_run(tmp_path)
    newest = latest_checkpoint(run / "ckpt")
    (newest / "checksums.json").unlink()
    shard = newest / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointCorrupt) as err:
        export_hf(str(run), str(tmp_path / "hf"))
    assert one_line(err.value) and f"checkpoint file {shard} is truncated: 100 bytes" in str(err.value)
    assert not (tmp_path / "hf").exists()
