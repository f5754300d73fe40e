"""Training-step time of coarse_fine vs coarse_only vs the multi-token baseline, same batch, same process.

    .venv/bin/python benchmarks/bench_model.py [--shape tiny|reference|135m|both|all] [--repeats N] [--device cpu|cuda]

Goal: coarse_fine <= 1.35x coarse_only (the second pass reuses DINO's K/V, so it should cost little).
On CUDA it also runs in bf16 autocast and prints MFU from the exact FLOP counter against the device's
peak bf16 FLOPs (--peak-tflops).

`--shape reference` is the config on which the tiny step is compared with the reference
implementation (outside this project): batch 8, 8 frames of 56 px, 48 text tokens, a DINO 4 layers x
96 wide, an LLM 4 layers x 128 wide, one thread, and a whole optimizer step (fused AdamW, as fvlm
trains) after the backward. The widths and depths are the comparison's; the rest is assumed here:
DINO patch 14 (as DINOv2: 4 x 4 patches), 4 heads, MLP ratio 4; LLM 4 heads, 2 KV heads, MLP 352
wide, the byte-level vocabulary. Random weights, saved once into a temporary folder and loaded as a
local Hugging Face folder, the path real backbones take.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from fvlm.config import OptimConfig, load_config
from fvlm.model.build import build_model
from fvlm.model.flops import estimate_flops
from fvlm.training.optim import build_optimizer

SHAPES = {
    "tiny": dict(overrides={}, batch=8, frames=8, text=96),
    "reference": dict(overrides={"image_size": 56}, batch=8, frames=8, text=48, optimizer=True),
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


def reference_backbones(folder: Path) -> dict[str, str]:
    """The reference comparison's backbone shapes, random weights, as local Hugging Face folders."""
    from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dino = Dinov2Model(
        Dinov2Config(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, patch_size=14, image_size=56)
    )
    llm = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=352, vocab_size=260, tie_word_embeddings=True, pad_token_id=3, eos_token_id=2,
        )
    )  # fmt: skip
    dino.save_pretrained(str(folder / "dino"))
    llm.save_pretrained(str(folder / "llm"))
    return {"dino": str(folder / "dino"), "llm": str(folder / "llm")}


def make_step(model, batch, bf16, optimizer=None):
    def step():
        with torch.autocast(batch["frames"].device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch, compute_coarse=False).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
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
    parser.add_argument("--shape", choices=("tiny", "reference", "135m", "both", "all"), default="both")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak bf16 dense TFLOPs (H100 SXM: 989)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    shapes = {"both": ("tiny", "135m"), "all": tuple(SHAPES)}.get(args.shape, (args.shape,))
    precisions = [False, True] if args.device == "cuda" else [False]
    scratch = tempfile.TemporaryDirectory()
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        overrides = dict(shape["overrides"])
        if shape_name == "reference":
            overrides |= reference_backbones(Path(scratch.name))
        for bf16 in precisions:
            steps, flops = {}, {}
            for name, variant in VARIANTS.items():
                cfg = load_config(None, {"model": {**overrides, **variant}}).model
                model = build_model(cfg).to(args.device).train()
                batch = make_batch(shape["batch"], shape["frames"], shape["text"], cfg.image_size, args.device)
                optimizer = build_optimizer(model, OptimConfig()) if shape.get("optimizer") else None
                steps[name] = make_step(model, batch, bf16, optimizer)
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
