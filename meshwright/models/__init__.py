"""Plain single-device models; parallelism and memory savers are applied to them afterwards.

The torch-backed names (``Decoder``, ``lm_loss``, ...) load on first use (PEP 562 ``__getattr__``), so torch-free
submodules such as :mod:`meshwright.models.capped_flex_rule` (the planner reads it) do not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshwright.lazy import lazy_names

from meshwright.config import ModelConfig, load_model_config
from meshwright.errors import invalid

if TYPE_CHECKING:
    import torch

    from meshwright.models.decoder import Block, Decoder, count_parameters, lm_loss  # noqa: F401
    from meshwright.models.hf_weights import from_pretrained, load_pretrained_into  # noqa: F401
    from meshwright.models.init import keyed_model  # noqa: F401

_LAZY = {"Block": "decoder", "Decoder": "decoder", "count_parameters": "decoder", "lm_loss": "decoder",
         "keyed_model": "init", "from_pretrained": "hf_weights", "load_pretrained_into": "hf_weights"}

__getattr__ = lazy_names(__name__, _LAZY, globals())


def build_model(cfg: ModelConfig | str | dict, device: str | torch.device | None = None, seed: int | None = None,
                init: str = "stream") -> Decoder:
    """Build the decoder for ``cfg``. On ``device='meta'`` nothing is allocated (for counting/planning).

    ``init``: ``stream`` draws every value from the global CPU RNG in module order (the values every earlier run
    started from); ``keyed`` builds on meta and draws each parameter on ``device`` from generators keyed by
    (seed, name, tile) (models/init.py): the values a sharded run draws shard by shard."""
    import torch

    from meshwright.models.decoder import Decoder
    from meshwright.models.init import keyed_model

    cfg = load_model_config(cfg)
    if init not in ("stream", "keyed"):
        raise invalid("init", init, "stream or keyed")
    if seed is not None:
        torch.manual_seed(seed)
    if init == "keyed":
        if seed is None:
            raise invalid("seed", seed, "an integer with init=keyed (the keys need it)")
        with torch.device("meta"):
            model = Decoder(cfg)
        target = torch.device(device) if device is not None else torch.device("cpu")
        if target.type == "meta":
            return model
        model.to_empty(device=target)
        if cfg.tie_embeddings:  # to_empty gives each module its own tensor: tie again
            model.output.weight = model.tok_embeddings.weight
        keyed_model(model, model.init_specs(), seed)
        model.reset_rope()
        return model
    if device is None:
        return Decoder(cfg)
    with torch.device(device):
        return Decoder(cfg)


__all__ = ["Block", "Decoder", "build_model", "count_parameters", "from_pretrained", "lm_loss", "load_pretrained_into",
           "ModelConfig"]
