"""AdamW over the model's three parameter groups (differential learning rates) and the LR schedules.

Schedules are pure functions of the optimizer step, so resuming needs only the step count.
- `cosine`: linear warmup to each group's peak, then cosine decay to `min_lr_ratio` x peak.
- `constant`: linear warmup, then each group's peak.
- `converging`: the groups start apart and end together. After warmup each group follows a cosine
  from its own peak to one shared final rate, `min_lr_ratio` x the smallest trainable peak; so the
  randomly initialised connector learns fast early, and by the end all parts are fine-tuned at the
  same gentle rate (differential LR early, uniform LR late).
"""

from __future__ import annotations

import math

import torch

from fvlm.config import OptimConfig
from fvlm.training.precision import MasterWeights

GROUPS = ("connector", "dino", "llm")


def build_optimizer(model, cfg: OptimConfig, masters: MasterWeights | None = None) -> torch.optim.AdamW:
    """One AdamW param group per (model group, decay or not). Weight decay applies to matrices only:
    decaying norms, biases and the learned query vectors would just pull them towards zero. With
    `masters` (train.precision=bf16) it updates each parameter's fp32 master in the parameter's place:
    the same groups in the same order, so the optimizer state is the same as an fp32 run's."""
    peaks = cfg.peak_lrs()
    param_groups = []
    for name, params in model.param_groups().items():
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decay]
            if masters is not None:
                chosen = [masters.master_of(p) for p in chosen]
            if chosen:
                param_groups.append(
                    {
                        "params": chosen,
                        "group": name,
                        "lr": peaks[name],
                        "weight_decay": cfg.weight_decay if decay else 0.0,
                    }
                )
    if not param_groups:
        raise ValueError("the model has no trainable parameters")
    # The fused kernel updates each tensor in one pass instead of a dozen small ops per tensor: about
    # 4% of the tiny model's CPU training step, where the optimizer is ~9% of it (benchmarks/RESULTS.md).
    every = [p for group in param_groups for p in group["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in every)
    return torch.optim.AdamW(
        param_groups, lr=peaks["connector"], betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused
    )


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Warmup then the decay shape, in [0, 1]: 1 at the end of warmup, 0 at `total_steps`."""
    warmup = int(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def group_lrs(step: int, total_steps: int, cfg: OptimConfig, trainable: set[str]) -> dict[str, float]:
    """The learning rate of each group at `step` (0 for a group with nothing to train)."""
    peaks = cfg.peak_lrs()
    warmup = int(cfg.warmup_ratio * total_steps)
    shape = lr_factor(step, total_steps, cfg)
    if cfg.schedule == "converging":
        live = [peaks[g] for g in GROUPS if g in trainable and peaks[g] > 0]
        floor = cfg.min_lr_ratio * min(live) if live else 0.0
    lrs = {}
    for name in GROUPS:
        peak = peaks[name]
        if name not in trainable:
            lrs[name] = 0.0
        elif step < warmup or cfg.schedule == "constant":
            lrs[name] = peak * shape
        elif cfg.schedule == "converging":
            lrs[name] = floor + (peak - floor) * shape
        else:
            lrs[name] = peak * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape)
    return lrs


def apply_lrs(optimizer: torch.optim.Optimizer, lrs: dict[str, float]) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lrs[group["group"]]
