"""Sharded Hugging Face loads (one torchrun launch, 2 gloo ranks): under tp2 (DTensor and Megatron), FSDP2
(ZeRO-3, embeddings too) and pp2 every rank's parameters equal the one-process ``from_pretrained`` load (megatron's
shards: bitwise the slices megatron's copy from that full model takes), the first eval loss equals the one-process
loss (rel <= 1e-5), every layout reads only part of the file, and no random value is drawn for weights the load
overwrites (neither initialisation scheme runs). Megatron tp2 is built on meta (no rank builds the
whole model) and its first training step's loss equals the one-process loss too, for a Llama and (optional third
argument) a GPT-2 checkpoint (transposed Conv1D, fused c_attn: the boxes go through those transforms); with a fourth,
a Phi-3 checkpoint under tp2, DTensor and megatron (fused qkv_proj/gate_up_proj: each rank's q/k/v and gate/up shards
are row blocks of one fused tensor)."""

from __future__ import annotations

import sys

import torch

from parity_lib import Report, failure, init, rel, run_worker

from meshwright.models import from_pretrained, lm_loss
from meshwright.models import hf_weights
from meshwright.parallel import meta_init
from meshwright.parallel.runtime import DistributedRuntime
from meshwright.plan import plan_from_dict

SEQ, GLOBAL, MICRO = 16, 4, 2


def plan(cfg, layers, **extra) -> dict:
    return {"model": cfg.name, "seq_len": SEQ, "global_batch": GLOBAL, "micro_batch": MICRO, "layers": layers, **extra}


def reference(path: str):
    """The one-process load of ``path``, a batch and its loss."""
    ref = from_pretrained(path).eval()
    cfg = ref.cfg
    g = torch.Generator().manual_seed(3)
    tok = torch.randint(0, cfg.vocab_size, (GLOBAL, SEQ + 1), generator=g)
    x, y = tok[:, :-1], tok[:, 1:]
    with torch.no_grad():
        ref_loss = float(lm_loss(ref(x), y))
    return ref, cfg, x, y, ref_loss


def main() -> None:
    path, out = sys.argv[1], sys.argv[2]
    gpt2_path = sys.argv[3] if len(sys.argv) > 3 else None
    phi3_path = sys.argv[4] if len(sys.argv) > 4 else None
    rank, world = init()
    ref, cfg, x, y, ref_loss = reference(path)
    L = cfg.n_layers
    cases = {
        "tp2_dtensor": (plan(cfg, [{"tp": 2, "repeat": L}]), "dtensor", path),
        "tp2_megatron": (plan(cfg, [{"tp": 2, "repeat": L}]), "megatron", path),
        "fsdp2_zero3": (plan(cfg, [{"dp": 2, "zero": 3, "repeat": L}], embedding={"zero": 3}), "dtensor", path),
        "pp2": (plan(cfg, [{"repeat": L}], pipeline={"degree": 2, "schedule": "1f1b", "microbatches": 2}), "dtensor", path),
    }
    refs = {path: (ref, cfg, x, y, ref_loss)}
    if gpt2_path is not None:
        refs[gpt2_path] = reference(gpt2_path)
        g_cfg = refs[gpt2_path][1]
        cases["tp2_megatron_gpt2"] = (plan(g_cfg, [{"tp": 2, "repeat": g_cfg.n_layers}]), "megatron", gpt2_path)
    if phi3_path is not None:
        refs[phi3_path] = reference(phi3_path)
        p_cfg = refs[phi3_path][1]
        for backend in ("dtensor", "megatron"):
            cases[f"tp2_{backend}_phi3"] = (plan(p_cfg, [{"tp": 2, "repeat": p_cfg.n_layers}]), backend, phi3_path)
    report = Report(out)
    real_read = hf_weights.SafetensorsReader.read
    for name, (p, backend, ckpt) in cases.items():
        ref, cfg, x, y, ref_loss = refs[ckpt]
        total = sum(q.numel() for q in ref.parameters())
        ref_params = dict(ref.named_parameters())
        counted = {"n": 0}

        def counting(self, key, idx, _real=real_read, _c=counted):
            t = _real(self, key, idx)
            _c["n"] += t.numel()
            return t

        hf_weights.SafetensorsReader.read = counting
        draws = {"n": 0}
        real_replay, real_keyed = meta_init._replay_stream, meta_init.init_keyed

        def drawn(real, _d=draws):
            def wrapped(*a, **k):
                _d["n"] += 1
                return real(*a, **k)
            return wrapped

        meta_init._replay_stream, meta_init.init_keyed = drawn(real_replay), drawn(real_keyed)
        try:
            rt = DistributedRuntime(cfg, plan_from_dict(p), tp_backend=backend, seed=99, init_from=ckpt)
            hf_weights.SafetensorsReader.read = real_read
            meta_init._replay_stream, meta_init.init_keyed = real_replay, real_keyed
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
            extra = {}
            if backend == "megatron":  # built on meta like every other layout; step 1 trains on the loaded weights
                extra = {"meta_init": rt.meta_init, "step1_loss_rel": rel(rt.forward_backward(mine), ref_loss)}
            extra.update(init=rt.init, init_draw_calls=draws["n"])
            ok = (worst == 0.0 and loss_err <= 1e-5 and extra.get("meta_init", True) and extra.get("step1_loss_rel", 0) <= 1e-5
                  and draws["n"] == 0 and rt.init == "pretrained")
            report.add(name, ok, {"max_param_diff": worst, "loss_rel": loss_err, "read_fraction": frac, **extra})
            rt.close()
        except Exception as exc:  # noqa: BLE001
            hf_weights.SafetensorsReader.read = real_read
            meta_init._replay_stream, meta_init.init_keyed = real_replay, real_keyed
            report.add(name, False, failure(name, exc))
    report.gather_and_write()


if __name__ == "__main__":
    run_worker(main)
