"""Which sample sits at each position of the training stream, as a pure function of the seed.

Position i draws a source from a seeded categorical (mix weights and the text-only share are
probabilities, so the realised mix matches the requested one within sampling error), then takes
that source's next sample from its own permutation; each pass over a source is re-shuffled with
(seed, source, epoch). Draws are generated in fixed blocks of BLOCK positions from a generator
seeded with (seed, block), so any position can be reached without replaying earlier randomness,
and the result depends on nothing but the seed and the index: not on workers, ranks or restarts.
"""

from __future__ import annotations

import numpy as np

from fvlm.data.index import KINDS, DataIndex
from fvlm.errors import UsageError

BLOCK = 4096


def source_probabilities(index: DataIndex, mix: dict[str, float], text_ratio: float) -> dict[str, float]:
    """P(source) for each draw.

    Weights come from `data.mix` (keys are source names, or the kinds video/image/text standing for
    every source of that kind), else from the mix file, else from source sizes. Text-only sources
    then share `text_ratio` of the stream among themselves, the others share the rest; a mix that
    states a different text-only share itself is an error rather than silently overruled.
    """
    sizes = {s: int((index.source_id == i).sum()) for i, s in enumerate(index.sources)}
    sizes = {s: n for s, n in sizes.items() if n}
    if not sizes:
        raise UsageError("data: no usable samples (every sample was skipped; run `fvlm data inspect`)")
    kind_of = {s: KINDS[int(index.kind_id[index.source_id == index.sources.index(s)][0])] for s in sizes}
    is_text = {
        s: bool(np.all(index.kind_id[index.source_id == index.sources.index(s)] == KINDS.index("text"))) for s in sizes
    }
    if mix:
        for key in mix:
            if key not in sizes and key not in KINDS:
                raise UsageError(f"data.mix.{key}: no such source (sources: {', '.join(sorted(sizes))})")
        weights = {}
        for s in sizes:
            if s in mix:
                weights[s] = mix[s]
            elif kind_of[s] in mix:
                same_kind = [t for t in sizes if kind_of[t] == kind_of[s] and t not in mix]
                weights[s] = mix[kind_of[s]] * sizes[s] / sum(sizes[t] for t in same_kind)
            else:
                weights[s] = 0.0
    elif any(w is not None for w in index.weights.values()):
        weights = {s: index.weights.get(s) or 0.0 for s in sizes}
    else:
        weights = {s: float(n) for s, n in sizes.items()}
    text_w = sum(w for s, w in weights.items() if is_text[s])
    other_w = sum(w for s, w in weights.items() if not is_text[s])
    if text_w > 0 and other_w > 0 and (mix or any(w is not None for w in index.weights.values())):
        stated = text_w / (text_w + other_w)
        if abs(stated - text_ratio) > 1e-6:
            raise UsageError(
                f"data.mix gives text-only sources a share of {stated:.4g} but data.text_ratio is {text_ratio:.4g}; "
                f"set data.text_ratio={stated:.4g} or leave text-only sources out of the mix"
            )
    if text_w == 0 or other_w == 0:
        total = text_w + other_w
        if total <= 0:
            raise UsageError("data.mix gives every available source weight 0")
        return {s: w / total for s, w in weights.items() if w > 0}
    return {
        s: (text_ratio * w / text_w if is_text[s] else (1 - text_ratio) * w / other_w)
        for s, w in weights.items()
        if w > 0 and (text_ratio if is_text[s] else 1 - text_ratio) > 0
    }


class TrainSchedule:
    """Maps stream positions to index rows; see the module docstring."""

    def __init__(self, index: DataIndex, probabilities: dict[str, float], seed: int):
        self.seed = seed
        self.names = sorted(probabilities)
        self.cdf = np.cumsum([probabilities[s] for s in self.names])
        self.cdf[-1] = 1.0
        self.rows = [index.rows_of_source(s) for s in self.names]
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self._block_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # Per-source draws before each block: a prefix sum kept so that any position is reachable.
        self._counts_before = [np.zeros(len(self.names), dtype=np.int64)]

    def _choices(self, block: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 0x5EED, block])
        return np.searchsorted(self.cdf, rng.random(BLOCK), side="right")

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(source per position, per-source draw number counted from the stream start) for a block."""
        if block not in self._block_cache:
            while len(self._counts_before) <= block:
                last = len(self._counts_before) - 1
                self._counts_before.append(
                    self._counts_before[last] + np.bincount(self._choices(last), minlength=len(self.names))
                )
            src = self._choices(block)
            draw = np.empty(BLOCK, dtype=np.int64)
            for s in range(len(self.names)):
                hits = src == s
                draw[hits] = self._counts_before[block][s] + np.arange(int(hits.sum()))
            if len(self._block_cache) >= 4:
                self._block_cache.pop(next(iter(self._block_cache)))
            self._block_cache[block] = (src, draw)
        return self._block_cache[block]

    def _perm(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 2 * len(self.names):
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, 0xE90C, s, epoch])
            self._perm_cache[key] = self.rows[s][rng.permutation(len(self.rows[s]))]
        return self._perm_cache[key]

    def rows_at(self, start: int, stop: int) -> np.ndarray:
        """Index rows for stream positions [start, stop)."""
        out = np.empty(stop - start, dtype=np.int64)
        pos = start
        while pos < stop:
            block, offset = divmod(pos, BLOCK)
            take = min(BLOCK - offset, stop - pos)
            src, draw = self._block(block)
            for j in range(take):
                s, n = int(src[offset + j]), int(draw[offset + j])
                size = len(self.rows[s])
                out[pos - start + j] = self._perm(s, n // size)[n % size]
            pos += take
        return out
