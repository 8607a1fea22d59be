"""The MoE block: routing, capacity dropping, balance/z losses, parameter counts and EP checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from meshwright.config import load_model_config
from meshwright.errors import ConfigError
from meshwright.models import build_model, count_parameters, lm_loss
from meshwright.models.moe import MoE, load_balancing_loss, route, router_stats, router_z_loss
from meshwright.parallel.expert_parallel import check_ep, ep_cost_terms
from meshwright.plan import LayerStrategy, Plan, validate_plan


def _cfg(**kw):
    base = {"name": "t", "arch": "llama", "vocab_size": 32, "d_model": 8, "n_layers": 2, "n_heads": 2,
            "ffn_hidden": 16, "moe_ffn_hidden": 12, "n_experts": 4, "top_k": 2, "capacity_factor": None,
            "max_seq_len": 16, "aux_loss_coef": 0.1, "z_loss_coef": 0.01}
    base.update(kw)
    return load_model_config(base)


def _expert(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    ex = moe.experts
    return (F.silu(x @ ex.w1[e].t()) * (x @ ex.w3[e].t())) @ ex.w2[e].t()


def _naive(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token reference without capacity: sum_k gate_k * expert_k(x)."""
    probs = torch.softmax(moe.router(x), -1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        p, i = torch.topk(probs[t], moe.top_k)
        w = p / p.sum() if moe.top_k > 1 else p
        for k in range(moe.top_k):
            out[t] += w[k] * _expert(moe, int(i[k]), x[t:t + 1])[0]
    return out


def _steered(moe: MoE, logits4: torch.Tensor) -> torch.Tensor:
    """Inputs whose router logits are exactly ``logits4`` (router = identity on the first 4 dims)."""
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :4] = torch.eye(4)
    x = torch.randn(logits4.shape[0], moe.router.in_features) * 0.5
    x[:, :4] = logits4
    return x


# ---- parameter counts and FLOPs ------------------------------------------------------------------

def test_module_params_match_config():
    for name in ("tiny-moe",):
        cfg = load_model_config(name)
        assert count_parameters(build_model(cfg, seed=0)) == cfg.num_params()
    cfg = load_model_config("mixtral-8x7b")
    model = build_model(cfg, device="meta")
    assert count_parameters(model) == cfg.num_params()
    assert cfg.num_params() / 1e9 == pytest.approx(46.7, abs=0.05)  # Mixtral paper: 46.7B total
    assert cfg.num_params(active_only=True) / 1e9 == pytest.approx(12.9, abs=0.05)  # ~12.9B active


def test_flops_count_only_active_experts():
    c1, c2 = _cfg(top_k=1), _cfg(top_k=2)
    one_expert = 3 * c1.d_model * c1.expert_ffn_dim
    assert c2.flops_per_token(16) - c1.flops_per_token(16) == 6 * c1.n_moe_layers * one_expert
    c8 = _cfg(n_experts=8, top_k=2)
    assert c8.flops_per_token(16) == c2.flops_per_token(16) + 6 * c8.n_moe_layers * c8.d_model * 4  # router only


# ---- routing and outputs -------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [1, 2])
def test_no_drop_matches_token_by_token_reference(top_k):
    moe = MoE(_cfg(top_k=top_k))
    x = torch.randn(2, 7, 8)
    y = moe(x)
    assert torch.allclose(y.reshape(-1, 8), _naive(moe, x.reshape(-1, 8)), atol=1e-6)
    assert moe.last_stats["dropped"] == 0
    assert int(moe.last_stats["tokens_per_expert"].sum()) == 14 * top_k
    # A huge capacity factor is the same as no dropping.
    moe.capacity_factor = 100.0
    assert torch.equal(moe(x), y)


def test_gates_top1_raw_probability_top2_renormalised():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
    r1 = route(logits, 1, None)
    p = torch.softmax(logits, -1)
    assert torch.allclose(r1.weights.sort().values, torch.stack([p[0, 0], p[1, 2]]).sort().values)
    r2 = route(logits, 2, None)
    per_token = torch.zeros(2).index_add(0, r2.token_idx, r2.weights)
    assert torch.allclose(per_token, torch.ones(2))
    assert r2.expert_idx.tolist() == sorted(r2.expert_idx.tolist())  # grouped by expert for dispatch


