"""`meshwright profile hardware|model`: measure the device, the links and the model's blocks.

``meshwright profile hardware --out hw.json`` profiles the local device; run it under torchrun
(``torchrun --nproc-per-node G -m meshwright.cli profile hardware ...``) to time the collectives too.
``meshwright profile model --model tiny --out model.json`` times and measures the model's blocks; under
torchrun it also times the runtime's TP/SP and ZeRO-2/3 blocks (their framework overhead).
"""

from __future__ import annotations

import argparse
import os
import sys

from meshwright.errors import ConfigError


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers, e.g. 1,2,4")
    return vals


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="profile the hardware (matmul, collectives) or a model's blocks",
                       description="Measure what the planner's cost model assumes; write a versioned JSON profile.")
    kinds = p.add_subparsers(dest="what", metavar="{hardware,model}")
    kinds.required = True
    h = kinds.add_parser("hardware", help="matmul TFLOP/s per dtype; under torchrun also collectives, p2p, overlap")
    h.add_argument("--out", default="hardware_profile.json", help="output JSON (written by rank 0)")
    h.add_argument("--dtypes", default=None, help="comma-separated: fp32,bf16,fp16,fp8 (default fp32 on CPU, bf16,fp8,fp32 on GPU; "
                   "fp8 is measured where the GPU has FP8 tensor cores, skipped elsewhere)")
    h.add_argument("--sizes", type=_int_list, default=None, help="matmul sizes n (default 256,512,1024 CPU; 2048,4096,8192 GPU)")
    h.add_argument("--cluster", default=None, help="cluster preset whose figures fill what cannot be measured here")
    h.add_argument("--iters", type=int, default=3)
    h.add_argument("--timeout-s", type=float, default=120.0, help="process-group timeout")
    h.set_defaults(func=run_hardware)
    m = kinds.add_parser("model", help="per-layer fwd/bwd time fit and saved-activation bytes per tp degree")
    m.add_argument("--model", required=True, help="model preset name or path")
    m.add_argument("--out", default="model_profile.json")
    m.add_argument("--batch-sizes", type=_int_list, default=[1, 2])
    m.add_argument("--seq-lens", type=_int_list, default=[64, 128])
    m.add_argument("--tp", type=_int_list, default=None, help="tp degrees (default 1,2 where they divide the heads)")
    m.add_argument("--iters", type=int, default=3)
    m.add_argument("--device", default="cpu", help="cpu or cuda")
    m.add_argument("--dtype", default=None, choices=("fp32", "bf16"),
                   help="training precision to profile in (default: bf16 autocast on cuda, fp32 on cpu); "
                        "the planner needs a profile in the dtype it plans for")
    m.add_argument("--timeout-s", type=float, default=120.0, help="process-group timeout (under torchrun)")
    m.set_defaults(func=run_model)


def _check_common(args: argparse.Namespace) -> None:
    """Before any measurement: iterations, the process-group timeout and the --out path."""
    from meshwright.config.io import check_output_path

    if args.iters < 1:  # 0 iterations averaged an empty list into a NaN profile
        raise ConfigError(f"--iters={args.iters!r} is invalid; valid: a positive integer")
    if not 0 < args.timeout_s < float("inf"):
        raise ConfigError(f"--timeout-s={args.timeout_s!r} is invalid; valid: a positive number of seconds")
    check_output_path(args.out, "--out", directory=False,
                      inputs={"--model": getattr(args, "model", None), "--cluster": getattr(args, "cluster", None)})


def run_hardware(args: argparse.Namespace) -> int:
    import torch

    from meshwright.config import load_cluster
    from meshwright.launcher.profiling.hardware import distributed_from_env, profile_hardware, save_hardware_profile

    _check_common(args)
    gpu = torch.cuda.is_available()
    # `--dtypes ''` is checked as given (it was taken as "the default")
    dtypes = args.dtypes.split(",") if args.dtypes is not None else (["bf16", "fp8", "fp32"] if gpu else ["fp32"])
    sizes = args.sizes or ([2048, 4096, 8192] if gpu else [256, 512, 1024])
    cluster = load_cluster(args.cluster) if args.cluster else None
    with distributed_from_env(args.timeout_s) as writer:
        prof = profile_hardware(dtypes, sizes, cluster=cluster, iters=args.iters)
        if not prof["derived"]["peak_tflops"]:  # fp8 alone where it is skipped: a profile `plan` refuses
            raise ConfigError(f"--dtypes={args.dtypes!r} is invalid; valid: at least one dtype this device measures "
                              f"(fp8 {prof['fp8_matmul']}), e.g. fp32")
        if writer:
            save_hardware_profile(prof, args.out)
            d = prof["derived"]
            peaks = ", ".join(f"{k} {v:.3g}" for k, v in d["peak_tflops"].items())
            print(f"wrote {args.out}: peak TFLOP/s {peaks}; intra {d['intra_bw_gbps']:.3g} GB/s "
                  f"{d['intra_latency_us']:.3g} us; inter {d['inter_bw_gbps']:.3g} GB/s; overlap slowdown "
                  f"{d['overlap_slowdown']:.2f}; GPU: {prof['device']['gpu'].get('name', prof['device']['gpu'].get('reason'))}"
                  + (f", {prof['device']['memory_gib']:.2f} GiB (the planner's budget at most)"
                     if prof["device"]["memory_gib"] is not None else ""))
            if prof["fp8_matmul"].startswith("skipped"):
                print(f"fp8 matmul {prof['fp8_matmul']}")
    return 0


def run_model(args: argparse.Namespace) -> int:
    import torch

    from meshwright.config import load_model_config
    from meshwright.launcher.profiling.hardware import distributed_from_env
    from meshwright.launcher.profiling.model import default_tps, profile_model, save_model_profile

    _check_common(args)
    cfg = load_model_config(args.model)
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        raise ConfigError(f"--device={args.device!r} is invalid; valid: cpu" + (" or cuda" if torch.cuda.is_available() else " (no GPU here)"))
    tps = args.tp or default_tps(cfg)
    with distributed_from_env(args.timeout_s) as writer:
        device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", "0"))) if args.device == "cuda" else torch.device("cpu")
        prof = profile_model(cfg, args.batch_sizes, args.seq_lens, tps, device, args.iters,
                             progress=writer and sys.stderr.isatty(), dtype=args.dtype)
        if writer:
            save_model_profile(prof, args.out)
            for e in prof["entries"]:
                print(f"{e['kind']} tp={e['tp']}: fwd fit err {100 * e['fwd_fit']['max_rel_err']:.0f}%, "
                      f"saved {e['act_bytes_per_token']['none']:.0f} B/token")
            for e in prof.get("runtime_overheads", []):
                p = max(e["points"], key=lambda q: q["tokens"])
                print(f"runtime {e['kind']} tp={e['tp']} sp={e['sp']} zero={e['zero']} over {e['group_size']} ranks: "
                      f"{1e3 * p['runtime_s']:.2f} ms vs plain shard {1e3 * p['plain_s']:.2f} ms at {p['tokens']} tokens")
            print(f"wrote {args.out}")
    return 0
