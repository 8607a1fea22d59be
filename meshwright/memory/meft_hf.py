"""MEFT for a Hugging Face BERT-family encoder (``transformers.BertModel``; post-LayerNorm blocks).

Kept apart from ``meft.py`` so that ``transformers`` stays an optional extra (``pip install
meshwright[minilm]``). The BertLayer submodules are reused unchanged; F and G are composed from them
exactly as in the paper's RevBertLayer: MEFT1/2 put an adapter beside the FFN (added before the output
LayerNorm) plus a stand-alone adapter; MEFT3 puts an adapter after the attention output projection.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from meshwright.errors import invalid
from meshwright.memory.meft import (Adapter, MeftConfig, MeftLayer, MeftStack, _freeze, _model_dtype,
                                    apply_safe_default, resolve_reversible_layers)


class BertMeftLayer(MeftLayer):
    """Two-stream wrapper around one ``BertLayer`` (self-attention encoder layer, no cross-attention)."""

    def __init__(self, layer: nn.Module, cfg: MeftConfig, hidden_size: int, dropout: float) -> None:
        super().__init__()
        if getattr(layer, "add_cross_attention", False):
            raise invalid("model.config.add_cross_attention", True, "false (MEFT converts encoder layers)")
        self.layer = layer
        self.variant = cfg.variant
        self.lam, self.beta, self.swap = cfg.lam, cfg.beta, cfg.swap
        w = layer.output.dense.weight
        mk = lambda norm=False: Adapter(hidden_size, cfg.adapter_dim, dropout, cfg.adapter_init_std, norm,  # noqa: E731
                                        device=w.device, dtype=w.dtype)
        self.ffn_adapter = mk()
        self.attn_adapter = mk() if cfg.variant == "meft3" else None
        self.rev_adapter = mk() if cfg.variant in ("meft1", "meft2") else None

    def attn_block(self, x: torch.Tensor, mask: Any) -> torch.Tensor:
        att = self.layer.attention
        a = att.self(x, attention_mask=mask)[0]
        out = att.output
        h = out.dropout(out.dense(a))
        if self.attn_adapter is not None:
            h = h + self.attn_adapter(h)
        return out.LayerNorm(h + x)

    def mlp_block(self, h: torch.Tensor) -> torch.Tensor:
        out = self.layer.output
        z = out.dropout(out.dense(self.layer.intermediate(h))) + self.ffn_adapter(h)
        return out.LayerNorm(z + h)

    def full(self, x: torch.Tensor, mask: Any) -> torch.Tensor:
        return self.mlp_block(self.attn_block(x, mask))

    def full_modules(self) -> list[nn.Module]:
        return [self.layer, self.ffn_adapter]

    def attn_modules(self) -> list[nn.Module]:
        return [self.layer.attention, self.attn_adapter]

    def mlp_modules(self) -> list[nn.Module]:
        return [self.layer.intermediate, self.layer.output, self.ffn_adapter]


class MeftBertModel(nn.Module):
    """BertModel in MEFT form; returns ``last_hidden_state`` and ``pooler_output`` like the original."""

    def __init__(self, base: nn.Module, cfg: MeftConfig, n_reversible: int) -> None:
        super().__init__()
        self.config = base.config
        self.meft = cfg
        object.__setattr__(self, "_mask_owner", base)  # not a submodule: only its attention-mask helpers are used
        self.embeddings = base.embeddings
        hc = base.config
        layers = [BertMeftLayer(layer, cfg, hc.hidden_size, hc.hidden_dropout_prob) for layer in base.encoder.layer]
        self.stack = MeftStack(layers, n_reversible, cfg.track_error)
        self.pooler = base.pooler

    def _mask(self, attention_mask: torch.Tensor | None, h: torch.Tensor) -> Any:
        owner = self._mask_owner
        if hasattr(owner, "_create_attention_masks"):  # transformers >= 5
            mask, _ = owner._create_attention_masks(attention_mask=attention_mask, encoder_attention_mask=None,
                                                    embedding_output=h, encoder_hidden_states=None, cache=None)
            return mask
        if attention_mask is None:
            attention_mask = torch.ones(h.shape[:2], device=h.device)
        return owner.get_extended_attention_mask(attention_mask, h.shape[:2])

    def _embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        h = self._embed(input_ids, token_type_ids)
        h = self.stack(h, self._mask(attention_mask, h))
        pooled = self.pooler(h) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=pooled)

    @torch.no_grad()
    def reconstruction_error(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                             token_type_ids: torch.Tensor | None = None) -> dict[str, Any]:
        h = self._embed(input_ids, token_type_ids)
        return self.stack.reconstruction_error(h, self._mask(attention_mask, h))


def make_reversible_bert(model: nn.Module, cfg: MeftConfig) -> MeftBertModel:
    """Convert a transformers ``BertModel`` (e.g. all-MiniLM-L6-v2); the pooler is the trainable head."""
    hc = getattr(model, "config", None)
    if hc is None or getattr(hc, "is_decoder", False):
        raise invalid("model", type(model).__name__, "a BERT-family encoder (config.is_decoder=False)")
    n_layers = len(model.encoder.layer)
    cfg.validate(n_layers=n_layers)
    n_rev = resolve_reversible_layers(cfg, n_layers, _model_dtype(model))
    out = MeftBertModel(model, cfg, n_rev)
    if cfg.reversible_layers is None:
        apply_safe_default(out, cfg, n_layers, _model_dtype(model), hc.vocab_size, min(64, hc.max_position_embeddings))
    _freeze(out, [out.pooler], cfg)
    return out
