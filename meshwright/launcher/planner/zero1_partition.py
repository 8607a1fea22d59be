"""What meshwright's ZeRO-1 holds per rank: ``ZeroRedundancyOptimizer`` partitions whole parameters, not bytes.

The runtime's ZeRO-1 (parallel/data_parallel.py ``zero1_optimizer``) is one ``ZeroRedundancyOptimizer`` over each
pipeline stage's dp group and all of that stage's trainable parameters, the embedding and head included (the plan's
``embedding.zero`` 0 leaves their weights replicated, not their states). Its partition (torch's
``_partition_parameters``) walks the param groups in order (the runtime's: matrices, then vectors), each group's
parameters largest first, and gives each parameter whole to the rank holding the fewest elements so far (the first
such rank). Shards are uneven: a rank holds at least the largest parameter (a vocabulary-sized embedding), and the
largest rank's share, not ``total / dp``, is what must fit. ``stage_state_numels`` gives that share per pipeline
rank; ``cost_model.zero1_states_correction`` puts it in place of the per-layer ``/ dp`` count.
"""

from __future__ import annotations

from typing import Any

from meshwright.config import ModelConfig

Params = list[tuple[int, bool]]  # (numel, is a matrix: the runtime's decayed group)


def partition_numels(groups: list[list[int]], dp: int) -> list[int]:
    """Elements per rank under ZeroRedundancyOptimizer's greedy partition of ``groups`` (numels per param group)."""
    sizes = [0] * dp
    for group in groups:
        for n in sorted(group, reverse=True):
            r = sizes.index(min(sizes))  # the first rank with the fewest, as torch's _get_min_index
            sizes[r] += n
    return sizes


def block_params(cfg: ModelConfig, index: int) -> Params:
    """Block ``index``'s parameters as the runtime builds them (models/decoder.py, models/layers.py, models/moe.py):
    the norms (GPT-2's LayerNorms with a bias), q/k/v/o (their biases: GPT-2 all four, Qwen2's q/k/v), Qwen3's q/k
    head norms, and the MLP (GPT-2's two linears with biases, the gated three, or an MoE's router and stacked
    experts). Derived from the config, not a built model, so the planner stays free of torch (tests/unit/
    test_import_cost.py); tests/unit/test_zero1_partition.py checks it against a model built on the meta device."""
    d, hq, kv, hd = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.head_dim
    gpt2 = cfg.arch == "gpt2"
    norm = [(d, False), (d, False)] if gpt2 else [(d, False)]
    out: Params = norm * cfg.block_norms()
    out += [(hq * d, True), (kv * d, True), (kv * d, True), (d * hq, True)]
    if gpt2:
        out += [(hq, False), (kv, False), (kv, False), (d, False)]
    elif cfg.qkv_bias:
        out += [(hq, False), (kv, False), (kv, False)]
    if cfg.qk_norm:
        out += [(hd, False), (hd, False)]
    if cfg.is_moe_layer(index):
        e, fe = cfg.n_experts, cfg.expert_ffn_dim
        out += [(e * d, True)] + [(e * fe * d, True)] * 3
    elif gpt2:
        f = cfg.ffn_dim
        out += [(f * d, True), (f, False), (d * f, True), (d, False)]
    else:
        out += [(cfg.ffn_dim * d, True)] * 3
    return out


def model_params(cfg: ModelConfig, cache: dict[Any, Any]) -> tuple[dict[int, Params], dict[str, Params]]:
    """Per block index and per end module (tok_embeddings, pos_embeddings, norm, output) the parameters of ``cfg``'s
    model as the runtime builds it (a tied head appears once, under the embedding; ``block_params``), computed once
    per ``cache`` (one model's)."""
    key = ("zero1_model_params",)
    if key not in cache:
        d = cfg.d_model
        layers = {i: block_params(cfg, i) for i in range(cfg.n_layers)}
        ends: dict[str, Params] = {"tok_embeddings": [(cfg.vocab_size * d, True)],
                                   "norm": [(d, False), (d, False)] if cfg.arch == "gpt2" else [(d, False)]}
        if cfg.arch == "gpt2":
            ends["pos_embeddings"] = [(cfg.max_seq_len * d, True)]
        if not cfg.tie_embeddings:
            ends["output"] = [(cfg.vocab_size * d, True)]
        cache[key] = (layers, ends)
    return cache[key]


def stage_state_numels(cfg: ModelConfig, plan: Any, dp: int, cache: dict[Any, Any]) -> list[int]:
    """Per pipeline rank, the elements of the largest dp rank's ZeRO-1 share (its chunks' blocks, the embedding on
    the first stage, final norm and head on the last; looped chunk placement as ``pipeline.stage_ids``)."""
    key = ("zero1_stage_numels", tuple(plan.stage_ranges(cfg.n_layers)), plan.pipeline.degree, dp)
    if key in cache:
        return cache[key]
    layers, ends = model_params(cfg, cache)
    ranges = plan.stage_ranges(cfg.n_layers)
    pp, n_stages = plan.pipeline.degree, len(ranges)
    out = []
    for r in range(pp):
        ids = range(r, n_stages, pp)
        held: Params = [e for i in ids for j in range(*ranges[i]) for e in layers.get(j, [])]
        if 0 in ids:
            held += ends.get("tok_embeddings", []) + ends.get("pos_embeddings", [])
        if n_stages - 1 in ids:
            held += ends.get("norm", []) + ends.get("output", [])
        groups = [[n for n, mat in held if mat], [n for n, mat in held if not mat]]
        out.append(max(partition_numels(groups, dp)))
    cache[key] = out
    return out
