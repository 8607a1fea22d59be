"""CoatAdamW: AdamW whose moments live in FP8 with per-group dynamic range expansion (COAT).

Why: fp32 AdamW keeps 8 bytes of state per parameter, often more than the weights and gradients
together. COAT stores both moments in FP8 (1 byte each) with one (scale, centre, exponent) triple per
128 elements, ~2.19 bytes per parameter, while master weights stay fp32. Each step dequantizes the
moments, runs the ordinary fp32 AdamW update (bias correction, decoupled weight decay) and requantizes.
Pure torch, so it runs on CPU and GPU alike; parameters may be FSDP2 DTensors (the update runs on the
local shard, groups are formed over the local shard's flattened elements).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable

import torch

from meshwright.errors import invalid
from meshwright.optim.coat_bytes import META_BYTES_PER_GROUP, coat_state_bytes_per_param  # noqa: F401
from meshwright.optim.coat_fused import compiled_update, fp8_adamw_update
from meshwright.optim.coat_triton import checked, coat_adamw_triton, eligible, triton_available
from meshwright.optim.fp8_quant import K_MIN, GroupQuantized, dequantize_groups, fp8_dtype, groups_of, quantize_groups

_MOMENTS = ("exp_avg", "exp_avg_sq")
_META = ("scale", "center", "expand")
FUSED_CHOICES = ("triton", "compile", "reference")
FUSED_ALIASES = {True: True, False: False, "compile": True, "reference": False}  # kept: True/False as before


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding a DTensor's local shard (FSDP2 parameter, gradient or state), or the tensor itself. Not
    ``to_local()``: for a parameter that hands out a fresh view at every call, which would defeat the Triton launch's
    once-per-parameter checks."""
    return t._local_tensor if hasattr(t, "to_local") else t


