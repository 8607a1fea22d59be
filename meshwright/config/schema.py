"""ModelConfig, ClusterSpec, TrainConfig (and the MEFT section): the dataclasses every part of meshwright reads.

Each ``validate`` raises a one-line error naming the key, the value and what would be valid
(``meshwright.errors``). Loading presets and files lives in ``presets.py``; Hugging Face mapping in ``hf.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from meshwright.config.io import from_dict, to_dict
from meshwright.errors import ConfigError, invalid
from meshwright.tools.energy import validate_grid
from meshwright.tools.flops import palm_flops_per_token


def divisors(n: int) -> list[int]:
    """Positive divisors of n, ascending (the valid degrees offered in one-line errors; the planner asks often)."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


# Upper bounds on sizes, far above any real model (Llama-3 405B: 126 layers, d_model 16384, vocab 128k) and far
# below what hangs or crashes the allocator (10^8 layers hung model construction; vocab 10^12 crashed it).
MAX_SIZES = {"vocab_size": 2**24, "d_model": 2**17, "n_layers": 10_000, "n_heads": 2**12, "n_kv_heads": 2**12,
             "ffn_hidden": 2**20, "moe_ffn_hidden": 2**20, "max_seq_len": 2**22, "n_experts": 4096, "multiple_of": 2**16,
             "attn_head_dim": 2**14}  # head_dim: 128 in every large model; 2**53 was blamed on the model as a whole
MAX_STEPS = 10**9
MAX_TOKENS_PER_STEP = 2**34
# The trainer holds every evaluation batch in memory for the whole run (int64 inputs + targets, 16 bytes a token):
# eval_batches x global_batch x seq_len tokens at most this many (4 GiB), or one batch, whichever is more.
MAX_EVAL_TOKENS = 2**28
MAX_SEED = 2**32 - 1
FLOAT32_MAX = 3.4028234663852886e38  # torch's optimizers pass lr-derived scalars to fp32 kernels
MAX_DEVICES = 2**20  # devices in one cluster (the largest runs use ~10^5); the planner searches 2**20 in ~15 s


def _at_most(prefix: str, obj: Any, bounds: dict[str, int]) -> None:
    for name, bound in bounds.items():
        value = getattr(obj, name)
        if value is not None and value > bound:
            raise invalid(f"{prefix}{name}", value, f"at most {bound:,}")


