"""The runs of the one 2-rank launch several test modules share (conftest.cli_launch; tests/distributed/cli_runs.py runs
them in turn, each with a process group of its own, and stops at the first that fails). A launch costs ~12 CPU-s of
startup (torchrun's agent, every rank importing torch and meshwright) before any run does anything.

Runs, in order (the numbers cli_runs prints):
  0-2  test_train_cli_parallel.py: a layer-wise plan, then ``--plan auto`` twice (profiled once, then reused);
  3-8  test_shard_checkpoint_midrun.py: per case a straight run, then its copy resumed from the step-3 checkpoint;
  9-10 test_grow_positions_torchrun.py: an FSDP2 run at max_seq_len 32, then (its step-2 directory copied for the
       one-process resume) the run resumed grown to 64;
  11-12 test_profile_hardware.py: ``profile hardware``, ``profile model``;
  then test_lora_init_adapter_torchrun.py: one step per ``ADAPTER_CASES`` case from a PEFT adapter (``adapter_runs``).
"""

from __future__ import annotations

import json
from pathlib import Path

TRAIN = ["train", "configs/train/tiny-test.yaml"]

# test_shard_checkpoint_midrun.py: mid-run checkpoints under expert parallelism, megatron TP and torch's ZeRO-1
# (ZeroRedundancyOptimizer, each rank writing its own parameters' states: parallel/zero1_state.py; saved async)
MIDRUN_CASES = {
    "moe-ep2": ["model=tiny-moe", "--plan", "configs/plans/tiny-moe-ep2.yaml"],
    "tp2-megatron": ["tp_backend=megatron", "--plan", "{tmp}/tp2.yaml"],
    "zero1-async": ["ckpt_async=true", "--plan", "{tmp}/zero1.yaml"],
}
TP2_NO_SP = "version: 1\nmodel: tiny\nseq_len: 64\nglobal_batch: 8\nmicro_batch: 4\nlayers:\n  - {tp: 2, dp: 1, repeat: 4}\n"
ZERO1 = "version: 1\nmodel: tiny\nseq_len: 64\nglobal_batch: 8\nmicro_batch: 4\nlayers:\n  - {dp: 2, zero: 1, repeat: 4}\n"


def midrun_train(out, extra, *flags) -> list[str]:
    return [*TRAIN, f"out_dir={out}", "steps=5", "warmup_steps=1", "eval_every=0", "log_every=1", "ckpt_every=3",
            "energy=false", "data.max_files=20", *extra, *flags]


def midrun_dirs(tmp: Path) -> dict[str, tuple[Path, Path]]:
    """Per mid-run case: the straight run's directory and the resumed copy's."""
    return {case: (tmp / "midrun" / case / "straight", tmp / "midrun" / case / "resumed") for case in sorted(MIDRUN_CASES)}


# test_grow_positions_torchrun.py: grow_positions under FSDP2 (ZeRO-3 on 2 ranks)
GPT2 = {"name": "g", "arch": "gpt2", "vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden": 64,
        "max_seq_len": 32}


def grow_files(tmp: Path, seq_len: int, **overrides) -> tuple[str, str]:
    """The plan and train config (JSON) of the grow_positions run at ``seq_len``, writing to ``tmp/run``."""
    model = {**GPT2, "max_seq_len": seq_len}
    plan = {"version": 1, "model": model, "seq_len": seq_len, "global_batch": 4, "micro_batch": 2,
            "layers": [{"dp": 2, "zero": 3, "repeat": 2}], "embedding": {"tp": 1, "zero": 3}}
    cfg = {"model": model, "data": {"path": "default", "max_files": 20}, "seq_len": seq_len, "global_batch": 4,
           "micro_batch": 2, "steps": 2, "warmup_steps": 1, "eval_every": 0, "log_every": 1, "energy": False,
           "progress": False, "out_dir": str(tmp / "run"), **overrides}
    tmp.mkdir(parents=True, exist_ok=True)
    paths = tmp / f"plan{seq_len}.json", tmp / f"cfg{seq_len}.json"
    paths[0].write_text(json.dumps(plan))
    paths[1].write_text(json.dumps(cfg))
    return str(paths[0]), str(paths[1])


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def launch_args(tmp: Path) -> list[str]:
    """cli_runs' arguments for every run above, writing under ``tmp``."""
    cache = tmp / "cache"
    runs = [[*TRAIN, f"out_dir={tmp / 'layerwise'}", "steps=4", "warmup_steps=1", "eval_every=2", "log_every=1",
             "--plan", "configs/plans/tiny-layerwise.yaml"]]
    for attempt in range(2):
        runs.append([f"--env=MESHWRIGHT_CACHE_DIR={cache}", *TRAIN, f"out_dir={tmp / f'auto{attempt}'}", "steps=2",
                     "eval_every=0", "log_every=1", "--plan", "auto"])
    (tmp / "tp2.yaml").write_text(TP2_NO_SP)  # megatron TP has no sequence parallelism
    (tmp / "zero1.yaml").write_text(ZERO1)
    for case, (straight, resumed) in midrun_dirs(tmp).items():
        extra = [a.format(tmp=tmp) for a in MIDRUN_CASES[case]]
        runs.append(midrun_train(straight, extra))
        runs.append([f"--copy={straight}:{resumed}",
                     *midrun_train(resumed, extra, "--resume-from", str(resumed / "ckpt" / "step_000003"))])
    grow = tmp / "grow"
    plan32, cfg32 = grow_files(grow, 32)
    plan64, cfg64 = grow_files(grow, 64, steps=4, grow_positions="copy")
    runs.append(["train", cfg32, "--plan", plan32])
    runs.append([f"--copy={grow / 'run'}:{grow / 'one'}",  # the step-2 run, for the one-process resume
                 "train", cfg64, "--plan", plan64, "--resume", "--allow-config-change"])
    runs.append(["profile", "hardware", "--sizes", "64,128", "--iters", "2", "--timeout-s", "60",
                 "--out", str(tmp / "hw.json")])
    runs.append(["profile", "model", "--model", "tiny", "--batch-sizes", "1,2", "--seq-lens", "32,64", "--tp", "1,2",
                 "--iters", "2", "--timeout-s", "60", "--out", str(tmp / "model.json")])
    runs += adapter_runs(tmp)
    args: list[str] = []
    for run in runs:
        args += [*(["::"] if args else []), *run]
    return args


