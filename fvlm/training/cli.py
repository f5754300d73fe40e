"""`fvlm train [CONFIG] [key=value ...] [--nproc N]`."""

from __future__ import annotations

import os
import subprocess
import sys

from fvlm import overrides
from fvlm.errors import UsageError, check_folder_path


def register(sub) -> None:
    train = sub.add_parser(
        "train",
        help="train one run into <out_dir>/<run_id>/ (re-running resumes it)",
        description="Train one run. Re-running the same command on an existing run folder resumes from its "
        "latest complete checkpoint. Multi-GPU: torchrun --nproc_per_node N -m fvlm train ..., "
        "or --nproc N. Exit code 0 when the run completes, 1 when it diverged, was interrupted "
        "or failed (run_summary.json says which), 2 for a bad config.",
    )
    overrides.add_arguments(train)
    train.add_argument("--nproc", type=int, default=1, help="processes on this machine (re-launches under torchrun)")
    train.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from fvlm.config import load_config

    config, items = overrides.from_args(args, "train")
    cfg = load_config(config, items)
    check_folder_path(cfg.out_dir, "out_dir")
    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1:
        if "WORLD_SIZE" in os.environ:
            raise UsageError("--nproc inside torchrun: use one or the other")
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            "-m",
            "fvlm",
            "train",
            *args.items,
        ]
        return subprocess.call(command)

    from fvlm.training.trainer import train

    summary = train(cfg)
    return 0 if summary["status"] == "completed" else 1
