"""`fvlm data synth` and `fvlm data inspect`."""

from __future__ import annotations

import json
from pathlib import Path

from fvlm import overrides
from fvlm.config import SYNTH_MAX_FRAMES, SYNTH_SIZES, DataConfig
from fvlm.data.convert import DEFAULT_SOURCE, FORMATS
from fvlm.errors import UsageError, not_empty

_DEFAULTS = DataConfig()


def register(sub) -> None:
    data = sub.add_parser("data", help="generate the synthetic dataset; inspect shards before training")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")

    synth = data_sub.add_parser("synth", help="write the synthetic dataset as WebDataset shards")
    synth.add_argument(
        "out",
        metavar="OUT",
        help="output folder (train/, val/, probe/, bench/, manifest.json); a set that an earlier run left unfinished "
        "is started over",
    )
    synth.add_argument("--videos", type=int, default=_DEFAULTS.synth_videos)
    synth.add_argument("--images", type=int, default=_DEFAULTS.synth_images)
    synth.add_argument("--texts", type=int, default=_DEFAULTS.synth_texts)
    synth.add_argument("--frames", type=int, default=_DEFAULTS.synth_frames, help="frames per video")
    synth.add_argument("--size", type=int, default=_DEFAULTS.synth_size, help="frame side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--val", type=int, default=_DEFAULTS.synth_val, help="validation samples")
    synth.add_argument("--probe", type=int, default=10, help="attention-probe videos")
    synth.add_argument("--bench", type=int, default=200, help="multiple-choice benchmark questions")
    synth.add_argument(
        "--mc-fraction",
        type=float,
        default=0.0,
        help="share of train/val videos and images asked as multiple choice (default 0: captions; "
        "a whole multiple-choice dialogue needs data.max_text_tokens >= 192)",
    )
    synth.add_argument(
        "--background",
        choices=("texture", "flat"),
        default="texture",
        help="texture: colour blobs, stripes and grain; flat: one colour per video",
    )
    synth.add_argument(
        "--object-scale",
        type=float,
        nargs=2,
        default=(0.125, 0.19),
        metavar=("MIN", "MAX"),
        help="object side as a share of the frame side",
    )
    synth.add_argument("--max-objects", type=int, default=5, help="most objects per video (images: at most 4)")
    synth.add_argument("--min-objects", type=int, default=3, help="fewest objects per video and image")
    synth.add_argument(
        "--video-task",
        choices=("motion", "reveal", "marked"),
        default="motion",
        help="motion: which object moves and which way; reveal: the colour a white object turns "
        "into while three others appear around it; marked: the colour of the moving object on a white "
        "mark among up to three others (reveal and marked: the bench always shows four objects)",
    )
    synth.add_argument(
        "--image-task",
        choices=("named", "marked"),
        default="named",
        help="named: the colour, shape or place of an object the question names; marked: the colour of "
        "the object on a white mark among up to three others (the bench always shows four)",
    )
    synth.set_defaults(func=cmd_synth)

    convert = data_sub.add_parser(
        "convert",
        help="published datasets (LLaVA-style JSON, Hugging Face datasets, caption tables) -> fvlm shards",
        description="Converts a dataset in its published format into fvlm's shards; see docs/data.md. "
        "A rerun with the same options resumes: finished shards (listed in OUT/convert.json) are kept.",
    )
    convert.add_argument("format", metavar="FORMAT", choices=FORMATS, help=" | ".join(FORMATS))
    convert.add_argument(
        "src", metavar="SRC", help="the annotation file or folder (JSON/JSONL, CSV, caption JSONs, a datasets folder)"
    )
    convert.add_argument("out", metavar="OUT", help="output folder: <source>-NNNNN.tar shards and convert.json")
    convert.add_argument(
        "--media-root", metavar="DIR", help="folder the records' video/image paths are relative to (default: SRC's)"
    )
    convert.add_argument("--workers", type=int, default=0, help="processes decoding media (default: CPUs, at most 8)")
    convert.add_argument("--source", help="the samples' `source` (default: the format's name)")
    convert.add_argument("--split", default="train", help="Hugging Face datasets: the split to read (default: train)")
    convert.add_argument(
        "--prompt",
        help="question for records without one (caption sets); default: left empty, so the reader uses the "
        "source's prompt (upstream fVLM's for openvid and vript)",
    )
    convert.add_argument("--size", type=int, default=224, help="frame and image side in pixels (default: 224)")
    convert.add_argument("--fps", type=float, default=1.0, help="video frames kept per second (default: 1)")
    convert.add_argument("--max-frames", type=int, default=64, help="most frames per video (default: 64)")
    convert.add_argument("--keep-mp4", action="store_true", help="store each video's mp4 instead of JPEG frames")
    convert.add_argument(
        "--max-tokens",
        type=int,
        default=0,
        help="skip records whose chat-template dialogue is longer (as over_length; default 0: no limit)",
    )
    convert.add_argument(
        "--tokenizer", default="tiny", help="the LLM folder whose tokenizer --max-tokens counts with (default: tiny)"
    )
    convert.add_argument("--shard-size", type=int, default=1000, help="records per shard (default: 1000)")
    convert.add_argument("--json", action="store_true", help="print the report as JSON")
    convert.set_defaults(func=cmd_convert)

    inspect = data_sub.add_parser("inspect", help="counts, mix, lengths and skipped samples of a data path")
    inspect.add_argument("path", metavar="PATH", help="folder, glob, comma list, mix .yaml, or a `data synth` folder")
    overrides.add_arguments(
        inspect,
        help_text="a config file or shipped config name (default: tiny), then the "
        "fields that shape the reading (train.stage=2, "
        "data.max_text_tokens=96, 'data.mix={video: 0.6, image: 0.4}')",
    )
    inspect.add_argument("--no-decode", action="store_true", help="headers and JSON only: fast, but misses bad frames")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(func=cmd_inspect)
    data.set_defaults(func=lambda args: data.print_help() or 2)


