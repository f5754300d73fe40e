"""DINOv2 as a foveated encoder: patches are encoded once, queries read them cheaply afterwards.

The deep query is one extra token that passes through every DINO layer, attending to that layer's
keys and values of the patch tokens (CLS kept). Because patch tokens never attend to the query, the
patch stream is exactly DINO's own forward pass; its per-layer K/V are cached once per frame, and any
number of queries (the coarse and the fine pass, every autoregressive step) reuse them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fvlm.model.backbones import PixelStats, pixel_affine, pixel_stats
from fvlm.model.fused import linears


@dataclass
class PatchCache:
    """What a query needs from one batch of frames.

    keys/values: per DINO layer, [N, heads, 1 + P, head_dim] (deep query only).
    features: DINO's final normalised tokens [N, 1 + P, D] (CLS first), or None when only the
    deep query reads this cache.
    """

    features: torch.Tensor | None
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    grid: tuple[int, int]

    @property
    def num_frames(self) -> int:
        return (self.features if self.features is not None else self.keys[0]).shape[0]

    def select(self, index: torch.Tensor) -> PatchCache:
        return PatchCache(
            None if self.features is None else self.features[index],
            [k[index] for k in self.keys],
            [v[index] for v in self.values],
            self.grid,
        )


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    n, s, d = x.shape
    return x.view(n, s, heads, d // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    n, h, s, hd = x.shape
    return x.transpose(1, 2).reshape(n, s, h * hd)


def query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One query per frame over its keys; explicit softmax so the weights are free to return.

    q: [N, heads, 1, hd]; k, v: [N, heads, S, hd] -> (out [N, heads, 1, hd], weights [N, heads, S]).
    Without `weights` it is SDPA's one fused call, and the weights are None.
    """
    if not weights:
        return F.scaled_dot_product_attention(q, k, v), None
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    probs = scores.softmax(dim=-1)
    return torch.matmul(probs, v), probs.squeeze(-2)


def normalise_pixels(pixels: torch.Tensor, stats: PixelStats, dtype: torch.dtype) -> torch.Tensor:
    """uint8 RGB [..., 3, H, W] -> frames normalised with `stats`, in `dtype`, on the pixels' device.

    float32 arithmetic with the host's constants (`pixel_affine`), rounded once to `dtype`: the same
    values as frames normalised on the host and cast by DINO's patch embedding."""
    return _affine(pixels, pixel_affine(stats), dtype)


def _affine(
    pixels: torch.Tensor, affine: tuple[tuple[float, ...], tuple[float, ...]], dtype: torch.dtype
) -> torch.Tensor:
    # The constants are Python numbers, not tensors: nothing is copied to the device (no sync), and a
    # compiled graph holds them as constants.
    scale, shift = affine
    x = pixels.to(torch.float32)
    return torch.stack([x.select(-3, c) * scale[c] - shift[c] for c in range(3)], dim=-3).to(dtype)


def cls_embedding(dino: Any) -> torch.Tensor:
    """DINO's CLS token as it enters the first layer (its embedding plus its position embedding): where
    every query starts under `model.query_init=cls`, so that it first repeats DINO's CLS computation."""
    return (dino.embeddings.cls_token[0, 0] + dino.embeddings.position_embeddings[0, 0]).detach()


