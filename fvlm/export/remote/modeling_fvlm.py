"""An fvlm model for transformers: DINOv2 reads every frame, a learned query reads DINO, one token per
frame goes to a causal language model, which chooses where the next frame's query looks.

This file travels inside a folder written by `fvlm export` and imports torch and transformers only.
The two backbones are transformers' own models, built from `config.text_config` (the LLM) and
`config.vision_config` (DINOv2); the code here is fvlm's own part: the query read through every
DINO layer, the projections, and the coarse / fine / autoregressive passes.

Inputs (what `build_inputs` makes):
    pixel_values [B, T, 3, S, S]  frames normalised with the preprocessor's mean and std (T may be 0)
    input_ids [B, V + L]          V = T * tokens_per_frame frame slots (their ids are never read), then
                                  the chat-template text, padded on the left of the text
    attention_mask [B, V + L]     over the frame slots: 1 for a real frame, 0 for a padded one
                                  (real frames first); over the text: 1 for a token, 0 for padding
With `pixel_values` the first V positions of the sequence are the visual block; without them every
position is text (a text-only prompt, or the tokens `generate` feeds after the first step). Position
ids count attended tokens only, so padding changes nothing about a sample.

`labels` [B, V + L] (-100: no target) give the mean cross-entropy of the targets, each predicted from
the nearest attended position before it (a padded frame or padding token is skipped), as fvlm trains.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedModel

from .configuration_fvlm import FvlmConfig

IGNORE = -100


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    n, s, d = x.shape
    return x.view(n, s, heads, d // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    n, h, s, hd = x.shape
    return x.transpose(1, 2).reshape(n, s, h * hd)


def _query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query per frame over that frame's keys: q [N, heads, 1, hd], k/v [N, heads, S, hd]."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.matmul(scores.softmax(dim=-1), v)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count attended tokens only."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows [N, ...] of the real frames back into [B, T, ...] (zeros for padded frames)."""
    out = values.new_zeros(*mask.shape, *values.shape[1:])
    out[mask] = values
    return out


class FvlmShallowQuery(nn.Module):
    """The shallow-query ablation: one cross-attention from the query to DINO's final features."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """features [N, 1 + P, D], query [N, D] -> [N, D]."""
        k, v = _split_heads(self.k(features), self.heads), _split_heads(self.v(features), self.heads)
        q = _split_heads(self.q(query.unsqueeze(1)), self.heads)
        return self.o(_merge_heads(_query_attention(q, k, v))).squeeze(1)


class FrameStore:
    """What the queries read from the real frames of a batch (in batch-major order): each DINO layer's
    keys and values of [CLS + patches] (deep query), and DINO's final normalised tokens."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], features: torch.Tensor):
        self.keys, self.values, self.features = keys, values, features

    def rows(self, index: torch.Tensor) -> FrameStore:
        return FrameStore([k[index] for k in self.keys], [v[index] for v in self.values], self.features[index])


