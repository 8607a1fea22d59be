"""ModelConfig, ClusterSpec and TrainConfig: the dataclasses every part of meshwright reads.

Presets live as YAML data files under ``configs/`` (models/, clusters/, train/); ``load_*`` accept a
preset name, a path, or an inline mapping. Validation errors are one line naming the key, the value
and what would be valid (see ``meshwright.errors``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from meshwright.errors import ConfigError, invalid
from meshwright.yamlio import from_dict, read_mapping, to_dict

CONFIG_ROOT = Path(os.environ.get("MESHWRIGHT_CONFIGS", Path(__file__).resolve().parents[1] / "configs"))


def divisors(n: int) -> list[int]:
    """Positive divisors of n, ascending (the valid degrees offered in one-line errors)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _positive(prefix: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise invalid(f"{prefix}{name}", value, "a positive number")


@dataclass
class ModelConfig:
    """Shape of a decoder-only transformer; ``arch`` picks Llama-style or GPT-2-style blocks."""

    name: str = "custom"
    arch: Literal["llama", "gpt2"] = "llama"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None = n_heads (multi-head); fewer = grouped-query attention
    ffn_hidden: Optional[int] = None  # None = 4*d_model (gpt2) or Llama's 8/3 rule rounded to multiple_of
    multiple_of: int = 256
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    # Mixture of experts (0 experts = dense). Experts replace the MLP of every `moe_every`-th block.
    n_experts: int = 0
    top_k: int = 2
    moe_ffn_hidden: Optional[int] = None
    moe_every: int = 1
    capacity_factor: Optional[float] = None  # None = no token dropping
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        _positive(p, self, "vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "multiple_of", "moe_every")
        _positive(p, self, "norm_eps", "rope_theta", "init_std")
        if self.d_model % self.n_heads:
            raise invalid(f"{p}n_heads", self.n_heads, f"a divisor of d_model={self.d_model}: {divisors(self.d_model)}")
        if self.arch == "llama" and self.head_dim % 2:
            raise invalid(f"{p}d_model", self.d_model, "d_model/n_heads must be even for rotary embeddings")
        kv = self.kv_heads
        if kv <= 0 or self.n_heads % kv:
            raise invalid(f"{p}n_kv_heads", self.n_kv_heads, f"a divisor of n_heads={self.n_heads}: {divisors(self.n_heads)}")
        if self.arch == "gpt2" and kv != self.n_heads:
            raise invalid(f"{p}n_kv_heads", self.n_kv_heads, f"null or {self.n_heads} (gpt2 blocks have no GQA)")
        if self.ffn_hidden is not None and self.ffn_hidden <= 0:
            raise invalid(f"{p}ffn_hidden", self.ffn_hidden, "a positive integer or null")
        if not 0.0 <= self.dropout < 1.0:
            raise invalid(f"{p}dropout", self.dropout, "a number in [0, 1)")
        if self.n_experts < 0:
            raise invalid(f"{p}n_experts", self.n_experts, "0 (dense) or a positive integer")
        if self.n_experts:
            if not 1 <= self.top_k <= self.n_experts:
                raise invalid(f"{p}top_k", self.top_k, f"an integer in [1, n_experts={self.n_experts}]")
            if self.capacity_factor is not None and self.capacity_factor <= 0:
                raise invalid(f"{p}capacity_factor", self.capacity_factor, "a positive number or null (no dropping)")
            if self.arch != "llama":
                raise invalid(f"{p}arch", self.arch, "'llama' for MoE models (SwiGLU experts)")

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.arch == "gpt2":
            return 4 * self.d_model
        hidden = int(2 * 4 * self.d_model / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def expert_ffn_dim(self) -> int:
        return self.moe_ffn_hidden if self.moe_ffn_hidden is not None else self.ffn_dim

    def is_moe_layer(self, index: int) -> bool:
        return self.n_experts > 0 and (index + 1) % self.moe_every == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    # ---- analytic parameter counts (the modules are checked against these in tests) -----------
    def attention_params(self) -> int:
        d, hd = self.d_model, self.head_dim
        qo = 2 * d * d
        kv = 2 * d * self.kv_heads * hd
        bias = (3 * d + d) if self.arch == "gpt2" else 0
        return qo + kv + bias

    def dense_mlp_params(self) -> int:
        d, f = self.d_model, self.ffn_dim
        if self.arch == "gpt2":
            return 2 * d * f + f + d
        return 3 * d * f

    def moe_mlp_params(self, active_only: bool = False) -> int:
        experts = self.top_k if active_only else self.n_experts
        return experts * 3 * self.d_model * self.expert_ffn_dim + self.d_model * self.n_experts

    def norm_params(self) -> int:
        return self.d_model * (2 if self.arch == "gpt2" else 1)

    def layer_params(self, index: int, active_only: bool = False) -> int:
        mlp = self.moe_mlp_params(active_only) if self.is_moe_layer(index) else self.dense_mlp_params()
        return self.attention_params() + mlp + 2 * self.norm_params()

    def embedding_params(self) -> int:
        """Token embedding (+ learned positions for gpt2) (+ untied output head)."""
        n = self.vocab_size * self.d_model
        if self.arch == "gpt2":
            n += self.max_seq_len * self.d_model
        if not self.tie_embeddings:
            n += self.vocab_size * self.d_model
        return n

    def num_params(self, non_embedding: bool = False, active_only: bool = False) -> int:
        body = sum(self.layer_params(i, active_only) for i in range(self.n_layers)) + self.norm_params()
        return body if non_embedding else body + self.embedding_params()

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, PaLM convention (Chowdhery et al. 2022, App. B): 6N + 12·L·H·Q·T.

        N counts the parameters that do matmuls for a token: the non-embedding parameters of the
        *activated* path (MoE: top_k experts + router) plus the output head (vocab x d_model); the
        embedding lookup and learned positions do no FLOPs. The attention term 12·L·H·Q·T counts the
        full (non-causal) score and context matmuls, as PaLM and nanoGPT do.
        """
        t = seq_len if seq_len is not None else self.max_seq_len
        n = self.num_params(non_embedding=True, active_only=True) + self.vocab_size * self.d_model
        return 6.0 * n + 12.0 * self.n_layers * self.n_heads * self.head_dim * t


@dataclass
class ClusterSpec:
    """A GPU/CPU cluster as the planner sees it. Bandwidths are per device, one direction, GB/s."""

    name: str = "custom"
    device: str = "cpu"
    nodes: int = 1
    devices_per_node: int = 1
    memory_gib: float = 16.0
    peak_tflops: dict[str, float] = field(default_factory=lambda: {"fp32": 1.0})
    tdp_w: float = 100.0
    idle_w: float = 20.0
    intra_node_bw_gbps: float = 10.0
    intra_node_latency_us: float = 10.0
    inter_node_bw_gbps: float = 1.0
    inter_node_latency_us: float = 50.0
    host_power_w: float = 0.0  # CPUs, NICs, fans per node, for the energy model
    sources: dict[str, str] = field(default_factory=dict)

    DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        _positive(p, self, "nodes", "devices_per_node", "memory_gib", "tdp_w", "intra_node_bw_gbps", "inter_node_bw_gbps")
        if self.idle_w < 0 or self.idle_w > self.tdp_w:
            raise invalid(f"{p}idle_w", self.idle_w, f"a number in [0, tdp_w={self.tdp_w}]")
        if self.intra_node_latency_us < 0 or self.inter_node_latency_us < 0:
            raise invalid(f"{p}intra_node_latency_us", self.intra_node_latency_us, "a non-negative number")
        if not self.peak_tflops:
            raise invalid(f"{p}peak_tflops", self.peak_tflops, f"a mapping with at least one of {', '.join(self.DTYPES)}")
        for k, v in self.peak_tflops.items():
            if k not in self.DTYPES:
                raise invalid(f"{p}peak_tflops.{k}", v, f"keys among {', '.join(self.DTYPES)}")
            if v <= 0:
                raise invalid(f"{p}peak_tflops.{k}", v, "a positive number of TFLOP/s")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def peak_flops(self, dtype: str = "bf16") -> float:
        """Peak FLOP/s per device for ``dtype``, falling back to the nearest slower format listed."""
        order = {"fp8": ["fp8", "bf16", "fp16", "tf32", "fp32"], "bf16": ["bf16", "fp16", "tf32", "fp32"],
                 "fp16": ["fp16", "bf16", "tf32", "fp32"], "tf32": ["tf32", "fp32"], "fp32": ["fp32"]}
        if dtype not in order:
            raise invalid("dtype", dtype, ", ".join(self.DTYPES))
        for key in order[dtype]:
            if key in self.peak_tflops:
                return self.peak_tflops[key] * 1e12
        return min(self.peak_tflops.values()) * 1e12


@dataclass
class DataConfig:
    """Where tokens come from. ``path: default`` is the embedded corpus (Python stdlib sources)."""

    path: str = "default"
    tokenizer: Literal["byte", "bpe"] = "byte"
    val_fraction: float = 0.05
    max_files: Optional[int] = 400

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if not 0.0 < self.val_fraction < 0.5:
            raise invalid(f"{p}val_fraction", self.val_fraction, "a number in (0, 0.5)")
        if self.max_files is not None and self.max_files <= 0:
            raise invalid(f"{p}max_files", self.max_files, "a positive integer or null")


@dataclass
class TrainConfig:
    """One training run: what model, on which data, for how long, with which optimiser settings."""

    model: Any = "tiny"  # preset name, path to YAML/HF config.json, or an inline ModelConfig mapping
    cluster: Any = "local-cpu"
    data: DataConfig = field(default_factory=DataConfig)
    seq_len: int = 128
    global_batch: int = 8  # sequences per optimiser step, across all data-parallel ranks
    micro_batch: int = 8  # sequences per forward/backward on one rank
    steps: int = 200
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    optimizer: Literal["adamw", "coat_adamw"] = "adamw"
    dtype: Literal["fp32", "bf16"] = "fp32"
    seed: int = 1234
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    ckpt_every: int = 0  # 0 = only at the end
    out_dir: str = "runs/default"
    plan: Optional[str] = None  # path to a Plan YAML, "auto", or null for the default layout
    auto_profile: bool = True  # plan auto: profile these machines once (cached) and calibrate the planner with it
    tp_backend: Literal["dtensor", "megatron"] = "dtensor"
    dp_backend: Literal["torch", "deepspeed"] = "torch"
    nan_policy: Literal["stop", "skip"] = "stop"
    progress: bool = True
    keep_checkpoints: int = 3
    # accounting: FLOPs convention for MFU/HFU, energy metering (NVML + offline codecarbon), CO2
    flops_convention: Literal["palm", "megatron", "megatron2021"] = "palm"
    energy: bool = True
    energy_every: int = 50  # steps between energy/power log fields (each reading costs a few ms on the host)
    pue: float = 1.0  # 1.0 = energy at the devices; set the data centre's PUE to include facility overhead
    grid_intensity: float = 0.385  # kgCO2e per kWh (US average 2023)
    # memory savers applied to the plain model (the Plan switches per-layer savers; these are model-wide)
    meft: Optional[dict[str, Any]] = None  # MEFT reversible fine-tuning: fields of meshwright.memory.meft.MeftConfig

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        _positive(p, self, "seq_len", "global_batch", "micro_batch", "steps", "lr", "log_every", "eval_batches")
        if self.global_batch % self.micro_batch:
            raise invalid(f"{p}global_batch", self.global_batch, f"a multiple of micro_batch={self.micro_batch}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise invalid(f"{p}min_lr", self.min_lr, f"a number in [0, lr={self.lr}]")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise invalid(f"{p}warmup_steps", self.warmup_steps, f"an integer in [0, steps={self.steps}]")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise invalid(f"{p}{name}", v, "a number in [0, 1)")
        if self.weight_decay < 0:
            raise invalid(f"{p}weight_decay", self.weight_decay, "a non-negative number")
        if self.grad_clip < 0:
            raise invalid(f"{p}grad_clip", self.grad_clip, "a non-negative number (0 disables clipping)")
        if self.eval_every < 0 or self.ckpt_every < 0:
            raise invalid(f"{p}eval_every", self.eval_every, "a non-negative integer (0 disables)")
        if self.energy_every < 1:
            raise invalid(f"{p}energy_every", self.energy_every, "a positive integer (steps)")
        if self.keep_checkpoints < 1:
            raise invalid(f"{p}keep_checkpoints", self.keep_checkpoints, "a positive integer")
        from meshwright.tools.energy import validate_grid

        try:
            validate_grid(self.pue, self.grid_intensity)
        except ConfigError as exc:
            raise ConfigError(f"{p}{exc}") from None
        if self.meft is not None:
            from meshwright.memory.meft import MeftConfig

            from_dict(MeftConfig, self.meft, prefix=f"{p}meft")
        if not isinstance(self.model, (str, dict)):
            raise invalid(f"{p}model", self.model, "a preset name, a path, or a mapping of ModelConfig fields")
        if not isinstance(self.cluster, (str, dict)):
            raise invalid(f"{p}cluster", self.cluster, "a preset name, a path, or a mapping of ClusterSpec fields")


# ---- loading --------------------------------------------------------------------------------------

def preset_names(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_ROOT / kind).glob("*.yaml"))


def _resolve(kind: str, ref: str) -> Path:
    label = {"models": "model", "clusters": "cluster"}.get(kind, "train config")
    path = Path(ref)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{label}={ref!r} is not an existing file; valid: a path or one of {', '.join(preset_names(kind))}")
        return path
    preset = CONFIG_ROOT / kind / f"{ref}.yaml"
    if not preset.is_file():
        raise ConfigError(f"{label}={ref!r} is not a known preset; valid: {', '.join(preset_names(kind))} or a file path")
    return preset


HF_KEYS = {
    # Hugging Face config.json keys -> ModelConfig fields (LlamaConfig, MistralConfig, MixtralConfig, GPT2Config)
    "vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_hidden",
    "max_position_embeddings": "max_seq_len", "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta",
    "tie_word_embeddings": "tie_embeddings", "num_local_experts": "n_experts", "num_experts_per_tok": "top_k",
    "router_aux_loss_coef": "aux_loss_coef",
    "n_embd": "d_model", "n_layer": "n_layers", "n_head": "n_heads", "n_positions": "max_seq_len",
    "layer_norm_epsilon": "norm_eps", "n_inner": "ffn_hidden",
}


def model_config_from_hf(data: dict[str, Any], name: str = "hf") -> ModelConfig:
    """Map a Hugging Face ``config.json`` (Llama/Mistral/Mixtral/GPT-2) onto a ModelConfig."""
    model_type = data.get("model_type", "")
    if model_type not in ("llama", "mistral", "mixtral", "gpt2"):
        raise invalid("config.json model_type", model_type, "llama, mistral, mixtral or gpt2")
    out: dict[str, Any] = {"name": data.get("_name_or_path") or name, "arch": "gpt2" if model_type == "gpt2" else "llama"}
    for hf_key, ours in HF_KEYS.items():
        if hf_key in data and data[hf_key] is not None:
            out[ours] = data[hf_key]
    if model_type == "gpt2":
        out.setdefault("tie_embeddings", True)
        out.pop("n_kv_heads", None)
    else:
        out.setdefault("tie_embeddings", False)
    if model_type == "mixtral":
        out["moe_ffn_hidden"] = out.pop("ffn_hidden", None)
    return from_dict(ModelConfig, out, prefix="model")


def load_model_config(ref: str | dict[str, Any] | ModelConfig) -> ModelConfig:
    """Preset name, YAML path, HF config.json path, or inline mapping -> validated ModelConfig."""
    if isinstance(ref, ModelConfig):
        return ref
    if isinstance(ref, dict):
        return from_dict(ModelConfig, ref, prefix="model")
    path = _resolve("models", ref)
    data = read_mapping(path)
    if "model_type" in data:
        return model_config_from_hf(data, name=path.parent.name if path.name == "config.json" else path.stem)
    return from_dict(ModelConfig, data, prefix="model")


def load_cluster(ref: str | dict[str, Any] | ClusterSpec, nodes: int | None = None,
                 devices_per_node: int | None = None) -> ClusterSpec:
    """Preset name, path or mapping -> ClusterSpec, optionally resized to ``nodes`` x ``devices_per_node``."""
    if isinstance(ref, ClusterSpec):
        spec = ref
    elif isinstance(ref, dict):
        spec = from_dict(ClusterSpec, ref, prefix="cluster")
    else:
        spec = from_dict(ClusterSpec, read_mapping(_resolve("clusters", ref)), prefix="cluster")
    changes: dict[str, int] = {}
    if nodes is not None:
        changes["nodes"] = nodes
    if devices_per_node is not None:
        changes["devices_per_node"] = devices_per_node
    if changes:
        spec = dataclasses.replace(spec, **changes)
        spec.validate("cluster")
    return spec


def load_train_config(ref: str | Path | dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Train config from a preset name (``configs/train``), a path, or a mapping, plus dotted overrides."""
    if ref is None:
        data: dict[str, Any] = {}
    elif isinstance(ref, dict):
        data = dict(ref)
    else:
        data = read_mapping(_resolve("train", str(ref)))
    for key, value in (overrides or {}).items():
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise invalid(key, value, "a key whose parents are mappings")
        target[parts[-1]] = value
    cfg = from_dict(TrainConfig, data)
    load_model_config(cfg.model)  # fail early, with the model's own field names
    load_cluster(cfg.cluster)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is parsed as YAML (so 3e-4, true, [1,2] work)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override={text!r} is invalid; valid: KEY=VALUE, e.g. steps=100")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def config_json(obj: Any) -> str:
    return json.dumps(to_dict(obj), sort_keys=True)
