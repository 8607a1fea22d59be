"""DeepSpeed ZeRO-1/2/3 as an alternative data-parallel backend behind the same Runtime seam.

The engine is created in ``build_optimizer`` (DeepSpeed wraps the optimiser the trainer makes):
``zero_allow_untested_optimizer`` lets it take the trainer's plain ``torch.optim.AdamW``, so DeepSpeed's
fused C++ Adam (a minutes-long build on CPU) is never compiled (a DeepSpeed-built optimizer would
need ``"torch_adam": true`` in its params for the same reason). Gradient accumulation is DeepSpeed's own:
``gradient_accumulation_steps`` equals the micro-batches per step and ``engine.backward`` scales.
"""

from __future__ import annotations

import gc
import math
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from meshwright.config import ModelConfig, load_model_config
from meshwright.errors import invalid
from meshwright.models import build_model, lm_loss
from meshwright.models.init import resolve_init
from meshwright.parallel.support import check_runtime_support
from meshwright.plan import Plan, validate_plan
from meshwright.train.precision import PrecisionPolicy
from meshwright.train.runtime import Batch, Runtime, TorchDistributedCollectives


def deepspeed_config(zero: int, micro_batch: int, grad_accum: int, dp: int, grad_clip: float = 0.0) -> dict[str, Any]:
    """The DeepSpeed JSON config for a ZeRO ``zero`` run in fp32 (also what `plan export` would emit)."""
    if zero not in (1, 2, 3):
        raise invalid("zero", zero, "1, 2 or 3 with dp_backend=deepspeed")
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * dp,
        "zero_optimization": {"stage": zero},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": grad_clip,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedRuntime(TorchDistributedCollectives, Runtime):
    """Pure ZeRO data parallelism over all ranks with a DeepSpeed engine."""

    def __init__(self, model_cfg: ModelConfig | str | dict, plan: Plan, *, train_cfg: Any = None, seed: int = 1234,
                 device: torch.device | None = None, micro_batches_per_step: int | None = None) -> None:
        cfg = load_model_config(model_cfg)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        validate_plan(plan, cfg, self.world_size)
        check_runtime_support(plan, cfg, "dtensor", "deepspeed")
        self.dp_rank, self.dp_size = self.rank, self.world_size
        self.zero = plan.layer_strategies()[0].zero
        if self.zero == 0:
            raise invalid("layers[0].zero", 0, "1, 2 or 3 with dp_backend=deepspeed (zero=0 is plain DDP: use dp_backend=torch)")
        self.device = device or torch.device("cpu")
        self.init = scheme = resolve_init(getattr(train_cfg, "init", "auto"), self.device.type)  # as one process
        self.model = (build_model(cfg, device=self.device, seed=seed, init="keyed") if scheme == "keyed"
                      else build_model(cfg, device="cpu", seed=seed).to(self.device))
        gb = train_cfg.global_batch if train_cfg is not None else plan.global_batch
        mb = train_cfg.micro_batch if train_cfg is not None else plan.micro_batch
        self.grad_accum = micro_batches_per_step or gb // (self.dp_size * mb)
        self.ds_config = deepspeed_config(self.zero, mb, self.grad_accum, self.dp_size)
        precision = PrecisionPolicy.from_dtype(train_cfg.dtype if train_cfg is not None else "fp32")
        self.ds_config.update(precision.deepspeed_sections())  # bf16: bf16 weights, fp32 master copy
        self.compute_dtype = precision.compute_dtype
        self.engine: Any = None
        self._params = list(self.model.parameters())

    def parameters(self) -> Iterable[nn.Parameter]:
        return self._params

    def close(self) -> None:
        """Release the engine (its ZeRO optimizer holds the data-parallel group) and the model before the group is
        destroyed (parallel/teardown.py). Idempotent; the runtime is unusable after it."""
        engine, self.engine = self.engine, None
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
        del engine
        for name in ("model", "_params"):
            self.__dict__.pop(name, None)
        gc.collect()

    def build_optimizer(self, make: Any) -> torch.optim.Optimizer:
        import deepspeed
        import deepspeed.ops

        if self.device.type == "cpu":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (minutes on a small box);
            # mark it unavailable so collectives go through our gloo process group instead.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        optimizer = make(self.param_groups())
        self.engine, ds_opt, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=self.ds_config,
                                                         dist_init_required=False)
        return ds_opt

    def _need_engine(self) -> Any:
        if self.engine is None:
            raise RuntimeError("DeepSpeedRuntime: call build_optimizer(make) before forward_backward (DeepSpeed owns the optimizer)")
        return self.engine

    def forward_backward(self, micro_batches: list[Batch]) -> float:
        engine = self._need_engine()
        if len(micro_batches) != self.grad_accum:
            raise invalid("micro_batches", len(micro_batches), f"{self.grad_accum} per step (DeepSpeed gradient_accumulation_steps)")
        engine.train()
        total = 0.0
        for i, (x, y) in enumerate(micro_batches):
            loss = lm_loss(engine(x.to(self.device)), y.to(self.device))
            engine.backward(loss)
            if i < len(micro_batches) - 1:
                engine.step()  # DeepSpeed counts micro-steps; only the boundary step updates
            total += float(loss.detach())
        return self.all_reduce_mean(total / len(micro_batches))

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[Batch]) -> float:
        engine = self._need_engine()
        engine.eval()
        local = sum(float(lm_loss(engine(x.to(self.device)), y.to(self.device))) for x, y in micro_batches) / len(micro_batches)
        engine.train()
        return self.all_reduce_mean(local)

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Full fp32 gradients by name (collective under ZeRO-3): for parity checks and the grad norm."""
        from deepspeed.utils import safe_get_full_grad

        out = {}
        for name, p in self.model.named_parameters():
            g = safe_get_full_grad(p)
            if g is not None:
                out[name] = g.detach().float().clone()
        return out

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Global grad norm (from the full gradients); DeepSpeed clips inside ``step`` with ``max_norm``."""
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in self.full_grads().values()))
        opt = self.engine.optimizer
        if hasattr(opt, "clip_grad"):
            opt.clip_grad = max_norm
        self.engine._config.gradient_clipping = max_norm
        return norm

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.engine.step()

    def model_state(self) -> dict[str, Any]:
        """Full parameters by plain name (ZeRO-3 partitions are gathered)."""
        import deepspeed

        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.zero == 3):
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_model_state(self, state: dict[str, Any]) -> None:
        import deepspeed

        params = dict(self.model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0, enabled=self.zero == 3):
            with torch.no_grad():
                for k, p in params.items():
                    v = state[k]
                    p.copy_(v.full_tensor() if hasattr(v, "full_tensor") else v)

    # ---- checkpoints: full fp32 master weights and Adam states by plain name (any dp size reloads them)
    _STATE_KEYS = ("exp_avg", "exp_avg_sq")

    def _base_states(self) -> list[dict]:
        return list(self._need_engine().optimizer.optimizer.state.values())

    def _link_states(self) -> None:
        """ZeRO-1/2 link each parameter's view of the flat Adam states lazily, once, right after the first
        param group's first step, so later groups' views stay empty (DeepSpeed 0.19): re-link here."""
        opt = self._need_engine().optimizer
        link = getattr(opt, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            opt._hp_optimizer_states_linked = False
            link()

    def _ensure_adam_states(self) -> None:
        """A fresh engine has no Adam states until its first step: create zero states on the flat fp32
        partitions (what AdamW's first step would do) so saved states can be written into them."""
        ds_opt = self._need_engine().optimizer
        base = ds_opt.optimizer
        flats = getattr(ds_opt, "fp32_partitioned_groups_flat", None)  # ZeRO-3 swaps its param_groups per step
        if flats is None:
            flats = [fp for group in base.param_groups for fp in group["params"]]
        for fp in flats:
            if not base.state[fp]:
                base.state[fp] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(fp),
                                  "exp_avg_sq": torch.zeros_like(fp)}

    def checkpoint_state(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """{"model", "optim"} for ``dcp.save``/``dcp.load``: gathered fp32 master weights and optimizer states."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._link_states()
        model, optim = {}, {}
        for name, p in self.model.named_parameters():
            model[name] = safe_get_full_fp32_param(p).detach().clone()
            if optimizer is not None:
                for key in self._STATE_KEYS:
                    # before the first step there are no states (a load template): zeros, no collective
                    v = safe_get_full_optimizer_state(p, key) if self.engine.global_steps > 0 else None
                    optim[f"{name}/{key}"] = v.detach().clone() if v is not None else torch.zeros_like(model[name])
        state: dict[str, Any] = {"model": model}
        if optimizer is not None:
            steps = [st["step"] for st in self._base_states() if "step" in st]
            optim["step"] = torch.tensor(float(steps[0]) if steps else 0.0, dtype=torch.float64)
            state["optim"] = optim
        return state

    def load_checkpoint_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer | None) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        restore_optim = optimizer is not None and float(state["optim"]["step"]) > 0
        if restore_optim:
            self._ensure_adam_states()
        self._link_states()
        for name, p in self.model.named_parameters():
            safe_set_full_fp32_param(p, state["model"][name])
            if not hasattr(p, "ds_tensor"):
                with torch.no_grad():
                    p.copy_(state["model"][name])  # ZeRO-1/2 keep a full working copy next to the fp32 master
            if restore_optim:
                for key in self._STATE_KEYS:
                    safe_set_full_optimizer_state(p, state["optim"][f"{name}/{key}"], key)
        if self.zero == 3:  # the partitioned working copy, next to the fp32 master partitions
            import deepspeed

            params = dict(self.model.named_parameters())
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                with torch.no_grad():
                    for name, p in params.items():
                        p.copy_(state["model"][name])
        if restore_optim:
            for st in self._base_states():
                if "step" in st:
                    st["step"] = st["step"].fill_(float(state["optim"]["step"])) if torch.is_tensor(st["step"]) else int(state["optim"]["step"])

