"""Multiple-choice scoring throughput: questions/s for 4-option questions on 8-frame videos, tiny model.

Three ways side by side in one process, on the same decoded questions (decoding is not timed):
  batched      DINO + visual block + prompt once per question, all options of a batch of questions as
               one continuation over the cached prefix (what `fvlm eval` does);
  per question the same, one question at a time (the gain of option batching alone);
  one by one   every option scored on its own: DINO, visual block and the whole sequence again
               (what the reference implementation did).
Each is timed in wall seconds and in CPU seconds (meaningful when other jobs share the machine).

    .venv/bin/python benchmarks/bench_eval.py [--questions 32] [--batch 8] [--modes coarse_fine] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from functools import partial

import torch

from fvlm.config import load_config
from fvlm.data.synth import generate_synthetic
from fvlm.eval.bench import VisualSettings, read_shard_bench
from fvlm.eval.scoring import encode_question, frames_batch, score_batch, score_option_alone
from fvlm.model.build import build_model, build_tokenizer


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def batched(model, tok, encoded, frames, modes, batch):
    for start in range(0, len(encoded), batch):
        f, m = frames_batch(frames[start : start + batch])
        score_batch(model, encoded[start : start + batch], f, m, modes, tok.pad_token_id)


def one_by_one(model, encoded, frames, modes):
    for enc, f in zip(encoded, frames):
        pixels, mask = frames_batch([f])
        for mode in modes:
            for option in range(len(enc.option_ids)):
                score_option_alone(model, enc, option, pixels, mask, mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--modes", default="coarse_fine")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    modes = tuple(args.modes.split(","))
    cfg = load_config()
    model, tok = build_model(cfg.model).eval(), build_tokenizer(cfg.model)
    with tempfile.TemporaryDirectory() as tmp:
        # Half of the synthetic bench is images; ask for twice as many and keep the 8-frame videos.
        generate_synthetic(
            tmp, videos=0, images=0, texts=0, frames=8, size=64, seed=0, val=0, probe=0, bench=2 * args.questions
        )
        questions = [
            q for q in read_shard_bench(f"{tmp}/bench", VisualSettings(64, 8, 1.0, 1)) if q.category == "video"
        ][: args.questions]
        frames = [q.frames() for q in questions]
    assert all(f.shape[0] == 8 for f in frames) and all(len(q.options) == 4 for q in questions)
    encoded = [encode_question(tok, q) for q in questions]
    ways = {
        "batched": partial(batched, model, tok, encoded, frames, modes, args.batch),
        "per question": partial(batched, model, tok, encoded, frames, modes, 1),
        "one by one": partial(one_by_one, model, encoded, frames, modes),
    }
    results = {name: [] for name in ways}
    with torch.no_grad():
        for fn in ways.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in ways.items():
                results[name].append(timed(fn))
    n = len(questions)
    print(
        f"{n} questions x 4 options x 8 frames (64 px), modes {','.join(modes)}, batch {args.batch}, "
        f"{args.threads} threads; {platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    best = {name: (min(w for w, _ in r), min(c for _, c in r)) for name, r in results.items()}
    base = best["one by one"]
    print(f"| way | questions/s (wall, best of {args.repeats}) | questions per CPU-second | speed-up (wall / CPU) |")
    print("|---|---|---|---|")
    for name, (wall, cpu) in best.items():
        print(f"| {name} | {n / wall:.1f} | {n / cpu:.1f} | {base[0] / wall:.1f}x / {base[1] / cpu:.1f}x |")


if __name__ == "__main__":
    main()
