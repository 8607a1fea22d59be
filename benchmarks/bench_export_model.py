"""Before/after: does the model each export makes its consumer build equal ours? For model variants (rope scalings,
window, head shape, biases with head norms), each target's output is read by the consumer's own code and its
rotary angles compared with ours over 8192 positions ("other model from position p": the first position whose
rotation differs by more than 0.1, |e^ia - e^ib| at any frequency):

- megatron: Megatron-LM's parser + validate_args (pinned arguments.py), then megatron-core's RotaryEmbedding built
  from the parsed flags as GPTModel builds it (get_freqs_non_repeated); the window from --window-size.
- torchtitan: torchtitan's ComplexRoPE (pinned rope.py @ b5bcd76) from the exported ROPE; before ROPE existed the
  recipe's rope ran (every llama3 flavor: theta 500000, llama scaling factor 8).
- deepspeed: the JSON holds no model; whether the export says which one to build (the config.json it names is
  read by transformers: its RotaryEmbedding's inv_freq).

    python benchmarks/bench_export_model.py new
    mkdir /tmp/old && git archive 179d954 meshwright configs | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python benchmarks/bench_export_model.py old /tmp/old
"""
import dataclasses
import importlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
which = sys.argv[1]
if len(sys.argv) > 2:
    sys.path.insert(0, sys.argv[2])
sys.path[len(sys.argv) > 2:len(sys.argv) > 2] = [str(REPO / "tests")]

import torch  # noqa: E402
import transformers  # noqa: E402
from consumers.loaders import megatron_validate, torchtitan_rope  # noqa: E402
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding  # noqa: E402

import meshwright.launcher.planner.export as ex  # noqa: E402
from meshwright.config import load_model_config  # noqa: E402
from meshwright.config.hf import hf_config_from_model  # noqa: E402
from meshwright.errors import ConfigError  # noqa: E402
from meshwright.models.layers import rope_inv_freq  # noqa: E402
from meshwright.plan import plan_from_dict  # noqa: E402

SEQ = 8192
L31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
       "original_max_position_embeddings": 8192}
LONG = {"rope_type": "longrope", "original_max_position_embeddings": 4096, "attention_factor": 1.19,
        "short_factor": [1.0 + i / 64 for i in range(64)], "long_factor": [2.0 + i / 8 for i in range(64)]}
VARIANTS = {
    "llama2-70b": ("llama2-70b", {}),
    "llama3.1-70b (llama3 8/1/4/8192)": ("llama3-70b", {"rope_scaling": L31}),
    "llama3 scaling 32/1/4/4096": ("llama3-70b", {"rope_scaling": {**L31, "factor": 32.0, "original_max_position_embeddings": 4096}}),
    "llama2-7b linear x4": ("llama2-7b", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama2-7b linear x2.5": ("llama2-7b", {"rope_scaling": {"rope_type": "linear", "factor": 2.5}}),
    "mistral-like (window 4096)": ("llama2-7b", {"sliding_window": 4096}),
    "qwen3-0.6b (head_dim 128, tied)": ("qwen3-0.6b", {}),
    "qwen2.5-7b + qk_norm (both)": ("qwen2.5-7b", {"qk_norm": True}),
    "phi-4 longrope": ("phi-4", {"rope_scaling": LONG, "max_seq_len": 131072}),
}


def ours(cfg):
    return torch.outer(torch.arange(SEQ, dtype=torch.float64), rope_inv_freq(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling).double())


def diff(a, b):
    """The first position whose rotation differs by more than 0.1 (|e^ia - e^ib|, any frequency), or SEQ (none)."""
    chord = (torch.polar(torch.ones_like(a), a) - torch.polar(torch.ones_like(b), b)).abs().amax(dim=-1)
    off = (chord > 0.1).nonzero()
    return int(off[0]) if len(off) else SEQ


def fmt(d, refused=None, note=False, extra=""):
    if refused:
        return f"refused: {refused}"
    tag = "same" if d == SEQ else f"other model from position {d}"
    return tag + (", noted" if note and d < SEQ else ", silent" if d < SEQ else "") + extra


def megatron(plan, cfg):
    try:
        args, notes = ex.megatron_args(plan, cfg)
    except ConfigError as exc:
        return fmt(0, str(exc).split(" is invalid")[0])
    ns = megatron_validate(args, 8, ex.megatron_env(plan, cfg))
    rot = RotaryEmbedding(ns.kv_channels or cfg.d_model // cfg.n_heads, ns.rotary_percent,
                          seq_len_interpolation_factor=ns.rotary_seq_len_interpolation_factor, rotary_base=ns.rotary_base,
                          rope_scaling=ns.use_rope_scaling, rope_scaling_factor=ns.rope_scaling_factor,
                          use_cpu_initialization=True)
    d = diff(rot.get_freqs_non_repeated(SEQ).double(), ours(cfg))
    window = ns.window_size == ((cfg.sliding_window - 1, 0) if cfg.sliding_window else None)
    return fmt(d, note=any("another model" in n for n in notes), extra="" if window else ", window lost")


def torchtitan(plan, cfg, tt):
    try:
        settings, _, notes = ex.torchtitan_settings(plan, cfg)
    except ConfigError as exc:
        return fmt(0, str(exc).split(" is invalid")[0])
    rope = settings.get("rope", {"theta": 500000.0, "scaling": "llama"})  # before: the recipe's
    if cfg.rope_dim != cfg.head_dim:
        return "other model (partial rotary lost), silent"
    cache = tt.ComplexRoPE(tt.ComplexRoPE.Config(dim=cfg.head_dim, max_context_length=SEQ, **rope)).cache
    d = diff(cache.angle().double(), ours(cfg))
    return fmt(d, extra="" if cfg.sliding_window is None else ", window lost")


def deepspeed(plan, cfg):
    _, notes = ex.deepspeed_config(plan, cfg)
    named = next((n for n in notes if "carries no model" in n), None)
    try:
        data = hf_config_from_model(cfg)
    except ConfigError:
        return "no transformers class; " + ("the note says so" if named else "not stated")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(data))
        hf = transformers.AutoConfig.from_pretrained(tmp)
    mod = importlib.import_module(f"transformers.models.{hf.model_type}.modeling_{hf.model_type}")
    rot = next(getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding"))(hf)
    d = diff(torch.outer(torch.arange(SEQ, dtype=torch.float64), rot.inv_freq.double()), ours(cfg))
    arch = data["architectures"][0]
    return (f"{arch} named" if named else f"model not stated ({arch} would be same)") + ("" if d == SEQ else f", from {d}")


tt = torchtitan_rope()
print(f"| model ({which}) | megatron | torchtitan | deepspeed |")
print("|---|---|---|---|")
for label, (model, change) in VARIANTS.items():
    cfg = dataclasses.replace(load_model_config(model), **change)
    plan = plan_from_dict({"model": model, "seq_len": 4096, "global_batch": 256, "micro_batch": 1,
                           "layers": [{"tp": 2, "sp": True, "dp": 4, "zero": 1, "repeat": cfg.n_layers}]})
    print(f"| {label} | {megatron(plan, cfg)} | {torchtitan(plan, cfg, tt)} | {deepspeed(plan, cfg)} |")
