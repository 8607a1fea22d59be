"""Does a Plan file fit the train config it is run with?

A Plan is made for one model, sequence length and batch split (``meshwright plan --seq-len ... --global-batch
...``); its layout is validated and its memory predicted for those numbers. The runtimes, however, read the
train config's values: a plan for seq 4096 run at seq 8192 went OOM with no hint, a plan for llama2-7b run on
gpt2 failed deep inside torch. So a Plan file is compared with the train config once, before anything is built,
and every mismatch that changes memory or layout validity is refused in one line naming the field.

Refused: the model's layout-shaping fields, ``seq_len``, ``micro_batch``, ``global_batch`` (it fixes the
pipeline's microbatch count and the divisibility by each layer's dp; the run directory keeps the plan and its
predictions for ``meshwright report``), the device count, and FP8 (COAT) optimizer states trained by plain
AdamW (8 bytes of state a parameter where the plan counted about 2.2). Fine: everything the Plan does not record (steps, lr, data,
schedule, checkpointing, ...). ``--plan auto`` plans are made from the config and are not checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshwright.config import ModelConfig, TrainConfig, load_model_config
from meshwright.errors import ConfigError, invalid
from meshwright.plan import Plan

# What decides the layout's validity (tp/ep divisibility, layer count) and the predicted memory (the cost model
# also reads arch's activation coefficients, head_dim, qk_norm's saved activations, Gemma's post norms, (1 + w) norms
# and capped attention scores and logits, and an MoE layer's top_k and capacity_factor).
SHAPE_FIELDS = ("n_layers", "d_model", "n_heads", "kv_heads", "ffn_dim", "vocab_size", "n_experts", "moe_every",
                "expert_ffn_dim", "arch", "head_dim", "qk_norm", "post_norms", "norm_unit_offset", "attn_softcap",
                "final_softcap", "top_k", "capacity_factor")
MOE_FIELDS = ("moe_every", "expert_ffn_dim", "top_k", "capacity_factor")


def model_shape(cfg: ModelConfig) -> dict[str, Any]:
    """The fields that decide a layout's validity and predicted memory (SHAPE_FIELDS; MoE ones on MoE models)."""
    shape = {name: getattr(cfg, name) for name in SHAPE_FIELDS}
    if not cfg.n_experts:  # MoE-only fields mean nothing on a dense model
        for name in MOE_FIELDS:
            shape.pop(name)
    return shape


def _resolve(ref: Any, cfg: TrainConfig) -> ModelConfig | None:
    """The plan's model, or None when its name is no preset or file here (a plan made on another machine).
    With ``init_from``, the checkpoint directory's name is its config.json (what ``meshwright plan --model
    DIR/config.json`` records), read before any preset of the same name."""
    if cfg.init_from is not None and isinstance(ref, str) and ref == Path(cfg.init_from).name:
        config_json = Path(cfg.init_from) / "config.json"
        if config_json.is_file():
            ref = str(config_json)
    try:
        return load_model_config(ref)
    except (ConfigError, OSError):
        if isinstance(ref, dict):
            raise
        return None


def check_model(plan: Plan, cfg: TrainConfig, model: ModelConfig) -> None:
    """By name when both sides name a model (a different name is still fine when it resolves to the same
    shape); by the layout-shaping fields when either side is a mapping (or the names differ). A plan named
    after ``init_from``'s directory is that config.json; one whose name is no preset or file here is taken by
    name when the train model (a named mapping) has that very name."""
    train_named = not isinstance(cfg.model, dict)  # a preset/path, or init_from's config.json
    if isinstance(plan.model, str) and train_named and plan.model == model.name:
        return
    theirs = _resolve(plan.model, cfg)
    if theirs is None and isinstance(plan.model, str) and plan.model == model.name != "custom":
        return  # a named mapping planned from its YAML (the file records the name): both sides name one model
    if theirs is None:
        raise invalid("plan.model", plan.model, f"{model.name!r}, the train config's model (re-plan with `meshwright "
                      f"plan --model {model.name} ...`, or train the plan's model)")
    mine, planned = model_shape(model), model_shape(theirs)
    for name in SHAPE_FIELDS:
        if planned.get(name) != mine.get(name):
            raise invalid(f"plan.model.{name}", planned.get(name),
                          f"{mine.get(name)}, the train model's ({model.name}) {name}: the plan was made for "
                          f"another model (re-plan with `meshwright plan --model ...` for this one)")


def check_numbers(plan: Plan, cfg: TrainConfig) -> None:
    """seq_len, micro_batch, global_batch: what the plan's memory and microbatch count were computed for."""
    flags = {"seq_len": "--seq-len", "micro_batch": "--micro-batch", "global_batch": "--global-batch"}
    for name, flag in flags.items():
        planned, train = getattr(plan, name), getattr(cfg, name)
        if planned != train:
            raise invalid(f"plan.{name}", planned, f"{train}, the train config's {name} (re-plan with `meshwright plan "
                          f"... {flag} {train}`, or set {name}={planned} in the train config)")


def check_world(plan: Plan, world_size: int, ref: str) -> None:
    """The plan's device count is this run's process count (one process runs only a one-device plan)."""
    n = plan.world_size()
    if n == world_size:
        return
    if world_size == 1:
        raise invalid("plan", ref, f"a plan for this process count: it lays the model out on {n} devices; launch it "
                      f"with torchrun --nproc-per-node {n} (or `meshwright launch`)")
    raise invalid("plan", ref, f"a plan for this run's {world_size} processes: it lays the model out on {n} device(s) "
                  f"(tp*dp*cp x pipeline.degree); launch {n} process(es), or re-plan for {world_size} devices")


def check_optimizer(plan: Plan, cfg: TrainConfig) -> None:
    if plan.optimizer.states == "fp8" and cfg.optimizer != "coat_adamw":
        raise invalid("plan.optimizer.states", "fp8", f"fp32 with optimizer={cfg.optimizer!r} (the plan counted COAT's "
                      f"FP8 states, about 2.2 bytes a parameter; AdamW holds 8), or set optimizer: coat_adamw")


def check_plan_matches(plan: Plan, cfg: TrainConfig, model: ModelConfig, world_size: int | None, ref: str) -> None:
    """Refuse (one line) a Plan file that was made for another model, batch split, length or (given
    ``world_size``) device count."""
    check_model(plan, cfg, model)
    check_numbers(plan, cfg)
    check_optimizer(plan, cfg)
    if world_size is not None:
        check_world(plan, world_size, ref)


def plan_memory_warning(plan: Plan, device_bytes: int) -> str | None:
    """One line when the Plan's predicted peak (``predicted.memory_gib``, per pipeline stage) is above what this
    device holds: a plan made for a larger card (an 80 GB preset's plan on a 40 GB A100, a budget given by hand)
    would run out of memory only after the model is built, minutes in. A warning, not a refusal: the prediction is a
    model, and the run may still be what the user wants to try."""
    predicted = plan.predicted.get("memory_gib")
    peak = max(predicted, default=None) if isinstance(predicted, list) else predicted  # [] passes validate_plan
    have = device_bytes / 2**30
    if peak is None or peak <= have:
        return None
    return (f"warning: the plan predicts a peak of {peak:.1f} GiB per device and this device holds {have:.1f} GiB: "
            f"expect an out-of-memory error; plan for this card with `meshwright plan --memory-budget-gib "
            f"{have:.1f}` (or `profile hardware` and `--hardware-profile`), or train with `--plan auto`")
