"""`fvlm eval` and `fvlm generate`."""

from __future__ import annotations

import math

from fvlm import overrides
from fvlm.errors import UsageError, check_folder_path, not_empty

MODES_HELP = "comma-separated: coarse_only,coarse_fine,autoregressive (default: every mode the model has)"


def register(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="validation loss in each inference mode, multiple-choice accuracy, attention pictures",
        description="Evaluate a run's latest checkpoint (or every one with --all-checkpoints, or one checkpoint "
        "folder): validation loss of the answer tokens in each mode on the same samples, the gaps "
        "between modes with paired 95%% intervals, and multiple-choice accuracy (95%% interval: Wilson, "
        "or a bootstrap over whole videos when questions share one; chance level, grey-frame control, "
        "per category; paired differences between modes and, with several checkpoints, between "
        "checkpoints). DINO runs once per sample for all modes and once per question for all options. "
        "Writes <run>/eval/eval.json and eval.md (or --out).",
    )
    ev.add_argument("target", metavar="RUN_DIR_OR_CKPT")
    ev.add_argument("--modes", help=MODES_HELP)
    ev.add_argument("--data", help="validation shards (default: the run's data.val); 'none' skips the losses")
    ev.add_argument(
        "--bench",
        nargs="+",
        default=[],
        metavar="FILE",
        help="multiple-choice benchmarks: .jsonl files or shard folders/globs "
        "(default for synthetic runs: the synthetic bench split)",
    )
    ev.add_argument("--all-checkpoints", action="store_true", help="evaluate every complete checkpoint of the run")
    ev.add_argument("--out", help="output folder (default: <run>/eval)")
    ev.add_argument("--max-samples", type=int, default=0, help="validation samples (default: all)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument(
        "--score",
        choices=("mean", "sum"),
        default="mean",
        help="option score: mean (default) or sum of the answer tokens' log-likelihood; both are reported",
    )
    ev.add_argument(
        "--protocol",
        choices=("loglik", "generate", "both"),
        default="loglik",
        help="how benchmark questions are answered: loglik (default; each option's log-likelihood), "
        "generate (the model writes an answer after lmms-eval's instruction; its letter is extracted), "
        "or both, reported side by side",
    )
    ev.add_argument("--max-new-tokens", type=int, default=16, help="generated answers' length limit (default 16)")
    ev.add_argument(
        "--baseline",
        nargs="+",
        default=[],
        metavar="HF_FOLDER",
        help="transformers image-text-to-text model folders (e.g. SmolVLM2) to answer the same questions "
        "under the same protocols; their rows sit beside the checkpoint's",
    )
    ev.add_argument(
        "--log-samples",
        action="store_true",
        help="also write every benchmark question's per-option scores (mean and summed answer "
        "log-likelihood, real and grey frames) and the chosen option, one JSON line per question "
        "and mode, to <out>/samples_step_NNNNNNN.jsonl",
    )
    ev.add_argument(
        "--attention",
        type=int,
        default=0,
        metavar="N",
        help="draw where the model looks on the first N probe videos (PNG per video)",
    )
    ev.add_argument("--gif", action="store_true", help="also write a GIF per attention video")
    ev.add_argument("--layer", type=int, help="attention of one DINO layer (default: mean over layers)")
    overrides.add_arguments(
        ev,
        config=False,
        help_text="run config fields to override (e.g. data.max_frames=16); the model is the checkpoint's",
    )
    ev.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    ev.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="benchmarks as released: prepare Video-MME, MVBench, MLVU for fvlm eval")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="ACTION", required=True)
    prep = bench_sub.add_parser(
        "prepare",
        help="read a benchmark's released files into fvlm's benchmark JSONL",
        description="Reads a local copy of Video-MME (parquet + data/ + subtitle/), MVBench (json/ + video/) "
        "or MLVU (json/ + video/) and writes OUT/<name>.jsonl for `fvlm eval --bench`, clips cut at their "
        "start/end with PyAV into OUT/clips/, and OUT/prepare_report.json (written, skipped by reason). "
        "Nothing is downloaded.",
    )
    prep.add_argument("benchmark", choices=("video-mme", "mvbench", "mlvu"))
    prep.add_argument("src", metavar="SRC", help="the folder the benchmark was downloaded to")
    prep.add_argument("out", metavar="OUT", help="output folder")
    prep.add_argument("--subtitles", action="store_true", help="Video-MME: put each video's subtitles in the prompt")
    prep.set_defaults(func=_cmd_bench_prepare)
    lmms = bench_sub.add_parser(
        "lmms-task",
        help="an lmms-eval task from a benchmark JSONL (both protocols)",
        description="Checks BENCH.jsonl (fvlm's benchmark format) as `fvlm eval --bench` does and writes an "
        "lmms-eval task folder: OUT/<name>.jsonl (absolute media paths), OUT/<name>.yaml (multiple choice by "
        "log-likelihood) and OUT/<name>_generate.yaml (generated letter). Run them with "
        "`python -m lmms_eval --model fvlm --include_path OUT --tasks <name>` (docs/benchmarks.md).",
    )
    lmms.add_argument("bench", metavar="BENCH_JSONL")
    lmms.add_argument("out", metavar="OUT", help="output folder")
    lmms.add_argument("--name", help="task name (default: the JSONL's name)")
    lmms.add_argument("--max-new-tokens", type=int, default=16, help="the generation task's answer length (default 16)")
    lmms.set_defaults(func=_cmd_bench_lmms_task)

    gen = sub.add_parser(
        "generate",
        help="describe a video, frame folder or image with a trained model",
        description="Generate text in autoregressive mode (KV-cached) by default. Images are repeated to the "
        "number of frames the run trained images with (data.replicate_image_frames).",
    )
    gen.add_argument("target", metavar="RUN_DIR_OR_CKPT")
    gen.add_argument(
        "media",
        metavar="VIDEO_OR_IMAGE",
        nargs="?",
        help="a video file, a folder of frames, or an image; without one, --prompt is answered from text alone",
    )
    gen.add_argument("--prompt", help="the question (default: the data pipeline's prompt for the kind of input)")
    gen.add_argument(
        "--mode",
        choices=("coarse_only", "coarse_fine", "autoregressive"),
        help="inference mode (default: autoregressive where the model has it)",
    )
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument(
        "--frames",
        type=int,
        help="frames to use (default: the run's data.max_frames, for images data.replicate_image_frames)",
    )
    gen.add_argument("--attention", metavar="DIR", help="also draw where the model looked into DIR")
    gen.add_argument("--gif", action="store_true", help="with --attention: also a GIF")
    gen.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    gen.set_defaults(func=_cmd_generate)


