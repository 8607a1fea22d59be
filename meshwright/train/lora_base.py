"""Adapter-only LoRA checkpoints: what they hold, and the reference to the frozen base they were trained on.

A LoRA run (``lora:``) trains a few MB of adapters on a base of GB (Llama-3-8B: 16 GB of bf16 for ~40 MB of r16
adapters). With ``lora.checkpoint: adapters`` (the default) a checkpoint holds only the trainable tensors (the
adapters and ``modules_to_save``), their optimizer state and the run state, plus ``lora_base`` in
trainer_state.json: where the base came from and a fingerprint of it. A resume (or ``export``) rebuilds the base
from that source, checks the fingerprint, then loads the adapters over it; another base is refused in one line.

The fingerprint of an ``init_from`` directory is SHA-256 over each safetensors file's name, size and whole header
(every tensor's name, dtype, shape and byte range) and, for each tensor, its first and last 4 KiB of data. Why not
a hash of every byte: that reads the whole base a second time (16 GB: ~20 s of one core at hashlib's ~0.8 GB/s,
longer from a network disk) at every start, resume and export; this reads ~2.4 MB for Llama-3-8B's 291 tensors
and so costs milliseconds. It is content-based (a moved or copied base keeps its fingerprint; mtimes and paths
play no part) and tells bases apart: another checkpoint of the architecture (a fine-tune, another seed, a
resized vocabulary, another dtype) differs in every tensor's leading elements or in the header. What it misses is
a deliberate edit inside one tensor that spares its first and last 4 KiB (docs/finetune.md says so). A base drawn
from ``seed`` (no ``init_from``) is referenced by its recipe: seed, init scheme (and device type, for ``keyed``)
and the fields of the model config that shape the weights; every layout draws the same values from it
(models/init.py, parallel/meta_init.py).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshwright.config import ModelConfig, TrainConfig
from meshwright.config.io import to_dict
from meshwright.errors import ConfigError, invalid
from meshwright.memory.lora import is_adapter_param

BASE_KEY = "lora_base"  # trainer_state.json's field of an adapter-only checkpoint
SAMPLE = 4096  # bytes hashed at each end of every tensor


def _weight_files(root: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model directory (the index's shards, or model.safetensors)."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8")).get("weight_map")
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            weight_map = None
        if not isinstance(weight_map, dict):
            raise invalid("init_from", str(root), f"a Hugging Face model directory whose {index.name} has a weight_map")
        return sorted({root / str(v) for v in weight_map.values()})
    return [root / "model.safetensors"]


def hf_fingerprint(path: str | Path) -> str:
    """The sampled content fingerprint of a Hugging Face model directory's weights (see the module docstring)."""
    root = Path(path)
    h = hashlib.sha256(b"meshwright-base-v1")
    for file in _weight_files(root):
        try:
            size = file.stat().st_size
            with file.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > min(size - 8, 100 << 20):
                    raise ValueError(f"header length {n} past the file's {size} bytes")
                header_bytes = fh.read(n)
                header = json.loads(header_bytes)
                h.update(f"{file.name}\0{size}\0".encode())
                h.update(header_bytes)
                for name in sorted(k for k in header if k != "__metadata__"):
                    begin, end = header[name]["data_offsets"]
                    for at in sorted({begin, max(begin, end - SAMPLE)}):
                        fh.seek(8 + n + at)
                        h.update(fh.read(min(SAMPLE, end - at)))
        except FileNotFoundError:
            raise invalid("init_from", str(root), f"a Hugging Face model directory with its weights ({file.name} "
                          f"is missing)") from None
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            raise invalid("init_from", str(root), f"a directory of readable safetensors files: {file.name} is "
                          f"damaged ({type(exc).__name__}: {str(exc)[:120]})") from None
    return h.hexdigest()


# model fields that do not change the weights drawn from a seed
WEIGHT_NEUTRAL = ("name", "dropout", "capacity_factor", "aux_loss_coef", "z_loss_coef")


def base_reference(cfg: TrainConfig, model_cfg: ModelConfig, init: str | None,
                   device_type: str = "cpu") -> dict[str, Any]:
    """This run's base: ``init_from`` (resolved path, grow rule, fingerprint) or the recipe it was drawn from."""
    if cfg.init_from is not None:
        root = Path(cfg.init_from)
        return {"source": "init_from", "init_from": str(root.resolve()), "grow_positions": cfg.grow_positions,
                "fingerprint": hf_fingerprint(root)}
    scheme = init or "stream"
    fields = {k: v for k, v in sorted(to_dict(model_cfg).items()) if k not in WEIGHT_NEUTRAL}
    recipe = {"seed": cfg.seed, "init": scheme, **({"device": device_type} if scheme == "keyed" else {})}
    digest = hashlib.sha256(json.dumps({**recipe, "model": fields}, sort_keys=True, default=str).encode()).hexdigest()
    return {"source": "seed", **recipe, "fingerprint": digest}


def describe(ref: dict[str, Any]) -> str:
    """A base reference in a few words, for one-line messages."""
    if ref.get("source") == "init_from":
        return f"init_from {ref.get('init_from')} (fingerprint {str(ref.get('fingerprint'))[:12]})"
    device = f" on {ref['device']}" if "device" in ref else ""
    return (f"drawn from seed {ref.get('seed')} ({ref.get('init')} init{device}, fingerprint "
            f"{str(ref.get('fingerprint'))[:12]})")


