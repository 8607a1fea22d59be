"""Entry points import only what they use: the planner and ``data prepare`` without torch, a pp = 1 rank without
torch.distributed.pipelining (which pulls in dynamo, inductor and triton). Each check runs a fresh interpreter and
asserts the contents of ``sys.modules`` (what the import cost is made of), never a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torch._dynamo", "torch._inductor", "torch.distributed.pipelining", "triton", "sympy")


def _fresh(code: str, tmp_path: Path) -> dict:
    """Run ``code`` in a fresh interpreter (the repository first on the path); it ends by printing one JSON line."""
    script = tmp_path / "probe.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


_CLI = """
import contextlib, io, json, sys
from meshwright.cli import main
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = main({argv!r})
print(json.dumps({{"rc": rc, "out": buf.getvalue(), "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


@pytest.mark.parametrize("extra", [
    ["--model", "llama2-7b", "--cluster", "dgx-a100-80g", "--nodes", "2", "--json"],
    # gemma-2: soft-capped attention (the flex rule) compiled; FP8 savers (fp8 activation bytes, COAT state bytes)
    ["--model", "gemma-2-2b", "--cluster", "dgx-h100-80g", "--compile", "--allow", "fp8", "--any-runtime", "--json"],
    ["--model", "llama2-7b", "--cluster", "dgx-a100-80g", "--emit", "megatron"],
])
def test_plan_on_a_preset_does_not_import_torch(tmp_path, extra):
    argv = ["plan", "--seq-len", "4096", "--global-batch", "64", *extra]
    r = _fresh(_CLI.format(argv=argv, heavy=HEAVY), tmp_path)
    assert r["rc"] == 0
    assert r["heavy"] == []
    if "--json" in extra:
        assert json.loads(r["out"])["plan"]  # a real plan came out of the search


def test_plan_savers_are_costed_by_the_moved_terms():
    # the torch-free modules are the ones the planner and the torch implementations share (re-exported, not copied)
    from meshwright.launcher.planner import cost_model
    from meshwright.memory import fp8_activations, fp8_bytes
    from meshwright.models import capped_flex, capped_flex_rule
    from meshwright.optim import coat, coat_bytes, fp8_quant

    assert cost_model.block_saved_bytes_split is fp8_bytes.block_saved_bytes_split
    assert fp8_activations.block_saved_bytes_per_token is fp8_bytes.block_saved_bytes_per_token
    assert fp8_activations.GROUP == fp8_bytes.GROUP == 16
    assert cost_model.coat_state_bytes_per_param is coat.coat_state_bytes_per_param
    assert coat.coat_state_bytes_per_param is coat_bytes.coat_state_bytes_per_param
    assert fp8_quant.groups_of is coat_bytes.groups_of
    assert cost_model.flex_capped is capped_flex.flex_capped is capped_flex_rule.flex_capped


def test_parallel_runtime_import_skips_pipelining(tmp_path):
    code = ("import json, sys\nimport meshwright.parallel.runtime\n"
            f"print(json.dumps({{'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n")
    heavy = _fresh(code, tmp_path)["heavy"]
    assert "torch" in heavy  # the runtime is torch, of course ...
    assert "torch.distributed.pipelining" not in heavy and "torch._dynamo" not in heavy  # ... pipelining is not


def test_pipeline_schedule_names_resolve():
    # build_schedule looks the classes up by name at call time: each name must be one torch.distributed.pipelining has
    from torch.distributed import pipelining

    from meshwright.errors import ConfigError
    from meshwright.parallel.pipeline import SCHEDULE_CLASSES, build_schedule

    assert {k: getattr(pipelining, v).__name__ for k, v in SCHEDULE_CLASSES.items()} == {
        "gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B"}
    with pytest.raises(ConfigError, match="pipeline.schedule"):
        build_schedule([], [], 2, "zero_bubble", 4, lambda a, b: a, None, None)


def test_data_prepare_does_not_import_torch(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("hello import cost\n" * 50)
    out = tmp_path / "out"
    argv = ["data", "prepare", str(src), "--out", str(out), "--no-progress"]
    r = _fresh(_CLI.format(argv=argv, heavy=HEAVY), tmp_path)
    assert r["rc"] == 0 and r["heavy"] == []
    assert (out / "tokens.bin").stat().st_size > 0


def test_lazy_package_names_still_resolve():
    import meshwright.data as data
    import meshwright.models as models
    import meshwright.optim as optim
    from meshwright.data.loader import SequenceLoader
    from meshwright.models.decoder import Decoder, lm_loss
    from meshwright.optim.coat import CoatAdamW

    assert models.lm_loss is lm_loss and isinstance(models.build_model("tiny", device="meta"), Decoder)
    assert optim.CoatAdamW is CoatAdamW and data.SequenceLoader is SequenceLoader
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        models.nope  # noqa: B018