# test_lora_init_adapter_torchrun.py: lora.init_adapter (a PEFT adapter directory) under megatron-core tp2 (adapters
# cut by box), FSDP2 ZeRO-3 with expert targets (DTensor shards, as DTensor tp's) and ep2 with the experts' own
# targets (their experts' rows); each run's first loss against one process (the test runs that)
ADAPTER_MODEL = {"name": "ia", "arch": "llama", "vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 4,
                 "n_kv_heads": 2, "ffn_hidden": 64, "max_seq_len": 32, "tie_embeddings": False}
ADAPTER_MOE = {**ADAPTER_MODEL, "name": "ia-moe", "moe_ffn_hidden": 48, "n_experts": 4, "top_k": 2,
               "capacity_factor": None}
DENSE_LORA = {"rank": 4, "alpha": 8.0, "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
              "modules_to_save": ["output"]}
EXPERT_LORA = {"rank": 2, "alpha": 4.0, "targets": ["wq", "wo", "experts.gate_up_proj", "experts.down_proj"]}
NO_ROUTER_LOSS = {"aux_loss_coef": 0.0, "z_loss_coef": 0.0}
ADAPTER_CASES = {  # case: (model, lora, layer strategy, train config overrides)
    "tp2-megatron": (ADAPTER_MODEL, DENSE_LORA, {"tp": 2, "dp": 1}, {"tp_backend": "megatron"}),
    # FSDP2 shards the experts' stacked adapters (and the saved head) as DTensors on dim 0 (ep 1: expert adapters
    # under FSDP with ep>1 are refused, train/build.py check_lora_layout)
    "zero3-dp2-experts": (ADAPTER_MOE, {**EXPERT_LORA, "modules_to_save": ["output"]}, {"dp": 2, "zero": 3},
                          {"model": NO_ROUTER_LOSS}),
    # the router's aux and z losses off: per-rank batches change them (not the adapters), and they enter the loss
    "ep2-experts": (ADAPTER_MOE, EXPERT_LORA, {"dp": 2, "ep": 2}, {"model": NO_ROUTER_LOSS}),
}


def make_adapter(model: dict, lora: dict, base: Path, out: Path) -> None:
    """An HF base (``save_hf``) and a PEFT adapter for it with random A, B and saved modules, written as ``meshwright
    export --peft`` writes one (no peft needed: the GPU image has none)."""
    import torch

    from meshwright.config import LoraConfig, TrainConfig, load_model_config
    from meshwright.memory.lora import apply_lora_config
    from meshwright.models import build_model
    from meshwright.models.hf_weights import save_hf
    from meshwright.train.peft_export import _write_atomic, adapter_config, peft_state_dict

    model_cfg = load_model_config(model)
    net = build_model(model_cfg, seed=3)
    if not base.exists():  # one base per model, an adapter per case
        save_hf(net, model_cfg, base)
    cfg = TrainConfig(init_from=str(base), lora=LoraConfig(**lora))
    apply_lora_config(net, cfg.lora, seed=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    tensors, targets, saved = peft_state_dict(net, model_cfg, cfg)
    _write_atomic(out, tensors, adapter_config(cfg, targets, saved))


def adapter_files(tmp: Path, case: str) -> tuple[str, str]:
    """The plan and train config (JSON) of ``case`` (its base and adapter made once per model), writing to
    ``tmp/adapter/CASE/run``: one step at lr 1e-12, so its checkpoint holds the adapters as the ranks loaded them."""
    model, lora, layer, over = ADAPTER_CASES[case]
    root = tmp / "adapter"
    base, adapter = root / model["name"], root / case / "adapter"
    if not adapter.exists():
        make_adapter(model, lora, base, adapter)
    plan = {"version": 1, "model": base.name, "seq_len": 32, "global_batch": 4, "micro_batch": 2,
            "layers": [{**layer, "repeat": 2}]}
    cfg = {"init_from": str(base), "data": {"path": "default", "max_files": 20}, "seq_len": 32, "global_batch": 4,
           "micro_batch": 2, "steps": 1, "warmup_steps": 0, "lr": 1e-12, "min_lr": 1e-12, "eval_every": 0,
           "log_every": 1, "energy": False, "progress": False, "out_dir": str(root / case / "run"),
           "lora": {**lora, "init_adapter": str(adapter)},
           **over}
    (root / case).mkdir(parents=True, exist_ok=True)
    paths = root / case / "plan.json", root / case / "cfg.json"
    paths[0].write_text(json.dumps(plan))
    paths[1].write_text(json.dumps(cfg))
    return str(paths[0]), str(paths[1])


def adapter_runs(tmp: Path) -> list[list[str]]:
    return [["train", cfg, "--plan", plan] for plan, cfg in (adapter_files(tmp, c) for c in ADAPTER_CASES)]
