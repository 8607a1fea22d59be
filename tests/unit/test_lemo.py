"""LeMo token elimination: exactness where it must be exact, and deterministic memory savings."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from meshwright.config import ModelConfig
from meshwright.errors import ConfigError
from meshwright.memory.accounting import count_saved_bytes
from meshwright.memory.lemo import (
    LemoConfig, apply_lemo, attention_block_scores, check_lemo_allowed, dense_layer_activation_bytes_per_token,
    kept_tokens, lemo_activation_bytes, lemo_extra_bytes_per_kept_token, select_blocks, set_lemo_enabled,
    token_index, topk_recall,
)
from meshwright.memory.lemo_predictor import BlockScorePredictor, predictor_recall, train_predictors
from meshwright.memory.lora import apply_lora, lora_parameters
from meshwright.memory.segmented_loss import segmented_lm_loss
from meshwright.models import build_model, lm_loss
from meshwright.config.io import from_dict, to_dict

CFG = ModelConfig(name="lemo-test", d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=256)
B = 16  # block size used in tests


def model(seed: int = 0, cfg: ModelConfig = CFG):
    return build_model(cfg, seed=seed)


def tokens(b: int, s: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (b, s), generator=g)


def test_keep_ratio_one_is_bit_identical_to_dense():
    dense, lemo = model(), model()
    apply_lemo(lemo, LemoConfig(keep_ratio=1.0, block_size=B))
    x, y = tokens(2, 128), tokens(2, 128, seed=2)
    ld, ll = lm_loss(dense(x), y), lm_loss(lemo(x), y)
    assert torch.equal(ld, ll)
    ld.backward()
    ll.backward()
    for (n, pd), (_, pl) in zip(dense.named_parameters(), lemo.named_parameters()):
        assert torch.equal(pd.grad, pl.grad), n


def test_eliminated_tokens_pass_unchanged_and_get_identity_gradient():
    m = model()
    apply_lemo(m, LemoConfig(keep_ratio=0.25, block_size=B, layers=[1]))
    block = m.layers["1"]
    h = torch.randn(2, 128, CFG.d_model, requires_grad=True)
    out = block(h, m.rope(128))
    kept = torch.zeros(2, 128, dtype=torch.bool)
    kept.scatter_(1, token_index(block.lemo.last_kept, B), True)
    assert kept.sum().item() == 2 * 32
    assert torch.equal(out[~kept], h[~kept])
    assert not torch.allclose(out[kept], h[kept])
    g = torch.randn_like(out)
    out.backward(g)
    assert torch.equal(h.grad[~kept], g[~kept])


def _masked_reference(block, h, rope, kept):
    """The dense block with attention masked to kept keys (causal), RoPE at original positions."""
    s = h.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    mask = causal & (kept[:, None, :] | torch.eye(s, dtype=torch.bool))  # (b, q, k); self keeps eliminated rows finite
    h1 = h + block.attention(block.attention_norm(h), rope, attn_mask=mask[:, None])
    return h1 + block.feed_forward(block.ffn_norm(h1))


@pytest.mark.parametrize("arch, kv_heads, threshold", [("llama", 2, None), ("llama", 4, None), ("llama", 2, 0.6),
                                                      ("gpt2", None, None)])
def test_selective_attention_equals_full_attention_masked_to_kept_tokens(arch, kv_heads, threshold):
    cfg = ModelConfig(name="t", arch=arch, d_model=64, n_layers=1, n_heads=4, n_kv_heads=kv_heads, ffn_hidden=96, max_seq_len=256)
    m = model(cfg=cfg)
    apply_lemo(m, LemoConfig(keep_ratio=0.5, block_size=B, threshold=threshold))
    block = m.layers["0"]
    h = torch.randn(3, 128, 64)
    rope = m.rope(128)
    out = block(h, rope)
    kept = torch.zeros(3, 128, dtype=torch.bool)
    kept.scatter_(1, token_index(block.lemo.last_kept, B), True)
    assert len({tuple(r.tolist()) for r in block.lemo.last_kept}) > 1, "sequences should pick different blocks"
    assert 0 < block.lemo.last_kept.shape[1] < 128 // B
    with torch.no_grad():
        ref = _masked_reference(block, h, rope, kept)
    torch.testing.assert_close(out[kept], ref[kept], atol=2e-5, rtol=1e-5)


def test_batch_rows_equal_single_sequence_runs():
    m = model()
    apply_lemo(m, LemoConfig(keep_ratio=0.5, block_size=B))
    x = tokens(2, 128)
    with torch.no_grad():
        batched = m(x)
        for i in range(2):
            torch.testing.assert_close(batched[i], m(x[i:i + 1])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_exact_block_scores_match_brute_force(qk_norm):
    """Scores from the q/k the attention uses: with Qwen3's q/k head norms, the head-normed ones."""
    m = model(cfg=dataclasses.replace(CFG, qk_norm=qk_norm))
    attn = m.layers["0"].attention
    if qk_norm:
        with torch.no_grad():
            attn.q_norm.weight.uniform_(0.5, 2.0)
            attn.k_norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 64, CFG.d_model)
    rope = m.rope(64)
    got = attention_block_scores(attn, x, rope, block_size=8, aggregate="sum", query_chunk=24)  # chunk not a multiple of 8
    mean = attention_block_scores(attn, x, rope, block_size=8, aggregate="mean", query_chunk=64)
    from meshwright.models.layers import apply_rope

    def normed(t, norm):
        return t if norm is None else t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    q = apply_rope(normed(attn.wq(x).view(2, 64, 4, 16), attn.q_norm), *rope)
    k = apply_rope(normed(attn.wk(x).view(2, 64, 2, 16), attn.k_norm), *rope).repeat_interleave(2, dim=2)
    want = torch.zeros(2, 64)
    for i in range(64):
        for j in range(i):
            want[:, j] += torch.relu((q[:, i] * k[:, j]).sum(-1) / 4.0).sum(-1)
    torch.testing.assert_close(got, want.detach().view(2, 8, 8).sum(-1), atol=1e-4, rtol=1e-5)
    later = (63 - torch.arange(64)).clamp_min(1)
    torch.testing.assert_close(mean, (want.detach() / later).view(2, 8, 8).sum(-1), atol=1e-5, rtol=1e-5)


