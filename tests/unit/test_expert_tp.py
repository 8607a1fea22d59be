"""Expert tensor parallelism (parallel/expert_tp.py) in one process: the shards' math summed over tp ranks is the
whole experts' (adapters included), each rank's shards hold the one-process model's slices after meta
initialisation (both schemes) on a fake process group, and bad degrees get one line. The multi-rank parity (loss,
gradients, grad norm, checkpoints) runs in tests/distributed (moe_savers_parity.py, ep_parity.py)."""

from __future__ import annotations

import pytest
import torch

from meshwright.config import load_model_config
from meshwright.errors import ConfigError
from meshwright.memory.lora import ExpertAdapter
from meshwright.models.moe import expert_swiglu

TINY = {"name": "tiny-moe-etp", "arch": "llama", "vocab_size": 64, "d_model": 16, "n_layers": 2, "n_heads": 4,
        "n_kv_heads": 2, "ffn_hidden": 32, "moe_ffn_hidden": 24, "n_experts": 4, "top_k": 2, "capacity_factor": None,
        "max_seq_len": 16}


def _adapter(n: int, rank: int, fan_in: int, fan_out: int, seed: int) -> ExpertAdapter:
    g = torch.Generator().manual_seed(seed)
    a = ExpertAdapter(n, rank, fan_in, fan_out, scale=2.0)
    with torch.no_grad():
        a.lora_A.copy_(torch.randn(a.lora_A.shape, generator=g))
        a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g))  # nonzero B: the adapters' output counts
    return a


@pytest.mark.parametrize("tp", [2, 3])
def test_tp_shards_of_the_experts_sum_to_the_whole_experts_with_adapters(tp):
    """Each tp rank runs w1/w3's hidden columns and w2's hidden rows of every expert (and the adapters' rows of its
    slice, ``moe._low_rank``); the sum of the ranks' partial outputs is the whole experts' output, and so are the
    gradients of x and of the adapters summed over the ranks (what the runtime's f/g pair and tp-partial sums do)."""
    torch.manual_seed(0)
    n, d, h, r = 3, 8, 12, 2
    w1, w3, w2 = torch.randn(n, h, d), torch.randn(n, h, d), torch.randn(n, d, h)
    x = torch.randn(10, d, requires_grad=True)
    counts = torch.tensor([4, 0, 6])
    gate_up, down = _adapter(n, r, d, 2 * h, 1), _adapter(n, r, h, d, 2)
    whole = expert_swiglu(x, counts, w1, w3, w2, adapters=(gate_up, down))
    whole.square().sum().backward()
    want = [t.grad.clone() for t in (x, gate_up.lora_A, gate_up.lora_B, down.lora_A, down.lora_B)]
    for t in (x, gate_up.lora_A, gate_up.lora_B, down.lora_A, down.lora_B):
        t.grad = None
    k = h // tp
    parts = [expert_swiglu(x, counts, w1[:, i * k:(i + 1) * k], w3[:, i * k:(i + 1) * k], w2[:, :, i * k:(i + 1) * k],
                           adapters=(gate_up, down), tp_index=(i, tp)) for i in range(tp)]
    total = torch.stack(parts).sum(0)
    torch.testing.assert_close(total, whole, rtol=1e-4, atol=1e-5 * float(whole.abs().max()))
    total.square().sum().backward()  # the backward of the summed partial outputs: the ranks' gradients summed
    got = [t.grad for t in (x, gate_up.lora_A, gate_up.lora_B, down.lora_A, down.lora_B)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))  # fp32 sums in another order
    # one rank alone is not the whole: the reduction is needed
    assert (parts[0] - whole).abs().max() > 1e-2


def _fake_world(size: int, rank: int):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=size)


@pytest.mark.parametrize("init", ["stream", "keyed"])
@pytest.mark.parametrize("tp,ep,rank", [(2, 1, 1), (2, 2, 3), (2, 2, 0)])
def test_meta_initialised_expert_shards_hold_the_one_process_slices(init, tp, ep, rank):
    """On meta, split over tp (DTensors) and sliced over ep (plain shards placed by ``meta_init.expert_box``), each
    rank's materialised expert weights are the one-process model's slices for the same seed, under both schemes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from meshwright.models import build_model
    from meshwright.models.moe import local_tensor
    from meshwright.parallel.expert_parallel import apply_ep
    from meshwright.parallel.meta_init import ep_boxes, materialize
    from meshwright.parallel.tensor_parallel import apply_tp

    cfg = load_model_config(TINY)
    ref = dict(build_model(cfg, device="cpu", seed=7, init=init).named_parameters())
    _fake_world(tp * ep, rank)
    try:
        mesh = init_device_mesh("cpu", (ep, tp), mesh_dim_names=("dp", "tp"))
        model = build_model(cfg, device="meta")
        boxes = {}
        for name, block in model.layers.items():
            apply_tp(block, mesh["tp"])
            if ep > 1:  # the runtime's record of the cut (DistributedRuntime.shard_boxes)
                apply_ep(block, mesh["dp"].get_group())
                boxes.update(ep_boxes(block.feed_forward.experts, f"layers.{name}.feed_forward.experts"))
        materialize([model], cfg, 7, torch.device("cpu"), init, boxes)
        tp_r, ep_r = mesh["tp"].get_local_rank(), mesh["dp"].get_local_rank()
        checked = 0
        for name, p in model.named_parameters():
            if ".experts.w" not in name:
                continue
            w = name.rsplit(".", 1)[-1]
            full = ref[name]
            n_local = cfg.n_experts // ep
            want = full[ep_r * n_local:(ep_r + 1) * n_local]
            dim = 2 if w == "w2" else 1
            k = want.shape[dim] // tp
            want = want.narrow(dim, tp_r * k, k)
            torch.testing.assert_close(local_tensor(p).detach(), want, rtol=0, atol=0)
            checked += 1
        assert checked == 3 * cfg.n_moe_layers
    finally:
        dist.destroy_process_group()


def test_an_expert_hidden_size_tp_does_not_divide_is_one_line():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from meshwright.models import build_model
    from meshwright.parallel.expert_tp import apply_expert_tp

    cfg = load_model_config({**TINY, "moe_ffn_hidden": 25})
    model = build_model(cfg, seed=0)
    _fake_world(2, 0)
    try:
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        with pytest.raises(ConfigError, match=r"^tp=2 is invalid.*moe_ffn_hidden=25") as e:
            apply_expert_tp(model.layers["0"].feed_forward, mesh)
        assert "\n" not in str(e.value)
    finally:
        dist.destroy_process_group()
