"""Hostile or unlucky inputs are one line, never silent defaults, a hang or a traceback: NaN/inf in any float
field, duplicate keys, empty/binary files, unbounded sizes, a model that cannot fit, a NaN run past
max_skipped, a multi-rank plan without torchrun, and `data prepare` never deleting what it did not create."""

import json
import math

import numpy as np
import pytest

from _train_helpers import MICRO, make_trainer, prepared_corpus
from meshwright.config import ModelConfig, load_cluster, load_model_config, load_train_config
from meshwright.config.io import read_mapping
from meshwright.data.loader import SequenceLoader, TokenDataset
from meshwright.data.prepare import prepare
from meshwright.errors import ConfigError
from meshwright.plan import load_plan
from meshwright.train.build import check_memory, run_training
from meshwright.train.local_runtime import LocalRuntime
from meshwright.train.trainer import NonFiniteLoss


def one_line(exc):
    return "\n" not in str(exc.value)


@pytest.mark.parametrize("field", ["lr", "min_lr", "eps", "weight_decay", "grad_clip", "beta1", "beta2", "pue",
                                   "grid_intensity"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "inf"])
def test_non_finite_floats_are_refused_in_train_config(field, value):
    with pytest.raises(ConfigError) as err:
        load_train_config("tiny-test", {field: value})
    assert one_line(err) and str(err.value).startswith(f"{field}=") and "finite" in str(err.value)


def test_non_finite_floats_are_refused_in_model_and_cluster():
    with pytest.raises(ConfigError, match=r"^model.norm_eps=nan .*finite"):
        load_model_config({**MICRO, "norm_eps": math.nan})
    with pytest.raises(ConfigError, match=r"^cluster.peak_tflops.bf16=inf .*finite"):
        load_cluster({"peak_tflops": {"bf16": math.inf}})
    with pytest.raises(ConfigError, match=r"^cluster.intra_node_bw_gbps=nan"):
        load_cluster({"peak_tflops": {"bf16": 1.0}, "intra_node_bw_gbps": math.nan})


def test_named_fields_and_ranges():
    with pytest.raises(ConfigError, match=r"^ckpt_every=-1 "):
        load_train_config("tiny-test", {"ckpt_every": -1})
    with pytest.raises(ConfigError, match=r"^seed=-1 "):
        load_train_config("tiny-test", {"seed": -1})
    with pytest.raises(ConfigError, match=r"^seed=4294967296 "):
        load_train_config("tiny-test", {"seed": 2**32})
    with pytest.raises(ConfigError, match=r"^model.n_layers=100000000 .*at most"):
        load_model_config({**MICRO, "n_layers": 10**8})
    with pytest.raises(ConfigError, match=r"^model.vocab_size=1000000000000 .*at most"):
        load_model_config({**MICRO, "vocab_size": 10**12})
    with pytest.raises(ConfigError, match=r"^steps=10000000000 .*at most"):
        load_train_config("tiny-test", {"steps": 10**10})
    with pytest.raises(ConfigError, match=r"^max_skipped=-1 "):
        load_train_config("tiny-test", {"max_skipped": -1})


def test_plan_repeat_is_bounded(tmp_path):
    plan = tmp_path / "p.yaml"
    plan.write_text("version: 1\nmodel: tiny\nseq_len: 64\nglobal_batch: 8\nmicro_batch: 4\nlayers:\n  - {repeat: 1000000000}\n")
    with pytest.raises(ConfigError) as err:
        load_plan(plan)
    assert one_line(err) and "repeat=1000000000" in str(err.value) and "at most" in str(err.value)


def test_memory_sanity_check_is_up_front():
    big = ModelConfig(vocab_size=2**24, d_model=2**14, n_layers=8, n_heads=128)
    with pytest.raises(ConfigError) as err:
        check_memory(big, world_size=1, available=64 * 2**30)
    assert one_line(err) and str(err.value).startswith("model=") and "GiB" in str(err.value)
    check_memory(load_model_config(MICRO), world_size=1, available=2**30)  # a micro model fits


