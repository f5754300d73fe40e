"""Fewer operations in the LLM's and DINO's layers, over the same weights.

A 135M training step runs the LLM's 30 layers twice, so each operation a layer saves is 60 fewer
kernel launches forward (and about as many backward). Each replacement keeps every Parameter itself
(same name, same tensor), so checkpoints, the optimizer, FSDP/DDP and the export are unchanged:

- **RMSNorm**: transformers' Llama RMSNorm is eight operations forward and about sixteen backward.
  `torch.nn.RMSNorm` computes the same function through `F.rms_norm`, which on a CUDA device is one
  fused kernel each way (on a CPU it decomposes into the same operations, at the same cost). In fp32
  the values are the same bit for bit on a CPU; in bf16 the fused kernel applies the weight before
  rounding once, where transformers rounds the normalised input and then multiplies: results may
  differ by one bf16 rounding step.
- **Projections of one input** (`linears`): the LLM's q, k and v (DINO's k and v) from one matrix
  product over the concatenated weights. Backward is then two products instead of six plus the sum
  of three input gradients. The concatenated copy lives from forward to backward: 1.1 MB a layer at
  135M in bf16, 25 MB at 1.7B (1.2 GB over a 1.7B step's two passes, against a 33 GiB peak).
- **Rotary embedding** (`FusedLlamaAttention`): one rotary over the queries and keys together, with
  `rotate_half`'s negation moved into the sine: the same values as transformers'
  `apply_rotary_pos_emb` bit for bit, in 4 operations each way instead of about 12 per tensor.

Under autocast (`train.precision=bf16-autocast`) the attention runs transformers' own forward and the
projections their own layers: autocast chooses a dtype per layer call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import ALL_ATTENTION_FUNCTIONS, LlamaAttention, eager_attention_forward


def _autocasting(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)


# ---------------------------------------------------------------------- RMSNorm
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


# ---------------------------------------------------------------------- attention
def _joined(x: torch.Tensor, layers: tuple[nn.Linear, ...]) -> torch.Tensor:
    """The outputs of `layers` over `x`, side by side: one product over their concatenated weights."""
    biases: list[torch.Tensor] = [layer.bias for layer in layers if layer.bias is not None]
    if biases and len(biases) != len(layers):
        raise ValueError("linears: either every layer has a bias or none has")
    weights: list[torch.Tensor] = [layer.weight for layer in layers]
    return F.linear(x, torch.cat(weights), torch.cat(biases) if biases else None)


def linears(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """The outputs of several `nn.Linear` layers over one input (all with biases or none), from one
    matrix product: views of its columns. Under autocast, each layer runs on its own."""
    if _autocasting(x):
        return tuple(layer(x) for layer in layers)
    return _joined(x, layers).split([layer.out_features for layer in layers], dim=-1)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' x * cos + rotate_half(x) * sin for x [B, L, heads, d] and cos, sin [B, L, d].
    rotate_half(x) is [-x2, x1]: here the halves are swapped by one roll and the sign rides on the
    sine ([-s1, s2]; -x2 * s1 and x2 * -s1 are the same float), so autograd sees 4 operations."""
    half = x.shape[-1] // 2
    signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).unsqueeze(2)
    return x * cos.unsqueeze(2) + x.roll(half, dims=-1) * signed_sin


class FusedLlamaAttention(LlamaAttention):
    """transformers' LlamaAttention with q, k and v from one product and one rotary over q and k
    (module docstring). The attention itself, the cache and the output projection are transformers'."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if _autocasting(hidden_states) or position_embeddings is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        heads, kv_heads = self.q_proj.out_features // self.head_dim, self.k_proj.out_features // self.head_dim
        qkv = _joined(hidden_states, (self.q_proj, self.k_proj, self.v_proj))
        qk, value = qkv.unflatten(-1, (heads + 2 * kv_heads, self.head_dim)).split([heads + kv_heads, kv_heads], 2)
        query, key = _rotary(qk, *position_embeddings).split([heads, kv_heads], dim=2)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def fuse_attention(llm: Any) -> int:
    """Makes every transformers `LlamaAttention` in `llm` a `FusedLlamaAttention` (the same module and
    Parameters, another forward). Returns how many it changed."""
    changed = 0
    for module in llm.modules():
        if type(module) is LlamaAttention:
            module.__class__ = FusedLlamaAttention
            changed += 1
    return changed
