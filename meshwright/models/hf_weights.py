"""Hugging Face safetensors weights <-> meshwright's Decoder: key renaming, Conv1D transposes, the q/k
rotary permutation, stacked experts; read per parameter *slice*, so a sharded rank reads only its piece.

Every Decoder parameter has a ``Source``: how to read any slice ``idx`` of it (in meshwright's layout)
from the checkpoint's tensors. A plain model reads whole parameters; a DTensor parameter (tensor- or
fully-sharded) reads only the rows/columns its local shard covers, and so does a plain tensor that is a shard
cut by hand (megatron-core tp) given its box; a pipeline stage has only its own layers' parameters, so it
reads only those. ``load_pretrained_into`` works on any of them;
``from_pretrained`` builds the plain model from ``config.json`` and loads it. ``hf_state_dict`` is the
inverse (used by ``meshwright export --hf``).

Layout differences (measured equal to transformers' logits to 1e-4 in tests/unit/test_hf_weights.py):
- Llama/Mistral/Qwen2/Qwen3/Mixtral rotate the two halves of each head (``rotate_half``); meshwright rotates
  interleaved pairs, so q/k rows (and Qwen2's q/k biases, Qwen3's q_norm/k_norm weights) are permuted within each
  head.
- GPT-2 stores Conv1D weights as (in, out) and fuses q/k/v into ``c_attn``.
- Phi-3/Phi-4 fuse q/k/v rows into ``qkv_proj`` and gate/up rows into ``gate_up_proj`` (``fused_proj``); each of
  meshwright's separate weights reads its row block (q/k blocks permuted per head as above), and the export
  concatenates them back.
- Mixtral stores each expert's w1/w2/w3 apart (Qwen3-MoE: gate_proj/down_proj/up_proj); meshwright stacks them
  along dim 0.
- Gemma 2/3 (``post_norms``) name their four norms input_layernorm, post_attention_layernorm (the attention's
  output), pre_feedforward_layernorm and post_feedforward_layernorm; Llama's post_attention_layernorm is the MLP's
  input norm. Gemma 3's multimodal checkpoint puts the text model under ``language_model``: its vision tower's tensors
  are left unread (``vision_keys``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from meshwright.config import ModelConfig, load_model_config
from meshwright.config.hf import hf_config_from_model
from meshwright.errors import ConfigError, first_line, invalid
from meshwright.memory.lora import is_adapter_param
from meshwright.models.decoder import Decoder, fill_rope
from meshwright.models.positions import check_growth, grow_table

Index = tuple[slice, ...]
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # buffers some checkpoints carry


class SafetensorsReader:
    """A Hugging Face model directory's safetensors files (one, or sharded with an index), opened lazily."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        self._handles: dict[Path, Any] = {}
        index = self.root / "model.safetensors.index.json"
        single = self.root / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_bytes().decode("utf-8")).get("weight_map")
            except (ValueError, UnicodeDecodeError, AttributeError):
                weight_map = None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise invalid("init_from", str(path), f"a directory whose {index.name} is JSON with a weight_map "
                              f"of tensor name -> file name")
            self.files = {k: self.root / v for k, v in weight_map.items()}
        elif single.is_file():
            self.files = {k: single for k in self._open(single).keys()}
        else:
            raise invalid("init_from", str(path), "a Hugging Face model directory with model.safetensors "
                          "or model.safetensors.index.json")

    def _open(self, file: Path) -> Any:
        from safetensors import safe_open

        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as exc:  # noqa: BLE001 - SafetensorError (truncated, garbage), OSError: one line
                raise invalid("init_from", str(self.root), f"a directory of readable safetensors files: {file.name} "
                              f"is damaged or truncated ({first_line(exc, 200)})") from None
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def _slice(self, key: str) -> Any:
        if key not in self.files:
            raise ConfigError(f"init_from={str(self.root)!r} lacks tensor {key!r}; valid: a checkpoint of the "
                              f"architecture its config.json names")
        return self._open(self.files[key]).get_slice(key)

    def read(self, key: str, idx: Index) -> torch.Tensor:
        """Only the elements ``idx`` of ``key`` (safetensors reads the slice, not the whole tensor)."""
        return self._slice(key)[idx]


