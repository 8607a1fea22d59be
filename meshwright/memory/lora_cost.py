"""What one LoRA step computes and reduces, block by block: the planner's time model and the trainer's MFU read it.

A LoRA step (memory/lora.py, base frozen) runs the forward in full, but its backward skips the weight gradient (dW)
of every frozen parameter: autograd computes dW only for tensors with ``requires_grad``, and the input gradient (dX)
of a linear only where its input needs one. Before the first adapter nothing needs a gradient (the embedding is
frozen unless ``modules_to_save`` trains it), so the first block's q/k/v projections (and, with adapters only on the
MLP, its whole attention) skip dX too. The adapters themselves train in full: 6 FLOPs per adapter parameter and
token, less A's dX where its input needs none. Only trainable parameters have gradients to reduce over data
parallelism and an optimizer step; ZeRO-3 still all-gathers the frozen weights.

Sizes are the config's (``ModelConfig.layer_params`` counting, biases and norms included), so the FLOPs derived here
are the PaLM formula's (tools/flops.py) with LoRA's skips; counted against torch's FlopCounterMode in
tests/unit/test_lora_cost.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshwright.config import LoraConfig, ModelConfig


# the dense MLP's linear targets (w1/w2/w3): on an MoE block they adapt nothing (its experts are stacked weights,
# adapted as ``experts.gate_up_proj`` / ``experts.down_proj``: ``EXPERT_ADAPTER_TARGETS``; one that adapts nothing
# anywhere is refused: memory/lora.py), and under expert parallelism they are refused (train/build.py
# ``check_lora_layout``), while the experts' own targets run there
EXPERT_TARGETS = ("w1", "w2", "w3")
# the experts' own targets (config.schema.LORA_EXPERT_TARGETS: PEFT's target_parameters on the stacked weights)
EXPERT_ADAPTER_TARGETS = ("experts.gate_up_proj", "experts.down_proj")


def expert_share(module_name: str, experts: set[str], ep: int) -> float:
    """The share of a parameter of module ``module_name`` one rank of an ``ep`` group holds: 1/ep inside an MoE
    block's experts (``experts``: the GroupedExperts module names, which ``apply_ep`` slices along the expert dim),
    1 elsewhere (attention, router, norms, the ends, and the adapters on them: replicated over the ep group). The
    one place an expert-sharded parameter is told apart: the experts' adapters (``experts.gate_up_proj`` /
    ``experts.down_proj``, memory/lora.py ``ExpertAdapter``) live under the experts module and count 1/ep here, as
    ``apply_ep`` slices their rows (tests/unit/test_lora_cost.py); ones registered elsewhere add their name here."""
    return 1.0 / ep if _in_experts(module_name, experts) else 1.0


def _in_experts(module_name: str, experts: set[str]) -> bool:
    return any(module_name == e or module_name.startswith(e + ".") for e in experts)


def ep_rank_state_bytes(model_cfg: "ModelConfig", lora: "LoraConfig", ep: int = 1) -> dict[str, float]:
    """Bytes of LoRA training state one rank of an expert-parallel group of ``ep`` ranks holds (fp32, AdamW), counted
    on a ``meta`` model as ``apply_ep`` shards it (``expert_share``): ``weights`` (the frozen base and the adapters),
    ``grads`` and ``optimizer`` (AdamW's two moments) of the trainable parameters, ``trainable`` their count, and
    ``expert_weights`` (the experts' part of ``weights``). At ep = 1, ``memory.lora.lora_state_bytes``'s figures.
    Under ep the frozen experts shrink by ep while the attention adapters, their gradients and AdamW's states stay
    whole on every rank (tests/unit/test_lora_cost.py counts what apply_ep keeps on a rank of a fake group)."""
    from meshwright.memory.lora import apply_lora_config
    from meshwright.models import build_model
    from meshwright.models.moe import GroupedExperts

    model = build_model(model_cfg, device="meta")
    apply_lora_config(model, lora, seed=0)
    experts = {n for n, m in model.named_modules() if isinstance(m, GroupedExperts)}
    seen: set[int] = set()  # tied weights once
    weights = trained = expert = 0.0
    for mod_name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            share = expert_share(mod_name, experts, ep)
            weights += p.numel() * share
            trained += p.numel() * share if p.requires_grad else 0.0
            expert += p.numel() * share if _in_experts(mod_name, experts) else 0.0
    return {"weights": 4 * weights, "grads": 4 * trained, "optimizer": 8 * trained, "trainable": trained,
            "expert_weights": 4 * expert}


@dataclass(frozen=True)
class LoraStep:
    """Per block (``n_layers`` entries): ``adapter`` A + B parameters; ``no_wgrad`` frozen parameters on the activated
    path (no dW); ``no_dgrad`` frozen matmul parameters whose input needs no gradient (no dX) and ``no_dgrad_adapter``
    adapters' A parameters likewise (weights only: biases and norms count 4 FLOPs per parameter and token, as palm's
    6 less their dW); ``attn_bwd`` whether the attention core runs a backward. ``rank`` sets the
    adapter GEMMs' width. The ends: whether the head computes dX / dW and the embedding trains."""

    rank: int
    adapter: tuple[int, ...]
    no_wgrad: tuple[int, ...]
    no_dgrad: tuple[int, ...]
    no_dgrad_adapter: tuple[int, ...]
    attn_bwd: tuple[bool, ...]
    head_dgrad: bool
    head_trainable: bool
    embedding_trainable: bool
    adapter_in: tuple[int, ...] = ()  # per block, the adapted linears' input and output widths summed
    adapter_out: tuple[int, ...] = ()
    # per block, what of the above every tensor-parallel rank holds whole (parallel/tensor_parallel.py, as PEFT and
    # Megatron shard adapters): a column-parallel base's (wq/wk/wv, w1/w3) A (r x in, its input replicated) and a
    # row-parallel base's (wo, w2) B (out x r, its output a partial sum); the other factor is split over tp with
    # the base. ``adapter_rep`` parameters, ``no_dgrad_adapter_rep`` the skipped dX of the replicated A's,
    # ``adapter_in_rep`` the column bases' input widths, ``adapter_out_rep`` the row bases' output widths
    adapter_rep: tuple[int, ...] = ()
    no_dgrad_adapter_rep: tuple[int, ...] = ()
    adapter_in_rep: tuple[int, ...] = ()
    adapter_out_rep: tuple[int, ...] = ()
    # per MoE block, the adapters on its experts (``experts.gate_up_proj``/``down_proj``, memory/lora.py
    # ``ExpertAdapter``), kept apart from the linear ones above: ``expert_adapter`` their parameters (all experts; a
    # rank holds its n_experts/ep experts' rows, whole over tp: the adapters stay whole under expert tp, models/moe.py),
    # ``expert_adapter_active`` those a token runs through (its top_k experts': the FLOPs' count),
    # ``no_dgrad_expert_adapter`` the active A's whose input needs no gradient, ``expert_in``/``expert_out`` the
    # adapted widths per token (top_k x: gate_up d -> 2 f_e, down f_e -> d)
    expert_adapter: tuple[int, ...] = ()
    expert_adapter_active: tuple[int, ...] = ()
    no_dgrad_expert_adapter: tuple[int, ...] = ()
    expert_in: tuple[int, ...] = ()
    expert_out: tuple[int, ...] = ()
    # of the expert adapters' figures above, what a rank of meshwright's expert tp runs whole (models/moe.py
    # ``_low_rank``: the adapters are held whole on every tp rank, each rank applies the rows of its hidden slice):
    # gate_up's A (r x d, on the tp-replicated tokens) and down's B (d x r, into the partial-sum output); gate_up's B
    # and down's A run on the rank's 2 f_e / tp and f_e / tp rows. ``expert_adapter_active_rep`` parameters,
    # ``no_dgrad_expert_adapter_rep`` the skipped dX of gate_up's A, ``expert_in_rep`` / ``expert_out_rep`` the widths
    expert_adapter_active_rep: tuple[int, ...] = ()
    no_dgrad_expert_adapter_rep: tuple[int, ...] = ()
    expert_in_rep: tuple[int, ...] = ()
    expert_out_rep: tuple[int, ...] = ()

    def layer_key(self, index: int) -> tuple:
        """What sets block ``index``'s LoRA costs (blocks with the same key cost the same)."""
        return (self.adapter[index], self.no_wgrad[index], self.no_dgrad[index], self.no_dgrad_adapter[index],
                self.attn_bwd[index], self._at(self.expert_adapter, index),
                self._at(self.no_dgrad_expert_adapter, index))

    @staticmethod
    def _at(values: tuple[int, ...], index: int) -> int:
        return values[index] if values else 0

    def expert_on_rank(self, index: int, ep: int = 1) -> float:
        """Expert-adapter parameters of block ``index`` on one of ``ep`` expert-parallel ranks (its experts' A and B
        rows: ``lora_adapter_params(..., experts_only=True)``); not split by tp."""
        return self._at(self.expert_adapter, index) / ep

    def trained_on_rank(self, index: int, tp: Any, ep: int = 1) -> Any:
        """All trainable parameters of block ``index`` on one rank: the linear adapters as ``on_rank`` places them
        over tp, the expert adapters / ep."""
        return self.on_rank(index, tp) + self.expert_on_rank(index, ep)

    def active_adapter(self, index: int) -> int:
        """Adapter parameters one token of block ``index`` runs through: the linear ones and its top_k experts'."""
        return self.adapter[index] + self._at(self.expert_adapter_active, index)

    def expert_flops(self, index: int) -> float:
        """FLOPs per token of block ``index``'s expert adapters: forward + dA + dB + their dX, 6 per active parameter,
        less the dX of an A whose input needs no gradient."""
        return 6.0 * self._at(self.expert_adapter_active, index) - 2.0 * self._at(self.no_dgrad_expert_adapter, index)

    def _expert_split(self, full: tuple[int, ...], rep: tuple[int, ...], index: int, tp: int, rep_tp: int) -> float:
        """``full``'s value for block ``index`` on one of ``tp`` ranks: its ``rep`` part / ``rep_tp``, the rest / tp."""
        r = self._at(rep, index)
        return r / rep_tp + (self._at(full, index) - r) / tp

    def expert_active_on_rank(self, index: int, tp: int, rep_tp: int = 1) -> float:
        """Expert-adapter parameters one token runs through on one of ``tp`` ranks of an expert-tp stack: gate_up's A
        and down's B whole (``rep_tp`` 1), the others' hidden slice; ``rep_tp`` = ``tp`` where the stack splits the
        experts' work by tokens instead (DeepSpeed MoE), ``tp`` = 1 where it does not split it."""
        return self._expert_split(self.expert_adapter_active, self.expert_adapter_active_rep, index, tp, rep_tp)

    def expert_flops_on_rank(self, index: int, tp: int, rep_tp: int = 1) -> float:
        """``expert_flops`` as one of ``tp`` ranks runs them (``expert_active_on_rank``'s split; the skipped dX of
        gate_up's A whole, of down's A its slice)."""
        return (6.0 * self.expert_active_on_rank(index, tp, rep_tp)
                - 2.0 * self._expert_split(self.no_dgrad_expert_adapter, self.no_dgrad_expert_adapter_rep, index, tp,
                                           rep_tp))

    def on_rank(self, index: int, tp: Any) -> Any:
        """Adapter parameters of block ``index`` on one of ``tp`` tensor-parallel ranks: the replicated factors
        whole, the others split (``adapter_rep``); ``tp`` may be an array."""
        rep = self.adapter_rep[index] if self.adapter_rep else 0
        return rep + (self.adapter[index] - rep) / tp

    def no_dgrad_adapter_on_rank(self, index: int, tp: int) -> float:
        """``no_dgrad_adapter`` of block ``index`` on one of ``tp`` ranks: a replicated A's skipped dX whole."""
        rep = self.no_dgrad_adapter_rep[index] if self.no_dgrad_adapter_rep else 0
        return rep + (self.no_dgrad_adapter[index] - rep) / tp

    def widths_on_rank(self, index: int, tp: int, e_tp: int = 1, e_rep_tp: int = 1) -> tuple[float, float]:
        """The adapted linears' input and output widths block ``index``'s adapters move on one of ``tp`` ranks: a
        column base's input and a row base's output whole (replicated input, partial-sum output), the rest split;
        the experts' as ``expert_active_on_rank`` splits them (``e_tp``, ``e_rep_tp``: gate_up's input and down's
        output whole under expert tp, their hidden sides the rank's slice)."""
        i_rep = self.adapter_in_rep[index] if self.adapter_in_rep else 0
        o_rep = self.adapter_out_rep[index] if self.adapter_out_rep else 0
        e_in = self._expert_split(self.expert_in, self.expert_in_rep, index, e_tp, e_rep_tp)
        e_out = self._expert_split(self.expert_out, self.expert_out_rep, index, e_tp, e_rep_tp)
        return (i_rep + e_in + (self.adapter_in[index] - i_rep) / tp,
                o_rep + e_out + (self.adapter_out[index] - o_rep) / tp)

    def trained_share(self, cfg: "ModelConfig", index: int) -> float:
        """Trainable parameters of block ``index`` (its adapters, the experts' too; no base weight inside a block
        trains) over the base parameters ``ModelConfig.layer_params`` counts: the share of a shard whose gradients
        exist."""
        return (self.adapter[index] + self._at(self.expert_adapter, index)) / cfg.layer_params(index)

    def layer_flops_delta(self, cfg: "ModelConfig", index: int, seq_len: int) -> float:
        """Executed minus full-training FLOPs per token of block ``index`` (PaLM counting): the adapters' 6 per
        parameter, less the frozen parameters' dW, the dX nothing needs and a skipped attention-core backward."""
        attn = 0.0 if self.attn_bwd[index] else 8.0 * seq_len * cfg.n_heads * cfg.head_dim
        return (6.0 * self.adapter[index] - 2.0 * (self.no_wgrad[index] + self.no_dgrad[index]
                                                   + self.no_dgrad_adapter[index]) - attn + self.expert_flops(index))

    def head_passes(self) -> float:
        """Forward-sized passes of the head matmul: forward, dX where its input needs it, dW where it trains."""
        return 1.0 + float(self.head_dgrad) + float(self.head_trainable)


def lora_step(cfg: "ModelConfig", lora: "LoraConfig") -> LoraStep:
    """The ``LoraStep`` of ``lora`` on ``cfg``: which gradient each block computes, from which of its inputs need one
    (``requires_grad`` propagating from the embedding through q/k/v, attention, wo, the MLP's first linears and w2)."""
    d, hq, gq, r = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, lora.rank
    gpt2 = cfg.arch == "gpt2"
    targets = set(lora.targets)
    saved = set(lora.modules_to_save)
    tied = cfg.tie_embeddings
    embedding_trainable = "tok_embeddings" in saved or (tied and "output" in saved)
    head_trainable = "output" in saved or (tied and "tok_embeddings" in saved)
    qb, kb = (hq, gq) if gpt2 or cfg.qkv_bias else (0, 0)
    sizes = {"wq": (d * hq + qb, d, hq), "wk": (d * gq + kb, d, gq), "wv": (d * gq + kb, d, gq),
             "wo": (hq * d + (d if gpt2 else 0), hq, d)}
    f = cfg.ffn_dim
    dense = {"w1": (d * f + (f if gpt2 else 0), d, f), "w2": (f * d + (d if gpt2 else 0), f, d)}
    if not gpt2:
        dense["w3"] = (d * f, d, f)
    g = embedding_trainable  # whether the block's input needs a gradient
    adapter, no_w, no_x, no_xa, attn_bwd, widths, reps = [], [], [], [], [], [], []
    # the experts' adapters (ExpertAdapter, models/moe.py swiglu_rows): gate_up one A (r x d) and B (2 f_e x r) on
    # w1|w3, down A (r x f_e) and B (d x r) on w2, per expert
    fe, k = cfg.expert_ffn_dim, cfg.top_k
    gate_up, down = "experts.gate_up_proj" in targets, "experts.down_proj" in targets
    per_expert = r * ((d + 2 * fe) * gate_up + (fe + d) * down)
    experts: list[tuple[int, ...]] = []  # (params, active, skipped A dX, in, out, and their tp-whole parts) per block
    row = ("wo", "w2")  # row-parallel bases (parallel/tensor_parallel.py); the others column-parallel
    for i in range(cfg.n_layers):
        moe = cfg.is_moe_layer(i)
        mods = {**sizes, **({} if moe else dense)}
        ad = {m: r * (mods[m][1] + mods[m][2]) for m in targets if m in mods}
        skip_x = skip_xa = skip_xa_rep = 0

        def linear(name: str, needs: bool) -> bool:
            """Whether ``name``'s output needs a gradient given whether its input does; counts the dX it skips."""
            nonlocal skip_x, skip_xa, skip_xa_rep
            if not needs:
                skip_x += mods[name][1] * mods[name][2]  # the weight's dX GEMM (a bias has none)
                skip_xa += r * mods[name][1] if name in ad else 0
                skip_xa_rep += r * mods[name][1] if name in ad and name not in row else 0
            return needs or name in ad

        qkv = [linear(m, g) for m in ("wq", "wk", "wv")]
        attn = any(qkv)
        h1 = g or linear("wo", attn)
        if moe:
            # the experts' input (and the router's) needs a gradient where the block's does (h1); their hidden
            # y = silu(x w1) * (x w3) also where the gate_up adapter trains. Frozen experts pay their dX only there:
            # with expert adapters below everything trainable (block 0, nothing before) w1/w3/router skip theirs
            skip_ea = skip_ea_rep = 0
            if not h1:
                skip_x += cfg.d_model * cfg.n_experts + k * 2 * d * fe  # router, w1 and w3
                skip_ea_rep = k * r * d if gate_up else 0  # gate_up's A: whole on every expert-tp rank
                skip_ea += skip_ea_rep
            if not (h1 or gate_up):
                skip_x += k * fe * d  # w2
                skip_ea += k * r * fe if down else 0
            out = h1 or gate_up or down
            experts.append((cfg.n_experts * per_expert, k * per_expert, skip_ea,
                            k * (d * gate_up + fe * down), k * (2 * fe * gate_up + d * down),
                            k * r * d * (gate_up + down), skip_ea_rep, k * d * gate_up, k * d * down))
        else:
            act = any([linear(m, h1) for m in (("w1",) if gpt2 else ("w1", "w3"))])
            out = linear("w2", act)
            experts.append((0,) * 9)
        g = h1 or out
        adapter.append(sum(ad.values()))
        widths.append((sum(mods[m][1] for m in ad), sum(mods[m][2] for m in ad)))
        col_in = sum(mods[m][1] for m in ad if m not in row)
        row_out = sum(mods[m][2] for m in ad if m in row)
        reps.append((r * (col_in + row_out), skip_xa_rep, col_in, row_out))
        no_w.append(cfg.layer_params(i, active_only=True))  # nothing inside a block trains but its adapters
        no_x.append(skip_x)
        no_xa.append(skip_xa)
        attn_bwd.append(attn)
    return LoraStep(rank=r, adapter=tuple(adapter), no_wgrad=tuple(no_w), no_dgrad=tuple(no_x),
                    no_dgrad_adapter=tuple(no_xa), attn_bwd=tuple(attn_bwd), head_dgrad=g,
                    head_trainable=head_trainable, embedding_trainable=embedding_trainable,
                    adapter_in=tuple(w[0] for w in widths), adapter_out=tuple(w[1] for w in widths),
                    adapter_rep=tuple(x[0] for x in reps), no_dgrad_adapter_rep=tuple(x[1] for x in reps),
                    adapter_in_rep=tuple(x[2] for x in reps), adapter_out_rep=tuple(x[3] for x in reps),
                    expert_adapter=tuple(x[0] for x in experts), expert_adapter_active=tuple(x[1] for x in experts),
                    no_dgrad_expert_adapter=tuple(x[2] for x in experts), expert_in=tuple(x[3] for x in experts),
                    expert_out=tuple(x[4] for x in experts),
                    expert_adapter_active_rep=tuple(x[5] for x in experts),
                    no_dgrad_expert_adapter_rep=tuple(x[6] for x in experts),
                    expert_in_rep=tuple(x[7] for x in experts), expert_out_rep=tuple(x[8] for x in experts))


def lora_flops_per_token(cfg: "ModelConfig", step: LoraStep, seq_len: int) -> float:
    """FLOPs per token a LoRA step executes, PaLM counting (``palm_flops_per_token`` less what LoRA skips, plus the
    adapters): forward 2N, backward dX ~2N (not dW: the base is frozen), the adapters 6 per parameter, the head's dW
    only where it trains; the frozen norms count 4 per weight (palm counts 6). About 4N for a frozen base."""
    from meshwright.tools.flops import palm_flops_per_token

    full = palm_flops_per_token(cfg, seq_len)
    blocks = sum(step.layer_flops_delta(cfg, i, seq_len) for i in range(cfg.n_layers))
    head = 2.0 * cfg.vocab_size * cfg.d_model * (step.head_passes() - 3.0)
    return full + blocks + head - 2.0 * cfg.norm_params()  # the final norm: frozen


def lora_forward_flops_per_token(step: LoraStep) -> float:
    """Forward FLOPs per token of the adapters in all blocks: what full recomputation repeats beside the base."""
    return 2.0 * sum(step.active_adapter(i) for i in range(len(step.adapter)))