class CoatAdamW(torch.optim.Optimizer):
    """AdamW with FP8 first/second moments (``quantize=True``) or plain fp32 moments (``quantize=False``).

    ``m_format``/``v_format`` pick E4M3 or E5M2 per moment; ``expand=False`` switches off dynamic range
    expansion (naive per-group FP8, for comparison); ``k_min`` bounds the exponent from below (1/16:
    groups wider than FP8 are compressed, as COAT's kernel does; 1: expand only, small values may flush).
    ``fused`` picks the FP8 step: ``"triton"`` (:mod:`meshwright.optim.coat_triton`: one kernel launch
    per param group; CPU tensors run interpreted, for tests), ``"compile"``/``True`` (the compiled step
    of :mod:`meshwright.optim.coat_fused`, one per parameter), ``"reference"``/``False`` (plain torch
    ops). ``None``: on a GPU the Triton kernel when triton imports, else the compiled step (each falls
    back to the next with a warning if it fails); the reference ops on CPU. With ``quantize=False`` the
    update is term for term torch's single-tensor AdamW.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, quantize: bool = True, group_size: int = 128,
                 m_format: str = "e4m3", v_format: str = "e4m3", expand: bool = True, k_min: float = K_MIN,
                 fused: bool | None = None) -> None:
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise invalid("optimizer.lr", lr, "a number >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise invalid("optimizer.betas", betas, "two numbers in [0, 1)")
        if not eps >= 0:
            raise invalid("optimizer.eps", eps, "a number >= 0")
        if not weight_decay >= 0:
            raise invalid("optimizer.weight_decay", weight_decay, "a number >= 0")
        if not (isinstance(group_size, int) and group_size >= 1):
            raise invalid("optimizer.group_size", group_size, "a positive integer (COAT uses 128)")
        if not 0 < k_min <= 1:
            raise invalid("optimizer.k_min", k_min, "a number in (0, 1]: 1/16 compresses wide groups (COAT's kernel), 1 only expands")
        m_dtype, v_dtype = fp8_dtype(m_format), fp8_dtype(v_format)  # validated here: one-line error
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, quantize=quantize,
                        group_size=group_size, m_format=m_format, v_format=v_format, expand=expand, k_min=k_min)
        if not (fused is None or isinstance(fused, bool) or fused in FUSED_CHOICES):
            raise invalid("optimizer.fused", fused, "null (Triton on GPU if it imports, else compiled; "
                          "reference on CPU), 'triton', 'compile' (or true) or 'reference' (or false)")
        super().__init__(params, defaults)
        self._dtypes = {"exp_avg": m_dtype, "exp_avg_sq": v_dtype}
        self.fused = FUSED_ALIASES.get(fused, fused)  # not a param-group default: the state dict stays the reference's
        self._triton_failed = False  # fused=None: the Triton step failed once, the compiled step from then on

    # ---- state layout ----------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        local = _local(p)
        state = self.state[p]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if not group["quantize"]:
            for name in _MOMENTS:
                state[name] = torch.zeros_like(local, memory_format=torch.preserve_format)
            return state
        n_groups = groups_of(local.numel(), group["group_size"])
        for name in _MOMENTS:
            dtype = fp8_dtype(group["v_format"] if name == "exp_avg_sq" else group["m_format"])
            state[name] = torch.zeros(local.numel(), dtype=dtype, device=local.device)
            state[f"{name}_scale"] = torch.ones(n_groups, dtype=torch.float32, device=local.device)
            state[f"{name}_center"] = torch.zeros(n_groups, dtype=torch.float32, device=local.device)
            state[f"{name}_expand"] = torch.ones(n_groups, dtype=torch.float32, device=local.device)
        return state

    @staticmethod
    def _load_moment(state: dict[str, Any], name: str, like: torch.Tensor, group_size: int) -> torch.Tensor:
        gq = GroupQuantized(state[name], *(state[f"{name}_{m}"] for m in _META))
        return dequantize_groups(gq, like.shape, group_size)

    def _use_fused(self, param: torch.Tensor) -> bool:
        """The compiled per-parameter step (``fused="compile"``, or ``None`` on a GPU)."""
        return self.fused is True if self.fused is not None else param.is_cuda

    def _use_triton(self, param: torch.Tensor, grad: torch.Tensor) -> bool:
        """The Triton kernel: asked for (then ineligible tensors are an error), or ``None`` on a GPU."""
        if self.fused == "triton":
            why = eligible(param, grad)
            if why is not None:
                raise invalid("optimizer.fused", "triton", why)
            return True
        return (self.fused is None and param.is_cuda and not self._triton_failed and eligible(param, grad) is None
                and triton_available())

    @staticmethod
    def _moment(state: dict[str, Any], name: str) -> tuple[torch.Tensor, ...]:
        return state[name], state[f"{name}_scale"], state[f"{name}_center"], state[f"{name}_expand"]

    @staticmethod
    def _store_moment(state: dict[str, Any], name: str, value: torch.Tensor, group: dict[str, Any]) -> None:
        dtype = fp8_dtype(group["v_format"] if name == "exp_avg_sq" else group["m_format"])
        gq = quantize_groups(value, group["group_size"], dtype, expand=group["expand"], k_min=group.get("k_min", K_MIN))
        state[name] = gq.data
        for m in _META:
            state[f"{name}_{m}"] = getattr(gq, m)

    # ---- the update -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scalars: dict[tuple, torch.Tensor] = {}
        for group in self.param_groups:
            batch: dict[tuple, list] = {}  # (step, device) -> parameters for one Triton launch
            for p in group["params"]:
                if p.grad is None:
                    continue
                param, grad = _local(p), _local(p.grad)
                if grad.is_sparse:
                    raise invalid("grad.layout", "sparse", "dense gradients (CoatAdamW has no sparse path)")
                state = self.state[p] if self.state[p] else self._init_state(p, group)
                if group["quantize"] and self._use_triton(param, grad):
                    batch.setdefault((state["step"].item() + 1, param.device), []).append((param, grad, state))
                    continue
                state["step"] += 1
                step = state["step"].item()
                self._update(param, grad, state, group, step, scalars)
            if batch:  # the step counters of the batch in one call
                torch._foreach_add_([st["step"] for items in batch.values() for _, _, st in items], 1.0)
            for (step, _), items in batch.items():
                self._triton_update(items, group, step, scalars)
        return loss

    def _triton_update(self, items: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]], group: dict[str, Any],
                       step: float, scalars: dict[tuple, torch.Tensor]) -> None:
        """One kernel launch for the parameters of ``group`` at ``step`` on one device (moments in place)."""
        ms, vs, entries = [], [], []
        for param, _, state in items:  # the kernel writes in place: own, contiguous state tensors
            m, v = self._moment(state, "exp_avg"), self._moment(state, "exp_avg_sq")
            entry = checked(param, (*m, *v))  # these very tensors were launched on before: nothing to fix
            if entry is None and not all(t.is_contiguous() for t in (*m, *v)):
                for key, t in state.items():
                    if key != "step" and not t.is_contiguous():
                        state[key] = t.contiguous()
                m, v = self._moment(state, "exp_avg"), self._moment(state, "exp_avg_sq")
            ms.append(m)
            vs.append(v)
            entries.append(entry)
        beta1, beta2 = group["betas"]
        try:
            coat_adamw_triton([i[0] for i in items], [i[1] for i in items], ms, vs,
                              lr=group["lr"], weight_decay=group["weight_decay"], beta1=beta1, beta2=beta2,
                              eps=group["eps"], step=step, group_size=group["group_size"],
                              m_dtype=fp8_dtype(group["m_format"]), v_dtype=fp8_dtype(group["v_format"]),
                              expand=group["expand"], k_min=group.get("k_min", K_MIN), entries=entries)
        except Exception as exc:  # noqa: BLE001 - a Triton compile failure on this machine
            if self.fused == "triton":
                raise
            warnings.warn(f"CoatAdamW: the Triton step failed ({type(exc).__name__}: {str(exc)[:200]}); "
                          "using the compiled step from now on", RuntimeWarning, stacklevel=3)
            self._triton_failed = True
            for param, grad, state in items:
                self._update(param, grad, state, group, step, scalars)

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                step: float, scalars: dict[tuple, torch.Tensor]) -> None:
        """One parameter's step through the compiled step or the reference ops."""
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        if group["quantize"] and self._use_fused(param):
            key = (id(group), step, param.device)
            if key not in scalars:  # one small host-to-device copy per group and step
                scalars[key] = torch.tensor([1 - lr * wd, -lr / (1 - beta1 ** step),
                                             math.sqrt(1 - beta2 ** step)], dtype=torch.float32,
                                            device=param.device)
            decay, neg_step, bc2_sqrt = scalars[key].unbind()
            args = (param.detach(), grad, self._moment(state, "exp_avg"), self._moment(state, "exp_avg_sq"),
                    decay, neg_step, bc2_sqrt, beta1, beta2, eps, group["group_size"],
                    fp8_dtype(group["m_format"]), fp8_dtype(group["v_format"]), group["expand"],
                    group.get("k_min", K_MIN))
            try:
                new = compiled_update()(*args)
            except Exception as exc:  # noqa: BLE001 - a compiler failure (no Triton, no C++ compiler)
                if self.fused is True:
                    raise
                warnings.warn(f"CoatAdamW: the compiled step failed ({type(exc).__name__}: {str(exc)[:200]}); "
                              "using the reference ops from now on", RuntimeWarning, stacklevel=2)
                self.fused = False
                new = fp8_adamw_update(*args)
            for name, values in zip(_MOMENTS, new):
                state[name] = values[0]
                for m, t in zip(_META, values[1:]):
                    state[f"{name}_{m}"] = t
            return
        if group["quantize"]:
            exp_avg = self._load_moment(state, "exp_avg", param, group["group_size"]).to(param.dtype)
            exp_avg_sq = self._load_moment(state, "exp_avg_sq", param, group["group_size"]).to(param.dtype)
        else:
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        # Same operation order as torch.optim.AdamW (single-tensor path), so quantize=False matches it.
        param.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
        if group["quantize"]:
            self._store_moment(state, "exp_avg", exp_avg, group)
            self._store_moment(state, "exp_avg_sq", exp_avg_sq, group)

    # ---- checkpoints ------------------------------------------------------------------------------
    def _params_by_index(self, groups: list[dict[str, Any]] | None = None) -> dict[Any, tuple[torch.Tensor, dict]]:
        """state_dict index (or the ids listed in ``groups``) -> (parameter, its live param group)."""
        out: dict[Any, tuple[torch.Tensor, dict]] = {}
        idx = 0
        for gi, group in enumerate(self.param_groups):
            ids = groups[gi]["params"] if groups is not None else range(idx, idx + len(group["params"]))
            for pid, p in zip(ids, group["params"]):
                out[pid] = (p, group)
            idx += len(group["params"])
        return out

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict; for FSDP2 (DTensor) parameters the FP8 moments and their group metadata
        are wrapped as DTensors so distributed checkpoints (DCP) save every rank's shard.

        Moments travel as ``uint8`` (FP8 is not a gloo/DCP wire type); metadata is padded to the same
        number of groups per rank. A DCP checkpoint of FP8 states therefore reloads on the same FSDP mesh
        (groups are formed over each rank's shard), not onto a different world size.
        """
        sd = super().state_dict()
        params = self._params_by_index()
        for pid, st in list(sd["state"].items()):
            p, group = params[pid]
            if not hasattr(p, "device_mesh"):
                continue
            if group["quantize"]:
                sd["state"][pid] = _wrap_dtensor_state(p, dict(st), group["group_size"])
            else:  # fp32 moments are shaped like the local shard: present them like the parameter
                from torch.distributed.tensor import DTensor

                sd["state"][pid] = {k: DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                                          shape=p.shape, stride=p.stride()) if k in _MOMENTS else v
                                    for k, v in st.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts floating state to the parameter dtype on load; cast FP8 moments back (exact).

        Accepts what :meth:`state_dict` produced, including DTensor-wrapped shards (after a DCP load)
        and moments that arrive as raw bytes (``uint8``, how FP8 crosses gloo).
        """
        state_dict = dict(state_dict)
        state_dict["state"] = {pid: dict(st) for pid, st in state_dict["state"].items()}
        params = self._params_by_index(state_dict["param_groups"])
        for pid, st in state_dict["state"].items():
            p, group = params[pid]
            if not group["quantize"]:
                for name in _MOMENTS:
                    if name in st:
                        st[name] = _local(st[name])
                continue
            n_local = _local(p).numel()
            for name in _MOMENTS:
                dtype = fp8_dtype(group["v_format"] if name == "exp_avg_sq" else group["m_format"])
                t = _local(st[name]).reshape(-1)
                st[name] = t.view(dtype) if t.dtype == torch.uint8 else t.to(dtype)
                for m in _META:
                    st[f"{name}_{m}"] = _local(st[f"{name}_{m}"])[: groups_of(n_local, group["group_size"])]
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if not group["quantize"]:
                continue
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                for name in _MOMENTS:
                    dtype = fp8_dtype(group["v_format"] if name == "exp_avg_sq" else group["m_format"])
                    st[name] = st[name].to(dtype)
                    for m in _META:  # own copies: the Triton step updates state in place
                        st[f"{name}_{m}"] = st[f"{name}_{m}"].to(torch.float32, copy=True)

    def state_bytes(self) -> int:
        """Bytes held by moment tensors and their metadata (the ``step`` counters excluded)."""
        total = 0
        for st in self.state.values():
            for key, t in st.items():
                if key != "step" and isinstance(t, torch.Tensor):
                    t = _local(t)
                    total += t.numel() * t.element_size()
        return total


def _wrap_dtensor_state(p: Any, st: dict[str, Any], group_size: int) -> dict[str, Any]:
    """Present one FSDP2 parameter's FP8 state as DTensors laid out like the parameter (for DCP)."""
    from torch.distributed.tensor import DTensor, Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise invalid("optimizer.states", "fp8", "fp32 for this parameter layout; FP8 states checkpoint "
                      f"FSDP2 parameters sharded Shard(0) on a 1-D mesh (got {placements} on a {mesh.ndim}-D mesh)")
    local = p.to_local()
    world = mesh.size()
    rows = -(-p.shape[0] // world) if p.dim() else 1
    per_row = p.numel() // max(p.shape[0], 1) if p.dim() else 1
    g_max = groups_of(rows * per_row, group_size)
    for name in _MOMENTS:
        raw = st[name].view(torch.uint8).view(local.shape)
        st[name] = DTensor.from_local(raw, mesh, placements, run_check=False, shape=p.shape, stride=p.stride())
        for m in _META:
            meta = st[f"{name}_{m}"]
            padded = torch.zeros(g_max, dtype=meta.dtype, device=meta.device)
            padded[: meta.numel()] = meta
            st[f"{name}_{m}"] = DTensor.from_local(padded, mesh, (Shard(0),), run_check=False,
                                                   shape=(world * g_max,), stride=(1,))
    return st
