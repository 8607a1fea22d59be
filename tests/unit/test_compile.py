"""``compile: true`` (train/compile.py): compiled blocks and loss give the eager losses within 1e-4 relative
over a few steps (inductor reorders fp32 reductions and fuses ops, ~1e-6 per step here), keep parameter
names, and the optimiser uses the multi-tensor kernels."""

from __future__ import annotations

import pytest
import torch

from _train_helpers import MICRO
from meshwright.config import load_model_config
from meshwright.errors import ConfigError
from meshwright.models import build_model
from meshwright.train.compile import (
    check_backend,
    compile_blocks,
    compile_expert_parallel_block,
    compile_megatron_tp_block,
    fast_adamw_kwargs,
)
from meshwright.train.local_runtime import LocalRuntime
from meshwright.parallel.recompute import apply_recompute

RTOL = 1e-4


def _losses(rt: LocalRuntime, steps: int = 3) -> list[float]:
    opt = torch.optim.AdamW(rt.param_groups(0.1), lr=3e-3, **fast_adamw_kwargs("cpu"))
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(3))  # one batch: the loss must fall
    out = []
    for _ in range(steps):
        out.append(rt.forward_backward([(x[:, :-1], x[:, 1:])]))
        rt.clip_grad_norm_(1.0)
        rt.optimizer_step(opt)
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_compiled_losses_match_eager(recompute: str) -> None:
    torch._dynamo.reset()
    eager_model = build_model(MICRO, seed=5)
    model = build_model(MICRO, seed=5)
    for m in (eager_model, model):
        for block in m.layers.values():
            apply_recompute(block, recompute)
    names = [n for n, _ in model.named_parameters()]
    compiled = LocalRuntime(model, compile_backend="inductor")
    assert [n for n, _ in compiled.model.named_parameters()] == names  # checkpoints keep the plain names
    assert all(b._compiled_call_impl is not None for b in compiled.model.layers.values())
    traced = []  # the head runs inside the compiled head+loss graph (an unaligned vocab is padded there)
    compiled.model.output.register_forward_pre_hook(lambda mod, args: traced.append(torch.compiler.is_compiling()))
    eager, comp = _losses(LocalRuntime(eager_model)), _losses(compiled)
    assert all(abs(a - b) <= RTOL * abs(a) for a, b in zip(comp, eager)), (comp, eager)
    assert eager[-1] < eager[0]  # it trains
    assert traced and all(traced), traced


def test_backend_is_checked_and_optimizer_kernels_by_device() -> None:
    with pytest.raises(ConfigError, match="compile_backend='tvm' is invalid"):
        check_backend("tvm")
    with pytest.raises(ConfigError):
        compile_blocks(build_model(MICRO, seed=0), "tvm")
    assert fast_adamw_kwargs("cuda") == {"fused": True} and fast_adamw_kwargs("cpu") == {"foreach": True}


@pytest.mark.timeout(300)
def test_compiled_chunked_loss_matches_eager_plain_loss() -> None:
    """compile + loss_chunk_tokens: the compiled per-chunk loss (uneven last chunk) gives the eager plain
    loss and gradients within 1e-5 (aot_eager: the tracing path, without a C++ build)."""
    torch._dynamo.reset()
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(2))
    batch = [(x[:, :-1], x[:, 1:])]
    plain = LocalRuntime(build_model(MICRO, seed=6))
    chunked = LocalRuntime(build_model(MICRO, seed=6), compile_backend="aot_eager", loss_chunk_tokens=20)
    assert chunked.head_loss.chunk_fn is not None
    l0, l1 = plain.forward_backward(batch), chunked.forward_backward(batch)
    assert abs(l1 - l0) <= 1e-5 * abs(l0)
    g0 = dict(plain.model.named_parameters())
    for name, p in chunked.model.named_parameters():
        ref = g0[name].grad
        assert float((p.grad - ref).norm() / ref.norm()) <= 1e-5, name


def test_expert_parallel_compile_needs_expert_parallel_experts() -> None:
    """compile_expert_parallel_block compiles an ep>1 MoE block's collective-free parts; a dense block, or an MoE
    block whose experts are still local (ep=1: the whole block is compiled instead), is refused in one line."""
    moe_cfg = load_model_config({"name": "m", "arch": "llama", "vocab_size": 64, "d_model": 32, "n_layers": 1,
                                 "n_heads": 4, "ffn_hidden": 64, "moe_ffn_hidden": 48, "n_experts": 4, "top_k": 2,
                                 "max_seq_len": 32})
    for cfg in (MICRO, moe_cfg):
        block = build_model(cfg, seed=0).layers["0"]
        with pytest.raises(ValueError, match="no expert-parallel experts"):
            compile_expert_parallel_block(block, "aot_eager")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_megatron_tp_compile_compiles_the_collective_free_parts(arch: str) -> None:
    """compile_megatron_tp_block compiles the norms, the attention core and the MLP activation/gating, never the
    Linears (megatron-core's parallel layers under tp): here on a plain block, whose forward and gradients match the
    eager block's (aot_eager: the same ops), every call of a compiled part traced; an MoE block (no MLP gating
    module) is refused in one line. Parity under megatron tp2: tests/distributed/fullspeed_2rank.py."""
    torch._dynamo.reset()
    cfg = load_model_config({"name": "m", "arch": arch, "vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 4,
                             **({"n_kv_heads": 2} if arch == "llama" else {}), "ffn_hidden": 64, "max_seq_len": 32})
    model = build_model(cfg, seed=0)
    eager, block = model.layers["0"], build_model(cfg, seed=0).layers["0"]
    compile_megatron_tp_block(block, "aot_eager")
    parts = [block.attention_norm, block.attention.core, block.ffn_norm, block.feed_forward.act]
    assert all(p._compiled_call_impl is not None for p in parts) and block._compiled_call_impl is None
    assert not any(m._compiled_call_impl is not None for m in block.modules() if isinstance(m, torch.nn.Linear))
    traced = []
    for p in parts:
        p.register_forward_pre_hook(lambda mod, args: traced.append(torch.compiler.is_compiling()))
    h = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    rope = model.rope(16)
    outs = [b(h, rope) for b in (eager, block)]
    for out in outs:
        out.square().sum().backward()
    assert traced and all(traced) and len(traced) == len(parts)
    assert torch.allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), block.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
    moe_cfg = load_model_config({"name": "m", "arch": "llama", "vocab_size": 64, "d_model": 32, "n_layers": 1,
                                 "n_heads": 4, "ffn_hidden": 64, "moe_ffn_hidden": 48, "n_experts": 4, "top_k": 2,
                                 "max_seq_len": 32})
    with pytest.raises(ValueError, match="no attention.core or feed_forward.act"):
        compile_megatron_tp_block(build_model(moe_cfg, seed=0).layers["0"], "aot_eager")


