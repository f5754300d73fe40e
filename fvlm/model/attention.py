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

The LLM runs under its own attention name, FVLM_SDPA: transformers' SDPA function, registered under a
name that has no mask builder, so transformers passes no mask unless it is handed a 4D one. Cached
passes (generation, scoring) build transformers' own SDPA mask from their 2D mask (`cached_mask`), so
they compute exactly what a plain SDPA model (the export) computes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

FVLM_SDPA = "fvlm_sdpa"


def use_packed_sdpa(llm: Any) -> bool:
    """Switches an LLM that uses SDPA to FVLM_SDPA (registered once per process). Returns whether it
    did: an LLM with another attention (eager) keeps it and the masked passes."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if llm.config._attn_implementation not in ("sdpa", FVLM_SDPA):
        return False
    AttentionInterface.register(FVLM_SDPA, sdpa_attention_forward)
    llm.set_attn_implementation(FVLM_SDPA)
    return llm.config._attn_implementation == FVLM_SDPA


def sdpa_view(config: Any) -> Any:
    """A shallow copy of an LLM config that names plain SDPA, for building transformers' own masks."""
    view = copy.copy(config)
    view._attn_implementation_internal = "sdpa"
    return view


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
    out = llm.model(inputs_embeds=_rows(embeds, order), attention_mask=None, use_cache=False)
    return _rows(out.last_hidden_state, inverse)


def cached_mask(config: Any, embeds: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor | None:
    """The mask transformers' SDPA path would build for a cached pass (None where it relies on
    SDPA's `is_causal`), from the 2D mask of real positions over cache + new tokens."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=mask.long(), cache=cache)