def _positive(prefix: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise invalid(f"{prefix}{name}", value, "a positive number")


ROPE_SCALING = {  # rope_type -> required keys (Hugging Face names); the values are checked to be positive
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    # Phi-3: plus short_factor/long_factor, one per rotary frequency (head_dim/2), checked by ModelConfig.validate
    "longrope": ("original_max_position_embeddings", "attention_factor"),
}


# ModelConfig fields that only Gemma sets, with the default that leaves a block Llama's; the consumers that re-implement
# part of the forward (MEFT, LeMo, the segmented loss, the Megatron-LM export) refuse a model that sets any of them
GEMMA_FIELDS = {"norm_unit_offset": False, "mlp_act": "silu", "scale_embeddings": False, "query_pre_attn_scalar": None,
                "post_norms": False, "attn_softcap": None, "final_softcap": None, "global_every": 0,
                "rope_local_theta": None}


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def validate_rope_scaling(spec: Any, key: str) -> None:
    """The rotary scalings the model implements (``meshwright.models.layers.rope_inv_freq``)."""
    kind = spec.get("rope_type", spec.get("type")) if isinstance(spec, dict) else None
    if not isinstance(kind, str) or kind not in ROPE_SCALING:  # a list here was "unhashable type"
        raise invalid(f"{key}.rope_type", kind, f"one of {', '.join(ROPE_SCALING)} (or rope_scaling: null)")
    for name in ROPE_SCALING[kind]:
        value = spec.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise invalid(f"{key}.{name}", value, f"a positive number (required by rope_type {kind})")
    if kind == "longrope":
        for name in ("short_factor", "long_factor"):
            value = spec.get(name)
            if not isinstance(value, list) or not value or not all(_positive_number(v) for v in value):
                raise invalid(f"{key}.{name}", value, "a list of positive numbers, one per rotary frequency")
    if kind == "llama3" and not spec["high_freq_factor"] > spec["low_freq_factor"]:
        raise invalid(f"{key}.high_freq_factor", spec["high_freq_factor"], f"greater than {key}.low_freq_factor={spec['low_freq_factor']}")


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
    rope_scaling: Optional[dict[str, Any]] = None  # {"rope_type": "llama3"|"linear"|"longrope", ...} (Llama 3.1, Phi-3)
    sliding_window: Optional[int] = None  # Mistral: each token sees itself and the previous window-1 tokens
    qkv_bias: bool = False  # Qwen2: biases on the q/k/v projections (not on the output projection)
    attn_head_dim: Optional[int] = None  # None = d_model / n_heads; set when a checkpoint's head_dim differs
    qk_norm: bool = False  # Qwen3: RMSNorm over each q/k head (one weight of head_dim, shared by the heads) before RoPE
    # Phi-3/Phi-4: the checkpoint fuses q/k/v (qkv_proj) and gate/up (gate_up_proj). Only the Hugging Face layout: the
    # model holds them apart either way (so tp, the savers and the planner see the usual weights)
    fused_proj: bool = False
    rotary_dim: Optional[int] = None  # None = head_dim; Phi-4-mini rotates each head's first 3/4 only (the rest as is)
    # Gemma (gemma, gemma2, gemma3_text). Each default is the Llama block, bit for bit; GEMMA_FIELDS lists them
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight), in fp32 before the cast (weights start at 0)
    mlp_act: Literal["silu", "gelu_tanh"] = "silu"  # the gated MLP's gate: SwiGLU, or GeGLU with tanh-approx. gelu
    scale_embeddings: bool = False  # token embeddings times sqrt(d_model), the factor cast to the weights' dtype
    query_pre_attn_scalar: Optional[float] = None  # scores scaled by its ** -0.5; None = head_dim's (SDPA's default)
    post_norms: bool = False  # an RMSNorm on the attention's and the MLP's outputs before each residual add
    attn_softcap: Optional[float] = None  # scores -> cap * tanh(scores / cap) (an explicit attention path, not SDPA)
    final_softcap: Optional[float] = None  # logits -> cap * tanh(logits / cap)
    global_every: int = 0  # with sliding_window: every N-th block (index N-1, 2N-1, ...) attends fully; 0 = none does
    rope_local_theta: Optional[float] = None  # rope base of the windowed blocks (unscaled); None = rope_theta/scaling
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
        _at_most(p, self, MAX_SIZES)
        if self.attn_head_dim is None and self.d_model % self.n_heads:
            raise invalid(f"{p}n_heads", self.n_heads, f"a divisor of d_model={self.d_model}: {divisors(self.d_model)}")
        if self.attn_head_dim is not None and self.attn_head_dim <= 0:
            raise invalid(f"{p}attn_head_dim", self.attn_head_dim, "a positive integer or null (d_model/n_heads)")
        if self.arch == "llama" and self.head_dim % 2:
            if self.attn_head_dim is not None:  # set apart (Qwen3's head_dim): d_model is not what is odd
                raise invalid(f"{p}attn_head_dim", self.attn_head_dim, "an even integer or null (rotary embeddings "
                              "rotate pairs of a head's dimensions)")
            raise invalid(f"{p}d_model", self.d_model, "d_model/n_heads must be even for rotary embeddings")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise invalid(f"{p}sliding_window", self.sliding_window, "a positive number of tokens or null (full causal)")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise invalid(f"{p}rotary_dim", self.rotary_dim, f"an even number in 2..head_dim={self.head_dim} or null "
                          f"(every dimension)")
        if self.rope_scaling is not None:
            validate_rope_scaling(self.rope_scaling, f"{p}rope_scaling")
            for name in ("short_factor", "long_factor"):
                value = self.rope_scaling.get(name)
                kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
                if kind == "longrope" and len(value) * 2 != self.rope_dim:
                    raise invalid(f"{p}rope_scaling.{name}", f"{len(value)} numbers",
                                  f"rotary_dim/2={self.rope_dim // 2} numbers (one per rotary frequency)")
        if self.arch == "gpt2" and (self.rope_scaling is not None or self.qkv_bias or self.attn_head_dim is not None
                                    or self.qk_norm or self.fused_proj):
            raise invalid(f"{p}arch", self.arch, "'llama' for rope_scaling, qkv_bias, attn_head_dim, qk_norm or "
                          "fused_proj (gpt2 blocks have none)")
        self._validate_gemma(p)
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
        # MoE fields are range-checked on dense models too: a typo there is silently ignored otherwise
        if self.top_k < 1:
            raise invalid(f"{p}top_k", self.top_k, "a positive integer (experts per token)")
        if self.moe_ffn_hidden is not None and self.moe_ffn_hidden <= 0:
            raise invalid(f"{p}moe_ffn_hidden", self.moe_ffn_hidden, "a positive integer or null (ffn_hidden)")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise invalid(f"{p}capacity_factor", self.capacity_factor, "a positive number or null (no dropping)")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise invalid(f"{p}{name}", getattr(self, name), "a non-negative number (0 disables it)")
        if self.n_experts:
            if self.moe_every > self.n_layers:
                raise invalid(f"{p}moe_every", self.moe_every, f"at most n_layers={self.n_layers} (no block would get "
                              f"experts), or n_experts=0 for a dense model")
            if not 1 <= self.top_k <= self.n_experts:
                raise invalid(f"{p}top_k", self.top_k, f"an integer in [1, n_experts={self.n_experts}]")
            if self.arch != "llama":
                raise invalid(f"{p}arch", self.arch, "'llama' for MoE models (SwiGLU experts)")

    def _validate_gemma(self, p: str) -> None:
        """Gemma's fields: caps, scalars and bases positive and finite; the window pattern needs a window."""
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and not _positive_number(value):
                raise invalid(f"{p}{name}", value, "null or a finite positive number")
        if self.mlp_act not in ("silu", "gelu_tanh"):
            raise invalid(f"{p}mlp_act", self.mlp_act, "silu (SwiGLU) or gelu_tanh (GeGLU)")
        if isinstance(self.global_every, bool) or not isinstance(self.global_every, int) or self.global_every < 0:
            raise invalid(f"{p}global_every", self.global_every, "0 (no full-attention blocks among windowed ones) or "
                          "a positive integer N (every N-th block attends fully)")
        if self.global_every and self.sliding_window is None:
            raise invalid(f"{p}global_every", self.global_every, "0 without sliding_window (it picks the blocks that "
                          "attend fully among windowed ones)")
        if self.global_every > self.n_layers:
            raise invalid(f"{p}global_every", self.global_every, f"at most n_layers={self.n_layers}, or 0")
        if self.rope_local_theta is not None and not self.global_every:
            raise invalid(f"{p}rope_local_theta", self.rope_local_theta, "null unless global_every > 0 (the base of "
                          "the windowed blocks, beside the full-attention blocks' rope_theta)")
        if self.rope_local_theta is not None and self.rotary_dim is not None:
            raise invalid(f"{p}rotary_dim", self.rotary_dim, "null with rope_local_theta (Gemma 3 rotates every "
                          "dimension)")
        gemma = self.gemma_fields()
        if gemma and self.arch == "gpt2":
            raise invalid(f"{p}{gemma[0]}", getattr(self, gemma[0]), f"{GEMMA_FIELDS[gemma[0]]!r} with arch gpt2 "
                          f"(Gemma's settings are for llama-style blocks)")
        if self.mlp_act != "silu" and self.n_experts:
            raise invalid(f"{p}mlp_act", self.mlp_act, "silu with n_experts > 0 (the experts are SwiGLU)")

    def gemma_fields(self) -> list[str]:
        """The Gemma fields (GEMMA_FIELDS) this model sets off their Llama default."""
        return [name for name, default in GEMMA_FIELDS.items() if getattr(self, name) != default]

    def refuse_gemma(self, who: str, prefix: str = "model") -> None:
        """One line naming the first Gemma field set, for ``who``: a consumer that computes Llama's blocks itself and
        would otherwise train or describe another model than this one, silently."""
        fields = self.gemma_fields()
        if fields:
            name = fields[0]
            raise invalid(f"{prefix}.{name}", getattr(self, name), f"{GEMMA_FIELDS[name]!r} for {who}, which does not "
                          f"compute Gemma's {', '.join(fields)}")

    def is_global_layer(self, index: int) -> bool:
        """Whether block ``index`` attends fully although the model has a sliding window (``global_every``)."""
        return self.global_every > 0 and (index + 1) % self.global_every == 0

    def layer_window(self, index: int) -> int | None:
        """The sliding window of block ``index``: None where it attends fully."""
        return None if self.is_global_layer(index) else self.sliding_window

    @property
    def attn_scale(self) -> float | None:
        """The scores' scale when ``query_pre_attn_scalar`` sets it apart, else None (1/sqrt(head_dim))."""
        return None if self.query_pre_attn_scalar is None else float(self.query_pre_attn_scalar) ** -0.5

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.attn_head_dim if self.attn_head_dim is not None else self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """The leading dimensions of each q/k head that RoPE rotates (``rotary_dim``, else all of them)."""
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim

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
        qo = 2 * d * self.n_heads * hd
        kv = 2 * d * self.kv_heads * hd
        bias = (3 * d + d) if self.arch == "gpt2" else (self.n_heads + 2 * self.kv_heads) * hd if self.qkv_bias else 0
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

    def block_norms(self) -> int:
        """Norms of d_model per block: before attention and MLP, and (``post_norms``, Gemma 2/3) after each."""
        return 4 if self.post_norms else 2

    def qk_norm_params(self) -> int:
        """q_norm + k_norm of one block (Qwen3): one head_dim weight each, shared by all heads."""
        return 2 * self.head_dim if self.qk_norm else 0

    def layer_params(self, index: int, active_only: bool = False) -> int:
        mlp = self.moe_mlp_params(active_only) if self.is_moe_layer(index) else self.dense_mlp_params()
        return self.attention_params() + mlp + self.block_norms() * self.norm_params() + self.qk_norm_params()

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
        """Training FLOPs per token, PaLM convention (the formula lives in ``meshwright.tools.flops``)."""
        return palm_flops_per_token(self, seq_len if seq_len is not None else self.max_seq_len)


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
    # device-memory bandwidth (GB/s, datasheet) where the device name does not say it, e.g. an H100 96 GB
    # with HBM2e; null = known from the device name
    memory_bw_gbps: Optional[float] = None
    # sustained clock under the site's power cap as a fraction of boost (peak FLOP/s scale with it); 1 = none
    clock_fraction: float = 1.0
    sources: dict[str, str] = field(default_factory=dict)

    DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        _positive(p, self, "nodes", "devices_per_node", "memory_gib", "tdp_w", "intra_node_bw_gbps", "inter_node_bw_gbps",
                  "memory_bw_gbps")
        if self.host_power_w < 0:
            raise invalid(f"{p}host_power_w", self.host_power_w, "a non-negative number of W per node")
        if self.devices_per_node > MAX_DEVICES:  # named itself, not as "nodes=1 is invalid"
            raise invalid(f"{p}devices_per_node", self.devices_per_node, f"at most {MAX_DEVICES:,} devices in all")
        if self.nodes * self.devices_per_node > MAX_DEVICES:  # 10^9 nodes hung the planner enumerating divisors
            raise invalid(f"{p}nodes", self.nodes, f"at most {MAX_DEVICES:,} devices in all (nodes x devices_per_node="
                          f"{self.devices_per_node})")
        if not 0.0 < self.clock_fraction <= 1.0:
            raise invalid(f"{p}clock_fraction", self.clock_fraction, "a number in (0, 1] (sustained / boost clock)")
        if self.idle_w < 0 or self.idle_w > self.tdp_w:
            raise invalid(f"{p}idle_w", self.idle_w, f"a number in [0, tdp_w={self.tdp_w}]")
        for name in ("intra_node_latency_us", "inter_node_latency_us"):
            if getattr(self, name) < 0:
                raise invalid(f"{p}{name}", getattr(self, name), "a non-negative number")
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
class MixtureSource:
    """One data set of a blend (``data.mixture``): ``path`` as ``data.path`` takes it, ``weight`` its share of the
    sequences (weights are relative: 0.7/0.3 and 7/3 blend alike)."""

    path: str
    weight: float = 1.0

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if not isinstance(self.path, str) or not self.path:
            raise invalid(f"{p}path", self.path, "a prepared data directory, 'default' or an instruction .jsonl file")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight) \
                or self.weight <= 0:
            raise invalid(f"{p}weight", self.weight, "a positive finite number (weights are relative)")


