"""Loss parity of train.precision=bf16 (bf16 parameters, fp32 master weights) with fp32 training.

    .venv/bin/python benchmarks/bf16_parity.py [--steps 300] [--precisions fp32,bf16,bf16-autocast]
        [--out DIR] [--json PATH] [key=value ...]

Trains the tiny preset (the tiny backbones shipped under fvlm/assets, synthetic data generated on first
use) with `fvlm train`'s own trainer, once per precision, from the same seed, on the same batches in
the same order, logging every step; the first precision is the reference. Printed per precision
against it: the mean and largest absolute difference of the smoothed training loss (an exponential
moving average, `--smooth`, over the logged steps), the ratio of the final smoothed losses, and the
final validation losses. Extra `key=value` arguments override the config of every run (the defaults
below make a step a few tens of milliseconds on one CPU core). CPU runs one thread, as the tiny
preset does; a CUDA device runs whatever `train.precision` means there.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# A small tiny-preset run: 32 px frames, 4 frames, batch 4; evaluation only at the end.
DEFAULTS = [
    "data.synth_videos=256",
    "data.synth_images=64",
    "data.synth_texts=64",
    "data.synth_val=32",
    "data.synth_frames=4",
    "data.synth_size=32",
    "data.max_frames=4",
    "data.max_text_tokens=64",
    "model.image_size=32",
    "train.batch_size=4",
    "train.eval_batch_size=16",
    "train.eval_samples=32",
    "train.probe_videos=0",
    "train.log_every=1",
    "train.keep_milestones=0",
]


def smooth(values: np.ndarray, alpha: float) -> np.ndarray:
    out = np.empty_like(values)
    level = values[0]
    for i, v in enumerate(values):
        level = alpha * v + (1 - alpha) * level
        out[i] = level
    return out


def cpu_name() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def run(out: Path, precision: str, steps: int, overrides: list[str]) -> dict:
    from fvlm.config import load_config
    from fvlm.training.trainer import train

    cfg = load_config(
        "tiny",
        [
            f"out_dir={out}",
            f"run_id={precision}",
            *DEFAULTS,
            f"train.max_steps={steps}",
            f"train.eval_every={steps}",
            f"train.save_every={steps}",
            f"train.precision={precision}",
            *overrides,
        ],
    )
    began = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - began
    with open(cfg.run_dir / "steps.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        "precision": summary["throughput"]["precision"],
        "loss": np.array([float(r["train_loss"]) for r in rows]),
        "val_loss": summary["best_val_loss"],
        "seconds": seconds,
    }


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--precisions", default="fp32,bf16,bf16-autocast", help="the first is the reference")
    parser.add_argument("--smooth", type=float, default=0.1, help="EMA weight of the newest step's loss")
    parser.add_argument("--out", help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("overrides", nargs="*", help="key=value for every run's config")
    args = parser.parse_args(argv)
    precisions = args.precisions.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        runs = {p: run(out, p, args.steps, args.overrides) for p in precisions}
    reference = runs[precisions[0]]
    ref_smooth = smooth(reference["loss"], args.smooth)
    report = {
        "cpu": cpu_name(),
        "steps": args.steps,
        "smooth": args.smooth,
        "command": "benchmarks/bf16_parity.py " + " ".join(argv),
        "runs": {},
    }
    print(
        f"[bf16_parity] {args.steps} steps of the tiny preset per precision; {report['cpu']}; reference {precisions[0]}"
    )
    print(
        f"{'precision':<14} {'final loss':>10} {'smoothed':>9} {'mean |d|':>9} {'max |d|':>9} "
        f"{'final ratio':>11} {'val loss':>9} {'seconds':>8}"
    )
    for name, r in runs.items():
        s = smooth(r["loss"], args.smooth)
        diff = np.abs(s - ref_smooth)
        row = {
            "final_loss": float(r["loss"][-1]),
            "final_smoothed": float(s[-1]),
            "mean_abs_diff_smoothed": float(diff.mean()),
            "max_abs_diff_smoothed": float(diff.max()),
            "final_ratio": float(s[-1] / ref_smooth[-1]),
            "val_loss": r["val_loss"],
            "seconds": r["seconds"],
            "first_loss": float(r["loss"][0]),
        }
        report["runs"][name] = row
        print(
            f"{name:<14} {row['final_loss']:>10.4f} {row['final_smoothed']:>9.4f} {row['mean_abs_diff_smoothed']:>9.4f} "
            f"{row['max_abs_diff_smoothed']:>9.4f} {row['final_ratio']:>11.4f} {row['val_loss']:>9.4f} "
            f"{row['seconds']:>8.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
