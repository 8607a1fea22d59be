"""Before/after consumer checks of the exporters on the plans of tests/unit/test_exports.py: Megatron-LM's
validate_args (with the environment the export states, and with CUDA_DEVICE_MAX_CONNECTIONS=1 by hand) and
DeepSpeed's pipeline-engine ZeRO rule.

    python benchmarks/bench_export_checks.py new
    mkdir /tmp/old && git archive dee1cc2 meshwright configs | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python benchmarks/bench_export_checks.py old /tmp/old
"""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
which = sys.argv[1]
if len(sys.argv) > 2:
    sys.path.insert(0, sys.argv[2])
sys.path[len(sys.argv) > 2:len(sys.argv) > 2] = [str(REPO / "tests"), str(REPO / "tests" / "unit")]
from consumers.loaders import megatron_validate
from test_exports import CASES, _case
import meshwright.launcher.planner.export as ex
import deepspeed.runtime.config as dsc
from deepspeed.runtime.zero.config import ZeroStageEnum
dsc.dist.get_rank = lambda *a, **k: 0
ok = {"megatron": 0, "megatron+env": 0, "deepspeed": 0}
for name in CASES:
    plan, cfg, world = _case(name)
    args, _ = ex.megatron_args(plan, cfg)
    env = ex.megatron_env(plan, cfg) if hasattr(ex, "megatron_env") else {}
    for key, e in (("megatron", env), ("megatron+env", {"CUDA_DEVICE_MAX_CONNECTIONS": "1"})):
        try:
            megatron_validate(args, world, e); ok[key] += 1
        except BaseException as exc:
            if key == "megatron+env": print(which, name, "megatron:", str(exc)[:100])
    conf, _ = ex.deepspeed_config(plan, cfg)
    s = plan.layer_strategies()[0]
    class MPU:
        def get_data_parallel_world_size(self): return s.dp
    ds = dsc.DeepSpeedConfig(json.loads(json.dumps(conf)), mpu=MPU())
    if plan.pipeline.degree == 1 or ds.zero_optimization_stage < ZeroStageEnum.gradients: ok["deepspeed"] += 1
    else: print(which, name, "deepspeed: ZeRO", ds.zero_optimization_stage, "with pp", plan.pipeline.degree)
print(which, ok, "of", len(CASES))
