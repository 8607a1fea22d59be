"""DistributedRuntime: a Plan applied to the plain model, driven through the trainer's Runtime seam.

Order of application per block (torchtitan's order): tensor parallelism (DTensor or megatron-core),
activation redistribution for layer-wise plans, recomputation, then data parallelism (FSDP2 for
ZeRO-2/3, DDP or a bucketed all-reduce for ZeRO-0/1); pipeline stages are cut before all that.

Gradient convention: every rank's loss is the mean over its own data shard; the global loss is the
mean over the ``max_dp`` shards. A layer with dp < max_dp runs (after the batch gather) on the data
of ``max_dp/dp`` shards, so after averaging over its dp group its gradients are multiplied by
``dp/max_dp``; that one factor makes layer-wise plans exact.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from datetime import timedelta
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from meshwright.config import ModelConfig, load_model_config
from meshwright.errors import invalid
from meshwright.memory.fp8_activations import apply_fp8_activations
from meshwright.memory.lora import apply_lora_config, init_adapters, load_adapters
from meshwright.memory.wta_crs import apply_wta_crs_per_layer
from meshwright.models import build_model, lm_loss, load_pretrained_into
from meshwright.models.decoder import Decoder
from meshwright.models.init import resolve_init
from meshwright.models.moe import MoE, attach_aux_loss_to_backward, router_stats
from meshwright.parallel.data_parallel import (all_reduce_grad_groups, all_reduce_grads, apply_ddp, apply_fsdp,
                                               rebuild_buckets, zero1_optimizer)
from meshwright.parallel.expert_fsdp import (EXPERT_FSDP_DIMS, apply_expert_fsdp, install_expert_fsdp_model_hooks,
                                             install_expert_fsdp_optimizer_hooks)
from meshwright.parallel.expert_fsdp import checkpoint_layout as expert_checkpoint_layout
from meshwright.parallel.expert_parallel import (A2AMeter, EPGroups, ExpertParallelExperts, apply_ep, ep_groups_from_mesh,
                                                 is_expert_param)
from meshwright.parallel.expert_tp import EXPERT_TP_DIMS
from meshwright.parallel.expert_tp import adapter_params as expert_adapter_params
from meshwright.parallel.layerwise import apply_batch_redistribution
from meshwright.parallel.mesh import build_meshes, hsdp_shard
from meshwright.parallel.meta_init import (Box, check_piece_box, check_placement_box, ep_boxes, materialize, shard_box,
                                          supports_meta_init)
from meshwright.parallel.pipeline import HiddenOutput, StageIO, build_schedule, cut_stage, stage_ids, stage_io
from meshwright.parallel.recompute import apply_recompute
from meshwright.parallel.support import check_deepspeed_train, check_runtime_support
from meshwright.parallel.tensor_parallel import apply_tp
from meshwright.parallel.zero1_state import load_zero1_state_dict, param_fqns, zero1_state_dict
from meshwright.plan import Plan, validate_plan
from meshwright.train.compile import compile_layer
from meshwright.train.optim_layout import flat_options
from meshwright.train.head_loss import head_loss
from meshwright.train.precision import PrecisionPolicy, apply_autocast
from meshwright.train.runtime import Batch, Runtime, TorchDistributedCollectives, batch_to_device

DEFAULT_TIMEOUT = timedelta(seconds=int(os.environ.get("MESHWRIGHT_PG_TIMEOUT_S", "300")))


class StateView(nn.Module):
    """The plain model's module tree over this rank's pieces (all chunks), for state dicts and optimizers.

    Holds the same submodules as the stage chunks, so ``named_parameters`` yields the plain model's
    names whatever the layout (DDP/pipeline wrappers stripped).
    """

    def __init__(self, chunks: list[Decoder]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()
        for c in chunks:
            for name in ("tok_embeddings", "pos_embeddings", "norm", "output"):
                if getattr(c, name, None) is not None:
                    setattr(self, name, getattr(c, name))
            for k, b in c.layers.items():
                self.layers[k] = b


def install_shard_optimizer_hooks(optimizer: torch.optim.Optimizer, shards: dict[nn.Parameter, tuple[int, Any]]) -> None:
    """Optimizer states of plain local shards (megatron tp, ep experts) appear as DTensors sharded on
    ``dim`` over a 1-D mesh (or on ``dims``, one per dimension of the mesh: ep x tp experts) in ``state_dict()`` and
    are cut back to the local shard on load.

    State keys are matched to parameters through the param_groups' order, so this works whether the
    keys are indices (``Optimizer.state_dict``) or FQNs (``torch.distributed.checkpoint.state_dict``).
    """
    from meshwright.parallel.megatron_tp import local_shard, shard_placements

    def pairs(state_dict: dict) -> list[tuple[Any, nn.Parameter]]:
        return [(k, p) for saved, live in zip(state_dict["param_groups"], optimizer.param_groups)
                for k, p in zip(saved["params"], live["params"]) if p in shards]

    def post(_: torch.optim.Optimizer, state_dict: dict) -> dict:
        # ``Optimizer.state_dict()`` shares each parameter's state dict with the live state: write into copies,
        # or the next step meets DTensors in its own state (aten.lerp_ "mixed torch.Tensor and DTensor")
        state_dict["state"] = dict(state_dict["state"])
        for k, p in pairs(state_dict):
            dim, mesh = shards[p]
            if k not in state_dict["state"]:
                continue
            inner = state_dict["state"][k] = dict(state_dict["state"][k])
            for key, v in inner.items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    inner[key] = DTensor.from_local(v, mesh, shard_placements(dim), run_check=False)
        return state_dict

    def pre(_: torch.optim.Optimizer, state_dict: dict) -> dict:
        state_dict["state"] = dict(state_dict["state"])  # the caller's dicts stay as they were
        for k, p in pairs(state_dict):
            dim, mesh = shards[p]
            if k not in state_dict["state"]:
                continue
            inner = state_dict["state"][k] = dict(state_dict["state"][k])
            for key, v in inner.items():
                if isinstance(v, DTensor) or (torch.is_tensor(v) and v.dim() == p.dim() and v.shape != p.shape):
                    inner[key] = local_shard(v, dim, mesh, p)
        return state_dict

    optimizer.register_state_dict_post_hook(post)
    optimizer.register_load_state_dict_pre_hook(pre)


def reduce_partial_grads(params: Iterable[nn.Parameter]) -> None:
    """Sum the tp-partial gradients DTensor leaves on replicated parameters (LoRA's A of a column-parallel linear
    and B of a row-parallel one, the sequence-parallel norms): their local pieces are partial sums, which the
    grad norm (``_replicas``) would count as whole values; reduced here once, the norm, clipping and the optimizer
    see the parameter's own (Replicate) placement."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(g.device_mesh, p.placements)


