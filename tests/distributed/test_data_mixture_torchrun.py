"""data.mixture under torchrun: 2 data-parallel ranks read the global batches one process reads (the loader's
contract, data/mixture.py), so the losses, tokens per source and per-source eval losses track the one-process run.
The one-process run is the CLI in this process (no second import of torch and meshwright in a subprocess)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import REPO, run_torchrun
from meshwright.data.prepare import prepare


@pytest.mark.timeout(400)
def test_two_ranks_blend_like_one_process(tmp_path, monkeypatch) -> None:
    from meshwright.cli import main

    sources = []
    for k, (alphabet, chars) in enumerate([("abcde \n", 20000), ("vwxyz \n", 3000)]):
        src = tmp_path / f"s{k}.txt"
        src.write_text("".join(np.random.default_rng(k).choice(list(alphabet), chars)))
        sources.append(prepare([src], tmp_path / f"d{k}", progress=False))
    mix = f"data.mixture=[{{path: {sources[0]}, weight: 0.7}}, {{path: {sources[1]}, weight: 0.3}}]"
    args = ["train", "configs/train/tiny-test.yaml", "steps=4", "warmup_steps=1", "eval_every=2", "eval_batches=1",
            "log_every=1", "progress=false", "energy=false", mix, "data.eval_per_source=true"]
    run_torchrun("meshwright.cli", 2, [*args, f"out_dir={tmp_path / 'two'}"], timeout=360, module=True)
    monkeypatch.chdir(REPO)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert main([*args, f"out_dir={tmp_path / 'one'}"]) == 0
    logs = {name: [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()] for name in ("one", "two")}
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["dp_size"] == 2
    for a, b in zip(logs["one"], logs["two"], strict=True):
        assert a["tokens_per_source"] == b["tokens_per_source"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        if "eval_loss" in a:
            assert b["eval_loss_per_source"] == pytest.approx(a["eval_loss_per_source"], rel=1e-4)
    assert logs["one"][-1]["tokens_per_source"] == {str(sources[0]): 22 * 64, str(sources[1]): 10 * 64}
