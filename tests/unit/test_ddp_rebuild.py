"""DDP's one bucket rebuild done between steps without the old buckets beside the new (parallel/data_parallel.py
``rebuild_buckets``), on a one-rank gloo group: the same steps as DDP's own rebuild, bit for bit, the gradients
views of the new buckets, and where no rebuild is due (no backward yet) the old buckets and views restored.
The bytes it saves are measured at 2 ranks in tests/distributed/state_bytes_worker.py (+4 B/param before)."""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist

from meshwright.models import build_model, lm_loss
from meshwright.parallel.data_parallel import apply_ddp, rebuild_buckets


def _steps(ddp, opt, own_rebuild: bool, n: int = 3) -> None:
    for step in range(n):
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step))
        with ddp.no_sync():  # a first microbatch accumulated into the buckets, as the runtime runs them
            (lm_loss(ddp(x[:1]), x[:1]) / 2).backward()
        (lm_loss(ddp(x[1:]), x[1:]) / 2).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if own_rebuild:
            assert rebuild_buckets(ddp) == (step == 0)  # once, after the first synchronised backward


def test_rebuild_between_steps_is_ddps_rebuild_bit_for_bit(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        runs = []
        for own in (False, True):
            model = build_model("tiny", seed=0)
            ddp = apply_ddp(model, dist.group.WORLD, torch.device("cpu"))
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            if own:  # nothing due before a synchronised backward: untouched, still the construction's views
                before = [p.grad for p in model.parameters()]
                assert not rebuild_buckets(ddp) and all(p.grad is g for p, g in zip(model.parameters(), before))
            _steps(ddp, opt, own)
            assert ddp._has_rebuilt_buckets
            grads = [p.grad for p in model.parameters()]
            assert all(g._is_view() for g in grads)  # views of the (new) buckets, no gradient of their own
            storages = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes() for g in grads}
            assert sum(storages.values()) == 4 * sum(p.numel() for p in model.parameters())  # one fp32 buffer
            runs.append([p.detach().clone() for p in model.parameters()])
            del ddp, opt
            gc.collect()  # the reducer before the group (see test_lora_cost's one-rank DDP test)
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    finally:
        dist.destroy_process_group()


def test_a_synchronised_forward_without_backward_restores_the_old_buckets(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_model("tiny", seed=0)
        ddp = apply_ddp(model, dist.group.WORLD, torch.device("cpu"))
        x = torch.randint(0, 256, (1, 16))
        ddp(x)  # synchronised forward, no backward: DDP has no rebuild order yet
        assert ddp._meshwright_synced
        views = [p.grad for p in model.parameters()]
        for v in views:
            v.fill_(0.0)
        assert not rebuild_buckets(ddp)
        assert all(p.grad is v and v.untyped_storage().nbytes() > 0 for p, v in zip(model.parameters(), views))
        del ddp
        gc.collect()
    finally:
        dist.destroy_process_group()
