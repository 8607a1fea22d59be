"""Worker for test_meft_ddp: MEFT under DDP and FSDP2 on gloo ranks (launched by torchrun).

Gradients of the adapters are produced inside the reversible autograd Function's backward; this checks that DDP's
reducer (meshwright's ``apply_ddp``: gradients as views of its buckets) still averages them: every rank must end
with the mean of the per-rank gradients,
equal to what one process computes with plain autograd on all ranks' batches. FSDP2 is applied at
the root (``fully_shard(model)``): its pre-backward unshard runs before the reversible backward.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from meshwright.memory.meft import make_reversible, two_stream_reference
from meshwright.models import build_model, lm_loss
from meshwright.parallel.data_parallel import apply_ddp

V, S = 64, 16


def build(variant: str):
    base = build_model(dict(arch="llama", vocab_size=V, d_model=32, n_layers=4, n_heads=4, ffn_hidden=64,
                            max_seq_len=S), seed=0).double()
    m = make_reversible(base, variant=variant, adapter_dim=8, reversible_layers=4)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "adapter" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return m


def data(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, V, (2, S), generator=g), torch.randint(0, V, (2, S), generator=g)


def grads(m) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def max_err(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main() -> None:
    out_path = sys.argv[1]
    from parity_lib import pg_timeout

    dist.init_process_group("gloo", timeout=pg_timeout(60))  # 60 s on a quiet box, stretched by the load
    rank, world = dist.get_rank(), dist.get_world_size()
    pg = dist.group.WORLD
    mesh = init_device_mesh("cpu", (world,))
    result: dict[str, float | int | bool] = {"world": world}
    for variant in ("meft1", "meft3"):
        # reference: one process, plain autograd through the same two-stream network, all ranks' data
        ref_model = build(variant)
        ref: dict[str, torch.Tensor] = {}
        for r in range(world):
            ref_model.zero_grad(set_to_none=True)
            tok, tgt = data(r)
            h = two_stream_reference(ref_model.stack, ref_model.embed(tok), ref_model.rope(S))
            lm_loss(ref_model.output(ref_model.norm(h)), tgt).backward()
            for k, v in grads(ref_model).items():
                ref[k] = ref.get(k, 0) + v / world
            if r == rank:
                local = grads(ref_model)
        model = build(variant)
        ddp = apply_ddp(model, pg, torch.device("cpu"))
        tok, tgt = data(rank)
        lm_loss(ddp(tok), tgt).backward()
        got = grads(model)
        result[f"{variant}_bucket_view"] = bool(ddp._get_ddp_logging_data().get("gradient_as_bucket_view", 0))
        result[f"{variant}_n_grads"] = len(got)
        result[f"{variant}_err_vs_mean"] = max_err(got, ref)
        result[f"{variant}_diff_vs_local"] = max_err(got, local)  # > 0: the reduction really happened
        # one optimizer step keeps replicas identical
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        opt.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat, group=pg)
        result[f"{variant}_replica_diff"] = max(float((g - gathered[0]).abs().max()) for g in gathered)
        # FSDP2 (root-level): sharded gradients, reassembled, equal the same mean
        fsdp_model = build(variant)
        fully_shard(fsdp_model, mesh=mesh)
        lm_loss(fsdp_model(tok), tgt).backward()
        full = {n: p.grad.full_tensor() for n, p in fsdp_model.named_parameters() if p.requires_grad}
        result[f"{variant}_fsdp_err_vs_mean"] = max_err(full, ref)
    with open(f"{out_path}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from parity_lib import run_worker

    run_worker(main)
