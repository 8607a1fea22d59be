"""``init_from`` under torchrun: tp2 / FSDP2 / pp2 loads equal the one-process load (tests/distributed/hf_load_worker.py)."""

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
    out = tmp_path / "report.json"
    run_torchrun(REPO / "tests/distributed/hf_load_worker.py", nproc=2, args=[str(tmp_path / "hf"), str(out)], timeout=300)
    res = read_json(out)
    for case in ("tp2_dtensor", "tp2_megatron", "fsdp2_zero3", "pp2"):
        assert res[case]["ok"], (case, res[case])
    for case in ("tp2_dtensor", "fsdp2_zero3", "pp2"):  # each rank read about half of the weights, not all of them
        for rank in range(2):
            assert res[case]["ranks"][str(rank)]["read_fraction"] < 0.75, (case, res[case])
