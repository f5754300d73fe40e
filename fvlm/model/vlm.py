"""The foveated VLM and the multi-token baseline.

Sequence layout for the LLM: one block of visual tokens (frames in order; padded frames masked out
of attention) followed by the chat-template text. Positions count real tokens only, so padding a
sample with extra frames changes nothing about it.

Batch contract (from fvlm.data): frames [B, T, 3, S, S], either normalised (float) or raw RGB
(uint8, what the training loader sends: the model normalises the valid ones on the device with its
DINO's mean and std), frame_mask [B, T] (valid frames first), input_ids / attention_mask /
loss_mask [B, L]; loss_mask marks the text tokens that are targets.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from fvlm.config import ModelConfig
from fvlm.model.attention import run_packed, use_packed_sdpa
from fvlm.model.batch_index import FrameIndex, Targets
from fvlm.model.chunked_ce import chunked_cross_entropy
from fvlm.model.encoder import DinoEncoder, PatchCache, ShallowQuery, attention_entropy, cls_embedding
from fvlm.model.fused import fuse_attention, use_torch_rms_norm

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
    # Built by the loader's collate on the host (fvlm.model.batch_index); the model finds them itself
    # when a batch comes without them.
    frame_rows: torch.Tensor
    target_rows: torch.Tensor
    target_cols: torch.Tensor
    target_weight: torch.Tensor
    n_targets: int
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
    # The same count on the device, as the step computed it (n_tokens comes from the host's batch
    # when it says, so that reading it never waits for the device).
    target_count: torch.Tensor | None = None
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
        # Uncached passes pack each row's real tokens to the front and run without a mask
        # (fvlm/model/attention.py); an eager-attention LLM keeps masked passes.
        self.packed_attention = use_packed_sdpa(llm)
        # Fewer operations per layer over the same weights (fvlm/model/fused.py).
        use_torch_rms_norm(llm)
        fuse_attention(llm)
        self.encoder = DinoEncoder(dino)
        self.llm_dim = llm.config.hidden_size
        self.dino_dim = dino.config.hidden_size
        self.dino_to_llm = nn.Linear(self.dino_dim, self.llm_dim)
        self.visual_scale = cfg.visual_scale
        self.compiled = False  # set by fvlm.model.build.compile_model
        self.cuda_graphs = False  # the compiled step replays CUDA graphs (compile_model)

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

    def forward(
        self, batch: Batch, mode: str | None = None, compute_coarse: bool = True, return_attention: bool = False
    ) -> VLMOutput:
        """The step's losses in a mode. The work is `_forward` (what `train.compile` compiles: it reads
        tensors only); the target count is taken here from the host's batch, or counted (a sync)."""
        if self.compiled:
            mark_dynamic(batch)
        if self.cuda_graphs:
            # A new step: the previous replay's outputs may be overwritten (they were copied below).
            torch.compiler.cudagraph_mark_step_begin()
        out = self._forward(batch, mode, compute_coarse, return_attention)
        if self.cuda_graphs:
            out = _outside_graph_memory(out)
        n = batch.get("n_targets")
        out.n_tokens = int(n) if n is not None else int(out.target_count) if out.target_count is not None else 0
        return out

    def _forward(self, batch: Batch, mode: str | None, compute_coarse: bool, return_attention: bool) -> VLMOutput:
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
    def encode_frames(self, frames: torch.Tensor, index: FrameIndex | torch.Tensor, deep_query: bool) -> PatchCache:
        """DINO over the valid frames only (padded frames cost nothing), in batch-major order. uint8
        frames (raw pixels, as the training loader sends them) are normalised here, valid ones only."""
        valid = _frame_index(index).gather(frames)
        if valid.dtype == torch.uint8:
            valid = self.encoder.normalise(valid)
        context: AbstractContextManager[Any] = (
            nullcontext() if self.dino_trainable and torch.is_grad_enabled() else torch.no_grad()
        )
        with context:
            return self.encoder.encode_patches(valid, cache_kv=deep_query, need_features=not deep_query)

    def _scatter(self, values: torch.Tensor, index: FrameIndex | torch.Tensor) -> torch.Tensor:
        """Valid-frame rows [N, ...] back into a padded [B, T, ...] tensor (zeros for padding)."""
        return _frame_index(index).scatter(values)

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
        if cache is None and position_ids is None and self.packed_attention:
            # The training step's path: no mask, nothing for transformers to read or build.
            return run_packed(self.llm, embeds, mask)
        position_ids = _positions(mask)[:, -embeds.shape[1] :] if position_ids is None else position_ids
        if cache is None:
            # An eager-attention LLM: a 4D mask, so that transformers never reads the mask's values.
            sdpa = self.llm.config._attn_implementation == "sdpa"
            attention = attention_mask_4d(mask, embeds.shape[1], embeds.dtype, sdpa)
        else:
            # Cached passes (generation, the autoregressive mode, a logged step's coarse loss) are not
            # compiled and may sync: transformers builds the mask itself, as the exported model's does.
            attention = mask.long()
        out = self.llm.model(
            inputs_embeds=embeds,
            attention_mask=attention,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    def text_loss(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        per_sample: bool = False,
        targets: Targets | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CE of the text targets given hidden states over [visual block + text]: (mean CE, target count).

        A target's predictor is the nearest real position before it (padded frames are skipped); a
        target without one does not count. Logits are computed for target positions only. `targets`
        (the batch's, built on the host) saves finding them in `loss_mask`, which syncs. With
        `per_sample` it returns, per sample of the batch, (summed CE [B], target count [B]) instead:
        what paired comparisons of two models or two inputs on the same samples need.
        """
        batch, seq = mask.shape
        if targets is None:
            targets = Targets.of_masks(None, loss_mask)
        text_start = seq - input_ids.shape[1]
        arange = torch.arange(seq, device=mask.device).expand(batch, seq)
        last_real = torch.where(mask.bool(), arange, -1).cummax(dim=1).values
        prev_real = torch.cat([last_real.new_full((batch, 1), -1), last_real[:, :-1]], dim=1)
        rows, cols = targets.rows, targets.cols
        predictor_at = prev_real[rows, cols + text_start]
        weight = targets.weight * (predictor_at >= 0)
        predictors = hidden[rows, predictor_at.clamp_min(0)]
        labels = input_ids[rows, cols]
        if self.cfg.ce_chunk > 0:
            head = self.llm.lm_head
            ce = chunked_cross_entropy(predictors, head.weight, head.bias, labels, self.cfg.ce_chunk)
        else:
            ce = F.cross_entropy(self.llm.lm_head(predictors).float(), labels, reduction="none")
        losses = ce * weight
        if per_sample:
            counts = weight.new_zeros(batch).index_add_(0, rows, weight).round().long()
            return losses.new_zeros(batch).index_add_(0, rows, losses), counts
        # No branch on the count: under torch.compile a branch on data splits the graph. With no
        # targets the sum is 0 and the loss 0.0, still connected to the weights.
        n = weight.sum()
        return losses.sum() / n.clamp_min(1), n

    def loss_over(
        self, visual: torch.Tensor, visual_mask: torch.Tensor, batch: Batch, per_sample: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """text_loss of the batch's text after a visual block (per sample with `per_sample`)."""
        embeds = torch.cat([visual, self.embed_text(batch["input_ids"])], dim=1)
        mask = torch.cat([visual_mask.long(), batch["attention_mask"].long()], dim=1)
        hidden = self.run_llm(embeds, mask)
        return self.text_loss(
            hidden, mask, batch["input_ids"], batch["loss_mask"], per_sample=per_sample, targets=_targets(batch)
        )

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
        index = batch_frames(batch)
        if index.empty:
            empty = frames.new_zeros(b, t * per_frame, self.llm_dim)
            return empty, frame_mask.repeat_interleave(per_frame, dim=1)
        cache = self.encode_frames(frames, index, deep_query=False)
        assert cache.features is not None  # encoded for features (no deep query)
        patches = cache.features[:, 1:]
        grid = patches.transpose(1, 2).reshape(patches.shape[0], self.dino_dim, *cache.grid)
        pooled = F.adaptive_avg_pool2d(grid, self.k).flatten(2).transpose(1, 2)
        tokens = self._scatter(self.project(pooled), index)
        return tokens.reshape(b, t * per_frame, self.llm_dim), frame_mask.repeat_interleave(per_frame, dim=1)

    supported_modes = ("coarse_only",)

    def visual_blocks(self, batch: Batch, modes: tuple[str, ...]) -> dict[str, VisualBlock]:
        """Same contract as FoveatedVLM.visual_blocks; the pooled grid has no query, hence no attention."""
        _check_modes(self, modes)
        tokens, mask = self.visual_tokens(batch)
        return {mode: (tokens, mask, {}) for mode in modes}

    def _forward(self, batch: Batch, mode: str | None, compute_coarse: bool, return_attention: bool) -> VLMOutput:
        visual, visual_mask = self.visual_tokens(batch)
        loss, n = self.loss_over(visual, visual_mask, batch)
        return VLMOutput(loss=loss, n_tokens=0, target_count=n, loss_coarse=loss.detach())


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
    def _prepare(self, frames: torch.Tensor, index: FrameIndex | torch.Tensor) -> Prepared:
        cache = self.encode_frames(frames, index, deep_query=self.cfg.deep_query)
        kv = None
        if self.shallow is not None:
            assert cache.features is not None  # encoded for features (the shallow query has no deep cache)
            kv = self.shallow.project_kv(cache.features)
        return cache, kv

    def _read(
        self, cache: PatchCache, kv: KV | None, queries: torch.Tensor, weights: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """queries [N, query_dim] for the N frames of `cache` -> (LLM tokens [N, D_llm], attention;
        None without `weights`: then each read is one fused attention call)."""
        q = self.query_proj(queries)
        if self.shallow is None:
            token, attention = self.encoder.deep_query(cache, q, weights)
        else:
            assert kv is not None  # `_prepare` projects the keys and values for the shallow query
            token, attention = self.shallow(kv, q, weights)
        return self.project(token), attention

    def _coarse(
        self, prepared: Prepared, index: FrameIndex | torch.Tensor, weights: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        index = _frame_index(index)
        cache, kv = prepared
        tokens, attention = self._read(cache, kv, self.q_static.expand(cache.num_frames, -1), weights)
        return self._scatter(tokens, index), None if attention is None else self._scatter(attention, index)

    def _next_queries(self, hidden: torch.Tensor, index: FrameIndex | torch.Tensor) -> torch.Tensor:
        """Query for frame t from the hidden state after frame t-1; frame 0 uses q_init."""
        index = _frame_index(index)
        b = hidden.shape[0]
        from_llm = self.llm_to_query(hidden[:, :-1])
        first = self.q_init.expand(b, 1, -1)
        return index.gather(torch.cat([first, from_llm], dim=1))

    # ------------------------------------------------------------------ the three modes
    def _forward(self, batch: Batch, mode: str | None, compute_coarse: bool, return_attention: bool) -> VLMOutput:
        mode = mode or self.default_mode
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if mode != "coarse_only" and self.cfg.coarse_only:
            raise ValueError(f"a model trained coarse-only has no fine pass (mode {mode!r})")
        index = batch_frames(batch)
        if index.empty:
            return self._text_only(batch)
        prepared = self._prepare(batch["frames"], index)
        # The query's attention weights are read by evaluation (the entropy) and the attention
        # pictures, never by a training step: there each read is one fused attention call instead.
        weights = return_attention or not (self.training and torch.is_grad_enabled())
        if mode == "coarse_only":
            coarse, coarse_attn = self._coarse(prepared, index, weights)
            loss, n = self.loss_over(coarse, index.mask, batch)
            return self._output(loss, n, None, loss, {"coarse": coarse_attn}, return_attention)
        if mode == "autoregressive":
            return self._autoregressive(batch, prepared, return_attention)
        return self._coarse_fine(batch, prepared, index, compute_coarse, return_attention, weights)

    def _coarse_fine(
        self,
        batch: Batch,
        prepared: Prepared,
        index: FrameIndex,
        compute_coarse: bool,
        return_attention: bool,
        weights: bool = True,
    ) -> VLMOutput:
        frame_mask = index.mask
        targets = _targets(batch)
        coarse, coarse_attn = self._coarse(prepared, index, weights)
        lam = self.cfg.lambda_coarse
        loss_coarse: torch.Tensor | None = None
        if lam > 0:
            # The coarse loss is trained: one pass over [coarse tokens + text] gives both the query
            # states and the coarse loss, with gradient through both.
            embeds = torch.cat([coarse, self.embed_text(batch["input_ids"])], dim=1)
            mask = torch.cat([frame_mask.long(), batch["attention_mask"].long()], dim=1)
            hidden = self.run_llm(embeds, mask)
            coarse_hidden = hidden[:, : frame_mask.shape[1]]
            loss_coarse, _ = self.text_loss(hidden, mask, batch["input_ids"], batch["loss_mask"], targets=targets)
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
                        loss_coarse, _ = self.text_loss(
                            hidden, mask, batch["input_ids"], batch["loss_mask"], targets=targets
                        )
                    else:
                        loss_coarse, _ = self.loss_over(coarse.detach(), frame_mask, batch)
        fine, fine_attn = self._fine(prepared, coarse_hidden, index, weights)
        loss_fine, n = self.loss_over(fine, frame_mask, batch)
        # With lam > 0 the coarse loss was computed above, with its gradient.
        loss = loss_fine + lam * loss_coarse if lam > 0 and loss_coarse is not None else loss_fine
        attn = {"coarse": coarse_attn, "fine": fine_attn}
        return self._output(loss, n, loss_fine, loss_coarse, attn, return_attention)

    def _fine(
        self, prepared: Prepared, coarse_hidden: torch.Tensor, index: FrameIndex | torch.Tensor, weights: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fine read of every frame at once, each with the query from the LLM's state after the
        previous coarse token: (fine tokens [B, T, D_llm], attention [B, T, layers, heads, 1 + P] or
        None without `weights`)."""
        index = _frame_index(index)
        cache, kv = prepared
        tokens, attention = self._read(cache, kv, self._next_queries(coarse_hidden, index), weights)
        return self._scatter(tokens, index), None if attention is None else self._scatter(attention, index)

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
        frame_index = FrameIndex.of(frame_mask, frame_mask.new_zeros(0, dtype=torch.long)).slot
        llm_cache = self._new_cache() if use_cache else None
        query = self.q_init.expand(b, -1)
        tokens: list[torch.Tensor] = []
        weights_all: list[torch.Tensor] = []
        for step in range(t):
            valid = frame_mask[:, step]
            rows = frame_index[valid, step]
            kv_rows = None if kv is None else (kv[0][rows], kv[1][rows])
            token_rows, weight_rows = self._read(cache.select(rows), kv_rows, query[valid])
            tokens.append(self._scatter(token_rows, valid[:, None])[:, 0])
            weights_all.append(self._scatter(_asked(weight_rows), valid[:, None])[:, 0])
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
        index = batch_frames(batch)
        frame_mask = index.mask
        if index.empty:
            empty = batch["frames"].new_zeros(*frame_mask.shape, self.llm_dim)
            return {mode: (empty, frame_mask, {}) for mode in modes}
        prepared = self._prepare(batch["frames"], index)
        blocks: dict[str, VisualBlock] = {}
        if "coarse_only" in modes or "coarse_fine" in modes:
            coarse, coarse_attn = self._coarse(prepared, index)
        for mode in modes:
            if mode == "coarse_only":
                blocks[mode] = (coarse, frame_mask, {"coarse": _asked(coarse_attn)})
            elif mode == "coarse_fine":
                fine, fine_attn = self._fine(prepared, self.run_llm(coarse, frame_mask), index)
                blocks[mode] = (fine, frame_mask, {"coarse": _asked(coarse_attn), "fine": _asked(fine_attn)})
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
        return VLMOutput(loss=loss, n_tokens=0, target_count=n, loss_fine=fine, loss_coarse=loss.detach())

    def _output(
        self,
        loss: torch.Tensor,
        n: torch.Tensor,
        loss_fine: torch.Tensor | None,
        loss_coarse: torch.Tensor | None,
        attn: dict[str, torch.Tensor | None],
        return_attention: bool,
    ) -> VLMOutput:
        kept = {k: v.detach() for k, v in attn.items() if v is not None}
        key = "fine" if "fine" in kept else "coarse"
        return VLMOutput(
            loss=loss,
            n_tokens=0,
            target_count=n,
            loss_fine=None if loss_fine is None else loss_fine.detach(),
            loss_coarse=None if loss_coarse is None else loss_coarse.detach(),
            entropy_weights=kept.get(key),
            attention=kept if return_attention else {},
        )


def batch_frames(batch: Batch) -> FrameIndex:
    """The batch's frame index: from its host-built `frame_rows`, or found from its mask (a sync)."""
    return FrameIndex.of(batch["frame_mask"], batch.get("frame_rows"))


# The sizes that change between batches: frames encoded, targets, text length, and frames per
# sample (marked from the first batch on; left to dynamo, the first count got a graph of its own).
_DYNAMIC = (
    ("frame_rows", 0), ("target_rows", 0), ("target_cols", 0), ("target_weight", 0),
    ("input_ids", 1), ("attention_mask", 1), ("loss_mask", 1),
    ("frames", 1), ("frame_mask", 1),
)  # fmt: skip


def mark_dynamic(batch: Batch) -> None:
    """Tells torch.compile that these sizes vary, so that it compiles one graph for all of them rather
    than one per size (a flag on the tensor)."""
    import torch._dynamo

    if "frame_rows" not in batch:
        return
    for key, dim in _DYNAMIC:
        tensor = batch.get(key)
        if isinstance(tensor, torch.Tensor) and tensor.shape[dim] > 1:
            torch._dynamo.maybe_mark_dynamic(tensor, dim)


def _outside_graph_memory(out: VLMOutput) -> VLMOutput:
    """The step's outputs copied out of the CUDA graph's memory, which the next replay reuses (a clone
    keeps the loss differentiable: its backward runs through the captured one)."""

    def copy(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.clone()

    return VLMOutput(
        loss=out.loss.clone(),
        n_tokens=out.n_tokens,
        target_count=copy(out.target_count),
        loss_fine=copy(out.loss_fine),
        loss_coarse=copy(out.loss_coarse),
        entropy_weights=copy(out.entropy_weights),
        attention={key: value.clone() for key, value in out.attention.items()},
    )


def _asked(weights: torch.Tensor | None) -> torch.Tensor:
    """Attention weights a read was asked for (reads return them unless told not to)."""
    assert weights is not None
    return weights


def _frame_index(index: FrameIndex | torch.Tensor) -> FrameIndex:
    return index if isinstance(index, FrameIndex) else FrameIndex.of(index)


def _targets(batch: Batch) -> Targets | None:
    """The batch's host-built loss targets; None when it has none (text_loss then finds them)."""
    if "target_rows" not in batch:
        return None
    return Targets(batch["target_rows"], batch["target_cols"], batch["target_weight"])


def attention_mask_4d(mask: torch.Tensor, q_len: int, dtype: torch.dtype, boolean: bool) -> torch.Tensor:
    """[B, 1, q_len, K] from the 2D mask of real positions [B, K], the queries being the last q_len
    positions: causal, and no real query sees a padded key. Given 4D, transformers uses it as it is,
    so it never reads the 2D mask's values to decide whether it could skip the mask (a sync per pass).
    A query with no key to see (a padded slot before any real one; nothing reads its output) sees
    every key instead, so that softmax has something to normalise. `boolean` for SDPA; otherwise
    additive, in `dtype`, as the eager attention adds it to its scores."""
    k_len = mask.shape[1]
    keys = torch.arange(k_len, device=mask.device)
    queries = keys[k_len - q_len :]
    allowed = (keys[None, :] <= queries[:, None])[None, None] & mask.bool()[:, None, None, :]
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    if boolean:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


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
