"""The expert-parallel cut's boxes (parallel/meta_init.py ``ep_boxes``), recorded once by the runtime in its
``shard_boxes`` (parallel/runtime.py), are where each rank's shards really sit: for an ep2 and an ep2 x tp2 cut
(expert tp: w1/w3 by hidden columns, w2 by hidden rows; the expert adapters by experts only), built by the runtime
itself on a fake process group in this one process, the recorded box equals the place the rank's coordinates give,
the values the rank holds after meta initialisation (base keyed, adapters drawn) are the one-process model's slice at
that box, and the checkpoints' DTensor view of each shard sits at that box. A runtime whose cut records other boxes
than the checkpoints' view is refused at build, and a plain shard with no box is refused by ``materialize`` (no path
may silently fill a shard as the full tensor's first rows). Under ZeRO-3 with ep2 over dp4 the record stays the ep
cut's box and FSDP's piece of it (d_model over edp) is filled, and shown to the checkpoints, at its place inside that
box; a checkpoint layout that would put it elsewhere is refused at build. The torchrun runs (init_from and
lora.init_adapter under ep2 starting at one process's loss) are tests/distributed/test_lora_init_adapter_torchrun.py
and cli_launch.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from meshwright.config import load_model_config
from meshwright.config.schema import LoraConfig
from meshwright.memory.lora import apply_lora_config
from meshwright.models import build_model
from meshwright.plan import plan_from_dict

TINY = {"name": "tiny-moe-boxes", "arch": "llama", "vocab_size": 64, "d_model": 16, "n_layers": 2, "n_heads": 4,
        "n_kv_heads": 2, "ffn_hidden": 32, "moe_ffn_hidden": 24, "n_experts": 4, "top_k": 2, "capacity_factor": None,
        "max_seq_len": 16}
LORA = LoraConfig(rank=2, targets=["wq", "experts.gate_up_proj", "experts.down_proj"])
SEED = 3
HIDDEN_DIM = {"w1": 1, "w3": 1, "w2": 2}  # expert tp's cut, written out here (not expert_tp.EXPERT_TP_DIMS)


def _runtime(tp: int, ep: int, rank: int):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from meshwright.parallel.runtime import DistributedRuntime

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=tp * ep)
    plan = plan_from_dict({"version": 1, "model": TINY, "seq_len": 16, "global_batch": 4, "micro_batch": 2,
                           "layers": [{"tp": tp, "dp": ep, "ep": ep, "repeat": TINY["n_layers"]}]})
    return DistributedRuntime(TINY, plan, seed=SEED, init="keyed", lora=LORA)


def _expected_box(name: str, full: torch.Tensor, tp: int, ep: int, rank: int) -> tuple[tuple, tuple]:
    """Where rank ``rank`` of a tp-inner (rank = dp index * tp + tp index) layout holds ``name``: its ep
    coordinate's experts, and under tp its hidden slice of the expert weights (adapters stay whole over tp)."""
    tp_r, ep_r = rank % tp, (rank // tp) % ep
    n_local = TINY["n_experts"] // ep
    offset = [ep_r * n_local] + [0] * (full.dim() - 1)
    w = name.rsplit(".", 1)[-1]
    if w in HIDDEN_DIM:
        offset[HIDDEN_DIM[w]] = tp_r * full.shape[HIDDEN_DIM[w]] // tp
    return tuple(full.shape), tuple(offset)


@pytest.mark.parametrize("tp,ep,rank", [(1, 2, 0), (1, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 3)])
def test_recorded_boxes_are_where_each_rank_s_expert_shards_sit(tp, ep, rank):
    cfg = load_model_config(TINY)
    ref_model = build_model(cfg, seed=SEED, init="keyed")
    apply_lora_config(ref_model, LORA, seed=SEED)
    ref = {n: p.detach() for n, p in ref_model.named_parameters()}
    rt = _runtime(tp, ep, rank)
    try:
        boxes = rt.shard_boxes
        experts = {n: p for n, p in rt.model.named_parameters() if ".experts." in n}
        # 3 weights + 2 adapters x (A, B) per MoE layer, every one of them boxed, nothing else boxed (dtensor tp)
        assert len(experts) == 7 * cfg.n_moe_layers and set(boxes) == set(experts)
        state = rt.model.state_dict()  # the checkpoints' view (install_state_hooks): DTensors over ep (x tp)
        for name, p in experts.items():
            want = _expected_box(name, ref[name], tp, ep, rank)
            assert boxes[name] == want, name
            index = tuple(slice(o, o + n) for o, n in zip(want[1], p.shape))
            assert not isinstance(p, DTensor)
            if name.endswith("lora_B"):  # B starts at zero: equal to any slice, so also check a drawn value (A)
                assert not p.any()
            torch.testing.assert_close(p.detach(), ref[name][index], rtol=0, atol=0, msg=name)
            view = state[name]
            assert isinstance(view, DTensor), name
            shape, offset = compute_local_shape_and_global_offset(view.shape, view.device_mesh, view.placements)
            assert (tuple(view.shape), tuple(offset), tuple(shape)) == (want[0], want[1], tuple(p.shape)), name
        # the draw is not trivially equal: rank r's A differs from rank 0's experts' rows (the bug's shape)
        a = "layers.0.feed_forward.experts.gate_up_proj.lora_A"
        if boxes[a][1][0] != 0:
            assert not torch.equal(experts[a].detach(), ref[a][:experts[a].shape[0]])
    finally:
        rt.close()
        dist.destroy_process_group()


def test_a_cut_recording_other_boxes_than_the_checkpoint_view_is_refused(monkeypatch):
    """If the cut's record drifted from where the checkpoints put the shard (here: every rank records experts 0..),
    the runtime refuses to build instead of training (and saving) scrambled experts."""
    from meshwright.parallel import meta_init, runtime

    def first_experts(experts, prefix):  # the old bug: rank r's shards placed at experts 0..n_local-1
        out = meta_init.ep_boxes(experts, prefix)
        return {k: (shape, (0, *offset[1:])) for k, (shape, offset) in out.items()}

    monkeypatch.setattr(runtime, "ep_boxes", first_experts)
    with pytest.raises(RuntimeError, match=r"checkpoint view .* is not its box"):
        try:
            _runtime(1, 2, 1)
        finally:
            dist.destroy_process_group()


def test_a_plain_shard_without_a_box_is_refused_by_materialize():
    """``materialize`` fills a plain shard only through its box: without one (a cut that forgot to record it) it
    says which parameter, instead of drawing the full tensor's first experts into it."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from meshwright.parallel.expert_parallel import apply_ep
    from meshwright.parallel.meta_init import materialize

    cfg = load_model_config(TINY)
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        model = build_model(cfg, device="meta")
        apply_ep(model, dist.group.WORLD)
        with pytest.raises(RuntimeError, match=r"layers\.0\.feed_forward\.experts\.w1: a shard \(2, 24, 16\) of the "
                                               r"model's \(4, 24, 16\) with no box"):
            materialize([model], cfg, SEED, torch.device("cpu"), "keyed")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_dtensor_over_a_boxed_shard_is_placed_inside_its_box(rank):
    """FSDP over an ep shard: a DTensor (Shard(0) over 2 ranks) whose whole is ep rank 1's plain shard of w1 (experts
    2-3). Its box is the plain shard's; the keyed draw, the copy from a full tensor and ``init_from``'s index all put
    its local piece at the box's offset plus its placement's (expert 2 + rank), not at its placement's alone."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from meshwright.models.hf_weights import _local_index
    from meshwright.models.init import init_keyed
    from meshwright.parallel.meta_init import _copy_shard

    cfg = load_model_config(TINY)
    ref_model = build_model(cfg, seed=SEED, init="keyed")
    name = "layers.0.feed_forward.experts.w1"
    full = dict(ref_model.named_parameters())[name].detach()
    box = (tuple(full.shape), (2, 0, 0))  # ep rank 1 of 2: experts 2-3
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        shard_shape = (2, *full.shape[1:])
        local = torch.zeros((1, *full.shape[1:]))
        param = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shard_shape),
                                   stride=torch.empty(shard_shape).stride())
        want = full[2 + rank:3 + rank]
        init_keyed([(name, param)], ref_model.init_specs(), SEED, {name: box})
        torch.testing.assert_close(param.to_local(), want, rtol=0, atol=0)
        local.zero_()
        _copy_shard(param, full, box)
        torch.testing.assert_close(param.to_local(), want, rtol=0, atol=0)
        index, shape, _ = _local_index(param, box)
        assert shape == tuple(full.shape)
        torch.testing.assert_close(full[index], want, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


D_MODEL_DIM = {"w1": 2, "w3": 2, "w2": 1}  # ZeRO-2/3 x ep: FSDP's cut of each expert weight over edp (written out)


def _zero3_ep2_runtime(rank: int):
    """dp4 x ep2 at ZeRO-3 (edp 2) on a fake 4-rank group: the experts FSDP'd over edp inside their ep box."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from torch.distributed.tensor.debug import (_clear_fast_path_sharding_prop_cache,
                                                _clear_python_sharding_prop_cache)

    from meshwright.parallel.runtime import DistributedRuntime

    # all "ranks" live in this one process: DTensor's sharding-propagation caches would hand rank r the device mesh
    # (so the coordinate) of an earlier rank's equal-looking mesh (one rank per process in real runs)
    _clear_python_sharding_prop_cache()
    _clear_fast_path_sharding_prop_cache()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=4)
    plan = plan_from_dict({"version": 1, "model": TINY, "seq_len": 16, "global_batch": 4, "micro_batch": 1,
                           "layers": [{"dp": 4, "ep": 2, "zero": 3, "repeat": TINY["n_layers"]}]})
    return DistributedRuntime(TINY, plan, seed=SEED, init="keyed")


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_fsdp_expert_pieces_sit_inside_their_recorded_ep_box(rank):
    """ZeRO-3 with ep2 over dp4: one box record for the experts, the ep cut's (recorded before FSDP, so it is the
    plain shard's: its ep coordinate's experts), and FSDP's DTensor over it cuts d_model over edp within it. The
    rank's piece after keyed meta init is the one-process model's slice at box offset + its edp coordinate's d_model
    slice, and the checkpoints' DTensor of the full tensor (over edp x ep) puts the piece at that same place."""
    cfg = load_model_config(TINY)
    ref = {n: p.detach() for n, p in build_model(cfg, seed=SEED, init="keyed").named_parameters()}
    rt = _zero3_ep2_runtime(rank)
    try:
        boxes = rt.shard_boxes
        experts = {n: p for n, p in rt.model.named_parameters() if ".experts.w" in n}
        assert len(experts) == 3 * cfg.n_moe_layers and set(boxes) == set(experts)
        state = rt.model.state_dict()
        ep_r, edp_r = rank % 2, rank // 2  # the runtime's (pp, edp, ep, tp) mesh: ep inner
        for name, p in experts.items():
            w = name.rsplit(".", 1)[-1]
            assert isinstance(p, DTensor), name
            assert boxes[name] == _expected_box(name, ref[name], 1, 2, ep_r), name  # the ep shard's box, not FSDP's
            dim = D_MODEL_DIM[w]
            n = ref[name].shape[dim] // 2
            offset = list(boxes[name][1])
            offset[dim] += edp_r * n
            local = p.to_local()
            index = tuple(slice(o, o + k) for o, k in zip(offset, local.shape))
            assert local.shape[dim] == n
            torch.testing.assert_close(local, ref[name][index], rtol=0, atol=0, msg=name)
            view = state[name]
            shape, got = compute_local_shape_and_global_offset(view.shape, view.device_mesh, view.placements)
            assert (tuple(view.shape), tuple(got), tuple(shape)) == (tuple(ref[name].shape), tuple(offset),
                                                                    tuple(local.shape)), name
    finally:
        rt.close()
        dist.destroy_process_group()


def test_an_fsdp_checkpoint_view_outside_the_piece_s_box_is_refused(monkeypatch):
    """If the checkpoints' layout of the FSDP'd experts drifted from where the box and FSDP's placements put each
    piece (here: the experts over edp and d_model over ep, the two placements swapped), the runtime refuses to build."""
    from meshwright.parallel import runtime

    real = runtime.expert_checkpoint_layout

    def swapped(experts, w, mesh, tp):
        ckpt_mesh, placements = real(experts, w, mesh, tp)
        return ckpt_mesh, placements[::-1]

    monkeypatch.setattr(runtime, "expert_checkpoint_layout", swapped)
    with pytest.raises(RuntimeError, match=r"experts\.w1: its checkpoint view .* is not its piece's place in its box"):
        try:
            _zero3_ep2_runtime(1)
        finally:
            dist.destroy_process_group()
