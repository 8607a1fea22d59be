"""meta_init's one-process pieces (the layouts are checked under torchrun in tests/distributed/fullspeed_2rank.py):
a whole meta model materialised on the CPU equals the one-process model under both schemes, savers included;
shard boxes of hand-cut shards; Parameter attributes survive ``to_empty``; a parameter nobody initialises is
an error, never ``to_empty``'s garbage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meshwright.config import load_model_config
from meshwright.memory.fp8_activations import FP8Linear
from meshwright.memory.wta_crs import WTACRSLinear
from meshwright.models import build_model
from meshwright.parallel.meta_init import materialize, shard_box
from meshwright.parallel.runtime import apply_plan_savers
from meshwright.plan import plan_from_dict

CFG = load_model_config({"name": "tiny-meta", "arch": "llama", "vocab_size": 64, "d_model": 32, "n_layers": 3,
                         "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "max_seq_len": 32})
PLAN = plan_from_dict({"model": "tiny-meta", "seq_len": 16, "global_batch": 2, "micro_batch": 2, "layers": [
    {"savers": {"fp8_act": True, "fp8_gemm": True}}, {"savers": {"wta_crs": 0.5}}, {}]})


@pytest.mark.parametrize("init", ["stream", "keyed"])
def test_a_meta_model_with_savers_materialises_to_the_one_process_model_with_them(init):
    ref = build_model(CFG, seed=3, init=init)
    apply_plan_savers(ref, PLAN, 3)
    meta = build_model(CFG, device="meta")
    apply_plan_savers(meta, PLAN, 3)  # class swaps only: nothing to draw, nothing to allocate
    assert all(p.device.type == "meta" for p in meta.parameters())
    materialize([meta], CFG, seed=3, device=torch.device("cpu"), init=init)
    want = dict(ref.named_parameters())
    got = dict(meta.named_parameters())
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert isinstance(meta.layers["0"].attention.wq, FP8Linear) and isinstance(meta.layers["1"].feed_forward.w2, WTACRSLinear)
    x = torch.randint(0, CFG.vocab_size, (2, 8))
    assert torch.equal(meta(x), ref(x))


def test_shard_box_places_an_equal_part_along_its_dim():
    assert shard_box((8, 32), 0, 2, 1) == ((16, 32), (8, 0))
    assert shard_box((32, 16), 1, 4, 3) == ((32, 64), (0, 48))
    assert shard_box((16,), 0, 2, 0) == ((32,), (0,))


def test_parameter_attributes_survive_materialisation():
    meta = build_model(CFG, device="meta")
    meta.layers["0"].attention.wq.weight.partition_dim = 0  # as megatron-core marks its shards
    meta.layers["1"].feed_forward.w1.weight._meshwright_expert = True
    materialize([meta], CFG, seed=3, device=torch.device("cpu"))
    assert meta.layers["0"].attention.wq.weight.partition_dim == 0
    assert meta.layers["1"].feed_forward.w1.weight._meshwright_expert is True
    assert meta.layers["0"].attention.wq.weight.device.type == "cpu"


@pytest.mark.parametrize("init", ["stream", "keyed"])
def test_a_parameter_the_one_process_model_lacks_is_an_error(init):
    meta = build_model(CFG, device="meta")
    meta.layers["2"].extra = nn.Linear(4, 4, device="meta")  # e.g. a saver that added an adapter
    with pytest.raises(KeyError, match="layers.2.extra.weight"):
        materialize([meta], CFG, seed=3, device=torch.device("cpu"), init=init)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_meta_model_with_savers_materialises_to_the_keyed_one_process_model():
    """The keyed path on its default device: drawn on the GPU, equal to the one-process keyed CUDA model with the
    same savers; one forward/backward through the FP8 layers (FP8 GEMMs on >= sm89) runs on the result."""
    device = torch.device("cuda")
    ref = build_model(CFG, seed=3, init="keyed", device=device)
    apply_plan_savers(ref, PLAN, 3)
    meta = build_model(CFG, device="meta")
    apply_plan_savers(meta, PLAN, 3)
    materialize([meta], CFG, seed=3, device=device, init="keyed")
    want = dict(ref.named_parameters())
    got = dict(meta.named_parameters())
    assert got.keys() == want.keys()
    assert all(got[n].device.type == "cuda" and torch.equal(got[n], want[n]) for n in want)
    x = torch.randint(0, CFG.vocab_size, (2, 8), device=device)
    out = meta(x)
    assert torch.equal(out, ref(x))
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in meta.parameters() if p.requires_grad)
