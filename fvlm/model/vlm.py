"""The foveated VLM and the multi-token baseline.

Sequence layout for the LLM: one block of visual tokens (frames in order; padded frames masked out
of attention) followed by the chat-template text. Positions count real tokens only, so padding a
sample with extra frames changes nothing about it.

Batch contract (from fvlm.data): frames [B, T, 3, S, S] normalised, frame_mask [B, T] (valid
frames first), input_ids / attention_mask / loss_mask [B, L]; loss_mask marks the text tokens that
are targets.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypedDict, overload

import torch
import torch.nn.functional as F
from torch import nn

from fvlm.config import ModelConfig
from fvlm.model.encoder import DinoEncoder, PatchCache, ShallowQuery, attention_entropy, cls_embedding

if TYPE_CHECKING:
    from transformers import DynamicCache

MODES = ("coarse_fine", "coarse_only", "autoregressive")


class Batch(TypedDict, total=False):
    """The batch contract above. The model reads the tensors; the loader adds each sample's key,
    source and kind, and a video's mover box per frame ([x0, y0, x1, y1] as shares of the frame
    side; None for a sample without), which evaluation and the attention pictures read."""

    frames: torch.Tensor
    frame_mask: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    keys: list[str]
    sources: list[str]
    kinds: list[str]
    mover_boxes: list[list[list[float]] | None]


# A mode's visual block: (tokens [B, T, D_llm], frame_mask [B, T], the query attention by pass,
# {"coarse"|"fine": [B, T, layers, heads, 1 + P]}; empty without a query).
VisualBlock = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
# The shallow query's keys and values of every frame's tokens, each [N, heads, 1 + P, head_dim].
KV = tuple[torch.Tensor, torch.Tensor]
# One DINO pass over a batch's valid frames, as the queries read it: the patch cache, and the
# shallow query's keys and values (None for the deep query, which reads the cache's own).
Prepared = tuple[PatchCache, KV | None]


@dataclass
class VLMOutput:
    """Losses are token means over the batch's target tokens; `n_tokens` is their count."""

    loss: torch.Tensor
    n_tokens: int
    loss_fine: torch.Tensor | None = None
    loss_coarse: torch.Tensor | None = None
    # The query attention (detached) that `attention_entropy` summarises. The entropy is computed only
    # when read: a training step never reads it, and computing it in the forward would cost a
    # device sync every step and, under torch.compile, a new graph for every value.
    entropy_weights: torch.Tensor | None = None
    # Attention of the query over [CLS + patches]: {"coarse"|"fine": [B, T, layers, heads, 1 + P]}.
    attention: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def attention_entropy(self) -> float | None:
        """Mean entropy of the query's attention over the real frames (None: no frames)."""
        return None if self.entropy_weights is None else _masked_entropy(self.entropy_weights)


def param_group(name: str) -> str:
    """The optimizer group (connector, dino or llm) of a parameter, by its name in the model."""
    if name.startswith("encoder.dino."):
        return "dino"
    return "llm" if name.startswith("llm.") else "connector"


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


