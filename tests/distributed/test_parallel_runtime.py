"""Loss/gradient parity of every parallel layout against the one-process run, under torchrun + gloo.

Two launches: 4 ranks (2-D/3-D layouts, a checkpoint written under dp2·tp2 and resumed under
pp2·dp2; bf16 pipelines whose stages pass FSDP2-cast bf16 hidden states, each declared up front; per ZeRO level 0-3 a
pp2·dp2 checkpoint resumed under dp4 and a dp4 one under pp2·dp2, the state equal bit for bit, and a LoRA ZeRO-1 dp4
one under pp2·dp2; the pp2·dp2 ones resumed in one process here) and 2 ranks (all 2-device layouts incl. DeepSpeed ZeRO-1/2/3, and the same checkpoint
resumed under pp2; LoRA under DDP, FSDP2, DTensor tp2 (+sp) and pp2 -- on 4 ranks tp2 x dp2 and pp2 x dp2 -- with
an adapter-only ZeRO-3 and a tp2 LoRA checkpoint resumed under DDP; LoRA under megatron-core tp2 -- on 4 ranks tp2 x
dp2 -- with an adapter-only checkpoint resumed under DDP). The checkpoint is also resumed here in one process, and the tp2 LoRA checkpoints (DTensor
and megatron-core) resumed in one process and exported (--hf, --peft) beside the same run trained in one process. Tolerance: relative L2
error <= 1e-5 for loss, full gradients (keyed by the plain model's names) and the global grad norm.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from helpers import read_json, run_torchrun

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FOUR_RANK = {"dp2_tp2_fsdp", "dp2_tp2_sp_zero0", "dp2_tp2_megatron", "pp2_tp2", "pp2_dp2",
             "pp2_layerwise_dp2_zero2_tp2", "ckpt_dp2tp2_to_pp2dp2",
             "hsdp_dp4_shard2", "hsdp_dp2x_tp2_zero2", "hsdp_plan_per_layer", "lora_tp2_dp2_fsdp", "lora_pp2_dp2",
             "lora_tp2_dp2_megatron", "pp2_dp2_zero1", "lora_ckpt_dp4_zero1_to_pp2dp2_zero1",
             "bf16_pp2_dp2_zero3", "bf16_pp2_dp2_zero_mix", "bf16_chunked_pp2_dp2_zero3",
             *(f"ckpt_{a}_zero{z}" for z in (0, 1, 2, 3) for a in ("pp2dp2_to_dp4", "dp4_to_pp2dp2"))}
TWO_RANK = {"dp2_ddp", "dp2_zero1", "dp2_zero2_fsdp", "dp2_zero3_fsdp", "tp2_dtensor", "tp2_megatron", "tp2_sp",
            "pp2_1f1b", "pp2_gpipe", "pp2_interleaved", "layerwise_tp_zero_mix", "recompute_full_dp2",
            "recompute_selective_tp2", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "ckpt_dp2tp2_to_pp2",
            "ckpt_megatron_to_dtensor", "zero2_gathers_once_per_step", "deepspeed_zero0_state_bytes",
            "deepspeed_zero1_state_bytes", "deepspeed_zero2_state_bytes", "deepspeed_zero3_state_bytes",
            "deepspeed-fp32-accum_zero1_state_bytes", "deepspeed_fp32_zero0_state_bytes", "deepspeed_fp32_zero1_state_bytes",
            "deepspeed_fp32_zero2_state_bytes", "deepspeed_fp32_zero3_state_bytes", "deepspeed_pp2_zero0_state_bytes",
            "tp2_dtensor_qk_norm", "tp2_megatron_qk_norm", "tp2_sp_qk_norm", "lora_dp2_ddp", "lora_dp2_zero1", "lora_dp2_zero2_fsdp",
            "lora_dp2_zero3_fsdp", "lora_ckpt_zero3_to_ddp", "lora_tp2", "lora_tp2_sp", "lora_pp2_1f1b", "lora_tp2_sp_gemma",
            "lora_ckpt_tp2_to_ddp", "lora_tp2_megatron", "lora_ckpt_tp2_megatron_to_ddp", "tp2_dtensor_gemma",
            "tp2_megatron_gemma", "tp2_sp_gemma", "zero1_ckpt_resume_bitwise", "zero1_ckpt_to_zero2", "zero0_ckpt_to_zero1"}


def _failures(report: dict) -> str:
    lines = []
    for name, case in report.items():
        if not case["ok"]:
            for rank, r in case["ranks"].items():
                lines.append(f"{name} rank{rank}: {r.get('error') or {k: r.get(k) for k in ('loss', 'grad', 'norm', 'worst_grad_param')}}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def four_rank(tmp_path_factory) -> tuple[dict, Path]:
    d = tmp_path_factory.mktemp("p4")
    out, ckpt = d / "report.json", d / "ckpt"
    run_torchrun(HERE / "parity_4rank.py", 4, [str(out), str(ckpt)], timeout=420)
    return read_json(out), ckpt


@pytest.mark.timeout(900)
def test_four_rank_layouts_match_one_process(four_rank) -> None:
    report, _ = four_rank
    assert set(report) == FOUR_RANK
    assert all(c["ok"] for c in report.values()), _failures(report)
    # ZeRO-1 under pp2 x dp2: each stage's pair partitions its own parameters whole; the planner's largest share per
    # stage (launcher/planner/zero1_partition.py) is what the larger rank of each pair holds (AdamW: 8 B/element)
    from parity_4rank import CASES
    from parity_lib import CFG

    from meshwright.launcher.planner.zero1_partition import stage_state_numels
    from meshwright.plan import plan_from_dict

    check_pipeline_forwards(report, PIPELINE_4)
    held = [r["opt_state_bytes"] for _, r in sorted(report["pp2_dp2_zero1"]["ranks"].items())]
    planned = stage_state_numels(CFG, plan_from_dict(CASES["pp2_dp2_zero1"][0]), 2, {})
    assert [max(held[0:2]), max(held[2:4])] == [8 * n for n in planned], (held, planned)


PIPELINE_4 = {"pp2_tp2", "pp2_dp2", "pp2_dp2_zero1", "pp2_layerwise_dp2_zero2_tp2", "lora_pp2_dp2"}
PIPELINE_2 = {"pp2_1f1b", "pp2_gpipe", "pp2_interleaved", "lora_pp2_1f1b", "ckpt_dp2tp2_to_pp2"}


def check_pipeline_forwards(report: dict, names: set[str]) -> None:
    """Each pp case's chunks ran exactly one forward per micro-batch of its eval and steps (parity_lib.check_runtime
    counts them): the stages' shapes were fixed up front, so no schedule ran torch's shape-inference forward (with it
    each chunk counted one more per schedule, eval's and training's: 18 where 16 are the micro-batches'), and every
    stage returned the dtype it declared (``stage_casts``)."""
    for name in names:
        for rank, r in report[name]["ranks"].items():
            assert r["chunk_forwards"] == r["chunk_forwards_expected"], (name, rank, r["chunk_forwards"])
            assert min(r["chunk_forwards"]) > 0 and r["stage_casts"] == 0, (name, rank, r)


@pytest.mark.timeout(300)
def test_pp2dp2_checkpoints_resume_in_one_process(four_rank) -> None:
    """The pp2 x dp2 checkpoints of every ZeRO level (each stage wrote its own parameters' states and settings under
    their own keys: train/optim_layout.py) load into one process: the state equals the one the 4 ranks saved, bit for
    bit (the worker's ``full_state.pt``, settings included), and steps 3-4 follow the uninterrupted one-process run."""
    from parity_lib import CFG, RTOL, SEED, full_state, make_opt, reference, rel, state_diff
    import torch

    from meshwright.models import build_model
    from meshwright.train.checkpoint import load_runtime
    from meshwright.train.local_runtime import LocalRuntime

    _, ckpt = four_rank
    ref = reference(steps=4)
    for z in (0, 1, 2, 3):
        path = ckpt.with_name(f"{ckpt.name}_pp_zero{z}")
        saved = torch.load(path / "full_state.pt", weights_only=True)
        model = build_model(CFG, seed=SEED + 1)
        rt = LocalRuntime(model)
        opt = rt.build_optimizer(make_opt)
        assert load_runtime(path, rt, opt)["step"] == 2
        assert state_diff(saved, full_state(rt, opt)) == [], z
        assert len(opt.state) == len(list(model.parameters()))  # both stages' states
        resumed = reference(steps=2, model=model, opt=opt, start=2)
        for a, b in zip(resumed, ref[2:]):
            assert rel(a["loss"], b["loss"]) <= RTOL, (z, a["loss"], b["loss"])


@pytest.fixture(scope="module")
def two_rank(four_rank, tmp_path_factory) -> tuple[dict, Path]:
    """The 2-rank launch's report and its directory (the tp2 LoRA run, parity_2rank.LORA_RUN, lies there)."""
    _, ckpt = four_rank
    out = tmp_path_factory.mktemp("p2") / "report.json"
    run_torchrun(HERE / "parity_2rank.py", 2, [str(out), "", str(ckpt)], timeout=420)
    return read_json(out), out.parent


@pytest.mark.timeout(900)
def test_two_rank_layouts_match_one_process_and_resume_under_pp2(two_rank) -> None:
    report, run_dir = two_rank
    assert set(report) == TWO_RANK
    assert all(c["ok"] for c in report.values()), _failures(report)
    check_pipeline_forwards(report, PIPELINE_2)
    # ZeRO-1/2/3 really shard the optimizer states: each rank holds about half of DDP's Adam states
    full = report["dp2_ddp"]["ranks"]["0"]["opt_state_bytes"]
    for name in ("dp2_zero1", "dp2_zero2_fsdp", "dp2_zero3_fsdp"):
        per_rank = [r["opt_state_bytes"] for r in report[name]["ranks"].values()]
        assert max(per_rank) < 0.6 * full and sum(per_rank) >= full, (name, per_rank, full)
    # LoRA (frozen base): AdamW moments of the adapters only, as the memory model counts them; ZeRO-2 halves them
    from parity_2rank import LORA
    from parity_lib import CFG

    from meshwright.config import LoraConfig
    from meshwright.memory.lora import lora_state_bytes

    want = lora_state_bytes(CFG, LoraConfig(**LORA))["optimizer"]
    assert [r["opt_state_bytes"] for r in report["lora_dp2_ddp"]["ranks"].values()] == [want, want]
    assert [r["opt_state_bytes"] for r in report["lora_dp2_zero2_fsdp"]["ranks"].values()] == [want // 2, want // 2]
    assert want < full / 10, (want, full)  # rank 4 on all seven linears of a d_model-64 model: 9% of full AdamW
    # under tp2 each rank holds the moments of its adapter shards (B of column bases, A of row bases: halves) and of
    # the replicated parts: the same bytes under megatron-core as under DTensor, less than DDP's whole adapters
    tp_bytes = [r["opt_state_bytes"] for r in report["lora_tp2"]["ranks"].values()]
    assert [r["opt_state_bytes"] for r in report["lora_tp2_megatron"]["ranks"].values()] == tp_bytes
    assert want / 2 < tp_bytes[0] < want, (tp_bytes, want)
    # the ZeRO-3 LoRA checkpoint resumed under DDP was adapter-only: A and B of the seven linears and the head
    lora_ckpt = report["lora_ckpt_zero3_to_ddp"]["ranks"]["0"]
    assert lora_ckpt["saved_model_keys"] == 2 * 7 * CFG.n_layers + 1, lora_ckpt
    assert lora_ckpt["refusal"].startswith("seed=99 is invalid; valid: 7 (checkpoint "), lora_ckpt["refusal"]
    # and it reshards to one process (dp 2 -> 1): the base drawn here, the adapters and moments read, steps 3-4 on track
    from parity_2rank import LORA_CASES, lora_model, lora_reference, lora_scope
    import torch
    from parity_lib import MAX_NORM, RTOL, batch, make_opt, rel

    from meshwright.models import lm_loss
    from meshwright.train.checkpoint import load_runtime
    from meshwright.train.local_runtime import LocalRuntime

    lora = LORA_CASES["lora_dp2_zero3_fsdp"][1]
    rt = LocalRuntime(lora_model(lora))
    opt = rt.build_optimizer(make_opt)
    assert load_runtime(run_dir / "lora_adapter_ckpt", rt, opt, adapters=lora_scope(lora, 7, rt))["step"] == 2
    ref = lora_reference(lora)
    for step in (2, 3):
        x, y = batch(step)
        loss = lm_loss(rt.model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rt.model.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert rel(loss.item(), ref[step]["loss"]) <= RTOL, (step, loss.item(), ref[step]["loss"])


@pytest.mark.timeout(120)
def test_checkpoint_from_dp2tp2_resumes_in_one_process(four_rank) -> None:
    """The dp2·tp2 (FSDP+DTensor) checkpoint loads into a plain model and continues the trajectory."""
    from parity_lib import CFG, RTOL, SEED, make_opt, reference, rel

    from meshwright.train.checkpoint import load_runtime
    from meshwright.train.local_runtime import LocalRuntime
    from meshwright.models import build_model

    _, ckpt = four_rank
    assert (ckpt / ".metadata").exists() and not ckpt.with_name(ckpt.name + ".tmp").exists()
    ref = reference(steps=4)
    model = build_model(CFG, seed=SEED + 1)
    opt = make_opt([{"params": [p for p in model.parameters() if p.dim() >= 2]},
                    {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}])
    meta = load_runtime(ckpt, LocalRuntime(model), opt)
    assert meta["step"] == 2
    resumed = reference(steps=2, model=model, opt=opt, start=2)
    for a, b in zip(resumed, ref[2:]):
        assert rel(a["loss"], b["loss"]) <= RTOL, (a["loss"], b["loss"])


def resume_zero1_in_one_process(run_dir: Path) -> list[tuple[float, float]]:
    """The ZeRO-1 dp2 checkpoint parity_2rank keeps (each rank wrote the AdamW states of the parameters it owns)
    loaded into a plain model and optimizer (ZeRO-0, one process): (loss, reference loss) of steps 3-4."""
    from parity_2rank import ZERO1_RUN
    from parity_lib import CFG, SEED, make_opt, reference

    from meshwright.models import build_model
    from meshwright.train.checkpoint import load_runtime
    from meshwright.train.local_runtime import LocalRuntime

    ref = reference(steps=4)
    model = build_model(CFG, seed=SEED + 1)
    opt = make_opt([{"params": [p for p in model.parameters() if p.dim() >= 2]},
                    {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}])
    meta = load_runtime(run_dir / ZERO1_RUN / "ckpt" / "step_000002", LocalRuntime(model), opt)
    assert meta["step"] == 2
    assert len(opt.state) == len(list(model.parameters()))  # both ranks' shares: every parameter's moments
    resumed = reference(steps=2, model=model, opt=opt, start=2)
    return [(a["loss"], b["loss"]) for a, b in zip(resumed, ref[2:])]


@pytest.mark.timeout(120)
def test_zero1_checkpoint_resumes_in_one_process(two_rank) -> None:
    """ZeRO-1 (ZeroRedundancyOptimizer) dp2 -> one process: the checkpoint holds every parameter's states under the
    ZeRO-0 keys (parallel/zero1_state.py), so a plain optimizer continues the trajectory (steps 3-4 within 1e-5);
    the same launch checked per rank that each holds exactly its owned parameters' moments (2 x 4 B each)."""
    from parity_lib import RTOL, rel

    report, run_dir = two_rank
    case = report["zero1_ckpt_resume_bitwise"]
    assert case["ok"], _failures({"zero1_ckpt_resume_bitwise": case})
    ranks = list(case["ranks"].values())
    assert [r["opt_state_bytes"] for r in ranks] == [r["owned_state_bytes"] for r in ranks]
    full = report["dp2_ddp"]["ranks"]["0"]["opt_state_bytes"]
    assert sum(r["opt_state_bytes"] for r in ranks) == full  # whole parameters: the shares add up to DDP's states
    # the planner's partition (launcher/planner/zero1_partition.py) is the runtime's: the same elements per rank
    from parity_lib import CFG

    from meshwright.launcher.planner.zero1_partition import model_params, partition_numels

    layers, ends = model_params(CFG, {})
    held = [e for v in [*layers.values(), *ends.values()] for e in v]
    want = partition_numels([[n for n, mat in held if mat], [n for n, mat in held if not mat]], 2)
    assert [r["opt_state_bytes"] for r in ranks] == [8 * n for n in want]  # AdamW: two fp32 moments
    for got, want in resume_zero1_in_one_process(run_dir):
        assert rel(got, want) <= RTOL, (got, want)


# the tp2 LoRA runs parity_2rank keeps: DTensor (a full checkpoint) and megatron-core (adapter-only, the base
# rebuilt from the run's seed by export and resume), each with the report case that wrote it
LORA_TP2_RUNS = [("lora_tp2_run", "lora_ckpt_tp2_to_ddp", False),
                 ("lora_tp2_megatron_run", "lora_ckpt_tp2_megatron_to_ddp", True)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("run,case,adapters_only", LORA_TP2_RUNS)
def test_lora_tp2_export_equals_one_process_export(two_rank, tmp_path, run, case, adapters_only) -> None:
    """``export --hf`` and ``--peft`` of a tp2 LoRA checkpoint (DTensor shards of A and B, or megatron-core's plain
    shards seen as DTensors, gathered by DCP; adapter-only for megatron, whose export rebuilds the base) write
    the files the same run trained in one process gives: the same names, the same JSON, the same tensor keys, shapes
    and dtypes, values within 1e-4 relative per tensor (the two trajectories differ by reduction order only, ~1e-7 in
    the gradients, but AdamW's first steps divide each gradient element by its own magnitude: after two steps a B
    differs by up to 5.7e-6 here; the q/k B rows go through the same rotate-half permutation)."""
    import json

    from parity_2rank import LORA, lora_model, lora_reference, write_lora_run_files
    from parity_lib import rel
    from safetensors.torch import load_file

    from meshwright.cli import main
    from meshwright.train.checkpoint import save_runtime
    from meshwright.train.local_runtime import LocalRuntime

    report, d = two_rank
    assert report[case]["ok"]
    tp_step = d / run / "ckpt" / "step_000002"
    assert adapters_only == ("lora_base" in json.loads((tp_step / "trainer_state.json").read_text()))
    # the one-process run: the same two steps (parity_2rank.lora_reference), saved as the trainer saves
    one = tmp_path / "one"
    write_lora_run_files(one, LORA)
    model = lora_model(LORA)
    lora_reference(LORA, steps=2, model=model)
    save_runtime(one / "ckpt" / "step_000002", LocalRuntime(model), None, meta={"step": 2})
    outs = {}
    for tag, step in (("tp2", tp_step), ("one", one / "ckpt" / "step_000002")):
        outs[tag] = tmp_path / f"hf_{tag}", tmp_path / f"peft_{tag}"
        assert main(["export", str(step), "--hf", str(outs[tag][0]), "--peft", str(outs[tag][1])]) == 0
    for i in range(2):
        a, b = outs["tp2"][i], outs["one"][i]
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for f in a.iterdir():
            if f.suffix == ".json":
                assert json.loads(f.read_text()) == json.loads((b / f.name).read_text()), f.name
            elif f.suffix == ".safetensors":
                ta, tb = load_file(str(f)), load_file(str(b / f.name))
                assert ta.keys() == tb.keys()
                for k in ta:
                    assert (ta[k].shape, ta[k].dtype) == (tb[k].shape, tb[k].dtype), k
                    assert rel(ta[k], tb[k]) <= 1e-4, (f.name, k, rel(ta[k], tb[k]))
    peft = load_file(str(outs["tp2"][1] / "adapter_model.safetensors"))
    assert len(peft) == 2 * 7 * 4 and all(v.abs().max() > 0 for v in peft.values())  # A and B of 7 linears x 4 layers


@pytest.mark.timeout(120)
@pytest.mark.parametrize("run,case,adapters_only", LORA_TP2_RUNS)
def test_lora_tp2_checkpoint_resumes_in_one_process(two_rank, run, case, adapters_only) -> None:
    """The tp2 LoRA checkpoints (adapters as DTensor shards or megatron-core shards, AdamW moments of the adapters
    only) load into the plain one-process LoRA model and continue the one-process trajectory (steps 3-4, loss
    within 1e-5); the megatron one is adapter-only, checked against the base this process drew."""
    from parity_2rank import LORA, lora_model, lora_reference, lora_scope
    from parity_lib import RTOL, SEED, load_perturbed, rel

    report, d = two_rank
    assert report[case]["ok"]
    ref = lora_reference(LORA, steps=4)
    model = lora_model(LORA)
    rt, opt, meta = load_perturbed(model, d / run / "ckpt" / "step_000002",
                                   adapters=(lambda rt: lora_scope(LORA, SEED, rt)) if adapters_only else None)
    assert meta["step"] == 2
    resumed = lora_reference(LORA, steps=2, model=model, opt=opt, start=2)
    for a, b in zip(resumed, ref[2:]):
        assert rel(a["loss"], b["loss"]) <= RTOL, (a["loss"], b["loss"])
