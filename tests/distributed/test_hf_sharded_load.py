"""``init_from`` under torchrun: tp2 (DTensor, megatron-core: Llama and GPT-2) / FSDP2 / pp2 loads equal the one-process
load, each rank reads only part of the file and draws no initial values (tests/distributed/hf_load_worker.py)."""

from __future__ import annotations

import pytest
import torch

from helpers import REPO, read_json, run_torchrun

pytestmark = pytest.mark.distributed
transformers = pytest.importorskip("transformers")


def test_sharded_loads_equal_the_one_process_load(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4,
                                                                n_positions=64))
    with torch.no_grad():  # biases start at 0: perturb them so the fused c_attn bias's boxes are seen
        for p in gpt2.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    gpt2.save_pretrained(tmp_path / "gpt2")
    phi3 = transformers.Phi3ForCausalLM(transformers.Phi3Config(  # fused q/k/v and gate/up, a window under SEQ=16
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=8, pad_token_id=None, bos_token_id=None,
        eos_token_id=None))
    phi3.save_pretrained(tmp_path / "phi3")
    out = tmp_path / "report.json"
    run_torchrun(REPO / "tests/distributed/hf_load_worker.py", nproc=2,
                 args=[str(tmp_path / "hf"), str(out), str(tmp_path / "gpt2"), str(tmp_path / "phi3")], timeout=300)
    res = read_json(out)
    cases = ("tp2_dtensor", "tp2_megatron", "tp2_megatron_gpt2", "tp2_dtensor_phi3", "tp2_megatron_phi3", "fsdp2_zero3",
             "pp2")
    for case in cases:
        assert res[case]["ok"], (case, res[case])
    for case in ("tp2_megatron", "tp2_megatron_gpt2", "tp2_megatron_phi3"):  # built on meta: no rank held the whole model
        for rank in range(2):
            assert res[case]["ranks"][str(rank)]["meta_init"], (case, res[case])
    for case in cases:  # the load fills every shard: no rank drew initial values for it (either scheme)
        for rank in range(2):
            r = res[case]["ranks"][str(rank)]
            assert r["init"] == "pretrained" and r["init_draw_calls"] == 0, (case, rank, r)
    for case in cases:  # each rank read about half of the weights, not all of them
        for rank in range(2):
            assert res[case]["ranks"][str(rank)]["read_fraction"] < 0.75, (case, res[case])