# an MoE model at ep=1: 2 layers, the capacity limit dropping assignments, h / f_e / experts / top_k distinct
MOE_MICRO = {"name": "micro-moe", "arch": "llama", "vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 4,
             "n_kv_heads": 2, "ffn_hidden": 64, "moe_ffn_hidden": 48, "n_experts": 4, "top_k": 2,
             "capacity_factor": 0.75, "max_seq_len": 64}
MOE_COMPILE_RTOL = 1e-5  # the ep>1 compile parity tolerance (tests/distributed/moe_savers_parity.py COMPILE_RTOL)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_compiled_moe_blocks_at_ep1_compile_in_parts_and_match_eager(recompute: str) -> None:
    """compile: true on an ep=1 MoE model (LocalRuntime): every block is compiled in parts (attention, norms, the
    experts' SwiGLU), not whole, so under selective/full recompute the parts still run traced (compiled whole, the
    graph break inside the checkpoint left the block eager). Loss, first-step gradients and 3 steps' losses match
    the eager run within MOE_COMPILE_RTOL (fp32, aot_eager: the same ops)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = load_model_config(MOE_MICRO)
    models = [build_model(cfg, seed=4) for _ in range(2)]
    for m in models:
        for block in m.layers.values():
            apply_recompute(block, recompute)
    eager, compiled = LocalRuntime(models[0]), LocalRuntime(models[1], compile_backend="aot_eager")
    blocks = list(compiled.model.layers.values())
    parts = [p for b in blocks for p in (b.attention_norm, b.attention, b.ffn_norm, b.feed_forward.experts.mlp)]
    assert all(p._compiled_call_impl is not None for p in parts)
    assert not any(b._compiled_call_impl is not None for b in blocks)  # not whole: no graph break in the block
    calls = torch.zeros(2, dtype=torch.int64)  # [inside a graph, eager]: bumped in place (a list's length is a guard)

    def count(mod, args) -> None:
        if torch.compiler.is_compiling():
            calls[0] += 1
        else:
            calls[1] += 1

    for p in parts:
        p.register_forward_pre_hook(count)
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(3))
    batch = [(x[:, :-1], x[:, 1:])]
    opts = [torch.optim.AdamW(rt.param_groups(0.1), lr=3e-3, **fast_adamw_kwargs("cpu")) for rt in (eager, compiled)]
    losses: list[list[float]] = [[], []]
    for step in range(3):
        for i, rt in enumerate((eager, compiled)):
            losses[i].append(rt.forward_backward(batch))
        if step == 0:
            ref = dict(eager.model.named_parameters())
            for name, p in compiled.model.named_parameters():
                g = ref[name].grad
                assert float((p.grad - g).norm() / g.norm()) <= MOE_COMPILE_RTOL, name
        for rt, opt in zip((eager, compiled), opts):
            rt.clip_grad_norm_(1.0)
            rt.optimizer_step(opt)
    assert all(abs(a - b) <= MOE_COMPILE_RTOL * abs(a) for a, b in zip(*losses)), losses
    assert any(b.feed_forward.last_stats["dropped"] > 0 for b in blocks)  # the capacity limit was exercised
    inside, outside = calls.tolist()  # every call of a part ran inside its graph, recompute's reruns included
    assert inside >= 3 * len(parts) and outside == 0, (inside, outside)
    assert counters["stats"]["unique_graphs"] > 0 and sum(counters["graph_break"].values()) == 0


@pytest.mark.timeout(600)
@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_compiled_gemma_blocks_and_capped_head_match_eager(recompute: str) -> None:
    """A Gemma config (every Gemma field: capped attention's explicit path, the local rope pair, the capped head inside
    the compiled head + loss) compiles per block and trains to eager's losses."""
    torch._dynamo.reset()
    gemma = dict(MICRO, name="micro-gemma", qk_norm=True, norm_unit_offset=True,
                 mlp_act="gelu_tanh", scale_embeddings=True, query_pre_attn_scalar=10, post_norms=True,
                 attn_softcap=5.0, final_softcap=3.0, sliding_window=8, global_every=2, rope_local_theta=100.0)
    models = [build_model(gemma, seed=5) for _ in range(2)]
    for m in models:
        for block in m.layers.values():
            apply_recompute(block, recompute)
    eager, comp = _losses(LocalRuntime(models[0])), _losses(LocalRuntime(models[1], compile_backend="aot_eager"))
    assert all(abs(a - b) <= RTOL * abs(a) for a, b in zip(comp, eager)), (comp, eager)
    assert eager[-1] < eager[0]
