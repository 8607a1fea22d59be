"""The worker runs of the one 2-rank launch several test modules share (conftest.worker_launch; tests/distributed/
worker_runs.py runs them in turn on the launch's one process group, and stops at the first that fails). A launch
costs ~12 CPU-s of startup (torchrun's agent, every rank importing torch and meshwright) before any worker does
anything; these five were five launches.

One function per case: it writes the case's inputs under its own directory and returns its worker script and
arguments. A new case is a function appended to CASES (the order is the run order; state_bytes first, so its
allocation records see a process no other case ran in, as its own launch did). A case whose inputs need a package that
is absent (transformers) is left out; its test module skips itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def state_bytes(d: Path) -> list[str]:
    """test_state_bytes.py: ZeRO-0/1/2/3 model states per rank against the planner."""
    return ["state_bytes_worker.py", str(d / "report.json")]


def hf_load(d: Path) -> list[str]:
    """test_hf_sharded_load.py: sharded init_from loads of a Llama, a GPT-2 and a Phi-3 checkpoint."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "hf")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4,
                                                                n_positions=64))
    with torch.no_grad():  # biases start at 0: perturb them so the fused c_attn bias's boxes are seen
        for p in gpt2.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    gpt2.save_pretrained(d / "gpt2")
    phi3 = transformers.Phi3ForCausalLM(transformers.Phi3Config(  # fused q/k/v and gate/up, a window under SEQ=16
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=8, pad_token_id=None, bos_token_id=None,
        eos_token_id=None))
    phi3.save_pretrained(d / "phi3")
    return ["hf_load_worker.py", str(d / "hf"), str(d / "report.json"), str(d / "gpt2"), str(d / "phi3")]


def coat(d: Path) -> list[str]:
    """test_coat_distributed.py: CoatAdamW under FSDP2 and its DCP resume."""
    return ["coat_fsdp_worker.py", str(d / "coat.json"), str(d / "ckpt")]


def meft_ddp(d: Path) -> list[str]:
    """test_meft_ddp.py: MEFT's adapter gradients reduced under DDP and FSDP2 (writes OUT.rank{R}.json)."""
    return ["meft_ddp_worker.py", str(d / "meft_ddp")]


def wta_crs_tp(d: Path) -> list[str]:
    """test_wta_crs_tp.py: WTA-CRS under tp=2 and DDP."""
    return ["wta_crs_tp_worker.py", str(d / "report.json")]


CASES: list[Callable[[Path], list[str]]] = [state_bytes, hf_load, coat, meft_ddp, wta_crs_tp]


def case_dir(tmp: Path, case: Callable[[Path], list[str]]) -> Path:
    return tmp / case.__name__


def launch_args(tmp: Path) -> list[str]:
    """worker_runs' arguments for every case above, each writing under ``tmp/<case name>``."""
    args: list[str] = []
    for case in CASES:
        d = case_dir(tmp, case)
        d.mkdir(parents=True, exist_ok=True)
        try:
            run = case(d)
        except ImportError:  # only the optional test dependencies: the case's test module importorskips them too
            continue
        args += [*(["::"] if args else []), *run]
    return args
