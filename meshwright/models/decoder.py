"""Plain single-device decoder-only transformers (Llama-style and GPT-2-style).

The block structure is what the rest of meshwright relies on:
``tok_embeddings`` (+ ``pos_embeddings``) -> ``layers["0"] ... layers[str(L-1)]`` -> ``norm`` -> ``output``.
Any of the outer modules may be set to ``None`` and layers deleted from the ModuleDict, which is how
pipeline stages are cut (torchtitan's convention): parameter names stay the same on every stage, so
distributed checkpoints reshard between layouts.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from meshwright.config import ModelConfig
from meshwright.models.init import ParamInit
from meshwright.models.layers import (Attention, GeluMLP, LocalRope, RMSNorm, SoftcapLinear, SwiGLU, init_linear,
                                      is_longrope, residual_std, rope_tables)
from meshwright.models.moe import GroupedExperts, MoE


def register_rope(module: nn.Module, cfg: ModelConfig, device: torch.device | None = None) -> None:
    """The RoPE tables as non-persistent buffers ``rope_cos``/``rope_sin``; with longrope (Phi-3) also the long
    factors' ``rope_cos_long``/``rope_sin_long``, which ``rope_slice`` picks for sequences longer than the scaling's
    ``original_max_position_embeddings`` (transformers picks by the batch's length the same way)."""
    cos, sin = rope_tables(cfg.rope_dim, cfg.max_seq_len, cfg.rope_theta, device=device, scaling=cfg.rope_scaling)
    module.register_buffer("rope_cos", cos, persistent=False)
    module.register_buffer("rope_sin", sin, persistent=False)
    if cfg.rope_local_theta is not None:  # Gemma 3: the windowed blocks' tables, unscaled
        cos, sin = rope_tables(cfg.rope_dim, cfg.max_seq_len, cfg.rope_local_theta, device=device)
        module.register_buffer("rope_cos_local", cos, persistent=False)
        module.register_buffer("rope_sin_local", sin, persistent=False)
    if is_longrope(cfg.rope_scaling):
        cos, sin = rope_tables(cfg.rope_dim, cfg.max_seq_len, cfg.rope_theta, device=device, scaling=cfg.rope_scaling,
                               long=True)
        module.register_buffer("rope_cos_long", cos, persistent=False)
        module.register_buffer("rope_sin_long", sin, persistent=False)


@torch.no_grad()
def fill_rope(module: nn.Module, cfg: ModelConfig) -> None:
    """Recompute ``register_rope``'s tables in place (garbage after ``to_empty``; never drawn, never loaded)."""
    for suffix, long in (("", False), ("_long", True)):
        cos_buf = getattr(module, f"rope_cos{suffix}", None)
        if isinstance(cos_buf, torch.Tensor) and cos_buf.device.type != "meta":
            cos, sin = rope_tables(cfg.rope_dim, cfg.max_seq_len, cfg.rope_theta, device=cos_buf.device,
                                   scaling=cfg.rope_scaling, long=long)
            cos_buf.copy_(cos)
            getattr(module, f"rope_sin{suffix}").copy_(sin)
    cos_buf = getattr(module, "rope_cos_local", None)
    if isinstance(cos_buf, torch.Tensor) and cos_buf.device.type != "meta":
        cos, sin = rope_tables(cfg.rope_dim, cfg.max_seq_len, cfg.rope_local_theta, device=cos_buf.device)
        cos_buf.copy_(cos)
        module.rope_sin_local.copy_(sin)


def rope_slice(module: nn.Module, cfg: ModelConfig, seq_len: int) -> tuple[torch.Tensor, torch.Tensor] | LocalRope | None:
    """The tables for a sequence of ``seq_len`` tokens (longrope: the long factors' past its original length; Gemma 3:
    the full-attention and the windowed blocks' tables, a ``LocalRope``)."""
    if module.rope_cos is None:
        return None
    if getattr(module, "rope_cos_local", None) is not None:
        return LocalRope((module.rope_cos[:seq_len], module.rope_sin[:seq_len]),
                         (module.rope_cos_local[:seq_len], module.rope_sin_local[:seq_len]))
    long = getattr(module, "rope_cos_long", None) is not None
    if long and seq_len > cfg.rope_scaling["original_max_position_embeddings"]:
        return module.rope_cos_long[:seq_len], module.rope_sin_long[:seq_len]
    return module.rope_cos[:seq_len], module.rope_sin[:seq_len]


class Block(nn.Module):
    """Pre-norm transformer block: h + attn(norm(h)), then h + mlp(norm(h)); with ``post_norms`` (Gemma 2/3) the
    attention's and the MLP's outputs are normed again before each residual add (``attention_post_norm``,
    ``ffn_post_norm``; absent otherwise, so other models keep their names)."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.arch = cfg.arch
        gpt2 = cfg.arch == "gpt2"
        norm = (lambda: nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)) if gpt2 else (
            lambda: RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset))
        self.attention_norm = norm()
        self.attention = Attention(cfg, bias=gpt2, use_rope=not gpt2, layer_id=layer_id)
        self.attention_post_norm = norm() if cfg.post_norms else None
        self.ffn_norm = norm()
        if cfg.is_moe_layer(layer_id):
            self.feed_forward: nn.Module = MoE(cfg)
        elif gpt2:
            self.feed_forward = GeluMLP(cfg.d_model, cfg.ffn_dim)
        else:
            self.feed_forward = SwiGLU(cfg.d_model, cfg.ffn_dim, cfg.mlp_act)
        self.ffn_post_norm = norm() if cfg.post_norms else None
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | LocalRope | None = None) -> torch.Tensor:
        a = self.attention(self.attention_norm(h), rope)
        if self.attention_post_norm is not None:
            a = self.attention_post_norm(a)
        h = h + self.resid_dropout(a)
        m = self.feed_forward(self.ffn_norm(h))
        if self.ffn_post_norm is not None:
            m = self.ffn_post_norm(m)
        return h + self.resid_dropout(m)


class Decoder(nn.Module):
    """A decoder-only language model built from a ModelConfig (arch 'llama' or 'gpt2')."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings: nn.Embedding | None = (
            nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.arch == "gpt2" else None
        )
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm: nn.Module | None = (nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.arch == "gpt2"
                                       else RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_unit_offset))
        self.output: nn.Linear | None = (nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) if cfg.final_softcap is None
                                         else SoftcapLinear(cfg.d_model, cfg.vocab_size, cfg.final_softcap))
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if cfg.arch == "llama":
            register_rope(self, cfg)
        else:
            self.rope_cos = self.rope_sin = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; also used after building on the meta device."""
        for path, init in self.init_steps():
            init(self.get_submodule(path))
        self.reset_rope()

    @torch.no_grad()
    def reset_rope(self) -> None:
        """Recompute the RoPE tables (non-persistent buffers: computed, never drawn; garbage after ``to_empty``)."""
        if self.cfg.arch == "llama":
            fill_rope(self, self.cfg)

    def init_steps(self) -> list[tuple[str, Callable[[nn.Module], None]]]:
        """(module path, initialiser) in the order ``init_weights`` runs them, i.e. the order of RNG draws:
        meta-device initialisation (parallel/meta_init.py) replays them module by module."""
        cfg = self.cfg
        steps: list[tuple[str, Callable[[nn.Module], None]]] = []
        if self.tok_embeddings is not None:
            steps.append(("tok_embeddings", functools.partial(_normal_weight, std=cfg.init_std)))
        if self.pos_embeddings is not None:
            steps.append(("pos_embeddings", functools.partial(_normal_weight, std=cfg.init_std / 2)))
        for key, block in self.layers.items():
            for name, module in block.named_modules():
                path = f"layers.{key}.{name}" if name else f"layers.{key}"
                if isinstance(module, nn.Linear):
                    out_proj = name.endswith(("wo", "w2"))
                    steps.append((path, functools.partial(init_linear, std=residual_std(cfg) if out_proj else cfg.init_std)))
                elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                    steps.append((path, _reset))
                elif hasattr(module, "init_weights") and module is not block:
                    steps.append((path, _init_weights))
        if self.norm is not None:
            steps.append(("norm", _reset))
        if self.output is not None and not cfg.tie_embeddings:
            steps.append(("output", functools.partial(_normal_weight, std=cfg.init_std)))
        return steps

    def init_specs(self) -> dict[str, ParamInit]:
        """{parameter name: how it starts} with the distributions ``init_steps`` gives (the last step that touches a
        parameter wins, as in the stream), for the ``keyed`` scheme (models/init.py). Tied names share a key."""
        cfg = self.cfg
        specs: dict[str, ParamInit] = {}

        def normal(name: str, std: float) -> None:
            specs[name] = ParamInit("normal", name, std)

        if self.tok_embeddings is not None:
            normal("tok_embeddings.weight", cfg.init_std)
        if self.pos_embeddings is not None:
            normal("pos_embeddings.weight", cfg.init_std / 2)
        for key, block in self.layers.items():
            for name, module in block.named_modules():
                path = f"layers.{key}.{name}" if name else f"layers.{key}"
                if isinstance(module, nn.Linear):
                    normal(f"{path}.weight", residual_std(cfg) if name.endswith(("wo", "w2")) else cfg.init_std)
                elif isinstance(module, GroupedExperts):
                    normal(f"{path}.w1", module.std)
                    normal(f"{path}.w3", module.std)
                    normal(f"{path}.w2", module.out_std)
                elif not isinstance(module, (nn.LayerNorm, RMSNorm)):
                    continue
                if isinstance(module, (nn.LayerNorm, RMSNorm)):
                    specs[f"{path}.weight"] = ParamInit(_norm_start(module), f"{path}.weight")
                if getattr(module, "bias", None) is not None:
                    specs[f"{path}.bias"] = ParamInit("zeros", f"{path}.bias")
        if self.norm is not None:
            specs["norm.weight"] = ParamInit(_norm_start(self.norm), "norm.weight")
            if getattr(self.norm, "bias", None) is not None:
                specs["norm.bias"] = ParamInit("zeros", "norm.bias")
        if self.output is not None:
            if cfg.tie_embeddings:
                specs["output.weight"] = ParamInit("normal", "tok_embeddings.weight", cfg.init_std)
            else:
                normal("output.weight", cfg.init_std)
        return specs

    def rope(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return rope_slice(self, self.cfg, seq_len)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        if self.cfg.scale_embeddings:  # Gemma: sqrt(d_model) rounded to the weights' dtype, as transformers does
            h = h * torch.tensor(self.cfg.d_model ** 0.5, device=h.device).to(self.tok_embeddings.weight.dtype)
        if self.pos_embeddings is not None:
            pos = torch.arange(tokens.shape[1], device=tokens.device)
            h = h + self.pos_embeddings(pos)
        return self.embed_dropout(h)

    def forward(self, x: torch.Tensor, return_hidden: bool = False) -> torch.Tensor:
        """Tokens (batch, seq) -> logits (batch, seq, vocab). A pipeline stage without embeddings takes
        hidden states instead, and a stage without the head returns hidden states; so does ``return_hidden``
        (the chunked loss applies the head itself)."""
        h = self.embed(x) if self.tok_embeddings is not None else x
        seq_len = h.shape[1]
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(f"seq_len={seq_len} is invalid; valid: at most model.max_seq_len={self.cfg.max_seq_len}")
        rope = self.rope(seq_len)
        for layer in self.layers.values():
            h = layer(h, rope)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None and not return_hidden:
            h = self.output(h)
        return h

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of auxiliary losses (MoE load balancing, z-loss) from the last forward, or None."""
        losses = [m.last_aux_loss for m in self.modules() if getattr(m, "last_aux_loss", None) is not None]
        return torch.stack(losses).sum() if losses else None

    # ---- accounting: the model owns its size and FLOPs; MFU code never guesses -------------------
    def num_params(self, non_embedding: bool = False) -> int:
        return self.cfg.num_params(non_embedding=non_embedding)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.cfg.flops_per_token(seq_len)


def _norm_start(module: nn.Module) -> str:
    """What a norm's weight starts at: 0 where it scales by (1 + weight) (Gemma), else 1."""
    return "zeros" if getattr(module, "unit_offset", False) else "ones"


def _normal_weight(module: nn.Module, std: float) -> None:
    nn.init.normal_(module.weight, std=std)


def _reset(module: nn.Module) -> None:
    module.reset_parameters()


def _init_weights(module: nn.Module) -> None:
    module.init_weights()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross entropy over the positions whose target is not ``ignore_index`` (masked prompt
    tokens of instruction data), computed in fp32; 0 (not NaN) when a micro-batch has no target at all."""
    flat = targets.flatten()
    total = F.cross_entropy(logits.float().flatten(0, 1), flat, ignore_index=ignore_index, reduction="sum")
    return total / (flat != ignore_index).sum().clamp_min(1)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