@pytest.mark.parametrize("text,needle", [
    ("steps: 3\nsteps: 4\n", "'steps' appears twice"),
    ("", "is empty"),
    ("# only a comment\n", "is empty"),
])
def test_yaml_files_duplicate_keys_and_empty(tmp_path, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_train_config(str(f))
    assert one_line(err) and needle in str(err.value)


def test_binary_and_non_utf8_files_are_one_line(tmp_path):
    for name, raw in (("bin.yaml", b"\x00\x01\x02steps: 3"), ("latin.yaml", b"name: caf\xe9\n"),
                      ("bin.json", b"\xff\xfe{}")):
        f = tmp_path / name
        f.write_bytes(raw)
        with pytest.raises(ConfigError) as err:
            read_mapping(f)
        assert one_line(err) and str(f) in str(err.value)
    dup = tmp_path / "d.json"
    dup.write_text('{"steps": 3, "steps": 4}')
    with pytest.raises(ConfigError, match="appears twice"):
        read_mapping(dup)


def test_hf_config_with_only_model_type_is_an_error(tmp_path):
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError) as err:
        load_model_config(str(f))
    assert one_line(err) and "config.json" in str(err.value)


def test_an_lr_torchs_optimizer_cannot_take_is_refused_and_one_just_below_diverges_into_nan_policy(tmp_path):
    """lr 1e300 was accepted and then was torch's `value cannot be converted to type float without overflow`
    traceback at the first step (AdamW's step size lr/(1-beta1) goes to an fp32 kernel), not a divergence."""
    with pytest.raises(ConfigError) as err:
        load_train_config("tiny-test", {"lr": 1e300})
    assert one_line(err) and str(err.value).startswith("lr=1e+300 ") and "beta1=0.9" in str(err.value)
    with pytest.raises(ConfigError, match=r"^lr=1e\+39 "):
        load_train_config("tiny-test", {"lr": 1e39, "beta1": 0.0})
    data = prepared_corpus(tmp_path / "data")
    for optimizer in ("adamw", "coat_adamw"):
        trainer = make_trainer(data, tmp_path / optimizer, lr=3.4e37, min_lr=0.0, optimizer=optimizer, steps=3,
                               eval_every=0)
        with pytest.raises(NonFiniteLoss) as stopped:
            trainer.fit()
        assert one_line(stopped) and str(stopped.value).startswith("step ")


class AlwaysNaN(LocalRuntime):
    def forward_backward_lazy(self, micro_batches):  # what the trainer calls
        return super().forward_backward_lazy(micro_batches) * float("nan")


def test_nan_policy_skip_stops_past_max_skipped(tmp_path):
    data = prepared_corpus(tmp_path / "data")
    trainer = make_trainer(data, tmp_path / "out", runtime_cls=AlwaysNaN, nan_policy="skip", max_skipped=2, steps=6)
    with pytest.raises(NonFiniteLoss) as err:
        trainer.fit()
    assert one_line(err) and "max_skipped=2" in str(err.value) and trainer.step == 3


def test_multi_rank_plan_without_torchrun_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_train_config("tiny-test", {"out_dir": str(tmp_path / "o")})
    with pytest.raises(ConfigError) as err:
        run_training(cfg, "configs/plans/tiny-dp2.yaml")
    assert one_line(err) and "torchrun" in str(err.value)


# ---- data prepare never deletes what it did not create; damaged data directories are one line ----------

@pytest.fixture()
def inputs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello world\n" * 50)
    return src