def apply_plan_savers(model: Decoder, plan: Plan, seed: int) -> dict[str, list[int]]:
    """Apply the Plan's per-layer memory savers to the plain model, before any parallel wrapper.

    Every rank applies them to identical full models, so the WTA-CRS linears get the same seeds on all
    ranks: tp peers (same tokens) draw the same rows, dp ranks draw from their own shard's row norms.
    """
    strategies = plan.layer_strategies()
    fp8 = [bool(s.savers.fp8_act) for s in strategies]
    out: dict[str, list[int]] = {"fp8_act": [], "wta_crs": []}
    if any(fp8):
        out["fp8_act"] = apply_fp8_activations(model, layers=fp8, gemm_layers=[bool(s.savers.fp8_gemm) for s in strategies])
    keep = {i: s.savers.wta_crs for i, s in enumerate(strategies) if s.savers.wta_crs is not None}
    if keep:
        apply_wta_crs_per_layer(model, keep, seed=seed)
        out["wta_crs"] = sorted(keep)
    return out


def boundary_grads(full: Decoder, ranges: list[tuple[int, int]]) -> list[bool]:
    """Whether each stage but the last returns hidden states that carry gradients: some stage up to it has a
    trainable parameter (a frozen base under LoRA may leave the first stages without any), from the whole (meta)
    model, so every rank knows every stage's."""
    out, grads = [], False
    for i, (start, end) in enumerate(ranges[:-1]):
        mods = [full.layers[str(k)] for k in range(start, end)]
        if i == 0:
            mods += [mod for mod in (full.tok_embeddings, full.pos_embeddings) if mod is not None]
        grads = grads or any(p.requires_grad for mod in mods for p in mod.parameters())
        out.append(grads)
    return out


