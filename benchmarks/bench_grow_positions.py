"""grow_positions on a pretrained GPT-2-style decoder: what each way of growing the learned position table costs.

1. meshwright pretrains a small GPT-2 decoder (byte tokens, stdlib sources) at seq_len = max_seq_len = SHORT;
2. the checkpoint is resumed at max_seq_len = seq_len = LONG (``--allow-config-change``) three ways: ``copy``
   (new rows repeat the trained table), ``interpolate`` (the table resampled) and, as the baseline the opt-in avoids,
   new rows drawn at random (the trained rows kept: kinder than transformers' ``ignore_mismatched_sizes``, which
   redraws the whole table), their AdamW moments zero;
3. each is evaluated right after the growth (held-out batches at LONG, and at SHORT: do sequences that fit the old
   table still see the model they trained?) and after FT more steps at LONG.

Eval losses are deterministic on this CPU for a given torch build; step times are not reported.

Usage: .venv/bin/python benchmarks/bench_grow_positions.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshwright.config import load_cluster, load_model_config, load_train_config  # noqa: E402
from meshwright.data.corpus import stdlib_files  # noqa: E402
from meshwright.data.loader import build_loaders  # noqa: E402
from meshwright.data.prepare import prepare  # noqa: E402
from meshwright.models import build_model  # noqa: E402
from meshwright.train.build import run_training  # noqa: E402
from meshwright.train.local_runtime import LocalRuntime  # noqa: E402
from meshwright.train.trainer import Trainer  # noqa: E402

SHORT, LONG = 64, 256
MODEL = {"name": "grow-bench", "arch": "gpt2", "vocab_size": 256, "d_model": 96, "n_layers": 4, "n_heads": 4,
         "ffn_hidden": 256, "max_seq_len": SHORT}
EVAL_BATCHES = 6


def config(data: Path, out: Path, seq_len: int, steps: int, **extra):
    return load_train_config({"model": {**MODEL, "max_seq_len": seq_len}, "data": {"path": str(data)}, "seq_len": seq_len,
                              "global_batch": 8, "micro_batch": 8, "steps": steps, "lr": 3e-3, "min_lr": 3e-4,
                              "warmup_steps": 10, "eval_every": 0, "eval_batches": EVAL_BATCHES, "out_dir": str(out),
                              "progress": False, "energy": False, "log_every": 1000, **extra})


def eval_at(trainer: Trainer, data: Path, seq_len: int) -> float:
    c = config(data, Path("unused"), seq_len, 100)
    _, val, _ = build_loaders(c, 256, progress=False)
    return trainer.runtime.eval_loss(val.fixed_batches(EVAL_BATCHES))


def grown(data: Path, run: Path, how: str, steps: int) -> Trainer:
    rule = "copy" if how == "random new rows" else how
    c = config(data, run, LONG, steps, grow_positions=rule)
    model_cfg = load_model_config(c.model)
    train, val, _ = build_loaders(c, 256, progress=False)
    t = Trainer(c, LocalRuntime(build_model(model_cfg, seed=c.seed)), train, val, model_cfg, load_cluster(c.cluster),
                print_fn=lambda s: None)
    t.allow_data_change = True
    assert t.resume()
    if how == "random new rows":
        table = t.runtime.model.pos_embeddings.weight
        with torch.no_grad():
            table[SHORT:].normal_(0.0, model_cfg.init_std / 2, generator=torch.Generator().manual_seed(0))
            for moment in ("exp_avg", "exp_avg_sq"):
                t.optimizer.state[table][moment][SHORT:] = 0
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    pre, ft = (60, 10) if args.quick else (400, 60)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare(stdlib_files(400)[:300], root / "data", progress=False)
        summary = run_training(config(data, root / "pretrain", SHORT, pre))
        rows = []
        for how in ("copy", "interpolate", "random new rows"):
            run = root / how.replace(" ", "-")
            shutil.copytree(root / "pretrain", run)
            t = grown(data, run, how, pre + ft)
            at_grow = eval_at(t, data, LONG), eval_at(t, data, SHORT)
            t.fit()
            rows.append((how, *at_grow, eval_at(t, data, LONG), eval_at(t, data, SHORT)))
            print(how, rows[-1][1:], flush=True)
    took = time.perf_counter() - t0
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = [f"# Growing a GPT-2 position table on resume: copy vs interpolate ({date}, 2-core shared CPU, torch "
             f"{torch.__version__}, 1 thread)", "",
             f"Command: `.venv/bin/python benchmarks/bench_grow_positions.py{' --quick' if args.quick else ''}` "
             f"(whole script {took:.0f} s)", "",
             f"A GPT-2 decoder (d_model 96, 4 layers, byte tokens) pretrained {pre} steps x 8 x {SHORT} tokens on 300 "
             f"stdlib files (eval loss {summary['eval_loss']:.3f} at seq_len {SHORT}), then resumed at "
             f"model.max_seq_len = seq_len = {LONG} with `--allow-config-change` and `grow_positions`, and trained "
             f"{ft} more steps x 8 x {LONG} tokens. Eval: {EVAL_BATCHES} fixed held-out batches of 8 sequences at "
             f"each length. 'random new rows' keeps the trained rows and draws the new ones as a fresh model would "
             f"(N(0, init_std/2)), moments zero: what the opt-in is for avoiding.", "",
             f"| growth | eval loss at {LONG}, right after | at {SHORT}, right after | at {LONG}, after {ft} steps | "
             f"at {SHORT}, after {ft} steps |", "|---|---|---|---|---|"]
    lines += [f"| {how} | {a:.3f} | {b:.3f} | {c:.3f} | {d:.3f} |" for how, a, b, c, d in rows]
    lines += ["", f"At {SHORT} tokens `copy` and 'random new rows' read exactly the trained rows, so their first "
              f"column at {SHORT} equals the pretrained eval loss; `interpolate` moves every position."]
    out = Path(args.out) / "grow_positions.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