def _bounds(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError("strided slices are not supported")
    return start, stop


def rotate_half_to_pairs(rows: torch.Tensor, heads: int, rope_dim: int = 0, inverse: bool = False) -> torch.Tensor:
    """Each head's rows (``rows`` holds ``heads`` of them) from transformers' rotate-half order to meshwright's
    interleaved pairs (``inverse``: back); only the first ``rope_dim`` rows of a head rotate (0: all), the rest stay."""
    hd = rows.shape[0] // heads
    rd, rest = rope_dim or hd, rows.shape[1:]
    t = rows.reshape(heads, hd, *rest)
    split = (rd // 2, 2) if inverse else (2, rd // 2)
    rot = t[:, :rd].reshape(heads, *split, *rest).transpose(1, 2).reshape(heads, rd, *rest)
    return torch.cat([rot, t[:, rd:]], dim=1).reshape(rows.shape)


@dataclass
class Source:
    """One meshwright parameter from one checkpoint tensor: optionally a column block (``offset``,
    ``width``) of a transposed Conv1D weight, optionally with the rotary permutation over ``rope_heads``."""

    key: str
    transpose: bool = False
    offset: int = 0  # start of this parameter along the checkpoint axis that becomes meshwright's dim 0
    rope_heads: int = 0
    rope_dim: int = 0  # the rotated leading rows of each head (partial rotary, Phi-4-mini); 0 = all of them
    exact: bool = True  # the checkpoint tensor has exactly this parameter's shape (False: a block of a fused one)
    fused_rows: int = 0  # a block of a fused tensor of this many rows (Phi-3): its shape is checked all the same

    def keys(self) -> list[str]:
        return [self.key]

    def check_shape(self, reader: SafetensorsReader, name: str, shape: tuple[int, ...]) -> None:
        """Refuse a checkpoint tensor larger than the parameter: slicing would otherwise load its corner silently."""
        if not self.exact and not self.fused_rows:
            return
        found = reader.shape(self.key)
        want = tuple(reversed(shape)) if self.transpose else shape
        if self.fused_rows:
            want = (self.fused_rows, *shape[1:])
        if found != want:
            what = f"{name} (a row block of {self.key})" if self.fused_rows else name
            raise ConfigError(f"init_from: {what} has shape {want} in the model, {self.key} has {found} in "
                              f"{str(reader.root)!r}; valid: a model config matching the checkpoint's config.json")

    def read(self, reader: SafetensorsReader, idx: Index, shape: tuple[int, ...]) -> torch.Tensor:
        r0, r1 = _bounds(idx[0], shape[0])
        if self.rope_heads:
            hd = shape[0] // self.rope_heads
            h0, h1 = r0 // hd, -(-r1 // hd)
            whole = self._rows(reader, h0 * hd, h1 * hd, idx[1:])
            whole = rotate_half_to_pairs(whole, h1 - h0, self.rope_dim)
            return whole[r0 - h0 * hd: r1 - h0 * hd]
        return self._rows(reader, r0, r1, idx[1:])

    def _rows(self, reader: SafetensorsReader, r0: int, r1: int, rest: Index) -> torch.Tensor:
        rows = slice(self.offset + r0, self.offset + r1)
        if self.transpose and rest:  # Conv1D (in, out): our rows are its columns
            return reader.read(self.key, (rest[0], rows)).t().contiguous()
        return reader.read(self.key, (rows, *rest))


@dataclass
class GrownTable(Source):
    """GPT-2's ``wpe`` read whole and grown to the model's ``max_seq_len`` rows by ``rule`` (``grow_positions``:
    models/positions.py); each rank then keeps the rows its shard holds."""

    rule: str = "copy"

    def check_shape(self, reader: SafetensorsReader, name: str, shape: tuple[int, ...]) -> None:
        found = reader.shape(self.key)
        if found[1:] != shape[1:]:
            super().check_shape(reader, name, shape)

    def read(self, reader: SafetensorsReader, idx: Index, shape: tuple[int, ...]) -> torch.Tensor:
        whole = reader.read(self.key, tuple(slice(None) for _ in shape))
        return grow_table(whole, shape[0], self.rule)[idx]


@dataclass
class Stacked:
    """Experts stacked along dim 0 from one checkpoint tensor per expert."""

    parts: list[Source]

    def keys(self) -> list[str]:
        return [p.key for p in self.parts]

    def read(self, reader: SafetensorsReader, idx: Index, shape: tuple[int, ...]) -> torch.Tensor:
        e0, e1 = _bounds(idx[0], shape[0])
        rows = [self.parts[e].read(reader, idx[1:], shape[1:]) for e in range(e0, e1)]
        return torch.stack(rows) if rows else torch.empty(0, *[_len(s, n) for s, n in zip(idx[1:], shape[1:])])


def _len(s: slice, n: int) -> int:
    a, b = _bounds(s, n)
    return b - a


def _prefix(reader: SafetensorsReader, leaf: str) -> str:
    """'model.' / 'transformer.' / '' : whatever the checkpoint puts before ``leaf``."""
    for key in reader.keys():
        if key.endswith(leaf) and (key == leaf or key[: -len(leaf)].endswith(".")):
            return key[: -len(leaf)]
    raise ConfigError(f"init_from={str(reader.root)!r} has no tensor ending in {leaf!r}; valid: a checkpoint of the "
                      f"architecture its config.json names")


def _head_source(cfg: ModelConfig, reader: SafetensorsReader, embedding: str) -> Source:
    """The output head's tensor: ``lm_head.weight``, or the embedding where the model ties them. An untied model
    whose checkpoint lacks the head is refused: loading the embedding there would train another model than the
    checkpoint's, silently (transformers initialises it at random and warns)."""
    if "lm_head.weight" in reader:
        return Source("lm_head.weight")
    if not cfg.tie_embeddings:
        raise ConfigError(f"init_from={str(reader.root)!r} has no 'lm_head.weight' and config.json "
                          f"tie_word_embeddings=false; valid: a checkpoint with its output head, or "
                          f"tie_word_embeddings true if the head is the embedding")
    return Source(embedding)


def llama_sources(cfg: ModelConfig, reader: SafetensorsReader) -> dict[str, Source | Stacked]:
    """Sources for Llama/Mistral/Qwen2/Qwen3/Qwen3-MoE/Mixtral checkpoints."""
    p = _prefix(reader, "embed_tokens.weight")
    out: dict[str, Source | Stacked] = {"tok_embeddings.weight": Source(f"{p}embed_tokens.weight"),
                                        "norm.weight": Source(f"{p}norm.weight")}
    out["output.weight"] = _head_source(cfg, reader, f"{p}embed_tokens.weight")
    rd = cfg.rope_dim if cfg.rope_dim != cfg.head_dim else 0
    for i in range(cfg.n_layers):
        h, o = f"{p}layers.{i}.", f"layers.{i}."
        out[o + "attention_norm.weight"] = Source(h + "input_layernorm.weight")
        if cfg.post_norms:  # Gemma 2/3: post_attention_layernorm norms the attention's output, not the MLP's input
            out[o + "attention_post_norm.weight"] = Source(h + "post_attention_layernorm.weight")
            out[o + "ffn_norm.weight"] = Source(h + "pre_feedforward_layernorm.weight")
            out[o + "ffn_post_norm.weight"] = Source(h + "post_feedforward_layernorm.weight")
        else:
            out[o + "ffn_norm.weight"] = Source(h + "post_attention_layernorm.weight")
        if cfg.fused_proj:
            out.update(_phi3_attention(cfg, h, o, rd))
        for ours, theirs, heads in (("wq", "q_proj", cfg.n_heads), ("wk", "k_proj", cfg.kv_heads), ("wv", "v_proj", 0),
                                    ("wo", "o_proj", 0)):
            if cfg.fused_proj and ours != "wo":
                continue
            out[f"{o}attention.{ours}.weight"] = Source(f"{h}self_attn.{theirs}.weight", rope_heads=heads, rope_dim=rd)
            if cfg.qkv_bias and ours != "wo":
                out[f"{o}attention.{ours}.bias"] = Source(f"{h}self_attn.{theirs}.bias", rope_heads=heads, rope_dim=rd)
        if cfg.qk_norm:  # one head_dim weight, permuted like the rows of one head
            for norm in ("q_norm", "k_norm"):
                out[f"{o}attention.{norm}.weight"] = Source(f"{h}self_attn.{norm}.weight", rope_heads=1, rope_dim=rd)
        if cfg.is_moe_layer(i):  # Qwen3-MoE (qk_norm): mlp.experts.{e}.gate/up/down_proj; Mixtral: w1/w3/w2
            moe = f"{h}mlp." if cfg.qk_norm else f"{h}block_sparse_moe."
            names = ({"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"} if cfg.qk_norm
                     else {w: w for w in ("w1", "w2", "w3")})
            out[o + "feed_forward.router.weight"] = Source(moe + "gate.weight")
            for w in ("w1", "w2", "w3"):
                out[f"{o}feed_forward.experts.{w}"] = Stacked(
                    [Source(f"{moe}experts.{e}.{names[w]}.weight") for e in range(cfg.n_experts)])
        elif cfg.fused_proj:  # gate rows, then up rows
            f = cfg.ffn_dim
            for j, ours in enumerate(("w1", "w3")):
                out[f"{o}feed_forward.{ours}.weight"] = Source(f"{h}mlp.gate_up_proj.weight", offset=j * f, exact=False,
                                                               fused_rows=2 * f)
            out[o + "feed_forward.w2.weight"] = Source(f"{h}mlp.down_proj.weight")
        else:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{o}feed_forward.{ours}.weight"] = Source(f"{h}mlp.{theirs}.weight")
    return out


def _phi3_attention(cfg: ModelConfig, h: str, o: str, rd: int) -> dict[str, Source | Stacked]:
    """wq, wk, wv: the q, k and v row blocks of Phi-3's ``qkv_proj`` (q/k permuted per head like Llama's, their first
    ``rd`` rows of each head: 0 = all)."""
    hd, total = cfg.head_dim, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim
    blocks = (("wq", 0, cfg.n_heads), ("wk", cfg.n_heads * hd, cfg.kv_heads),
              ("wv", (cfg.n_heads + cfg.kv_heads) * hd, 0))
    return {f"{o}attention.{ours}.weight": Source(f"{h}self_attn.qkv_proj.weight", offset=offset, rope_heads=heads,
                                                  rope_dim=rd, exact=False, fused_rows=total)
            for ours, offset, heads in blocks}


def gpt2_sources(cfg: ModelConfig, reader: SafetensorsReader,
                 grow_positions: str | None = None) -> dict[str, Source | Stacked]:
    """Sources for GPT-2 checkpoints (Conv1D weights are (in, out); q/k/v fused in c_attn). A ``wpe`` with fewer
    rows than ``model.max_seq_len`` is grown by ``grow_positions``, else one line naming both (models/positions.py)."""
    p = _prefix(reader, "wte.weight")
    d = cfg.d_model
    table: Source = Source(f"{p}wpe.weight")
    if isinstance(reader, SafetensorsReader) and table.key in reader:
        rows = reader.shape(table.key)[0]
        check_growth(cfg.max_seq_len, rows, grow_positions, f"init_from={str(reader.root)!r} (config.json n_positions)")
        if rows != cfg.max_seq_len:
            table = GrownTable(table.key, rule=str(grow_positions))
    out: dict[str, Source | Stacked] = {"tok_embeddings.weight": Source(f"{p}wte.weight"),
                                        "pos_embeddings.weight": table,
                                        "norm.weight": Source(f"{p}ln_f.weight"), "norm.bias": Source(f"{p}ln_f.bias")}
    out["output.weight"] = _head_source(cfg, reader, f"{p}wte.weight")
    for i in range(cfg.n_layers):
        h, o = f"{p}h.{i}.", f"layers.{i}."
        for ours, theirs in (("attention_norm", "ln_1"), ("ffn_norm", "ln_2")):
            out[f"{o}{ours}.weight"] = Source(f"{h}{theirs}.weight")
            out[f"{o}{ours}.bias"] = Source(f"{h}{theirs}.bias")
        for j, name in enumerate(("wq", "wk", "wv")):
            out[f"{o}attention.{name}.weight"] = Source(f"{h}attn.c_attn.weight", transpose=True, offset=j * d, exact=False)
            out[f"{o}attention.{name}.bias"] = Source(f"{h}attn.c_attn.bias", offset=j * d, exact=False)
        for ours, theirs in (("attention.wo", "attn.c_proj"), ("feed_forward.w1", "mlp.c_fc"),
                             ("feed_forward.w2", "mlp.c_proj")):
            out[f"{o}{ours}.weight"] = Source(f"{h}{theirs}.weight", transpose=True)
            out[f"{o}{ours}.bias"] = Source(f"{h}{theirs}.bias")
    return out


def weight_sources(cfg: ModelConfig, reader: SafetensorsReader,
                   grow_positions: str | None = None) -> dict[str, Source | Stacked]:
    return gpt2_sources(cfg, reader, grow_positions) if cfg.arch == "gpt2" else llama_sources(cfg, reader)


Box = tuple[tuple[int, ...], tuple[int, ...]]  # (global shape, offset of a plain local shard in it)


def _local_index(param: torch.Tensor, box: Box | None = None) -> tuple[Index, tuple[int, ...], torch.Tensor]:
    """The global slice this rank holds of ``param``, the global shape, and the local tensor to write it into.
    ``box``: a shard cut by hand (megatron-core tp, ep experts), placed by its caller; a DTensor over such a shard
    (FSDP over an ep shard) holds its placements' part of that box."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        DTensor = ()  # type: ignore[assignment]
    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        local, whole = param.to_local(), tuple(param.shape)
    else:
        shape, offset, local, whole = tuple(param.shape), (0,) * param.dim(), param, tuple(param.shape)
    if box is not None:
        whole, base = tuple(box[0]), box[1]
        offset = tuple(b + o for b, o in zip(base, offset))
    return tuple(slice(o, o + n) for o, n in zip(offset, shape)), whole, local


@torch.no_grad()
def load_pretrained_into(model: nn.Module | Iterable[nn.Module], path: str | Path, cfg: ModelConfig | None = None,
                         strict: bool = True, check_unused: bool | None = None, boxes: dict[str, Box] | None = None,
                         whole_model: Iterable[str] | None = None, grow_positions: str | None = None) -> list[str]:
    """Copy a Hugging Face checkpoint into ``model`` (a plain Decoder, a pipeline stage, or a list of
    stage chunks), each rank reading only the slices its (possibly DTensor-sharded) parameters hold.

    ``boxes``: {name: (global shape, offset)} of plain parameters that are shards cut by hand (megatron-core
    tp, ``parallel/meta_init.shard_box``; expert-parallel experts, ``meta_init.ep_boxes``; both recorded by the
    distributed runtime at the cut, its ``shard_boxes``: without its box a shard
    reads the first rows of the full tensor): each reads only its box, through the same transforms (transposes,
    rotary permutation, fused blocks) as the whole parameter. LoRA adapters (``lora_A``/``lora_B``) are skipped:
    they are the saver's, drawn by it; other parameters without a source (MEFT's adapters) are an error with
    ``strict``, else skipped. ``check_unused`` (default: when every layer is
    present, or ``whole_model`` is given) refuses checkpoint tensors that no parameter uses, so a weight
    meshwright's model has no place for is never silently dropped; ``whole_model``: the parameter names of the
    whole model when ``model`` holds only some (a pipeline stage): the check then counts the tensors the other
    stages load as used, without reading them. Returns the names loaded. Rotary tables are recomputed (they are
    not in the checkpoint). ``grow_positions``: GPT-2's ``wpe`` with fewer rows than ``max_seq_len`` grows by that
    rule (models/positions.py).
    """
    modules = [model] if isinstance(model, nn.Module) else list(model)
    cfg = cfg if cfg is not None else load_model_config(str(Path(path) / "config.json"))
    reader = SafetensorsReader(path)
    sources = weight_sources(cfg, reader, grow_positions)
    loaded: list[str] = []
    used: set[str] = set()
    layers_seen: set[str] = set()
    for mod in modules:
        for name, param in mod.named_parameters():
            if name not in sources:
                if is_adapter_param(name):  # LoRA's A/B: never in a Hugging Face checkpoint, drawn by the saver
                    continue
                if strict:
                    raise ConfigError(f"init_from: parameter {name!r} has no tensor in {str(path)!r}; valid: load the "
                                      f"checkpoint before adding adapters, or strict=False")
                continue
            src = sources[name]
            idx, shape, local = _local_index(param, (boxes or {}).get(name))
            if isinstance(src, Source):
                src.check_shape(reader, name, shape)
            value = src.read(reader, idx, shape)
            if tuple(value.shape) != tuple(local.shape):
                raise ConfigError(f"init_from: {name} reads shape {tuple(value.shape)} from {str(path)!r}, the model "
                                  f"holds {tuple(local.shape)}; valid: a model config matching the checkpoint's config.json")
            local.copy_(value.to(local.dtype))
            loaded.append(name)
            used.update(src.keys())
            if name.startswith("layers."):
                layers_seen.add(name.split(".")[1])
        _reset_rope(mod, cfg)
    if whole_model is not None:  # what the other stages load counts as used
        for name in whole_model:
            if name in sources:
                used.update(sources[name].keys())
    if check_unused is None:
        check_unused = len(layers_seen) == cfg.n_layers or whole_model is not None
    if cfg.tie_embeddings:
        used.add("lm_head.weight")  # some tied checkpoints store the head as well; the model shares the embedding
    if check_unused:
        skipped = vision_keys(path, reader)  # Gemma 3's vision tower: not imported, said when its config was read
        extra = sorted(k for k in reader.keys() if k not in used and k not in skipped and not k.endswith(IGNORED_SUFFIXES))
        if extra:
            raise ConfigError(f"init_from={str(path)!r} has {len(extra)} tensor(s) meshwright's model has no place for "
                              f"(first: {extra[0]!r}); valid: a checkpoint whose config.json describes all of its weights")
    return loaded


VISION_PARTS = ("vision_tower.", "multi_modal_projector.")


def vision_keys(path: str | Path, reader: SafetensorsReader) -> set[str]:
    """The vision tower's and projector's tensors of a multimodal Gemma 3 checkpoint (config.json model_type gemma3),
    which the text model leaves unread; none for any other checkpoint."""
    try:
        model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return set()
    if model_type != "gemma3":
        return set()
    return {k for k in reader.keys() if any(k.startswith(part) or f".{part}" in k for part in VISION_PARTS)}


def _reset_rope(module: nn.Module, cfg: ModelConfig) -> None:
    fill_rope(module, cfg)


def from_pretrained(path: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, cfg: ModelConfig | None = None,
                    grow_positions: str | None = None) -> nn.Module:
    """A Decoder built from ``path/config.json`` (or ``cfg``: the checkpoint's config with overrides) with the
    checkpoint's weights and no random init pass: the strict load fills every parameter or refuses, so drawing
    them first would only cost time (minutes of CPU draws at 70B) and a second host copy."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise invalid("init_from", str(path), "a Hugging Face model directory with config.json")
    cfg = cfg if cfg is not None else load_model_config(str(path / "config.json"))
    with torch.device("meta"):
        model = Decoder(cfg)
    model = model.to_empty(device=device or "cpu")
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # to_empty keeps the tie, but be explicit
    if dtype is not None:
        model = model.to(dtype)
    load_pretrained_into(model, path, cfg, grow_positions=grow_positions)
    return model


def hf_state_dict(model: nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of the sources: a Hugging Face state dict (contiguous CPU tensors) for ``model``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    fake = _KeyOnlyReader(cfg)
    sources = weight_sources(cfg, fake)  # type: ignore[arg-type]
    for name, src in sources.items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        value = state[name]
        parts = src.parts if isinstance(src, Stacked) else [src]
        values = list(value) if isinstance(src, Stacked) else [value]
        for part, v in zip(parts, values):
            if part.rope_heads:
                v = rotate_half_to_pairs(v, part.rope_heads, part.rope_dim, inverse=True)
            if part.transpose:
                v = v.t()
            prev = out.get(part.key)  # GPT-2's c_attn, Phi-3's qkv_proj/gate_up_proj: blocks in offset order
            if prev is not None:
                dim = 1 if part.transpose and v.dim() == 2 else 0
                if prev.shape[dim] != part.offset:
                    raise AssertionError(f"{part.key}: block at {part.offset} follows {prev.shape[dim]} rows")
                v = torch.cat([prev, v], dim=dim)
            out[part.key] = v.contiguous()
    return out


class _KeyOnlyReader:
    """Stands in for a reader when writing: the canonical key layout (``model.``/``transformer.`` prefixes)."""

    def __init__(self, cfg: ModelConfig) -> None:
        leaf = "transformer.wte.weight" if cfg.arch == "gpt2" else "model.embed_tokens.weight"
        self._keys = [leaf] + ([] if cfg.tie_embeddings else ["lm_head.weight"])
        self.root = Path(".")

    def keys(self) -> list[str]:
        return self._keys

    def __contains__(self, key: str) -> bool:
        return key in self._keys


# safetensors metadata that marks a model.safetensors written by save_hf, so that an export may replace its own
# earlier output but never another model's weights (check_export_dir)
EXPORT_MARK = {"producer": "meshwright"}


def check_export_dir(out: str | Path, label: str = "--hf") -> bool:
    """``out`` may receive config.json + model.safetensors: a new directory, one without model files, or an earlier
    export (True: the files in it are an export's to replace). A Hugging Face model directory (say the run's own
    ``init_from``) would have had its config.json and weights replaced, or its shards mixed with a single-file model,
    so it is refused, before anything is read."""
    d = Path(out)
    if not d.is_dir():
        return False
    weights = d / "model.safetensors"
    if weights.is_file() and _written_by_save_hf(weights):
        return True
    clash = sorted(f.name for f in d.iterdir()
                   if f.name in ("config.json", "model.safetensors.index.json") or f.name.endswith(".safetensors"))
    if clash:
        shown = ", ".join(clash[:3]) + (f" and {len(clash) - 3} more" if len(clash) > 3 else "")
        raise invalid(label, str(out), f"a new directory, one without model files, or an earlier `meshwright export` "
                      f"(this one holds {shown}, not written by an export, which exporting would replace or mix with; "
                      f"it is left alone)")
    return False


def _written_by_save_hf(path: Path) -> bool:
    """Whether ``path``'s safetensors header carries EXPORT_MARK (a damaged or foreign file: no)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - safetensors raises its own SafetensorError and OSError; either way not ours
        return False
    return all(meta.get(k) == v for k, v in EXPORT_MARK.items())


def save_hf(model: nn.Module, cfg: ModelConfig, out: str | Path, config_extra: dict | None = None) -> Path:
    """Write ``out/config.json`` + ``out/model.safetensors`` that transformers' ``from_pretrained`` loads;
    ``config_extra``: config.json keys the model config does not hold (the source's token ids)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in hf_state_dict(model, cfg).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", **EXPORT_MARK})
    (out / "config.json").write_text(json.dumps({**hf_config_from_model(cfg), **(config_extra or {})}, indent=1) + "\n")
    return out