def test_prepare_refuses_unrelated_dir_file_input_and_dot(tmp_path, inputs, monkeypatch):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    for out in (other, afile, inputs, tmp_path):
        with pytest.raises(ConfigError) as err:
            prepare([inputs], out, progress=False)
        assert one_line(err) and str(err.value).startswith("--out=")
    monkeypatch.chdir(tmp_path / "photos")
    with pytest.raises(ConfigError):
        prepare([inputs], ".", progress=False)
    assert (other / "cat.jpg").read_bytes() == b"\xff\xd8" and afile.read_text() == "keep me"
    assert (inputs / "a.txt").is_file()
    # a prepared data set (and an empty directory) may be replaced
    out = prepare([inputs], tmp_path / "data", progress=False)
    prepare([inputs], out, progress=False)
    (tmp_path / "empty").mkdir()
    prepare([inputs], tmp_path / "empty", progress=False)


def test_prepare_max_files_must_be_positive():
    from meshwright.data.prepare import prepare_default_corpus

    for n in (0, -3):
        with pytest.raises(ConfigError, match=r"^max_files="):
            prepare_default_corpus(n, progress=False)


@pytest.mark.parametrize("damage,needle", [
    (lambda d: (d / "index.json").write_text("{not json"), "malformed index.json"),
    (lambda d: (d / "index.json").write_bytes(b"\x00\xff"), "malformed index.json"),
    (lambda d: (d / "index.json").write_text(json.dumps({"dtype": "float64"})), "malformed index.json"),
    (lambda d: (d / "tokens.bin").unlink(), "tokens.bin"),
    (lambda d: (d / "tokens.bin").write_bytes((d / "tokens.bin").read_bytes()[:-2]), "inconsistent"),
])
def test_damaged_data_directory_is_one_line(tmp_path, inputs, damage, needle):
    out = prepare([inputs], tmp_path / "data", progress=False)
    damage(out)
    with pytest.raises(ConfigError) as err:
        TokenDataset(out)
    assert one_line(err) and needle in str(err.value)


def _set_loss_mask(d, value):
    index = json.loads((d / "index.json").read_text())
    (d / "index.json").write_text(json.dumps({**index, "loss_mask": value}))


@pytest.mark.parametrize("damage,needle", [
    (lambda d: (d / "mask.bin").write_bytes((d / "mask.bin").read_bytes()[:-5]), "bytes, expected"),
    (lambda d: (d / "mask.bin").write_bytes((d / "mask.bin").read_bytes() + b"\x01"), "bytes, expected"),
    (lambda d: (d / "mask.bin").unlink(), "is missing"),
    (lambda d: _set_loss_mask(d, "../tokens.bin"), "is missing"),
    (lambda d: _set_loss_mask(d, 7), "is missing"),
])
def test_damaged_loss_mask_of_instruction_data_is_one_line(tmp_path, damage, needle):
    """A truncated mask.bin (after `data prepare`) was numpy's `mmap length is greater than file size` traceback."""
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps({"prompt": f"Q{i}: why? ", "response": "because " * 4}) for i in range(20)))
    out = prepare([sft], tmp_path / "data", fmt="instruct", progress=False)
    assert TokenDataset(out).mask is not None
    damage(out)
    with pytest.raises(ConfigError) as err:
        TokenDataset(out)
    assert one_line(err) and "loss mask" in str(err.value) and needle in str(err.value)


def test_token_ids_outside_the_vocabulary_are_one_line(tmp_path, inputs):
    """A damaged tokens.bin is refused at the batch that holds the bad id (index.json's max_token_id no longer holds):
    one line, not an index error deep in the embedding; an index that records one is refused before any read."""
    out = prepare([inputs], tmp_path / "data", progress=False)
    index = json.loads((out / "index.json").read_text())
    tokens = np.fromfile(out / "tokens.bin", dtype=index["dtype"])
    assert index["max_token_id"] == int(tokens.max()) < 256  # recorded by prepare: bytes + eos
    tokens[3] = 60000
    tokens.tofile(out / "tokens.bin")
    ds = TokenDataset(out)
    loader = SequenceLoader(ds.split("train", 0.0), seq_len=8, global_batch=2, micro_batch=2, shuffle=False)
    with pytest.raises(ConfigError) as err:
        loader.batch_at(0)  # window 0 holds token 3
    assert one_line(err) and "60000" in str(err.value) and "tokens.bin" in str(err.value)
    with pytest.raises(ConfigError) as err:
        ds.tokens[:]
    assert one_line(err) and "60000" in str(err.value)
    (out / "index.json").write_text(json.dumps({**index, "max_token_id": 60000}))
    with pytest.raises(ConfigError) as err:
        TokenDataset(out)
    assert one_line(err) and "60000" in str(err.value)
    (out / "index.json").write_text(json.dumps({**index, "max_token_id": "big"}))
    with pytest.raises(ConfigError) as err:
        TokenDataset(out)
    assert one_line(err) and "max_token_id='big'" in str(err.value)


