"""Small shared setup for trainer/checkpoint tests: a micro model on a prepared stdlib sample."""

from __future__ import annotations

from pathlib import Path

from meshwright.config import load_cluster, load_model_config, load_train_config
from meshwright.data.corpus import stdlib_files
from meshwright.data.loader import build_loaders
from meshwright.data.prepare import prepare
from meshwright.train.local_runtime import LocalRuntime
from meshwright.models import build_model
from meshwright.train.trainer import Trainer

MICRO = {"name": "micro", "arch": "llama", "vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 4,
         "n_kv_heads": 2, "ffn_hidden": 128, "max_seq_len": 64}


def prepared_corpus(root: Path) -> Path:
    return prepare(stdlib_files(30), root / "corpus", progress=False)


def make_trainer(data: Path, out: Path, runtime_cls=LocalRuntime, **overrides) -> Trainer:
    cfg = load_train_config({
        "model": MICRO, "data": {"path": str(data)}, "seq_len": 32, "global_batch": 8, "micro_batch": 4,
        "steps": 10, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "eval_every": 5, "eval_batches": 2,
        "log_every": 1, "out_dir": str(out), "progress": False, **overrides,
    })
    model_cfg = load_model_config(cfg.model)
    runtime = runtime_cls(build_model(model_cfg, seed=cfg.seed))
    train, val, _ = build_loaders(cfg, model_cfg.vocab_size, progress=False)
    return Trainer(cfg, runtime, train, val, model_cfg, load_cluster(cfg.cluster), print_fn=lambda s: None)


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; assert exit 2 with exactly one stderr line (progress bars aside); return that line."""
    from meshwright.cli import main

    rc = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "error:" in ln]
    assert rc == 2 and len(err) == 1, (rc, err)
    return err[0]


def trained_run(root: Path) -> Path:
    """A finished 2-step run of the MICRO model under ``root`` (its out_dir): checkpoints and files to damage or export."""
    from meshwright.train.build import run_training

    cfg = load_train_config({"model": MICRO, "data": {"path": str(prepared_corpus(root))}, "seq_len": 32,
                             "global_batch": 8, "micro_batch": 4, "steps": 2, "warmup_steps": 1, "eval_every": 0,
                             "out_dir": str(root / "run"), "progress": False, "energy": False})
    run_training(cfg)
    return root / "run"
