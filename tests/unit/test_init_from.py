"""``init_from`` in a train config and ``meshwright export CKPT --hf OUT``: pretrained weights in, trained
weights out, checked against transformers' own forward."""

from __future__ import annotations


import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from meshwright.cli import main  # noqa: E402
from meshwright.config import load_train_config  # noqa: E402
from meshwright.errors import ConfigError  # noqa: E402
from meshwright.models import from_pretrained  # noqa: E402
from meshwright.train.build import build_runtime, run_training  # noqa: E402

from _train_helpers import prepared_corpus  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture()
def hf_dir(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(cfg)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _cfg(data, hf_dir, out, **kw):
    return load_train_config({"init_from": str(hf_dir), "data": {"path": str(data)}, "seq_len": 32, "global_batch": 4,
                              "micro_batch": 4, "steps": 3, "warmup_steps": 1, "eval_every": 0, "eval_batches": 1,
                              "out_dir": str(out), "progress": False, "energy": False, **kw})


def test_init_from_loads_the_checkpoint_weights(data, hf_dir, tmp_path, monkeypatch):
    def no_draws(*a, **k):  # the strict load fills every parameter: drawing initial values first is wasted time
        raise AssertionError("initial weights drawn although init_from overwrites all of them")

    monkeypatch.setattr("meshwright.train.build.build_model", no_draws)
    rt = build_runtime(_cfg(data, hf_dir, tmp_path / "run"))
    assert rt.init == "pretrained"
    want = from_pretrained(hf_dir)
    got = dict(rt.model.named_parameters())
    for name, p in want.named_parameters():
        assert torch.equal(got[name].detach().cpu(), p.detach()), name


def test_init_from_train_export_round_trip(data, hf_dir, tmp_path):
    run = tmp_path / "run"
    summary = run_training(_cfg(data, hf_dir, run))
    assert summary["final_loss"] is not None and summary["init"] == "pretrained"
    out = tmp_path / "exported"
    moved = hf_dir.rename(tmp_path / "moved")  # export reads the run's resolved model.yaml, not init_from's directory
    assert main(["export", str(run), "--hf", str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = from_pretrained(out).eval()
    start = from_pretrained(moved)
    trained = dict(ours.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in start.named_parameters())  # training moved the weights
    tokens = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert (back(tokens).logits - ours(tokens)).abs().max().item() < 1e-4


def _qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True))


def _phi3():
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=16, pad_token_id=None, bos_token_id=None,
        eos_token_id=None))


def _gemma2():
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=16, pad_token_id=None,
        bos_token_id=None, eos_token_id=None))


def _gemma3_multimodal():
    text = transformers.Gemma3TextConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=64, sliding_window=16, sliding_window_pattern=2,
                                         pad_token_id=None, bos_token_id=None, eos_token_id=None)
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    return transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4, image_token_index=255,
        boi_token_index=253, eoi_token_index=254))


# Qwen3: q/k head norms, head_dim != hidden/heads; the head norms are trained and exported too (not left at load).
# Phi-3: fused qkv_proj/gate_up_proj split for training and fused back on export, a window shorter than seq_len;
# every block of the fused tensors was trained and exported.
ROUND_TRIPS = {
    "qwen3": (_qwen3, "Qwen3ForCausalLM", {"layers.0.attention.q_norm.weight", "layers.1.attention.k_norm.weight"}),
    "phi3": (_phi3, "Phi3ForCausalLM", {*(f"layers.1.attention.{w}.weight" for w in ("wq", "wk", "wv")),
                                        *(f"layers.0.feed_forward.{w}.weight" for w in ("w1", "w3"))}),
    # Gemma 2: post norms, caps, a window on layer 0 shorter than seq_len; Gemma 3's multimodal checkpoint: its text
    # model trains and exports as Gemma3ForCausalLM (the vision tower is not imported)
    "gemma2": (_gemma2, "Gemma2ForCausalLM", {"layers.0.attention_post_norm.weight", "layers.1.ffn_post_norm.weight"}),
    "gemma3_multimodal": (_gemma3_multimodal, "Gemma3ForCausalLM", {"layers.0.attention.q_norm.weight",
                                                                    "layers.1.ffn_post_norm.weight"}),
}