def test_opening_a_data_set_does_not_read_its_tokens(tmp_path, inputs, monkeypatch):
    """Checking every id at start read all of tokens.bin on every rank before the first step (minutes for a large
    corpus); the recorded max_token_id and the per-batch check replace it."""
    from meshwright.data import token_file

    out = prepare([inputs], tmp_path / "data", progress=False)
    read: list[int] = []
    real = token_file.OpenFile.readinto
    monkeypatch.setattr(token_file.OpenFile, "readinto", lambda self, offset, buf: (read.append(buf.nbytes), real(self, offset, buf))[1])
    ds = TokenDataset(out)
    assert sum(read) == 0
    ds.tokens[:16]
    assert sum(read) == 16 * ds.tokens.dtype.itemsize


def test_report_reader_tolerates_a_torn_last_line_and_refuses_binary(tmp_path):
    from meshwright.tools.report import read_run

    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert [r["step"] for r in read_run(tmp_path)["rows"]] == [1]
    (tmp_path / "log.jsonl").write_bytes(b"\x00\x01binary")
    with pytest.raises(ConfigError) as err:
        read_run(tmp_path)
    assert one_line(err) and "binary" in str(err.value)
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "summary.json").write_text("{torn")
    with pytest.raises(ConfigError) as err:
        read_run(tmp_path)
    assert one_line(err) and "summary.json" in str(err.value)


def test_version_1_index_still_reads_and_damaged_offsets_are_one_line(tmp_path, inputs):
    """Document offsets moved from a JSON list in index.json (version 1) to doc_offsets.bin: data sets prepared
    before still load with the same split; a missing, truncated or decreasing offsets file is one line."""
    out = prepare([inputs], tmp_path / "data", progress=False)
    index = json.loads((out / "index.json").read_text())
    offsets = np.fromfile(out / "doc_offsets.bin", dtype="<i8")
    new = TokenDataset(out)
    points = [new.split_point(f) for f in (0.1, 0.3)]

    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "tokens.bin").write_bytes((out / "tokens.bin").read_bytes())
    old_index = {k: v for k, v in index.items() if k not in ("doc_offsets_file", "max_token_id")}
    (v1 / "index.json").write_text(json.dumps({**old_index, "version": 1, "doc_offsets": offsets.tolist()}))
    old = TokenDataset(v1)
    assert old.doc_offsets.tolist() == offsets.tolist() and [old.split_point(f) for f in (0.1, 0.3)] == points

    for damage, needle in [
        (lambda: (out / "doc_offsets.bin").unlink(), "no readable doc_offsets.bin"),
        (lambda: offsets[:-1].tofile(out / "doc_offsets.bin"), "damaged document offsets"),
        (lambda: offsets[::-1].copy().tofile(out / "doc_offsets.bin"), "damaged document offsets"),
    ]:
        damage()
        with pytest.raises(ConfigError) as err:
            TokenDataset(out)
        assert one_line(err) and needle in str(err.value)
        offsets.tofile(out / "doc_offsets.bin")
    (out / "index.json").write_text(json.dumps({**index, "version": 3}))
    with pytest.raises(ConfigError) as err:
        TokenDataset(out)
    assert one_line(err) and "version=3" in str(err.value)
