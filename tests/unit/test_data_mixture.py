"""data.mixture: several prepared data sets blended by weight (data/blend.py, data/mixture.py).

Each source is a one-document byte corpus over its own alphabet, so the source of every sequence can be read off
its bytes: the tests check the blend end to end, not only the schedule's arithmetic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _train_helpers import MICRO, one_line_error
from meshwright.config import load_train_config
from meshwright.data.blend import MAX_PERIOD, BlendSchedule
from meshwright.data.loader import IGNORE_INDEX, build_loaders
from meshwright.data.prepare import prepare
from meshwright.errors import ConfigError
from meshwright.tools.sinks import scalars
from meshwright.train.build import run_training

ALPHABETS = ("abcde", "vwxyz", "01234")


def corpus(root: Path, k: int, chars: int) -> Path:
    """A prepared byte corpus of ``chars`` characters drawn from ``ALPHABETS[k]`` only."""
    rng = np.random.default_rng(k)
    src = root / f"src{k}.txt"
    src.write_text("".join(rng.choice(list(ALPHABETS[k]), chars)))
    return prepare([src], root / f"data{k}", progress=False)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("mixture")
    return [corpus(root, 0, 12000), corpus(root, 1, 1000), corpus(root, 2, 6000)]


def cfg(data: dict, out: Path | None = None, **overrides):
    return load_train_config({"model": MICRO, "data": data, "seq_len": 32, "global_batch": 8, "micro_batch": 4,
                              "steps": 4, "warmup_steps": 1, "eval_every": 2, "eval_batches": 1, "log_every": 1,
                              "out_dir": str(out or "unused"), "progress": False, "energy": False, **overrides})


def mixture(paths: list[Path], weights: list[float]) -> dict:
    return {"mixture": [{"path": str(p), "weight": w} for p, w in zip(paths, weights)], "val_fraction": 0.1}


def source_of(rows: torch.Tensor) -> list[int]:
    """Which alphabet (source) each row's bytes come from."""
    out = []
    for row in rows:
        text = bytes(v for v in row.tolist() if v).decode()
        out.append(next(k for k, a in enumerate(ALPHABETS) if set(text) <= set(a)))
    return out


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 2], [5, 3, 1, 1], [0.5, 0.25, 0.125, 0.0625, 0.0625],
                                     [0.123, 0.456, 0.789], [1e-3, 1, 2.5, 0.33, 7], [3.14159, 2.71828, 1],
                                     [6, 68, 278, 269, 177, 297, 66], [38, 24, 24, 6, 2, 2], [35, 32, 29, 11, 8, 1]])