def test_routing_is_deterministic_and_router_gets_gradient():
    moe = MoE(_cfg(top_k=1, capacity_factor=1.0))
    x = torch.randn(3, 5, 8)
    y1, y2 = moe(x), moe(x)
    assert torch.equal(y1, y2)
    (y1.pow(2).sum() + moe.last_aux_loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.experts.w1.grad.abs().sum() > 0


def test_capacity_drops_known_tokens_top1():
    """8 tokens all prefer expert 0; c=1 -> C = ceil(1*8*1/4) = 2: tokens 0,1 kept, 6 dropped."""
    moe = MoE(_cfg(top_k=1, capacity_factor=1.0))
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0]]).repeat(8, 1)
    x = _steered(moe, logits)
    y = moe(x)
    assert moe.last_stats["capacity"] == 2
    assert moe.last_stats["dropped"] == 6
    assert moe.last_stats["dropped_frac"] == pytest.approx(6 / 8)
    assert moe.last_stats["tokens_per_expert"].tolist() == [2, 0, 0, 0]
    assert torch.all(y[2:] == 0)  # dropped tokens get no expert output (the residual carries them)
    gate = torch.softmax(logits[0], -1)[0]
    assert torch.allclose(y[:2], gate * _expert(moe, 0, x[:2]), atol=1e-6)


def test_capacity_priority_first_choices_before_second_top2():
    """Tokens 0-3 prefer (e0, e1), tokens 4-7 prefer (e1, e0); c=1 -> C = ceil(8*2/4) = 4.
    Expert 0 fills with the first choices of tokens 0-3, expert 1 with those of 4-7, so all 8
    second choices are dropped and each token gets only its first expert (with its renormalised gate)."""
    moe = MoE(_cfg(top_k=2, capacity_factor=1.0))
    a = torch.tensor([2.0, 1.0, -5.0, -5.0])
    logits = torch.stack([a] * 4 + [a[[1, 0, 2, 3]]] * 4)
    x = _steered(moe, logits)
    y = moe(x)
    assert moe.last_stats["capacity"] == 4
    assert moe.last_stats["dropped"] == 8
    assert moe.last_stats["tokens_per_expert"].tolist() == [4, 4, 0, 0]
    p = torch.softmax(a, -1)
    w_first = p[0] / (p[0] + p[1])
    assert torch.allclose(y[:4], w_first * _expert(moe, 0, x[:4]), atol=1e-6)
    assert torch.allclose(y[4:], w_first * _expert(moe, 1, x[4:]), atol=1e-6)


# ---- auxiliary losses ----------------------------------------------------------------------------

def test_load_balancing_loss_hand_computed():
    """E=2, top-1. Router probabilities (rows): [.75,.25], [.75,.25], [.25,.75], [.6,.4].
    f = (3/4, 1/4); P = (2.35/4, 1.65/4) = (.5875, .4125); loss = 2*(.75*.5875 + .25*.4125) = 1.0875.
    Logits are log(p) + c_t, so logsumexp = c_t and the z-loss is mean(c_t^2) = (0+1+4+9)/4 = 3.5."""
    p = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.25, 0.75], [0.6, 0.4]])
    c = torch.tensor([0.0, 1.0, 2.0, 3.0])
    logits = p.log() + c[:, None]
    r = route(logits, 1, None)
    assert r.balance_loss.item() == pytest.approx(1.0875, rel=1e-6)
    assert r.z_loss.item() == pytest.approx(3.5, rel=1e-6)
    assert load_balancing_loss(p, torch.tensor([[0], [0], [1], [0]]), 2).item() == pytest.approx(1.0875, rel=1e-6)
    assert router_z_loss(logits).item() == pytest.approx(3.5, rel=1e-6)
    # Perfectly uniform routing gives exactly 1.
    assert load_balancing_loss(torch.full((4, 4), 0.25), torch.arange(4)[:, None], 4).item() == pytest.approx(1.0)


