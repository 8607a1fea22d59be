"""`meshwright export CKPT --hf OUT`: a training checkpoint as a Hugging Face model directory."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="Write a checkpoint as a Hugging Face model directory",
                       description="Read CKPT (a run directory: its latest checkpoint; or a ckpt/step_* directory) "
                                   "and write OUT/config.json + OUT/model.safetensors, loadable with transformers' "
                                   "AutoModelForCausalLM.from_pretrained(OUT) and with `init_from: OUT`.")
    p.add_argument("ckpt", metavar="CKPT", help="run directory or checkpoint directory")
    p.add_argument("--hf", required=True, metavar="OUT", help="output directory (Hugging Face layout)")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from meshwright.train.hf_export import export_hf

    out = export_hf(args.ckpt, args.hf)
    print(f"exported {args.ckpt} -> {out} (config.json, model.safetensors)")
    return 0
