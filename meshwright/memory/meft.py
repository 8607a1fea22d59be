"""MEFT: make a pre-trained transformer reversible for memory-efficient fine-tuning.

Liao et al., NeurIPS 2023, "Make Pre-trained Model Reversible" (github.com/BaohaoLiao/mefts).
Every block becomes a two-stream layer on the input ``[h, h]``::

    y1 = λ·x1 + F(x2)        y2 = β·x2 + G(y1)        (outputs swapped for MEFT1/2)

and the final hidden state is the mean of the two streams. Because the map is invertible,
backward reconstructs each layer's input from its output (``x2 = (y2 - G(y1))/β``,
``x1 = (y1 - F(x2))/λ``) and re-runs F and G under grad, so only the top layer's output is kept:
activation memory no longer grows with depth. The price is recomputation and numerical error that
grows like ``(1/min(λ, β))**depth`` — hence partial reversibility (only the top N layers) and a
reconstruction error that is measured, not assumed.

Variants (as in the paper):

======  ====================================  ============  =====  =====  =======
name    F                                     G             λ      β      swap
======  ====================================  ============  =====  =====  =======
meft1   the pre-trained layer (+FFN adapter)  adapter       scale  1      yes
meft2   adapter                               layer (+FFN)  1      scale  yes
meft3   attention block (+adapter)            MLP (+adap.)  scale  scale  no
======  ====================================  ============  =====  =====  =======

Adapters' up-projections start at zero, so F or G reduces exactly to the pre-trained sub-network
at initialisation; what remains is the λ/β-scaled carry-over and the two-stream average
(measured in tests and docs/meft.md). Parameter gradients are *returned* from the autograd Function
(the adapters are inputs of it), so they are accumulated by ordinary ``AccumulateGrad`` nodes and
DDP's reducer hooks fire exactly as for plain autograd.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from meshwright.config.schema import PAPER_SCALE, VARIANTS, MeftConfig  # noqa: F401  (MeftConfig re-exported)
from meshwright.errors import invalid
from meshwright.models.decoder import Decoder, rope_slice

# Tolerated relative reconstruction error when choosing how many layers may be reversible by default.
DEFAULT_TOLERANCE = 1e-3
# The conversion-time measurement (random tokens, fresh adapters) must land 10x inside the tolerance: other
# inputs and adapters that grow in training amplify more, and the guard catches what is left.
CALIBRATION_MARGIN = 0.1


def layers_within_tolerance(per_layer: Sequence[float], tolerance: float) -> int:
    """From ``reconstruction_error(...)['per_layer']`` measured with every layer reversible (entry i = error of
    layer i's input after inverting from the top down to it): the most top layers whose inversion stays
    within ``tolerance`` at every depth."""
    n = 0
    for err in reversed(list(per_layer)):
        if not (err <= tolerance):  # NaN counts as too large
            break
        n += 1
    return n


def safe_reversible_layers(n_layers: int, dtype: torch.dtype, lam: float = PAPER_SCALE, beta: float = 1.0,
                           tolerance: float = DEFAULT_TOLERANCE) -> int:
    """How many top layers may be reversible so that eps(dtype)·(1/(λβ))^N stays below ``tolerance``.

    Inverting a layer divides by λ (and by β, whose error then passes through F and is divided by λ
    again), and with residual blocks F's Jacobian is close to the identity, so the relative error of
    the reconstructed input grows by ~1/(λβ) per layer — measured in benchmarks/results/meft.md
    (fp32, λ=0.1: ~6e-3 after 4 layers, ~50 after 8). Examples with tolerance 1e-3: fp64 → 12
    layers for MEFT1/2, 6 for MEFT3; fp32 → 3 for MEFT1/2, 1 for MEFT3; bf16/fp16 → 0.
    Pass ``reversible_layers`` explicitly after checking ``reconstruction_error`` on your model.

    This is an *upper bound*: real pre-trained layers amplify far more than 1/(λβ) (about 1000x per layer
    was measured on a 12-layer model), so ``make_reversible``'s default also measures the error at
    conversion (``calibrate_reversible_layers``) and guards it during training.
    """
    eps = torch.finfo(dtype).eps
    amp = 1.0 / min(lam * beta, 1.0)
    if amp <= 1.0:
        return n_layers
    n = int(math.floor(math.log(tolerance / eps) / math.log(amp)))
    return max(0, min(n_layers, n))


# ---- adapters -------------------------------------------------------------------------------------
class Adapter(nn.Module):
    """Houlsby bottleneck adapter (down, GELU, dropout, up); ``up`` starts at zero so it outputs 0."""

    def __init__(self, dim: int, bottleneck: int, dropout: float = 0.0, init_std: float = 0.02,
                 norm: bool = False, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(dim, **kw) if norm else None
        self.down = nn.Linear(dim, bottleneck, **kw)
        self.up = nn.Linear(bottleneck, dim, **kw)
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=init_std)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        return self.up(self.dropout(nn.functional.gelu(self.down(x))))


# ---- RNG capture/replay so dropout masks are identical when F and G are recomputed ----------------
RngState = tuple[torch.Tensor, torch.Tensor | None]


def _capture_rng(device: torch.device) -> RngState:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replay_rng(state: RngState | None, device: torch.device) -> Iterator[None]:
    if state is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _has_randomness(module: nn.Module) -> bool:
    """True if a forward of ``module`` in train mode draws random numbers (dropout anywhere)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            return True
        p = getattr(m, "dropout", None)
        if isinstance(p, float) and p > 0:  # attention modules that pass dropout_p to SDPA
            return True
    return False


# ---- the two-stream layer --------------------------------------------------------------------------
class MeftLayer(nn.Module):
    """One reversible two-stream layer; subclasses provide F, G and the modules each one uses."""

    lam: float
    beta: float
    swap: bool

    variant: str

    # Subclasses wrap one pre-trained layer and provide its three views (each with its adapter):
    def full(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        raise NotImplementedError

    def attn_block(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        raise NotImplementedError

    def mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def F(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:  # noqa: N802 - the paper's names
        """MEFT1: the whole layer; MEFT2: the reversible adapter; MEFT3: the attention block."""
        if self.variant == "meft1":
            return self.full(x, ctx)
        if self.variant == "meft2":
            return self.rev_adapter(x)
        return self.attn_block(x, ctx)

    def G(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:  # noqa: N802
        """MEFT1: the reversible adapter; MEFT2: the whole layer; MEFT3: the MLP block."""
        if self.variant == "meft1":
            return self.rev_adapter(x)
        if self.variant == "meft2":
            return self.full(x, ctx)
        return self.mlp_block(x)

    # ... and the modules each view runs (their trainable parameters get gradients in the custom backward):
    def full_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def attn_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def mlp_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def f_modules(self) -> list[nn.Module]:
        if self.variant == "meft1":
            return self.full_modules()
        if self.variant == "meft2":
            return [self.rev_adapter]
        return self.attn_modules()

    def g_modules(self) -> list[nn.Module]:
        if self.variant == "meft1":
            return [self.rev_adapter]
        if self.variant == "meft2":
            return self.full_modules()
        return self.mlp_modules()

    def _trainable(self, modules: list[nn.Module]) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for m in modules:
            for p in m.parameters():
                if p.requires_grad:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def f_params(self) -> list[nn.Parameter]:
        return self._trainable(self.f_modules())

    def g_params(self) -> list[nn.Parameter]:
        return self._trainable(self.g_modules())

    def random(self) -> bool:
        """Whether F/G draw random numbers now (train mode and some dropout): then RNG is replayed."""
        return self.training and _has_randomness(self)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, ctx: Any = None,
                rng: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x1, x2) -> next layer's (x1, x2); with ``rng`` given, the RNG states before F and G are appended."""
        capture = rng is not None and self.random()
        s_f = _capture_rng(x2.device) if capture else None
        y1 = self.lam * x1 + self.F(x2, ctx)
        s_g = _capture_rng(x2.device) if capture else None
        y2 = self.beta * x2 + self.G(y1, ctx)
        if rng is not None:
            rng.append((s_f, s_g))
        return (y2, y1) if self.swap else (y1, y2)

    @torch.no_grad()
    def inverse(self, o1: torch.Tensor, o2: torch.Tensor, ctx: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct this layer's inputs from its outputs (eval mode: no dropout)."""
        y1, y2 = (o2, o1) if self.swap else (o1, o2)
        x2 = (y2 - self.G(y1, ctx)) / self.beta
        x1 = (y1 - self.F(x2, ctx)) / self.lam
        return x1, x2

    def backward_step(self, o1: torch.Tensor, o2: torch.Tensor, do1: torch.Tensor, do2: torch.Tensor, ctx: Any,
                      rng: tuple[RngState | None, RngState | None],
                      grads: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct the inputs, recompute F and G under grad, return (x1, x2, dx1, dx2).

        Parameter gradients are added into ``grads`` (keyed by id); the caller returns them from the
        autograd Function so that autograd (and DDP's hooks) accumulate them.
        """
        y1, y2, dy1, dy2 = (o2, o1, do2, do1) if self.swap else (o1, o2, do1, do2)
        device = y1.device
        g_params = self.g_params()
        with torch.enable_grad():
            y1_ = y1.detach().requires_grad_(True)
            with _replay_rng(rng[1], device):
                g = self.G(y1_, ctx)
            g_grads = torch.autograd.grad(g, [y1_, *g_params], dy2, allow_unused=True)
        with torch.no_grad():
            x2 = (y2 - g.detach()) / self.beta
            del g
            dy1 = dy1 + g_grads[0] if g_grads[0] is not None else dy1
        _accumulate(grads, g_params, g_grads[1:])
        f_params = self.f_params()
        with torch.enable_grad():
            x2_ = x2.detach().requires_grad_(True)
            with _replay_rng(rng[0], device):
                f = self.F(x2_, ctx)
            f_grads = torch.autograd.grad(f, [x2_, *f_params], dy1, allow_unused=True)
        with torch.no_grad():
            x1 = (y1 - f.detach()) / self.lam
            del f
            dx1 = dy1 * self.lam
            dx2 = dy2 * self.beta
            if f_grads[0] is not None:
                dx2 = dx2 + f_grads[0]
        _accumulate(grads, f_params, f_grads[1:])
        return x1, x2.detach(), dx1, dx2


def _accumulate(grads: dict[int, torch.Tensor], params: Sequence[nn.Parameter],
                new: Sequence[torch.Tensor | None]) -> None:
    for p, g in zip(params, new):
        if g is None:
            continue
        key = id(p)
        grads[key] = g if key not in grads else grads[key] + g


@dataclass
class _StackCall:
    """Non-tensor arguments of one reversible forward (kept on the autograd ctx, not saved)."""

    layers: list[MeftLayer]
    ctx: Any
    params: list[nn.Parameter]
    track: bool
    stack: "MeftStack"
    guard: bool = False  # this backward checks the error against the stack's tolerance (and falls back)


class _ReversibleFunction(torch.autograd.Function):
    """Runs the reversible layers without a graph; backward reconstructs inputs layer by layer."""

    @staticmethod
    def forward(fctx, x1: torch.Tensor, x2: torch.Tensor, call: _StackCall, *params: torch.Tensor):  # type: ignore[override]
        rng: list = []
        y1, y2 = x1, x2
        dev = x1.device.type
        # backward must recompute F and G under the same autocast state (as torch.utils.checkpoint does)
        fctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        with torch.no_grad():
            for layer in call.layers:
                y1, y2 = layer(y1, y2, call.ctx, rng)
        fctx.call = call
        fctx.rng = rng
        if call.track:  # keep the true inputs (counted honestly: saved through save_for_backward)
            fctx.save_for_backward(y1, y2, x1, x2)
        else:
            fctx.save_for_backward(y1, y2)
        return y1, y2

    @staticmethod
    def backward(fctx, dy1: torch.Tensor | None, dy2: torch.Tensor | None):  # type: ignore[override]
        call: _StackCall = fctx.call
        saved = fctx.saved_tensors
        y1, y2 = saved[0], saved[1]
        dy1 = torch.zeros_like(y1) if dy1 is None else dy1
        dy2 = torch.zeros_like(y2) if dy2 is None else dy2
        grads: dict[int, torch.Tensor] = {}
        dev, enabled, dtype = fctx.autocast
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            for layer, rng in zip(reversed(call.layers), reversed(fctx.rng)):
                y1, y2, dy1, dy2 = layer.backward_step(y1, y2, dy1, dy2, call.ctx, rng, grads)
        if call.track:
            err = _relative_error((y1, y2), (saved[2], saved[3]))
            call.stack.last_reconstruction_error = err
            if call.guard:
                call.stack.fall_back(err)
        param_grads = tuple(grads.get(id(p)) for p in call.params)
        return (dy1, dy2, None, *param_grads)


def _relative_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """max |got - want| / max |want| over both streams (a scale-free number to log)."""
    err = max(float((a.double() - b.double()).abs().max()) for a, b in zip(got, want))
    ref = max(float(b.double().abs().max()) for b in want)
    return err / max(ref, torch.finfo(torch.float64).tiny)


class MeftStack(nn.Module):
    """The converted layers: bottom ones run ordinary autograd, the top ``n_reversible`` are reversible."""

    def __init__(self, layers: Sequence[MeftLayer], n_reversible: int, track_error: bool = False,
                 tolerance: float | None = None, guard_every: int = 0) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): layer for i, layer in enumerate(layers)})
        self.n_reversible = n_reversible
        self.track_error = track_error
        self.last_reconstruction_error: float | None = None
        # the guard (safe default only): every guard_every-th backward measures the error; above tolerance
        # the lowest reversible layer goes back to ordinary autograd for the following steps
        self.tolerance, self.guard_every = tolerance, guard_every
        self.fallbacks: list[dict[str, Any]] = []
        self._backward_calls = 0

    def fall_back(self, err: float) -> None:
        """Called by a guarded backward: one layer fewer is reversible while ``err`` exceeds the tolerance."""
        if self.tolerance is not None and err > self.tolerance and self.n_reversible > 0:
            self.n_reversible -= 1
            self.fallbacks.append({"call": self._backward_calls, "error": err, "n_reversible": self.n_reversible})

    def _split(self) -> tuple[list[MeftLayer], list[MeftLayer]]:
        layers = list(self.layers.values())
        cut = len(layers) - self.n_reversible
        return layers[:cut], layers[cut:]

    def forward(self, h: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        x1, x2 = self.streams(h, ctx)
        return (x1 + x2) / 2  # the paper's output merge

    def streams(self, h: torch.Tensor, ctx: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        ordinary, reversible = self._split()
        x1, x2 = h, h
        for layer in ordinary:
            x1, x2 = layer(x1, x2, ctx)
        if not reversible:
            return x1, x2
        params = [p for layer in reversible for p in _unique(layer.f_params() + layer.g_params())]
        needs_grad = torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad or bool(params))
        if not needs_grad:
            for layer in reversible:
                x1, x2 = layer(x1, x2, ctx)
            return x1, x2
        guard = bool(self.guard_every) and self.tolerance is not None and self._backward_calls % self.guard_every == 0
        self._backward_calls += 1
        call = _StackCall(reversible, ctx, params, self.track_error or guard, self, guard)
        return _ReversibleFunction.apply(x1, x2, call, *params)

    @torch.no_grad()
    def reconstruction_error(self, h: torch.Tensor, ctx: Any = None) -> dict[str, Any]:
        """Run forward keeping every reversible layer's true input, invert from the top, compare.

        Returns the relative error of the reconstructed stack input (``input``) and per layer, as
        max|x̂ - x| / max|x| with inversion compounding from the top (what backward actually sees).
        """
        was_training = self.training
        self.eval()
        try:
            ordinary, reversible = self._split()
            x1, x2 = h, h
            for layer in ordinary:
                x1, x2 = layer(x1, x2, ctx)
            inputs = []
            for layer in reversible:
                inputs.append((x1, x2))
                x1, x2 = layer(x1, x2, ctx)
            per_layer: list[float] = [0.0] * len(reversible)
            for i in range(len(reversible) - 1, -1, -1):
                x1, x2 = reversible[i].inverse(x1, x2, ctx)
                per_layer[i] = _relative_error((x1, x2), inputs[i])
        finally:
            self.train(was_training)
        return {"input": per_layer[0] if per_layer else 0.0, "per_layer": per_layer,
                "n_reversible": len(reversible), "dtype": str(h.dtype).replace("torch.", "")}


def _unique(params: list[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# ---- our Decoder (Llama / GPT-2 pre-norm blocks) -----------------------------------------------
class DecoderMeftLayer(MeftLayer):
    """Two-stream wrapper around a pre-norm ``Block``; the block itself is reused unchanged."""

    def __init__(self, block: nn.Module, cfg: MeftConfig) -> None:
        super().__init__()
        self.block = block
        self.variant = cfg.variant
        self.lam, self.beta, self.swap = cfg.lam, cfg.beta, cfg.swap
        wq = block.attention.wq
        d, kw = wq.in_features, {"device": wq.weight.device, "dtype": wq.weight.dtype}
        mk = lambda norm=False: Adapter(d, cfg.adapter_dim, cfg.adapter_dropout, cfg.adapter_init_std, norm, **kw)  # noqa: E731
        self.ffn_adapter = mk()
        self.attn_adapter = mk() if cfg.variant == "meft3" else None
        # the stand-alone adapter sees the raw residual stream, so it gets its own norm (paper option)
        self.rev_adapter = mk(norm=True) if cfg.variant in ("meft1", "meft2") else None

    def attn_block(self, x: torch.Tensor, rope: Any) -> torch.Tensor:
        b = self.block
        a = b.attention(b.attention_norm(x), rope)
        if self.attn_adapter is not None:
            a = a + self.attn_adapter(a)
        return x + b.resid_dropout(a)

    def mlp_block(self, h: torch.Tensor) -> torch.Tensor:
        b = self.block
        n = b.ffn_norm(h)
        return h + b.resid_dropout(b.feed_forward(n)) + self.ffn_adapter(n)

    def full(self, x: torch.Tensor, rope: Any) -> torch.Tensor:
        return self.mlp_block(self.attn_block(x, rope))

    def full_modules(self) -> list[nn.Module]:
        return [self.block, self.ffn_adapter]

    def attn_modules(self) -> list[nn.Module]:
        return [self.block.attention_norm, self.block.attention, self.attn_adapter]

    def mlp_modules(self) -> list[nn.Module]:
        return [self.block.ffn_norm, self.block.feed_forward, self.ffn_adapter]


class MeftDecoder(nn.Module):
    """A meshwright ``Decoder`` in MEFT form: embeddings -> two-stream stack -> mean -> norm -> head."""

    def __init__(self, base: nn.Module, cfg: MeftConfig, n_reversible: int) -> None:
        super().__init__()
        self.cfg = base.cfg
        self.meft = cfg
        self.tok_embeddings = base.tok_embeddings
        self.pos_embeddings = base.pos_embeddings
        self.embed_dropout = base.embed_dropout
        self.stack = MeftStack([DecoderMeftLayer(b, cfg) for b in base.layers.values()], n_reversible, cfg.track_error)
        self.norm = base.norm
        self.output = base.output
        if base.rope_cos is not None:
            for name in ("rope_cos", "rope_sin", "rope_cos_long", "rope_sin_long"):  # *_long: longrope (Phi-3)
                if getattr(base, name, None) is not None:
                    self.register_buffer(name, getattr(base, name), persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        if self.pos_embeddings is not None:
            h = h + self.pos_embeddings(torch.arange(tokens.shape[1], device=tokens.device))
        return self.embed_dropout(h)

    def rope(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return rope_slice(self, self.cfg, seq_len)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        if h.shape[1] > self.cfg.max_seq_len:
            raise invalid("seq_len", h.shape[1], f"at most model.max_seq_len={self.cfg.max_seq_len}")
        h = self.stack(h, self.rope(h.shape[1]))
        return self.output(self.norm(h))

    @torch.no_grad()
    def reconstruction_error(self, tokens: torch.Tensor) -> dict[str, Any]:
        h = self.embed(tokens)
        return self.stack.reconstruction_error(h, self.rope(h.shape[1]))

    # ---- accounting, as the plain Decoder offers it (MFU code never guesses) ----------------------
    def adapter_params(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if "adapter." in n)

    def num_params(self, non_embedding: bool = False) -> int:
        return self.cfg.num_params(non_embedding=non_embedding) + self.adapter_params()

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Model FLOPs of the base network plus the adapters' matmuls (6 per weight: fwd + bwd).

        Hardware FLOPs are higher: reversible layers re-run their forward in backward (+1/3 per layer).
        """
        return self.cfg.flops_per_token(seq_len) + 6.0 * self.adapter_params()

    def aux_loss(self) -> torch.Tensor | None:
        return None


# ---- entry points ---------------------------------------------------------------------------------
def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_reversible_layers(cfg: MeftConfig, n_layers: int, dtype: torch.dtype) -> int:
    """``cfg.reversible_layers`` if given, else the safe default for the compute dtype and ``cfg.scale``
    (``cfg.compute_dtype`` when training under autocast, else the parameters' ``dtype``)."""
    if cfg.reversible_layers is not None:
        return cfg.reversible_layers
    if cfg.compute_dtype is not None:
        dtype = _DTYPES[cfg.compute_dtype]
    return safe_reversible_layers(n_layers, dtype, cfg.lam, cfg.beta)


@torch.no_grad()
def calibrate_reversible_layers(model: nn.Module, *probe: Any, tolerance: float = DEFAULT_TOLERANCE,
                                upper: int | None = None) -> dict[str, Any]:
    """Measure the reconstruction error with every layer reversible on ``probe`` inputs (token ids), set the
    stack to the most top layers that stay within ``tolerance`` (at most ``upper``) and return the evidence."""
    stack = model.stack
    keep = stack.n_reversible
    stack.n_reversible = len(stack.layers)
    try:
        measured = model.reconstruction_error(*probe)
    finally:
        stack.n_reversible = keep
    n = layers_within_tolerance(measured["per_layer"], tolerance)
    if upper is not None:
        n = min(n, upper)
    stack.n_reversible = n
    return {"n_reversible": n, "per_layer": measured["per_layer"], "tolerance": tolerance}


def _probe_tokens(vocab_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (2, seq_len), generator=g).to(device)


def apply_safe_default(model: nn.Module, cfg: MeftConfig, n_layers: int, dtype: torch.dtype, vocab_size: int,
                       seq_len: int) -> None:
    """The safe default (``reversible_layers: null``): measured at conversion on random tokens, capped by the
    dtype's analytic bound, then guarded during training (``guard_every``)."""
    upper = resolve_reversible_layers(cfg, n_layers, dtype)
    device = next(model.parameters()).device
    if device.type == "meta":
        model.stack.n_reversible = upper
    else:
        model.calibration = calibrate_reversible_layers(model, _probe_tokens(vocab_size, seq_len, device),
                                                        tolerance=cfg.tolerance * CALIBRATION_MARGIN, upper=upper)
    model.stack.tolerance, model.stack.guard_every = cfg.tolerance, cfg.guard_every


def _freeze(model: nn.Module, head: Sequence[nn.Module | None], cfg: MeftConfig) -> None:
    """Freeze everything but adapters (and the head when ``train_head``)."""
    if not cfg.freeze_base:
        return
    for name, p in model.named_parameters():
        p.requires_grad_(any(part in name for part in ("ffn_adapter.", "attn_adapter.", "rev_adapter.")))
    if cfg.train_head:
        for m in head:
            if m is not None:
                for p in m.parameters():
                    p.requires_grad_(True)


def make_reversible(model: nn.Module, variant: str = "meft1", scale: float = PAPER_SCALE, adapter_dim: int = 16,
                    reversible_layers: int | None = None, config: MeftConfig | None = None, **kwargs: Any) -> nn.Module:
    """Convert ``model`` (a meshwright ``Decoder`` or a transformers ``BertModel``) into its MEFT form.

    Returns a new module that *shares* the original's submodules (no weight copy): the base weights are
    frozen (``freeze_base``), adapters (and the head, ``train_head``) train. ``reversible_layers``
    counts from the top; None picks ``safe_reversible_layers`` for the model's dtype.
    Extra keyword arguments are MeftConfig fields (adapter_dropout, track_error, ...).
    """
    cfg = config or MeftConfig(variant=variant, scale=scale, adapter_dim=adapter_dim,  # type: ignore[arg-type]
                               reversible_layers=reversible_layers, **kwargs)
    if isinstance(model, Decoder):
        n_layers = len(model.layers)
        cfg.validate(n_layers=n_layers)
        if model.cfg.n_experts > 0:
            raise invalid("model.n_experts", model.cfg.n_experts, "0 (MEFT supports dense blocks only)")
        model.cfg.refuse_gemma("MEFT (its reversible blocks and embedding are Llama's)")
        if model.tok_embeddings is None or model.output is None or model.norm is None:
            raise invalid("model", "pipeline stage", "a whole Decoder with embeddings, norm and head")
        n_rev = resolve_reversible_layers(cfg, n_layers, _model_dtype(model))
        out = MeftDecoder(model, cfg, n_rev)
        if cfg.reversible_layers is None:
            apply_safe_default(out, cfg, n_layers, _model_dtype(model), model.cfg.vocab_size,
                               min(64, model.cfg.max_seq_len))
        _freeze(out, [out.output, out.norm], cfg)
        return out
    if hasattr(model, "encoder") and hasattr(model, "embeddings") and hasattr(getattr(model, "encoder"), "layer"):
        cfg.validate(n_layers=getattr(getattr(model, "config", None), "num_hidden_layers", None))
        from meshwright.memory.meft_hf import make_reversible_bert

        return make_reversible_bert(model, cfg)
    raise invalid("model", type(model).__name__, "a meshwright Decoder or a transformers BertModel")


def _stacks(model: nn.Module) -> list[MeftStack]:
    return [m for m in model.modules() if isinstance(m, MeftStack)]


def reconstruction_error(model: nn.Module, *inputs: Any, **kwargs: Any) -> dict[str, Any]:
    """Relative error of the inputs reconstructed by inverting the reversible layers (eval mode)."""
    if not hasattr(model, "reconstruction_error"):
        raise invalid("model", type(model).__name__, "a model returned by make_reversible")
    return model.reconstruction_error(*inputs, **kwargs)


def last_reconstruction_error(model: nn.Module) -> float | None:
    """The error measured in the latest backward (needs ``track_error=True``); None if not tracked."""
    values = [s.last_reconstruction_error for s in _stacks(model) if s.last_reconstruction_error is not None]
    return max(values) if values else None


def log_fields(model: nn.Module) -> dict[str, float]:
    """Fields the trainer adds to its JSONL step record (empty when nothing was measured)."""
    err = last_reconstruction_error(model)
    out: dict[str, float] = {} if err is None else {"meft_reconstruction_error": err}
    stacks = _stacks(model)
    if stacks and any(s.fallbacks for s in stacks):
        out["meft_reversible_layers"] = float(min(s.n_reversible for s in stacks))
    return out


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def two_stream_reference(stack: MeftStack, h: torch.Tensor, ctx: Any = None) -> torch.Tensor:
    """The same two-stream network run with plain autograd (every activation kept) — the test oracle
    and the 'adapters without reversibility' baseline."""
    x1, x2 = h, h
    for layer in stack.layers.values():
        x1, x2 = layer(x1, x2, ctx)
    return (x1 + x2) / 2


__all__: list[str] = [
    "Adapter", "MeftConfig", "MeftDecoder", "MeftLayer", "MeftStack", "make_reversible", "reconstruction_error",
    "last_reconstruction_error", "log_fields", "safe_reversible_layers", "calibrate_reversible_layers",
    "layers_within_tolerance", "two_stream_reference", "VARIANTS",
]
