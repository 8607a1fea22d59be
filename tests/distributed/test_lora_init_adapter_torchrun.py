"""``lora.init_adapter`` under torchrun (2 gloo ranks): a run from a PEFT adapter directory under megatron-core tp2
(adapters cut by box), FSDP2 ZeRO-3 with expert targets at ep 1 (DTensor shards, the head saved too) and ep2 with
the experts' own targets (each rank its experts' rows) starts where the one-process run from the same adapter does,
and its checkpoint (one step at lr 1e-12), exported whole with ``--peft``, gives back the adapter file: every rank
loaded its slice. The runs share the one 2-rank launch of several modules (conftest.cli_launch, cli_launch.py
``adapter_runs``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("safetensors")

from cli_launch import ADAPTER_CASES, losses  # noqa: E402

# every case's first loss equals one process's (all three bitwise; 1e-6 relative leaves room for fp32 reassociation,
# ~1e-7): the ep2 case reads the base from init_from, where rank 1 once read experts 0-1 into its slots 2-3 (the
# runtime passed load_pretrained_into no box for the expert shards): 5.560519456863403 vs 5.5603249073028564, 3.5e-5


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_a_run_from_a_peft_adapter_starts_where_one_process_does(cli_launch, case, tmp_path) -> None:
    import torch
    from safetensors.torch import load_file

    from meshwright.cli import main
    from meshwright.config import load_train_config
    from meshwright.train.build import run_training
    from meshwright.train.checkpoint import latest_checkpoint

    cfg = json.loads((cli_launch[1] / "adapter" / case / "cfg.json").read_text())
    run, adapter = Path(cfg["out_dir"]), Path(cfg["lora"]["init_adapter"])
    first = losses(run)[1]
    one = run_training(load_train_config({**cfg, "out_dir": str(tmp_path / "one")}))["first_loss"]
    assert abs(first - one) <= 1e-6 * abs(one), (case, first, one)
    out = tmp_path / "peft"
    assert main(["export", str(run), "--peft", str(out)]) == 0
    want, got = load_file(adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert sorted(got) == sorted(want) and any("lora_B" in k for k in want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-9, rtol=0, msg=lambda m, k=key: f"{case} {k}: {m}")
    state = json.loads((latest_checkpoint(run / "ckpt") / "trainer_state.json").read_text())
    assert state["init_adapter"]["path"] == str(adapter.resolve()) and len(state["init_adapter"]["fingerprint"]) == 64
