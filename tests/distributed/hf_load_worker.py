"""Sharded Hugging Face loads (one torchrun launch, 2 gloo ranks): under tp2 (DTensor and Megatron), FSDP2
(ZeRO-3, embeddings too) and pp2 every rank's parameters equal the one-process ``from_pretrained`` load, the
first eval loss equals the one-process loss (rel <= 1e-5), and the DTensor/stage layouts read only part of the file."""

from __future__ import annotations

import sys

import torch

from parity_lib import Report, failure, init, rel, run_worker

from meshwright.models import from_pretrained, lm_loss
from meshwright.models import hf_weights
from meshwright.parallel.runtime import DistributedRuntime
from meshwright.plan import plan_from_dict

SEQ, GLOBAL, MICRO = 16, 4, 2


def plan(cfg, layers, **extra) -> dict:
    return {"model": cfg.name, "seq_len": SEQ, "global_batch": GLOBAL, "micro_batch": MICRO, "layers": layers, **extra}


def main() -> None:
    path, out = sys.argv[1], sys.argv[2]
    rank, world = init()
    ref = from_pretrained(path).eval()
    cfg = ref.cfg
    L = cfg.n_layers
    g = torch.Generator().manual_seed(3)
    tok = torch.randint(0, cfg.vocab_size, (GLOBAL, SEQ + 1), generator=g)
    x, y = tok[:, :-1], tok[:, 1:]
    with torch.no_grad():
        ref_loss = float(lm_loss(ref(x), y))
    total = sum(p.numel() for p in ref.parameters())
    ref_params = dict(ref.named_parameters())
    cases = {
        "tp2_dtensor": (plan(cfg, [{"tp": 2, "repeat": L}]), "dtensor"),
        "tp2_megatron": (plan(cfg, [{"tp": 2, "repeat": L}]), "megatron"),
        "fsdp2_zero3": (plan(cfg, [{"dp": 2, "zero": 3, "repeat": L}], embedding={"zero": 3}), "dtensor"),
        "pp2": (plan(cfg, [{"repeat": L}], pipeline={"degree": 2, "schedule": "1f1b", "microbatches": 2}), "dtensor"),
    }
    report = Report(out)
    real_read = hf_weights.SafetensorsReader.read
    for name, (p, backend) in cases.items():
        counted = {"n": 0}

        def counting(self, key, idx, _real=real_read, _c=counted):
            t = _real(self, key, idx)
            _c["n"] += t.numel()
            return t

        hf_weights.SafetensorsReader.read = counting
        try:
            rt = DistributedRuntime(cfg, plan_from_dict(p), tp_backend=backend, seed=99, init_from=path)
            hf_weights.SafetensorsReader.read = real_read
            worst = 0.0
            from torch.distributed.tensor import DTensor

            for pname, param in rt.model.named_parameters():
                full = param.full_tensor() if isinstance(param, DTensor) else param
                if param in getattr(rt, "_megatron_shards", {}):
                    dim, tp = rt._megatron_shards[param]
                    worst = max(worst, float((param.detach() - ref_params[pname].chunk(tp, dim=dim)[
                        rt.meshes.tp_mesh(tp).get_local_rank()]).abs().max()))
                    continue
                worst = max(worst, float((full.detach() - ref_params[pname].detach()).abs().max()))
            per = GLOBAL // rt.dp_size
            mine = [(x[rt.dp_rank * per + i: rt.dp_rank * per + i + MICRO], y[rt.dp_rank * per + i: rt.dp_rank * per + i + MICRO])
                    for i in range(0, per, MICRO)]
            loss_err = rel(rt.eval_loss(mine), ref_loss)
            frac = counted["n"] / total
            report.add(name, worst == 0.0 and loss_err <= 1e-5,
                       {"max_param_diff": worst, "loss_rel": loss_err, "read_fraction": frac})
        except Exception as exc:  # noqa: BLE001
            hf_weights.SafetensorsReader.read = real_read
            report.add(name, False, failure(name, exc))
    report.gather_and_write()


if __name__ == "__main__":
    run_worker(main)
