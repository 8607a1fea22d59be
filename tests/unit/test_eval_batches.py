"""``eval_batches`` bounds (issue #16): the trainer holds every evaluation batch in memory for the run, so 10^9
built batches at the first evaluation until memory ran out. A bound the config knows (tokens held) is one line at
validation; one it cannot know (the validation split's size: the data is loaded later) clamps with a note, since
the unshuffled val loader wraps around and further batches would only repeat the windows already scored."""

from __future__ import annotations

import pytest

from _train_helpers import MICRO, prepared_corpus
from meshwright.cli import main
from meshwright.config import load_cluster, load_model_config, load_train_config
from meshwright.config.schema import MAX_EVAL_TOKENS
from meshwright.data.loader import build_loaders
from meshwright.errors import ConfigError
from meshwright.models import build_model
from meshwright.train.local_runtime import LocalRuntime
from meshwright.train.trainer import Trainer


def test_a_huge_eval_batches_is_one_line_at_validation(capsys, tmp_path):
    most = MAX_EVAL_TOKENS // (8 * 64)  # tiny-test: global_batch 8, seq_len 64
    with pytest.raises(ConfigError) as err:
        load_train_config("tiny-test", {"eval_batches": 10**9})
    assert str(err.value).startswith(f"eval_batches=1000000000 is invalid; valid: at most {most:,} with global_batch=8 "
                                      f"and seq_len=64 (the trainer holds every evaluation batch in memory")
    assert load_train_config("tiny-test", {"eval_batches": most}).eval_batches == most
    rc = main(["train", "tiny-test", f"eval_batches={most + 1}", f"out_dir={tmp_path / 'o'}"])
    err_lines = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert rc == 2 and len(err_lines) == 1 and f"eval_batches={most + 1} is invalid" in err_lines[0]
    assert not (tmp_path / "o").exists()


def test_one_eval_batch_is_always_allowed():
    """A step's batch beyond the eval budget is held for training anyway: one evaluation batch of it is fine."""
    big = {"global_batch": 2**16, "micro_batch": 2**10, "seq_len": 2**13, "model": {**MICRO, "max_seq_len": 2**13}}
    assert load_train_config({**big, "eval_batches": 1}).eval_batches == 1
    with pytest.raises(ConfigError, match=r"^eval_batches=2 is invalid; valid: at most 1 with global_batch=65536"):
        load_train_config({**big, "eval_batches": 2})


def _trainer(data, out, eval_batches: int) -> tuple[Trainer, list[str]]:
    cfg = load_train_config({"model": MICRO, "data": {"path": str(data)}, "seq_len": 32, "global_batch": 8,
                             "micro_batch": 4, "steps": 2, "warmup_steps": 1, "eval_batches": eval_batches, "out_dir": str(out),
                             "progress": False})
    model_cfg = load_model_config(cfg.model)
    train, val, _ = build_loaders(cfg, model_cfg.vocab_size, progress=False)
    notes: list[str] = []
    trainer = Trainer(cfg, LocalRuntime(build_model(model_cfg, seed=cfg.seed)), train, val, model_cfg,
                      load_cluster(cfg.cluster), print_fn=notes.append)
    return trainer, notes


def test_more_batches_than_the_validation_split_clamp_to_one_pass_with_a_note(tmp_path):
    data = prepared_corpus(tmp_path)
    trainer, notes = _trainer(data, tmp_path / "a", 10_000)
    one_pass = trainer.val_loader.batches_per_pass
    assert 1 <= one_pass < 10_000
    assert trainer.eval_batch_count == one_pass
    assert len(notes) == 1 and notes[0].startswith(f"note: eval_batches=10000 clamped to {one_pass}: the validation "
                                                   f"split holds {trainer.val_loader.n_windows:,} sequences of 32 tokens")
    loss = trainer.evaluate()
    assert len(trainer._eval_batches) == one_pass * trainer.accum_steps  # held: one pass, not 10,000 batches
    # the same windows as asking for exactly one pass: the clamp drops only repeats
    exact, quiet = _trainer(data, tmp_path / "b", one_pass)
    assert exact.eval_batch_count == one_pass and quiet == []
    assert exact.evaluate() == loss
    small, quiet = _trainer(data, tmp_path / "c", 2)
    assert small.eval_batch_count == 2 and quiet == []