@dataclass
class DataConfig:
    """Where tokens come from. ``path: default`` is the embedded corpus (Python stdlib sources); a ``.jsonl``
    file of prompt/response or chat examples trains on the responses only. ``tokenizer``: byte, bpe, or the
    path of a pretrained model's ``tokenizer.json`` (or of its directory)."""

    path: str = "default"
    tokenizer: str = "byte"
    val_fraction: float = 0.05
    max_files: Optional[int] = 400
    # several data sets blended by weight (data/blend.py), instead of ``path``: [{path: web, weight: 0.7}, ...]
    mixture: Optional[list[MixtureSource]] = None
    # also evaluate each source of the mixture alone (eval_loss_per_source in the log): eval_batches more per source;
    # one data set (data.path, or a mixture of one source) is its own blend: its eval_loss, nothing evaluated twice
    eval_per_source: bool = False

    def source_labels(self) -> list[str]:
        """How eval_loss_per_source and tokens_per_source name each source: its path, as configured."""
        return [s.path for s in self.mixture] if self.mixture else [self.path]

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        if self.mixture is not None:
            if not self.mixture:
                raise invalid(f"{p}mixture", self.mixture, "at least one source {path: ..., weight: ...}, or null")
            if self.path != "default":  # 'default' is also the unset value: a path and a mixture cannot both be meant
                raise invalid(f"{p}path", self.path, f"left unset (default) when {p}mixture is given: {p}path and "
                              f"{p}mixture are both set; give one")
            for i, src in enumerate(self.mixture):
                src.validate(f"{p}mixture[{i}]")
                first = next(k for k, s in enumerate(self.mixture) if s.path == src.path)
                if first != i:
                    raise invalid(f"{p}mixture[{i}].path", src.path, f"a data set not already listed (it is "
                                  f"{p}mixture[{first}]; raise that weight instead)")
            if not math.isfinite(sum(s.weight for s in self.mixture)):  # each weight's share would be w/inf = 0
                big = max(range(len(self.mixture)), key=lambda i: self.mixture[i].weight)
                raise invalid(f"{p}mixture[{big}].weight", self.mixture[big].weight, "weights whose sum is a finite "
                              "number (weights are relative: 1 and 1 blend as 1e308 and 1e308 would)")
        if not 0.0 < self.val_fraction < 0.5:
            raise invalid(f"{p}val_fraction", self.val_fraction, "a number in (0, 0.5)")
        if self.max_files is not None and self.max_files <= 0:
            raise invalid(f"{p}max_files", self.max_files, "a positive integer or null")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise invalid(f"{p}tokenizer", self.tokenizer, "byte, bpe, or the path of a Hugging Face tokenizer.json")