def test_decoder_aux_loss_sums_layer_losses_with_coefficients():
    cfg = _cfg(capacity_factor=1.25)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    logits = model(tokens[:, :-1])
    blocks = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(blocks) == cfg.n_moe_layers == 2
    expect = sum(0.1 * m.last_stats["balance_loss"] + 0.01 * m.last_stats["z_loss"] for m in blocks)
    assert model.aux_loss().item() == pytest.approx(expect, rel=1e-5)
    (lm_loss(logits, tokens[:, 1:]) + model.aux_loss()).backward()
    stats = router_stats(model)
    assert set(stats["moe_layers"]) == {"layers.0.feed_forward", "layers.1.feed_forward"}
    assert sum(stats["moe_layers"]["layers.0.feed_forward"]["tokens_per_expert"]) <= 16 * 2
    assert 0.0 <= stats["moe_dropped_frac"] < 1.0
    assert stats["moe_balance_loss"] >= 1.0 - 1e-6  # E * sum f*P is minimised (=1) by uniform routing


# ---- expert-parallel configuration ---------------------------------------------------------------

def test_bad_ep_values_give_one_line_errors():
    with pytest.raises(ConfigError, match=r"ep=3 is invalid; valid: a divisor of n_experts=4"):
        check_ep(4, 3, 6)
    with pytest.raises(ConfigError, match=r"ep=4 is invalid; valid: a divisor of dp=2"):
        check_ep(4, 4, 2)
    with pytest.raises(ConfigError, match=r"ep=0 is invalid"):
        check_ep(4, 0, 2)
    cfg = load_model_config("tiny-moe")
    plan = Plan(model="tiny-moe", global_batch=8, micro_batch=1, layers=[LayerStrategy(dp=4, ep=3, repeat=4)])
    with pytest.raises(ConfigError, match=r"layers\[0\]\.ep=3 is invalid; valid: a divisor of n_experts=4") as e:
        validate_plan(plan, cfg, 4)
    assert "\n" not in str(e.value)
    plan = Plan(model="tiny-moe", global_batch=8, micro_batch=1, layers=[LayerStrategy(dp=2, ep=4, repeat=4)])
    with pytest.raises(ConfigError, match=r"layers\[0\]\.ep=4 is invalid; valid: a divisor of dp=2"):
        validate_plan(plan, cfg, 2)
    dense = load_model_config("tiny")
    plan = Plan(model="tiny", global_batch=8, micro_batch=1, layers=[LayerStrategy(dp=2, ep=2, repeat=dense.n_layers)])
    with pytest.raises(ConfigError, match=r"ep=2 is invalid; valid: 1 \(layer 0 has no experts\)"):
        validate_plan(plan, dense, 2)
    validate_plan(Plan(model="tiny-moe", global_batch=8, micro_batch=1, layers=[LayerStrategy(dp=4, ep=2, repeat=4)]), cfg, 4)


def test_ep_cost_terms():
    cfg = load_model_config("mixtral-8x7b")
    one = ep_cost_terms(cfg, 1, tokens=4096)
    eight = ep_cost_terms(cfg, 8, tokens=4096, bytes_per_elem=2)
    per_layer = 8 * 3 * 4096 * 14336
    assert one.expert_params_per_layer == per_layer
    assert eight.expert_params_per_rank == 32 * per_layer // 8
    assert eight.expert_param_bytes_per_rank == 2 * 32 * per_layer // 8
    assert one.a2a_bytes_per_layer == 0 and one.a2a_seconds_per_step == 0
    assert eight.a2a_bytes_per_layer == 4 * 4096 * 2 * 4096 * 2  # 4 * tokens * top_k * hidden * bytes
    assert eight.a2a_remote_bytes_per_layer == pytest.approx(eight.a2a_bytes_per_layer * 7 / 8)
    assert eight.a2a_bytes_per_step == 32 * eight.a2a_bytes_per_layer
    dropping = ep_cost_terms(cfg, 8, tokens=4096, capacity_factor=0.5)
    assert dropping.a2a_bytes_per_layer == math.floor(4096 * 2 * 0.5) * 4096 * 4 * 4
    with pytest.raises(ConfigError, match="ep=3"):
        ep_cost_terms(cfg, 3, tokens=16)


