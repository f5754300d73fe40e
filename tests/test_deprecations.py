"""The suite fails on deprecated calls from fvlm (conftest.py): the check sees a deprecated argument
that fvlm passes to a transformers model, which a `filterwarnings` entry by module cannot (the
warning names torch's Module.__call__ as its place), and lets the same call made from outside fvlm
through."""

from __future__ import annotations

import warnings

import torch
from conftest import deprecations_from_fvlm

from fvlm.config import load_config
from fvlm.model.build import build_model


def test_a_deprecated_argument_passed_by_fvlm_is_caught_and_one_from_elsewhere_is_not(monkeypatch):
    model = build_model(load_config("tiny", ["model.image_size=32"]).model)
    forward = model.llm.model.forward

    def before_transformers_5_24(*args, cache=None, **kwargs):
        # What fvlm passed before: the cache under its old name.
        return forward(*args, past_key_values=cache, **kwargs)

    monkeypatch.setattr(model.llm.model, "forward", before_transformers_5_24)
    embeds = torch.zeros(1, 3, model.llm_dim)
    with warnings.catch_warnings(), deprecations_from_fvlm(keep=True) as found:
        warnings.simplefilter("always")
        model.run_llm(embeds, torch.ones(1, 3), cache=model._new_cache())
        assert len(found) == 1 and found[0].startswith("fvlm/model/vlm.py:") and "past_key_values" in found[0]
        before_transformers_5_24(inputs_embeds=embeds, cache=model._new_cache(), use_cache=True)
        assert len(found) == 1


def test_fvlm_passes_no_deprecated_argument_to_the_llm():
    model = build_model(load_config("tiny", ["model.image_size=32"]).model)
    embeds = torch.zeros(1, 3, model.llm_dim)
    with warnings.catch_warnings(), deprecations_from_fvlm(keep=True) as found:
        warnings.simplefilter("always")
        cache = model._new_cache()
        model.run_llm(embeds, torch.ones(1, 3), cache=cache)
        assert cache.get_seq_length() == 3  # the cache was used, under the name the model reads
    assert found == []