def init_distributed(timeout: timedelta = DEFAULT_TIMEOUT) -> torch.device:
    """Initialise the default process group (NCCL on GPUs, gloo on CPU) with a timeout; return this rank's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None and "MASTER_ADDR" in os.environ:
            # torchrun's c10d rendezvous shares one TCPStore server across restarts and workers use it
            # unprefixed: a restarted gloo rank could read the dead attempt's addresses. Fresh prefix per attempt.
            store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
            store = dist.PrefixStore(f"meshwright/attempt{restart}", store)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    return device


# what ``DistributedRuntime.close`` drops: first what holds a DDP wrapper, then every other holder of a process group
DDP_HOLDERS = ("_schedules", "_stage_modules", "modules")
GROUP_HOLDERS = ("chunks", "model", "_params", "_manual", "_tp_partial", "_post_scale", "_zero2_blocks", "_expert_params",
                 "_megatron_shards", "_megatron_state", "_state_shards", "_expert_fsdp", "_ep", "_ep_meshes", "_param_fqns", "meshes")


class DistributedRuntime(TorchDistributedCollectives, Runtime):
    """Runs a validated Plan on all ranks of the default process group."""

    closed = False

    def __init__(self, model_cfg: ModelConfig | str | dict, plan: Plan, *, tp_backend: str = "dtensor",
                 seed: int = 1234, device: torch.device | None = None, dp_shard: int | None = None,
                 init_from: str | None = None, precision: PrecisionPolicy | None = None,
                 compile_backend: str | None = None, init: str = "auto", loss_chunk_tokens: int = 0,
                 lora: Any = None, grow_positions: str | None = None) -> None:
        """``dp_shard`` turns ZeRO-2/3 layers into HSDP: shard over ``dp_shard`` ranks, replicate across
        ``dp/dp_shard`` groups (None: shard over the whole dp group). ``init_from`` loads a Hugging Face
        checkpoint: after the layout is applied, so each rank reads only its stages' parameters and, for
        DTensor (tp/FSDP) shards and megatron-core's plain shards (their ``shard_box``), only its slices.
        ``precision``: fp32 when None. ``compile_backend``: torch.compile each block (after TP and recompute,
        before FSDP2; of an ep>1 or megatron tp>1 block its collective-free parts) and the last stage's head together with the loss. ``init``: the initial weights' scheme
        (models/init.py; ``auto``: keyed on CUDA, the CPU stream elsewhere), the one-process model's for the
        same seed. ``loss_chunk_tokens`` > 0: the last stage's head + loss per chunk of tokens (no full logits).
        ``lora``: a ``LoraConfig``: adapters on the plain (meta) model before the layout, base frozen, drawn after the
        base as the one-process model draws them; under dp, tp (+sp) of both backends (parallel/tensor_parallel.py and
        parallel/megatron_lora.py shard A and B), pp (each stage holds its layers' adapters) and ep (attention adapters
        replicated over the ep group like the attention, reduced over dp; expert adapters, ``experts.gate_up_proj`` /
        ``experts.down_proj``, sliced with their experts and reduced over the edp group; the experts' weights and the
        router frozen) (train/build.py ``check_lora_layout``).
        ``grow_positions``: init_from's GPT-2 ``wpe`` shorter than max_seq_len grows by that rule (models/positions.py)."""
        cfg = load_model_config(model_cfg)
        self.precision = precision or PrecisionPolicy()
        self.compute_dtype = self.precision.compute_dtype
        self.cfg, self.plan, self.tp_backend = cfg, plan, tp_backend
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        validate_plan(plan, cfg, self.world_size)
        check_runtime_support(plan, cfg, tp_backend, "torch")
        self.device = device or torch.device("cpu")
        self.init = resolve_init(init, self.device.type)
        if tp_backend == "megatron" and self.precision.mixed and self.device.type != "cuda":
            raise invalid("dtype", self.compute_dtype, "fp32 with tp_backend=megatron on CPU (megatron-core's linear "
                          "backward honours autocast on CUDA only), or tp_backend=dtensor")
        self.compile_backend = compile_backend
        if loss_chunk_tokens < 0:
            raise invalid("loss_chunk_tokens", loss_chunk_tokens, "0 (plain loss) or a positive number of tokens")
        # compile and/or chunked loss: the last stage returns hidden states and its head runs inside the loss
        # (compiled with it: inductor pads an unaligned vocab and fuses the fp32 upcast); None: logits, lm_loss
        self.head_loss = head_loss(compile_backend, loss_chunk_tokens)
        if dp_shard is not None and dp_shard < 1:
            raise invalid("dp_shard", dp_shard, "null or a positive divisor of the layers' dp degree")
        self.dp_shard = dp_shard
        m = self.meshes = build_meshes(plan, self.world_size, self.rank, self.device.type, dp_shard)
        self.dp_rank, self.dp_size = m.dp_rank, m.max_dp
        strategies = self.strategies = plan.layer_strategies()
        # built on meta (savers and megatron tp included), each rank materialises its shards only (parallel/meta_init.py)
        self.meta_init = supports_meta_init(cfg, plan, tp_backend, init_from)
        if self.meta_init:
            full = build_model(cfg, device="meta")
        elif self.init == "keyed":  # the whole model, but drawn on the device
            full = build_model(cfg, device=self.device, seed=seed, init="keyed")
        else:
            full = build_model(cfg, device="cpu", seed=seed).to(self.device)
        whole_model = [n for n, _ in full.named_parameters()]  # for init_from's unused-tensor check under pp
        adapter_values = None  # lora.init_adapter: a PEFT adapter's tensors, whole, set over the drawn ones below
        if lora is not None:  # before the savers and the layout: FSDP2 and DDP see the adapters as parameters
            apply_lora_config(full, lora, seed)
            if getattr(lora, "init_adapter", None) is not None:
                from meshwright.train.peft_import import peft_adapter_values

                adapter_values = peft_adapter_values(full, cfg, lora.init_adapter)[0]
        self.saver_layers = apply_plan_savers(full, plan, seed)
        ranges = plan.stage_ranges(cfg.n_layers)
        self.n_stages = len(ranges)
        self.stage_ids = stage_ids(m.pp_rank, m.pp, plan.pipeline.virtual_stages)
        self.has_first = 0 in self.stage_ids
        self.has_last = self.n_stages - 1 in self.stage_ids
        # ep/edp groups per (tp, ep): collective, so every rank creates all of them in the same order
        self._ep: dict[tuple[int, int], EPGroups] = {
            (tp, ep): ep_groups_from_mesh(m.tp_meshes[tp], "dp", ep)
            for tp, ep in sorted({(s.tp, s.ep) for s in strategies if s.ep > 1})}
        # ... and an ("edp", "ep", "tp") view of each stage's dp ranks, so checkpoints see expert shards as
        # DTensors sharded over ep (the experts' weights over ep x tp: expert tp; their adapters over ep alone),
        # replicated over edp and the other stages' copies of the key
        self._ep_meshes: dict[tuple[int, int], Any] = {
            (tp, ep): init_device_mesh(self.device.type, (m.pp, m.per_stage // (tp * ep), ep, tp),
                                       mesh_dim_names=("pp", "edp", "ep", "tp"))
            for tp, ep in sorted(self._ep)}
        self.a2a_meter = A2AMeter()
        chunks = [cut_stage(full, *ranges[i], i == 0, i == self.n_stages - 1) for i in self.stage_ids]
        self._boundary_grads = boundary_grads(full, ranges)
        del full
        if cfg.n_experts and m.pp > 1:  # stages never see the loss: the aux loss enters through backward
            for chunk in chunks:
                attach_aux_loss_to_backward(chunk, 1.0)
        uniform_replicated = (all(s.tp == 1 and s.zero in (0, 1) for s in strategies)
                              and len({s.zero for s in strategies}) == 1 and plan.embedding.zero < 2)
        self.zero1 = uniform_replicated and strategies[0].zero == 1 and m.per_stage > 1
        # DDP wraps whole stage modules; under pipelining its bucket rebuild trips over the schedule's
        # per-microbatch backward, so pipelined stages use the bucketed all-reduce instead.
        # ... and DDP would average expert shards over the whole stage, so ep>1 needs the manual path.
        self.uniform_ddp = uniform_replicated and m.pp == 1 and not any(s.ep > 1 for s in strategies)
        # expert shard -> into how many shards it is cut (ep[*tp]; FSDP'd at ZeRO-2/3: edp*ep*tp = per_stage)
        self._expert_params: dict[nn.Parameter, int] = {}
        self._manual: list[tuple[list[nn.Parameter], dist.ProcessGroup, float]] = []  # (params, group, scale)
        self._post_scale: list[tuple[list[nn.Parameter], float]] = []  # FSDP layers with dp < max_dp
        self._megatron_shards: dict[nn.Parameter, tuple[int, int]] = {}  # param -> (shard dim, tp)
        self._megatron_state: dict[str, tuple[int, int, Any]] = {}  # state key -> (dim, tp, mesh or None: tp mesh)
        self._state_shards: dict[nn.Parameter, tuple[int, Any]] = {}  # plain local shards: (dim, 1-D mesh)
        # every plain shard cut by hand -- megatron tp's, the ep experts' (expert tp, adapters): its box in the full
        # tensor, recorded at the cut; what init, init_from, init_adapter and the checkpoints' view read (shard_boxes)
        self._shard_boxes: dict[str, Box] = {}
        # megatron LoRA's replicated A/B and, under expert tp, the whole expert adapters: their gradients summed over
        # their tp group, one bucket per group, all layers in it
        self._tp_partial: dict[dist.ProcessGroup, list[nn.Parameter]] = {}
        self._zero2_blocks: list[nn.Module] = []  # FSDP2 modules at ZeRO-2: gathered once per step
        # FSDP'd expert weights (zero>=2, ep>1): name -> (full shape, checkpoint mesh, placements)
        self._expert_fsdp: dict[str, tuple[tuple[int, ...], Any, list[Any]]] = {}
        for chunk in chunks:
            self._apply_layers(chunk)
            self._apply_outer(chunk)
            apply_autocast(chunk, self.precision, self.device.type)  # every layout computes in the policy's dtype
        if init_from is not None and self.meta_init:  # the strict load below fills every shard: nothing to draw
            self.init = "pretrained"
        if self.meta_init:  # gradient buckets listed meta parameters: point them at the materialised ones
            new = materialize(chunks, cfg, seed, self.device, self.init, self._shard_boxes)
            self._expert_params = {new.get(p, p): ep for p, ep in self._expert_params.items()}
            self._megatron_shards = {new.get(p, p): v for p, v in self._megatron_shards.items()}
            self._state_shards = {new.get(p, p): v for p, v in self._state_shards.items()}
            self._manual = [([new.get(p, p) for p in ps], group, scale) for ps, group, scale in self._manual]
            self._post_scale = [([new.get(p, p) for p in ps], factor) for ps, factor in self._post_scale]
            self._tp_partial = {group: [new.get(p, p) for p in ps] for group, ps in self._tp_partial.items()}
        self.chunks = chunks
        if init_from is not None:  # each rank reads its stages' parameters, of its shards only their boxes: an ep
            # rank's experts too (plain tensors; without their box rank r would read experts 0..n_local-1, not its own)
            load_pretrained_into(chunks, init_from, cfg, boxes=self._shard_boxes,
                                 whole_model=whole_model, grow_positions=grow_positions)
        if lora is not None and self.meta_init:
            init_adapters(chunks, seed, self._shard_boxes)
        if adapter_values is not None:  # each shard its slice, as init_adapters draws them
            load_adapters(chunks, adapter_values, self._shard_boxes)
        self.model = StateView(chunks)
        if self._megatron_state:
            from meshwright.parallel.megatron_tp import install_state_hooks

            install_state_hooks(self.model, {k: (d, mesh if mesh is not None else m.tp_mesh(tp))
                                             for k, (d, tp, mesh) in self._megatron_state.items()})
        if self._expert_fsdp:
            install_expert_fsdp_model_hooks(self.model, self._expert_fsdp)
        self.modules = [apply_ddp(c, m.stage_group, self.device) if self.uniform_ddp and m.per_stage > 1 else c for c in chunks]
        # what the pipeline schedule runs: the last stage hands its hidden states to loss_fn when the head is there
        self._stage_modules = [HiddenOutput(mod) if self.head_loss is not None and i == self.n_stages - 1 else mod
                               for mod, i in zip(self.modules, self.stage_ids)]
        self._schedules: dict[tuple[Any, ...], Any] = {}
        self._params = list(dict.fromkeys(self.model.parameters()))
        self._heterogeneous = len({(type(p), getattr(p, "device_mesh", None)) for p in self._params}) > 1

    @property
    def shard_boxes(self) -> dict[str, Box]:
        """{parameter name: (global shape, offset)} of every plain tensor shard this rank holds that was cut by hand:
        megatron-core tp's (``meta_init.shard_box``) and expert parallelism's (``meta_init.ep_boxes``: the experts'
        w1/w3/w2, over ep x tp under expert tp, and their LoRA adapters' rows), recorded once at the cut. Names are
        the plain model's (``StateView``'s, no wrapper prefixes). A DTensor shard (DTensor tp, FSDP2) has no entry:
        its placements say where it sits; a DTensor over a boxed plain shard (FSDP over an ep shard) keeps its
        plain shard's box, and its placements cut within that box (``meta_init._copy_shard``, ``init_keyed``,
        ``hf_weights._local_index``). The one source random init, ``init_from``, ``lora.init_adapter`` and the
        adapters' draw read; the checkpoints' DTensor view of each shard is checked against it at build."""
        return self._shard_boxes

    # ---- construction ----------------------------------------------------------------------------
    def _apply_layers(self, chunk: Decoder) -> None:
        m = self.meshes
        for name, block in chunk.layers.items():
            s = self.strategies[int(name)]
            hsdp = m.hsdp_meshes.get((s.tp, hsdp_shard(s, self.dp_shard)))
            if hsdp is not None and s.ep > 1:
                raise invalid("dp_shard", self.dp_shard, f"null with ep>1 and zero>=2 (layers[{name}]: HSDP of the "
                              "non-expert parameters beside FSDP of the experts over edp is not run)")
            tp_mesh = hsdp["tp"] if hsdp is not None else m.tp_mesh(s.tp) if s.tp > 1 else None
            if s.tp > 1:
                if self.tp_backend == "megatron":
                    from meshwright.parallel.megatron_tp import apply_megatron_tp

                    dims = apply_megatron_tp(block, tp_mesh.get_group())
                    for pname, p in block.named_parameters():
                        if pname in dims:
                            self._shard_boxes[f"layers.{name}.{pname}"] = shard_box(p.shape, dims[pname], s.tp,
                                                                                     tp_mesh.get_local_rank())
                            self._megatron_shards[p] = (dims[pname], s.tp)
                            self._megatron_state[f"layers.{name}.{pname}"] = (dims[pname], s.tp, None)
                            self._state_shards[p] = (dims[pname], m.tp_mesh(s.tp))
                            check_placement_box(f"layers.{name}.{pname}", self._shard_boxes[f"layers.{name}.{pname}"],
                                                p.shape, m.tp_mesh(s.tp), (dims[pname],))
                    from meshwright.parallel.megatron_lora import partial_grad_params

                    partial = partial_grad_params(block)
                    if partial:
                        self._tp_partial.setdefault(tp_mesh.get_group(), []).extend(partial)
                else:
                    apply_tp(block, tp_mesh, s.sp)
            if s.tp > m.g:
                apply_batch_redistribution(block, m.gather_meshes[s.tp]["rep"])
            if s.ep > 1:
                g = self._ep[(s.tp, s.ep)]
                apply_ep(block, g.ep, self.a2a_meter)
                for path, module in block.named_modules():  # the cut's boxes, where megatron's cut records its own
                    if isinstance(module, ExpertParallelExperts):
                        self._shard_boxes.update(ep_boxes(module, f"layers.{name}.{path}"))
            if s.ep > 1 and s.zero < 2:  # ZeRO-2/3: the experts are FSDP'd over edp below (_apply_expert_fsdp)
                experts = [p for p in block.parameters() if is_expert_param(p)]
                mesh = self._ep_meshes[(s.tp, s.ep)]
                for pname, p in block.named_parameters():
                    if is_expert_param(p):
                        # expert tp: the weights are cut over ep (dim 0) x tp (their hidden dim), adapters over ep
                        tp_dim = EXPERT_TP_DIMS.get(pname.rsplit(".", 1)[-1]) if s.tp > 1 else None
                        dims, shard_mesh = ((0,), mesh["ep"]) if tp_dim is None else ((0, tp_dim), mesh["ep", "tp"])
                        # the checkpoints' DTensor view of the shard must sit where its box says
                        check_placement_box(f"layers.{name}.{pname}", self._shard_boxes[f"layers.{name}.{pname}"],
                                            p.shape, shard_mesh, dims)
                        self._expert_params[p] = s.ep * (s.tp if tp_dim is not None else 1)
                        self._megatron_state[f"layers.{name}.{pname}"] = (dims, s.tp, shard_mesh)
                        self._state_shards[p] = (dims, shard_mesh)
                # backward through the all-to-all already summed the ep peers' contributions (frozen experts under
                # LoRA: nothing to reduce)
                self._manual.append(([p for p in experts if p.requires_grad], g.edp, 1.0 / m.max_dp))
            if s.tp > 1 and self.tp_backend == "dtensor" and isinstance(block.feed_forward, MoE):
                # expert tp: the whole expert adapters' gradients are partial over tp (parallel/expert_tp.py)
                adapters = expert_adapter_params(block.feed_forward)
                if adapters:
                    self._tp_partial.setdefault(tp_mesh.get_group(), []).extend(adapters)
            apply_recompute(block, s.recompute)
            if self.compile_backend is not None:  # MoE blocks (routing, all-to-alls) and megatron tp>1 (its
                # linears) in parts, the rest whole
                compile_layer(block, self.compile_backend, megatron_tp=s.tp > 1 and self.tp_backend == "megatron")
            params = [p for p in block.parameters() if not is_expert_param(p)]
            if self.uniform_ddp:
                continue
            if s.dp == 1:  # no dp group, but the batch gather summed the gradients of max_dp shards
                if m.max_dp > 1:
                    self._post_scale.append((params, 1.0 / m.max_dp))
                continue
            if s.zero >= 2:
                if s.ep > 1:  # the experts first, over their edp group: the block's FSDP then skips them
                    self._apply_expert_fsdp(name, block, s)
                apply_fsdp(block, hsdp["replicate", "shard"] if hsdp is not None else m.dp_mesh(s.tp), s.zero,
                           self.precision.fsdp_policy())
                if s.zero == 2:
                    self._zero2_blocks.append(block)
                if s.dp != m.max_dp:
                    self._post_scale.append((list(block.parameters()), s.dp / m.max_dp))
            else:
                self._manual.append((params, m.dp_mesh(s.tp).get_group(), 1.0 / m.max_dp))

    def _apply_expert_fsdp(self, name: str, block: nn.Module, s: Any) -> None:
        """ZeRO-2/3 under ep > 1 (parallel/expert_fsdp.py): the block's experts sharded over the edp dim of its
        ``("pp", "edp", "ep", "tp")`` mesh, gradients divided by the whole dp; each weight counted as one of
        per_stage disjoint pieces (grad norm), shown to checkpoints as a DTensor of the full tensor."""
        mesh = self._ep_meshes[(s.tp, s.ep)]
        experts = block.feed_forward.experts
        for w, p in zip(EXPERT_FSDP_DIMS, apply_expert_fsdp(experts, mesh["edp"], s.zero, self.meshes.max_dp,
                                                            self.precision.fsdp_policy())):
            self._expert_params[p] = self.meshes.per_stage  # edp x ep x tp disjoint pieces
            key = f"layers.{name}.feed_forward.experts.{w}"
            box = self._shard_boxes[key]  # the ep cut's box (ep_boxes); FSDP's piece sits inside it
            ckpt_mesh, placements = expert_checkpoint_layout(experts, w, mesh, s.tp)
            check_piece_box(key, box, p, ckpt_mesh, placements)
            self._expert_fsdp[key] = (tuple(box[0]), ckpt_mesh, placements)

    def _apply_outer(self, chunk: Decoder) -> None:
        """Embeddings, final norm and head: replicated over the stage (or FSDP-sharded if embedding.zero >= 2)."""
        m = self.meshes
        outer = [mod for mod in (chunk.tok_embeddings, chunk.pos_embeddings, chunk.norm, chunk.output) if mod is not None]
        if self.uniform_ddp or m.per_stage == 1 or not outer:
            return
        if self.plan.embedding.zero >= 2:
            for mod in outer:
                apply_fsdp(mod, m.stage_mesh["stage"], self.plan.embedding.zero, self.precision.fsdp_policy())
        else:
            self._manual.append(([p for mod in outer for p in mod.parameters()], m.stage_group, 1.0 / m.per_stage))

    # ---- the loss ----------------------------------------------------------------------------------
    def _forward(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A whole-model stage's output: hidden states when the head runs inside the loss, else logits."""
        return mod(x, return_hidden=True) if self.head_loss is not None else mod(x)

    def loss_fn(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The last stage's mean LM loss from its output (``_forward``'s, or the schedule's last stage's): the
        head + loss in the policy's autocast region (the stage's own forward runs there, apply_autocast)."""
        if self.head_loss is None:
            return lm_loss(out, targets)
        head = self.chunks[self.stage_ids.index(self.n_stages - 1)].output
        with self.precision.autocast(self.device.type):
            return self.head_loss(head, out, targets)

    # ---- Runtime API -----------------------------------------------------------------------------
    def parameters(self) -> Iterable[nn.Parameter]:
        return self._params

    def _finish_grads(self) -> None:
        for p in self._expert_params:  # no token reached this rank's experts: zero, so buckets match
            if p.grad is None and p.requires_grad:  # (frozen experts under LoRA have none anywhere)
                p.grad = torch.zeros_like(p)
        all_reduce_grad_groups(self._manual)  # through one buffer of the largest group's size
        reduce_partial_grads(self._params)
        for group, params in self._tp_partial.items():  # megatron LoRA's replicated A/B, expert-tp adapters: each tp
            # rank holds a share of their gradient
            all_reduce_grads(params, group, 1.0)
        with torch.no_grad():
            for params, factor in self._post_scale:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(factor)

    def _mean_over_ranks(self, local: torch.Tensor | float) -> torch.Tensor:
        """Mean of the last stage's per-rank losses (ranks sharing a data shard count equally), on the device."""
        t = torch.as_tensor(local if self.has_last else 0.0, dtype=torch.float64, device=self.device).reshape(())
        dist.all_reduce(t)
        return t / self.meshes.per_stage

    def _schedule(self, micro_batches: list[Batch], train: bool):
        """One schedule per (micro-batch count, micro-batch shape and dtype, train/eval): its stages' buffers have
        that shape (``_stage_io``), and a stage first run by ``eval`` never builds its backward buffers
        (pytorch#162822), so training never reuses an eval schedule."""
        tokens = micro_batches[0][0]
        shapes = {tuple(x.shape) for x, _ in micro_batches}
        if len(shapes) > 1:
            raise invalid("micro_batches", sorted(shapes), "micro-batches of one shape under pipeline parallelism "
                          "(every stage receives into buffers of one micro-batch's shape)")
        key = (len(micro_batches), tuple(tokens.shape), tokens.dtype, train)
        if key not in self._schedules:
            pp = self.plan.pipeline
            self._schedules[key] = build_schedule(self._stage_modules, self.stage_ids, self.n_stages, pp.schedule,
                                                  len(micro_batches), self.loss_fn, self.device, self.meshes.pp_group,
                                                  io=self._stage_io(tokens))
        return self._schedules[key]

    def _stage_io(self, tokens: torch.Tensor) -> list[StageIO]:
        """Every stage's input and output from one micro-batch's token ids and the layout, with no forward (torch's
        inference pass ran the stages' collectives on an uninitialised buffer, pipeline.py). Shapes: (mb, seq) ids
        into stage 0, (mb, seq, d_model) hidden states between stages (each block returns its input's shape: tp,
        sp and the batch redistribution of layer-wise plans all hand back plain local tensors), logits (or, with
        ``head_loss``, hidden states) out of the last. Dtypes, as the stages compute them: the residual stream is
        in the dtype of the embedding's weights (fp32; the compute dtype where FSDP2 gathers them in it) and a
        block adds to it what autocast returns (bf16) -- fp32 plus bf16 stays fp32 -- except that a block under
        FSDP2's mixed policy casts its input to the compute dtype, and a bf16 stream through fp32-weight post norms
        (Llama-style RMSNorm, LayerNorm) comes out fp32. Logits are in the compute dtype (autocast's head); the
        final norm's output as that norm computes it. ``FixedOutput`` casts what this rule misses, with a warning."""
        cfg, m, strategies = self.cfg, self.meshes, self.strategies
        mixed, fp32, compute = self.precision.mixed, torch.float32, self.precision.torch_dtype()
        fsdp_mixed = [mixed and not self.uniform_ddp and s.dp > 1 and s.zero >= 2 for s in strategies]
        outer_mixed = mixed and not self.uniform_ddp and m.per_stage > 1 and self.plan.embedding.zero >= 2
        upcasting_post_norms = cfg.post_norms and (cfg.arch == "gpt2" or not cfg.norm_unit_offset)
        stream = compute if outer_mixed else fp32
        boundary = []
        for start, end in self.plan.stage_ranges(cfg.n_layers):
            for k in range(start, end):
                if fsdp_mixed[k]:
                    stream = compute
                elif stream != fp32 and upcasting_post_norms:
                    stream = fp32
            boundary.append(stream)
        if self.head_loss is None:
            last_width, last_dtype = cfg.vocab_size, compute if mixed else fp32
        else:
            norm_weight = compute if outer_mixed else fp32
            last_width = cfg.d_model
            if cfg.arch == "gpt2":  # LayerNorm: autocast computes it in fp32
                last_dtype = fp32
            elif cfg.norm_unit_offset:  # cast back to its input's dtype
                last_dtype = stream
            else:  # its input's dtype times its weight's
                last_dtype = torch.promote_types(stream, norm_weight)
        return stage_io(tokens, cfg.d_model, boundary[:-1], self._boundary_grads, last_width, last_dtype)

    def _run_pipeline(self, micro_batches: list[Batch], train: bool) -> torch.Tensor | float:
        sched = self._schedule(micro_batches, train)
        x = batch_to_device(torch.cat([b[0] for b in micro_batches]), self.device)
        y = batch_to_device(torch.cat([b[1] for b in micro_batches]), self.device)
        args = (x,) if self.has_first else ()
        kwargs: dict[str, Any] = {"target": y, "losses": []} if self.has_last else {}
        (sched.step if train else sched.eval)(*args, **kwargs)
        if self.has_last:
            return torch.stack([lo.detach().float() for lo in kwargs["losses"]]).mean()
        return 0.0

    def forward_backward(self, micro_batches: list[Batch]) -> float:
        return float(self.forward_backward_lazy(micro_batches))

    def forward_backward_lazy(self, micro_batches: list[Batch]) -> torch.Tensor:
        for mod in self.modules:
            mod.train()
        local: torch.Tensor | float
        if self.meshes.pp > 1:
            local = self._run_pipeline(micro_batches, train=True)
        else:
            mod, n = self.modules[0], len(micro_batches)
            total = torch.zeros((), dtype=torch.float64, device=self.device)  # as the float sum it replaces
            for i, (x, y) in enumerate(micro_batches):
                sync = contextlib.nullcontext() if not isinstance(mod, DDP) or i == n - 1 else mod.no_sync()
                for block in self._zero2_blocks:  # ZeRO-2: keep parameters gathered until the last microbatch
                    block.set_reshard_after_backward(i == n - 1)
                with sync:
                    loss = self.loss_fn(self._forward(mod, batch_to_device(x, self.device)), batch_to_device(y, self.device))
                    aux = self.chunks[0].aux_loss() if self.cfg.n_experts else None
                    ((loss if aux is None else loss + aux) / n).backward()  # the log shows the LM loss alone
                total += loss.detach().double()
            local = total / n
        self._finish_grads()
        return self._mean_over_ranks(local)

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[Batch]) -> float:
        for mod in self.modules:
            mod.eval()
        if self.meshes.pp > 1:
            local = self._run_pipeline(micro_batches, train=False)
        else:
            local = sum(float(self.loss_fn(self._forward(self.modules[0], x.to(self.device)), y.to(self.device)))
                        for x, y in micro_batches)
            local /= len(micro_batches)
        for mod in self.modules:
            mod.train()
        return float(self._mean_over_ranks(local))

    def _replicas(self, p: nn.Parameter, g: torch.Tensor) -> int:
        """How many ranks of this stage hold the same values as this rank's piece of ``g``."""
        per_stage = self.meshes.per_stage
        if p in self._expert_params and isinstance(g, DTensor):  # FSDP'd expert shards: per_stage disjoint pieces
            return per_stage // self._expert_params[p]
        if isinstance(g, DTensor):
            mesh = g.device_mesh
            rep = math.prod(mesh.size(i) for i, pl in enumerate(g.placements) if pl.is_replicate())
            return rep * per_stage // mesh.size()
        if p in self._expert_params:  # each expert shard lives on the per_stage/ep ranks of its edp x tp
            return per_stage // self._expert_params[p]
        shard = self._megatron_shards.get(p)
        return per_stage // shard[1] if shard else per_stage

    @torch.no_grad()
    def grad_norm_lazy(self) -> torch.Tensor:
        """Global L2 norm of all gradients across tp/pp/dp shards (each value counted once), on the device.
        Squares are summed in fp64 (``vector_norm(dtype=)``: no fp64 copy of the gradients)."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self._params:
            if p.grad is None:
                continue
            g = p.grad
            local = g.to_local() if isinstance(g, DTensor) else g
            sq += torch.linalg.vector_norm(local, dtype=torch.float64).square() / self._replicas(p, g)
        dist.all_reduce(sq)
        return sq.sqrt()

    def grad_norm(self) -> float:
        return float(self.grad_norm_lazy())

    @torch.no_grad()
    def clip_grad_norm_lazy(self, max_norm: float) -> torch.Tensor:
        """Total norm before clipping; the clip factor stays on the device (no host sync)."""
        norm = self.grad_norm_lazy()
        if max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in self._params if p.grad is not None]
            coef = coef.to(grads[0].dtype) if grads else coef
            for g in grads:
                g.mul_(coef)
        return norm

    def clip_grad_norm_(self, max_norm: float) -> float:
        return float(self.clip_grad_norm_lazy(max_norm))

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Under DDP the gradients are views of its reduction buckets (``apply_ddp``): zeroed in place, so they stay
        views and the next step's ``no_sync`` microbatches accumulate into the buckets; freed, the first of them would
        allocate a second gradient buffer beside the buckets. Elsewhere freed, as the base runtime does. After the
        first step DDP's buckets are rebuilt here, the gradients zero (``rebuild_buckets``: no second buffer)."""
        ddp = [mod for mod in self.modules if isinstance(mod, DDP)]
        optimizer.zero_grad(set_to_none=not ddp)
        for mod in ddp:
            rebuild_buckets(mod)

    def build_optimizer(self, make: Any) -> torch.optim.Optimizer:
        opt = make(self.param_groups())
        if self.zero1:
            return zero1_optimizer(opt, self.meshes.stage_group)
        if self._heterogeneous:  # foreach kernels cannot mix DTensors of different meshes with plain tensors
            for group in opt.param_groups:
                group["foreach"] = False
                group["fused"] = False
        if self._state_shards:  # megatron tp shards and ep expert shards: optimizer states as DTensors too
            install_shard_optimizer_hooks(opt, dict(self._state_shards))
        if self._expert_fsdp:  # FSDP'd expert shards: their states as DTensors of the full tensors
            install_expert_fsdp_optimizer_hooks(self.model, opt, self._expert_fsdp)
        return opt

    def model_state(self) -> dict[str, Any]:
        """Sharded state dict keyed by the plain model's names (DTensors where sharded): DCP reshards it."""
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=False))

    def load_model_state(self, state: dict[str, Any]) -> None:
        """Load full (plain) tensors or DTensors laid out as ``model_state()`` returns them."""
        mine = dict(self.model.named_parameters())
        subset = {k: v for k, v in state.items() if k in mine}
        full = not any(isinstance(v, DTensor) for v in subset.values())
        set_model_state_dict(self.model, subset, options=StateDictOptions(full_state_dict=full, strict=False))

    def checkpoint_state(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """{"model", "optim"} state dicts keyed by plain names, ready for ``dcp.save``/``dcp.load``."""
        if optimizer is None:
            return {"model": self.model_state()}
        with self._grads_set_aside():
            if self.zero1:  # each rank: the states of the parameters it owns, under ZeRO-0's keys (zero1_state.py)
                return {"model": self.model_state(), "optim": zero1_state_dict(optimizer, self._fqns())}
            model_sd, optim_sd = get_state_dict(self.model, optimizer, options=flat_options())  # optim_layout.py
        return {"model": model_sd, "optim": optim_sd}

    def _fqns(self) -> dict[nn.Parameter, str]:
        """Each parameter's DCP name (``get_state_dict``'s), for the ZeRO-1 optimizer's state dict."""
        if not hasattr(self, "_param_fqns"):
            self._param_fqns = param_fqns(self.model)
        return self._param_fqns

    @contextlib.contextmanager
    def _grads_set_aside(self) -> Any:
        """DCP builds an empty optimizer's states by a zero-lr step over zeroed gradients, and skips it when any
        gradient exists (torch's ``_init_optim_state``): the template then lacks the states and a resume loses them.
        DDP's gradients exist from construction on (``apply_ddp``: zeroed bucket views), so they are set aside
        meanwhile and the same views put back (the step ends in ``zero_grad(set_to_none=True)``)."""
        saved = [(p, p.grad) for p in self._params if p.grad is not None]
        for p, _ in saved:
            p.grad = None
        try:
            yield
        finally:
            for p, g in saved:
                p.grad = g

    def load_checkpoint_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer | None) -> None:
        """Apply a state filled by ``dcp.load`` into the template from ``checkpoint_state``."""
        if optimizer is None:
            self.load_model_state(state["model"])
        elif self.zero1:
            set_model_state_dict(self.model, state["model"])
            load_zero1_state_dict(optimizer, self._fqns(), state["optim"])
        else:
            with self._grads_set_aside():
                set_state_dict(self.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                               options=flat_options())

    def extra_log_fields(self) -> dict[str, Any]:
        """Router statistics of the last forward (tokens per expert, dropped fraction, balance loss),
        summed over the data shards and merged over pipeline stages; {} for dense models.
        Collective: every rank must call it. Layers with tp above the plan's smallest tp (batch gathered
        before them) count each shard tp/min_tp times."""
        if not self.cfg.n_experts:
            return {}
        m = self.meshes
        stats = router_stats(self.model, group=m.dp_mesh(m.g).get_group() if m.max_dp > 1 else None)
        if m.pp > 1:
            parts: list[Any] = [None] * m.pp
            dist.all_gather_object(parts, stats["moe_layers"], group=m.pp_group)
            layers = {k: v for part in parts for k, v in part.items()}
            routed = {k: sum(v["tokens_per_expert"]) for k, v in layers.items()}
            dropped = sum(v["dropped_frac"] * (routed[k] / max(1e-30, 1 - v["dropped_frac"])) for k, v in layers.items()
                          if v["dropped_frac"] < 1)
            total = sum(routed.values()) + dropped
            stats = {"moe_layers": dict(sorted(layers.items(), key=lambda kv: int(kv[0].split(".")[1]))),
                     "moe_dropped_frac": dropped / max(1.0, total),
                     "moe_balance_loss": sum(v["balance_loss"] for v in layers.values()) / max(1, len(layers))}
        stats["moe_a2a_bytes"] = self.a2a_meter.bytes_total
        return stats

    def close(self) -> None:
        """Drop everything of this runtime that holds a process group, DDP first, and collect: the DDP wrappers (their
        C++ Reducer), the pipeline schedules and stages, then the FSDP2/TP/EP modules and their parameters (DTensors
        hold their DeviceMesh, which holds its groups), the manual-reduction groups, the ep groups and the meshes.
        None may outlive ``destroy_process_group`` (parallel/teardown.py: freed after it, a Reducer held a gloo
        group's last reference and gloo's destructor deadlocked on the GIL). Idempotent; the runtime is unusable
        after it (``closed``)."""
        for holders in (DDP_HOLDERS, GROUP_HOLDERS):
            for name in holders:
                self.__dict__.pop(name, None)
            gc.collect()  # a wrapper in a reference cycle goes only with the collector
        self.closed = True


