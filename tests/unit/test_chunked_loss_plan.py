"""The planner's loss memory under ``loss_chunk_tokens`` (issue #17): what the runtimes run on the last stage.

LocalRuntime and DistributedRuntime both take the loss from train/head_loss.py: under ``compile`` the head runs
inside the compiled loss (2 x elem bytes per logit, no fp32 logits), and with ``loss_chunk_tokens`` > 0 head + loss
run per checkpointed chunk, so only one chunk's logits exist. ``cost_model.loss_peak_bytes`` /
``evaluate_plan`` / ``plan --loss-chunk-tokens`` / ``train --plan auto`` must predict that, on the last pipeline
stage only.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from meshwright.config import load_cluster, load_model_config, load_train_config
from meshwright.errors import ConfigError
from meshwright.launcher.planner import auto
from meshwright.launcher.planner import cost_model as cm
from meshwright.memory.accounting import count_saved_bytes
from meshwright.models.chunked_loss import chunked_lm_loss
from meshwright.models.decoder import lm_loss
from meshwright.plan import LayerStrategy, PipelineSpec, Plan

TOKENS = 16 * 1024  # gpt2-small, micro batch 16 x 1024
CHUNK = 2048


def _hw(compile_: bool = False, chunk: int = 0, **kw) -> cm.Hardware:
    return cm.hardware_from_cluster(load_cluster("dgx-h200-141g", nodes=1, devices_per_node=2), compile=compile_,
                                    loss_chunk_tokens=chunk, **kw)


def test_loss_peak_bytes_per_path():
    """Per logit: eager 12 B, compiled 4 B (bf16 logits + bf16 gradient); chunked, the same over one chunk."""
    cfg = load_model_config("gpt2-small")
    v = cfg.vocab_size
    eager, compiled = cm.loss_peak_bytes(cfg, TOKENS, 1, _hw()), cm.loss_peak_bytes(cfg, TOKENS, 1, _hw(True))
    chunked_eager = cm.loss_peak_bytes(cfg, TOKENS, 1, _hw(False, CHUNK))
    chunked_compiled = cm.loss_peak_bytes(cfg, TOKENS, 1, _hw(True, CHUNK))
    assert eager == pytest.approx(TOKENS * v * 12.0)
    assert compiled == pytest.approx(TOKENS * v * 4.0)
    assert chunked_eager == pytest.approx(CHUNK * v * 12.0)
    assert chunked_compiled == pytest.approx(CHUNK * v * 4.0)
    assert chunked_compiled < chunked_eager < compiled < eager
    # a chunk at least as long as the microbatch is the whole microbatch
    assert cm.loss_peak_bytes(cfg, 1000.0, 1, _hw(True, CHUNK)) == pytest.approx(1000.0 * v * 4.0)


def test_chunked_loss_saves_no_logits_measured():
    """What the model above rests on, measured: the plain loss saves fp32 log-probabilities (4 B per logit of
    the batch); the chunked loss saves nothing that grows with tokens x vocab (its chunks are checkpointed)."""
    head = torch.nn.Linear(32, 512, bias=False)

    def per_logit(chunked: bool) -> float:
        def total(n: int) -> int:
            h = torch.randn(1, n, 32, requires_grad=True)
            t = torch.randint(0, 512, (1, n))
            with count_saved_bytes(exclude=[h, head.weight]) as sb:
                loss = chunked_lm_loss(h, head, t, 32) if chunked else lm_loss(head(h), t)
            loss.backward()
            return sb.total
        return (total(256) - total(128)) / (128 * 512)

    assert per_logit(False) >= 4.0
    assert per_logit(True) < 0.1


def _pp2_plan() -> Plan:
    return Plan(model="gpt2-small", cluster="dgx-h200-141g", seq_len=1024, global_batch=64, micro_batch=16,
                pipeline=PipelineSpec(degree=2, schedule="1f1b", microbatches=4), layers=[LayerStrategy(repeat=12)])


@pytest.mark.parametrize("compile_", [False, True])
def test_evaluate_plan_last_stage_only(compile_):
    """pp 2: chunking lowers the last stage's loss term by exactly the logits it no longer holds; the first stage's
    memory is unchanged; the recomputed head forward counts in hardware FLOPs, not in model FLOPs."""
    cfg = load_model_config("gpt2-small")
    whole, chunked = (cm.evaluate_plan(_pp2_plan(), cfg, _hw(compile_, c), 2) for c in (0, CHUNK))
    assert chunked.memory_gib[0] == whole.memory_gib[0]
    per_logit = 4.0 if compile_ else 12.0
    freed = (TOKENS - CHUNK) * cfg.vocab_size * per_logit * (1 + _hw().fragmentation) / cm.GIB
    assert whole.memory_gib[1] - chunked.memory_gib[1] == pytest.approx(freed, rel=1e-6)
    # hardware / model FLOPs: the head's recomputed forward (one more of its 3 passes), on the last stage only
    head = 2.0 * TOKENS * cfg.d_model * cfg.vocab_size * 4  # one forward pass of the head, 4 microbatches
    ratio = lambda p: p.hfu / p.mfu  # noqa: E731
    assert ratio(chunked) - ratio(whole) == pytest.approx(head / (whole.mfu * whole.step_s * 2 * _hw().peak_flops),
                                                          rel=1e-4)
    assert chunked.step_s > whole.step_s and chunked.mfu < whole.mfu


def test_chunk_setting_is_validated_and_meshwright_only():
    with pytest.raises(ConfigError, match="loss_chunk_tokens=-1 is invalid"):
        _hw(False, -1)
    with pytest.raises(ConfigError, match="loss_chunk_tokens=512 is invalid"):
        cm.hardware_from_cluster(load_cluster("dgx-h200-141g"), stack="megatron", loss_chunk_tokens=512)
    # not meshwright: the field would be ignored (loss_chunked is False), so the figures equal the plain ones
    cfg = load_model_config("gpt2-small")
    mega = cm.hardware_from_cluster(load_cluster("dgx-h200-141g"), stack="megatron")
    assert cm.loss_peak_bytes(cfg, TOKENS, 1, dataclasses.replace(mega, loss_chunk_tokens=CHUNK)) == \
        cm.loss_peak_bytes(cfg, TOKENS, 1, mega)


def test_plan_auto_and_the_cli_follow_loss_chunk_tokens(monkeypatch, capsys):
    """``train --plan auto`` plans for TrainConfig.loss_chunk_tokens; ``plan --loss-chunk-tokens`` predicts it."""
    from meshwright.cli import main

    seen = []
    real = cm.hardware_from_cluster

    def spy(*a, **kw):
        seen.append(kw.get("loss_chunk_tokens"))
        return real(*a, **kw)

    monkeypatch.setattr(auto.cm, "hardware_from_cluster", spy)
    for chunk in (16, 0):
        tc = load_train_config({"model": "tiny", "cluster": "local-cpu", "seq_len": 32, "global_batch": 2,
                                "micro_batch": 1, "loss_chunk_tokens": chunk})
        auto.auto_plan(tc, 1)
    assert seen == [16, 0]
    argv = ["plan", "--model", "gpt2-small", "--cluster", "dgx-h200-141g", "--nodes", "1", "--devices-per-node", "1",
            "--seq-len", "1024", "--global-batch", "16", "--tp", "1", "--pp", "1", "--dp", "1", "--recompute", "none",
            "--micro-batch", "16", "--compile", "--json"]
    got = {}
    for extra in ([], ["--loss-chunk-tokens", str(CHUNK)]):
        assert main(argv + extra) in (0, None)
        got[bool(extra)] = json.loads(capsys.readouterr().out)["predicted"]["breakdown"]
    assert got[False]["mem_loss_gib"] * cm.GIB == pytest.approx(TOKENS * 50257 * 4, rel=1e-5)
    assert got[True]["mem_loss_gib"] * cm.GIB == pytest.approx(CHUNK * 50257 * 4, rel=1e-5)


def test_search_finds_the_layout_only_the_chunked_loss_fits():
    """The search's per-rank memory (``_rank_extra_bytes``) counts the chunked loss too: under a 9.5 GiB budget,
    gpt2-small mb 16 x 1024 without recompute fits on one H200 only with the chunked compiled loss."""
    from meshwright.launcher.planner.search import Constraints, search

    cfg = load_model_config("gpt2-small")
    cluster = load_cluster("dgx-h200-141g", nodes=1, devices_per_node=1)
    c = Constraints(tp=1, pp=1, dp=1, recompute="none", micro_batch=16)
    got = {}
    for chunk in (0, CHUNK):
        hw = cm.hardware_from_cluster(cluster, memory_budget_gib=9.5, compile=True, loss_chunk_tokens=chunk)
        got[chunk] = search(cfg, cluster, 1024, 16, hw=hw, constraints=c, suggest=False).best
    assert got[0] is None
    assert got[CHUNK] is not None and max(got[CHUNK].prediction.memory_gib) <= 9.5
