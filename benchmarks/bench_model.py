"""Training-step time of coarse_fine vs coarse_only vs the multi-token baseline, same batch, same process.

    .venv/bin/python benchmarks/bench_model.py [--shape tiny|135m|both] [--repeats N] [--device cpu|cuda]

Goal: coarse_fine <= 1.35x coarse_only (the second pass reuses DINO's K/V, so it should cost little).
On CUDA it also runs in bf16 autocast and prints MFU from the exact FLOP counter against the device's
peak bf16 FLOPs (--peak-tflops).
"""

from __future__ import annotations

import argparse
import time

import torch

from fvlm.config import load_config
from fvlm.model.build import build_model
from fvlm.model.flops import estimate_flops

SHAPES = {
    "tiny": dict(overrides={}, batch=8, frames=8, text=96),
    "135m": dict(
        overrides={"llm": "smollm2-135m", "dino": "dinov2-small", "image_size": 224}, batch=2, frames=4, text=64
    ),
}
VARIANTS = {
    "coarse_fine": {},
    "coarse_only": {"coarse_only": True},
    "multi_token_16": {"arch": "multi_token", "tokens_per_frame": 16},
}


def make_batch(b, t, length, size, device):
    return {
        "frames": torch.randn(b, t, 3, size, size, device=device),
        "frame_mask": torch.ones(b, t, dtype=torch.bool, device=device),
        "input_ids": torch.randint(4, 250, (b, length), device=device),
        "attention_mask": torch.ones(b, length, dtype=torch.long, device=device),
        "loss_mask": torch.ones(b, length, dtype=torch.bool, device=device),
    }


def make_step(model, batch, bf16):
    def step():
        with torch.autocast(batch["frames"].device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch, compute_coarse=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def interleaved_times(steps: dict, repeats: int, cuda: bool) -> dict:
    """Median seconds per step of each variant, timed round-robin (one step of each in turn), so
    that a load change on a shared machine hits every variant alike."""
    samples = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(repeats):
        for name, step in steps.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    return {name: sorted(v)[len(v) // 2] for name, v in samples.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=("tiny", "135m", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak bf16 dense TFLOPs (H100 SXM: 989)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    shapes = ("tiny", "135m") if args.shape == "both" else (args.shape,)
    precisions = [False, True] if args.device == "cuda" else [False]
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        for bf16 in precisions:
            steps, flops = {}, {}
            for name, variant in VARIANTS.items():
                cfg = load_config(None, {"model": {**shape["overrides"], **variant}}).model
                model = build_model(cfg).to(args.device).train()
                batch = make_batch(shape["batch"], shape["frames"], shape["text"], cfg.image_size, args.device)
                steps[name] = make_step(model, batch, bf16)
                flops[name] = estimate_flops(cfg, shape["frames"], shape["text"]).per_sample * shape["batch"]
            times = interleaved_times(steps, args.repeats, args.device == "cuda")
            for name, seconds in times.items():
                mfu = f"  MFU {flops[name] / seconds / (args.peak_tflops * 1e12):.1%}" if args.device == "cuda" else ""
                print(
                    f"[{shape_name} {args.device} {'bf16' if bf16 else 'fp32'}] {name:<15} "
                    f"{seconds * 1000:8.1f} ms/step  {flops[name] / seconds / 1e9:8.1f} GFLOP/s{mfu}"
                )
            base = times["coarse_only"]
            print(
                f"[{shape_name}] ratios to coarse_only: "
                + ", ".join(f"{k} {v / base:.2f}x" for k, v in times.items())
                + "; FLOP ratios: "
                + ", ".join(f"{k} {flops[k] / flops['coarse_only']:.2f}x" for k in times)
            )


if __name__ == "__main__":
    main()