@dataclass
class TrainConfig:
    """One training run: what model, on which data, for how long, with which optimiser settings."""

    model: Any = "tiny"  # preset name, path to YAML/HF config.json, or an inline ModelConfig mapping
    init_from: Optional[str] = None  # Hugging Face model directory (config.json + safetensors): start from its weights
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
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast with fp32 master weights, on CPU too (train/precision.py)
    compile: bool = False  # torch.compile per transformer block and the loss (train/compile.py)
    # what compile covers: "blocks" (each block, then head + loss) or "model" (the whole forward, head and loss as one
    # graph; an experiment for one process, dense models, no recompute/savers/loss chunks; the planner does not model it)
    compile_scope: Literal["blocks", "model"] = "blocks"
    loss_chunk_tokens: int = 0  # >0: head + loss per chunk of this many tokens, no full logits (models/chunked_loss.py)
    seed: int = 1234
    # a GPT-2 model's learned position table at a model.max_seq_len above the one its weights (a checkpoint on resume,
    # init_from) were trained with: null refuses in one line; "copy" repeats the trained rows (Longformer),
    # "interpolate" resamples the table; its AdamW moments grow alike (models/positions.py)
    grow_positions: Optional[Literal["copy", "interpolate"]] = None
    # initial weights: "stream" (one CPU RNG stream, module by module: every earlier run's values), "keyed" (each
    # parameter tile drawn on its device from (seed, name, tile): shards drawn alone, fast for 7B-70B), "auto":
    # keyed on CUDA, stream on CPU (CPU trajectories unchanged). models/init.py says why.
    init: Literal["auto", "stream", "keyed"] = "auto"
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
    max_skipped: int = 10  # nan_policy=skip: stop (non-zero exit) once more steps than this were skipped
    progress: bool = True
    keep_checkpoints: int = 3
    # write checkpoints in the background: the step waits only for a copy of the state in CPU memory (pinned on CUDA),
    # the disk write, checksums, rename and `latest` follow while training continues (train/async_checkpoint.py)
    ckpt_async: bool = False
    # ckpt_async's staged CPU copy of the state: "keep" it between saves (reused: no new pinned buffers per save, one
    # more copy of the state in host memory for the whole run), "free" it once each write is on disk, "auto": keep on
    # CUDA (pinned), free on CPU (train/async_checkpoint.py)
    ckpt_staging: Literal["auto", "keep", "free"] = "auto"
    # seconds the scheduler leaves between its stop signal (SIGTERM/SIGUSR1) and SIGKILL (torchrun: 30; Slurm: the
    # --signal lead). The trainer warns once when a stop (the steps to the next boundary + a checkpoint) would take
    # longer, and then decides a stop at the first step boundary (train/preemption.py); 0: no such check
    preempt_grace_s: float = 30.0
    # signals that stop the run after the same step on every rank, with a checkpoint there, exit 143 (requeue and
    # --resume): SIGTERM (schedulers; torchrun passes it on), SIGUSR1 (Slurm --signal), SIGHUP (a dropped SSH
    # connection hangs up the terminal). Also valid: SIGUSR2 (submitit's), SIGQUIT; [] keeps every default action
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGHUP"])
    # accounting: FLOPs convention for MFU/HFU, energy metering (NVML + offline codecarbon), CO2
    flops_convention: Literal["palm", "megatron", "megatron2021"] = "palm"
    energy: bool = True
    energy_every: int = 50  # steps between energy/power log fields (each reading costs a few ms on the host)
    pue: float = 1.0  # 1.0 = energy at the devices; set the data centre's PUE to include facility overhead
    grid_intensity: float = 0.385  # kgCO2e per kWh (US average 2023)
    # memory savers applied to the plain model (the Plan switches per-layer savers; these are model-wide)
    meft: Optional[dict[str, Any]] = None  # MEFT reversible fine-tuning: fields of meshwright.memory.meft.MeftConfig
    # LoRA fine-tuning (memory/lora.py): the base frozen, rank-r adapters on the named linears train (docs/finetune.md)
    lora: Optional["LoraConfig"] = None
    # logging sinks beside log.jsonl (optional extras, imported only when on): TensorBoard event files in
    # OUT_DIR/tensorboard; a Weights & Biases run ("offline" writes OUT_DIR/wandb for `wandb sync`; "online" uploads)
    tensorboard: bool = False
    wandb: Optional[Literal["offline", "online"]] = None
    wandb_project: str = "meshwright"

    def _validate_preempt_signals(self, p: str) -> None:
        from meshwright.train.preemption import STOPPABLE

        valid = f"a list of {', '.join(STOPPABLE)} (each once), or [] for none"
        if not isinstance(self.preempt_signals, list):
            raise invalid(f"{p}preempt_signals", self.preempt_signals, valid)
        for i, name in enumerate(self.preempt_signals):
            if name not in STOPPABLE or self.preempt_signals.index(name) != i:
                hint = (" (SIGINT is Ctrl-C's: it stops in the step, without a new checkpoint)" if name == "SIGINT"
                        else "")
                raise invalid(f"{p}preempt_signals[{i}]", name, valid + hint)

    def validate(self, prefix: str = "") -> None:
        p = f"{prefix}." if prefix else ""
        _positive(p, self, "seq_len", "global_batch", "micro_batch", "steps", "lr", "eps", "log_every", "eval_batches")
        if not self.out_dir.strip():
            raise invalid(f"{p}out_dir", self.out_dir, "a directory path (an empty one would write into the working directory)")
        if self.wandb is not None and not self.wandb_project.strip():
            raise invalid(f"{p}wandb_project", self.wandb_project, "a non-empty W&B project name")
        if self.global_batch % self.micro_batch:
            raise invalid(f"{p}global_batch", self.global_batch, f"a multiple of micro_batch={self.micro_batch}")
        _at_most(p, self, {"steps": MAX_STEPS, "seq_len": MAX_SIZES["max_seq_len"], "global_batch": 2**24})
        if self.global_batch * self.seq_len > MAX_TOKENS_PER_STEP:
            raise invalid(f"{p}global_batch", self.global_batch, f"at most {MAX_TOKENS_PER_STEP:,} tokens per step "
                          f"(global_batch*seq_len) with seq_len={self.seq_len}")
        # eval_per_source holds eval_batches more per source of the mixture
        sources = len(self.data.source_labels())
        sets = 1 + (sources if self.data.eval_per_source and sources > 1 else 0)
        most_eval = max(1, MAX_EVAL_TOKENS // (self.global_batch * self.seq_len * sets))
        if self.eval_batches > most_eval:  # 10^9 built batches at the first eval until memory ran out (30 s to 3 GB)
            raise invalid(f"{p}eval_batches", self.eval_batches, f"at most {most_eval:,} with global_batch="
                          f"{self.global_batch}{', seq_len=' if sets > 1 else ' and seq_len='}{self.seq_len}"
                          f"{' and data.eval_per_source' if sets > 1 else ''} (the trainer holds every evaluation batch in "
                          f"memory: at most {MAX_EVAL_TOKENS:,} tokens, {MAX_EVAL_TOKENS * 16 / 2**30:.0f} GiB of inputs "
                          f"and targets)")
        if not 0 <= self.seed <= MAX_SEED:
            raise invalid(f"{p}seed", self.seed, f"an integer in [0, {MAX_SEED}]")
        if self.max_skipped < 0:
            raise invalid(f"{p}max_skipped", self.max_skipped, "a non-negative integer (skipped NaN steps tolerated)")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise invalid(f"{p}min_lr", self.min_lr, f"a number in [0, lr={self.lr}]")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise invalid(f"{p}warmup_steps", self.warmup_steps, f"an integer in [0, steps={self.steps}]")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise invalid(f"{p}{name}", v, "a number in [0, 1)")
        if self.lr / (1.0 - self.beta1) > FLOAT32_MAX:  # lr 1e300 was torch's "value cannot be converted to type
            # float without overflow" traceback at the first step, not a divergence into nan_policy
            raise invalid(f"{p}lr", self.lr, f"at most {FLOAT32_MAX * (1.0 - self.beta1):.3g} with beta1={self.beta1} "
                          f"(AdamW's first step lr/(1-beta1) must fit a float32)")
        if self.weight_decay < 0:
            raise invalid(f"{p}weight_decay", self.weight_decay, "a non-negative number")
        if self.grad_clip < 0:
            raise invalid(f"{p}grad_clip", self.grad_clip, "a non-negative number (0 disables clipping)")
        for name in ("eval_every", "ckpt_every"):
            if getattr(self, name) < 0:
                raise invalid(f"{p}{name}", getattr(self, name), "a non-negative integer (0 disables)")
        if self.loss_chunk_tokens < 0:
            raise invalid(f"{p}loss_chunk_tokens", self.loss_chunk_tokens, "0 (plain loss) or a positive number of tokens")
        if self.compile_scope == "model" and (not self.compile or self.loss_chunk_tokens):
            raise invalid(f"{p}compile_scope", self.compile_scope, "'blocks', or 'model' with compile: true and "
                          f"loss_chunk_tokens: 0 (here compile={self.compile}, loss_chunk_tokens={self.loss_chunk_tokens})")
        if self.energy_every < 1:
            raise invalid(f"{p}energy_every", self.energy_every, "a positive integer (steps)")
        if self.keep_checkpoints < 1:
            raise invalid(f"{p}keep_checkpoints", self.keep_checkpoints, "a positive integer")
        if self.ckpt_staging != "auto" and not self.ckpt_async:  # free/keep of a copy only async saves make
            raise invalid(f"{p}ckpt_staging", self.ckpt_staging, "'auto', or 'keep'/'free' with ckpt_async: true (the "
                          "staged copy is ckpt_async's; a synchronous save keeps none)")
        if not (isinstance(self.preempt_grace_s, (int, float)) and 0 <= self.preempt_grace_s < float("inf")):
            raise invalid(f"{p}preempt_grace_s", self.preempt_grace_s, "a non-negative number of seconds (0 disables "
                          "the check)")
        self._validate_preempt_signals(p)
        try:
            validate_grid(self.pue, self.grid_intensity)
        except ConfigError as exc:
            raise ConfigError(f"{p}{exc}") from None
        if self.meft is not None:
            from_dict(MeftConfig, self.meft, prefix=f"{p}meft")
        if self.lora is not None:
            if self.meft is not None:
                raise invalid(f"{p}lora", "set", "null when meft is set (one fine-tuning method per run)")
            self.lora.validate(f"{p}lora")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            raise invalid(f"{p}init_from", self.init_from, "null or the path of a Hugging Face model directory")
        if self.lora is not None and self.lora.init_adapter is not None and self.init_from is None:
            raise invalid(f"{p}init_from", None, f"the Hugging Face directory of the base model the adapter "
                          f"lora.init_adapter={self.lora.init_adapter!r} was trained on (an adapter only adds to "
                          f"its base)")
        if not isinstance(self.model, (str, dict)):
            raise invalid(f"{p}model", self.model, "a preset name, a path, or a mapping of ModelConfig fields")
        if not isinstance(self.cluster, (str, dict)):
            raise invalid(f"{p}cluster", self.cluster, "a preset name, a path, or a mapping of ClusterSpec fields")


# LoRA targets in meshwright's module names -> the Llama-family Hugging Face names (PEFT's target_modules). GPT-2
# fuses wq/wk/wv into attn.c_attn; wo is attn.c_proj, w1 mlp.c_fc, w2 mlp.c_proj there (no w3).
LORA_TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w3": "up_proj",
                "w2": "down_proj"}
