"""Adapter-only LoRA checkpoints (``lora.checkpoint: adapters``, train/lora_base.py): what is on disk, exact resume
over a rebuilt base, the base reference (fingerprint) refusing another base in one line, and the exports."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from meshwright.cli import main  # noqa: E402
from meshwright.config import LoraConfig, load_model_config, load_train_config  # noqa: E402
from meshwright.config.io import dump_yaml, from_dict  # noqa: E402
from meshwright.config.schema import TrainConfig  # noqa: E402
from meshwright.errors import ConfigError  # noqa: E402
from meshwright.models import from_pretrained  # noqa: E402
from meshwright.train.build import run_training  # noqa: E402
from meshwright.train.checkpoint import STATE_FILE, latest_checkpoint, list_checkpoints  # noqa: E402
from meshwright.train.checkpoint_io import read_metadata_file  # noqa: E402
from meshwright.train.hf_export import load_run_model  # noqa: E402
from meshwright.train.lora_base import BASE_KEY, AdapterScope, checkpoint_tensor_bytes, hf_fingerprint  # noqa: E402

from _train_helpers import MICRO, prepared_corpus  # noqa: E402

LORA = {"rank": 2, "targets": ["wq", "wv"], "modules_to_save": ["output"], "dropout": 0.1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_corpus(tmp_path_factory.mktemp("data"))


def _hf_base(path, seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two tiny Llama bases of the same architecture and sizes (another seed): only their values differ."""
    root = tmp_path_factory.mktemp("bases")
    return _hf_base(root / "base", 0), _hf_base(root / "other", 1)


def _cfg(out, data, steps=4, **over):
    src = {"data": {"path": str(data)}, "seq_len": 32, "global_batch": 4, "micro_batch": 4, "steps": steps,
           "warmup_steps": 1, "ckpt_every": 2, "eval_every": 0, "out_dir": str(out), "progress": False,
           "energy": False, "keep_checkpoints": 5, "log_every": 1, "lora": dict(LORA)}
    if "init_from" not in over:
        src["model"] = MICRO
    for k, v in over.items():
        if k == "checkpoint":
            src["lora"]["checkpoint"] = v
        else:
            src[k] = v
    return load_train_config(src)


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r}


def _model_keys(step_dir):
    return sorted(k.split(".", 1)[1] for k in read_metadata_file(step_dir / ".metadata").state_dict_metadata
                  if k.startswith("model."))


def _tensor_bytes(step_dir):
    meta = read_metadata_file(step_dir / ".metadata").state_dict_metadata
    return sum(v.size.numel() * v.properties.dtype.itemsize for v in meta.values() if hasattr(v, "size"))


