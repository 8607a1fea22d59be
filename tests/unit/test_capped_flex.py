"""Gemma 2's capped attention as FlexAttention (models/capped_flex.py): the one rule that picks the path, parity with
the materialised path, and the planner counting the seq x seq scores only where the run materialises them.

Gradients on CPU: torch's CPU flex_attention refuses inputs that require grad (compiled or eager), so the gradient
parity runs flex_attention's eager reference with that device check lifted (``_cpu_grads``): the same score_mod,
mask_mod, scale and GQA wiring the CUDA kernel compiles, differentiated through the flex HOP's own autograd. The
fused CUDA kernel's forward and gradients are checked on a GPU by ``test_cuda_compiled_flex_matches_...`` below
(benchmarks/gpu_all.sh runs it in its CUDA tests part)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.attention.flex_attention as fa

from meshwright.config import ModelConfig
from meshwright.models.capped_flex import capped_flex_attention, capped_path_note, flex_capped, flex_capped_reason
from meshwright.models.layers import AttentionCore, capped_attention, sliding_window_mask

TOL = 1e-5  # fp32, forward and gradients; measured max |diff| ~1e-6 (sums in another order)


@pytest.fixture
def _cpu_grads(monkeypatch):
    monkeypatch.setattr(fa, "_validate_device", lambda *a: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": on purpose here
        yield


def _qkv(b: int, h: int, kv: int, s: int, d: int, spread: float = 4.0) -> tuple[torch.Tensor, ...]:
    """(batch, heads, seq, head_dim) q and (batch, kv_heads, ...) k/v, scaled so the scores reach the cap."""
    g = torch.Generator().manual_seed(3)
    q = (spread * torch.randn(b, h, s, d, generator=g)).requires_grad_()
    k = (spread * torch.randn(b, kv, s, d, generator=g)).requires_grad_()
    v = torch.randn(b, kv, s, d, generator=g).requires_grad_()
    return q, k, v


def _materialised(q, k, v, cap, scale, window):
    rep = q.shape[1] // k.shape[1]
    s = q.shape[-2]
    mask = sliding_window_mask(s, window) if window is not None and s > window else None
    return capped_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), cap, scale, mask)


def test_one_rule_picks_the_path_and_says_why_in_one_line():
    assert flex_capped(True, "cuda", True, 0.0)
    assert flex_capped(True, "cpu", False, 0.0)  # CPU inference: the compiled CPU kernel
    assert not flex_capped(True, "cpu", True, 0.0)  # CPU training: torch's CPU flex has no backward
    assert not flex_capped(False, "cuda", True, 0.0)  # eager: flex would materialise the scores anyway
    assert not flex_capped(True, "cuda", True, 0.1)  # flex has no dropout
    assert not flex_capped(True, "mps", False, 0.0)
    for args in ((True, "cpu", True, 0.0), (False, "cuda", True, 0.0), (True, "cuda", True, 0.1)):
        reason = flex_capped_reason(*args)
        assert reason and "\n" not in reason
        assert capped_path_note(*args) == f"attention: soft-capped scores materialised (seq x seq per head): {reason}"
    assert "flex_attention" in capped_path_note(True, "cuda", True, 0.0)


@pytest.mark.parametrize("s,window", [(24, None), (24, 5), (160, 40)])
def test_flex_matches_the_materialised_path_forward_and_gradients(_cpu_grads, s, window):
    """Caps, GQA (4 query heads on 2 kv heads), a query scalar and a window shorter than the sequence (160 crosses
    two 128-token blocks)."""
    cap, scale = 2.0, 16 ** -0.5
    q, k, v = _qkv(2, 4, 2, s, 12)
    got = capped_flex_attention(q, k, v, cap, scale, window)
    dy = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), dy)
    want = _materialised(q, k, v, cap, scale, window)
    want_grads = torch.autograd.grad(want, (q, k, v), dy)
    assert (got - want).abs().max() < TOL
    for g, w in zip(grads, want_grads):
        assert (g - w).abs().max() < TOL * max(1.0, w.abs().max().item())
    # not vacuous: without the cap (or the window) the output moves far beyond the tolerance
    uncapped = _materialised(q, k, v, 1e9, scale, window)
    assert (uncapped - want).abs().max() > 1e-2
    if window is not None:
        assert (_materialised(q, k, v, cap, scale, None) - want).abs().max() > 1e-2


def _graph_recorder(seen: list[bool]):
    def backend(gm: torch.fx.GraphModule, example_inputs):
        seen.append(any(n.target is torch.ops.higher_order.flex_attention for n in gm.graph.nodes))
        return gm.forward
    return backend


def test_attention_core_takes_flex_only_where_the_rule_says(_cpu_grads):
    """Traced by torch.compile (a backend that records the graph), the capped core holds the flex HOP when the rule
    says so (CPU without gradients) and the materialised scores otherwise (CPU training, dropout); eager never."""
    torch._dynamo.reset()
    core = AttentionCore(12, 2, False, 0.0, 5, 16 ** -0.5, 2.0)
    q = torch.randn(2, 24, 48, requires_grad=True)
    k, v = (torch.randn(2, 24, 24, requires_grad=True) for _ in range(2))
    seen: list[bool] = []
    compiled = torch.compile(core, backend=_graph_recorder(seen))
    want = core(q, k, v)  # eager: the materialised path
    with torch.no_grad():
        inference = compiled(q, k, v)
    training = compiled(q, k, v)
    assert seen == [True, False]
    assert (inference - want).abs().max() < TOL and (training - want).abs().max() < TOL
    drop = AttentionCore(12, 2, False, 0.1, 5, 16 ** -0.5, 2.0)
    seen.clear()
    with torch.no_grad():
        torch.compile(drop, backend=_graph_recorder(seen))(q, k, v)
    assert seen and not any(seen)  # traced (in one or more graphs), none of them flex
    torch._dynamo.reset()


def test_compiled_cpu_flex_kernel_matches_the_materialised_path():
    """The real thing on CPU: inductor's fused CPU flex kernel (no gradients: inference), block-sparse over a window
    shorter than the sequence, against the eager materialised core."""
    torch._dynamo.reset()
    core = AttentionCore(16, 2, False, 0.0, 64, 16 ** -0.5, 2.0)
    g = torch.Generator().manual_seed(5)
    q, k, v = (4 * torch.randn(1, 192, w, generator=g) for w in (64, 32, 32))
    with torch.no_grad():
        want = core(q, k, v)
        got = torch.compile(core)(q, k, v)
    assert (got - want).abs().max() < TOL
    torch._dynamo.reset()


def _gemma(**kw) -> ModelConfig:
    return ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, n_layers=2, max_seq_len=64, vocab_size=50,
                       attn_softcap=50.0, **kw)


def test_planner_counts_capped_scores_only_on_the_materialised_path():
    """The planner reads the runtime's rule: a compiled CUDA run keeps no scores (flex); eager, a CPU run (no flex
    backward) and attention dropout keep the capped path's bytes per score element."""
    from meshwright.config import load_cluster
    from meshwright.launcher.planner import cost_model as cm

    cfg = _gemma()
    gpu, cpu = load_cluster("dgx-h100-80g"), load_cluster("local-cpu")
    per = 64 * cfg.n_heads * 64  # score elements of 64 tokens at seq 64
    for cluster, compile, dropout, counted in ((gpu, True, 0.0, False), (gpu, False, 0.0, True),
                                               (cpu, True, 0.0, True), (gpu, True, 0.1, True)):
        hw = cm.hardware_from_cluster(cluster, compile=compile)
        c = _gemma(dropout=dropout)
        assert cm.capped_scores(c, hw) == counted
        assert cm.capped_scores(c, hw) != flex_capped(compile, hw.device_type, True, dropout)  # the same rule
        want = per * cm.capped_score_bytes(hw.elem_bytes) if counted else 0.0
        assert cm.attention_score_bytes(c, 64, 64, 1, "none", hw) == want
        assert cm.attention_scores_s(c, 64, 64, 1, hw) > 0 if counted else cm.attention_scores_s(c, 64, 64, 1, hw) == 0