def cmd_synth(args) -> int:
    from fvlm.data.synth import finish_output, generate_synthetic, prepare_output

    for name in ("videos", "images", "texts", "val", "probe", "bench"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must be >= 0")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
    if not 1 <= args.frames <= SYNTH_MAX_FRAMES:
        raise UsageError(f"--frames must be in [1, {SYNTH_MAX_FRAMES}], got {args.frames}")
    if not SYNTH_SIZES[0] <= args.size <= SYNTH_SIZES[1]:
        raise UsageError(f"--size must be in [{SYNTH_SIZES[0]}, {SYNTH_SIZES[1]}] pixels, got {args.size}")
    if not 0.0 <= args.mc_fraction <= 1.0:  # also false for NaN
        raise UsageError("--mc-fraction must be between 0 and 1")
    if not 1 <= args.min_objects <= args.max_objects:
        raise UsageError("--min-objects must be >= 1 and <= --max-objects")
    if not 0 < args.object_scale[0] <= args.object_scale[1] <= 0.5:
        raise UsageError("--object-scale MIN MAX must satisfy 0 < MIN <= MAX <= 0.5")
    not_empty(args, "OUT")
    out = Path(args.out)
    if prepare_output(out):
        print(f"{out}: an earlier `fvlm data synth` did not finish this set; starting it over")
    manifest = generate_synthetic(
        out,
        videos=args.videos,
        images=args.images,
        texts=args.texts,
        frames=args.frames,
        size=args.size,
        seed=args.seed,
        val=args.val,
        probe=args.probe,
        bench=args.bench,
        mc_fraction=args.mc_fraction,
        background=args.background,
        object_scale=tuple(args.object_scale),
        max_objects=args.max_objects,
        min_objects=args.min_objects,
        video_task=args.video_task,
        image_task=args.image_task,
    )
    finish_output(out)
    for split, counts in manifest["splits"].items():
        print(f"{split:<6} " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    print(
        f"wrote {manifest['samples']} samples to {out} in {manifest['seconds']:.1f}s "
        f"({manifest['samples_per_sec']:.0f} samples/s)"
    )
    return 0


def cmd_convert(args) -> int:
    from fvlm.data.convert import Options, convert, format_report, worker_count

    not_empty(args, "SRC", "OUT")
    for name, low in (("size", 8), ("max_frames", 1), ("shard_size", 1), ("max_tokens", 0), ("workers", 0)):
        if getattr(args, name) < low:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {low}")
    if not 0 < args.fps < float("inf"):
        raise UsageError("--fps must be a positive number")
    opts = Options(
        format=args.format,
        src=str(Path(args.src).resolve()),
        source=args.source or DEFAULT_SOURCE[args.format],
        media_root=str(Path(args.media_root).resolve()) if args.media_root else None,
        split=args.split,
        size=args.size,
        fps=args.fps,
        max_frames=args.max_frames,
        keep_mp4=args.keep_mp4,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        tokenizer=args.tokenizer,
        shard_size=args.shard_size,
    )
    report = convert(opts, Path(args.out), workers=worker_count(args.workers))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_inspect(args) -> int:
    from fvlm.config import load_config
    from fvlm.data.inspect import format_report, inspect_path

    config, items = overrides.from_args(args, "data inspect")
    cfg = load_config(config, items)
    report = inspect_path(args.path, cfg, decode=not args.no_decode)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
