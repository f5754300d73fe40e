"""Gradient checkpointing: the coarse pass over the visual tokens only vs over [visual tokens + text].

    .venv/bin/python benchmarks/bench_checkpointing.py [--shape tiny|135m|both] [--repeats N] [--device cpu|cuda]

With lambda_coarse = 0 only the LLM states after the visual tokens feed the fine pass. Training
used to run the coarse pass over the whole sequence with gradient whenever checkpointing was on
(HF checkpointing drops the KV cache the text continuation would read); now it takes gradient
through the visual tokens only and, on logged steps, measures the coarse loss in a pass without
gradient. This prints, for one training step of the same batch in one process: the time and the
FLOPs torch's counter sees for each way, their ratios, and how far apart their losses and gradients
are (they must agree).
"""

from __future__ import annotations

import argparse

import torch
from bench_model import SHAPES, interleaved_times, make_batch  # this folder is on sys.path when run as a script
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fvlm.config import load_config
from fvlm.model.build import build_model
from fvlm.model.flops import PLAN_FRAMES, PLAN_TEXT_TOKENS, estimate_flops


def full_sequence_loss(model, batch, compute_coarse):
    """The former checkpointing branch: one coarse LLM pass over [visual tokens + text] with gradient."""
    frame_mask = batch["frame_mask"]
    prepared = model._prepare(batch["frames"], frame_mask)
    coarse, _ = model._coarse(prepared, frame_mask)
    embeds = torch.cat([coarse, model.embed_text(batch["input_ids"])], dim=1)
    mask = torch.cat([frame_mask.long(), batch["attention_mask"].long()], dim=1)
    hidden = model.run_llm(embeds, mask)
    if compute_coarse:
        model.text_loss(hidden, mask, batch["input_ids"], batch["loss_mask"])
    queries = model._next_queries(hidden[:, : frame_mask.shape[1]], frame_mask)
    fine_tokens, _ = model._read(*prepared, queries)
    loss, _ = model.loss_over(model._scatter(fine_tokens, frame_mask), frame_mask, batch)
    return loss


def make_step(model, batch, way, compute_coarse):
    def step():
        if way == "full_sequence":
            loss = full_sequence_loss(model, batch, compute_coarse)
        else:
            loss = model(batch, compute_coarse=compute_coarse).loss
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    return step


def counted_flops(step) -> float:
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        step()
    return float(counter.get_total_flops())


def paper_shape_ratios() -> None:
    """FLOPs of a plain step at the plan's sample shape (16 frames + 484 text tokens, 224 px), from the
    exact counter: the former branch's coarse pass is the one a trained coarse loss (lambda > 0) runs,
    less that loss's logits."""
    for size in ("135m", "360m", "1.7b"):
        overrides = {
            "llm": f"smollm2-{size}",
            "dino": "dinov2-small",
            "image_size": 224,
            "gradient_checkpointing": True,
        }
        now = estimate_flops(load_config(None, {"model": overrides}).model, PLAN_FRAMES, PLAN_TEXT_TOKENS)
        trained = estimate_flops(
            load_config(None, {"model": {**overrides, "lambda_coarse": 1.0}}).model, PLAN_FRAMES, PLAN_TEXT_TOKENS
        )
        before = trained.executed - trained.breakdown["lm_head_coarse"]
        print(
            f"[paper shape {size}, counted] full_sequence / visual_only FLOPs {before / now.executed:.2f}x "
            f"({before:.4g} vs {now.executed:.4g} per sample, of which recompute {now.recompute:.3g})"
        )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=("tiny", "135m", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paper_shape_ratios()
    for shape_name in ("tiny", "135m") if args.shape == "both" else (args.shape,):
        shape = SHAPES[shape_name]
        torch.manual_seed(0)
        cfg = load_config(None, {"model": {**shape["overrides"], "gradient_checkpointing": True}}).model
        model = build_model(cfg).to(args.device).train()
        batch = make_batch(shape["batch"], shape["frames"], shape["text"], cfg.image_size, args.device)
        for compute_coarse in (False, True):
            kind = "logged step" if compute_coarse else "plain step"
            steps = {way: make_step(model, batch, way, compute_coarse) for way in ("full_sequence", "visual_only")}
            (loss_a, grads_a), (loss_b, grads_b) = steps["full_sequence"](), steps["visual_only"]()
            grad_gap = max(float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a)
            flops = {way: counted_flops(step) for way, step in steps.items()}
            times = interleaved_times(steps, args.repeats, args.device == "cuda")
            for way in steps:
                print(
                    f"[{shape_name} {args.device} checkpointing, {kind}] {way:<14} {times[way] * 1000:8.1f} ms/step  "
                    f"{flops[way] / 1e9:9.3f} GFLOP/step"
                )
            print(
                f"[{shape_name} {kind}] full_sequence / visual_only: time {times['full_sequence'] / times['visual_only']:.2f}x, "
                f"FLOPs {flops['full_sequence'] / flops['visual_only']:.2f}x; loss gap {abs(float(loss_a - loss_b)):.1e}, "
                f"largest gradient gap {grad_gap:.1e}"
            )


if __name__ == "__main__":
    main()