def test_every_prefix_is_within_one_sample_of_the_weights(weights):
    """Over any prefix of n samples, each source's count is within 1 - 1/(2k-2) of n * its share (Megatron's
    lag rule drifts to 1.02 on the last three sets), each source's own stream is read in order without gaps, and
    far positions follow from the period without a replay."""
    sched = BlendSchedule(weights)
    share = np.asarray(sched.shares) / sched.period
    assert np.abs(share - np.asarray(weights) / sum(weights)).max() <= 1.0 / MAX_PERIOD
    n = min(3 * sched.period, 300_000)
    src, index = sched.locate(np.arange(n))
    counts = np.cumsum(np.eye(len(weights), dtype=np.int64)[src], axis=0)  # counts after each sample
    lag = counts - np.arange(1, n + 1)[:, None] * share[None, :]
    assert np.abs(lag).max() <= 1 - 1 / (2 * len(weights) - 2) + 1e-12
    for j in range(len(weights)):
        assert np.array_equal(index[src == j], np.arange(counts[-1, j]))
    assert [sched.counts(m) for m in (0, 1, n // 3, n)] == [[0] * len(weights)] + \
           [counts[m - 1].tolist() for m in (1, n // 3, n)]
    far_src, far_index = sched.locate(10**12 * sched.period + np.arange(n))  # a resume at 10^12 periods: no replay
    assert np.array_equal(far_src, src)
    assert np.array_equal(far_index, index + 10**12 * np.asarray(sched.shares)[src])


def test_batches_come_from_the_sources_by_weight_and_small_sources_repeat(sources, capsys):
    train, val, data = build_loaders(cfg(mixture(sources, [0.6, 0.2, 0.2])), 256, progress=False)
    rows = torch.cat([x for _ in range(30) for x, _ in train.next_batch()])
    got = source_of(rows)
    assert got == train.schedule.locate(np.arange(len(got)))[0].tolist()
    assert [got.count(k) for k in range(3)] == [144, 48, 48]
    small = [bytes(r.tolist()) for r, k in zip(rows, got) if k == 1]
    windows = train.source_windows[1]  # its own epochs: every window once before any repeats
    assert len(small) > windows and len(set(small[:windows])) == windows
    assert train.sequences_per_source(240) == {str(sources[0]): 144, str(sources[1]): 48, str(sources[2]): 48}
    notes = train.repeat_notes(240)
    assert len(notes) == 1 and "data.mixture[1].path=" in notes[0] and "(1.7 epochs)" in notes[0]
    assert set(source_of(torch.cat([x for x, _ in val.fixed_batches(3)]))) == {0, 1, 2}  # blended validation


def test_dp1_and_dp2_read_the_same_global_batches(sources):
    data = mixture(sources, [0.5, 0.3, 0.2])
    one, _, _ = build_loaders(cfg(data), 256, progress=False)
    ranks = [build_loaders(cfg(data), 256, dp_rank=r, dp_size=2, progress=False)[0] for r in (0, 1)]
    for _ in range(25):  # past an epoch of the small source
        whole = one.next_batch()
        halves = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([x for x, _ in whole]), torch.cat([x for h in halves for x, _ in h]))
        assert torch.equal(torch.cat([y for _, y in whole]), torch.cat([y for h in halves for _, y in h]))


def test_a_one_source_mixture_reads_what_data_path_reads(sources):
    plain = build_loaders(cfg({"path": str(sources[0]), "val_fraction": 0.1}), 256, progress=False)
    mixed = build_loaders(cfg(mixture(sources[:1], [0.4])), 256, progress=False)
    for _ in range(12):  # past an epoch
        for (x, y), (u, v) in zip(plain[0].next_batch(), mixed[0].next_batch()):
            assert torch.equal(x, u) and torch.equal(y, v)
    for (x, y), (u, v) in zip(plain[1].fixed_batches(2), mixed[1].fixed_batches(2)):
        assert torch.equal(x, u) and torch.equal(y, v)
    assert plain[0].data_fingerprint == mixed[0].data_fingerprint  # a data.path run resumes as a one-source mixture


def test_instruction_masks_travel_with_their_windows(sources, tmp_path):
    lines = [{"prompt": f"q{i} abc ", "response": f"answer {i} " * 3} for i in range(60)]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    chat = prepare([src], tmp_path / "chat", fmt="instruct", progress=False)
    plain, _, _ = build_loaders(cfg({"path": str(chat), "val_fraction": 0.1}), 256, progress=False)
    mixed, _, _ = build_loaders(cfg(mixture([chat, sources[1]], [0.5, 0.5])), 256, progress=False)
    plain_rows = [(x, y) for _ in range(4) for xs, ys in plain.next_batch() for x, y in zip(xs, ys)]
    mixed_rows = [(x, y) for _ in range(8) for xs, ys in mixed.next_batch() for x, y in zip(xs, ys)]
    which = mixed.schedule.locate(np.arange(len(mixed_rows)))[0]
    chat_rows = [r for r, k in zip(mixed_rows, which) if k == 0]
    assert len(chat_rows) == len(plain_rows)  # source 0 keeps data.path's order: masked exactly as alone
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(chat_rows, plain_rows))
    assert any((y == IGNORE_INDEX).any() for _, y in chat_rows)
    text_rows = [r for r, k in zip(mixed_rows, which) if k == 1]
    assert text_rows and not any((y == IGNORE_INDEX).any() for _, y in text_rows)  # plain text: every target


def test_a_resumed_mixture_run_equals_an_uninterrupted_one(sources, tmp_path):
    data = mixture(sources, [0.5, 0.2, 0.3])
    straight = run_training(cfg(data, tmp_path / "straight", ckpt_every=2))
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    ckpt = tmp_path / "resumed" / "ckpt"
    shutil.rmtree(ckpt / "step_000004")
    (ckpt / "latest").write_text("step_000002\n")
    log = tmp_path / "resumed" / "log.jsonl"
    log.write_text("".join(line + "\n" for line in log.read_text().splitlines()[:2]))
    resumed = run_training(cfg(data, tmp_path / "resumed", ckpt_every=2), resume=True)
    assert resumed["steps_this_run"] == 2
    logs = [[json.loads(x) for x in (tmp_path / n / "log.jsonl").read_text().splitlines()]
            for n in ("straight", "resumed")]
    keys = ("step", "loss", "grad_norm", "eval_loss", "tokens_per_source")
    assert [[r.get(k) for k in keys] for r in logs[0]] == [[r.get(k) for k in keys] for r in logs[1]]
    assert straight["tokens_per_source"] == resumed["tokens_per_source"] == {
        str(sources[0]): 16 * 32, str(sources[1]): 6 * 32, str(sources[2]): 10 * 32}


def test_a_resume_with_a_changed_mixture_is_refused_naming_the_change(sources, tmp_path, capsys):
    data = [shutil.copytree(p, tmp_path / p.name) for p in sources]  # source 2 is prepared again below
    run_training(cfg(mixture(data, [0.7, 0.3, 0.1]), tmp_path / "run", steps=2))
    changed = mixture(data, [0.7, 0.2, 0.1])
    with pytest.raises(ConfigError, match=r"^data\.mixture\[1\]\.weight=0\.2 is invalid; valid: 0\.3 as in the "
                                          r"checkpoint .*step_000002 \(resume continues that run") as err:
        run_training(cfg(changed, tmp_path / "run"), resume=True)
    assert "\n" not in str(err.value)
    # the same config on a source prepared again from other text: the fingerprint names the source and the field
    src = tmp_path / "src2.txt"
    src.write_text((sources[2].parent / "src2.txt").read_text()[::-1])  # same size and alphabet, other order
    prepare([src], tmp_path / "data2", progress=False)
    with pytest.raises(ConfigError, match=r"^resume: data\.mixture=\[.* \(0\.1\)\] is not the data set checkpoint "
                                          r".* \(mixture\[2\]\.tokens_bin_sample_sha256 '\w+' -> '\w+'\); valid") as err:
        run_training(cfg(mixture(data, [0.7, 0.3, 0.1]), tmp_path / "run"), resume=True)
    assert "\n" not in str(err.value)
    capsys.readouterr()
    summary = run_training(cfg(changed, tmp_path / "run"), resume=True, allow_config_change=True)
    out = capsys.readouterr().out
    assert summary["steps"] == 4 and "resuming on it as asked" in out
    assert "mixture[0].weight 0.636363636364 -> 0.7, mixture[1].weight 0.272727272727 -> 0.2" in out
    # source 2, prepared again from other text, starts at its beginning (its old count of sequences meant other text)
    assert f"data.mixture[2]={data[2]} other data, from its start" in out
    state = json.loads((tmp_path / "run" / "ckpt" / "step_000004" / "trainer_state.json").read_text())["train_loader"]
    assert state["sources"][2]["base"] == 0 and state["sources"][0]["base"] > 0


def test_eval_per_source_is_each_sources_own_validation_loss(sources, tmp_path):
    from meshwright.config import load_cluster, load_model_config
    from meshwright.models import build_model
    from meshwright.train.local_runtime import LocalRuntime
    from meshwright.train.trainer import Trainer

    c = cfg({**mixture(sources[:2], [0.6, 0.4]), "eval_per_source": True}, tmp_path / "run", steps=2, eval_batches=2)
    model_cfg = load_model_config(c.model)
    train, val, _ = build_loaders(c, 256, progress=False)
    trainer = Trainer(c, LocalRuntime(build_model(model_cfg, seed=c.seed)), train, val, model_cfg,
                      load_cluster(c.cluster), print_fn=lambda s: None)
    summary = trainer.fit()
    last = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert last["eval_loss_per_source"] == summary["eval_loss_per_source"] and len(last["eval_loss_per_source"]) == 2
    for path, batches in ((sources[0], 2), (sources[1], 1)):  # source 1's split holds one batch: clamped to it
        alone = build_loaders(cfg({"path": str(path), "val_fraction": 0.1}), 256, progress=False)[1]
        assert last["eval_loss_per_source"][str(path)] == trainer.runtime.eval_loss(alone.fixed_batches(batches))
    assert last["eval_loss"] not in last["eval_loss_per_source"].values()  # the blend is its own set
    per_source = scalars(last)  # TensorBoard / W&B: one scalar per source
    assert per_source[f"eval_loss_per_source/{sources[1]}"] == last["eval_loss_per_source"][str(sources[1])]
    assert per_source[f"tokens_per_source/{sources[0]}"] == last["tokens_per_source"][str(sources[0])] == 10 * 32


def test_a_checkpoint_from_before_mixtures_still_resumes(sources, tmp_path):
    """Its saved config has no data.mixture or data.eval_per_source: fields added since, at their defaults."""
    from meshwright.train.checkpoint import latest_checkpoint
    from meshwright.train.checkpoint_io import write_manifest

    c = cfg({"path": str(sources[0]), "val_fraction": 0.1}, tmp_path / "run", steps=2)
    run_training(c)
    state_file = next(latest_checkpoint(tmp_path / "run" / "ckpt").glob("trainer_state.json"))
    state = json.loads(state_file.read_text())
    for key in ("mixture", "eval_per_source"):
        del state["config"]["data"][key]
    state_file.write_text(json.dumps(state))
    write_manifest(state_file.parent)  # as that checkpoint was written
    assert run_training(cfg({"path": str(sources[0]), "val_fraction": 0.1}, tmp_path / "run"), resume=True)["steps"] == 4
    with pytest.raises(ConfigError, match=r"^data\.val_fraction=0\.2 is invalid; valid: 0\.1 as in the checkpoint"):
        run_training(cfg({"path": str(sources[0]), "val_fraction": 0.2}, tmp_path / "run", steps=6), resume=True)


@pytest.mark.parametrize("data, message", [
    ({"mixture": []}, "data.mixture=[] is invalid; valid: at least one source"),
    ({"mixture": [{"path": "x", "weight": 0}]}, "data.mixture[0].weight=0.0 is invalid; valid: a positive finite"),
    ({"mixture": [{"path": "x"}, {"path": "y", "weight": -1}]}, "data.mixture[1].weight=-1.0 is invalid"),
    ({"mixture": [{"path": "x", "weight": float("nan")}]}, "data.mixture[0].weight=nan is invalid; valid: a finite"),
    ({"mixture": [{"path": "x", "weight": "heavy"}]}, "data.mixture[0].weight='heavy' is invalid; valid: a number"),
    ({"mixture": [{"weight": 1}]}, "data.mixture[0].path is required"),
    ({"mixture": [{"path": "x"}, {"path": "x"}]}, "data.mixture[1].path='x' is invalid; valid: a data set not "
                                                  "already listed"),
    ({"mixture": [{"path": "x", "weight": 1e308}, {"path": "y", "weight": 1e308}]},
     "data.mixture[0].weight=1e+308 is invalid; valid: weights whose sum is a finite number"),
    ({"path": "web", "mixture": [{"path": "x"}]}, "data.path='web' is invalid; valid: left unset (default) when "
                                                  "data.mixture is given"),
])
def test_bad_mixture_configs_are_one_line(data, message):
    with pytest.raises(ConfigError) as err:
        cfg(data)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_weight_too_small_to_blend_is_refused_never_read_silently():
    """1e-30 beside 1 passed as an exact share of 0 (its source never read, the run named it with weight 1e-30);
    equal tiny weights were a ZeroDivisionError. Weights are relative: 1e-30 and 1e-30 blend half and half."""
    for weights, j in (([1e-30, 1.0], 0), ([1.0, 1e-9], 1), ([3.0, 1.0, 1e-13], 2)):
        with pytest.raises(ConfigError) as err:
            BlendSchedule(weights)
        assert str(err.value).startswith(f"data.mixture[{j}].weight={weights[j]!r} is invalid; valid: at least "
                                         f"1/{MAX_PERIOD:,} of the total weight")
    assert BlendSchedule([1e-30, 1e-30]).shares == [MAX_PERIOD // 2] * 2
    assert BlendSchedule([0.7, 0.3]).shares == [7, 3]  # small fractions stay exact


def test_bad_mixture_sources_are_one_line(sources, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    other = tmp_path / "other"
    shutil.copytree(sources[1], other)
    index = json.loads((other / "index.json").read_text())
    index["tokenizer"]["eos_id"] = 1
    (other / "index.json").write_text(json.dumps(index))
    cases = [(tmp_path / "missing", "data.mixture[1].path='{}' is invalid; valid: an existing prepared"),
             (tmp_path / "empty", "data.mixture[1].path='{}' is invalid; valid: 'default' or a directory made by"),
             (other, "data.mixture[1].path='{}' is prepared with tokenizer 'byte' (vocab 256, eos 1), data.mixture[0] "
                     "with 'byte' (vocab 256, eos 0); valid: every source prepared with the same tokenizer")]
    for path, message in cases:
        with pytest.raises(ConfigError) as err:
            build_loaders(cfg(mixture([sources[0], path], [1, 1])), 256, progress=False)
        assert str(err.value).startswith(message.format(path)) and "\n" not in str(err.value)
    mix = f"data.mixture=[{{path: {sources[0]}, weight: 0.7}}, {{path: {other}, weight: 0.3}}]"
    line = one_line_error(capsys, ["train", "tiny-test", f"out_dir={tmp_path / 'run'}", mix])
    assert "data.mixture[1].path=" in line and "same tokenizer" in line


def _rewind(run: Path, copy: Path, step: int) -> None:
    """``copy``: ``run`` as it was at ``step`` (its later checkpoints and log records gone)."""
    shutil.copytree(run, copy)
    for later in (copy / "ckpt").glob("step_*"):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)
    (copy / "ckpt" / "latest").write_text(f"step_{step:06d}\n")
    lines = (copy / "log.jsonl").read_text().splitlines()
    (copy / "log.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= step))


def _log(run: Path, keys=("step", "loss", "grad_norm", "eval_loss", "tokens")) -> list[list]:
    return [[json.loads(x).get(k) for k in keys] for x in (run / "log.jsonl").read_text().splitlines()]


def test_a_data_path_run_resumes_as_its_one_source_mixture_and_back_without_the_flag(sources, tmp_path):
    """The same data in the same order: it needed --allow-config-change though the fingerprints matched."""
    path, mixed = {"path": str(sources[0]), "val_fraction": 0.1}, mixture(sources[:1], [0.4])
    run_training(cfg(path, tmp_path / "straight", steps=6, ckpt_every=2))
    _rewind(tmp_path / "straight", tmp_path / "switched", 2)
    run_training(cfg(mixed, tmp_path / "switched", steps=6, ckpt_every=2), resume=True)  # no flag
    assert _log(tmp_path / "straight") == _log(tmp_path / "switched")  # the same batches: the same losses
    _rewind(tmp_path / "switched", tmp_path / "back", 4)
    run_training(cfg(path, tmp_path / "back", steps=6), resume=True)  # and back, from the mixture's checkpoint
    assert _log(tmp_path / "straight") == _log(tmp_path / "back")
    # other data in a one-source mixture is still refused: another path by the config, the same path by the data
    with pytest.raises(ConfigError, match=r"^data\.path='.*data1' is invalid; valid: '.*data0' as in the checkpoint"):
        run_training(cfg(mixture(sources[1:2], [1.0]), tmp_path / "switched", steps=8), resume=True)
    with pytest.raises(ConfigError, match=r"^data\.mixture=\[.*\] is invalid; valid: no mixture "
                                          r"\(data\.path='.*data0'\) as in the checkpoint"):  # was "data.path='default' is invalid", never set
        run_training(cfg(mixture(sources[:2], [1.0, 1.0]), tmp_path / "switched", steps=8), resume=True)
    copy = shutil.copytree(sources[0], tmp_path / "data0")
    run_training(cfg({"path": str(copy), "val_fraction": 0.1}, tmp_path / "other", steps=2))
    prepare([sources[2].parent / "src2.txt"], copy, progress=False)  # re-prepared from other text
    with pytest.raises(ConfigError, match=r"^resume: data\.mixture=\[.*\] is not the data set checkpoint"):
        run_training(cfg(mixture([copy], [1.0]), tmp_path / "other", steps=4), resume=True)


def _rows_by_source(loader, steps: int) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    for _ in range(steps):
        rows = torch.cat([x for x, _ in loader.next_batch()])
        for row, k in zip(rows, source_of(rows)):
            out.setdefault(k, []).append(bytes(row.tolist()))
    return out


def test_a_changed_mixture_continues_each_source_where_it_was(sources, tmp_path):
    """--allow-config-change with new weights read each source at the new blend's position from 0: source 0 jumped
    ahead and source 2 read its windows again. Now each source goes on where its stream was; an added source
    starts at its beginning."""
    old, _, _ = build_loaders(cfg(mixture([sources[0], sources[2]], [0.5, 0.5])), 256, progress=False)
    _rows_by_source(old, 4)  # 16 sequences of each
    state = json.loads(json.dumps(old.state_dict()))
    assert [s["position"] for s in state["sources"]] == [16, 16]
    went_on = _rows_by_source(old, 12)  # each source's stream as it goes on
    new, _, _ = build_loaders(cfg(mixture([sources[0], sources[1], sources[2]], [0.6, 0.2, 0.2])), 256,
                              progress=False)
    note = new.load_state_dict(state, data_changed=True)
    assert f"data.mixture[0]={sources[0]} at sequence 16" in note and f"data.mixture[1]={sources[1]} new" in note
    got = _rows_by_source(new, 5)
    assert [len(got[k]) for k in range(3)] == [24, 8, 8]  # the new weights
    assert got[0] == went_on[0][:24] and got[2] == went_on[2][:8]  # where each stream was, in its order
    assert len(set(got[1])) == 8  # the added source from its start: no window twice
    after = new.state_dict()
    assert [s["position"] for s in after["sources"]] == [40, 8, 24]
    assert new.tokens_per_source(new.consumed) == {str(sources[0]): 40 * 32, str(sources[1]): 8 * 32,
                                                   str(sources[2]): 24 * 32}
    again, _, _ = build_loaders(cfg(mixture([sources[0], sources[1], sources[2]], [0.6, 0.2, 0.2])), 256,
                                progress=False)
    assert again.load_state_dict(json.loads(json.dumps(after))) is None  # the new mixture resumes exactly
    assert _rows_by_source(again, 3) == _rows_by_source(new, 3)


def test_a_changed_mixture_through_meshwright_train(sources, tmp_path, capsys):
    run_training(cfg(mixture([sources[0], sources[2]], [0.5, 0.5]), tmp_path / "run", steps=2))
    capsys.readouterr()
    summary = run_training(cfg(mixture(sources, [0.5, 0.25, 0.25]), tmp_path / "run", steps=4, seq_len=64),
                           resume=True, allow_config_change=True)
    out = capsys.readouterr().out
    assert "resuming on it as asked; resuming the mixture with each source where its stream was" in out, out
    assert "tokens carried over, epoch 0 goes on with" in out  # seq_len 32 -> 64: per source, as for one data set
    assert summary["tokens"] == 2 * 8 * 32 + 2 * 8 * 64
    assert summary["tokens_per_source"] == {str(sources[0]): 8 * 32 + 8 * 64, str(sources[1]): 4 * 64,
                                            str(sources[2]): 8 * 32 + 4 * 64}


def test_a_data_path_resume_of_a_mixture_checkpoint_finds_its_source_by_fingerprint(sources):
    """--allow-config-change from a mixture of several sources to one of them as data.path carried the blend's count of
    sequences onto it; now that source's own stream goes on (none of its windows read again this epoch), and data
    that was no source of the mixture starts at its first sequence."""
    old, _, _ = build_loaders(cfg(mixture([sources[0], sources[2]], [0.5, 0.5])), 256, progress=False)
    read = _rows_by_source(old, 4)[2]  # 16 sequences of source 2
    state = json.loads(json.dumps(old.state_dict()))
    alone, _, _ = build_loaders(cfg({"path": str(sources[2]), "val_fraction": 0.1}), 256, progress=False)
    note = alone.load_state_dict(state, data_changed=True)
    assert note.startswith("note: resuming with another order: 1,024 tokens read so far carry over")
    rest = alone.n_windows - alone.consumed
    went_on = [bytes(r.tolist()) for _ in range(rest // 8) for x, _ in alone.next_batch() for r in x]
    assert len(went_on) >= 8 and not set(went_on) & set(read)  # the epoch goes on with windows it has not read
    other, _, _ = build_loaders(cfg({"path": str(sources[1]), "val_fraction": 0.1}), 256, progress=False)
    note = other.load_state_dict(state, data_changed=True)
    fresh, _, _ = build_loaders(cfg({"path": str(sources[1]), "val_fraction": 0.1}), 256, progress=False)
    assert other.consumed == 0 and "it starts at its first sequence" in note
    assert torch.equal(other.next_batch()[0][0], fresh.next_batch()[0][0])


def test_eval_per_source_on_one_data_set_is_its_eval_loss_for_data_path_and_a_one_source_mixture(sources, tmp_path):
    """eval_per_source was refused with data.path but allowed for a one-source mixture (which scored the same batches
    a second time), so a run switching between the two, as a one-source mixture allows, needed --allow-config-change.
    Now both report their one source as its eval loss, evaluate nothing twice, and resume into each other plainly."""
    from meshwright.config import load_cluster, load_model_config
    from meshwright.models import build_model
    from meshwright.train.local_runtime import LocalRuntime
    from meshwright.train.trainer import Trainer

    path = {"path": str(sources[0]), "val_fraction": 0.1, "eval_per_source": True}
    one = {**mixture(sources[:1], [1.0]), "eval_per_source": True}
    records = []
    for data in (path, one):
        c = cfg(data, tmp_path / "run", steps=2, eval_batches=2)
        model_cfg = load_model_config(c.model)
        train, val, _ = build_loaders(c, 256, progress=False)
        runtime = LocalRuntime(build_model(model_cfg, seed=c.seed))
        calls = []
        scored = runtime.eval_loss
        runtime.eval_loss = lambda batches: calls.append(len(batches)) or scored(batches)
        trainer = Trainer(c, runtime, train, val, model_cfg, load_cluster(c.cluster), out_dir=tmp_path / str(len(records)),
                          print_fn=lambda s: None)
        summary = trainer.fit()
        assert len(calls) == 1  # the final eval only, once: its one source's batches are the blend's
        last = json.loads((tmp_path / str(len(records)) / "log.jsonl").read_text().splitlines()[-1])
        assert last["eval_loss_per_source"] == summary["eval_loss_per_source"] == {str(sources[0]): last["eval_loss"]}
        records.append(last)
    assert records[0]["eval_loss_per_source"] == records[1]["eval_loss_per_source"]
    c = cfg(one, steps=2, eval_batches=2)  # the eval memory limit counts no second set for one source
    most = 2**28 // (c.global_batch * c.seq_len)
    cfg(one, eval_batches=most)
    with pytest.raises(ConfigError, match=r"^eval_batches=1048577 is invalid; valid: at most 1,048,576 with"):
        cfg(one, eval_batches=most + 1)
    # a data.path run resumed as its one-source mixture with eval_per_source, and back without it: no flag needed
    plain = {"path": str(sources[0]), "val_fraction": 0.1}
    run_training(cfg(plain, tmp_path / "switch", steps=2))
    assert run_training(cfg(one, tmp_path / "switch", steps=4), resume=True)["eval_loss_per_source"]
    assert "eval_loss_per_source" not in run_training(cfg(plain, tmp_path / "switch", steps=6), resume=True)


def test_eval_per_source_may_change_on_resume(sources, tmp_path):
    """data.eval_per_source only adds evaluations (no step reads them): a resume that turns it on was refused as
    another data config, as if it changed the trajectory (eval_every and eval_batches may change)."""
    data = mixture(sources[:2], [0.6, 0.4])
    run_training(cfg(data, tmp_path / "run", steps=2))
    summary = run_training(cfg({**data, "eval_per_source": True}, tmp_path / "run"), resume=True)
    assert summary["steps"] == 4 and len(summary["eval_loss_per_source"]) == 2


def test_weights_of_the_same_proportions_resume(sources, tmp_path):
    """Weights are relative (0.7/0.3 blends as 7/3, the checkpoint's fingerprint records them normalised): 7/3 on
    resume of a 0.7/0.3 run was refused as `data.mixture[0].weight=7.0 is invalid; valid: 0.7`. Other proportions
    still are (named against the 7/3 the resumed run's checkpoint now records)."""
    run_training(cfg(mixture(sources[:2], [0.7, 0.3]), tmp_path / "run", steps=2))
    assert run_training(cfg(mixture(sources[:2], [7, 3]), tmp_path / "run"), resume=True)["steps"] == 4
    with pytest.raises(ConfigError, match=r"^data\.mixture\[0\]\.weight=6\.0 is invalid; valid: 7\.0 as in the"):
        run_training(cfg(mixture(sources[:2], [6, 3]), tmp_path / "run", steps=6), resume=True)
