"""`fvlm export`: a trained model as a folder that plain transformers loads."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a trained model as a folder that transformers loads (trust_remote_code)",
        description="Writes OUT: model.safetensors, config.json (both backbones' transformers configs and "
        "auto_map), configuration_fvlm.py and modeling_fvlm.py (self-contained: torch and transformers "
        "only), the tokenizer with its chat template, preprocessor_config.json, generation_config.json and "
        "a model card (README.md) with the run's training and evaluation. "
        "AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True) loads it. The folder is written "
        "beside OUT, loaded back and its logits compared with fvlm's in every mode before it is moved into "
        "place. See docs/export.md.",
    )
    p.add_argument("target", metavar="RUN_DIR_OR_CKPT", help="a run folder (its latest checkpoint) or a checkpoint")
    p.add_argument("out", metavar="OUT", help="a new (or empty) folder")
    p.add_argument(
        "--push",
        metavar="REPO",
        help="then upload OUT to the Hugging Face Hub as model repository REPO (created if missing), with "
        "huggingface_hub's HfApi().upload_folder; needs the network and a login (HF_TOKEN or `hf auth login`). "
        "A thin call that fvlm's tests cannot exercise (they run offline)",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from fvlm.export.writer import export_model, push

    report = export_model(args.target, args.out)
    check = ", ".join(f"{m} {d:.2g}" for m, d in report["max_logit_difference"].items())
    at = f" at step {report['step']}" if report["step"] is not None else ""
    print(
        f"wrote {args.out}: {report['arch']} model of {report['run_id']}{at}, "
        f"{report['parameters']:,} parameters, modes {', '.join(report['modes'])}; loaded back, its logits "
        f"equal fvlm's (max difference {check}); {report['seconds']:.0f} s"
    )
    if args.push:
        try:
            url = push(Path(args.out), args.push)
        except Exception as exc:  # the network, a login, the Hub: whatever fails, the folder stays written
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            print(f"fvlm: error: push to {args.push} failed ({line}); the folder is at {args.out}", file=sys.stderr)
            return 1
        print(f"pushed to {url}")
    return 0
