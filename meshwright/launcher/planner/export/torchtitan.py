"""Plan -> torchtitan job config (TOML)."""

from __future__ import annotations

from meshwright.config import ModelConfig
from meshwright.launcher.planner.export.common import _uniform
from meshwright.plan import Plan


def torchtitan_toml(plan: Plan, cfg: ModelConfig) -> tuple[str, list[str]]:
    """torchtitan job-config TOML sections: [parallelism], [training], [activation_checkpoint]."""
    notes: list[str] = []
    s = _uniform(plan, notes)
    pp = plan.pipeline
    replicate, shard, reshard = (s.dp, 1, None) if s.zero == 0 else (1, s.dp, "never" if s.zero in (1, 2) else "default")
    if s.dp_shard:  # HSDP: torchtitan's replicate x shard data-parallel mesh
        replicate, shard = s.dp // s.dp_shard, s.dp_shard
    if s.zero in (1, 2):
        notes.append("torchtitan has no ZeRO-1/2: exported FSDP with reshard_after_forward='never' (ZeRO-2-like)")
    sched = {"1f1b": "1F1B", "gpipe": "GPipe", "interleaved_1f1b": "Interleaved1F1B"}[pp.schedule]
    lines = ["[parallelism]", f"data_parallel_replicate_degree = {replicate}", f"data_parallel_shard_degree = {shard}",
             f"tensor_parallel_degree = {s.tp}", "context_parallel_degree = 1",
             f"pipeline_parallel_degree = {pp.degree}"]
    if pp.degree > 1:
        lines += [f'pipeline_parallel_schedule = "{sched}"', f"pipeline_parallel_microbatch_size = {plan.micro_batch}"]
        if pp.schedule == "interleaved_1f1b":
            lines.append(f"pipeline_parallel_layers_per_stage = {cfg.n_layers // (pp.degree * pp.virtual_stages)}")
    if reshard:
        lines.append(f'fsdp_reshard_after_forward = "{reshard}"')
    if s.tp > 1:
        lines.append(f"disable_loss_parallel = {'false' if s.sp else 'true'}")
    if cfg.n_experts:
        lines.append(f"expert_parallel_degree = {max(x.ep for x in plan.layer_strategies())}")
    lines += ["", "[training]", f"global_batch_size = {plan.global_batch}",
              f"local_batch_size = {plan.global_batch // s.dp}", f"seq_len = {plan.seq_len}",
              "", "[activation_checkpoint]", f'mode = "{s.recompute}"']
    if s.recompute == "selective":
        lines.append('selective_ac_option = "op"')
    return "\n".join(lines) + "\n", notes
