"""Evaluation statistics shared by `fvlm eval`, the foveation evidence and the analysis: the
difference of two measurements on the same items (questions, samples) with its 95% intervals, and a
benchmark accuracy's interval when several questions share one video.

Questions about one video are not independent (Video-MME asks 3 per video): a model that misreads
the video tends to miss all of them. Treating them as independent understates the spread, so the
intervals here resample whole videos (clusters) whenever items share one; an item with a cluster of
its own is resampled alone, which is the ordinary paired bootstrap.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Z95 = 1.959964
# Percentile intervals need enough draws in each 2.5% tail: 2,000 leaves 50 there.
N_BOOT = 2000


def _cluster_index(clusters, n: int) -> tuple[np.ndarray, int]:
    """An integer cluster id per item (items without clusters are each their own) and the count."""
    if clusters is None:
        return np.arange(n), n
    labels = list(clusters)
    if len(labels) != n:
        raise ValueError(f"paired_difference: {len(labels)} cluster labels for {n} items")
    ids: dict[Any, int] = {}
    index = np.array([ids.setdefault(label, len(ids)) for label in labels], dtype=np.int64)
    return index, len(ids)


def paired_difference(a, b, weights=None, *, clusters=None, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Difference of two measurements on the same items (questions, samples): mean(a) - mean(b),
    weighted by `weights` when given (e.g. answer tokens per sample, so that the difference is the
    token-weighted one), with two 95% intervals computed from the per-item differences:

    - `ci95`: analytic, d +- 1.96 * se, where se is the standard error of the (weighted) mean of
      the per-item differences (the ratio-estimator form; with equal weights sd(d) / sqrt(n)); with
      `clusters`, the cluster-robust form (residuals summed within a cluster first);
    - `ci95_bootstrap`: percentiles of the same statistic over `n_boot` resamples of the items, or
      with `clusters` (one label per item, e.g. its video) of whole clusters (seeded; the pairs are
      resampled together, so what the two have in common cancels).

    Items with a non-finite value or zero weight are left out. Returns {n, n_clusters, a, b, diff,
    se, ci95, ci95_bootstrap}; the difference of anything with itself is exactly 0 with a zero-width
    interval, and clusters of one item each give exactly the unclustered result."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.shape} and {b.shape} items are not paired")
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64)
    cluster, _ = _cluster_index(clusters, len(a))
    keep = np.isfinite(a) & np.isfinite(b) & np.isfinite(w) & (w > 0)
    a, b, w = a[keep], b[keep], w[keep]
    cluster, n_clusters = _cluster_index(cluster[keep], len(a))
    n = len(a)
    nan = float("nan")
    if n == 0:
        return {
            "n": 0,
            "n_clusters": 0,
            "a": nan,
            "b": nan,
            "diff": nan,
            "se": nan,
            "ci95": [nan, nan],
            "ci95_bootstrap": [nan, nan],
        }
    d = a - b
    total = w.sum()
    diff = float((w * d).sum() / total)
    # Per cluster: the weighted differences and the weights, summed (an item alone is its own sum).
    wd_c = np.bincount(cluster, weights=w * d, minlength=n_clusters)
    w_c = np.bincount(cluster, weights=w, minlength=n_clusters)
    if n_clusters > 1:
        residual = wd_c - diff * w_c
        se = float(math.sqrt(n_clusters / (n_clusters - 1) * float((residual**2).sum())) / total)
    else:
        se = nan
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, n_boot, 500):  # in chunks: [chunk, clusters] index arrays stay small
        idx = rng.integers(0, n_clusters, size=(min(500, n_boot - start), n_clusters))
        chunks.append(wd_c[idx].sum(1) / w_c[idx].sum(1))
    boot = np.concatenate(chunks) if chunks else np.array([diff])
    return {
        "n": n,
        "n_clusters": n_clusters,
        "a": float((w * a).sum() / total),
        "b": float((w * b).sum() / total),
        "diff": diff,
        "se": se,
        "ci95": [diff - Z95 * se, diff + Z95 * se],
        "ci95_bootstrap": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
    }


def shares_clusters(clusters) -> bool:
    """Whether any cluster holds more than one item."""
    labels = list(clusters or [])
    return len(set(labels)) < len(labels)


def clustered_accuracy_interval(correct, clusters, *, n_boot: int = N_BOOT, seed: int = 0) -> list[float]:
    """95% interval of an accuracy whose questions share videos: the percentile interval of the
    mean over resamples of whole videos (`paired_difference` against a zero baseline). One video
    says nothing about how accuracy varies between videos: its interval is all of [0, 1]."""
    correct = np.asarray(correct, dtype=np.float64)
    if len(set(clusters)) < 2:
        return [0.0, 1.0]
    return paired_difference(correct, np.zeros_like(correct), clusters=clusters, n_boot=n_boot, seed=seed)[
        "ci95_bootstrap"
    ]