# targets on MoE blocks' stacked experts, in PEFT's target_parameters spelling (transformers' fused expert weights)
# -> the meshwright weights each adapts (memory/lora.py ExpertAdapter: gate_up's one A serves w1 and w3)
LORA_EXPERT_TARGETS = {"experts.gate_up_proj": ("w1", "w3"), "experts.down_proj": ("w2",)}
# modules trained in full beside the adapters (PEFT's modules_to_save) -> their Llama-family Hugging Face names
LORA_SAVABLE = {"output": "lm_head", "tok_embeddings": "embed_tokens"}
LORA_CHECKPOINTS = ("adapters", "full")


@dataclass
class LoraConfig:
    """LoRA fine-tuning (``lora:`` section of a train config): every linear named in ``targets`` gets
    y = x W^T + (alpha / rank) * B A x with W frozen, A (rank x in) kaiming-uniform, B (out x rank) zero; only A, B
    (and the modules in ``modules_to_save``) train. Names are meshwright's (``LORA_TARGETS`` maps them to HF's)."""

    rank: int = 8
    alpha: Optional[float] = None  # scale = alpha / rank; null = rank (scale 1)
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    dropout: float = 0.0  # on the adapter's input only, as PEFT's lora_dropout
    modules_to_save: list[str] = field(default_factory=list)  # trained in full too: output, tok_embeddings
    # what a checkpoint holds: "adapters" (the trained tensors, their optimizer state and a reference to the frozen
    # base: init_from + fingerprint, or the seed it was drawn from; train/lora_base.py) or "full" (the base too)
    checkpoint: str = "adapters"
    # a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors: one from the Hub or from
    # `meshwright export --peft`) the adapters start from instead of A drawn and B zero; needs init_from (its base).
    # rank, alpha, targets and modules_to_save must equal the adapter's; dropout and checkpoint stay this run's
    # (train/peft_init.py). A resume from a checkpoint of this run takes precedence: the adapter is only the start.
    init_adapter: Optional[str] = None

    @property
    def scale(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha) / self.rank

    def validate(self, prefix: str = "lora") -> None:
        p = f"{prefix}." if prefix else ""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_SIZES["d_model"]:
            raise invalid(f"{p}rank", self.rank, f"a positive integer, at most {MAX_SIZES['d_model']:,} (and at most "
                          f"each target's min(in, out))")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise invalid(f"{p}alpha", self.alpha, "a finite number > 0 (scale = alpha / rank), or null (= rank)")
        names = [*LORA_TARGETS, *LORA_EXPERT_TARGETS]
        if not isinstance(self.targets, list) or not self.targets:
            raise invalid(f"{p}targets", self.targets, f"a non-empty list of {', '.join(names)}")
        ours = {v: k for k, v in LORA_TARGETS.items()}
        for i, t in enumerate(self.targets):
            if t not in names:
                hint = f" (meshwright's name for {t} is {ours[t]})" if t in ours else ""
                expert = [e for e in LORA_EXPERT_TARGETS if isinstance(t, str) and t.endswith(e.split(".")[-1])]
                if expert and not hint:
                    hint = f" (an expert weight is named as PEFT's target_parameters end: {expert[0]})"
                raise invalid(f"{p}targets[{i}]", t, f"one of {', '.join(names)}{hint}")
            if self.targets.index(t) != i:
                raise invalid(f"{p}targets[{i}]", t, "a module not already listed")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise invalid(f"{p}dropout", self.dropout, "a number in [0, 1)")
        experts = [t for t in self.targets if t in LORA_EXPERT_TARGETS]
        if experts and self.dropout:
            raise invalid(f"{p}dropout", self.dropout, f"0 with expert targets ({', '.join(experts)}): PEFT's "
                          f"target_parameters adapters take no dropout, and neither do ours")
        if not isinstance(self.modules_to_save, list):
            raise invalid(f"{p}modules_to_save", self.modules_to_save, f"a list of {', '.join(LORA_SAVABLE)} (or [])")
        for i, m in enumerate(self.modules_to_save):
            if m not in LORA_SAVABLE:
                hint = {v: f" (meshwright's name for {v} is {k})" for k, v in LORA_SAVABLE.items()}.get(m, "")
                raise invalid(f"{p}modules_to_save[{i}]", m, f"one of {', '.join(LORA_SAVABLE)}{hint}")
            if self.modules_to_save.index(m) != i:
                raise invalid(f"{p}modules_to_save[{i}]", m, "a module not already listed")
        if self.init_adapter is not None and (not isinstance(self.init_adapter, str) or not self.init_adapter):
            raise invalid(f"{p}init_adapter", self.init_adapter, "null or the path of a PEFT LoRA adapter directory "
                          "(adapter_config.json + adapter_model.safetensors)")
        if self.checkpoint not in LORA_CHECKPOINTS:
            raise invalid(f"{p}checkpoint", self.checkpoint, f"one of {', '.join(LORA_CHECKPOINTS)} (adapters: the "
                          f"trained tensors and a reference to the base; full: the base weights too)")


