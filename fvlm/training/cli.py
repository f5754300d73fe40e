"""`fvlm train [CONFIG] [key=value ...] [--nproc N]`."""

from __future__ import annotations

import os
import subprocess
import sys

from fvlm.errors import UsageError


def register(sub) -> None:
    train = sub.add_parser(
        "train",
        help="train one run into <out_dir>/<run_id>/ (re-running resumes it)",
        description="Train one run. Re-running the same command on an existing run folder resumes from its "
                    "latest complete checkpoint. Multi-GPU: torchrun --nproc_per_node N -m fvlm train ..., "
                    "or --nproc N. Exit code 0 when the run completes, 1 when it diverged, was interrupted "
                    "or failed (run_summary.json says which), 2 for a bad config.",
    )
    train.add_argument("items", nargs="*", metavar="CONFIG | key=value",
                       help="a config file or shipped config name (default: tiny), then field overrides")
    train.add_argument("--nproc", type=int, default=1, help="processes on this machine (re-launches under torchrun)")
    train.set_defaults(func=cmd_train)


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """The optional leading config name/path, then the key=value overrides."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_train(args) -> int:
    from fvlm.config import load_config

    config, overrides = split_items(args.items)
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"'{item}' is not a key=value override (the config name goes first)")
    cfg = load_config(config, overrides)
    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1:
        if "WORLD_SIZE" in os.environ:
            raise UsageError("--nproc inside torchrun: use one or the other")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   "-m", "fvlm", "train", *args.items]
        return subprocess.call(command)

    from fvlm.training.trainer import train

    summary = train(cfg)
    return 0 if summary["status"] == "completed" else 1
