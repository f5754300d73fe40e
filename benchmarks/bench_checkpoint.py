"""Checkpoint cost: bytes and seconds of a resume checkpoint and of a weights-only milestone.

    .venv/bin/python benchmarks/bench_checkpoint.py [--repeats 3] [key=value ...]

Builds the model of the tiny config with the overrides (default: the SmolLM2-135M shape, random
weights, beside the tiny DINO: bytes and seconds do not depend on the values), gives AdamW its
state with one step, and writes each kind of checkpoint with the trainer's own `save_checkpoint`,
side by side in one process: a resume checkpoint (weights, optimizer, trainer and RNG state) and a
milestone (weights only). Seconds are the trainer's (files written to the page cache) and, beside
them, with `os.sync()` included (on the disk).

Then a short real run: 20 steps with the default 5 milestones and evaluation every 100 steps,
so saves at steps 4, 8, 12, 16 and 20. Before, each was a resume checkpoint and every one was kept;
now steps 4-16 are milestones and step 20 (the end, evaluated) a resume checkpoint. Both sequences
are written and pruned as the trainer does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    import torch

    from fvlm.config import load_config
    from fvlm.model.build import build_model, build_tokenizer
    from fvlm.training import checkpoint as ckpt
    from fvlm.training.dist import Dist
    from fvlm.training.optim import build_optimizer

    cfg = load_config("tiny", ["model.llm=smollm2-135m", "model.image_size=32", *args.overrides])
    model = build_model(cfg.model)
    tokenizer = build_tokenizer(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()  # AdamW allocates its two moments per trainable parameter here
    dist = Dist()
    state = {"optimizer": optimizer, "trainer_state": {"step": 0}, "rank_state": {"rng": ckpt.rng_state()}}

    def save(run_dir: Path, step: int, full: bool) -> tuple[float, float]:
        began = time.perf_counter()
        ckpt.save_checkpoint(
            run_dir, step, dist, model=model, tokenizer=tokenizer, meta={"step": step}, **(state if full else {})
        )
        written = time.perf_counter() - began
        os.sync()
        return written, time.perf_counter() - began

    result = {
        "llm": cfg.model.llm,
        "dino": cfg.model.dino,
        "freeze_llm": cfg.model.freeze_llm,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "kinds": {},
    }
    with tempfile.TemporaryDirectory(dir=os.environ.get("FVLM_BENCH_DIR")) as tmp:
        for kind, full in (("resume", True), ("milestone", False)):
            times = []
            for repeat in range(args.repeats):
                run_dir = Path(tmp) / f"{kind}-{repeat}"
                times.append(save(run_dir, 1, full))
                size = folder_bytes(run_dir / ckpt.CHECKPOINTS / ckpt.step_name(1))
                shutil.rmtree(run_dir)
            result["kinds"][kind] = {
                "bytes": size,
                "seconds": [round(t[0], 2) for t in times],
                "seconds_with_sync": [round(t[1], 2) for t in times],
            }

        milestones = {4, 8, 12, 16, 20}
        for policy, kinds in (
            ("before", {s: True for s in milestones}),
            ("now", {**{s: False for s in milestones}, 20: True}),
        ):
            run_dir = Path(tmp) / policy
            began, written = time.perf_counter(), 0
            for step in sorted(milestones):
                save(run_dir, step, kinds[step])
                written += folder_bytes(run_dir / ckpt.CHECKPOINTS / ckpt.step_name(step))
                if policy == "now":
                    ckpt.prune_checkpoints(run_dir, cfg.train.keep_last, milestones)
            result[f"run_of_issue_15_{policy}"] = {
                "bytes_written": written,
                "bytes_kept": folder_bytes(run_dir / ckpt.CHECKPOINTS),
                "seconds_with_sync": round(time.perf_counter() - began, 1),
            }
            shutil.rmtree(run_dir)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