class FvlmPreTrainedModel(PreTrainedModel):
    config_class = FvlmConfig
    config: FvlmConfig
    base_model_prefix = "fvlm"
    main_input_name = "input_ids"
    input_modalities = ["image", "text"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _no_split_modules = ["LlamaDecoderLayer", "Dinov2Layer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # The learned queries start as fvlm's random ones do (std 1); a loaded model overwrites them.
        if isinstance(module, FvlmForCausalLM):
            for name in ("q_static", "q_init"):
                param = getattr(module, name, None)
                if param is not None:
                    nn.init.normal_(param, std=1.0)


class FvlmForCausalLM(FvlmPreTrainedModel, GenerationMixin):
    """The exported model. `forward` returns the language model's logits over the whole sequence
    (visual block + text); `generate` continues the prompts after the visual block.

    The mode (`mode=` in forward and generate, else `config.default_mode`) decides how the visual
    block is read:
        coarse_only     every frame read with the static query `q_static`
        coarse_fine     a coarse pass as above; the LLM's state after coarse frame t-1 gives the query
                        for frame t (frame 0: `q_init`), which reads the frame again: the fine tokens
        autoregressive  frame by frame, each query from the LLM's state after the previous fine token
    """

    def __init__(self, config: FvlmConfig):
        super().__init__(config)
        self.llm: Any = AutoModelForCausalLM.from_config(config.text_config)
        self.dino: Any = AutoModel.from_config(config.vision_config)
        self.llm_dim = self.llm.config.hidden_size
        self.dino_dim = self.dino.config.hidden_size
        self.heads = self.dino.config.num_attention_heads
        self.dino_to_llm = nn.Linear(self.dino_dim, self.llm_dim)
        self.shallow: FvlmShallowQuery | None = None
        if config.arch == "foveated":
            query_dim = config.query_dim or self.dino_dim
            self.q_static = nn.Parameter(torch.zeros(query_dim))
            self.query_proj = nn.Linear(query_dim, self.dino_dim, bias=False)
            if not config.deep_query:
                self.shallow = FvlmShallowQuery(self.dino_dim, self.heads)
            if not config.coarse_only:
                self.q_init = nn.Parameter(torch.zeros(query_dim))
                self.llm_to_query = nn.Linear(self.llm_dim, query_dim)
        self.post_init()

    # ------------------------------------------------------------------ embeddings
    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    # ------------------------------------------------------------------ vision
    def _frames(self, pixels: torch.Tensor, need_keys: bool) -> FrameStore:
        """DINO's own layers over frames [N, 3, S, S]; each layer's keys and values of its normed input."""
        dino = self.dino
        hidden = dino.embeddings(pixels.to(self.dino_to_llm.weight.dtype))
        keys, values = [], []
        for layer in dino.encoder.layer:
            if need_keys:
                x = layer.norm1(hidden)
                keys.append(_split_heads(layer.attention.k_proj(x), self.heads))
                values.append(_split_heads(layer.attention.v_proj(x), self.heads))
            out = layer(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        return FrameStore(keys, values, dino.layernorm(hidden))

    def _deep_query(self, store: FrameStore, query: torch.Tensor) -> torch.Tensor:
        """The query [N, D] as one more token through every DINO layer, attending to that layer's keys
        and values of the frame (which never attend to it); final layer norm. -> [N, D]."""
        hidden = query.unsqueeze(1)
        for layer, k, v in zip(self.dino.encoder.layer, store.keys, store.values):
            attn = layer.attention
            q = _split_heads(attn.q_proj(layer.norm1(hidden)), self.heads)
            hidden = layer.layer_scale1(attn.o_proj(_merge_heads(_query_attention(q, k, v)))) + hidden
            hidden = layer.layer_scale2(layer.mlp(layer.norm2(hidden))) + hidden
        return self.dino.layernorm(hidden).squeeze(1)

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        return self.dino_to_llm(features) * self.config.visual_scale

    def _read(self, store: FrameStore, queries: torch.Tensor) -> torch.Tensor:
        """queries [N, query_dim] for the N frames of `store` -> LLM tokens [N, D_llm]."""
        q = self.query_proj(queries)
        token = self._deep_query(store, q) if self.shallow is None else self.shallow(store.features, q)
        return self._project(token)

    def _run_llm(self, embeds: torch.Tensor, mask: torch.Tensor, cache: Any = None) -> torch.Tensor:
        out = self.llm.model(
            inputs_embeds=embeds,
            attention_mask=mask.long(),
            position_ids=_positions(mask)[:, -embeds.shape[1] :],
            cache=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    def visual_tokens(self, pixel_values: torch.Tensor, frame_mask: torch.Tensor, mode: str | None = None):
        """The visual block [B, T * tokens_per_frame, D_llm] of frames [B, T, 3, S, S] in a mode
        (zeros at padded frames, which the attention mask hides)."""
        mode = mode or self.config.default_mode
        if mode not in self.config.supported_modes:
            raise ValueError(
                f"mode {mode!r} is not available for this model (available: {self.config.supported_modes})"
            )
        b, t = frame_mask.shape
        per_frame = self.config.tokens_per_frame
        dtype = self.dino_to_llm.weight.dtype
        if int(frame_mask.sum()) == 0:
            return pixel_values.new_zeros(b, t * per_frame, self.llm_dim, dtype=dtype)
        foveated = self.config.arch == "foveated"
        store = self._frames(pixel_values[frame_mask], need_keys=foveated and self.config.deep_query)
        if not foveated:
            patches = store.features[:, 1:]
            side = round(per_frame**0.5)
            patch = self.dino.config.patch_size
            grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
            image = patches.transpose(1, 2).reshape(patches.shape[0], self.dino_dim, *grid)
            pooled = F.adaptive_avg_pool2d(image, side).flatten(2).transpose(1, 2)
            return _scatter(self._project(pooled), frame_mask).reshape(b, t * per_frame, self.llm_dim)
        if mode == "autoregressive":
            return self._sequential_fine(store, frame_mask)
        coarse = _scatter(self._read(store, self.q_static.expand(store.features.shape[0], -1)), frame_mask)
        if mode == "coarse_only":
            return coarse
        hidden = self._run_llm(coarse, frame_mask)
        queries = torch.cat([self.q_init.expand(b, 1, -1), self.llm_to_query(hidden[:, :-1])], dim=1)
        return _scatter(self._read(store, queries[frame_mask]), frame_mask)

    def _sequential_fine(self, store: FrameStore, frame_mask: torch.Tensor) -> torch.Tensor:
        """Frame by frame: each fine token read with the query from the LLM's state after the previous
        fine token (KV-cached), as on a stream."""
        b, t = frame_mask.shape
        frame_index = torch.zeros_like(frame_mask, dtype=torch.long)
        frame_index[frame_mask] = torch.arange(int(frame_mask.sum()), device=frame_mask.device)
        cache = DynamicCache(config=self.llm.config)
        query = self.q_init.expand(b, -1)
        tokens = []
        for step in range(t):
            valid = frame_mask[:, step]
            rows = store.rows(frame_index[valid, step])
            tokens.append(_scatter(self._read(rows, query[valid]), valid))
            hidden = self._run_llm(tokens[-1][:, None], frame_mask[:, : step + 1], cache=cache)[:, -1]
            query = torch.where(valid[:, None], self.llm_to_query(hidden), query)
        return torch.stack(tokens, dim=1)

    # ------------------------------------------------------------------ the transformers interface
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mode: str | None = None,
        **kwargs: Any,
    ):
        """Logits of the language model over [visual block + text] (see the module's docstring for
        the layout); `loss` with `labels`. Returns the language model's own output class."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch, length = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=inputs_embeds.device)
        if pixel_values is not None:
            t = pixel_values.shape[1]
            slots = t * self.config.tokens_per_frame
            if past or length < slots:
                raise ValueError(
                    f"pixel_values of {t} frames need the first {slots} positions of the input as frame slots "
                    f"(the input has {length} new positions after {past} cached ones); see build_inputs"
                )
            frame_mask = attention_mask[:, :slots].reshape(batch, t, -1)[..., 0].bool()
            visual = self.visual_tokens(pixel_values, frame_mask, mode).to(inputs_embeds.dtype)
            inputs_embeds = torch.cat([visual, inputs_embeds[:, slots:]], dim=1)
        if position_ids is None:
            position_ids = _positions(attention_mask)[:, -length:]
        out = self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        if labels is not None:
            out.loss = self.target_loss(out.logits, labels, attention_mask)
        return out

    @staticmethod
    def target_loss(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the targets (labels != -100), each predicted by the nearest attended
        position before it; 0 when there is no target."""
        if logits.shape[1] != labels.shape[1]:
            raise ValueError("labels need the logits of every position (logits_to_keep=0, no cache)")
        batch, seq = labels.shape
        arange = torch.arange(seq, device=labels.device).expand(batch, seq)
        last_real = torch.where(attention_mask[:, -seq:].bool(), arange, -1).cummax(dim=1).values
        prev_real = torch.cat([last_real.new_full((batch, 1), -1), last_real[:, :-1]], dim=1)
        targets = (labels != IGNORE) & (prev_real >= 0)
        rows, cols = targets.nonzero(as_tuple=True)
        predicted = logits[rows, prev_real[rows, cols]].float()
        losses = F.cross_entropy(predicted, labels[rows, cols], reduction="none")
        return losses.sum() / max(rows.numel(), 1)

    def build_inputs(
        self,
        tokenizer: Any,
        prompts: list[str],
        pixel_values: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Inputs for `forward` and `generate`: each prompt as a user turn of the chat template with the
        assistant's header after it, behind the frame slots, padded on the left of the text.

        pixel_values [B, T, 3, S, S] (B = len(prompts)); frame_mask [B, T] marks the real frames
        (real frames first; default: all). Without pixel_values the prompts are answered from text alone.
        """
        rows = []
        for prompt in prompts:
            encoded = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True
            )
            ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
            rows.append(list(ids))
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.config.frame_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        inputs = {"input_ids": ids, "attention_mask": mask}
        if pixel_values is not None:
            b, t = pixel_values.shape[:2]
            if b != len(prompts):
                raise ValueError(f"{len(prompts)} prompts for a batch of {b} frame sequences")
            if frame_mask is None:
                frame_mask = torch.ones(b, t, dtype=torch.bool)
            slot_mask = frame_mask.long().cpu().repeat_interleave(self.config.tokens_per_frame, dim=1)
            slot_ids = torch.full_like(slot_mask, self.config.frame_token_id)
            inputs = {
                "input_ids": torch.cat([slot_ids, ids], dim=1),
                "attention_mask": torch.cat([slot_mask, mask], dim=1),
                "pixel_values": pixel_values,
            }
        return {k: v.to(self.device) for k, v in inputs.items()}


__all__ = ["FvlmForCausalLM", "FvlmPreTrainedModel"]
