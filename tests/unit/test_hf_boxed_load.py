"""``load_pretrained_into`` with ``boxes`` (megatron-core tp shards: plain tensors cut by hand): each shard reads
exactly its box of the checkpoint, through the same transforms as the whole parameter (Llama's q/k rotary
permutation, Qwen2's q/k biases, GPT-2's transposed Conv1D and fused c_attn), and holds bitwise the slice of the
one-process load that megatron's copy from the full model took (torchrun run: tests/distributed/hf_load_worker.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from meshwright.errors import ConfigError  # noqa: E402
from meshwright.models import from_pretrained, load_pretrained_into  # noqa: E402
from meshwright.models import hf_weights  # noqa: E402
from meshwright.models.decoder import Decoder  # noqa: E402
from meshwright.parallel.meta_init import shard_box  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
COLUMN = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")  # megatron_tp's split
ROW = ("attention.wo", "feed_forward.w2")


def _saved(kind: str, tmp_path):
    T = transformers
    torch.manual_seed(0)
    hf = {"llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**SMALL)),
          "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**SMALL)),
          "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**SMALL, head_dim=12)),  # q/k head norms stay whole
          "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
          }[kind]()
    with torch.no_grad():  # biases and norms start at 0/1: perturb them so every mapping is seen
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / kind)
    return tmp_path / kind


def _megatron_shaped(cfg, tp: int, rank: int) -> tuple[nn.Module, dict[str, tuple]]:
    """A Decoder whose layers' linears hold rank ``rank``'s megatron-core shards (plain tensors of the local shape),
    and their boxes from ``shard_box``, as the runtime records them."""
    model = Decoder(cfg)
    boxes = {}
    for lname, block in model.layers.items():
        for path in COLUMN + ROW:
            parent, attr = path.rsplit(".", 1)
            lin = getattr(block.get_submodule(parent), attr, None)
            if lin is None:
                continue
            column = path in COLUMN
            for pname in ("weight", "bias"):
                p = getattr(lin, pname)
                if p is None or (pname == "bias" and not column):  # a row-parallel bias is replicated
                    continue
                dim = 0 if column else 1
                local = list(p.shape)
                local[dim] //= tp
                setattr(lin, pname, nn.Parameter(torch.full(local, float("nan"))))
                boxes[f"layers.{lname}.{path}.{pname}"] = shard_box(local, dim, tp, rank)
    return model, boxes


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gpt2"])
def test_boxed_shards_equal_the_full_loads_slices_and_read_only_their_box(kind, tmp_path, monkeypatch):
    path = _saved(kind, tmp_path)
    full = dict(from_pretrained(path).named_parameters())  # today's path: the whole model, then megatron's slices
    real_read = hf_weights.SafetensorsReader.read
    for rank in range(2):
        model, boxes = _megatron_shaped(from_pretrained(path).cfg, 2, rank)
        read = {"n": 0, "boxed": 0}

        def counting(self, key, idx, _c=read):
            t = real_read(self, key, idx)
            _c["n"] += t.numel()
            return t

        monkeypatch.setattr(hf_weights.SafetensorsReader, "read", counting)
        load_pretrained_into(model, path, boxes=boxes)
        monkeypatch.setattr(hf_weights.SafetensorsReader, "read", real_read)
        assert len(boxes) >= 2 * 5, boxes.keys()
        for name, p in model.named_parameters():
            want = full[name]
            if name in boxes:
                dim = 0 if any(f".{c}." in name for c in COLUMN) else 1
                want = want.chunk(2, dim=dim)[rank]
            assert torch.equal(p, want), (kind, rank, name)
        # every element read is one the rank holds: the boxes, not the whole tensors they come from
        assert read["n"] == sum(p.numel() for p in model.parameters()), (kind, read["n"])


def test_boxed_load_keeps_the_shape_and_unused_checks(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved("llama", tmp_path)
    cfg = from_pretrained(path).cfg
    model, boxes = _megatron_shaped(cfg, 2, 1)
    bad = {k: ((v[0][0] * 2, *v[0][1:]), v[1]) for k, v in boxes.items()}  # a box in a tensor twice the size
    with pytest.raises(ConfigError, match="has shape"):
        load_pretrained_into(model, path, boxes=bad)
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(3)
    save_file(state, str(path / "model.safetensors"))
    stage, stage_boxes = _megatron_shaped(cfg, 2, 1)  # a pipeline stage holding layer 1 only
    del stage.layers["0"]
    whole = [n for n, _ in Decoder(cfg).named_parameters()]
    with pytest.raises(ConfigError, match="no place for"):
        load_pretrained_into(stage, path, boxes=stage_boxes, whole_model=whole)
