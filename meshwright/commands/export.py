"""`meshwright export CKPT --hf OUT [--peft OUT]`: a training checkpoint as a Hugging Face model directory and,
for a LoRA run, as a PEFT adapter directory."""

from __future__ import annotations

import argparse

from meshwright.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model (or PEFT adapter) directory",
                       description="Read CKPT (a run directory: its latest checkpoint; or a ckpt/step_* directory) "
                                   "and write OUT/config.json + OUT/model.safetensors, loadable with transformers' "
                                   "AutoModelForCausalLM.from_pretrained(OUT) and with `init_from: OUT` (a LoRA run: "
                                   "merged, W + scale * B @ A). --peft writes a LoRA run's adapters as "
                                   "adapter_config.json + adapter_model.safetensors for PeftModel.from_pretrained.")
    p.add_argument("ckpt", metavar="CKPT", help="run directory or checkpoint directory")
    p.add_argument("--hf", metavar="OUT", help="output directory (Hugging Face layout; LoRA runs merged)")
    p.add_argument("--peft", metavar="OUT", help="output directory for a LoRA run's PEFT adapter (written without "
                                                  "the peft package; only loading it needs peft)")
    p.add_argument("--base", metavar="DIR", help="a LoRA run's adapter-only checkpoint: the Hugging Face directory "
                                                 "of its base (init_from), when it is no longer where training read "
                                                 "it; its fingerprint must match the checkpoint's")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from meshwright.train.hf_export import export_hf
    from meshwright.train.peft_export import export_peft

    if args.hf is None and args.peft is None:
        raise ConfigError("--hf/--peft are both unset; valid: --hf OUT (a Hugging Face model directory), --peft OUT "
                          "(a LoRA run's PEFT adapter), or both")
    if args.hf is not None:
        out = export_hf(args.ckpt, args.hf, base=args.base)
        print(f"exported {args.ckpt} -> {out} (config.json, model.safetensors)")
    if args.peft is not None:
        out = export_peft(args.ckpt, args.peft, base=args.base)
        # said because the GPU image has no peft: the writer needs only safetensors, the reader needs peft
        print(f"exported {args.ckpt} -> {out} (adapter_config.json, adapter_model.safetensors; peft is not needed "
              f"to write them, only to load them: PeftModel.from_pretrained)")
    return 0
