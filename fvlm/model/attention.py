"""The LLM's attention in fvlm's uncached passes: one causal SDPA call over packed rows, no mask.

A training pass's rows are [visual block (padded frames) | text (right-padded)]: padding in the
middle of the sequence. Given a padding mask, transformers builds a [B, 1, L, L] mask, and with any
mask SDPA can use neither its flash kernel nor its native grouped-query attention (transformers then
copies each layer's keys and values per query head, `repeat_kv`); deciding whether the mask can be
dropped reads its values (a host sync) and, under torch.compile (torch < 2.14), never drops it.

`run_packed` instead moves each row's real positions to the front, in order (a stable sort of the
padding flags, on the device), runs the LLM with no mask at all, and puts the hidden states back in
the caller's layout. Positions then count real tokens only, as before; a real query sees exactly the
real keys before it, so every real position's output is the masked pass's. The padding at each row's
end computes something nobody reads.

The LLM runs under its own attention name, FVLM_SDPA: transformers' SDPA attention with a mask
builder that is transformers' SDPA one, except for an empty [B, 0] mask, which `run_packed` passes
to say "packed rows: causal, no mask". Every other call (generation, scoring, the LLM used directly
with a 2D padding mask) gets exactly the mask plain SDPA would build. Passing no mask at all would
not do: transformers would then look for packed sequences in the position ids, which reads them.
"""

from __future__ import annotations

from typing import Any

import torch

FVLM_SDPA = "fvlm_sdpa"


def _mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' SDPA mask builder, but None (causal, no mask) for run_packed's empty mask."""
    from transformers.masking_utils import sdpa_mask

    attention_mask = kwargs.get("attention_mask")
    if attention_mask is not None and attention_mask.shape[-1] == 0:
        return None
    return sdpa_mask(*args, **kwargs)


def use_packed_sdpa(llm: Any) -> bool:
    """Switches an LLM that uses SDPA to FVLM_SDPA (registered once per process). Returns whether it
    did: an LLM with another attention (eager) keeps it and the masked passes."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    if llm.config._attn_implementation not in ("sdpa", FVLM_SDPA):
        return False
    AttentionInterface.register(FVLM_SDPA, sdpa_attention_forward)
    AttentionMaskInterface.register(FVLM_SDPA, _mask)
    llm.set_attn_implementation(FVLM_SDPA)
    return llm.config._attn_implementation == FVLM_SDPA


def packing_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse) [B, L]: `order` lists each row's real positions first, in order, then its
    padding; `inverse` maps a position back (packed[b, inverse[b, i]] is position i)."""
    order = torch.sort(mask.eq(0).to(torch.uint8), dim=1, stable=True).indices
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(order)
    inverse = torch.empty_like(order).scatter_(1, order, positions)
    return order, inverse


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def run_packed(llm: Any, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The LLM's last hidden states [B, L, D] over `embeds` [B, L, D] whose real positions `mask`
    [B, L] marks, in the caller's layout (see the module docstring)."""
    order, inverse = packing_order(mask)
    packed_rows = mask.new_ones(mask.shape[0], 0, dtype=torch.bool)  # the empty mask: no mask at all
    out = llm.model(inputs_embeds=_rows(embeds, order), attention_mask=packed_rows, use_cache=False)
    return _rows(out.last_hidden_state, inverse)
