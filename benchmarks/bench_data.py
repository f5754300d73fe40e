"""Data pipeline throughput: decode + resize + tokenise + collate, in frames/s.

Writes 224 px JPEG video shards with the synthetic generator, then times the training loader with
0 and N workers side by side in one process (goal: >= 1,000 frames/s with 2 workers, so that
loading never holds a step back), and the per-core cost in CPU seconds, which stays meaningful when
other jobs share the machine.

    .venv/bin/python benchmarks/bench_data.py [--workers 2] [--videos 160] [--batches 60]

`--collate-only` measures the collate step alone instead, at the paper's micro-batch (8 samples of
16 frames at 224 px): the bytes a step sends to the device with uint8 frames (what the training
loader sends; the model normalises them) against float32 ones (normalised on the host, as before),
and the time to collate a batch each way, interleaved in one run on one thread (as a worker runs).

    .venv/bin/python benchmarks/bench_data.py --collate-only [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from fvlm.config import load_config
from fvlm.data.loader import build_loader
from fvlm.data.synth import generate_synthetic
from fvlm.model.tokenizer import byte_tokenizer


def frames_per_second(cfg, batches: int, warmup: int = 5) -> float:
    loader = build_loader(cfg, "train", byte_tokenizer())
    frames, began = 0, None
    for step, batch in enumerate(loader):
        if step == warmup:
            frames, began = 0, time.perf_counter()
        frames += int(batch["frame_mask"].sum())
        if step == warmup + batches:
            break
    return frames / (time.perf_counter() - began)


def frames_per_cpu_second(cfg, samples: int = 80) -> float:
    """The same work in this process on one thread, timed in CPU seconds: what one worker does per
    core, whatever else the machine is running."""
    import torch

    from fvlm.data.loader import collate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loader = build_loader(cfg, "train", byte_tokenizer())
    rows = [int(r) for r in loader.schedule.rows_at(0, samples)]
    began, frames = time.process_time(), 0
    for i in range(0, samples, cfg.train.batch_size):
        batch = collate([loader.reader.load(r) for r in rows[i : i + cfg.train.batch_size]], loader.pad_id)
        frames += int(batch["frame_mask"].sum())
    torch.set_num_threads(threads)
    return frames / (time.process_time() - began)


def collate_cost(batch_size: int, frames: int, size: int, repeats: int) -> None:
    """Bytes per micro-batch and collate time per batch, uint8 frames against host-normalised float32."""
    import statistics

    import numpy as np
    import torch

    from fvlm.data.loader import collate

    torch.set_num_threads(1)
    g = np.random.default_rng(0)
    samples = [
        {
            "frames": g.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
            "ids": [int(v) for v in g.integers(4, 250, 128)],
            "mask": [i >= 32 for i in range(128)],
            "key": f"s{i}",
            "source": "synthetic",
            "kind": "video",
        }
        for i in range(batch_size)
    ]
    times: dict[bool, list[float]] = {False: [], True: []}
    nbytes = {}
    for _ in range(repeats):
        for raw in (False, True):
            began = time.perf_counter()
            batch = collate(samples, 0, raw_frames=raw)
            times[raw].append(time.perf_counter() - began)
            nbytes[raw] = batch["frames"].nbytes
    print(f"micro-batch {batch_size} x {frames} frames x {size} px, collate on one thread, {repeats} batches each way")
    for raw, name in ((False, "float32, normalised on the host"), (True, "uint8, normalised by the model")):
        ms = sorted(1000 * t for t in times[raw])
        print(
            f"  frames {name}: {nbytes[raw] / 2**20:.1f} MiB per micro-batch; collate median "
            f"{statistics.median(ms):.1f} ms (fastest {ms[0]:.1f}, slowest {ms[-1]:.1f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--videos", type=int, default=160)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--collate-only", action="store_true", help="bytes and collate time, uint8 vs float32")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if args.collate_only:
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
        print(f"load average before timing: {os.getloadavg()[0]:.1f}")
        collate_cost(8, 16, 224, args.repeats)
        return
    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate_synthetic(
            tmp,
            videos=args.videos,
            images=0,
            texts=0,
            frames=args.frames,
            size=args.size,
            seed=0,
            val=0,
            probe=0,
            bench=0,
        )
        print(
            f"synthetic {args.size}px: {manifest['samples_per_sec']:.0f} samples/s "
            f"({manifest['samples_per_sec'] * args.frames:.0f} frames/s written)"
        )
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"
        )
        print(f"load average before timing: {os.getloadavg()[0]:.1f}")
        for workers in (0, args.workers):
            cfg = load_config(
                None,
                {
                    "data.train": f"{tmp}/train",
                    "data.num_workers": workers,
                    "data.max_frames": args.frames,
                    "model.image_size": args.size,
                    "train.batch_size": args.batch_size,
                    "train.stage": 2,
                },
            )
            fps = frames_per_second(cfg, args.batches)
            print(
                f"workers={workers}: {fps:,.0f} frames/s at {args.size}px "
                f"(batch {args.batch_size} x {args.frames} frames, decode+resize+tokenise+collate, uint8 frames)"
            )
        per_core = frames_per_cpu_second(cfg)
        print(
            f"one worker: {per_core:,.0f} frames per CPU-second (x{args.workers} workers on idle cores: "
            f"{per_core * args.workers:,.0f} frames/s)"
        )


if __name__ == "__main__":
    main()
