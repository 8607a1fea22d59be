"""A GPT-2 model's learned position table at a longer context (models/positions.py, ``grow_positions``).

A resume (``--allow-config-change``) or an ``init_from`` fine-tune with ``model.max_seq_len`` above the table the
weights were trained with was a shape mismatch naming the checkpoint ("does not fit this run", "valid: a model config
matching the checkpoint's config.json"): nothing said how to get a longer context. Now it is one line naming
``model.max_seq_len`` and ``grow_positions``; with it the table grows (copy: Longformer's repeat; interpolate: a
linear resample) and, on resume, AdamW's moments of the table grow by the same rule, so the checkpoint written next is
the new shape throughout and resumes plainly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _train_helpers import MICRO, prepared_corpus
from meshwright.config import load_cluster, load_model_config, load_train_config
from meshwright.data.loader import build_loaders
from meshwright.errors import ConfigError
from meshwright.models import build_model
from meshwright.models.positions import grow_table
from meshwright.train.build import run_training
from meshwright.train.local_runtime import LocalRuntime
from meshwright.train.trainer import Trainer

GPT2 = {"name": "g", "arch": "gpt2", "vocab_size": 256, "d_model": 32, "n_layers": 1, "n_heads": 2, "ffn_hidden": 64,
        "max_seq_len": 32}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepared_corpus(tmp_path_factory.mktemp("grow"))


def cfg(data: Path, out: Path, **overrides):
    return load_train_config({"model": GPT2, "data": {"path": str(data)}, "seq_len": 32, "global_batch": 4,
                              "micro_batch": 4, "steps": 2, "warmup_steps": 1, "eval_every": 0, "out_dir": str(out),
                              "progress": False, "energy": False, **overrides})


def longer(data: Path, out: Path, **overrides):
    return cfg(data, out, **{"model": {**GPT2, "max_seq_len": 64}, "seq_len": 64, "steps": 4, **overrides})


def trainer(c) -> Trainer:
    model_cfg = load_model_config(c.model)
    train, val, _ = build_loaders(c, model_cfg.vocab_size, progress=False)
    t = Trainer(c, LocalRuntime(build_model(model_cfg, seed=c.seed)), train, val, model_cfg, load_cluster(c.cluster),
                print_fn=lambda s: None)
    t.allow_data_change = True  # --allow-config-change: seq_len 32 -> 64
    return t


def table_and_moments(t: Trainer) -> list[torch.Tensor]:
    table = t.runtime.model.pos_embeddings.weight
    state = t.optimizer.state[table]
    return [table.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()]


def test_grow_rules():
    table = torch.arange(8.0).reshape(4, 2)
    assert grow_table(table, 10, "copy").tolist() == [table[i % 4].tolist() for i in range(10)]
    resampled = grow_table(table, 7, "interpolate")  # row i reads position i * 3 / 6
    assert torch.allclose(resampled[:, 0], torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    assert torch.equal(resampled[0], table[0]) and torch.equal(resampled[-1], table[-1])


@pytest.mark.parametrize("rule", ["copy", "interpolate"])
def test_a_resume_at_a_longer_context_grows_the_table_and_its_adamw_moments(data, tmp_path, rule, capsys):
    run_training(cfg(data, tmp_path / "run"))
    before = trainer(cfg(data, tmp_path / "run"))
    assert before.resume()
    old = table_and_moments(before)
    step = int(before.optimizer.state[before.runtime.model.pos_embeddings.weight]["step"])
    files = {n: (tmp_path / "run" / n).read_text() for n in ("config.yaml", "model.yaml")}
    with pytest.raises(ConfigError) as err:  # without the opt-in: one line naming the field, its value and the fix
        run_training(longer(data, tmp_path / "run"), resume=True, allow_config_change=True)
    assert str(err.value).startswith("model.max_seq_len=64 is invalid; valid: 32 as the learned position table of "
                                     "checkpoint ") and "grow_positions=copy" in str(err.value)
    assert "\n" not in str(err.value) and files == {n: (tmp_path / "run" / n).read_text() for n in files}

    grown = trainer(longer(data, tmp_path / "run", grow_positions=rule))
    assert grown.resume() and grown.step == 2
    new = table_and_moments(grown)
    for before_t, after_t in zip(old, new):
        assert after_t.shape == (64, 32) and torch.equal(after_t, grow_table(before_t, 64, rule))
        assert torch.equal(after_t[0], before_t[0])  # position 0 keeps its trained row under both rules
    assert (new[2] >= 0).all()  # second moments stay second moments
    assert int(grown.optimizer.state[grown.runtime.model.pos_embeddings.weight]["step"]) == step
    if rule == "copy":  # the first 32 positions are exactly the trained table
        assert torch.equal(new[0][:32], old[0]) and torch.equal(new[0][32:], old[0])
    else:
        want = np.stack([np.interp(np.arange(64) * 31 / 63, np.arange(32), old[0][:, j].numpy()) for j in range(32)], 1)
        assert np.allclose(new[0].numpy(), want, atol=1e-6)

    capsys.readouterr()
    summary = run_training(longer(data, tmp_path / "run", grow_positions=rule), resume=True, allow_config_change=True)
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])
    assert f"note: the learned position table grew from 32 to 64 rows by grow_positions={rule}, its 2 optimizer " \
           f"moment(s) alike" in capsys.readouterr().out
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["seq_len"] for r in log] == [32, 32, 64, 64]
    again = trainer(longer(data, tmp_path / "run", steps=5))  # the new checkpoint is 64 rows throughout: plain resume
    assert again.resume() and again.step == 4
    assert all(t.shape == (64, 32) for t in table_and_moments(again))


def test_a_smaller_table_and_a_rule_for_a_rope_model_are_one_line(data, tmp_path):
    run_training(cfg(data, tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"^model\.max_seq_len=16 is invalid; valid: at least 32, the learned position "
                                          r"table of checkpoint .*a shorter seq_len needs no smaller table"):
        run_training(cfg(data, tmp_path / "run", model={**GPT2, "max_seq_len": 16}, seq_len=16, steps=4,
                         grow_positions="copy"), resume=True, allow_config_change=True)
    with pytest.raises(ConfigError, match=r"^grow_positions='copy' cannot grow 'state\.pos_embeddings\.weight\.exp_avg' "
                                          r"of checkpoint .* valid: optimizer=adamw"):  # COAT's flat FP8 moments
        run_training(cfg(data, tmp_path / "coat", optimizer="coat_adamw"))
        run_training(longer(data, tmp_path / "coat", optimizer="coat_adamw", grow_positions="copy"), resume=True,
                     allow_config_change=True)
    with pytest.raises(ConfigError, match=r"^grow_positions='copy' is invalid; valid: null for a llama model \(it has "
                                          r"no learned position table"):
        run_training(cfg(data, tmp_path / "llama", model=MICRO, grow_positions="copy"))
    with pytest.raises(ConfigError, match=r"^seq_len=64 is invalid; valid: at most model\.max_seq_len=32 \(or raise "
                                          r"model\.max_seq_len; a gpt2 model's learned position table .*grow_positions"):
        run_training(cfg(data, tmp_path / "run", seq_len=64, steps=4), resume=True, allow_config_change=True)
    with pytest.raises(ConfigError, match=r"^grow_positions='tile' is invalid"):
        cfg(data, tmp_path / "run", grow_positions="tile")


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory) -> tuple[object, Path]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=4,
                                                              n_positions=16)).eval()
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    hf.save_pretrained(path)
    return hf, path


def test_init_from_a_gpt2_with_fewer_positions_grows_its_table(hf_gpt2, data, tmp_path):
    """Fine-tuning GPT-2 past its n_positions: refused in one line naming the fix; with grow_positions=copy the
    first n_positions rows are the checkpoint's (the same logits as transformers on a sequence that fits) and the
    rest repeat them; then the run trains at the longer seq_len."""
    from meshwright.models import from_pretrained

    hf, path = hf_gpt2
    model_cfg = load_model_config({**load_model_config(str(path / "config.json")).__dict__, "max_seq_len": 32})
    with pytest.raises(ConfigError) as err:
        from_pretrained(path, cfg=model_cfg)
    assert str(err.value).startswith(f"model.max_seq_len=32 is invalid; valid: 16 as the learned position table of "
                                     f"init_from={str(path)!r} (config.json n_positions), or grow_positions=copy")
    wpe = hf.transformer.wpe.weight.detach()
    for rule in ("copy", "interpolate"):
        ours = from_pretrained(path, cfg=model_cfg, grow_positions=rule).eval()
        assert torch.equal(ours.pos_embeddings.weight.detach(), grow_table(wpe, 32, rule))
    ours = from_pretrained(path, cfg=model_cfg, grow_positions="copy").eval()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), hf(tokens).logits, atol=1e-4)
    c = load_train_config({"init_from": str(path), "model": {"max_seq_len": 32}, "data": {"path": str(data)},
                           "seq_len": 32, "global_batch": 4, "micro_batch": 4, "steps": 1, "warmup_steps": 0,
                           "eval_every": 0, "out_dir": str(tmp_path / "ft"), "progress": False, "energy": False})
    with pytest.raises(ConfigError, match=r"^model\.max_seq_len=32 is invalid; valid: 16 as the learned position"):
        run_training(c)
    c.grow_positions = "copy"
    assert run_training(c)["steps"] == 1
