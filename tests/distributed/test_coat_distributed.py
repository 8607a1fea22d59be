"""CoatAdamW with FSDP2-sharded parameters and a DCP resume on 2 gloo ranks (one torchrun launch)."""

from __future__ import annotations

from helpers import REPO, read_json, run_torchrun


def test_coat_fsdp2_parity_and_dcp_resume(tmp_path):
    out = tmp_path / "coat.json"
    run_torchrun(REPO / "tests/distributed/coat_fsdp_worker.py", 2, [str(out), str(tmp_path / "ckpt")], timeout=300)
    res = read_json(out)
    # One-process CoatAdamW on the whole batch vs FSDP2 on two halves: the same to within FP8 rounding
    # flips (reduction order, per-shard groups of the 1-D norm weights), far below one step (lr=1e-3).
    assert res["loss_err"] < 1e-4, res
    assert res["param_err"] < 3e-4, res
    assert res["param_drift"] < 5e-3, res  # no m/eps blow-up: 3 steps of lr 1e-3
    assert res["moment_dtypes"] == ["torch.float8_e4m3fn", "torch.float8_e4m3fn"]
    assert 2.18 < res["state_bytes_per_param"] < 2.2
    assert res["dcp_resume_bitwise"] is True
    assert res["dcp_resume_bitwise_fp32_states"] is True
