"""Which training dtype each `meshwright plan --emit X --dtype D` writes, read back by the consumer's own code
(Megatron-LM's parser + validate_args -> params_dtype; DeepSpeed's DeepSpeedConfig -> bf16/fp16 enabled, i.e. the
engine's model dtype; torchtitan's pinned TrainingConfig -> mixed_precision_param), before and after:

    python benchmarks/bench_export_dtype.py new
    mkdir /tmp/old && git archive bd3d48c~1 meshwright configs | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python benchmarks/bench_export_dtype.py old /tmp/old
"""
import contextlib
import io
import json
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
which = sys.argv[1]
if len(sys.argv) > 2:
    sys.path.insert(0, sys.argv[2])
sys.path.insert(1 if len(sys.argv) > 2 else 0, str(REPO / "tests"))
import deepspeed.runtime.config as dsc  # noqa: E402
from consumers.loaders import megatron_validate, torchtitan_configs  # noqa: E402
from meshwright.cli import main  # noqa: E402

dsc.dist.get_rank = lambda *a, **k: 0
ARGV = ["plan", "--model", "llama2-13b", "--cluster", "dgx-a100-80g", "--nodes", "2", "--seq-len", "4096",
        "--global-batch", "256"]


def written(target: str, dtype: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(ARGV + ["--emit", target, "--dtype", dtype]) == 0
    text = out.getvalue()
    if target == "megatron":
        env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if "--use-torch-fsdp2" not in text else {}
        return str(megatron_validate(shlex.split(text), 16, env).params_dtype).replace("torch.", "")
    if target == "deepspeed":
        conf = json.loads(text)
        dp = conf["train_batch_size"] // (conf["train_micro_batch_size_per_gpu"] * conf["gradient_accumulation_steps"])
        ds = dsc.DeepSpeedConfig(conf, mpu=type("MPU", (), {"get_data_parallel_world_size": lambda self: dp})())
        return "bf16" if ds.bfloat16_config.enabled else "fp16" if ds.float16_config.enabled else "fp32"
    ns: dict = {}
    exec(text.split("from torchtitan")[0] + text[text.index("PARALLELISM ="):text.index("def apply_plan")], ns)
    return "mixed_precision_param=" + torchtitan_configs().TrainingConfig(**ns["TRAINING"]).mixed_precision_param


for target in ("megatron", "deepspeed", "torchtitan"):
    print(which, target, {d: written(target, d) for d in ("bf16", "fp32")})