def _cmd_bench_prepare(args) -> int:
    from fvlm.eval.prepare import prepare

    check_folder_path(args.out, "OUT")
    report = prepare(args.benchmark, args.src, args.out, subtitles=args.subtitles)
    skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items()) or "none"
    print(
        f"{report['jsonl']}: {report['written']} questions ({len(report['per_category'])} categories); skipped: {skipped}"
    )
    if report["open_ended_skipped"]:
        tasks = ", ".join(f"{k} {v}" for k, v in report["open_ended_skipped"].items())
        print(f"open-ended questions left out (not multiple choice): {tasks}")
    if report["clips_cut"] or report["clips_reused"]:
        print(f"clips: {report['clips_cut']} cut, {report['clips_reused']} already there")
    return 0


def _cmd_bench_lmms_task(args) -> int:
    from fvlm.eval.lmms_tasks import write_task

    check_folder_path(args.out, "OUT")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: expected a number >= 1")
    made = write_task(args.bench, args.out, name=args.name, max_new_tokens=args.max_new_tokens)
    print(f"{made['folder']}: tasks {', '.join(made['tasks'])} ({made['questions']} questions)")
    return 0


def _cmd_generate(args) -> int:
    from fvlm.eval.generate import cmd_generate

    if args.max_new_tokens < 1 or (args.frames is not None and args.frames < 1):
        raise UsageError("--max-new-tokens and --frames must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):  # NaN fails every comparison
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
    not_empty(args, "prompt", "attention", "device")
    if args.attention:
        check_folder_path(args.attention, "--attention")
    if args.media is None and args.prompt is None:
        raise UsageError("give a VIDEO_OR_IMAGE, or a --prompt to answer from text alone")
    if args.media is None and args.attention:
        raise UsageError("--attention needs a VIDEO_OR_IMAGE to look at")
    return cmd_generate(args)


def cmd_eval(args) -> int:
    from fvlm.eval.evaluate import evaluate_run

    if args.batch_size < 1 or args.max_samples < 0 or args.attention < 0 or args.max_new_tokens < 1:
        raise UsageError("--batch-size and --max-new-tokens must be >= 1; --max-samples and --attention >= 0")
    if args.layer is not None:
        if not args.attention:
            raise UsageError("--layer picks the DINO layer of the attention pictures: give --attention N too")
        if args.layer < 0:
            raise UsageError(f"--layer must be >= 0, got {args.layer}")
    not_empty(args, "data", "out", "device")
    if any(not b.strip() for b in args.bench):
        raise UsageError("--bench: an empty file name")
    if args.out:
        check_folder_path(args.out, "--out")
    _, items = overrides.from_args(args, "eval", config=False)
    modes = None
    if args.modes is not None:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if not modes:
            raise UsageError("--modes: no mode given (leave --modes out for every mode the model has)")
    path = evaluate_run(
        args.target,
        out=args.out,
        all_checkpoints=args.all_checkpoints,
        modes=modes,
        data=args.data,
        benches=args.bench,
        overrides=items,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        device=args.device,
        score=args.score,
        attention=args.attention,
        gif=args.gif,
        layer=args.layer,
        log_samples=args.log_samples,
        protocols=("loglik", "generate") if args.protocol == "both" else (args.protocol,),
        max_new_tokens=args.max_new_tokens,
        baselines=args.baseline,
    )
    print(f"wrote {path} and {path.with_name('eval.md')}")
    return 0
