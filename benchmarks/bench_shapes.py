"""How many batch shapes a training stream has, with and without `train.static_shapes`, and what the
shape ladder's padding costs.

A CUDA graph replays one shape, so a compiled step captured per shape (`train.cuda_graphs`) is only
as good as the stream is repetitive. This takes the same training stream twice (same seed, same
samples in the same order): batches padded to their own longest sample, and batches padded to the
ladder (fvlm/model/batch_index.py `bucket`), and counts the distinct shapes of the sizes that vary
(frames per sample, text length, frames encoded, loss targets), and the slots each kind of padding
adds (counted against the plain batches' own).

    .venv/bin/python benchmarks/bench_shapes.py [--batches 300] [--batch-size 8] [--stage 2]

Data: the synthetic mix written to a temp folder (videos of 8 frames, stills of one, text-only
samples; question and answer lengths as the generator draws them), 32 px (pixels do not matter
here). Counts, not times: any machine gives the same numbers.
"""

from __future__ import annotations

import argparse
import tempfile

from fvlm.config import load_config
from fvlm.data.loader import build_loader
from fvlm.data.synth import generate_synthetic
from fvlm.model.tokenizer import byte_tokenizer

SIZES = {
    "frames per sample": lambda b: b["frames"].shape[1],
    "text length": lambda b: b["input_ids"].shape[1],
    "frames encoded": lambda b: b["frame_rows"].shape[0],
    "loss targets": lambda b: b["target_rows"].shape[0],
}


def stream(cfg, n: int) -> list[dict]:
    out = []
    for batch in build_loader(cfg, "train", byte_tokenizer()):
        out.append({key: batch[key] for key in ("frames", "input_ids", "frame_rows", "target_rows", "n_targets")})
        if len(out) == n:
            break
    return out


def slots(batches: list[dict]) -> dict[str, int]:
    """Frame slots DINO encodes, text positions the LLM runs, target rows the loss computes."""
    return {
        "frames encoded": sum(b["frame_rows"].shape[0] for b in batches),
        "text positions": sum(b["input_ids"].numel() for b in batches),
        "target rows": sum(b["target_rows"].shape[0] for b in batches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--stage", type=int, default=2, help="2: answer tokens are the targets; 1: every token")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate_synthetic(tmp, videos=400, images=100, texts=100, frames=8, size=32, seed=0, val=0, probe=0, bench=0)
        base = {
            "data.train": f"{tmp}/train",
            "data.max_frames": 8,
            "data.max_text_tokens": 200,
            "model.image_size": 32,
            "train.batch_size": args.batch_size,
            "train.stage": args.stage,
        }
        plain = stream(load_config(None, base), args.batches)
        static = stream(load_config(None, {**base, "train.static_shapes": True}), args.batches)
    assert [b["n_targets"] for b in plain] == [b["n_targets"] for b in static]  # the same samples
    print(f"{args.batches} training batches of {args.batch_size} (synthetic mix, stage {args.stage}), plain / static")
    shape = lambda b: tuple(f(b) for f in SIZES.values())  # noqa: E731
    print(f"  distinct shapes: {len({shape(b) for b in plain})} / {len({shape(b) for b in static})}")
    for name, size in SIZES.items():
        print(f"  distinct {name}: {len({size(b) for b in plain})} / {len({size(b) for b in static})}")
    before, after = slots(plain), slots(static)
    print(
        "  padding the ladder adds: "
        + ", ".join(f"{name} +{after[name] / before[name] - 1:.1%}" for name in before)
        + " (against the plain batches, which are padded to their own longest sample)"
    )


if __name__ == "__main__":
    main()