def test_gemma2_9b_at_8k_compiled_on_h100_recomputes_less():
    """``meshwright plan`` for gemma-2-9b, 8 H100s, 8k tokens: compiled, the flex path keeps no scores, so the plan
    recomputes fewer layers (measured 2026-11-27: 15 selective + 27 full before, 34 none + 8 selective after) and
    its peak per layer falls; the eager plan (materialised scores) is as before."""
    import dataclasses

    from meshwright.config import load_cluster, load_model_config
    from meshwright.launcher.planner import cost_model as cm
    from meshwright.launcher.planner.search import search

    cfg, spec = load_model_config("gemma-2-9b"), load_cluster("dgx-h100-80g")
    rank = {"none": 0, "selective": 1, "full": 2}

    def recompute(hw):
        plan = search(cfg, spec, 8192, 64, hw=hw).best.plan
        return sum(rank[s.recompute] for s in plan.layer_strategies())

    flex = cm.hardware_from_cluster(spec, compile=True)
    materialised = dataclasses.replace(flex, device_type="cpu")  # the same run, but the rule says materialise
    assert not cm.capped_scores(cfg, flex) and cm.capped_scores(cfg, materialised)
    assert recompute(flex) < recompute(materialised)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused CUDA flex kernel needs a GPU")
@pytest.mark.parametrize("window", [None, 100])
def test_cuda_compiled_flex_matches_the_materialised_path_forward_and_gradients(window):
    """On a GPU, the compiled training path: forward and gradients of the capped core through inductor's Triton flex
    kernel against the eager materialised core (fp32; TF32 off), and no seq x seq scores saved for backward."""
    from meshwright.memory.accounting import count_saved_bytes

    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.reset()
    core = AttentionCore(64, 2, False, 0.0, window, 0.125, 2.0)
    g = torch.Generator(device="cuda").manual_seed(0)
    s = 512
    inputs = [(2 * torch.randn(2, s, w, device="cuda", generator=g)).requires_grad_() for w in (256, 128, 128)]
    with count_saved_bytes(exclude=inputs) as eager_saved:
        want = core(*inputs)
    dy = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, inputs, dy)
    compiled = torch.compile(core)
    compiled(*inputs)
    with count_saved_bytes(exclude=inputs) as saved:
        got = compiled(*inputs)
    grads = torch.autograd.grad(got, inputs, dy)
    assert (got - want).abs().max() < 1e-4  # fp32 kernel, another summation order
    for a, b in zip(grads, want_grads):
        assert (a - b).abs().max() < 1e-4 * max(1.0, b.abs().max().item())
    # the materialised path saves 8 B per score (2 x 4 heads x 512^2: 16 MiB); flex the output and lse (~1 MiB)
    assert eager_saved.total >= 8 * 2 * 4 * s * s and saved.total * 4 < eager_saved.total
    torch._dynamo.reset()
