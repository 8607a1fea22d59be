"""Plain single-device models; parallelism and memory savers are applied to them afterwards."""

from __future__ import annotations

import torch

from meshwright.config import ModelConfig, load_model_config
from meshwright.models.decoder import Block, Decoder, count_parameters, lm_loss
from meshwright.models.hf_weights import from_pretrained, load_pretrained_into


def build_model(cfg: ModelConfig | str | dict, device: str | torch.device | None = None, seed: int | None = None) -> Decoder:
    """Build the decoder for ``cfg``. On ``device='meta'`` nothing is allocated (for counting/planning)."""
    cfg = load_model_config(cfg)
    if seed is not None:
        torch.manual_seed(seed)
    if device is None:
        return Decoder(cfg)
    with torch.device(device):
        return Decoder(cfg)


__all__ = ["Block", "Decoder", "build_model", "count_parameters", "from_pretrained", "lm_loss", "load_pretrained_into",
           "ModelConfig"]