@pytest.mark.parametrize("kind", list(ROUND_TRIPS))
def test_train_export_round_trip(kind, data, tmp_path):
    """A checkpoint of ``kind`` trains 2 steps, exports as its own transformers class, and transformers' logits on
    the export equal ours; the weights its architecture adds were trained and exported."""
    build, cls, trained = ROUND_TRIPS[kind]
    torch.manual_seed(0)
    build().save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    summary = run_training(_cfg(data, tmp_path / "hf", run, steps=2))
    assert summary["init"] == "pretrained"
    out = tmp_path / "exported"
    assert main(["export", str(run), "--hf", str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == cls
    if kind == "phi3":
        assert back.config.sliding_window == 16
    ours = from_pretrained(out).eval()
    start = from_pretrained(tmp_path / "hf")
    moved = {n for n, p in start.named_parameters() if not torch.equal(p, ours.get_parameter(n))}
    assert trained <= moved
    tokens = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert (back(tokens).logits - ours(tokens)).abs().max().item() < 1e-4


def test_init_from_bad_path_and_model_conflict(data, hf_dir, tmp_path):
    with pytest.raises(ConfigError, match="init_from"):
        build_runtime(_cfg(data, tmp_path / "nowhere", tmp_path / "run"))
    with pytest.raises(ConfigError, match="model"):
        build_runtime(_cfg(data, hf_dir, tmp_path / "run", model="small"))


def test_init_from_overrides_are_checked_against_the_checkpoint_not_a_default_model(data, tmp_path):
    """``model:`` under init_from overrides the checkpoint's config.json: ``n_kv_heads: 8`` is valid for this
    8-head checkpoint, though not for a default 4-head model (it was refused as one before the checkpoint was read);
    an override the checkpoint cannot take is still refused, naming the model field."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "hf8")
    rt = build_runtime(_cfg(data, tmp_path / "hf8", tmp_path / "run", model={"n_kv_heads": 8, "dropout": 0.0}))
    assert rt.model.cfg.n_kv_heads == 8 and rt.model.cfg.n_heads == 8
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads=3"):
        build_runtime(_cfg(data, tmp_path / "hf8", tmp_path / "run2", model={"n_kv_heads": 3}))


def test_export_refuses_a_directory_without_a_run(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--hf", str(tmp_path / "o")]) == 2
    assert "CKPT" in capsys.readouterr().err


def test_finetune_pretrained_on_chat_jsonl_with_its_tokenizer(tmp_path, monkeypatch):
    """init_from + the model's tokenizer.json + prompt/response jsonl: trains on responses only, and a byte
    tokenizer on the same (600-token) pretrained model is refused."""
    import json

    from meshwright.data.corpus import stdlib_files
    from meshwright.data.tokenizer import BPETokenizer

    monkeypatch.setenv("MESHWRIGHT_CACHE", str(tmp_path / "cache"))
    hf = tmp_path / "hf"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64)).save_pretrained(hf)
    BPETokenizer.train([f.read_text(errors="replace") for f in stdlib_files(5)], 600).save(hf / "tokenizer.json")
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"Q{i}: say {w}\nA: ", "response": w}) + "\n"
                           for i, w in enumerate(["yes", "no", "maybe", "always"] * 30)))
    cfg = load_train_config({"init_from": str(hf), "data": {"path": str(sft), "tokenizer": str(hf), "val_fraction": 0.2},
                             "seq_len": 32, "global_batch": 4, "micro_batch": 4, "steps": 20, "lr": 1e-2,
                             "warmup_steps": 2, "eval_every": 0, "eval_batches": 2, "out_dir": str(tmp_path / "run"),
                             "progress": False, "energy": False})
    summary = run_training(cfg)
    assert summary["final_loss"] < summary["first_loss"]
    bad = load_train_config({**{k: v for k, v in cfg.__dict__.items() if k not in ("data", "out_dir")},
                             "data": {"path": "default", "max_files": 5}, "out_dir": str(tmp_path / "run2")})
    with pytest.raises(ConfigError, match="data.tokenizer='byte'"):
        run_training(bad)


def test_export_carries_the_token_ids_and_generation_config_of_init_from(data, tmp_path):
    """An export without eos_token_id made transformers' generate run to max_length: the ids and generation config
    of init_from are kept in the run directory at its start and written beside the exported weights, even after the
    source directory moved."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=[2, 3], temperature=0.6,
                                                            do_sample=True)
    model.save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    run_training(_cfg(data, tmp_path / "hf", run, steps=1))
    (tmp_path / "hf").rename(tmp_path / "moved")
    out = tmp_path / "exported"
    assert main(["export", str(run), "--hf", str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert (back.config.bos_token_id, back.config.eos_token_id, back.config.pad_token_id) == (1, [2, 3], 0)
    assert back.generation_config.eos_token_id == [2, 3] and back.generation_config.temperature == 0.6


def test_export_carries_the_runs_tokenizer_and_leaves_a_foreign_one_alone(tmp_path, capsys):
    """data.tokenizer's files reach the export (AutoTokenizer loads it there); a tokenizer file the export directory
    already held, not written by an export, is not replaced."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers

    from meshwright.train.hf_companions import export_companions, save_companions

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"eos_token": "world"}')
    run = tmp_path / "run"
    copied = save_companions(SimpleNamespace(init_from=None, data=SimpleNamespace(tokenizer=str(tmp_path / "tok"))), run)
    assert copied == ["tokenizer.json", "tokenizer_config.json"]
    out = tmp_path / "out"
    out.mkdir()
    assert export_companions(run, out, earlier_export=False) == ["tokenizer.json", "tokenizer_config.json"]
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    assert loaded("hello world")["input_ids"] == [1, 2]
    from meshwright.train.hf_companions import companion_token_ids

    assert companion_token_ids(run, 3) == {"eos_token_id": 2}  # no init_from: the tokenizer's eos_token ("world")
    # the data encoded with other.json (another vocabulary): it ships as tokenizer.json, the name AutoTokenizer reads;
    # the tokenizer.json and tokenizer_config.json beside it are not its own and stay behind
    other = Tokenizer(models.WordLevel({"[UNK]": 0, "world": 1, "hello": 2, "<|endoftext|>": 3}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other.save(str(tmp_path / "tok" / "other.json"))
    run2 = tmp_path / "run2"
    assert save_companions(SimpleNamespace(init_from=None, data=SimpleNamespace(tokenizer=str(tmp_path / "tok" /
                                                                                              "other.json"))),
                           run2) == ["tokenizer.json"]
    out2 = tmp_path / "out2"
    out2.mkdir()
    assert export_companions(run2, out2, earlier_export=False) == ["tokenizer.json"]
    assert transformers.AutoTokenizer.from_pretrained(out2)("hello world")["input_ids"] == [2, 1]
    # the end-of-document id the data used: the neighbouring config's eos_token ("world") in other.json's vocabulary
    assert companion_token_ids(run2, 4) == {"eos_token_id": 1}
    # a file that is not a tokenizers JSON: one warning line, no tokenizer (the data's loading refuses it anyway)
    (tmp_path / "tok" / "vocab.txt").write_text("hello\nworld\n")
    capsys.readouterr()
    assert save_companions(SimpleNamespace(init_from=None, data=SimpleNamespace(tokenizer=str(tmp_path / "tok" /
                                                                                              "vocab.txt"))),
                           tmp_path / "run3") == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: data.tokenizer=") and "does not parse as one" in err[0], err
    assert not (tmp_path / "run3" / "hf").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "tokenizer.json").write_text("{}")
    assert export_companions(run, foreign, earlier_export=False) == ["tokenizer_config.json"]
    assert (foreign / "tokenizer.json").read_text() == "{}" and "left alone" in capsys.readouterr().err


def test_overwrite_removes_the_kept_companions_and_nothing_else(tmp_path):
    """--overwrite: a run from scratch must not export the previous run's tokenizer or token ids."""
    from meshwright.train.run_dir import remove_outputs

    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("token_ids.json", "tokenizer.json", "generation_config.json", "notes.txt"):
        (hf / name).write_text("{}")
    remove_outputs(tmp_path)
    assert sorted(p.name for p in hf.iterdir()) == ["notes.txt"]
