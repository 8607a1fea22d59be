"""Training that starts from an existing PEFT adapter (``lora.init_adapter``, train/peft_init.py): a run started from
``meshwright export --peft`` of another run starts at that run's trained model (first loss equal within 1e-5), one
from an adapter PEFT made starts at PEFT's model (logits), a resume's checkpoint takes precedence over the adapter,
checkpoints record it, and bad input is one line naming the field, the value and what is valid."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from meshwright.cli import main  # noqa: E402
from meshwright.config import load_cluster, load_train_config  # noqa: E402
from meshwright.data.loader import build_loaders  # noqa: E402
from meshwright.errors import ConfigError  # noqa: E402
from meshwright.memory.lora import apply_lora_config  # noqa: E402
from meshwright.models import from_pretrained  # noqa: E402
from meshwright.train.build import build_runtime, resolve_model_config, run_training  # noqa: E402
from meshwright.train.checkpoint import latest_checkpoint  # noqa: E402
from meshwright.train.hf_export import load_run_model  # noqa: E402
from meshwright.train.local_runtime import LocalRuntime  # noqa: E402
from meshwright.train.peft_init import adapter_reference  # noqa: E402
from meshwright.train.trainer import Trainer  # noqa: E402

from test_lora_finetune import LORA, data, hf_dir, lora_run  # noqa: E402,F401  (module fixtures reused)


def _cfg(data, hf_dir, out, lora, **over):
    return load_train_config({"init_from": str(hf_dir), "data": {"path": str(data)}, "seq_len": 32, "global_batch": 4,
                              "micro_batch": 4, "steps": 1, "warmup_steps": 0, "lr": 1e-2, "min_lr": 1e-2,
                              "eval_every": 0, "out_dir": str(out), "progress": False, "energy": False, "lora": lora,
                              **over})


def _first_loss(cfg, model) -> float:
    """The first step's loss of the trainer on ``model`` (one process) with ``cfg``'s data."""
    model_cfg = resolve_model_config(cfg)
    train, val, _ = build_loaders(cfg, model_cfg.vocab_size, progress=False)
    trainer = Trainer(cfg, LocalRuntime(model), train, val, model_cfg, load_cluster(cfg.cluster),
                      print_fn=lambda s: None)
    return float(trainer.train_step()["loss"])


@pytest.fixture(scope="module")
def exported(lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("peft") / "adapter"
    assert main(["export", str(lora_run), "--peft", str(out)]) == 0
    return out


def test_a_run_from_an_exported_adapter_starts_at_the_exporting_runs_model(data, hf_dir, lora_run, exported, tmp_path):
    """Run B starts from run A's ``--peft`` export (after A's 3 steps): its first loss is the loss of A's trained model
    (read from A's checkpoint, another route) on B's first batch, within 1e-5, and not the base's."""
    cfg = _cfg(data, hf_dir, tmp_path / "b", {**LORA, "init_adapter": str(exported)})
    summary = run_training(cfg)
    trained, _, _ = load_run_model(latest_checkpoint(lora_run / "ckpt"), lora_run)
    reference = _first_loss(_cfg(data, hf_dir, tmp_path / "ref", LORA), trained)
    assert abs(summary["first_loss"] - reference) <= 1e-5, (summary["first_loss"], reference)
    base = from_pretrained(hf_dir)
    apply_lora_config(base, cfg.lora, cfg.seed)  # B zero: the base model
    assert abs(_first_loss(_cfg(data, hf_dir, tmp_path / "base", LORA), base) - reference) > 1e-3
    state = json.loads((latest_checkpoint(tmp_path / "b" / "ckpt") / "trainer_state.json").read_text())
    assert state["init_adapter"] == adapter_reference(exported)
    assert state["init_adapter"]["path"] == str(exported.resolve()) and len(state["init_adapter"]["fingerprint"]) == 64


def _resumable_copy(src, dst):
    """``src`` run's copy whose latest checkpoint is step 1."""
    shutil.copytree(src, dst)
    ckpt = dst / "ckpt"
    shutil.rmtree(ckpt / "step_000002")
    (ckpt / "latest").write_text("step_000001\n")
    return ckpt


def test_a_resume_takes_precedence_over_the_adapter(data, hf_dir, exported, tmp_path, monkeypatch):
    """A 2-step run from the adapter, then its copy resumed from the step-1 checkpoint with the adapter directory gone:
    the resume never reads it (the checkpoint's adapters win), its step 2 is the straight run's, and the checkpoint
    keeps the record of the adapter the run started from. The adapter is hashed once for the fresh start, and not
    at all by a resume even where its directory is still there (it used to be hashed again, then replaced)."""
    from meshwright.train import peft_init

    hashed = []
    monkeypatch.setattr(peft_init, "adapter_reference", lambda path: hashed.append(path) or adapter_reference(path))
    adapter = tmp_path / "adapter"
    shutil.copytree(exported, adapter)
    cfg = _cfg(data, hf_dir, tmp_path / "straight", {**LORA, "init_adapter": str(adapter)}, steps=2, ckpt_every=1,
               log_every=1)
    straight = run_training(cfg)
    assert hashed == [str(adapter)]
    record = adapter_reference(adapter)
    present = _resumable_copy(tmp_path / "straight", tmp_path / "resumed-present")
    again = run_training(_cfg(data, hf_dir, tmp_path / "resumed-present", {**LORA, "init_adapter": str(adapter)},
                              steps=2, ckpt_every=1, log_every=1), resume=True)
    assert hashed == [str(adapter)] and again["final_loss"] == straight["final_loss"]
    assert json.loads((present / "step_000002" / "trainer_state.json").read_text())["init_adapter"] == record
    ckpt = _resumable_copy(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(adapter)
    resumed = run_training(_cfg(data, hf_dir, tmp_path / "resumed", {**LORA, "init_adapter": str(adapter)}, steps=2,
                                ckpt_every=1, log_every=1), resume=True)
    assert resumed["steps_this_run"] == 1 and resumed["final_loss"] == straight["final_loss"]
    state = json.loads((ckpt / "step_000002" / "trainer_state.json").read_text())
    assert state["init_adapter"] == record


@pytest.fixture(scope="module")
def peft_made(hf_dir, tmp_path_factory):
    """An adapter made by peft 0.21 itself (q/k/v/o, r 2, alpha 6, random A and B) and the PEFT model."""
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                       "o_proj"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = tmp_path_factory.mktemp("peft_made") / "adapter"
    pm.save_pretrained(out)
    return out, pm.eval()


PEFT_LORA = {"rank": 2, "alpha": 6.0, "targets": ["wq", "wk", "wv", "wo"]}


def test_a_run_from_a_peft_made_adapter_starts_at_peft_s_model(data, hf_dir, peft_made, tmp_path):
    out, pm = peft_made
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(hf_dir)
    rt = build_runtime(_cfg(data, hf_dir, tmp_path / "r", {**PEFT_LORA, "init_adapter": str(out)}))
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(rt.model.eval()(x), pm(x).logits, atol=1e-4, rtol=1e-4)
        plain = build_runtime(_cfg(data, hf_dir, tmp_path / "p", PEFT_LORA))  # without it: the base model
        assert not torch.allclose(plain.model.eval()(x), pm(x).logits, atol=1e-3)


def _one_line(fn) -> str:
    with pytest.raises(ConfigError) as exc:
        fn()
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_bad_init_adapters_are_one_line(data, hf_dir, peft_made, tmp_path):
    out, _ = peft_made
    lora = {**PEFT_LORA, "init_adapter": str(out)}

    def build(**over):
        return build_runtime(_cfg(data, hf_dir, tmp_path / "r", {**lora, **over.pop("lora", {})}, **over))

    msg = _one_line(lambda: build(lora={"init_adapter": str(tmp_path / "nowhere")}))
    assert msg.startswith("lora.init_adapter=") and "does not exist" in msg
    msg = _one_line(lambda: build(lora={"init_adapter": str(out / "adapter_config.json")}))
    assert msg.startswith("lora.init_adapter=") and "is a file" in msg
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(out / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not unpickled")
    msg = _one_line(lambda: build(lora={"init_adapter": str(pickled)}))
    assert msg.startswith("lora.init_adapter=") and "adapter_model.bin" in msg and "safetensors" in msg
    for field, value, says in (("rank", 4, "2"), ("alpha", 2.0, "6"), ("targets", ["wq", "wv"], "'wo'")):
        msg = _one_line(lambda: build(lora={field: value}))
        assert msg.startswith(f"lora.{field}={value!r} is invalid; valid: ") and says in msg and "adapter" in msg
    with pytest.raises(ConfigError, match=r"^init_from=None is invalid; valid: the Hugging Face directory of the base"):
        load_train_config({"lora": lora})
    # the adapter names its base: another model's weights are refused (a copy of the base passes)
    copy = tmp_path / "copy"
    shutil.copytree(hf_dir, copy)
    build(init_from=str(copy))
    torch.manual_seed(1)
    other = tmp_path / "other"
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(other)
    msg = _one_line(lambda: build(init_from=str(other)))
    assert msg.startswith(f"init_from={str(other)!r} is invalid; valid: {hf_dir} or a copy of it")
    # an adapter whose tensors do not fit the model (its config edited to another rank)
    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    msg = _one_line(lambda: build(lora={"init_adapter": str(edited), "rank": 3}))
    assert "has shape" in msg


def test_init_adapter_round_trips_yaml_and_bad_values_are_one_line():
    import yaml

    from meshwright.config.io import dump_yaml, from_dict
    from meshwright.config.schema import TrainConfig

    cfg = from_dict(TrainConfig, {"init_from": "/models/base", "lora": {"rank": 2, "init_adapter": "/adapters/a"}})
    assert load_train_config(yaml.safe_load(dump_yaml(cfg))).lora == cfg.lora and cfg.lora.init_adapter == "/adapters/a"
    for value in (5, ""):
        msg = _one_line(lambda: from_dict(TrainConfig, {"init_from": "/m", "lora": {"init_adapter": value}}))
        assert msg.startswith(f"lora.init_adapter={value!r} is invalid; valid: ") and "null" in msg


def test_the_start_record_is_hashed_by_rank_0_alone_and_its_refusal_reaches_every_rank(exported, tmp_path,
                                                                                      monkeypatch):
    """``start_record`` on two ranks (rank 0's text handed to rank 1, as ``broadcast_text`` does): only rank 0 hashes
    the adapter and both get its record; where rank 0 cannot read it, both raise the same one line instead of rank 1
    waiting for a rank 0 that stopped."""
    from meshwright.train import peft_init

    hashed = []
    monkeypatch.setattr(peft_init, "adapter_reference", lambda path: hashed.append(path) or adapter_reference(path))
    sent: list[str] = []

    def from_rank0(text):
        if text is not None:
            sent.append(text)
        return sent[-1]

    records = [peft_init.start_record(exported, rank == 0, from_rank0) for rank in (0, 1)]
    assert len(hashed) == 1 and records[0] == records[1] == adapter_reference(exported)
    gone = tmp_path / "gone"
    shutil.copytree(exported, gone)
    (gone / "adapter_model.safetensors").unlink()  # removed after the build read it
    errors = []
    for rank in (0, 1):
        with pytest.raises(ConfigError) as err:
            peft_init.start_record(gone, rank == 0, from_rank0)
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "\n" not in errors[0]
    assert errors[0].startswith(f"lora.init_adapter={str(gone)!r} is invalid; valid: a readable PEFT adapter")
