"""MoE / expert parallelism and memory savers (FP8 activations, WTA-CRS) run through DistributedRuntime.

One 4-rank torchrun launch (moe_savers_parity.py) checks every case against the one-process model with
the same savers and the same data shards (loss, full gradients, grad norm, router statistics), and
resumes DCP checkpoints written under ep2 in ep4 and FSDP/ep1 layouts; ep2 layouts also run compiled and with the
chunked head + loss (``loss_chunk_tokens``); the one-line rejections are checked in-process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from helpers import read_json, run_torchrun
from meshwright.config import load_model_config
from meshwright.errors import ConfigError
from meshwright.parallel.support import check_runtime_support
from meshwright.plan import plan_from_dict

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CASES = {"moe_ep2_dp4", "moe_ep4_dp4", "moe_ep2_tp2", "moe_ep2_pp2", "moe_ep1_ddp_dp4", "moe_ep2_dp4_fp8_wta",
         "fp8_dp4_fsdp_layers02", "fp8gemm_dp4_fsdp_layers02", "fp8_layerwise_dp4_tp2", "fp8_dp2_tp2", "fp8_dp2_tp2_sp", "wta_dp4_ddp",
         "fp8gemm_dp2_tp2", "fp8gemm_dp2_tp2_sp", "fp8gemm_scaledmm_dp2_tp2_sp_layers02", "fp8gemm_gpt2_dp2_tp2_sp",
         "fp8gemm_dp2_tp2_sp_zero3_recompute",
         "wta_dp2_tp2", "wta_keep1_dp4_equals_exact", "ckpt_moe_ep2_to_ep4", "ckpt_moe_ep2_to_fsdp_ep1",
         "moe_tp2_dp2", "moe_tp2_dp2_zero3", "moe_tp2_pp2", "ckpt_moe_ep2_tp2_to_dp4", "ckpt_moe_ep2_to_ep2_tp2", "ckpt_moe_tp2_to_ep4",
         "compile_moe_ep2_dp4", "compile_moe_ep2_tp2_recompute", "compile_moe_ep2_pp2_selective",
         "compile_moe_ep1_dp4_selective", "compile_moe_ep1_dp4_zero3",
         "chunked_moe_ep2_dp4", "chunked_compile_moe_ep2_pp2_selective"}
MOE = load_model_config({"name": "m", "arch": "llama", "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4,
                         "n_kv_heads": 2, "ffn_hidden": 64, "moe_ffn_hidden": 48, "n_experts": 4, "top_k": 2,
                         "max_seq_len": 32})
DENSE = load_model_config({"name": "d", "arch": "llama", "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4,
                           "n_kv_heads": 2, "ffn_hidden": 64, "max_seq_len": 32})


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("moe_savers")
    out = tmp / "report.json"
    run_torchrun(HERE / "moe_savers_parity.py", 4, [str(out), str(tmp / "ckpt")], timeout=600)  # 6 expert-tp cases added
    return read_json(out)


@pytest.mark.timeout(630)
@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_one_process(report: dict, case: str) -> None:
    assert case in report, f"case {case} did not run"
    ranks = report[case]["ranks"]
    if ranks["0"].get("skipped"):
        pytest.skip(ranks["0"]["skipped"])
    detail = {r: v.get("error") or {k: v.get(k) for k in ("loss", "grad", "norm", "worst_grad_param", "saver_effect",
                                                           "vs_one_process", "gemm", "router_equal", "n_expert_shards", "vs_exact")}
              for r, v in ranks.items()}
    assert report[case]["ok"], f"{case}: {detail}"


def test_ep_cases_really_shard_experts(report: dict) -> None:
    for case in ("moe_ep2_dp4", "moe_ep2_tp2", "moe_ep2_pp2"):
        assert all(r["n_expert_shards"] > 0 and r["a2a_bytes"] > 0 for r in report[case]["ranks"].values()), case
    assert all(r["a2a_bytes"] == 0 for r in report["moe_ep1_ddp_dp4"]["ranks"].values())


def test_tp_splits_the_experts(report: dict) -> None:
    """Expert tensor parallelism: every rank holds its 1/(tp*ep) of the routed experts' weights (replicated experts,
    the old layout, hold 1/ep), and the tp cases still match the one-process model (test_parity_with_one_process)."""
    for case in ("moe_ep2_tp2", "moe_tp2_dp2", "moe_tp2_pp2", "compile_moe_ep2_tp2_recompute", "moe_ep2_dp4",
                 "moe_ep1_ddp_dp4"):
        for r in report[case]["ranks"].values():
            e = r["expert_numel"]
            assert e["local"] * e["tp"] * e["ep"] == e["full_on_stage"] > 0, (case, e)
    assert {r["expert_numel"]["tp"] for r in report["moe_tp2_dp2"]["ranks"].values()} == {2}


def test_checkpoints_reshard_tp_split_experts(report: dict) -> None:
    """ep x tp expert shards (2-D) and tp-only (DTensor) experts save and resume under other layouts, the model and
    optimizer state equal to the saved one tensor for tensor (``full_state``)."""
    for case in ("ckpt_moe_ep2_tp2_to_dp4", "ckpt_moe_ep2_to_ep2_tp2", "ckpt_moe_tp2_to_ep4"):
        assert all(r["state_equal"] and r["state_tensors"] > 0 for r in report[case]["ranks"].values()), case


def test_savers_are_applied_on_the_planned_layers(report: dict) -> None:
    r0 = report["fp8_dp4_fsdp_layers02"]["ranks"]["0"]
    assert r0["saver_layers"] == {"fp8_act": [0, 2], "wta_crs": []}
    r0 = report["moe_ep2_dp4_fp8_wta"]["ranks"]["0"]
    assert r0["saver_layers"] == {"fp8_act": [0], "wta_crs": [1]}


@pytest.mark.parametrize("case", ["fp8gemm_dp2_tp2", "fp8gemm_dp2_tp2_sp", "fp8gemm_scaledmm_dp2_tp2_sp_layers02",
                                  "fp8gemm_gpt2_dp2_tp2_sp", "fp8gemm_dp2_tp2_sp_zero3_recompute"])
def test_fp8_gemms_run_on_the_tensor_parallel_shards(report: dict, case: str) -> None:
    """Every FP8 GEMM of step 1 (3 per FP8 linear and micro-batch) has this rank's shard shapes, on the
    expected backend; linears reading one activation cast it once under tp too; the tp run equals the per-shard recipe in one process and tracks the whole-tensor one."""
    for rank, r in report[case]["ranks"].items():
        if r.get("skipped"):
            pytest.skip(r["skipped"])
        g = r["gemm"]
        assert g["shapes_equal"] and g["calls"] == g["expected"] > 0, (rank, g)
        assert g["casts"] == g["expected_casts"], (rank, g)  # wq/wk/wv (w1/w3) share one cast of their input
        if "scaledmm" in case:
            assert g["backends"] == ["scaled_mm"] and g["scaled_mm_calls"] == g["calls"], (rank, g)
        else:
            assert g["backends"] == ["emulate"], (rank, g)
        assert r["grad"] <= 2e-3 and r["loss"] <= 1e-5, (rank, r["grad"], r["loss"])
        v = r["vs_one_process"]
        assert v["grad"] <= 1.5 * v["effect"]["grad"] and v["loss"] <= 5e-3, (rank, v)


@pytest.mark.parametrize("case", ["fp8_dp2_tp2", "fp8_dp2_tp2_sp"])
def test_fp8_storage_under_tp_casts_each_shared_input_once(report: dict, case: str) -> None:
    """FP8 storage only: 3 input casts per block and micro-batch (wq/wk/wv, w1/w3, w2; wo keeps its
    input), although the tp hooks hand each linear its own DTensor wrapper (before: 6 per block without sp)."""
    for rank, r in report[case]["ranks"].items():
        assert r["act_casts"]["casts"] == r["act_casts"]["expected"] > 0, (rank, r["act_casts"])


def _plan(layers: list[dict], model: str, **extra) -> object:
    return plan_from_dict({"model": model, "seq_len": 16, "global_batch": 8, "micro_batch": 2, "layers": layers, **extra})


@pytest.mark.parametrize("layers,cfg,tp_backend,dp_backend,match", [
    ([{"tp": 2, "sp": True, "repeat": 2}], MOE, "dtensor", "torch", r"^layers\[0\]\.sp=True is invalid; valid: false on MoE layers"),
    ([{"dp": 2, "ep": 2, "zero": 3, "repeat": 2}], MOE, "dtensor", "torch", r"^layers\[0\]\.zero=3 is invalid; valid: 0 with ep>1"),
    ([{"dp": 2, "ep": 2, "zero": 1, "repeat": 2}], MOE, "dtensor", "torch", r"^layers\[0\]\.zero=1 is invalid; valid: 0 with ep>1"),
    ([{"dp": 4}, {"tp": 2, "dp": 2, "ep": 2}], MOE, "dtensor", "torch", r"^layers\[1\]\.dp=2 is invalid; valid: the largest dp"),
    ([{"tp": 2, "repeat": 2}], MOE, "megatron", "torch", r"^tp_backend='megatron' is invalid; valid: dtensor for MoE"),
    ([{"dp": 2, "repeat": 2}], MOE, "dtensor", "deepspeed", r"^dp_backend='deepspeed' is invalid; valid: torch for MoE"),
    ([{"dp": 2, "savers": {"lemo": 0.5}, "repeat": 2}], DENSE, "dtensor", "torch", r"^layers\[0\]\.savers\.lemo=0\.5 is invalid"),
    ([{"dp": 2, "savers": {"wta_crs": 0.5}, "repeat": 2}], DENSE, "dtensor", "deepspeed", r"^dp_backend='deepspeed' is invalid; valid: torch for plans with memory savers"),
    ([{"tp": 2, "savers": {"fp8_act": True}, "repeat": 2}], DENSE, "megatron", "torch", r"^tp_backend='megatron' is invalid; valid: dtensor for memory savers"),
    ([{"tp": 2, "savers": {"fp8_act": True, "fp8_gemm": True}, "repeat": 2}], DENSE, "megatron", "torch",
     r"^tp_backend='megatron' is invalid; valid: dtensor for memory savers"),
])
def test_unsupported_combinations_give_one_line_errors(layers, cfg, tp_backend, dp_backend, match) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        check_runtime_support(_plan(layers, cfg.name), cfg, tp_backend, dp_backend)
    assert "\n" not in str(e.value)


def test_supported_moe_and_saver_plans_pass_the_checks() -> None:
    check_runtime_support(_plan([{"tp": 2, "dp": 2, "ep": 2, "repeat": 2}], "m"), MOE, "dtensor", "torch")
    check_runtime_support(_plan([{"dp": 4, "zero": 3, "repeat": 2}], "m"), MOE, "dtensor", "torch")
    check_runtime_support(_plan([{"tp": 2, "savers": {"fp8_act": True, "wta_crs": 0.25}, "repeat": 2}], "d"),
                          DENSE, "dtensor", "torch")
    check_runtime_support(_plan([{"tp": 2, "sp": True, "savers": {"fp8_act": True, "fp8_gemm": True}, "repeat": 2}], "d"),
                          DENSE, "dtensor", "torch")


def test_compile_with_ep_compiles_the_collective_free_parts(report: dict) -> None:
    """compile + ep>1: the attention, norms and local experts' SwiGLU of every ep block ran inside compiled graphs
    (dynamo traced every call: none eager), the all-to-alls eager between them; parity is in the test above."""
    for case in ("compile_moe_ep2_dp4", "compile_moe_ep2_tp2_recompute", "compile_moe_ep2_pp2_selective"):
        for rank, r in report[case]["ranks"].items():
            c = r["compiled"]
            assert c["parts"] > 0 and c["calls_compiled"] >= c["parts"] and c["calls_eager"] == 0, (case, rank, c)
            assert r["a2a_bytes"] > 0 and r["n_expert_shards"] > 0, (case, rank)
    for case in ("compile_moe_ep1_dp4_selective", "compile_moe_ep1_dp4_zero3"):  # ep=1: in parts, under recompute
        for rank, r in report[case]["ranks"].items():                          # and FSDP2 too
            c = r["compiled"]
            assert c["parts"] > 0 and c["calls_compiled"] >= c["parts"] and c["calls_eager"] == 0, (case, rank, c)
