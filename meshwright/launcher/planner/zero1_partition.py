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


def model_params(cfg: ModelConfig, cache: dict[Any, Any]) -> tuple[dict[int, Params], dict[str, Params]]:
    """Per block index and per end module (tok_embeddings, pos_embeddings, norm, output) the parameters of ``cfg``'s
    model as the runtime builds it (on the meta device: shapes only; a tied head appears once, under the embedding),
    computed once per ``cache`` (one model's)."""
    key = ("zero1_model_params",)
    if key not in cache:
        from meshwright.models import build_model

        layers: dict[int, Params] = {}
        ends: dict[str, Params] = {}
        for name, p in build_model(cfg, device="meta").named_parameters():
            top, rest = name.split(".", 1)
            entry = (p.numel(), p.dim() >= 2)
            if top == "layers":
                layers.setdefault(int(rest.split(".", 1)[0]), []).append(entry)
            else:
                ends.setdefault(top, []).append(entry)
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