Variant = Literal["meft1", "meft2", "meft3"]
VARIANTS: tuple[str, ...] = ("meft1", "meft2", "meft3")
PAPER_SCALE = 0.1


@dataclass
class MeftConfig:
    """How to convert a model; round-trips through YAML (``meft:`` section of a train config)."""

    variant: Variant = "meft1"
    scale: float = PAPER_SCALE  # λ for meft1, β for meft2, λ=β for meft3 (the paper's 0.1)
    adapter_dim: int = 16
    reversible_layers: int | None = None  # top N layers reversible; None = safe default for the dtype
    adapter_dropout: float = 0.0
    adapter_init_std: float = 0.02  # down-projection init; the up-projection always starts at zero
    freeze_base: bool = True
    train_head: bool = True
    track_error: bool = False  # keep the stack input and log the reconstruction error of every backward
    compute_dtype: Optional[Literal["fp64", "fp32", "bf16", "fp16"]] = None  # for the safe default; None = params' dtype
    tolerance: float = 1e-3  # the safe default keeps the measured reconstruction error of the stack input below this
    guard_every: int = 50  # with the safe default: every N-th backward measures the error, one layer leaves the
    #                        reversible set while it exceeds ``tolerance`` (0 = never: conversion-time check only)

    def validate(self, prefix: str = "meft", n_layers: int | None = None) -> None:
        if self.variant not in VARIANTS:
            raise invalid(f"{prefix}.variant", self.variant, " | ".join(VARIANTS))
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) \
                or self.scale <= 0:
            what = {"meft1": "λ", "meft2": "β", "meft3": "λ=β"}[self.variant]
            raise invalid(f"{prefix}.scale", self.scale, f"a finite number > 0 ({what} of {self.variant}; paper: 0.1)")
        if isinstance(self.adapter_dim, bool) or not isinstance(self.adapter_dim, int) or self.adapter_dim <= 0 \
                or self.adapter_dim > MAX_SIZES["d_model"]:  # 2**53 was an allocator failure after the model was built
            raise invalid(f"{prefix}.adapter_dim", self.adapter_dim, f"a positive integer, at most "
                          f"{MAX_SIZES['d_model']:,} (adapter bottleneck width)")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise invalid(f"{prefix}.adapter_dropout", self.adapter_dropout, "a number in [0, 1)")
        if self.adapter_init_std < 0:
            raise invalid(f"{prefix}.adapter_init_std", self.adapter_init_std, "a number >= 0")
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) \
                or not math.isfinite(self.tolerance) or self.tolerance <= 0:
            raise invalid(f"{prefix}.tolerance", self.tolerance, "a finite number > 0 (relative reconstruction error)")
        if isinstance(self.guard_every, bool) or not isinstance(self.guard_every, int) or self.guard_every < 0:
            raise invalid(f"{prefix}.guard_every", self.guard_every, "an integer >= 0 (backward steps; 0 = off)")
        if self.reversible_layers is not None:
            bad = isinstance(self.reversible_layers, bool) or not isinstance(self.reversible_layers, int) \
                or self.reversible_layers < 0 or (n_layers is not None and self.reversible_layers > n_layers)
            if bad:
                upto = f"0..{n_layers}" if n_layers is not None else ">= 0"
                raise invalid(f"{prefix}.reversible_layers", self.reversible_layers, f"null (safe default) or an integer {upto}")

    @property
    def lam(self) -> float:
        return 1.0 if self.variant == "meft2" else float(self.scale)

    @property
    def beta(self) -> float:
        return 1.0 if self.variant == "meft1" else float(self.scale)

    @property
    def swap(self) -> bool:
        return self.variant != "meft3"

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MeftConfig":
        return from_dict(cls, data, prefix="meft")
