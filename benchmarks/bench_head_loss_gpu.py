"""gpt2-small on the DistributedRuntime (torchrun, world 1, compile: true): where the output projection runs (#16).

Variants, in one process, each timed after warm-up and then traced (torch.profiler: device-busy seconds per step):

- ``eager_head``: the runtime as it was: the head GEMM in the eager stage (vocab 50257, unaligned for cuBLAS),
  then the compiled loss on its logits (``torch.compile(lm_loss)``);
- ``head_in_loss``: the head compiled together with the loss (``train/head_loss.py``; inductor pads the vocab);
- ``chunked``: ``loss_chunk_tokens`` = a quarter of the batch's tokens, each chunk's head + loss compiled;
- ``plain_compiled``: the same Decoder under a whole-model ``torch.compile`` loop (benchmarks/gpu_check.py's).

bf16, batch 16 x 1024, fused AdamW, clip 1.0. One JSON document on stdout (ratios against plain_compiled and
eager_head). ``--smoke``: tiny model, fp32, aot_eager, CPU (checks the plumbing).

    torchrun --standalone --nproc-per-node 1 benchmarks/bench_head_loss_gpu.py [--steps 10] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check import _loop_step, _memory, _reset_memory, _time_steps, _trace  # noqa: E402

from meshwright.config import load_model_config  # noqa: E402
from meshwright.models import build_model, lm_loss  # noqa: E402
from meshwright.parallel.runtime import DistributedRuntime, init_distributed  # noqa: E402
from meshwright.parallel.teardown import shutdown  # noqa: E402
from meshwright.plan import plan_from_dict  # noqa: E402
from meshwright.train.compile import fast_adamw_kwargs  # noqa: E402
from meshwright.train.precision import PrecisionPolicy  # noqa: E402

VARIANTS = ("eager_head", "head_in_loss", "chunked", "plain_compiled")


class EagerHeadCompiledLoss:
    """The runtime before #16's change: the head runs eagerly (as the stage's last module did), then the loss
    alone is compiled."""

    def __init__(self, backend: str) -> None:
        self.loss = torch.compile(lm_loss, backend=backend)

    def __call__(self, head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss(head(hidden), targets)


def runtime_variant(name: str, model: str, batch: int, seq: int, dtype: str, backend: str, device: torch.device,
                    x: torch.Tensor, warm: int, steps: int) -> dict[str, Any]:
    cfg = load_model_config(model)
    plan = plan_from_dict({"model": model, "seq_len": seq, "global_batch": batch, "micro_batch": batch,
                           "layers": [{"repeat": cfg.n_layers}]})
    chunk = batch * seq // 4 if name == "chunked" else 0
    rt = DistributedRuntime(cfg, plan, seed=0, device=device, precision=PrecisionPolicy.from_dtype(dtype),
                            compile_backend=backend, loss_chunk_tokens=chunk)
    if name == "eager_head":
        rt.head_loss = EagerHeadCompiledLoss(backend)
    opt = rt.build_optimizer(lambda groups: torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.1,
                                                              **fast_adamw_kwargs(device.type)))
    micro = [(x[:, :-1], x[:, 1:])]

    def step() -> torch.Tensor:
        loss = rt.forward_backward_lazy(micro)
        rt.clip_grad_norm_lazy(1.0)
        rt.optimizer_step(opt)
        return loss

    _reset_memory()
    dt, warm_s, losses = _time_steps(step, warm, steps)
    out = {"step_s": round(dt, 5), "warmup_s": round(warm_s, 1), **_memory(), **_trace(step),
           "loss_last": round(float(losses[-1]), 4), "loss_chunk_tokens": chunk}
    rt.close()
    return out


def plain_variant(model: str, dtype: str, backend: str, device: torch.device, x: torch.Tensor, warm: int,
                  steps: int) -> dict[str, Any]:
    m = build_model(load_model_config(model), device=device, seed=0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1, **fast_adamw_kwargs(device.type))
    step = _loop_step(torch.compile(m, backend=backend), m, opt, x, dtype)
    _reset_memory()
    dt, warm_s, losses = _time_steps(step, warm, steps)
    return {"step_s": round(dt, 5), "warmup_s": round(warm_s, 1), **_memory(), **_trace(step),
            "loss_last": round(float(losses[-1].detach()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    ap.add_argument("--smoke", action="store_true", help="tiny model, fp32, aot_eager on CPU")
    args = ap.parse_args()
    device = init_distributed()
    model, batch, seq, dtype, backend = (("tiny-gpt2", 2, 64, "fp32", "aot_eager") if args.smoke
                                         else ("gpt2-small", 16, 1024, "bf16", "inductor"))
    vocab = load_model_config(model).vocab_size
    x = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    results: dict[str, Any] = {}
    for name in args.only.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"--only={name!r} is invalid; valid: {', '.join(VARIANTS)}")
        torch._dynamo.reset()
        try:
            if name == "plain_compiled":
                results[name] = plain_variant(model, dtype, backend, device, x, args.warm, args.steps)
            else:
                results[name] = runtime_variant(name, model, batch, seq, dtype, backend, device, x, args.warm, args.steps)
            results[name]["tokens_per_s"] = round(batch * seq / results[name]["step_s"])
        except Exception as e:  # one variant's failure (e.g. OOM) costs that variant only
            results[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ratios = {}
    for base in ("plain_compiled", "eager_head"):
        b = results.get(base, {})
        for name, r in results.items():
            if name != base and "tokens_per_s" in r and "tokens_per_s" in b:
                ratios[f"{name}/{base} tokens_per_s"] = round(r["tokens_per_s"] / b["tokens_per_s"], 3)
                ratios[f"{name}-{base} device_busy_ms"] = round(
                    1e3 * (r["trace_device_busy_s"] - b["trace_device_busy_s"]), 2)
    env = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
           "model": model, "batch": batch, "seq": seq, "dtype": dtype, "backend": backend, "steps": args.steps}
    print(json.dumps({"env": env, "ratios": ratios, "variants": results}, indent=1))
    shutdown()  # collect what a failed variant left, then destroy (parallel/teardown.py)


if __name__ == "__main__":
    main()
