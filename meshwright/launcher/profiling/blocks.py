"""The blocks the profilers time: one transformer block with the parameter shapes of one tp rank, and its
rotary tables (shared by the model profiler and the runtime-overhead profiler)."""

from __future__ import annotations

import torch
from torch import nn

from meshwright.config import ModelConfig
from meshwright.errors import invalid
from meshwright.models.decoder import Block
from meshwright.models.layers import rope_tables
from meshwright.models.moe import GroupedExperts


def shard_block(cfg: ModelConfig, index: int, tp: int) -> nn.Module:
    """Block ``index`` with the parameter shapes of one tp rank (Megatron column/row split)."""
    if cfg.n_heads % tp or cfg.kv_heads % tp or cfg.ffn_dim % tp:
        raise invalid("tp", tp, f"a divisor of n_heads={cfg.n_heads}, n_kv_heads={cfg.kv_heads} and ffn={cfg.ffn_dim}")
    block = Block(cfg, index)
    if tp == 1:
        return block
    d, hd = cfg.d_model, cfg.head_dim
    bias = cfg.arch == "gpt2"
    att = block.attention
    att.wq = nn.Linear(d, cfg.n_heads // tp * hd, bias=bias)
    att.wk = nn.Linear(d, cfg.kv_heads // tp * hd, bias=bias)
    att.wv = nn.Linear(d, cfg.kv_heads // tp * hd, bias=bias)
    att.wo = nn.Linear(cfg.n_heads // tp * hd, d, bias=bias)
    ff = block.feed_forward
    if hasattr(ff, "w3") and isinstance(ff.w3, nn.Linear):
        ff.w1 = nn.Linear(d, cfg.ffn_dim // tp, bias=False)
        ff.w3 = nn.Linear(d, cfg.ffn_dim // tp, bias=False)
        ff.w2 = nn.Linear(cfg.ffn_dim // tp, d, bias=False)
    elif hasattr(ff, "w1") and isinstance(ff.w1, nn.Linear):
        ff.w1 = nn.Linear(d, cfg.ffn_dim // tp)
        ff.w2 = nn.Linear(cfg.ffn_dim // tp, d)
    elif isinstance(getattr(ff, "experts", None), GroupedExperts):  # expert tp (parallel/expert_tp.py): hidden / tp
        if cfg.expert_ffn_dim % tp:
            raise invalid("tp", tp, f"a divisor of the experts' hidden size moe_ffn_hidden={cfg.expert_ffn_dim}")
        e = ff.experts
        ff.experts = GroupedExperts(e.n_experts, d, e.hidden // tp, e.std, e.out_std)
    return block


def rope_for(cfg: ModelConfig, seq: int, device: torch.device):
    if cfg.arch != "llama":
        return None
    return rope_tables(cfg.rope_dim, seq, cfg.rope_theta, device=device)
