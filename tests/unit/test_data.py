"""Data: byte/BPE tokenizers, `prepare` (memory-mapped tokens + index, atomic), the default corpus cache,
and the loader's determinism, resume position, data-parallel sharding and train/val split."""

import json

import numpy as np
import pytest
import torch

from meshwright.data.corpus import stdlib_files
from meshwright.data.loader import SequenceLoader, TokenDataset
from meshwright.data.prepare import prepare, prepare_default_corpus
from meshwright.data.tokenizer import ByteTokenizer, load_tokenizer
from meshwright.errors import ConfigError

TEXT_A = "def hello():\n    return 'héllo wörld'\n"
TEXT_B = "The quick brown fox jumps over the lazy dog.\n" * 3


@pytest.fixture()
def corpus_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text(TEXT_A)
    (src / "b.txt").write_text(TEXT_B)
    (src / "c.jsonl").write_text(json.dumps({"text": "first doc"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    return src


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT_A)
    assert max(ids) < 256 and tok.eos_id not in ids
    assert tok.decode(ids) == TEXT_A


def test_prepare_writes_memmap_and_index(corpus_dir, tmp_path):
    out = prepare([corpus_dir], tmp_path / "prepared", progress=False)
    index = json.loads((out / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["num_documents"] == 4
    ds = TokenDataset(out)
    offsets = np.fromfile(out / index["doc_offsets_file"], dtype="<i8").tolist()  # binary, not a JSON list
    assert "doc_offsets" not in index and offsets == ds.doc_offsets.tolist()
    assert offsets[-1] == len(ds) == index["num_tokens"]
    tok = load_tokenizer(out)
    docs = [tok.decode(ds.tokens[a:b]) for a, b in zip(offsets, offsets[1:])]
    assert docs == [TEXT_A, TEXT_B, "first doc", "second"]  # sorted files; jsonl: one document per line
    assert all(ds.tokens[b - 1] == tok.eos_id for b in offsets[1:])
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # temp dir renamed away
    # re-preparing replaces the directory atomically
    prepare([corpus_dir / "b.txt"], out, progress=False)
    assert TokenDataset(out).index["num_documents"] == 1


def test_prepare_bad_inputs_are_one_line_errors(corpus_dir, tmp_path):
    (corpus_dir / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2 is not valid JSON"):
        prepare([corpus_dir], tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="inputs=.*valid: an existing file or directory"):
        prepare([tmp_path / "missing.txt"], tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="tokenizer='wordpiece'"):
        prepare([corpus_dir / "a.py"], tmp_path / "o", tokenizer="wordpiece", progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="data.path="):
        TokenDataset(tmp_path / "nowhere")


def test_bpe_tokenizer_optional(corpus_dir, tmp_path):
    pytest.importorskip("tokenizers")
    out = prepare([corpus_dir], tmp_path / "bpe", tokenizer="bpe", vocab_size=300 + 256, progress=False)
    ds = TokenDataset(out)
    tok = load_tokenizer(out)
    assert tok.name == "bpe" and ds.vocab_size <= 556
    offsets = ds.doc_offsets
    assert tok.decode(ds.tokens[offsets[0]:offsets[1] - 1]) == TEXT_A
    assert len(ds) < len(ByteTokenizer().encode(TEXT_A + TEXT_B))  # BPE compresses


def test_default_corpus_is_stdlib_and_cached(tmp_path):
    files = stdlib_files(5)
    assert len(files) == 5 and all(f.suffix == ".py" for f in files) and files == sorted(files)
    first = prepare_default_corpus(max_files=5, progress=False, cache=tmp_path)
    stamp = (first / "tokens.bin").stat().st_mtime_ns
    again = prepare_default_corpus(max_files=5, progress=False, cache=tmp_path)
    assert again == first and (again / "tokens.bin").stat().st_mtime_ns == stamp  # not rebuilt
    assert prepare_default_corpus(max_files=6, progress=False, cache=tmp_path) != first
    text = load_tokenizer(first).decode(TokenDataset(first).tokens[:2000])
    assert "import" in text or "def " in text


def test_the_default_corpus_lists_the_files_a_filtered_rglob_finds():
    """The pruned walk (it never enters site-packages or test suites) finds exactly the files of the definition: every
    ``.py`` file under the standard library outside the excluded directories. Equal lists keep the corpus caches
    keyed on them valid."""
    from meshwright.data.corpus import EXCLUDED_DIRS, stdlib_root

    root = stdlib_root()
    defined = sorted(p for p in root.rglob("*.py")
                     if p.is_file() and not set(p.relative_to(root).parts[:-1]) & EXCLUDED_DIRS)
    assert len(defined) > 100 and stdlib_files() == defined
    assert stdlib_files(7) == [defined[int(i * len(defined) / 7)] for i in range(7)]


def _tokens(n=5000):
    return np.arange(n, dtype=np.int64) % 251


def test_loader_is_deterministic_and_seeded():
    a = SequenceLoader(_tokens(), seq_len=16, global_batch=8, micro_batch=4, seed=1)
    b = SequenceLoader(_tokens(), seq_len=16, global_batch=8, micro_batch=4, seed=1)
    c = SequenceLoader(_tokens(), seq_len=16, global_batch=8, micro_batch=4, seed=2)
    ba, bb, bc = a.next_batch(), b.next_batch(), c.next_batch()
    assert len(ba) == 2 and ba[0][0].shape == (4, 16) and ba[0][0].dtype == torch.int64
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(ba, bb))
    assert not torch.equal(ba[0][0], bc[0][0])
    x, y = ba[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one


def test_loader_resumes_at_the_same_position():
    a = SequenceLoader(_tokens(), seq_len=16, global_batch=8, micro_batch=8, seed=3)
    for _ in range(40):  # past one epoch (312 windows / 8 per step = 39 steps)
        a.next_batch()
    state = a.state_dict()
    expected = a.next_batch()[0][0]
    b = SequenceLoader(_tokens(), seq_len=16, global_batch=8, micro_batch=8, seed=3)
    b.load_state_dict(state)
    assert torch.equal(b.next_batch()[0][0], expected)
    with pytest.raises(ConfigError, match="seed"):
        SequenceLoader(_tokens(), seq_len=16, global_batch=8, micro_batch=8, seed=4).load_state_dict(state)


def test_epoch_visits_every_window_once():
    a = SequenceLoader(_tokens(1601), seq_len=16, global_batch=4, micro_batch=4, seed=0)
    assert a.n_windows == 100
    starts = [int(x[i, 0]) for _ in range(25) for x, _ in a.next_batch() for i in range(4)]
    first_tokens = {int(v) for v in _tokens(1601)[np.arange(100) * 16]}
    assert set(starts) == first_tokens and len(starts) == 100


@pytest.mark.parametrize("dp_size,micro", [(2, 2), (4, 1), (2, 4)])
def test_global_batch_is_the_same_for_any_dp_size(dp_size, micro):
    ref = SequenceLoader(_tokens(), seq_len=16, global_batch=8, micro_batch=8, seed=5)
    shards = [SequenceLoader(_tokens(), seq_len=16, global_batch=8, micro_batch=micro, dp_rank=r, dp_size=dp_size, seed=5)
              for r in range(dp_size)]
    for _ in range(3):
        whole = ref.next_batch()[0][0]
        parts = torch.cat([x for s in shards for x, _ in s.next_batch()])
        assert torch.equal(parts, whole)
    with pytest.raises(ConfigError, match="micro_batch=3"):
        SequenceLoader(_tokens(), seq_len=16, global_batch=8, micro_batch=3, dp_rank=0, dp_size=2)


def test_train_val_split_is_disjoint_at_a_document_boundary(corpus_dir, tmp_path):
    out = prepare([corpus_dir] * 1, tmp_path / "p", progress=False)
    ds = TokenDataset(out)
    point = ds.split_point(0.2)
    assert point in ds.doc_offsets
    train, val = ds.split("train", 0.2), ds.split("val", 0.2)
    assert len(train) + len(val) == len(ds) and len(val) > 0
    assert np.array_equal(np.concatenate([train, val]), np.asarray(ds.tokens))