def check_base(saved: Any, now: dict[str, Any], ckpt: Path) -> None:
    """One line unless ``now`` is the base the adapter-only checkpoint ``ckpt`` was trained on (``saved``)."""
    if not isinstance(saved, dict) or saved.get("source") not in ("init_from", "seed") or "fingerprint" not in saved:
        raise ConfigError(f"checkpoint file {ckpt / 'trainer_state.json'} is garbled: its {BASE_KEY} is not a base "
                          f"reference; valid: an intact checkpoint")
    if saved["fingerprint"] == now["fingerprint"]:
        return
    was = f"checkpoint {ckpt} holds LoRA adapters only, trained on the base {describe(saved)}"
    if saved["source"] == "init_from":
        if now["source"] != "init_from":
            raise invalid("init_from", None, f"{saved['init_from']} or a copy of it ({was})")
        raise invalid("init_from", now["init_from"], f"that base or a copy of it ({was}; this one's fingerprint is "
                      f"{now['fingerprint'][:12]})")
    if now["source"] == "init_from":
        raise invalid("init_from", now["init_from"], f"null ({was})")
    for key in ("seed", "init", "device"):
        if saved.get(key) != now.get(key):
            raise invalid(key, now.get(key), f"{saved.get(key)!r} ({was})")
    raise invalid("model", "this run's model", f"the model the checkpoint's run drew, as its model.yaml says ({was})")


@dataclass
class AdapterScope:
    """Which model tensors a LoRA checkpoint carries, and the run's base: handed to save/load (checkpoint.py)."""

    modules_to_save: tuple[str, ...]
    tied: bool  # tie_embeddings: output.weight is tok_embeddings.weight
    base: dict[str, Any]
    adapters_only: bool = True  # lora.checkpoint == "adapters": saves leave the base out

    @classmethod
    def for_run(cls, cfg: TrainConfig, model_cfg: ModelConfig, init: str | None,
                device_type: str = "cpu") -> "AdapterScope":
        assert cfg.lora is not None
        return cls(tuple(cfg.lora.modules_to_save), bool(model_cfg.tie_embeddings),
                   base_reference(cfg, model_cfg, init, device_type), cfg.lora.checkpoint == "adapters")

    def carries(self, key: str) -> bool:
        """Whether model state ``key`` is trained (an adapter, or a parameter of a module in ``modules_to_save``)."""
        if is_adapter_param(key):
            return True
        saved = set(self.modules_to_save)
        if self.tied and saved & {"output", "tok_embeddings"}:
            saved |= {"output", "tok_embeddings"}
        return any(key.startswith(f"{m}.") for m in saved)

    def view(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` ({"model", "optim"}) with only the carried model tensors: the same tensor objects, so a DCP load
        into the view fills the runtime's state in place."""
        return {**state, "model": {k: v for k, v in state["model"].items() if self.carries(k)}}


def checkpoint_tensor_bytes(model_cfg: ModelConfig, lora: Any) -> dict[str, int]:
    """Bytes of tensor data a LoRA run's checkpoint holds with AdamW (fp32 master weights, as the trainer keeps them),
    counted on a ``meta`` model: ``adapters`` (the trained tensors, their two moments and step counts) and ``full``
    (the base's state too). DCP adds a small, fixed framing per tensor on disk; docs/finetune.md has Llama-3-8B's."""
    from meshwright.memory.lora import apply_lora_config
    from meshwright.models import build_model

    model = build_model(model_cfg, device="meta")
    apply_lora_config(model, lora, seed=0)
    state = model.state_dict()
    scope = AdapterScope(tuple(lora.modules_to_save), bool(model_cfg.tie_embeddings), {})
    trained = {k: v for k, v in state.items() if scope.carries(k)}
    params = {id(p): p for p in model.parameters() if p.requires_grad}  # the optimizer's: tied weights once
    optim = sum(2 * p.numel() * p.element_size() + 4 for p in params.values())  # exp_avg, exp_avg_sq, fp32 step

    def size(entries: dict[str, Any]) -> int:
        return sum(v.numel() * v.element_size() for v in entries.values())

    return {"adapters": size(trained) + optim, "full": size(state) + optim}


def check_base_present(cfg: TrainConfig, target: Path | None) -> None:
    """Before a resume builds anything: where checkpoint ``target`` is adapter-only and its base came from
    ``init_from``, this run's ``init_from`` must name a directory that exists (one line naming the checkpoint's base
    otherwise; whether it is the same base is checked by its fingerprint when the checkpoint loads)."""
    if target is None:
        return
    try:
        ref = json.loads((target / "trainer_state.json").read_bytes().decode("utf-8")).get(BASE_KEY)
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return  # the checkpoint loader names the damage (and may fall back to an intact checkpoint)
    if not isinstance(ref, dict) or ref.get("source") != "init_from":
        return
    if cfg.init_from is None or not (Path(cfg.init_from) / "config.json").is_file():
        state = "unset" if cfg.init_from is None else "missing"
        raise invalid("init_from", cfg.init_from, f"{ref.get('init_from')} or a copy of it (checkpoint {target} holds "
                      f"LoRA adapters only, trained on the base {describe(ref)}; this run's init_from is {state})")