def test_checkpoint_option_round_trips_yaml_and_bad_values_are_one_line():
    cfg = from_dict(TrainConfig, {"lora": {"checkpoint": "full"}})
    assert load_train_config(__import__("yaml").safe_load(dump_yaml(cfg))).lora.checkpoint == "full"
    assert LoraConfig().checkpoint == "adapters"  # the default: no base in the checkpoints
    with pytest.raises(ConfigError) as exc:
        from_dict(TrainConfig, {"lora": {"checkpoint": "base"}})
    assert str(exc.value).startswith("lora.checkpoint='base' is invalid; valid: one of adapters, full")
    assert "\n" not in str(exc.value)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The same 4-step LoRA run of MICRO (seed base) checkpointed both ways, and the adapter one resumed at step 2."""
    root = tmp_path_factory.mktemp("runs")
    for mode in ("adapters", "full"):
        run_training(_cfg(root / mode, data, checkpoint=mode))
    shutil.copytree(root / "adapters", root / "resumed")
    ckpt = root / "resumed" / "ckpt"
    shutil.rmtree(ckpt / "step_000004")
    (ckpt / "latest").write_text("step_000002\n")
    run_training(_cfg(root / "resumed", data), resume=True)
    return root


def test_adapter_checkpoint_holds_the_trained_tensors_only_and_its_bytes_are_the_formula(runs):
    adapters, full = runs / "adapters" / "ckpt" / "step_000004", runs / "full" / "ckpt" / "step_000004"
    model_cfg, lora = load_model_config(MICRO), LoraConfig(**LORA)
    keys = _model_keys(adapters)
    assert keys == sorted([f"layers.{i}.attention.{w}.lora_{ab}" for i in range(2) for w in ("wq", "wv")
                           for ab in "AB"] + ["output.weight"])
    assert "layers.0.attention.wq.weight" in _model_keys(full)
    want = checkpoint_tensor_bytes(model_cfg, lora)
    assert (_tensor_bytes(adapters), _tensor_bytes(full)) == (want["adapters"], want["full"])
    trainable = 2 * 2 * (64 + 64 + 64 + 32) + 256 * 64  # A, B of wq and wv in 2 layers, and the head
    assert want["adapters"] == 3 * 4 * trainable + 4 * (8 + 1)  # weights + two moments (fp32), 9 step counts
    assert want["full"] - want["adapters"] == 4 * (model_cfg.num_params() - 256 * 64)  # the frozen base, fp32
    on_disk = {p.name: p.stat().st_size for p in adapters.iterdir()}
    full_disk = sum(p.stat().st_size for p in full.iterdir() if p.suffix == ".distcp")
    adapters_disk = sum(v for k, v in on_disk.items() if k.endswith(".distcp"))
    assert full_disk - adapters_disk >= want["full"] - want["adapters"]  # the base's bytes (and their framing) gone
    # deterministic: the same run's step-2 checkpoint in the resumed copy and in the original, byte for byte sizes
    again = {p.name: p.stat().st_size for p in (runs / "resumed" / "ckpt" / "step_000004").iterdir()}
    assert {k: v for k, v in again.items() if k.endswith(".distcp")} == \
        {k: v for k, v in on_disk.items() if k.endswith(".distcp")}
    state = json.loads((adapters / STATE_FILE).read_text())
    assert state[BASE_KEY]["source"] == "seed" and state[BASE_KEY]["seed"] == TrainConfig().seed
    assert BASE_KEY not in json.loads((full / STATE_FILE).read_text())


def test_resume_from_an_adapter_checkpoint_replays_the_losses_bitwise(runs):
    straight, resumed = _losses(runs / "adapters"), _losses(runs / "resumed")
    assert set(straight) == set(resumed) == {1, 2, 3, 4}
    assert [resumed[s] for s in (3, 4)] == [straight[s] for s in (3, 4)]  # exact floats, dropout included
    a = load_run_model(runs / "adapters" / "ckpt" / "step_000004", runs / "adapters")[0]
    b = load_run_model(runs / "resumed" / "ckpt" / "step_000004", runs / "resumed")[0]
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    assert _losses(runs / "full") == straight  # the full checkpoints' run trained the same trajectory
    with pytest.raises(ConfigError, match=r"^--base='/x' is invalid; valid: unset: checkpoint .* holds every weight"):
        load_run_model(runs / "full" / "ckpt" / "step_000004", runs / "full", base="/x")
    # the base an adapter checkpoint's export rebuilds from the seed is the one the full checkpoint carries
    c = load_run_model(runs / "full" / "ckpt" / "step_000004", runs / "full")[0]
    for (n, p), q in zip(a.state_dict().items(), c.state_dict().values()):
        assert torch.equal(p, q), n


def test_background_checkpoints_are_adapter_only_too(runs, data, tmp_path):
    """ckpt_async stages and writes the same adapter-only state as the synchronous save."""
    run_training(_cfg(tmp_path / "async", data, ckpt_async=True))
    sync, bg = runs / "adapters" / "ckpt" / "step_000004", tmp_path / "async" / "ckpt" / "step_000004"
    assert _model_keys(bg) == _model_keys(sync) and _tensor_bytes(bg) == _tensor_bytes(sync)
    assert json.loads((bg / STATE_FILE).read_text())[BASE_KEY] == json.loads((sync / STATE_FILE).read_text())[BASE_KEY]
    a, b = load_run_model(sync, runs / "adapters")[0], load_run_model(bg, tmp_path / "async")[0]
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


def test_a_run_without_lora_or_with_another_seed_is_refused_in_one_line(runs, data, tmp_path):
    ckpt = runs / "adapters" / "ckpt" / "step_000002"
    with pytest.raises(ConfigError) as exc:  # another seed draws another base: the adapters would not apply
        run_training(_cfg(tmp_path / "seed", data, seed=5), resume=str(ckpt), allow_config_change=True)
    msg = str(exc.value)
    assert msg.startswith("seed=5 is invalid; valid: ") and "holds LoRA adapters only" in msg and "\n" not in msg
    cfg = _cfg(tmp_path / "plain", data)
    cfg.lora = None
    # checked with the other lora: changes before anything is built (the checkpoint's lora: section named)
    with pytest.raises(ConfigError, match=r"^lora=None is invalid; valid: \{'rank': 2, .* as in the checkpoint .*: a LoRA "
                                          r"run resumes with its adapters"):
        run_training(cfg, resume=str(ckpt), allow_config_change=True)


HF = {"lr": 3e-2, "min_lr": 3e-2, "warmup_steps": 0}  # every B far from zero after two steps


@pytest.fixture(scope="module")
def hf_run(data, bases, tmp_path_factory):
    run = tmp_path_factory.mktemp("hf") / "run"
    run_training(_cfg(run, data, steps=2, init_from=str(bases[0]), **HF))
    return run


def test_the_base_reference_is_the_init_from_path_and_its_content_fingerprint(hf_run, bases, tmp_path):
    ref = json.loads((latest_checkpoint(hf_run / "ckpt") / STATE_FILE).read_text())[BASE_KEY]
    assert ref["source"] == "init_from" and ref["init_from"] == str(bases[0].resolve())
    assert ref["fingerprint"] == hf_fingerprint(bases[0]) != hf_fingerprint(bases[1])
    copy = shutil.copytree(bases[0], tmp_path / "copy")  # another path, same content: the same base
    assert hf_fingerprint(copy) == ref["fingerprint"]
    from safetensors.torch import load_file, save_file

    weights = load_file(copy / "model.safetensors")  # one element of one tensor changed: another base
    weights["model.norm.weight"][0] += 1.0
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert hf_fingerprint(copy) != ref["fingerprint"]


def test_resume_onto_another_base_is_one_line_and_a_copy_of_the_base_resumes(hf_run, bases, data, tmp_path):
    ckpt = latest_checkpoint(hf_run / "ckpt")
    with pytest.raises(ConfigError) as exc:
        run_training(_cfg(tmp_path / "a", data, steps=4, init_from=str(bases[1]), **HF), resume=str(ckpt))
    msg = str(exc.value)
    assert msg.startswith(f"init_from={str(bases[1].resolve())!r} is invalid; valid: that base or a copy of it")
    assert str(bases[0].resolve()) in msg and "\n" not in msg
    with pytest.raises(ConfigError) as exc:  # the base is gone: said before the run builds anything
        run_training(_cfg(tmp_path / "c", data, steps=4, init_from=str(tmp_path / "gone"), **HF), resume=str(ckpt))
    msg = str(exc.value)
    assert msg.startswith(f"init_from={str(tmp_path / 'gone')!r} is invalid; valid: {bases[0].resolve()} or a copy")
    assert "init_from is missing" in msg and "\n" not in msg and not (tmp_path / "c").exists()
    copy = shutil.copytree(bases[0], tmp_path / "moved")
    summary = run_training(_cfg(tmp_path / "b", data, steps=4, init_from=str(copy), **HF), resume=str(ckpt))
    assert summary["steps_this_run"] == 2


def test_exports_of_an_adapter_checkpoint_rebuild_the_base(hf_run, bases, tmp_path, capsys):
    """--hf merged and --peft from the adapter-only checkpoint; a missing base is one line, --base names a copy."""
    step = latest_checkpoint(hf_run / "ckpt")
    assert all(AdapterScope(("output",), False, {}).carries(k) for k in _model_keys(step))
    assert main(["export", str(hf_run), "--hf", str(tmp_path / "merged"), "--peft", str(tmp_path / "peft")]) == 0
    model = load_run_model(step, hf_run)[0].eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(from_pretrained(bases[0]).eval()(x), model(x), atol=1e-3)  # adapters applied
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    # the base moved away: export names it in one line; --base points at the copy (checked by its fingerprint)
    moved = tmp_path / "base_moved"
    shutil.copytree(bases[0], moved)
    run = shutil.copytree(hf_run, tmp_path / "run")
    cfg_yaml = run / "config.yaml"
    cfg_yaml.write_text(cfg_yaml.read_text().replace(str(bases[0]), str(tmp_path / "gone")))
    ref_file = latest_checkpoint(run / "ckpt") / STATE_FILE
    state = json.loads(ref_file.read_text())
    state[BASE_KEY]["init_from"] = str(tmp_path / "gone")
    ref_file.write_text(json.dumps(state))
    (latest_checkpoint(run / "ckpt") / "checksums.json").unlink()  # edited on purpose: loaded unverified
    capsys.readouterr()
    assert main(["export", str(run), "--hf", str(tmp_path / "m2")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and "init_from=" in err[0] and "--base DIR" in err[0], err
    assert main(["export", str(run), "--hf", str(tmp_path / "m3"), "--base", str(moved)]) == 0
    assert main(["export", str(run), "--hf", str(tmp_path / "m4"), "--base", str(bases[1])]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and "that base or a copy of it" in err[-1], err
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "merged" / "model.safetensors"), load_file(tmp_path / "m3" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_list_of_checkpoints_and_fallback_are_unchanged_for_adapter_checkpoints(runs, tmp_path):
    """A damaged newest adapter checkpoint falls back to the previous intact one (load_latest), as full ones do."""
    run = shutil.copytree(runs / "adapters", tmp_path / "run")
    newest = list_checkpoints(run / "ckpt")[-1]
    data_file = next(newest.glob("*.distcp"))
    data_file.write_bytes(b"\0" * data_file.stat().st_size)
    from meshwright.train.build import build_runtime
    from meshwright.train.checkpoint import load_latest

    cfg = load_train_config(str(run / "config.yaml"))
    rt = build_runtime(cfg)
    scope = AdapterScope.for_run(cfg, load_model_config(MICRO), rt.init)
    opt = torch.optim.AdamW(rt.param_groups(0.1), lr=1e-3)
    warned = []
    path, meta = load_latest(run / "ckpt", rt, opt, warn=warned.append, adapters=scope)
    assert path.name == "step_000002" and meta["step"] == 2 and len(warned) == 1 and "corrupt" in warned[0]
