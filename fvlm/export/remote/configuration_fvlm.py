"""Configuration of an fvlm model exported for transformers (`fvlm export`).

This file travels inside the exported folder and imports transformers only. The two backbones keep
their own transformers configs (`text_config`: the causal language model, a Llama for SmolLM2;
`vision_config`: DINOv2); the fields here are fvlm's own parts.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

ARCHITECTURES = ("foveated", "multi_token")
MODES = ("coarse_fine", "coarse_only", "autoregressive")


class FvlmConfig(PreTrainedConfig):
    """A foveated video-language model (or fvlm's multi-token baseline).

    Fields:
        text_config: the language model's config (any causal LM transformers builds; SmolLM2 is Llama).
        vision_config: the DINOv2 encoder's config.
        arch: "foveated" (one token per frame from a query that reads every DINO layer) or
            "multi_token" (DINO's patch grid average-pooled to k x k tokens per frame, no query).
        deep_query: the query passes through every DINO layer (else one cross-attention on DINO's
            final features: the shallow-query ablation).
        coarse_only: trained without the fine pass (no `q_init` / `llm_to_query`).
        tokens_per_frame: visual tokens per frame (1 for the foveated model, k*k for multi_token).
        query_dim: width of `q_static`, `q_init` and `llm_to_query`'s output.
        visual_scale: factor on every visual token (about the LLM's embedding std).
        image_size: frame side in pixels the model was trained at.
        default_mode: the mode `forward` and `generate` use when none is given.
        frame_token_id: the id `build_inputs` writes into the frame slots of `input_ids` (the model
            replaces those positions by visual tokens, so the id itself is never read).
        fvlm: provenance (fvlm's own model config, the run id, the checkpoint step); not read.
    """

    model_type = "fvlm"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov2"),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    arch: str = "foveated"
    deep_query: bool = True
    coarse_only: bool = False
    tokens_per_frame: int = 1
    query_dim: int | None = None
    visual_scale: float = 1.0
    image_size: int = 224
    default_mode: str = "coarse_fine"
    frame_token_id: int = 0
    fvlm: dict[str, Any] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if self.default_mode not in self.supported_modes:
            raise ValueError(f"default_mode {self.default_mode!r} is not one of {self.supported_modes}")
        side = round(self.tokens_per_frame**0.5)
        if self.tokens_per_frame < 1 or (self.arch == "multi_token" and side * side != self.tokens_per_frame):
            raise ValueError(
                f"tokens_per_frame must be 1 (foveated) or a square (multi_token), got {self.tokens_per_frame}"
            )
        if self.arch == "foveated" and self.tokens_per_frame != 1:
            raise ValueError("a foveated model has one token per frame")

    @property
    def supported_modes(self) -> tuple[str, ...]:
        """The inference modes this model has: a multi-token or coarse-only model has one pass only."""
        if self.arch == "multi_token" or self.coarse_only:
            return ("coarse_only",)
        return MODES
