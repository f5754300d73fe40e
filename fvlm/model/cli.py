"""`fvlm flops`: FLOPs per training sample, samples per budget, and measured FLOPs side by side."""

from __future__ import annotations

import json
import math

from fvlm import overrides
from fvlm.errors import UsageError, check_folder_path, not_empty
from fvlm.model.pretrain_tiny import Recipe

PAPER_SIZES = {"135M": "smollm2-135m", "360M": "smollm2-360m", "1.7B": "smollm2-1.7b"}


def register(sub) -> None:
    bb = sub.add_parser("backbones", help="make backbone folders (the tiny pretrained ones, imported real ones)")
    bb_sub = bb.add_subparsers(dest="backbones_command", metavar="COMMAND", required=True)
    tiny = bb_sub.add_parser(
        "pretrain-tiny",
        help="pretrain the tiny DINO and the tiny LLMs on the synthetic world",
        description="Writes tiny-dino/ (a Dinov2Model trained on per-patch colour, shape and grid position) "
        "and tiny-llm/, tiny-llm-m/, tiny-llm-l/ (LlamaForCausalLM chat models of "
        "the synthetic world's text, byte-level tokenizer beside each) under OUT, "
        "plus backbones.json with the linear-probe check. Deterministic for a seed.",
    )
    tiny.add_argument("out", metavar="OUT")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--image-size", type=int, default=64, help="frame side the encoder is trained at")
    tiny.add_argument(
        "--marked-share",
        type=float,
        default=Recipe.marked_share,
        help="share of the encoder's frames that show an object on the marked task's white mark, with "
        "targets for where the mark is (default %(default)s, the shipped recipe; 0: recipe 4's frames)",
    )
    tiny.add_argument(
        "--mark-cls",
        action="store_true",
        help="experiment: the encoder's CLS token also names the object on the mark (the marked task's "
        "answer; a diagnostic, needs --marked-share)",
    )
    tiny.set_defaults(func=cmd_pretrain_tiny)
    imp = bb_sub.add_parser(
        "import",
        help="turn a GGUF file or a loadable model folder into a plain HF folder",
        description="Writes OUT: safetensors weights, config, tokenizer and chat template of the "
        "causal language model in SRC (a .gguf file, or any folder transformers "
        "loads), ready for model.llm=OUT. The folder is loaded back and its logits "
        "compared with the source's before it is moved into place. Reading GGUF "
        "needs the 'real' extra (pip install -e '.[real]').",
    )
    imp.add_argument("src", metavar="SRC")
    imp.add_argument("out", metavar="OUT")
    imp.add_argument(
        "--dtype",
        default="auto",
        help="float32, bfloat16 or float16; auto keeps the source's (float32 for GGUF, whose tensors are dequantised)",
    )
    imp.set_defaults(func=cmd_import)

    p = sub.add_parser("flops", help="FLOPs per training sample and samples per FLOP budget")
    overrides.add_arguments(p)
    p.add_argument("--budget", type=float, action="append", help="FLOP budget(s); default: the plan's C1-C4")
    p.add_argument("--flops-formula", choices=("exact", "seed"), default="exact")
    p.add_argument("--frames", type=int, help="frames per sample (default: data.max_frames)")
    p.add_argument("--text-tokens", type=int, help="text tokens per sample (default: data.max_text_tokens)")
    p.add_argument(
        "--measure",
        action="store_true",
        help="also count FLOPs of a real training step with torch.utils.flop_counter (CPU)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _report(model_cfg, frames, text, formula, budgets, measure=False):
    from fvlm.model.flops import estimate_flops, measure_flops

    est = estimate_flops(model_cfg, frames, text, formula=formula)
    exact = est if formula == "exact" else estimate_flops(model_cfg, frames, text)
    seed = est if formula == "seed" else estimate_flops(model_cfg, frames, text, formula="seed")
    out = {
        "llm": model_cfg.llm,
        "dino": model_cfg.dino,
        "arch": model_cfg.arch,
        "tokens_per_frame": model_cfg.tokens_per_frame,
        "frames": frames,
        "text_tokens": text,
        "formula": formula,
        "params": est.params,
        "flops_per_sample": est.per_sample,
        "flops_per_sample_exact": exact.per_sample,
        "flops_per_sample_seed": seed.per_sample,
        "breakdown_exact": exact.breakdown,
        # Gradient checkpointing's repeated forward: run by the machine, left out of budgets.
        "recompute_per_sample": exact.recompute,
        "flops_per_sample_executed": exact.executed,
        "samples_for_budget": {name: est.samples_for(b) for name, b in budgets.items()},
    }
    if measure:
        measured = measure_flops(model_cfg, frames, text)
        out["flops_per_sample_measured"] = measured
        out["exact_over_measured"] = exact.executed / measured
    return out


def run(args) -> int:
    from fvlm.config import load_config
    from fvlm.model.flops import PLAN_BUDGETS, PLAN_FRAMES, PLAN_TEXT_TOKENS

    config, items = overrides.from_args(args, "flops")
    cfg = load_config(config, items)
    for budget in args.budget or []:
        if not (math.isfinite(budget) and budget > 0):
            raise UsageError(f"--budget must be a positive number of FLOPs (like 1e18), got {budget}")
    budgets = {f"{b:.3g}": b for b in args.budget} if args.budget else dict(PLAN_BUDGETS)
    for flag, value in (("--frames", args.frames), ("--text-tokens", args.text_tokens)):
        if value is not None and value < 1:  # 0 is no count at all, not "the default"
            raise UsageError(f"{flag} must be >= 1, got {value}")
    frames = args.frames if args.frames is not None else cfg.data.max_frames
    text = args.text_tokens if args.text_tokens is not None else cfg.data.max_text_tokens
    result = {"config": _report(cfg.model, frames, text, args.flops_formula, budgets, args.measure)}

    # The plan's three sizes with DINOv2-small at its sample shape (~500 tokens), both architectures.
    paper = {}
    for size, llm in PAPER_SIZES.items():
        for arch in ("foveated", "multi_token"):
            model_cfg = load_config(
                None, {"model": {"llm": llm, "dino": "dinov2-small", "arch": arch, "image_size": 224}}
            ).model
            paper[f"{size}-{arch}"] = _report(model_cfg, PLAN_FRAMES, PLAN_TEXT_TOKENS, args.flops_formula, budgets)
    result["paper_sizes"] = paper

    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    c = result["config"]
    print(f"config: llm={c['llm']} dino={c['dino']} arch={c['arch']} frames={frames} text_tokens={text}")
    print(
        f"  params: {c['params']['total']:,} (llm {c['params']['llm']:,}, dino {c['params']['dino']:,}, "
        f"connector {c['params']['connector']:,})"
    )
    print(
        f"  FLOPs/sample: exact {c['flops_per_sample_exact']:.4g}   seed (2*N*tokens) {c['flops_per_sample_seed']:.4g}"
    )
    if c["recompute_per_sample"]:
        print(
            f"  + gradient checkpointing's recomputed forward {c['recompute_per_sample']:.4g} "
            f"(executed {c['flops_per_sample_executed']:.4g}; budgets count without it)"
        )
    if "flops_per_sample_measured" in c:
        print(
            f"  measured (torch flop counter): {c['flops_per_sample_measured']:.4g}   "
            f"exact (executed)/measured = {c['exact_over_measured']:.4f}"
        )
    print(
        "  samples per budget ("
        + args.flops_formula
        + "): "
        + ", ".join(f"{k}={v:,}" for k, v in c["samples_for_budget"].items())
    )
    print(
        f"\nplan sizes (DINOv2-small, 224 px, {PLAN_FRAMES} frames + {PLAN_TEXT_TOKENS} text tokens), "
        f"formula={args.flops_formula}:"
    )
    print(f"  {'model':<18}{'params':>14}{'exact':>12}{'seed':>12}  samples per budget")
    for name, r in paper.items():
        budget_text = " ".join(f"{k}={v:,}" for k, v in r["samples_for_budget"].items())
        print(
            f"  {name:<18}{r['params']['total']:>14,}{r['flops_per_sample_exact']:>12.4g}"
            f"{r['flops_per_sample_seed']:>12.4g}  {budget_text}"
        )
    return 0


def cmd_pretrain_tiny(args) -> int:
    from pathlib import Path

    from fvlm.model.pretrain_tiny import make_tiny_backbones

    not_empty(args, "OUT")
    out = Path(args.out)
    check_folder_path(out, "OUT")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out}: exists and is not empty (choose a new folder)")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.image_size <= 0 or args.image_size % 8:
        raise UsageError(f"--image-size must be a positive multiple of 8 (the patch size), got {args.image_size}")
    if not 0 <= args.marked_share <= 1:
        raise UsageError(f"--marked-share must be in [0, 1], got {args.marked_share}")
    if args.mark_cls and not args.marked_share:
        raise UsageError("--mark-cls needs frames with a mark: give --marked-share above 0")
    recipe = Recipe(seed=args.seed, image_size=args.image_size, marked_share=args.marked_share, mark_cls=args.mark_cls)
    report = make_tiny_backbones(out, recipe)
    probe = report["dino_probe"]
    print(
        f"wrote {out}: tiny-dino (probe: colour {probe['colour_accuracy']:.3f}, shape {probe['shape_accuracy']:.3f}, "
        f"row {probe['row_accuracy']:.3f}, column {probe['column_accuracy']:.3f}; a query told where to look puts "
        f"{probe['place_query_mass']:.2f} of its attention there, uniform {probe['uniform_mass']:.2f}), "
        + ", ".join(f"{k} ({v['parameters']:,} params)" for k, v in report["llms"].items())
        + f" in {report['seconds']:.0f} s"
    )
    return 0


def cmd_import(args) -> int:
    from fvlm.model.importer import import_llm

    not_empty(args, "SRC", "OUT")
    report = import_llm(args.src, args.out, dtype=args.dtype)
    print(
        f"wrote {args.out}: {report['architecture']}, {report['parameters']:,} parameters, {report['dtype']}, "
        f"tokenizer {report['tokenizer_size']:,} tokens with its chat template; logits equal the source's "
        f"(max difference {report['max_logit_difference']:.2g}); {report['seconds']:.0f} s"
    )
    return 0