class VLMBase(nn.Module):
    """The parts every architecture shares: the LLM, DINO, visual projection and the text loss."""

    def __init__(self, cfg: ModelConfig, llm: Any, dino: Any):
        super().__init__()
        self.cfg = cfg
        self.llm: Any = llm  # a transformers causal LM: its attributes are not typed through nn.Module
        self.encoder = DinoEncoder(dino)
        self.llm_dim = llm.config.hidden_size
        self.dino_dim = dino.config.hidden_size
        self.dino_to_llm = nn.Linear(self.dino_dim, self.llm_dim)
        self.visual_scale = cfg.visual_scale

    # ------------------------------------------------------------------ what each architecture provides
    @property
    def default_mode(self) -> str:
        raise NotImplementedError

    @property
    def supported_modes(self) -> tuple[str, ...]:
        raise NotImplementedError

    def visual_tokens(self, batch: Batch, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The visual block a mode feeds the LLM: (tokens [B, T * tokens per frame, D_llm], their mask)."""
        raise NotImplementedError

    def visual_blocks(self, batch: Batch, modes: tuple[str, ...]) -> dict[str, VisualBlock]:
        """Every requested mode's visual block from one DINO pass."""
        raise NotImplementedError

    # ------------------------------------------------------------------ groups and freezing
    def param_groups(self, trainable_only: bool = True) -> dict[str, list[nn.Parameter]]:
        """Parameters by group (by default the trainable ones only). Everything not inside a backbone
        was initialised by us, so it is `connector`, trained at the connector's learning rate rather
        than at a backbone's (which may be 0 when the backbone is frozen)."""
        groups: dict[str, list[nn.Parameter]] = {"connector": [], "dino": [], "llm": []}
        for name, param in self.named_parameters():
            if param.requires_grad or not trainable_only:
                groups[param_group(name)].append(param)
        return groups

    def apply_freeze(self) -> None:
        self.encoder.dino.requires_grad_(not self.cfg.freeze_dino)
        self.llm.requires_grad_(not self.cfg.freeze_llm)
        # DINO's mask token exists for masked-image pre-training only; nothing here uses it, and an
        # unused trainable parameter would make DDP fail.
        mask_token = getattr(self.encoder.dino.embeddings, "mask_token", None)
        if mask_token is not None:
            mask_token.requires_grad_(False)

    @property
    def dino_trainable(self) -> bool:
        return any(p.requires_grad for p in self.encoder.dino.parameters())

    # ------------------------------------------------------------------ vision
    def encode_frames(self, frames: torch.Tensor, frame_mask: torch.Tensor, deep_query: bool) -> PatchCache:
        """DINO over the valid frames only (padded frames cost nothing), in batch-major order."""
        valid = frames[frame_mask]
        context: AbstractContextManager[Any] = (
            nullcontext() if self.dino_trainable and torch.is_grad_enabled() else torch.no_grad()
        )
        with context:
            return self.encoder.encode_patches(valid, cache_kv=deep_query, need_features=not deep_query)

    def _scatter(self, values: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Valid-frame rows [N, ...] back into a padded [B, T, ...] tensor (zeros for padding)."""
        out = values.new_zeros(*frame_mask.shape, *values.shape[1:])
        out[frame_mask] = values
        return out

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.dino_to_llm(features) * self.visual_scale

    # ------------------------------------------------------------------ language
    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(input_ids)

    def run_llm(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        position_ids = _positions(mask)[:, -embeds.shape[1] :] if position_ids is None else position_ids
        out = self.llm.model(
            inputs_embeds=embeds,
            attention_mask=mask.long(),
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    @overload
    def text_loss(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        per_sample: Literal[False] = False,
    ) -> tuple[torch.Tensor, int]: ...

    @overload
    def text_loss(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        per_sample: Literal[True],
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @overload
    def text_loss(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        per_sample: bool = False,
    ) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, torch.Tensor]: ...

    def text_loss(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        per_sample: bool = False,
    ) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, torch.Tensor]:
        """CE of the text targets given hidden states over [visual block + text]: (mean CE, targets).

        A target's predictor is the nearest real position before it (padded frames are skipped).
        Logits are computed for target positions only. With `per_sample` it returns, per sample of
        the batch, (summed CE [B], target count [B]) instead: what paired comparisons of two models
        or two inputs on the same samples need.
        """
        batch, seq = mask.shape
        text_start = seq - input_ids.shape[1]
        arange = torch.arange(seq, device=mask.device).expand(batch, seq)
        last_real = torch.where(mask.bool(), arange, -1).cummax(dim=1).values
        prev_real = torch.cat([last_real.new_full((batch, 1), -1), last_real[:, :-1]], dim=1)
        targets_at = torch.zeros_like(mask, dtype=torch.bool)
        targets_at[:, text_start:] = loss_mask.bool()
        targets_at &= prev_real >= 0
        rows, cols = targets_at.nonzero(as_tuple=True)
        n = rows.numel()
        predictors = hidden[rows, prev_real[rows, cols]]
        logits = self.llm.lm_head(predictors).float()
        labels = input_ids[rows, cols - text_start]
        losses = F.cross_entropy(logits, labels, reduction="none")
        if per_sample:
            return losses.new_zeros(batch).index_add_(0, rows, losses), torch.bincount(rows, minlength=batch)
        # No branch on n: under torch.compile a branch on a data-dependent count splits the graph.
        # With no targets the sum is 0 and the loss 0.0, still connected to the weights.
        return losses.sum() / torch.sym_max(n, 1), n

    @overload
    def loss_over(
        self, visual: torch.Tensor, visual_mask: torch.Tensor, batch: Batch, per_sample: Literal[False] = False
    ) -> tuple[torch.Tensor, int]: ...

    @overload
    def loss_over(
        self, visual: torch.Tensor, visual_mask: torch.Tensor, batch: Batch, per_sample: Literal[True]
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def loss_over(
        self, visual: torch.Tensor, visual_mask: torch.Tensor, batch: Batch, per_sample: bool = False
    ) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, torch.Tensor]:
        """text_loss of the batch's text after a visual block (per sample with `per_sample`)."""
        embeds = torch.cat([visual, self.embed_text(batch["input_ids"])], dim=1)
        mask = torch.cat([visual_mask.long(), batch["attention_mask"].long()], dim=1)
        hidden = self.run_llm(embeds, mask)
        return self.text_loss(hidden, mask, batch["input_ids"], batch["loss_mask"], per_sample=per_sample)

    @torch.no_grad()
    def generate(
        self,
        batch: Batch,
        mode: str | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continues each sample's prompt (`input_ids`, padded) after its visual tokens.
        Greedy when temperature is 0. Returns new token ids [B, n <= max_new_tokens] (eos after the end)."""
        visual, visual_mask = self.visual_tokens(batch, mode or self.default_mode)
        ids, text_mask = _left_align(batch["input_ids"], batch["attention_mask"].long())
        embeds = torch.cat([visual, self.embed_text(ids)], dim=1)
        mask = torch.cat([visual_mask.long(), text_mask], dim=1)
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        cache = self._new_cache() if use_cache else None
        step_embeds = embeds
        new_tokens: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            hidden = self.run_llm(step_embeds, mask, cache=cache)
            logits = self.llm.lm_head(hidden[:, -1]).float()
            if temperature > 0:
                token = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator).squeeze(-1)
            else:
                token = logits.argmax(-1)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                finished |= token == eos_token_id
            new_tokens.append(token)
            token_embeds = self.embed_text(token[:, None])
            embeds = torch.cat([embeds, token_embeds], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            step_embeds = token_embeds if use_cache else embeds
            if eos_token_id is not None and bool(finished.all()):
                break
        return torch.stack(new_tokens, dim=1)

    def _new_cache(self) -> DynamicCache:
        from transformers import DynamicCache

        return DynamicCache(config=self.llm.config)


class MultiTokenVLM(VLMBase):
    """Baseline B1: DINO's patch grid average-pooled to k x k tokens per frame, projected, no query."""

    default_mode = "coarse_only"

    def __init__(self, cfg: ModelConfig, llm: Any, dino: Any):
        super().__init__(cfg, llm, dino)
        if cfg.tokens_per_frame is None:
            raise ValueError("the multi-token baseline needs model.tokens_per_frame (config validation sets it)")
        self.k = round(cfg.tokens_per_frame**0.5)

    def visual_tokens(self, batch: Batch, mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        frames, frame_mask = batch["frames"], batch["frame_mask"]
        b, t = frame_mask.shape
        per_frame = self.k * self.k
        if int(frame_mask.sum()) == 0:
            empty = frames.new_zeros(b, t * per_frame, self.llm_dim)
            return empty, frame_mask.repeat_interleave(per_frame, dim=1)
        cache = self.encode_frames(frames, frame_mask, deep_query=False)
        assert cache.features is not None  # encoded for features (no deep query)
        patches = cache.features[:, 1:]
        grid = patches.transpose(1, 2).reshape(patches.shape[0], self.dino_dim, *cache.grid)
        pooled = F.adaptive_avg_pool2d(grid, self.k).flatten(2).transpose(1, 2)
        tokens = self._scatter(self.project(pooled), frame_mask)
        return tokens.reshape(b, t * per_frame, self.llm_dim), frame_mask.repeat_interleave(per_frame, dim=1)

    supported_modes = ("coarse_only",)

    def visual_blocks(self, batch: Batch, modes: tuple[str, ...]) -> dict[str, VisualBlock]:
        """Same contract as FoveatedVLM.visual_blocks; the pooled grid has no query, hence no attention."""
        _check_modes(self, modes)
        tokens, mask = self.visual_tokens(batch)
        return {mode: (tokens, mask, {}) for mode in modes}

    def forward(
        self, batch: Batch, mode: str | None = None, compute_coarse: bool = True, return_attention: bool = False
    ) -> VLMOutput:
        visual, visual_mask = self.visual_tokens(batch)
        loss, n = self.loss_over(visual, visual_mask, batch)
        return VLMOutput(loss=loss, n_tokens=n, loss_coarse=loss.detach())


class FoveatedVLM(VLMBase):
    """One token per frame from a query that reads every DINO layer; the LLM chooses the next query."""

    def __init__(self, cfg: ModelConfig, llm: Any, dino: Any):
        super().__init__(cfg, llm, dino)
        query_dim = cfg.query_dim or self.dino_dim
        self.q_static = nn.Parameter(torch.randn(query_dim))
        self.query_proj = nn.Linear(query_dim, self.dino_dim, bias=False)
        self.shallow = None if cfg.deep_query else ShallowQuery(self.dino_dim, self.encoder.num_heads)
        # Coarse-only training (A6) has no fine pass, so it gets no modules that nothing would train.
        if not cfg.coarse_only:
            self.q_init = nn.Parameter(torch.randn(query_dim))
            self.llm_to_query = nn.Linear(self.llm_dim, query_dim)
        if cfg.query_init == "cls":
            self._start_as_cls(dino)

    @torch.no_grad()
    def _start_as_cls(self, dino: nn.Module) -> None:
        """Every query starts as the CLS token's input embedding, with an identity projection: the deep
        query then repeats DINO's own CLS computation, so the first visual tokens are DINO's CLS output.
        llm_to_query starts with zero weights and that embedding as its bias, and learns from there."""
        cls = cls_embedding(dino)
        self.q_static.copy_(cls)
        self.query_proj.weight.copy_(torch.eye(self.dino_dim))
        if not self.cfg.coarse_only:
            self.q_init.copy_(cls)
            self.llm_to_query.weight.zero_()
            self.llm_to_query.bias.copy_(cls)

    @property
    def default_mode(self) -> str:
        return "coarse_only" if self.cfg.coarse_only else "coarse_fine"

    # ------------------------------------------------------------------ queries over frames
    def _prepare(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> Prepared:
        cache = self.encode_frames(frames, frame_mask, deep_query=self.cfg.deep_query)
        kv = None
        if self.shallow is not None:
            assert cache.features is not None  # encoded for features (the shallow query has no deep cache)
            kv = self.shallow.project_kv(cache.features)
        return cache, kv

    def _read(self, cache: PatchCache, kv: KV | None, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [N, query_dim] for the N frames of `cache` -> (LLM tokens [N, D_llm], attention)."""
        q = self.query_proj(queries)
        if self.shallow is None:
            token, weights = self.encoder.deep_query(cache, q)
        else:
            assert kv is not None  # `_prepare` projects the keys and values for the shallow query
            token, weights = self.shallow(kv, q)
        return self.project(token), weights

    def _coarse(self, prepared: Prepared, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache, kv = prepared
        tokens, weights = self._read(cache, kv, self.q_static.expand(cache.num_frames, -1))
        return self._scatter(tokens, frame_mask), self._scatter(weights, frame_mask)

    def _next_queries(self, hidden: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Query for frame t from the hidden state after frame t-1; frame 0 uses q_init."""
        b = hidden.shape[0]
        from_llm = self.llm_to_query(hidden[:, :-1])
        first = self.q_init.expand(b, 1, -1)
        return torch.cat([first, from_llm], dim=1)[frame_mask]

    # ------------------------------------------------------------------ the three modes
    def forward(
        self, batch: Batch, mode: str | None = None, compute_coarse: bool = True, return_attention: bool = False
    ) -> VLMOutput:
        mode = mode or self.default_mode
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if mode != "coarse_only" and self.cfg.coarse_only:
            raise ValueError(f"a model trained coarse-only has no fine pass (mode {mode!r})")
        frame_mask = batch["frame_mask"]
        if int(frame_mask.sum()) == 0:
            return self._text_only(batch)
        prepared = self._prepare(batch["frames"], frame_mask)
        if mode == "coarse_only":
            coarse, coarse_attn = self._coarse(prepared, frame_mask)
            loss, n = self.loss_over(coarse, frame_mask, batch)
            return self._output(loss, n, None, loss, {"coarse": coarse_attn}, return_attention)
        if mode == "autoregressive":
            return self._autoregressive(batch, prepared, return_attention)
        return self._coarse_fine(batch, prepared, compute_coarse, return_attention)

    def _coarse_fine(self, batch: Batch, prepared: Prepared, compute_coarse: bool, return_attention: bool) -> VLMOutput:
        frame_mask = batch["frame_mask"]
        coarse, coarse_attn = self._coarse(prepared, frame_mask)
        lam = self.cfg.lambda_coarse
        loss_coarse: torch.Tensor | None = None
        if lam > 0:
            # The coarse loss is trained: one pass over [coarse tokens + text] gives both the query
            # states and the coarse loss, with gradient through both.
            embeds = torch.cat([coarse, self.embed_text(batch["input_ids"])], dim=1)
            mask = torch.cat([frame_mask.long(), batch["attention_mask"].long()], dim=1)
            hidden = self.run_llm(embeds, mask)
            coarse_hidden = hidden[:, : frame_mask.shape[1]]
            loss_coarse, _ = self.text_loss(hidden, mask, batch["input_ids"], batch["loss_mask"])
        else:
            # Only the states after the visual tokens feed the fine pass, so only they take gradient;
            # the coarse loss is measured without it. The text continues from the visual pass's KV
            # cache, except under gradient checkpointing, which drops the cache of a pass that takes
            # gradient: then the no-grad pass reads the (few) visual tokens again itself.
            checkpointed = self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
            reuse_cache = compute_coarse and not checkpointed
            cache = self._new_cache() if reuse_cache else None
            coarse_hidden = self.run_llm(coarse, frame_mask, cache=cache)
            if compute_coarse:
                with torch.no_grad():
                    if reuse_cache:
                        text_embeds = self.embed_text(batch["input_ids"])
                        mask = torch.cat([frame_mask.long(), batch["attention_mask"].long()], dim=1)
                        text_hidden = self.run_llm(text_embeds, mask, cache=cache)
                        hidden = torch.cat([coarse_hidden.detach(), text_hidden], dim=1)
                        loss_coarse, _ = self.text_loss(hidden, mask, batch["input_ids"], batch["loss_mask"])
                    else:
                        loss_coarse, _ = self.loss_over(coarse.detach(), frame_mask, batch)
        fine, fine_attn = self._fine(prepared, coarse_hidden, frame_mask)
        loss_fine, n = self.loss_over(fine, frame_mask, batch)
        # With lam > 0 the coarse loss was computed above, with its gradient.
        loss = loss_fine + lam * loss_coarse if lam > 0 and loss_coarse is not None else loss_fine
        attn = {"coarse": coarse_attn, "fine": fine_attn}
        return self._output(loss, n, loss_fine, loss_coarse, attn, return_attention)

    def _fine(
        self, prepared: Prepared, coarse_hidden: torch.Tensor, frame_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fine read of every frame at once, each with the query from the LLM's state after the
        previous coarse token: (fine tokens [B, T, D_llm], attention [B, T, layers, heads, 1 + P])."""
        cache, kv = prepared
        tokens, weights = self._read(cache, kv, self._next_queries(coarse_hidden, frame_mask))
        return self._scatter(tokens, frame_mask), self._scatter(weights, frame_mask)

    def _autoregressive(
        self, batch: Batch, prepared: Prepared, return_attention: bool, use_cache: bool = True
    ) -> VLMOutput:
        fine, weights = self._sequential_fine(batch["frame_mask"], prepared, use_cache)
        loss, n = self.loss_over(fine, batch["frame_mask"], batch)
        return self._output(loss, n, loss, None, {"fine": weights}, return_attention)

    def _sequential_fine(
        self, frame_mask: torch.Tensor, prepared: Prepared, use_cache: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame by frame: each fine token is read with the query from the LLM's state after the
        previous fine token (not from a coarse pass), as at inference on a stream.
        Returns (fine tokens [B, T, D_llm], attention [B, T, layers, heads, 1 + P])."""
        b, t = frame_mask.shape
        cache, kv = prepared
        frame_index = torch.zeros_like(frame_mask, dtype=torch.long)
        frame_index[frame_mask] = torch.arange(int(frame_mask.sum()), device=frame_mask.device)
        llm_cache = self._new_cache() if use_cache else None
        query = self.q_init.expand(b, -1)
        tokens: list[torch.Tensor] = []
        weights_all: list[torch.Tensor] = []
        for step in range(t):
            valid = frame_mask[:, step]
            rows = frame_index[valid, step]
            kv_rows = None if kv is None else (kv[0][rows], kv[1][rows])
            token_rows, weight_rows = self._read(cache.select(rows), kv_rows, query[valid])
            tokens.append(self._scatter(token_rows, valid))
            weights_all.append(self._scatter(weight_rows, valid))
            mask = frame_mask[:, : step + 1]
            if use_cache:
                hidden = self.run_llm(tokens[-1][:, None], mask, cache=llm_cache)[:, -1]
            else:
                hidden = self.run_llm(torch.stack(tokens, dim=1), mask)[:, -1]
            query = torch.where(valid[:, None], self.llm_to_query(hidden), query)
        return torch.stack(tokens, dim=1), torch.stack(weights_all, dim=1)

    @property
    def supported_modes(self) -> tuple[str, ...]:
        return ("coarse_only",) if self.cfg.coarse_only else MODES

    def visual_tokens(self, batch: Batch, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The visual block a mode feeds the LLM (for generation and evaluation)."""
        tokens, mask, _ = self.visual_blocks(batch, (mode,))[mode]
        return tokens, mask

    def visual_blocks(self, batch: Batch, modes: tuple[str, ...]) -> dict[str, VisualBlock]:
        """Every requested mode's visual block from ONE DINO pass (evaluation compares modes on the same
        samples): {mode: (tokens [B, T, D_llm], frame_mask, attention {"coarse"|"fine": [B, T, layers,
        heads, 1 + P]})}. coarse_only and coarse_fine share the coarse read."""
        _check_modes(self, modes)
        frame_mask = batch["frame_mask"]
        if int(frame_mask.sum()) == 0:
            empty = batch["frames"].new_zeros(*frame_mask.shape, self.llm_dim)
            return {mode: (empty, frame_mask, {}) for mode in modes}
        prepared = self._prepare(batch["frames"], frame_mask)
        blocks: dict[str, VisualBlock] = {}
        if "coarse_only" in modes or "coarse_fine" in modes:
            coarse, coarse_attn = self._coarse(prepared, frame_mask)
        for mode in modes:
            if mode == "coarse_only":
                blocks[mode] = (coarse, frame_mask, {"coarse": coarse_attn})
            elif mode == "coarse_fine":
                fine, fine_attn = self._fine(prepared, self.run_llm(coarse, frame_mask), frame_mask)
                blocks[mode] = (fine, frame_mask, {"coarse": coarse_attn, "fine": fine_attn})
            else:
                tokens, weights = self._sequential_fine(frame_mask, prepared)
                blocks[mode] = (tokens, frame_mask, {"fine": weights})
        return blocks

    def _text_only(self, batch: Batch) -> VLMOutput:
        b = batch["input_ids"].shape[0]
        empty = self.q_static.new_zeros(b, 0, self.llm_dim)
        loss, n = self.loss_over(empty, batch["frame_mask"][:, :0], batch)
        # Keep the vision-side parameters in the graph so every DDP rank uses the same parameter set.
        groups = self.param_groups()
        loss = loss + 0.0 * sum(p.sum() for p in groups["connector"] + groups["dino"])
        fine = None if self.cfg.coarse_only else loss
        return VLMOutput(loss=loss, n_tokens=n, loss_fine=fine, loss_coarse=loss.detach())

    def _output(
        self,
        loss: torch.Tensor,
        n: int,
        loss_fine: torch.Tensor | None,
        loss_coarse: torch.Tensor | None,
        attn: dict[str, torch.Tensor],
        return_attention: bool,
    ) -> VLMOutput:
        key = "fine" if "fine" in attn else "coarse"
        return VLMOutput(
            loss=loss,
            n_tokens=n,
            loss_fine=None if loss_fine is None else loss_fine.detach(),
            loss_coarse=None if loss_coarse is None else loss_coarse.detach(),
            entropy_weights=attn[key].detach(),
            attention={k: v.detach() for k, v in attn.items()} if return_attention else {},
        )


def _check_modes(model: VLMBase, modes: tuple[str, ...]) -> None:
    for mode in modes:
        if mode not in model.supported_modes:
            raise ValueError(f"mode {mode!r} is not available for this model (available: {model.supported_modes})")


def _left_align(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moves each row's padding to the front, so every prompt ends at the last column."""
    length = ids.shape[1]
    shift = length - mask.sum(dim=1, keepdim=True)
    index = (torch.arange(length, device=ids.device) - shift) % length
    return ids.gather(1, index), mask.gather(1, index)


def _masked_entropy(weights: torch.Tensor) -> float | None:
    """Mean entropy over real frames (padded frames have all-zero rows and are excluded)."""
    real = weights.detach().sum(-1) > 0
    if not bool(real.any()):
        return None
    return float(attention_entropy(weights.detach()[real]))
