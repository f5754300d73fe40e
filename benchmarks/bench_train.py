"""Training throughput, and the share of run time that logging, evaluation and checkpoints take.

    .venv/bin/python benchmarks/bench_train.py [--config tiny] [key=value ...]

Runs one training run of the config (default: the tiny preset at its own eval/save/log intervals) in
a temporary folder, with the synthetic data generated beforehand so it is not timed, and reads the
trainer's own time breakdown from run_summary.json (`time_sec`: train steps incl. data loading,
eval, checkpoint, log). Goal: overhead < 10% of run time at the default intervals, so that they need
no tuning per run.
Also prints samples per CPU-second of this process and its loader workers: unlike wall-clock
samples/s, that figure does not move when other processes share the cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import tempfile
import time


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    from fvlm.config import load_config
    from fvlm.data.loader import split_path
    from fvlm.training.trainer import train

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.config, [f"out_dir={out}", "run_id=bench", *args.overrides])
        for split in ("train", "val", "probe"):
            split_path(cfg, split)
        cpu_before, wall_before = cpu_seconds(), time.perf_counter()
        summary = train(cfg)
        cpu, wall = cpu_seconds() - cpu_before, time.perf_counter() - wall_before
        with open(cfg.run_dir / "steps.csv", newline="") as f:
            first_loss = float(next(csv.DictReader(f))["train_loss"])
    t = summary["time_sec"]
    total = sum(t.values())
    overhead = t["eval"] + t["checkpoint"] + t["log"]
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "steps": summary["total_steps"],
        "samples": summary["total_samples"],
        "wall_sec": round(wall, 1),
        "time_sec": t,
        "overhead_share": round(overhead / total, 4),
        "eval_share": round(t["eval"] / total, 4),
        "checkpoint_share": round(t["checkpoint"] / total, 4),
        "log_share": round(t["log"] / total, 4),
        "train_samples_per_sec": round(summary["total_samples"] / t["train"], 2),
        "samples_per_cpu_sec": round(summary["total_samples"] / cpu, 2),
        "train_loss_first_last": [first_loss, summary["final_train_loss"]],
        "best_val_loss": summary["best_val_loss"],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