def test_select_blocks_by_ratio_and_threshold():
    s = torch.tensor([[1.0, 9.0, 0.0, 5.0, 3.0], [4.0, 0.0, 0.0, 2.0, 8.0]])
    assert select_blocks(s, 0.4).tolist() == [[1, 3], [0, 4]]
    assert select_blocks(s, 1e-6).shape == (2, 1)
    # threshold 0.75: row 0 needs 9+5 (14/18), row 1 needs 8+4 (12/14) -> both 2 blocks
    assert select_blocks(s, 1.0, threshold=0.75).tolist() == [[1, 3], [0, 4]]
    # threshold 0.9: row 0 needs 9+5+3 (17/18); row 1 needs 8+4+2 -> 3 blocks each
    assert select_blocks(s, 1.0, threshold=0.9).tolist() == [[1, 3, 4], [0, 3, 4]]
    assert token_index(torch.tensor([[0, 2]]), 3).tolist() == [[0, 1, 2, 6, 7, 8]]


def test_topk_recall_on_a_constructed_case():
    true = torch.tensor([[10.0, 9.0, 8.0, 1.0, 0.0, 0.5], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    pred = torch.tensor([[10.0, 0.0, 8.0, 9.0, 0.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    # row 0: true top3 {0,1,2}, pred top3 {0,2,3} -> 2/3; row 1: true {3,4,5}, pred {0,1,2} -> 0
    assert topk_recall(pred, true, 3) == pytest.approx((2 / 3 + 0) / 2)
    assert topk_recall(true, true, 2) == 1.0
    with pytest.raises(ConfigError):
        topk_recall(pred, true, 7)


def test_predictor_suffix_sum_equals_pairwise_definition():
    p = BlockScorePredictor(CFG.d_model, rank=4)
    x = torch.randn(2, 32, CFG.d_model)
    qt, kt = torch.relu(p.q(x)), torch.relu(p.k(x))
    want = torch.stack([(qt[:, j + 1:].sum(1) * kt[:, j]).sum(-1) for j in range(32)], dim=1)
    torch.testing.assert_close(p.token_scores(x), want, atol=1e-5, rtol=1e-5)
    assert p(x, 8).shape == (2, 4)


def test_predictor_training_reduces_loss_and_drives_selection():
    m = model()
    apply_lemo(m, LemoConfig(keep_ratio=0.5, block_size=B, scorer="predictor"))
    with pytest.raises(ConfigError, match="train predictors first"):
        m(tokens(1, 64))
    base = {n: p.detach().clone() for n, p in m.named_parameters()}
    data = [tokens(2, 64, seed=i) for i in range(8)]
    losses = train_predictors(m, iter(data), steps=8, lr=1e-2, rank=8, progress=False)
    assert losses[-1] < losses[0]
    for n, p in m.named_parameters():  # the base stayed frozen
        if "lemo_predictor" not in n:
            assert torch.equal(p, base[n]), n
    recall = predictor_recall(m, [tokens(2, 64, seed=99)])
    assert set(recall) == {0, 1, 2} and all(0.0 <= r <= 1.0 for r in recall.values())
    out = m(tokens(2, 64))  # the predictor now picks the blocks
    assert out.shape == (2, 64, CFG.vocab_size) and torch.isfinite(out).all()


@pytest.mark.parametrize("lora_rank", [None, 4])
def test_saved_bytes_scale_with_kept_fraction_and_match_the_planner_hook(lora_rank):
    x, s, b = tokens(2, 128), 128, 2
    measured = {}
    for ratio in (1.0, 0.5, 0.25):
        m = model()
        if lora_rank:
            apply_lora(m, lora_rank)
        apply_lemo(m, LemoConfig(keep_ratio=ratio, block_size=B))
        h = m.embed(x).detach().requires_grad_()
        with count_saved_bytes(m, exclude=[m.rope_cos, m.rope_sin]) as sb:
            m.layers["1"](h, m.rope(s))
        measured[ratio] = sb.total
        per_tok = dense_layer_activation_bytes_per_token(CFG, lora_rank)
        extra = lemo_extra_bytes_per_kept_token(CFG) if ratio < 1 else 0
        assert sb.total == lemo_activation_bytes(per_tok, s, b, ratio, B, extra)
    dense_per_token = measured[1.0] / (b * s)
    for ratio in (0.5, 0.25):
        kept = kept_tokens(s, ratio, B) * b
        assert measured[ratio] == kept * (dense_per_token + lemo_extra_bytes_per_kept_token(CFG))
        assert measured[ratio] / measured[1.0] < ratio * 1.05


def test_whole_model_saved_bytes_shrink_with_lora_lemo_and_segmented_loss():
    x, y = tokens(1, 128), tokens(1, 128, seed=3)

    def run(ratio):
        m = model()
        apply_lora(m, 4)
        apply_lemo(m, LemoConfig(keep_ratio=ratio, block_size=B, layers=[1, 2]))
        with count_saved_bytes(m) as sb:
            loss = segmented_lm_loss(m, x, y, chunk_size=64)
        loss.backward()
        assert all(p.grad is not None for p in lora_parameters(m))
        assert all(p.grad is None for n, p in m.named_parameters() if "lora" not in n)
        return sb.total
    assert run(0.25) < 0.65 * run(1.0)


@pytest.mark.parametrize("bad, field", [
    ({"keep_ratio": 0.0}, "keep_ratio"), ({"keep_ratio": 1.5}, "keep_ratio"), ({"keep_ratio": [0.5, -1]}, "keep_ratio"),
    ({"block_size": 0}, "block_size"), ({"block_size": -64}, "block_size"), ({"threshold": 1.2}, "threshold"),
    ({"layers": [7]}, "layers"), ({"layers": [0, 1], "keep_ratio": [0.5]}, "keep_ratio"), ({"scorer": "oracle"}, "scorer"),
])
def test_bad_config_gives_one_line_error(bad, field):
    with pytest.raises(ConfigError) as exc:
        apply_lemo(model(), bad)
    msg = str(exc.value)
    assert "\n" not in msg and f"lemo.{field}" in msg and "valid:" in msg


def test_sequence_not_a_multiple_of_block_size_gives_one_line_error():
    m = model()
    apply_lemo(m, LemoConfig(keep_ratio=0.5, block_size=48))
    with pytest.raises(ConfigError, match=r"seq_len=100 is invalid; valid: a multiple of lemo.block_size=48"):
        m(tokens(1, 100))


def test_config_round_trips_and_planner_guard():
    cfg = LemoConfig(keep_ratio=[0.5, 0.3], layers=[1, 2], block_size=32, threshold=None)
    assert from_dict(LemoConfig, to_dict(cfg)) == cfg
    check_lemo_allowed("finetune", ["lemo"])
    with pytest.raises(ConfigError, match="--allow lemo"):
        check_lemo_allowed("finetune", [])
    with pytest.raises(ConfigError, match="task='pretrain'"):
        check_lemo_allowed("pretrain", ["lemo"])
    assert lemo_activation_bytes(100, 256, 2, None) == 100 * 256 * 2


def test_disable_restores_dense_model():
    dense, m = model(), model()
    apply_lemo(m, LemoConfig(keep_ratio=0.25, block_size=B))
    x = tokens(1, 64)
    assert not torch.equal(m(x), dense(x))
    set_lemo_enabled(m, False)
    assert torch.equal(m(x), dense(x))
    assert torch.equal(copy.deepcopy(m)(x), dense(x))
