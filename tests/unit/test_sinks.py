"""Logging sinks beside log.jsonl: TensorBoard event files read back, a W&B offline run, errors, scalars."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from _train_helpers import make_trainer, prepared_corpus
from meshwright.config import load_train_config
from meshwright.errors import ConfigError
from meshwright.tools import sinks as sinks_mod
from meshwright.tools.sinks import Sinks, open_sinks, scalars
from patience import Patience


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_corpus(tmp_path_factory.mktemp("sinks"))


def _events(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _wandb_records(path: Path) -> list[bytes]:
    """Records of a .wandb file: a 7-byte W&B header, then LevelDB log records (crc32c, u16 length, type) in
    32 KiB blocks; types 1 = full, 2/3/4 = first/middle/last fragment (wandb 0.31 ships no Python reader)."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, out, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or (kind == 0 and length == 0):
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            out.append(buf + chunk)
    return out


def test_scalars_keep_finite_numbers_and_split_ranks():
    rec = {"step": 3, "loss": 2.5, "lr": 1e-3, "memory_gib": [1.0, 1.5], "skipped": True, "grad_norm": float("nan"),
           "gpu_source": "nvml"}
    assert scalars(rec) == {"loss": 2.5, "lr": 1e-3, "memory_gib": 1.5, "memory_gib/rank0": 1.0,
                            "memory_gib/rank1": 1.5, "skipped": 1.0}


def test_trainer_writes_tensorboard_events_matching_log_jsonl(data, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    trainer = make_trainer(data, out, steps=4, eval_every=2, energy=False, tensorboard=True)
    trainer.fit()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    events = _events(out / "tensorboard")
    assert [s for s, _ in events["loss"]] == [r["step"] for r in log]
    assert [v for _, v in events["loss"]] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    assert [v for _, v in events["eval_loss"]] == pytest.approx([r["eval_loss"] for r in log if "eval_loss" in r], rel=1e-6)
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "memory_gib"} <= set(events)


def test_no_sinks_by_default_and_missing_package_is_one_line(tmp_path, monkeypatch):
    cfg = load_train_config("tiny-test")
    assert open_sinks(cfg, tmp_path).sinks == [] and not (tmp_path / "tensorboard").exists()
    Sinks().write({"step": 1, "loss": 1.0})  # a no-op without sinks
    import builtins

    real_import = builtins.__import__

    def no_tb(name, *a, **k):
        if name.startswith("torch.utils.tensorboard") or name == "wandb":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    with pytest.raises(ConfigError, match=r"^tensorboard=True needs the tensorboard package; valid: pip install") as e:
        sinks_mod.TensorBoardSink(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^wandb='offline' needs the wandb package"):
        sinks_mod.WandbSink(tmp_path, "offline", "p", {})


def test_wandb_mode_is_validated():
    with pytest.raises(ConfigError, match="wandb='cloud' is invalid"):
        load_train_config({"wandb": "cloud"})


def test_wandb_offline_run_records_the_scalars(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = load_train_config({"wandb": "offline", "wandb_project": "meshwright-test"})
    s = open_sinks(cfg, tmp_path, {"lr": 1e-3})
    for step in (1, 2, 3):
        s.write({"step": step, "loss": 3.0 - step, "memory_gib": [1.0]})
    run = s.sinks[0].run
    assert run.settings.mode == "offline" and run.config["lr"] == 1e-3
    s.close()
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    from wandb.proto import wandb_internal_pb2

    def records() -> list:
        out = []
        for data in _wandb_records(files[0]):  # the offline log, as `wandb sync` would upload it
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            out.append(rec)
        return out

    # wandb's service may still be flushing the file when finish() returns (seen: a 7-byte file); its
    # closing record is "exit", so wait for that (bounded) rather than read a half-written log
    patience = Patience(30)
    while not any(r.WhichOneof("record_type") == "exit" for r in records()) and not patience.expired():
        time.sleep(0.2)
    losses = []
    for rec in records():
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
            if "loss" in items:
                losses.append(float(items["loss"]))
    assert losses == [2.0, 1.0, 0.0]
    assert wandb.run is None
