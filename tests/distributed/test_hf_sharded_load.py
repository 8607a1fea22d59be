"""``init_from`` under torchrun: tp2 (DTensor, megatron-core: Llama and GPT-2) / FSDP2 / pp2 loads equal the one-process
load, each rank reads only part of the file and draws no initial values (tests/distributed/hf_load_worker.py, in the
shared worker launch: conftest.worker_launch)."""

from __future__ import annotations

import pytest

from helpers import read_json
from worker_launch import case_dir, hf_load

pytestmark = pytest.mark.distributed
transformers = pytest.importorskip("transformers")


@pytest.mark.timeout(1400)  # the shared worker launch (conftest.worker_launch) may run in this test's setup
def test_sharded_loads_equal_the_one_process_load(worker_launch):
    # the Llama, GPT-2 and Phi-3 checkpoints: worker_launch.hf_load writes them before the launch
    res = read_json(case_dir(worker_launch, hf_load) / "report.json")
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
