"""PyTorch's own RMSNorm in place of the LLM's hand-composed one.

transformers' Llama RMSNorm is eight operations forward (upcast, square, mean, add, rsqrt, multiply,
downcast, multiply by the weight) and about sixteen backward, 122 times in a 135M training step.
`torch.nn.RMSNorm` computes the same function through `F.rms_norm`, which on a CUDA device is one
fused kernel each way (on a CPU it decomposes into the same operations, at the same cost). The
replacement keeps the weight Parameter itself (same name, same tensor), so checkpoints, the optimizer
and the export are unchanged. In fp32 the values are the same bit for bit on a CPU; in bf16 the
fused kernel applies the weight before rounding once, where transformers rounds the normalised
input and then multiplies: results may differ by one bf16 rounding step.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def _is_llama_style_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and not isinstance(module, nn.RMSNorm)
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and isinstance(getattr(module, "variance_epsilon", None), float)
        and not list(module.children())
    )


def use_torch_rms_norm(llm: Any) -> int:
    """Replaces every Llama-style RMSNorm in `llm` (a weight of one dimension and a
    `variance_epsilon`) by `torch.nn.RMSNorm` over the same weight. Returns how many it replaced."""
    replaced = 0
    for name, module in list(llm.named_modules()):
        if not _is_llama_style_rms_norm(module):
            continue
        norm = nn.RMSNorm(module.weight.shape[0], eps=module.variance_epsilon, device="meta")
        norm.weight = module.weight
        parent_name, _, child = name.rpartition(".")
        parent = llm.get_submodule(parent_name) if parent_name else llm
        setattr(parent, child, norm)
        replaced += 1
    return replaced
