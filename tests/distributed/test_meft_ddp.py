"""MEFT under DDP and root-level FSDP2 (2 gloo ranks, in the shared worker launch: conftest.worker_launch): adapter gradients made inside the reversible
backward are all-reduced; tolerance 1e-8 (fp64; MEFT3 divides by λβ=0.01 per layer, 4 layers) against one process with plain autograd."""

from __future__ import annotations

import pytest

from helpers import read_json
from worker_launch import case_dir, meft_ddp

pytestmark = pytest.mark.distributed


@pytest.mark.timeout(1400)  # the shared worker launch (conftest.worker_launch) may run in this test's setup
def test_meft_gradients_are_reduced_under_ddp(worker_launch):
    out = case_dir(worker_launch, meft_ddp) / "meft_ddp"
    for rank in range(2):
        res = read_json(f"{out}.rank{rank}.json")
        assert res["world"] == 2
        for variant in ("meft1", "meft3"):
            assert res[f"{variant}_n_grads"] >= 4 * 4
            assert res[f"{variant}_err_vs_mean"] < 1e-8, res
            assert res[f"{variant}_diff_vs_local"] > 1e-6, res
            assert res[f"{variant}_replica_diff"] == 0.0, res
            assert res[f"{variant}_bucket_view"], res  # the reducer meshwright builds: gradients in its buckets
            assert res[f"{variant}_fsdp_err_vs_mean"] < 1e-8, res
