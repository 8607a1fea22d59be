"""A data set that changes under a run, or between a run and its resume.

tokens.bin truncated while a run reads it was SIGBUS (a memory map, exit -7, no message); now one line and exit 2
with the checkpoints intact. A resume onto a directory re-prepared with other content was silent; now refused
naming what differs, unless --allow-config-change. Checkpoints from before the fingerprint still resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _train_helpers import MICRO, make_trainer
from meshwright.config import load_train_config
from meshwright.data.fingerprint import data_fingerprint
from meshwright.data.loader import TokenDataset
from meshwright.data.prepare import prepare
from meshwright.data.token_file import DataChanged
from meshwright.errors import ConfigError
from meshwright.train.build import run_training
from meshwright.train.checkpoint import latest_checkpoint
from meshwright.train.checkpoint_io import verify_manifest
from meshwright.train.trainer import lr_at
from patience import Patience, communicate

REPO = Path(__file__).resolve().parents[2]


def text_corpus(root: Path, letter_seed: int, chars: int = 20000) -> Path:
    """A one-document byte corpus of ``chars`` characters: every seed gives the same size, other bytes."""
    rng = np.random.default_rng(letter_seed)
    src = root / f"src{letter_seed}.txt"
    src.write_text("".join(rng.choice(list("abcdefghij \n"), chars)))
    return src


@pytest.fixture()
def corpus(tmp_path) -> Path:
    return prepare([text_corpus(tmp_path, 1)], tmp_path / "corpus", progress=False)


def test_reads_match_the_file_and_a_cut_or_rewritten_file_is_one_line(corpus):
    ds = TokenDataset(corpus)
    whole = np.fromfile(corpus / "tokens.bin", dtype=ds.tokens.dtype)
    assert np.array_equal(np.asarray(ds.tokens), whole) and ds.tokens[5] == whole[5]
    assert np.array_equal(ds.tokens[100:300:7], whole[100:300:7])
    val = ds.split("val", 0.1)
    assert np.array_equal(val[:50], whole[len(whole) - len(val):][:50])
    os.truncate(corpus / "tokens.bin", 1000)
    with pytest.raises(DataChanged, match=r"tokens.bin changed while the run was reading it \(now 1000 bytes"):
        ds.tokens.read_rows([0], 33)  # within the new size: the fstat after the read still sees the cut
    with pytest.raises(DataChanged, match="found its end"):
        ds.tokens[5000:5100]


def test_a_same_size_rewrite_in_place_is_refused(corpus):
    ds = TokenDataset(corpus)
    path = corpus / "tokens.bin"
    before = os.stat(path).st_mtime_ns
    with open(path, "r+b") as fh:  # in place: same inode, same size, other bytes
        fh.write(b"z" * 100)
    os.utime(path, ns=(before, before + 10**9))  # a later write; coarse-clock filesystems may not move it alone
    with pytest.raises(DataChanged, match="rewritten in place"):
        ds.tokens.read_rows([0], 33)


def test_fingerprint_is_the_same_for_the_same_inputs_prepared_again(tmp_path):
    src = text_corpus(tmp_path, 1)
    a = data_fingerprint(TokenDataset(prepare([src], tmp_path / "a", progress=False)))
    moved = tmp_path / "elsewhere.txt"
    moved.write_bytes(src.read_bytes())
    assert data_fingerprint(TokenDataset(prepare([moved], tmp_path / "b", progress=False))) == a
    other = data_fingerprint(TokenDataset(prepare([text_corpus(tmp_path, 2)], tmp_path / "c", progress=False)))
    assert other["num_tokens"] == a["num_tokens"] and other["tokens_bin_sample_sha256"] != a["tokens_bin_sample_sha256"]


def _config(data: Path, out: Path, **overrides) -> dict:
    return {"model": MICRO, "data": {"path": str(data)}, "seq_len": 32, "global_batch": 8, "micro_batch": 4,
            "steps": 4, "warmup_steps": 1, "eval_every": 0, "ckpt_every": 2, "log_every": 1, "out_dir": str(out),
            "progress": False, "energy": False, **overrides}


def test_resume_onto_reprepared_data_is_refused(tmp_path, capsys):
    data = prepare([text_corpus(tmp_path, 1)], tmp_path / "corpus", progress=False)
    run_training(load_train_config(_config(data, tmp_path / "run", steps=2)))
    # the same directory prepared again from other text of the same size: same windows, other sequences
    prepare([text_corpus(tmp_path, 2)], tmp_path / "corpus", progress=False)
    with pytest.raises(ConfigError, match=r"is not the data set checkpoint .*step_000002 was trained on "
                                          r"\(tokens_bin_sample_sha256 .*valid: that data set back") as err:
        run_training(load_train_config(_config(data, tmp_path / "run")), resume=True)
    assert "\n" not in str(err.value) and "num_tokens" not in str(err.value)  # one line, only what differs
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    capsys.readouterr()
    summary = run_training(load_train_config(_config(data, tmp_path / "run")), resume=True, allow_config_change=True)
    assert summary["steps"] == 4 and "resuming on it as asked" in capsys.readouterr().out


def test_allow_config_change_onto_other_data_starts_it_at_its_beginning(tmp_path, capsys):
    """--allow-config-change onto a data set of another fingerprint (the usual new data) carried the checkpoint's count
    of sequences onto the new data's windows: a position counted on other text, which skipped (or, past its epoch,
    repeated) windows of the new data. Now the new data starts at its first sequence, said in one line, and the
    tokens read so far still count."""
    data = prepare([text_corpus(tmp_path, 1)], tmp_path / "corpus", progress=False)
    run_training(load_train_config(_config(data, tmp_path / "run", steps=2)))
    prepare([text_corpus(tmp_path, 2, chars=12000)], tmp_path / "corpus", progress=False)
    capsys.readouterr()
    summary = run_training(load_train_config(_config(data, tmp_path / "run")), resume=True, allow_config_change=True)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "resuming on it as asked" in x)
    assert "num_tokens 20001 -> 12001" in line and "it starts at its first sequence (the checkpoint's position, 16 " \
        "sequences, counted other data); the 512 tokens read so far carry over" in line, out
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 8 * 32
    state = json.loads((latest_checkpoint(tmp_path / "run" / "ckpt") / "trainer_state.json").read_text())
    assert state["train_loader"]["consumed"] == 2 * 8 and state["train_loader"]["data"]["num_tokens"] == 12001
    fresh = make_trainer(data, tmp_path / "unused").train_loader  # the new data's own first batches
    resumed = make_trainer(data, tmp_path / "unused").train_loader
    old_state = {**state["train_loader"], "consumed": 16, "data": {**state["train_loader"]["data"], "num_tokens": 1}}
    resumed.load_state_dict(old_state, data_changed=True)
    for _ in range(3):
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(fresh.next_batch(), resumed.next_batch()))
    with pytest.raises(ConfigError, match="is not the data set"):  # without the flag: still refused
        prepare([text_corpus(tmp_path, 3, chars=9000)], tmp_path / "corpus", progress=False)
        run_training(load_train_config(_config(data, tmp_path / "run", steps=6)), resume=True)


def test_a_checkpoint_without_a_fingerprint_still_resumes(corpus, tmp_path):
    old = make_trainer(corpus, tmp_path / "run", steps=2, eval_every=0)
    old.train_loader.data_fingerprint = None  # what checkpoints written before the fingerprint hold
    old.fit()
    assert "data" not in json.loads((latest_checkpoint(tmp_path / "run" / "ckpt") / "trainer_state.json").read_text())["train_loader"]
    printed: list[str] = []
    new = make_trainer(corpus, tmp_path / "run", steps=4, eval_every=0)
    new.print = printed.append
    summary = new.fit(resume=True)
    assert summary["resumed"] and summary["steps"] == 4
    assert any("records no data fingerprint" in line for line in printed), printed
    assert "data" in json.loads((latest_checkpoint(tmp_path / "run" / "ckpt") / "trainer_state.json").read_text())["train_loader"]


def test_tokens_cut_mid_run_is_one_line_not_a_bus_error(tmp_path):
    data = prepare([text_corpus(tmp_path, 1, chars=200000)], tmp_path / "corpus", progress=False)
    out = tmp_path / "run"
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(_config(data, out, steps=100000, ckpt_every=2, keep_checkpoints=2)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("MESHWRIGHT_FAULT", None)
    proc = subprocess.Popen([sys.executable, "-m", "meshwright.cli", "train", str(cfg_file)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        patience = Patience(120)
        while latest_checkpoint(out / "ckpt") is None:  # training, with a checkpoint to keep
            assert proc.poll() is None, proc.communicate()
            assert not patience.expired(), f"no checkpoint after {patience.waited()}"
            time.sleep(0.05)
        os.truncate(data / "tokens.bin", 20000)  # a tenth: the next batch's windows lie mostly past the end
        _, err = communicate(proc, 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    errors = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, err[-2000:])  # not -7 (SIGBUS)
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert "tokens.bin changed while the run was reading it" in errors[0] and "restore the data" in errors[0]
    verify_manifest(latest_checkpoint(out / "ckpt"))  # every file there, its SHA-256 as written: intact


def _intervals(loader, steps: int) -> list[tuple[int, int]]:
    """Token ranges [start, end) of the windows the next ``steps`` batches read (each window's last token is the
    next one's first: it counts with the window it starts)."""
    out = []
    for _ in range(steps):
        first = loader.consumed
        loader.consumed += loader.global_batch
        windows = map(loader._window, range(first, loader.consumed))
        out += [(w * loader.seq_len, (w + 1) * loader.seq_len) for w in windows]
    return out


def _overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    seen = np.zeros(max(e for _, e in a + b), dtype=np.int32)
    for s, e in a:
        seen[s:e] += 1
    return sum(int(seen[s:e].sum()) for s, e in b)


def _loader(tokens, seq_len, seed=0):
    from meshwright.data.loader import SequenceLoader

    return SequenceLoader(tokens, seq_len=seq_len, global_batch=4, micro_batch=4, seed=seed)


@pytest.mark.parametrize("change", [{"seq_len": 32}, {"seq_len": 8}, {"seq_len": 24}, {"seed": 7}])
def test_a_changed_seq_len_or_seed_carries_the_tokens_and_reads_no_text_of_the_epoch_twice(change):
    """--allow-config-change onto another seq_len or seed was refused by the loader; now the tokens carry over and
    the rest of the epoch reads only text the epoch has not read yet (stream.py)."""
    tokens = np.arange(16 * 400 + 1) % 50000
    old = _loader(tokens, 16)
    old.consumed = 400  # epoch 1 (the tokens of epoch 0 count as read: tokens_at)
    read = _intervals(old, 25)  # its first 100 windows
    state = old.state_dict()
    assert state["tokens"] == 500 * 16
    new = _loader(tokens, change.get("seq_len", 16), change.get("seed", 0))
    field = next(iter(change))
    with pytest.raises(ConfigError, match=rf"^resume: train loader {field}=.* differs from the checkpoint's "
                                          r".*--allow-config-change to continue the run at"):
        new.load_state_dict(state)
    note = new.load_state_dict(state, data_changed=True)
    assert note.startswith(f"note: resuming with {field} ") and "8,000 tokens read so far carry over" in note
    assert new.tokens_at(new.consumed) == 8000 and new.consumed // new.n_windows == 1
    start, end = new.consumed, 2 * new.n_windows  # the rest of epoch 1
    rest = _intervals(new, -(-(end - start) // 4))
    epoch_1 = rest[: end - start]
    assert _overlap(read, epoch_1) == 0  # nothing read twice in the epoch
    assert len(set(epoch_1)) == len(epoch_1) and len(epoch_1) > new.n_windows // 2
    assert new.tokens_at(new.consumed) == 8000 + len(rest) * new.seq_len
    fresh = _loader(tokens, new.seq_len, new.seed)  # the next epoch is the new settings' own permutation
    assert [new._window(p) for p in range(2 * new.n_windows, 3 * new.n_windows)] == \
        [fresh._window(p) for p in range(2 * new.n_windows, 3 * new.n_windows)]


def test_two_changes_in_one_epoch_stack_and_resume_exactly():
    tokens = np.arange(16 * 300 + 1) % 50000
    a = _loader(tokens, 16)
    read = _intervals(a, 10)
    b = _loader(tokens, 32, seed=3)
    b.load_state_dict(a.state_dict(), data_changed=True)
    read += _intervals(b, 5)
    c = _loader(tokens, 8, seed=5)
    c.load_state_dict(b.state_dict(), data_changed=True)
    state = c.state_dict()
    assert [s["seq_len"] for s in state["transition"]["segments"]] == [16, 32]
    again = _loader(tokens, 8, seed=5)
    assert again.load_state_dict(json.loads(json.dumps(state))) is None  # the same settings: exact, no note
    rest = _intervals(c, (c.n_windows - c.consumed) // 4)
    assert _intervals(again, len(rest) // 4) == rest and _overlap(read, rest) == 0


def test_meshwright_train_resumes_a_seq_len_32_run_at_64(tmp_path, capsys):
    """Context extension through the real `meshwright train`: without the flag one line naming the field, both
    values and the flag; with it the run continues at step 2, its token counts those really read."""
    from _train_helpers import one_line_error
    from meshwright.cli import main

    data = prepare([text_corpus(tmp_path, 1)], tmp_path / "corpus", progress=False)
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps(_config(data, tmp_path / "run", steps=2, eval_every=2)))
    assert main(["train", str(cfg_file)]) == 0
    line = one_line_error(capsys, ["train", str(cfg_file), "steps=4", "seq_len=64", "--resume"])
    assert "seq_len=64 is invalid; valid: 32 as in the checkpoint" in line and "--allow-config-change" in line
    line = one_line_error(capsys, ["train", str(cfg_file), "steps=4", "seq_len=128", "--resume",
                                   "--allow-config-change"])
    assert "seq_len=128 is invalid; valid: at most model.max_seq_len=64" in line  # the model's maximum
    assert main(["train", str(cfg_file), "steps=4", "seq_len=64", "--resume", "--allow-config-change"]) == 0
    out = capsys.readouterr().out
    assert "note: resuming with seq_len 32 -> 64: 512 tokens read so far carry over; epoch 0 goes on" in out, out
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in log] == [256, 512, 512 + 512, 512 + 1024]  # 8 x 32, then 8 x 64 per step
    # eval losses at 32 and 64 tokens are not one series: every record says its seq_len, and the report parts them
    assert [r["seq_len"] for r in log] == [32, 32, 64, 64] and "eval_loss" in log[1] and "eval_loss" in log[3]
    from meshwright.tools.report import figures, read_run, totals_table

    run = read_run(tmp_path / "run")
    loss = next(f for f in figures(run["rows"], run["summary"]) if f.name == "loss")
    assert [(s.label, s.xs) for s in loss.series] == [
        ("train loss (seq_len 32)", [1, 2]), ("eval loss (seq_len 32)", [2]),
        ("train loss (seq_len 64)", [3, 4]), ("eval loss (seq_len 64)", [4])]
    assert "seq_len changed (32 -> 64 at step 3)" in loss.caption
    assert ["eval loss", f"{run['summary']['eval_loss']:.4g}", "at seq_len 64"] in totals_table(run["summary"]).rows
    resumed_cfg = load_train_config(_config(data, tmp_path / "run", steps=4, seq_len=64))
    assert [r["lr"] for r in log[2:]] == [lr_at(2, resumed_cfg), lr_at(3, resumed_cfg)]  # the schedule goes on by step
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens"] == 1536 and summary["resumed"]
    state = json.loads((latest_checkpoint(tmp_path / "run" / "ckpt") / "trainer_state.json").read_text())
    assert state["train_loader"]["seq_len"] == 64 and state["train_loader"]["tokens"] == 1536
    assert main(["train", str(cfg_file), "steps=6", "seq_len=64", "--resume"]) == 0  # the new settings resume plainly
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["tokens"] == 1536 + 1024
    capsys.readouterr()
    src = latest_checkpoint(tmp_path / "run" / "ckpt")  # another run's checkpoint: named as such, not this out_dir's
    assert main(["train", str(cfg_file), "steps=7", "seq_len=64", f"out_dir={tmp_path / 'other'}", "--resume-from",
                 str(src)]) == 0
    assert f"resumed from {src} at step 6" in capsys.readouterr().out
    # the `latest` pointer file (what tab completion gives) means the checkpoint it names
    assert main(["train", str(cfg_file), "steps=7", "seq_len=64", f"out_dir={tmp_path / 'third'}", "--resume-from",
                 str(tmp_path / "run" / "ckpt" / "latest")]) == 0
    assert f"resumed from {src} at step 6" in capsys.readouterr().out