class DinoEncoder(nn.Module):
    """Wraps a transformers `Dinov2Model` (5.x layout: norm1, attention.{q,k,v,o}_proj, layer_scale1,
    norm2, mlp, layer_scale2) without changing its weights or parameter names."""

    def __init__(self, dino: Any):
        super().__init__()
        self.dino: Any = dino  # a transformers Dinov2Model: its attributes are not typed through nn.Module
        self.config = dino.config
        self.hidden_size = dino.config.hidden_size
        self.num_heads = dino.config.num_attention_heads
        self.patch_size = dino.config.patch_size
        self.num_layers = dino.config.num_hidden_layers
        # The mean and std its frames are normalised with, read once: `normalise` runs under
        # torch.compile, which should neither trace a transformers config nor numpy.
        self.pixel_stats = pixel_stats(dino.config)
        # Counts patch encodings (frames), so tests and benchmarks can check DINO runs once per frame.
        # Not counted inside torch.compile: dynamo treats a module's int attribute as a constant, and
        # a count that changes every step would recompile the model until dynamo gives up.
        self.frames_encoded = 0

    @property
    def pixel_stats(self) -> PixelStats:
        return self._pixel_stats

    @pixel_stats.setter
    def pixel_stats(self, stats: PixelStats) -> None:
        self._pixel_stats = stats
        self._pixel_affine = pixel_affine(stats)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 RGB [N, 3, H, W] -> normalised frames in the dtype of DINO's patch embedding (the
        model's compute dtype: bf16 weights in bf16 runs; fp32, which autocast then casts, otherwise)."""
        return _affine(pixels, self._pixel_affine, self.dino.embeddings.patch_embeddings.projection.weight.dtype)

    def encode_patches(self, pixels: torch.Tensor, cache_kv: bool = True, need_features: bool = True) -> PatchCache:
        """pixels [N, 3, H, W] -> PatchCache. DINO's own forward, keeping each layer's K/V.

        The deep query needs only K/V, so with need_features=False the last layer stops after
        its K/V projections: the rest of it would only produce features nobody reads.
        """
        if not torch.compiler.is_compiling():
            self.frames_encoded += pixels.shape[0]
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        hidden = self.dino.embeddings(pixels)
        keys, values = [], []
        last = len(self.dino.encoder.layer) - 1
        for index, layer in enumerate(self.dino.encoder.layer):
            attn = layer.attention
            x = layer.norm1(hidden)
            # Keys and values from one matrix product (fvlm/model/fused.py); the queries apart, so
            # that the cached keys and values keep no query columns alive.
            k, v = (_split_heads(t, self.num_heads) for t in linears(x, attn.k_proj, attn.v_proj))
            if cache_kv:
                keys.append(k)
                values.append(v)
            if index == last and not need_features:
                return PatchCache(None, keys, values, grid)
            q = _split_heads(attn.q_proj(x), self.num_heads)
            out = _merge_heads(F.scaled_dot_product_attention(q, k, v))
            hidden = layer.drop_path(layer.layer_scale1(attn.o_proj(out))) + hidden
            hidden = layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(hidden)))) + hidden
        return PatchCache(self.dino.layernorm(hidden), keys, values, grid)

    def deep_query(
        self, cache: PatchCache, query: torch.Tensor, weights: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query [N, D] (already in DINO width) -> (token [N, D], attention [N, layers, heads, 1 + P];
        None without `weights`)."""
        hidden = query.unsqueeze(1)
        weights_per_layer = []
        for layer, k, v in zip(self.dino.encoder.layer, cache.keys, cache.values):
            attn = layer.attention
            q = _split_heads(attn.q_proj(layer.norm1(hidden)), self.num_heads)
            out, layer_weights = query_attention(q, k, v, weights)
            hidden = layer.layer_scale1(attn.o_proj(_merge_heads(out))) + hidden
            hidden = layer.layer_scale2(layer.mlp(layer.norm2(hidden))) + hidden
            if layer_weights is not None:
                weights_per_layer.append(layer_weights)
        token = self.dino.layernorm(hidden).squeeze(1)
        return token, torch.stack(weights_per_layer, dim=1) if weights else None


class ShallowQuery(nn.Module):
    """Ablation A1: one cross-attention from the query to DINO's final features (no layer-by-layer path).
    Its K/V projections of the features are query-independent, so they are computed once per frame."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def project_kv(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _split_heads(self.k(features), self.heads), _split_heads(self.v(features), self.heads)

    def forward(
        self, kv: tuple[torch.Tensor, torch.Tensor], query: torch.Tensor, weights: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = _split_heads(self.q(query.unsqueeze(1)), self.heads)
        out, attention = query_attention(q, *kv, weights=weights)
        return self.o(_merge_heads(out)).squeeze(1), None if attention is None else attention.unsqueeze(1)


def attention_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of attention distributions over their last axis."""
    return -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean()
