"""A generated bad-input audit over every field of every config (TrainConfig with its data, meft, lora, inline model and
cluster sections; ModelConfig and ClusterSpec files, rope_scaling keys; the Plan with its layers, savers, pipeline,
embedding, optimizer and the predicted numbers `report` reads; YAML hostfile entries; LemoConfig; every key of a
Hugging Face config.json), found by introspection, not listed by hand: a field added later is audited too.

Each field gets the wrong values YAML can produce for its type (a string for a number, a list or a mapping for a
scalar, null for a required value, zero and negative counts, NaN and infinities, a huge integer, an unknown enum
string, ...), written into a file and read through the public loading path. Every case must end in acceptance
(the value is in fact valid; it is then carried on through what `train`/`plan`/`report` compute before any model is
built) or one ConfigError line naming the field and what is valid. A traceback of another type, a multi-line
message, a message not naming the field or a hang is a finding. Each field's first refused value also goes through
the CLI (`train`, `launch --dry-run`, `plan`, `profile model`, `export`): one stderr line, exit 2. Then values valid
alone but nonsense together, checked before any step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import signal
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union, get_args, get_origin, get_type_hints

import pytest
import yaml

import meshwright.train.build as build
from meshwright.cli import main
from meshwright.config import ClusterSpec, LoraConfig, MeftConfig, ModelConfig, TrainConfig, load_cluster, load_model_config
from meshwright.config import load_train_config
from meshwright.config.schema import MixtureSource
from meshwright.config.hf import HF_KEYS, hf_config_from_model
from meshwright.config.presets import CONFIG_ROOT
from meshwright.data.loader import TokenDataset, resolve_data_path
from meshwright.errors import ConfigError
from meshwright.config.io import read_mapping, to_dict
from meshwright.launcher.planner import cost_model as cm
from meshwright.launcher.remote.hostfile import Host, load_hosts
from meshwright.memory.lemo import LemoConfig, apply_lemo
from meshwright.models import build_model
from meshwright.plan import PREDICTED_NUMBERS, Plan, default_plan, load_plan
from meshwright.tools.report import plan_table, pvm_table
from meshwright.tools.sinks import check_sink_packages
from meshwright.train.checkpoint import STATE_FILE

MICRO = {"name": "micro", "vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 4, "ffn_hidden": 128,
         "max_seq_len": 64}
# a case that spins this long is a hang (every one takes milliseconds): CPU time of this process (ITIMER_PROF), which
# a loaded box does not stretch as it stretches wall time (a case blocked without CPU is left to the test's timeout)
CASE_TIMEOUT_S = 10
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # the cases' files are written fast; read by meshwright's loader


def _write(file: Path, doc: Any) -> None:
    file.write_text(yaml.dump(doc, Dumper=DUMPER, sort_keys=False))  # a case that takes longer is a hang (every one takes milliseconds)

TINY = yaml.safe_load((CONFIG_ROOT / "models" / "tiny.yaml").read_text())
LOCAL = yaml.safe_load((CONFIG_ROOT / "clusters" / "local-cpu.yaml").read_text())
TRAIN = {**yaml.safe_load((CONFIG_ROOT / "train" / "tiny-test.yaml").read_text()), "out_dir": "runs/audit"}
PLAN = {"version": 1, "model": "tiny", "cluster": "local-cpu", "seq_len": TRAIN["seq_len"],
        "global_batch": TRAIN["global_batch"], "micro_batch": TRAIN["micro_batch"],
        "pipeline": {"stages": [[0, TINY["n_layers"]]]}, "layers": [{"repeat": TINY["n_layers"]}],
        "embedding": {}, "optimizer": {}, "predicted": {}}


# ---- the walk ---------------------------------------------------------------------------------------------

def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type inside Optional[...], whether null is allowed)."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        nullable = len(args) < len(get_args(hint))
        return (args[0] if len(args) == 1 else Union[tuple(args)]), nullable
    return hint, False


def walk(cls: type, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """Every (path, annotation) under dataclass ``cls``: its fields, the fields of nested dataclasses, the first
    item of a list of dataclasses or lists, and one key of a typed mapping."""
    out: list[tuple[tuple, Any]] = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = hints[f.name]
        here = (*path, f.name)
        out.append((here, hint))
        out.extend(_walk_type(_unwrap(hint)[0], here))
    return out


def _walk_type(tp: Any, path: tuple) -> list[tuple[tuple, Any]]:
    if dataclasses.is_dataclass(tp):
        return walk(tp, path)
    origin, args = get_origin(tp), get_args(tp)
    if origin is list and args and (dataclasses.is_dataclass(args[0]) or get_origin(args[0]) is list):
        return [((*path, 0), args[0]), *_walk_type(args[0], (*path, 0))]
    if origin is list and args:
        return [((*path, 0), args[0])]
    if origin is dict and args and args[1] is not Any:
        return [((*path, "fp32"), args[1])]  # the one typed mapping: ClusterSpec.peak_tflops
    return []


def wrong_values(hint: Any) -> list[Any]:
    """Values YAML can produce that are wrong for ``hint`` (some turn out valid: zero where 0 means off)."""
    tp, nullable = _unwrap(hint)
    values: list[Any] = [] if nullable else [None]
    origin = get_origin(tp)
    if tp is bool:
        return values + ["abc", "true", 1, [True], {"x": 1}]
    if tp is int:
        return values + ["abc", "12", 1.5, True, 0, -1, 2**53, 10**30, math.nan, math.inf, [1, 2], {"x": 1}]
    if tp is float:
        return values + ["abc", True, 0, -1, 10**30, 1e300, math.nan, math.inf, -math.inf, "nan", "-inf", [1.0],
                         {"x": 1}]
    if tp is str:
        return values + [123, 1.5, True, "", " ", [1, 2], {"x": 1}]
    if origin is Literal:
        first = get_args(tp)[0]
        return values + ["bogus", str(first).upper(), 1, [first], {"x": first}]
    if origin is list:
        return values + ["abc", 5, {"x": 1}, [], ["x"], [None], [1], [1, 2, 3], [-1, 2**53]]
    if origin is dict:
        return values + ["abc", 5, [1], {}, {"bogus": 1}, {"fp32": math.nan}, {"fp32": "x"}]
    if dataclasses.is_dataclass(tp):
        return values + ["abc", 5, [1], {"bogus": 1}]
    return values + [5, 1.5, True, [1], {"bogus": 1}, ""]  # Any: a preset name, path or mapping


# ---- roots: a base document, the public loader and what is computed from it before a model is built ---------

class Reached(Exception):
    """The run got as far as building the model: everything before it accepted the config."""


def _no_build(*a: Any, **k: Any) -> None:
    raise Reached


def _train_downstream(cfg: TrainConfig, path: Path, monkeypatch: pytest.MonkeyPatch, plan: str | None = None) -> None:
    """What `meshwright train` does with a loaded config before the model is built (build_runtime's checks)."""
    check_sink_packages(cfg.tensorboard, cfg.wandb)
    monkeypatch.setattr(build, "build_model", _no_build)
    monkeypatch.setattr(build, "build_distributed_runtime", _no_build)
    job = build.TrainingJob.resolve(cfg, plan)
    try:
        build.build_runtime(job)
    except Reached:
        pass
    if cfg.data.path != "default":  # the default corpus is prepared (slow) and its path is a fixed word
        TokenDataset(resolve_data_path(cfg.data, job.model.vocab_size, progress=False))
    for i, src in enumerate(cfg.data.mixture or []):  # what data/mixture.open_mixture opens, but the default corpus
        if src.path != "default":
            key = f"data.mixture[{i}].path"
            if not Path(src.path).exists():
                raise ConfigError(f"{key}={src.path!r} is invalid; valid: an existing prepared data directory")
            TokenDataset(resolve_data_path(cfg.data, job.model.vocab_size, progress=False, path=src.path), key=key)


@dataclass
class Root:
    name: str  # id prefix
    cls: type | None  # None: only ``extra`` (a config.json, a free-form mapping's conventional keys)
    base: dict[str, Any]
    inside: tuple  # where cls sits in the document
    label: str  # prefix the messages use for fields under ``inside``
    load: Callable[[Path, pytest.MonkeyPatch], Any]

    extra: tuple = ()  # (path, annotation) of keys a free-form mapping holds by convention
    skip: tuple = ()  # paths under ``inside`` another root audits (from a base where they exist)

    def cases(self) -> list[tuple[tuple, Any]]:
        fields = walk(self.cls) if self.cls is not None else []
        fields = [(p, h) for p, h in fields if not any(p[:len(s)] == s for s in self.skip)]
        return [((*self.inside, *p), hint) for p, hint in [*fields, *self.extra]]

    def names(self, path: tuple) -> list[str]:
        """What a message may call the field (a config.json key is also named by the ModelConfig field it maps to)."""
        if not self.name.startswith("hf"):
            return [self.field(path)]
        key = path[0]
        return [f"config.json {key}", key, f"model.{HF_KEYS.get(key, key)}", f"model.{HF_ALIASES.get(key, key)}"]

    def field(self, path: tuple) -> str:
        inner = path[len(self.inside):]
        text = self.label
        for part in inner:
            text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
        return text


def _load_train(path: Path, mp: pytest.MonkeyPatch) -> None:
    _train_downstream(load_train_config(str(path)), path, mp)


def _load_model(path: Path, mp: pytest.MonkeyPatch) -> None:
    cfg = load_model_config(str(path))
    cfg.num_params(), cfg.flops_per_token()
    default_plan(cfg, 1, min(64, cfg.max_seq_len), 8, 8)


def _load_cluster(path: Path, mp: pytest.MonkeyPatch) -> None:
    spec = load_cluster(str(path))
    cm.hardware_from_cluster(spec)
    spec.peak_flops("bf16")


def _load_hosts(path: Path, mp: pytest.MonkeyPatch) -> None:
    load_hosts(path)


def _load_lemo(path: Path, mp: pytest.MonkeyPatch) -> None:
    apply_lemo(build_model(MICRO), read_mapping(path))  # the mapping form apply_lemo reads (from_dict inside)


def _load_hf(path: Path, mp: pytest.MonkeyPatch) -> None:
    hf = path.with_name("config.json")  # what `--model DIR/config.json` and init_from read
    hf.write_text(json.dumps(yaml.safe_load(path.read_text())))
    _load_model(hf, mp)


def _hf_base() -> dict[str, Any]:
    """tiny-moe's config.json as `meshwright export --hf` writes it (Mixtral: the MoE keys too), plus keys of the
    other families the mapping reads."""
    base = hf_config_from_model(load_model_config("tiny-moe"))
    return {**base, "layer_types": ["sliding_attention"] * base["num_hidden_layers"], "sliding_window": 64}


def _hf_hint(value: Any) -> Any:
    """The annotation a config.json key has, read from the value transformers writes there."""
    if value is None:
        return Optional[int]
    return {bool: bool, int: int, float: float, str: str, list: list[str], dict: dict[str, Any]}[type(value)]


HF_ALIASES = {"head_dim": "attn_head_dim", "rope_parameters": "rope_scaling", "num_local_experts": "n_experts",
              "intermediate_size": "moe_ffn_hidden", "sliding_window": "sliding_window", "num_experts": "n_experts",
              "moe_intermediate_size": "moe_ffn_hidden", "decoder_sparse_step": "moe_every"}
HF_BASE = _hf_base()


def _hf_qwen3_base(moe: bool) -> dict[str, Any]:
    """A Qwen3 (one sliding window on every layer) or Qwen3-MoE (experts every 2nd block) config.json as the export
    writes it: the keys only those families read (use_sliding_window, max_window_layers, norm_topk_prob, ...)."""
    tiny = {**TINY, "qk_norm": True, "attn_head_dim": 16, "sliding_window": 32}
    if moe:
        tiny.update(n_experts=4, top_k=2, moe_every=2)
    return hf_config_from_model(load_model_config(tiny))


HF_QWEN3 = {"hf.qwen3": _hf_qwen3_base(False), "hf.qwen3_moe": _hf_qwen3_base(True)}
# keys the "hf" root audits too, read differently by the Qwen3 families
QWEN3_READS = ("model_type", "head_dim", "layer_types", "sliding_window", "num_experts_per_tok", "intermediate_size")


# Phi-3 (fused_proj, one window on every layer): the keys only Phi-3 has, and the ones it reads its own way
HF_PHI3 = hf_config_from_model(load_model_config({**TINY, "fused_proj": True, "attn_head_dim": 16,
                                                  "sliding_window": 32}))
PHI3_READS = ("model_type", "head_dim", "sliding_window", "rope_parameters", "attention_dropout", "attention_bias")


def _load_plan(path: Path, mp: pytest.MonkeyPatch) -> None:
    plan = load_plan(path)
    _train_downstream(load_train_config(TRAIN), path, mp, plan=str(path))
    saved = to_dict(plan)  # what the run directory keeps for `meshwright report`
    summary = {"step_s": 0.5, "tokens_per_s": 1000.0, "mfu": 0.1, "peak_memory_gib": 1.0}
    pvm_table(summary, saved), plan_table(saved)


ROOTS = [
    Root("train", TrainConfig, TRAIN, (), "", _load_train, skip=(("data", "mixture", 0),)),
    Root("train.mixture", MixtureSource,
         {**TRAIN, "data": {**TRAIN["data"], "mixture": [{"path": "default", "weight": 1.0}]}},
         ("data", "mixture", 0), "data.mixture[0]", _load_train),
    Root("train.meft", MeftConfig, {**TRAIN, "meft": {}}, ("meft",), "meft", _load_train),
    Root("train.lora", LoraConfig, {**TRAIN, "lora": {}}, ("lora",), "lora", _load_train),
    Root("train.model", ModelConfig, {**TRAIN, "model": TINY}, ("model",), "model", _load_train),
    Root("train.cluster", ClusterSpec, {**TRAIN, "cluster": LOCAL}, ("cluster",), "cluster", _load_train),
    Root("model", ModelConfig, TINY, (), "model", _load_model),
    Root("cluster", ClusterSpec, LOCAL, (), "cluster", _load_cluster),
    Root("plan", Plan, PLAN, (), "", _load_plan,
         extra=tuple(((("predicted", k), list[float] if k == "memory_gib" else float) for k in PREDICTED_NUMBERS))),
    Root("hosts", Host, {"hosts": [{"name": "n0", "slots": 2}]}, ("hosts", 0), "hosts[0]", _load_hosts),
    Root("lemo", LemoConfig, {"block_size": 16}, (), "lemo", _load_lemo),
    Root("hf", None, HF_BASE, (), "", _load_hf, extra=tuple(((k,), _hf_hint(v)) for k, v in HF_BASE.items())),
    *[Root(name, None, base, (), "", _load_hf, extra=tuple(((k,), _hf_hint(v)) for k, v in base.items()
                                                          if k not in HF_BASE or k in QWEN3_READS))
      for name, base in HF_QWEN3.items()],
    Root("hf.phi3", None, HF_PHI3, (), "", _load_hf,
         extra=(*(((k,), _hf_hint(v)) for k, v in HF_PHI3.items() if k not in HF_BASE or k in PHI3_READS),
                (("rope_parameters", "rope_type"), Literal["default"]),
                (("rope_parameters", "partial_rotary_factor"), float))),
    Root("model.rope", None, {**TINY, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
         (), "model", _load_model, extra=((("rope_scaling", "rope_type"), Literal["llama3", "linear"]),
                                          (("rope_scaling", "factor"), float), (("rope_scaling", "low_freq_factor"), float),
                                          (("rope_scaling", "original_max_position_embeddings"), int))),
]
FIELDS = [(root, path, hint) for root in ROOTS for path, hint in root.cases()]


def _set(doc: Any, path: tuple, value: Any) -> Any:
    """A deep copy of ``doc`` with ``path`` set to ``value`` (missing parents become mappings)."""
    doc = copy.deepcopy(doc)
    target = doc
    for part in path[:-1]:
        if isinstance(part, str) and (not isinstance(target, dict) or part not in target):
            target[part] = {}
        target = target[part]
    target[path[-1]] = value
    return doc


def _named(message: str, root: Root, path: tuple) -> bool:
    return any(_field_named(message, name) for name in root.names(path))


def _field_named(message: str, field: str) -> bool:
    """The message names ``field`` (list indices at its end may be left out: ``pipeline.stages`` for
    ``pipeline.stages[0][0]``); a plan's fields may be prefixed ``plan.`` (check_plan_matches)."""
    need = re.sub(r"(\[\d+\])+$", "", field)
    return re.search(r"(?<![\w.\[])(plan\.)?" + re.escape(need) + r"(?![\w])", message) is not None


class _Hang(Exception):
    pass


def _alarm(*_: Any) -> None:
    raise _Hang


def run_case(root: Root, path: tuple, value: Any, tmp: Path, mp: pytest.MonkeyPatch) -> str | None:
    """None if the case is fine (accepted, or a one-line error naming the field); else what went wrong."""
    file = tmp / f"{root.name}.yaml"
    try:
        _write(file, _set(root.base, path, value))
    except Exception as exc:  # the value cannot be written as YAML: not a case
        return f"could not write YAML ({exc})"
    field = root.field(path)
    old = signal.signal(signal.SIGPROF, _alarm)  # not SIGALRM: pytest-timeout's wall-clock timer stays set
    signal.setitimer(signal.ITIMER_PROF, CASE_TIMEOUT_S)
    try:
        with mp.context() as m:
            root.load(file, m)
    except _Hang:
        return f"hung (> {CASE_TIMEOUT_S} s of CPU time)"
    except ConfigError as exc:
        msg = str(exc)
        if "\n" in msg:
            return f"multi-line error: {msg!r}"
        if not _named(msg, root, path):
            return f"error does not name {field}: {msg!r}"
        if "valid" not in msg:
            return f"error does not say what is valid: {msg!r}"
        return None
    except Exception as exc:  # noqa: BLE001 - the finding itself
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"{type(exc).__module__}.{type(exc).__name__}: {first}"
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)
    return None


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _id(case: tuple) -> str:
    root, path, _ = case
    return f"{root.name}:{root.field(path) or path}"


@pytest.mark.parametrize("case", FIELDS, ids=[_id(c) for c in FIELDS])
def test_every_wrong_value_is_accepted_or_one_line_naming_the_field(case, tmp_path, monkeypatch):
    root, path, hint = case
    findings = []
    for value in wrong_values(hint):
        problem = run_case(root, path, value, tmp_path, monkeypatch)
        if problem is not None:
            findings.append(f"{root.field(path)}={value!r}: {problem}")
    assert not findings, "\n".join(findings)


def test_a_case_that_spins_is_reported_hung_by_its_cpu_time_and_a_slow_one_is_not(tmp_path, monkeypatch):
    """The hang check counts this process's CPU time, not wall time: a load that spins is a "hung" row; one that only
    waits (as a case on a loaded box waits for the CPU) is not, and the wall-clock timer of pytest-timeout stays set."""
    import time

    monkeypatch.setattr(sys.modules[__name__], "CASE_TIMEOUT_S", 0.5)

    def spin(file: Path, mp: pytest.MonkeyPatch) -> None:
        while True:
            pass

    def slow(file: Path, mp: pytest.MonkeyPatch) -> None:
        time.sleep(1.0)  # longer than the bound in wall time, almost no CPU time

    alarm = signal.getitimer(signal.ITIMER_REAL)
    for load, expected in ((spin, "hung (> 0.5 s of CPU time)"), (slow, None)):
        root = Root("probe", None, {"x": 1}, (), "", load)
        assert run_case(root, ("x",), 2, tmp_path, monkeypatch) == expected
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
    if alarm[0] > 0:  # pytest-timeout's timer (signal method) was not cancelled
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= alarm[0]


def test_the_walk_reaches_every_config_dataclass():
    """The introspection found the nested sections (a walk that stopped at the top would audit little)."""
    names = {_id(c) for c in FIELDS}
    for expected in ("train:data.val_fraction", "train.meft:meft.guard_every", "train.lora:lora.rank", "train.model:model.n_kv_heads",
                     "train.cluster:cluster.peak_tflops.fp32", "plan:layers[0].savers.wta_crs",
                     "plan:pipeline.stages[0][0]", "plan:embedding.tp", "plan:optimizer.states", "model:model.top_k",
                     "cluster:cluster.clock_fraction", "train:data.mixture", "train.mixture:data.mixture[0].weight"):
        assert expected in names, expected
    assert len(FIELDS) > 150


# ---- the CLI: a cheap subset ------------------------------------------------------------------------------

PLAN_ARGS = ["--seq-len", "64", "--global-batch", "8", "--top", "1", "--json"]


def _cli_argvs(root: Root, file: Path, tmp: Path) -> list[list[str]]:
    """The commands that read ``file`` as their config (refused cases only for `train`: nothing may train)."""
    if root.name.startswith("train"):
        run = tmp / "run"
        (run / "ckpt" / "step_000001").mkdir(parents=True, exist_ok=True)
        (run / "ckpt" / "step_000001" / STATE_FILE).write_text("{}")
        (run / "config.yaml").write_text(file.read_text())
        hosts = tmp / "hosts"
        hosts.write_text("n0 slots=1\n")
        return [["train", str(file)], ["export", str(run), "--hf", str(tmp / "hf")],
                ["launch", "--hosts", str(hosts), "--dry-run", "--", "train", str(file)]]
    if root.name.startswith("hf"):
        hf = file.with_name("config.json")
        hf.write_text(json.dumps(yaml.safe_load(file.read_text())))
        return [["plan", "--model", str(hf), "--cluster", "local-cpu", *PLAN_ARGS]]
    if root.name.startswith("model"):
        run = tmp / "run"
        (run / "ckpt" / "step_000001").mkdir(parents=True, exist_ok=True)
        (run / "ckpt" / "step_000001" / STATE_FILE).write_text("{}")
        (run / "config.yaml").write_text(yaml.safe_dump(TRAIN))
        (run / "model.yaml").write_text(file.read_text())
        return [["plan", "--model", str(file), "--cluster", "local-cpu", *PLAN_ARGS],
                ["profile", "model", "--model", str(file), "--out", str(tmp / "prof.json")],
                ["export", str(run), "--hf", str(tmp / "hf")]]
    if root.name == "cluster":
        return [["plan", "--model", "tiny", "--cluster", str(file), *PLAN_ARGS]]
    if root.name == "plan":
        return [["train", "tiny-test", f"out_dir={tmp / 'o'}", "--plan", str(file)]]
    if root.name == "hosts":
        return [["launch", "--hosts", str(file), "--dry-run", "--", "train", "tiny-test"]]
    return []


def _cli_cases() -> list[tuple[Root, tuple, Any]]:
    """Every field a command reads (LemoConfig is a Python API: apply_lemo)."""
    return [(root, path, hint) for root, path, hint in FIELDS if root.name != "lemo"]


CLI_CASES = _cli_cases()


@pytest.mark.parametrize("case", CLI_CASES, ids=[_id(c) for c in CLI_CASES])
def test_cli_refusal_is_one_stderr_line_naming_the_field(case, tmp_path, capsys, monkeypatch):
    """The field's first wrong value that the loader refuses (never an accepted one: `train` would train)."""
    root, path, hint = case
    file = tmp_path / f"{root.name}.yaml"
    for value in wrong_values(hint):
        _write(file, _set(root.base, path, value))
        try:
            with monkeypatch.context() as m:
                root.load(file, m)
        except ConfigError:
            break
    else:
        pytest.skip("every wrong value is valid here")
    for argv in _cli_argvs(root, file, tmp_path):
        capsys.readouterr()
        rc = main(argv)
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert rc == 2 and len(err) == 1, (argv[0], value, rc, err)
        assert "error:" in err[0] and _named(err[0], root, path), (argv[0], value, err[0])
        assert not (tmp_path / "o").exists() and not (tmp_path / "hf").exists()


PLANNED = [c for c in FIELDS if c[0].name in ("model", "model.rope", "hf", "hf.qwen3", "hf.qwen3_moe", "hf.phi3",
                                              "cluster")]


@pytest.mark.parametrize("case", PLANNED, ids=[_id(c) for c in PLANNED])
def test_accepted_values_plan_or_are_refused_in_one_line(case, tmp_path, capsys, monkeypatch):
    """A model or cluster value the loader accepts is searched by `meshwright plan` (huge but finite peaks,
    bandwidths, memories, coefficients): a plan, or one line naming the field."""
    root, path, hint = case
    file = tmp_path / f"{root.name}.yaml"
    for value in wrong_values(hint):
        _write(file, _set(root.base, path, value))
        try:
            root.load(file, monkeypatch)
        except ConfigError:
            continue  # refused: the other tests check how
        capsys.readouterr()
        rc = main(_cli_argvs(root, file, tmp_path)[0])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert rc == 0 or (rc == 2 and len(err) == 1 and _named(err[0], root, path)), (value, rc, err)


def test_huge_hostfile_slots_are_refused(tmp_path):
    """The hostfile YAML is read without the config io's integer bound: 10^30 slots became the launch command's
    --nproc-per-node (found in the audit's list of accepted values)."""
    hosts = tmp_path / "hosts.yaml"
    hosts.write_text(yaml.safe_dump({"hosts": [{"name": "n0", "slots": 10**30}]}))
    with pytest.raises(ConfigError, match=r"hosts\[0\]\.slots=10+ is invalid; valid: a positive integer, at most"):
        load_hosts(hosts)
    hosts.write_text(yaml.safe_dump({"hosts": [{"name": "n0", "slots": 2, "port": True}]}))
    with pytest.raises(ConfigError, match=r"hosts\[0\]\.port=True is invalid"):  # was port 1
        load_hosts(hosts)


# ---- values valid alone, nonsense together ----------------------------------------------------------------

ONE_DEVICE_LEMO = ("version: 1\nmodel: tiny\nseq_len: 64\nglobal_batch: 8\nmicro_batch: 4\n"
                   "layers:\n  - {repeat: 4, savers: {lemo: 0.5}}\n")


@pytest.mark.parametrize("overrides,needle", [
    (["micro_batch=16"], "global_batch=8 is invalid; valid: a multiple of micro_batch=16"),
    (["seq_len=512"], "seq_len=512 is invalid; valid: at most model.max_seq_len=256"),
    (["ckpt_staging=free"], "ckpt_staging='free' is invalid; valid: 'auto', or 'keep'/'free' with ckpt_async: true"),
    (["--plan", str(CONFIG_ROOT / "plans" / "tiny-dp2.yaml")], "valid: a plan for this process count"),
    (["meft={adapter_dim: 9007199254740992}"], "meft.adapter_dim=9007199254740992 is invalid"),  # allocator failure
    (["--plan", "one-device-recompute.yaml"], "layers[0].recompute='full' is applied by the distributed runtime"),
    # LeMo: the distributed runtime refuses it too (applied by memory/lemo.py), so that is said, not "use torchrun"
    (["--plan", "one-device-lemo.yaml"], "layers[0].savers.lemo=0.5 is invalid; valid: null (LeMo is a fine-tuning"),
    # plan: auto searched first and named the plan command's flags (--seq-len, --memory-budget-gib)
    (["plan=auto", "auto_profile=false", "seq_len=512"], "seq_len=512 is invalid; valid: at most model.max_seq_len"),
    (["plan=auto", "auto_profile=false", "cluster={peak_tflops: {fp32: 1.0}, memory_gib: 0.0001}"],
     "a larger cluster.memory_gib"),
])
def test_nonsense_combinations_are_one_line_before_any_step(overrides, needle, tmp_path, capsys):
    """Checked before the model or a process group exists. A one-device plan with a per-layer saver (LeMo,
    recompute, ZeRO) runs on the distributed runtime: outside torchrun that was torch's ValueError "environment
    variable RANK expected"; 2**53 adapter dims reached the allocator after the model was built."""
    (tmp_path / "one-device-lemo.yaml").write_text(ONE_DEVICE_LEMO)
    (tmp_path / "one-device-recompute.yaml").write_text(ONE_DEVICE_LEMO.replace("savers: {lemo: 0.5}", "recompute: full"))
    rc = main(["train", "tiny-test", "steps=1", "warmup_steps=0", "eval_every=0", "energy=false", f"out_dir={tmp_path / 'o'}", *overrides])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and needle in err[0], (rc, err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("field,value", [("block_size", 2**53), ("predictor_rank", 2**53)])
def test_lemo_sizes_are_bounded(field, value):
    """apply_lemo accepted 2**53 (the predictors' d_model x rank weights, a block longer than any sequence)."""
    with pytest.raises(ConfigError, match=rf"^lemo.{field}={value} is invalid; valid: .*at most"):
        apply_lemo(build_model(MICRO), {field: value})


def test_report_skips_non_numeric_predictions_of_a_hand_edited_plan(tmp_path, capsys):
    """plan.yaml in a run directory is read as plain YAML by `report`: 'x' in predicted.memory_gib/mfu or a list
    holding a string was a ValueError/TypeError formatting it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "summary.json").write_text('{"step_s": 0.5, "mfu": 0.1, "peak_memory_gib": 1.0}')
    for predicted in ({"memory_gib": "x"}, {"memory_gib": [1, "x"]}, {"mfu": "x"}, {"step_s": [1, "a"]}, "abc"):
        (run / "plan.yaml").write_text(yaml.safe_dump({**PLAN, "predicted": predicted}))
        assert main(["report", str(run)]) == 0, predicted


def test_profile_out_of_memory_names_the_profile_flags(tmp_path, capsys, monkeypatch):
    """`profile hardware --sizes 100000000` ran out of memory and was told to lower micro_batch or seq_len (train
    config fields it does not read)."""
    import meshwright.launcher.profiling.hardware as hardware

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 40000000000000000 bytes.")

    monkeypatch.setattr(hardware, "profile_hardware", oom)
    rc = main(["profile", "hardware", "--out", str(tmp_path / "h.json"), "--sizes", "100000000", "--iters", "1"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "out of memory" in err[0] and "--sizes" in err[0], err
    assert "micro_batch" not in err[0]
