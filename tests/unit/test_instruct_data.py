"""Fine-tuning data: a pretrained model's tokenizer.json, prompt/response and chat jsonl with the loss masked
to the responses, and the tokenizer/vocabulary checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

tokenizers = pytest.importorskip("tokenizers")

from meshwright.config import load_train_config  # noqa: E402
from meshwright.data.corpus import stdlib_files  # noqa: E402
from meshwright.data.loader import IGNORE_INDEX, SequenceLoader, TokenDataset, build_loaders  # noqa: E402
from meshwright.data.prepare import prepare  # noqa: E402
from meshwright.data.tokenizer import BPETokenizer, HFTokenizer, load_tokenizer  # noqa: E402
from meshwright.errors import ConfigError  # noqa: E402
from meshwright.models import lm_loss  # noqa: E402

EXAMPLES = [
    {"prompt": "Q: what is two plus two?\nA: ", "response": "four"},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"},
                  {"role": "assistant", "content": "blue"}]},
    {"prompt": "Translate 'chat' to English: ", "response": "cat"},
] * 20


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    texts = [f.read_text(errors="replace") for f in stdlib_files(10)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    BPETokenizer.train(texts, 600).save(path)
    return path


@pytest.fixture()
def jsonl(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return path


def test_mask_covers_exactly_the_responses(tok_path, jsonl, tmp_path):
    out = prepare([jsonl], tmp_path / "prep", tokenizer=str(tok_path), fmt="instruct", progress=False)
    ds = TokenDataset(out)
    tok = load_tokenizer(out)
    assert isinstance(tok, HFTokenizer) and ds.vocab_size == tok.vocab_size == 600
    offs = ds.doc_offsets.tolist()
    trained = [tok.decode(ds.tokens[a:b][ds.mask[a:b].astype(bool)]) for a, b in zip(offs[:3], offs[1:4])]
    assert trained == ["four", "blue\n", "cat"]  # eos is trained too, and decodes to nothing
    assert all(ds.tokens[b - 1] == tok.eos_id and ds.mask[b - 1] == 1 for b in offs[1:4])
    assert ds.mask.sum() < 0.5 * len(ds)  # prompts, system/user turns and role headers are not trained


def test_loader_masks_targets_and_loss_ignores_them(tok_path, jsonl, tmp_path):
    ds = TokenDataset(prepare([jsonl], tmp_path / "prep", tokenizer=str(tok_path), fmt="instruct", progress=False))
    loader = SequenceLoader(ds.tokens, 16, 4, 4, shuffle=False, loss_mask=ds.mask)
    (x, y), = loader.next_batch()
    want = torch.from_numpy(np.asarray(ds.tokens[1:65], dtype=np.int64)).view(4, 16)
    keep = torch.from_numpy(np.asarray(ds.mask[1:65], dtype=bool)).view(4, 16)
    assert torch.equal(y, want.masked_fill(~keep, IGNORE_INDEX))
    logits = torch.randn(4, 16, 600)
    ref = F.cross_entropy(logits[keep], want[keep])
    assert torch.allclose(lm_loss(logits, y), ref)
    assert lm_loss(logits, torch.full_like(y, IGNORE_INDEX)).item() == 0.0  # a fully masked micro-batch is not NaN


def test_train_config_reads_jsonl_with_the_tokenizer(tok_path, jsonl, tmp_path, monkeypatch):
    monkeypatch.setenv("MESHWRIGHT_CACHE", str(tmp_path / "cache"))
    cfg = load_train_config({"data": {"path": str(jsonl), "tokenizer": str(tok_path), "val_fraction": 0.2},
                             "seq_len": 16, "global_batch": 4, "micro_batch": 4})
    train, val, ds = build_loaders(cfg, 600, progress=False)
    assert ds.mask is not None and train.loss_mask is not None
    (_, y), = train.next_batch()
    assert (y == IGNORE_INDEX).any() and (y != IGNORE_INDEX).any()
    with pytest.raises(ConfigError, match="model.vocab_size"):  # tokenizer larger than the model's vocabulary
        build_loaders(cfg, 512, progress=False)


def test_byte_tokenizer_on_a_large_pretrained_vocabulary(tmp_path, capsys):
    from meshwright.data.loader import check_vocabulary

    ds = TokenDataset(prepare(stdlib_files(2), tmp_path / "bytes", progress=False))
    with pytest.raises(ConfigError, match="data.tokenizer='byte'") as err:
        check_vocabulary(ds, 32000, pretrained=True)
    assert "\n" not in str(err.value)
    check_vocabulary(ds, 32000, pretrained=False)
    assert "warning: data.tokenizer='byte'" in capsys.readouterr().err
    check_vocabulary(ds, 256, pretrained=True)  # the byte-level presets stay silent


def test_malformed_example_is_one_line(tok_path, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1 messages\[0\]"):
        prepare([bad], tmp_path / "o", tokenizer=str(tok_path), fmt="instruct", progress=False)


def test_data_prepare_cli_instruct(tok_path, jsonl, tmp_path, capsys):
    from meshwright.cli import main

    out = tmp_path / "cli"
    assert main(["data", "prepare", str(jsonl), "--out", str(out), "--tokenizer", str(tok_path), "--format", "instruct",
                 "--no-progress"]) == 0
    assert "tokenizer hf (vocab 600)" in capsys.readouterr().out
    assert TokenDataset(out).mask is not None
    assert main(["data", "prepare", str(jsonl), "--out", str(out), "--tokenizer", str(tmp_path / "none.json")]) == 2
    assert "tokenizer" in capsys.readouterr().err