def build_distributed_runtime(train_cfg: Any, model_cfg: ModelConfig, plan: Plan, init_from: str | None = None) -> Runtime:
    """The trainer's entry point under torchrun: init the process group, apply the Plan (each runtime
    validates it against the world once). What the DeepSpeed engine cannot run is refused before any group exists."""
    chunk_tokens = getattr(train_cfg, "loss_chunk_tokens", 0)
    check_deepspeed_train(train_cfg, plan, init_from)
    device = init_distributed()
    if train_cfg.dp_backend == "deepspeed":
        from meshwright.parallel.deepspeed_backend import DeepSpeedRuntime

        rt: Runtime = DeepSpeedRuntime(model_cfg, plan, train_cfg=train_cfg, seed=train_cfg.seed, device=device)
    else:
        rt = DistributedRuntime(model_cfg, plan, tp_backend=train_cfg.tp_backend, seed=train_cfg.seed, device=device,
                               init_from=init_from, precision=PrecisionPolicy.from_dtype(train_cfg.dtype),
                               compile_backend="inductor" if train_cfg.compile else None,
                               init=getattr(train_cfg, "init", "auto"), loss_chunk_tokens=chunk_tokens,
                               lora=getattr(train_cfg, "lora", None),
                               grow_positions=getattr(train_cfg, "grow_positions", None))
    per_rank = train_cfg.global_batch // rt.dp_size if train_cfg.global_batch % rt.dp_size == 0 else None
    if per_rank is None or per_rank % train_cfg.micro_batch:
        raise invalid("global_batch", train_cfg.global_batch,
                      f"a multiple of dp_size*micro_batch={rt.dp_size}*{train_cfg.micro_batch} for this plan")
    return rt
