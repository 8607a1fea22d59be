"""Everything `meshwright train` does before the first step, once: resolve the model and cluster, the Plan
(a file, ``auto`` or none), validate it, pick the runtime (one process or the distributed one), then run
the Trainer. ``run_training`` is the Python entry point (tests, benchmarks); the CLI adapter is thin."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from meshwright.config import ClusterSpec, ModelConfig, TrainConfig, load_cluster, load_model_config
from meshwright.config.io import from_dict, to_dict, write_yaml
from meshwright.config.schema import LoraConfig
from meshwright.data.loader import build_loaders
from meshwright.errors import invalid
from meshwright.launcher.planner.auto import auto_plan
from meshwright.launcher.profiling.auto import auto_profiles, describe
from meshwright.memory.lora import apply_lora_config
from meshwright.memory.lora_cost import EXPERT_TARGETS, ep_rank_state_bytes
from meshwright.memory.meft import MeftConfig, make_reversible
from meshwright.models import build_model, from_pretrained
from meshwright.models.capped_flex import capped_path_note
from meshwright.models.init import resolve_init
from meshwright.models.positions import check_rule_applies
from meshwright.parallel.runtime import build_distributed_runtime, init_distributed
from meshwright.parallel.support import check_deepspeed_train, check_runtime_support
from meshwright.parallel.teardown import release_frames, shutdown
from meshwright.plan import Plan, default_plan, load_plan, validate_plan
from meshwright.tools.sinks import check_sink_packages
from meshwright.train.local_runtime import LocalRuntime
from meshwright.train.checkpoint import latest_checkpoint, require_complete
from meshwright.train.compile import MODEL_SCOPE_SUPPORTED
from meshwright.train.hf_companions import save_companions
from meshwright.train.lora_base import check_base_present
from meshwright.train.peft_init import check_init_adapter
from meshwright.train.plan_match import check_plan_matches, check_world, plan_memory_warning
from meshwright.train.run_dir import (RunLock, check_fresh_or_overwrite, check_resume_config, dirs_to_create, nospace,
                                     prepare_out_dir, remove_unused)
from meshwright.train.runtime import Runtime
from meshwright.train.trainer import Trainer


@dataclass
class TrainingJob:
    """A train config with its references resolved once: the model, the cluster and the Plan (if any)."""

    cfg: TrainConfig
    model: ModelConfig
    cluster: ClusterSpec
    world_size: int
    plan: Plan | None = None
    plan_ref: str | None = None  # where the Plan came from: a path, "auto", or None

    @classmethod
    def resolve(cls, cfg: TrainConfig, plan_ref: str | None = None) -> "TrainingJob":
        job = cls(cfg, resolve_model_config(cfg), load_cluster(cfg.cluster), world_size_from_env())
        ref = plan_ref if plan_ref is not None else cfg.plan
        job.plan = _auto_plan(job) if ref == "auto" else load_plan_file(ref)
        if job.plan is not None and ref != "auto":  # a file made for other numbers: refused before anything is built
            check_plan_matches(job.plan, cfg, job.model, None, ref)  # the device count: in build_runtime
        if job.plan is not None:
            _warn_if_plan_exceeds_device(job.plan)
        job.plan_ref = ref
        return job

    @property
    def distributed(self) -> bool:
        """Under torchrun with several ranks, or when the Plan asks for more than one device or for per-layer
        features that only the distributed runtime applies."""
        return self.world_size > 1 or _plan_needs_parallel(self.plan)


def _warn_if_plan_exceeds_device(plan: Plan) -> None:
    """Rank 0, on a GPU (a plan's predicted memory is per GPU; CPU ranks share the host's): one line when the plan
    predicts more than the device holds (plan_match.plan_memory_warning)."""
    import torch

    if not torch.cuda.is_available() or int(os.environ.get("RANK", "0")) != 0:
        return
    warning = plan_memory_warning(plan, device_memory_bytes())
    if warning:
        print(f"meshwright train: {warning}", file=sys.stderr, flush=True)


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    """The model: ``cfg.model``, or with ``init_from`` the checkpoint's config.json (a ``model`` mapping then
    overrides fields such as max_seq_len or dropout; a shape it changes fails when the weights load)."""
    if cfg.init_from is None:
        if isinstance(cfg.model, str) and Path(cfg.model).is_dir():  # the weights would be dropped without a word
            raise invalid("model", cfg.model, f"init_from: {cfg.model} to fine-tune that checkpoint's weights, or "
                          f"model: {Path(cfg.model) / 'config.json'} to train its architecture from random weights")
        return load_model_config(cfg.model)
    config_json = Path(cfg.init_from) / "config.json"
    if not config_json.is_file():
        raise invalid("init_from", cfg.init_from, "a Hugging Face model directory with config.json and model*.safetensors")
    base = load_model_config(str(config_json))
    if isinstance(cfg.model, dict):
        return from_dict(ModelConfig, {**to_dict(base), **cfg.model}, prefix="model")
    if cfg.model != TrainConfig.model:
        raise invalid("model", cfg.model, f"unset or a mapping of overrides when init_from is set (the model is {config_json})")
    return base


def world_size_from_env() -> int:
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise invalid("WORLD_SIZE", raw, "an integer (set by torchrun)") from None


def load_plan_file(ref: str | None) -> Plan | None:
    if ref is None:
        return None
    if not Path(ref).is_file():
        raise invalid("plan", ref, "'auto' or the path of an existing Plan YAML/JSON file")
    return load_plan(ref)


def _auto_plan(job: TrainingJob) -> Plan:
    """The planner's best layout for this world, calibrated with (cached) profiles of these machines
    when ``auto_profile`` is on; under torchrun the process group starts here, as profiling is collective."""
    hw_prof = model_prof = None
    if job.cfg.auto_profile:
        if job.world_size > 1:
            init_distributed()
        hw_prof, model_prof = auto_profiles(job.model, job.world_size, job.cfg.seq_len, job.cfg.micro_batch,
                                            progress=False, dtype=job.cfg.dtype, lora=job.cfg.lora)
        if int(os.environ.get("RANK", "0")) == 0:
            print(describe(hw_prof, model_prof), flush=True)
    return auto_plan(job.cfg, job.world_size, hardware_profile=hw_prof, model_profile=model_prof, model=job.model,
                     memory_budget_gib=_gpu_budget_gib(job.cluster, hw_prof))


def _gpu_budget_gib(cluster: ClusterSpec, hw_prof: dict | None) -> float | None:
    """On a GPU, the memory its device 0 holds where that is below what the planner would assume (the cluster
    preset's, or a profile's): a train config naming an 80 GB preset on a 40 GB card, or ``auto_profile: false``, or
    a cached profile from before profiles recorded it, planned for memory the card does not have. Every rank reads
    the same device, so every rank plans the same layout. None elsewhere (CPU ranks share the host's memory)."""
    import torch

    from meshwright.launcher.planner.cost_model import device_memory_gib

    if not torch.cuda.is_available():
        return None
    have = device_memory_bytes() / 2**30
    return have if have < device_memory_gib(cluster, hw_prof) else None


def _plan_needs_parallel(plan: Plan | None) -> bool:
    return plan is not None and (plan.world_size() > 1 or _layer_parallel_feature(plan) is not None)


def _layer_parallel_feature(plan: Plan) -> str | None:
    """The first per-layer feature of ``plan`` that only the distributed runtime applies, as ``layers[i].name=value``
    (for one-line errors), or None."""
    for i, s in enumerate(plan.layer_strategies()):
        for name, value in (("recompute", s.recompute != "none" and s.recompute), ("zero", s.zero),
                            ("savers.fp8_act", s.savers.fp8_act), ("savers.wta_crs", s.savers.wta_crs),
                            ("savers.lemo", s.savers.lemo)):
            if value:
                return f"layers[{i}].{name}={value!r}"
    return None


def _parallel_feature(plan: Plan) -> str:
    """What makes ``plan`` need the distributed runtime: a per-layer feature, else its device count."""
    return _layer_parallel_feature(plan) or f"its {plan.world_size()} devices"


def _process_group_possible() -> bool:
    """A process group can start: one is up, or torchrun's rendezvous variables are set."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True
    return all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"))


def _model_scope_obstacle(job: TrainingJob) -> str:
    """Why ``compile_scope: model`` cannot apply to this job (said in its one-line refusal)."""
    if job.model.n_experts:
        return f"an MoE model, n_experts={job.model.n_experts}"
    if job.world_size > 1:
        return f"the distributed runtime, world size {job.world_size}"
    return "the distributed runtime, a Plan with recompute, ZeRO or per-layer savers (they wrap the blocks)"


TRAIN_BYTES_PER_PARAM = 16  # fp32 weights + gradients + AdamW's two moments


def device_memory_bytes() -> int:
    """Memory of one device this process trains on: the GPU's, else the host's physical RAM."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_memory(model_cfg: ModelConfig, world_size: int, available: int | None = None, frozen_base: bool = False,
                 micro_tokens: int = 0, loss_chunk_tokens: int = 0, lora: LoraConfig | None = None,
                 ep: int = 1) -> None:
    """Up-front sanity check, before any allocation: refuse (one line) a model whose weights, gradients and AdamW
    state (weights alone for a frozen base, as MEFT trains) could not fit even spread evenly over every device
    (a vocab of 10^12 used to crash the allocator); then a micro-batch of ``micro_tokens`` tokens whose
    activations could not fit either: a lower bound (the logits, or one chunk of them, and each block's input, at
    2 bytes a value, spread over every device), so only hopeless micro-batches are refused, never a real one.
    With ``lora``: the base's and adapters' weights, gradients and AdamW state of the trainable parameters only; under
    expert parallelism (``ep``: ``lora_plan_ep``) what one rank of an ep group holds (``ep_rank_state_bytes``: its
    1/ep of the frozen experts, the attention, router, ends and adapters whole, replicated over the group), which
    the world/ep ranks holding the same experts (tp, pp, the expert-data-parallel replicas) split at most that many
    ways."""
    world = max(world_size, 1)
    if lora is not None:
        state = ep_rank_state_bytes(model_cfg, lora, ep)
        total = state["weights"] + state["grads"] + state["optimizer"]
        per_param = round(total / model_cfg.num_params(), 2)
        world = max(world // ep, 1)  # ep = 1: spread over every device, as before
    else:
        per_param = 4 if frozen_base else TRAIN_BYTES_PER_PARAM
        total = model_cfg.num_params() * per_param
    need = total / world
    have = available if available is not None else device_memory_bytes()
    if need > have:
        raise invalid("model", model_cfg.name, f"a model that fits: {model_cfg.num_params():,} params need about "
                      f"{need / 2**30:,.1f} GiB per device ({per_param} bytes per parameter for training) over {world_size} "
                      f"device(s); one device here has {have / 2**30:,.1f} GiB")
    logits = min(micro_tokens, loss_chunk_tokens or micro_tokens) * model_cfg.vocab_size
    act = (logits + micro_tokens * model_cfg.n_layers * model_cfg.d_model) * 2 / world
    if need + act > have:
        raise invalid("micro_batch", f"{micro_tokens:,} tokens per micro-batch",
                      f"fewer: their activations alone need at least {act / 2**30:,.1f} GiB per device beside "
                      f"{need / 2**30:,.1f} GiB of weights and optimizer state; one device here has {have / 2**30:,.1f} "
                      f"GiB (lower micro_batch or seq_len, or set loss_chunk_tokens)")


def lora_plan_ep(plan: Plan | None) -> int:
    """The expert-parallel degree ``check_memory`` counts a LoRA run's rank at: the plan's largest ep where every
    layer and the ends are at ZeRO-0 (nothing then shards the replicated part over data parallelism, as the ep LoRA
    runs of tests/distributed/ep_parity.py hold it); 1 otherwise (ZeRO-1/2/3 may spread the replicated part over the
    whole dp group, and the even spread over every device is the bound)."""
    if plan is None:
        return 1
    layers = plan.layer_strategies()
    if plan.embedding.zero or any(s.zero for s in layers):
        return 1
    return max((s.ep for s in layers), default=1)


def check_positions(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """``seq_len`` within the model's positions and ``grow_positions`` a rule its arch has: for both runtimes (under
    torchrun a longer seq_len failed deep in the model) and for ``meshwright launch`` before any host starts."""
    if cfg.seq_len > model_cfg.max_seq_len:
        raise invalid("seq_len", cfg.seq_len, f"at most model.max_seq_len={model_cfg.max_seq_len} ({_raise_hint(model_cfg)})")
    check_rule_applies(cfg.grow_positions, model_cfg.arch)


def check_distributed_run(cfg: TrainConfig, model_cfg: ModelConfig | None, plan: Plan | None) -> None:
    """What the distributed runtime refuses for this config and ``plan`` (None: ``plan: auto``, not chosen yet: what
    any layout refuses; ``model_cfg`` is read only with a plan), without a process group: by ``build_runtime`` and by
    ``meshwright launch`` before any host starts (commands/train.py ``preflight``), where each rank of each host used
    to fail on its own."""
    if cfg.meft is not None:
        raise invalid("meft", "set", "null under the distributed runtime (MEFT runs in one process; DDP is tested "
                      "at the module level in tests/distributed/test_meft_ddp.py)")
    if plan is not None and model_cfg is not None:  # the DeepSpeed runtime runs tp 1 only: its tp backend is unused
        check_runtime_support(plan, model_cfg, cfg.tp_backend if cfg.dp_backend == "torch" else "dtensor",
                              cfg.dp_backend)
    if cfg.lora is not None:  # before DeepSpeed's own refusals: with lora, dp_backend itself is the one to change
        check_lora_layout(cfg, plan)
    check_deepspeed_train(cfg, plan, cfg.init_from)


def check_lora_layout(cfg: TrainConfig, plan: Plan | None) -> None:
    """What the distributed runtime runs with ``lora:``, each tested for parity with one process (eager; compile is
    tested in one process): data parallelism (DDP, FSDP2 at ZeRO-2/3, ZeRO-1) of the torch backend, tensor
    parallelism of both backends (DTensor +sp, parallel/tensor_parallel.py; megatron-core, parallel/megatron_lora.py;
    A and B sharded as PEFT/Megatron do) and pipeline stages, alone or with dp, and expert parallelism with attention
    targets (adapters replicated over the ep group like the attention they sit on, reduced over dp) and the experts'
    own targets ``experts.gate_up_proj`` / ``experts.down_proj`` (ExpertAdapter rows sharded with their experts,
    reduced over the edp group; tests/distributed/ep_parity.py lora_experts rows); router and base frozen. Refused
    in one line: the dense MLP's linear targets (w1/w2/w3) under ep (``EXPERT_TARGETS``: the experts are adapted
    through ``experts.*``), and FP8 GEMMs (they replace the adapted linears' matmuls)."""
    strategies = plan.layer_strategies() if plan is not None else []  # None: plan auto, the layout-free checks
    if cfg.compile:
        raise invalid("compile", True, "false with lora under the distributed runtime (compiled LoRA blocks are tested "
                      "in one process only)")
    if cfg.dp_backend != "torch":
        raise invalid("dp_backend", cfg.dp_backend, "torch with lora (DistributedRuntime applies the adapters)")
    expert_targets = [t for t in cfg.lora.targets if t in EXPERT_TARGETS] if cfg.lora is not None else []
    for i, s in enumerate(strategies):
        if s.ep > 1 and expert_targets:
            raise invalid("lora.targets", cfg.lora.targets, f"attention (wq, wk, wv, wo) or expert targets "
                          f"(experts.gate_up_proj, experts.down_proj) with layers[{i}].ep={s.ep}: the MLP's "
                          f"{', '.join(expert_targets)} are not supported under ep (adapt the experts as experts.*, "
                          f"or set ep to 1)")
        if s.ep > 1 and s.zero >= 2 and cfg.lora is not None and any(t.startswith("experts.") for t in cfg.lora.targets):
            raise invalid("lora.targets", cfg.lora.targets, f"attention targets (wq, wk, wv, wo) with layers[{i}].ep="
                          f"{s.ep} and zero={s.zero} (expert adapters are not FSDP-sharded over edp), or zero 0")
        if s.savers.fp8_act:
            raise invalid(f"layers[{i}].savers.fp8_act", s.savers.fp8_act, "false with lora (FP8 GEMMs replace the "
                          "adapted linears' matmuls)")
        if s.savers.wta_crs is not None:
            raise invalid(f"layers[{i}].savers.wta_crs", s.savers.wta_crs, "null with lora in the trainer (WTA-CRS on "
                          "LoRA linears is a library composition: memory/wta_crs.py)")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package
        return False


def check_backends_installed(cfg: TrainConfig, plan: Plan) -> None:
    """The optional stacks a distributed run names must be importable here (the GPU image lacks deepspeed and
    megatron-core): said before the process group starts and the model is built, not as an ImportError deep in it."""
    if cfg.dp_backend == "deepspeed" and not _installed("deepspeed"):
        raise invalid("dp_backend", cfg.dp_backend, "torch, or install deepspeed on every host")
    if cfg.tp_backend == "megatron" and any(s.tp > 1 for s in plan.layer_strategies()) \
            and not _installed("megatron.core"):
        raise invalid("tp_backend", cfg.tp_backend, "dtensor, or install megatron-core on every host")


def build_runtime(train_cfg: TrainConfig | TrainingJob, plan_ref: str | None = None, *,
                  adapter_start: bool = True) -> Runtime:
    """LocalRuntime for one process; the distributed runtime under torchrun or when the plan needs it.
    The Plan is validated once: here for one process, by the distributed runtime otherwise. ``adapter_start``: with
    ``lora.init_adapter``, start the adapters from it (checked first: train/peft_init.py); False when a checkpoint
    will be loaded over them (a resume), which then needs no adapter directory."""
    job = train_cfg if isinstance(train_cfg, TrainingJob) else TrainingJob.resolve(train_cfg, plan_ref)
    cfg, model_cfg = job.cfg, job.model
    if cfg.lora is not None and cfg.lora.init_adapter is not None:
        if adapter_start:
            note = check_init_adapter(cfg)
            if note and int(os.environ.get("RANK", "0")) == 0:
                print(note, file=sys.stderr, flush=True)
        else:
            cfg = replace(cfg, lora=replace(cfg.lora, init_adapter=None))
    check_memory(model_cfg, job.world_size, frozen_base=cfg.meft is not None, micro_tokens=cfg.micro_batch * cfg.seq_len,
                 loss_chunk_tokens=cfg.loss_chunk_tokens, lora=cfg.lora, ep=lora_plan_ep(job.plan))
    check_positions(cfg, model_cfg)
    if job.plan is not None:  # a plan for another device count: said here, not as tp*dp*cp deep in the runtime
        check_world(job.plan, job.world_size, str(job.plan_ref))
    if cfg.compile_scope == "model" and (job.distributed or model_cfg.n_experts):
        raise invalid("compile_scope", "model", f"{MODEL_SCOPE_SUPPORTED} (here: "
                      f"{_model_scope_obstacle(job)})")
    if job.distributed:
        plan = job.plan or default_plan(model_cfg, job.world_size, cfg.seq_len, cfg.global_batch, cfg.micro_batch)
        check_backends_installed(cfg, plan)
        check_distributed_run(cfg, model_cfg, plan)
        if not _process_group_possible():  # was torch's "environment variable RANK expected"
            if job.plan is None:
                raise invalid("WORLD_SIZE", job.world_size, "1, or the rendezvous variables torchrun sets (MASTER_ADDR, "
                              "MASTER_PORT, RANK) beside it")
            raise invalid("plan", str(job.plan_ref), f"a plan run under torchrun: {_parallel_feature(job.plan)} is applied "
                          f"by the distributed runtime, which needs a process group; launch it with torchrun "
                          f"--nproc-per-node {job.plan.world_size()} (or `meshwright launch`)")
        return build_distributed_runtime(cfg, model_cfg, plan, init_from=cfg.init_from)
    import torch

    if job.plan is not None:
        validate_plan(job.plan, model_cfg, job.plan.world_size())
    if cfg.meft is not None and (cfg.compile or cfg.loss_chunk_tokens):
        raise invalid("compile" if cfg.compile else "loss_chunk_tokens", cfg.compile or cfg.loss_chunk_tokens,
                      "false/0 with meft (the reversible model is neither compiled nor split at the head)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the values every layout starts from: one CPU stream, or keyed draws on the device itself (models/init.py)
    scheme = resolve_init(cfg.init, device)
    if cfg.init_from is not None:  # pretrained weights, nothing drawn, before any saver wraps the modules
        torch.manual_seed(cfg.seed)  # later consumers (dropout, saver seeds) start where an initialised run's do
        model = from_pretrained(cfg.init_from, device=device, cfg=model_cfg, grow_positions=cfg.grow_positions)
        scheme = "pretrained"
    else:
        model = build_model(model_cfg, seed=cfg.seed, init=scheme, device=device if scheme == "keyed" else None)
    if cfg.meft is not None:  # reversible fine-tuning: frozen base, adapters (+ head) train
        model = make_reversible(model, config=from_dict(MeftConfig, cfg.meft, prefix="meft"))
    if cfg.lora is not None:  # after the weights (drawn or pretrained), before the runtime: base frozen, adapters train
        apply_lora_config(model, cfg.lora, cfg.seed)
        if cfg.lora.init_adapter is not None:  # a PEFT adapter's values over the drawn ones (train/peft_init.py)
            from meshwright.train.peft_import import load_peft_adapter

            load_peft_adapter(model, model_cfg, cfg.lora.init_adapter)
    rt = LocalRuntime(model, device=device, dtype=cfg.dtype,  # bf16 is honoured on CPU too (train/precision.py)
                      compile_backend="inductor" if cfg.compile else None, loss_chunk_tokens=cfg.loss_chunk_tokens,
                      compile_scope=cfg.compile_scope)
    rt.plan = job.plan
    rt.init = scheme
    return rt


def _raise_hint(model_cfg: ModelConfig) -> str:
    """How to raise a model's max_seq_len: RoPE tables follow it; a learned table grows only by grow_positions."""
    if model_cfg.arch == "gpt2":
        return ("or raise model.max_seq_len; a gpt2 model's learned position table trained at fewer positions grows "
                "with grow_positions=copy or interpolate")
    return "or raise model.max_seq_len: its rotary tables follow it"


def run_training(train_cfg: TrainConfig, plan_ref: str | None = None, resume: bool | str = False, *,
                 overwrite: bool = False, allow_config_change: bool = False) -> dict[str, Any]:
    """Everything `meshwright train` does, callable from Python (tests, benchmarks). The main rank holds a lock
    on out_dir for the whole run and applies the fresh/resume/overwrite rules of ``run_dir`` first, before
    anything expensive (``plan: auto`` profiles the machines)."""
    if isinstance(resume, str):  # a wrong --resume-from fails before the run creates or builds anything
        require_complete(Path(resume))
    check_sink_packages(train_cfg.tensorboard, train_cfg.wandb)
    lock, created, done = None, [], False
    if int(os.environ.get("RANK", "0")) == 0:
        created = dirs_to_create(train_cfg.out_dir)
        out = prepare_out_dir(train_cfg.out_dir)
        lock = RunLock(out).acquire()
    try:
        if lock is not None:
            check_fresh_or_overwrite(train_cfg.out_dir, resume, overwrite)
            check_resume_config(train_cfg, resume, allow_config_change)
            if resume and train_cfg.lora is not None:  # an adapter-only checkpoint's base must be there to rebuild
                check_base_present(train_cfg, resume_target(train_cfg, resume))
        job = TrainingJob.resolve(train_cfg, plan_ref)
        summary = _train(job, resume, allow_config_change)
        done = True
        return summary
    except OSError as exc:
        err = nospace(exc)
        if err is None:
            raise
        raise err from None
    finally:
        if lock is not None:
            lock.release()
            if not done:  # refused input: a directory this run created holds only the lock; remove it
                remove_unused(created)


def resume_target(cfg: TrainConfig, resume: bool | str) -> Path | None:
    """The checkpoint a resume will try first: ``--resume-from``'s, or the latest under out_dir/ckpt."""
    return Path(resume) if isinstance(resume, str) else latest_checkpoint(Path(cfg.out_dir) / "ckpt")


def _train(job: TrainingJob, resume: bool | str, allow_config_change: bool = False) -> dict[str, Any]:
    train_cfg, model_cfg = job.cfg, job.model
    runtime: Runtime | None = None
    trainer: Trainer | None = None
    try:
        # a resume's checkpoint takes precedence over lora.init_adapter: the adapter is read only for a fresh start
        resuming = bool(resume) and resume_target(train_cfg, resume) is not None
        runtime = build_runtime(job, adapter_start=not resuming)  # a layout that fails half-built goes before the group
        progress = train_cfg.progress and runtime.is_main
        train, val, ds = build_loaders(train_cfg, model_cfg.vocab_size, runtime.dp_rank, runtime.dp_size, progress)
        if runtime.is_main:
            print(f"train: model {model_cfg.name} ({model_cfg.num_params() / 1e6:.2f}M params) | data {ds.path} "
                  f"({len(ds):,} tokens) | {train_cfg.steps} steps x {train_cfg.global_batch}x{train_cfg.seq_len} tokens | "
                  f"{type(runtime).__name__}, world {runtime.world_size} | out {train_cfg.out_dir}", flush=True)
            for note in getattr(train, "repeat_notes", lambda n: [])(train_cfg.steps * train_cfg.global_batch):
                print(note, flush=True)
            if model_cfg.attn_softcap is not None:  # the path the planner assumed too (cost_model.capped_scores)
                print(capped_path_note(train_cfg.compile, runtime.device.type, True, model_cfg.dropout), flush=True)
        trainer = Trainer(train_cfg, runtime, train, val, model_cfg, job.cluster)
        trainer.allow_data_change = allow_config_change
        data_dir = ds.datasets[0].path if hasattr(ds, "datasets") else ds.path  # a mixture's sources share a tokenizer
        return trainer.fit(resume=resume, before_steps=lambda: _write_run_files(job, runtime, data_dir))
    except BaseException as exc:
        release_frames(exc)  # its frames (DDP.forward, fit, a half-built runtime) would keep the wrappers past teardown
        raise
    finally:
        # normal end, error, peer lost, preemption (fit returned), elastic restart (the next attempt is a new process):
        # every holder of a process group goes first, DDP's Reducer before all (parallel/teardown.py)
        shutdown(trainer, runtime)


def _write_run_files(job: TrainingJob, runtime: Runtime, data_dir: Path | None = None) -> None:
    """Main rank: config.yaml, model.yaml (resolved: init_from, overrides; `export` reads it) and plan.yaml (for
    `report`). Written once the resume has loaded: a resume refused by the checkpoint (another model under
    --allow-config-change, another seq_len) used to leave them describing the refused config, and `export` of the
    run then read its checkpoints into the wrong model."""
    if not runtime.is_main:
        return
    out = Path(job.cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(job.cfg, out / "config.yaml")
    write_yaml(job.model, out / "model.yaml")
    save_companions(job.cfg, out, data_dir)  # the data's tokenizer and init_from's token ids, for `export --hf`
    if runtime.plan is not None:
        runtime.plan.save(out / "plan.yaml")