def test_aux_loss_through_backward_equals_explicit_aux_loss():
    """Pipeline stages inject the aux loss in backward; gradients must equal lm + aux_loss()."""
    from meshwright.models.moe import attach_aux_loss_to_backward

    cfg = _cfg(capacity_factor=1.0)
    a = build_model(cfg, seed=3)
    b = build_model(cfg, seed=3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    la = lm_loss(a(tokens[:, :-1]), tokens[:, 1:]) + a.aux_loss()
    la.backward()
    assert attach_aux_loss_to_backward(b) == 2
    lb = lm_loss(b(tokens[:, :-1]), tokens[:, 1:])
    assert b.aux_loss() is None  # not counted twice by a trainer that adds aux_loss()
    lb.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-7), name
    assert a.layers["0"].feed_forward.router.weight.grad.abs().sum() > 0


def test_meta_forward_keeps_shape():
    cfg = _cfg()
    model = build_model(cfg, device="meta")
    out = model(torch.zeros(2, 8, dtype=torch.long, device="meta"))
    assert out.shape == (2, 8, cfg.vocab_size) and out.device.type == "meta"


def test_experts_without_tokens_get_zero_not_none_gradients():
    from meshwright.models.moe import GroupedExperts

    ex = GroupedExperts(2, 8, 4)
    x = torch.zeros(0, 8, requires_grad=True)
    ex(x, torch.tensor([0, 0])).sum().backward()
    assert ex.w1.grad is not None and torch.all(ex.w1.grad == 0) and torch.all(ex.w2.grad == 0)


# ---- one-process run log (#19 item 8) ----------------------------------------------------------------------

def test_local_runtime_logs_lm_loss_and_aux_loss_apart_with_router_stats():
    """The one-process runtime trains on LM + aux but logs the LM loss alone, with ``aux_loss`` and the
    router statistics beside it, as the distributed runtime logs them."""
    from meshwright.train.local_runtime import LocalRuntime

    cfg = _cfg()
    model = build_model(cfg, seed=0)
    ref = build_model(cfg, seed=0)
    rt = LocalRuntime(model)
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.max_seq_len), generator=torch.Generator().manual_seed(3))
    batches = [(tokens[:2, :-1], tokens[:2, 1:]), (tokens[2:, :-1], tokens[2:, 1:])]
    logged = rt.forward_backward(batches)
    lm, aux = [None] * 2, [None] * 2
    for i, (x, y) in enumerate(batches):
        lm[i] = lm_loss(ref(x), y)
        aux[i] = ref.aux_loss()
    assert logged == pytest.approx(sum(float(v) for v in lm) / 2, rel=1e-6)  # LM loss only
    fields = rt.extra_log_fields()
    assert fields["aux_loss"] == pytest.approx(sum(float(a) for a in aux) / 2, rel=1e-5) and fields["aux_loss"] > 0
    assert set(fields) >= {"moe_layers", "moe_dropped_frac", "moe_balance_loss"}
    # and gradients are those of LM + aux
    sum(((lm_i + a) / 2) for lm_i, a in zip(lm, aux)).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name


def test_moe_runs_under_bf16_autocast():
    """Under the bf16 policy (autocast, fp32 weights) the experts return bf16 rows: the combine adds them in that
    dtype (index_add wants one dtype; the fp32 residual add upcasts the block's output again), and a step trains."""
    from meshwright.train.local_runtime import LocalRuntime

    cfg = _cfg(n_layers=2, capacity_factor=1.25)
    model = build_model(cfg, seed=0)
    x = torch.randn(2, 8, cfg.d_model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.layers["0"].feed_forward(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    rt = LocalRuntime(model, dtype="bf16")
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    loss = rt.forward_backward([(tokens[:, :-1], tokens[:, 1:])])
    assert math.isfinite(loss)
    grads = [p.grad for n, p in model.named_parameters() if "experts" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
