"""Attention heatmaps: frame-sized, mass-preserving, rendered from the npz that training writes."""

from __future__ import annotations

import numpy as np
import pytest

from fvlm.analysis.attention_maps import load_attention, patch_map, render_video, upsample_mass
from fvlm.errors import UsageError


def _npz(path, fine=True, size=30, grid=(4, 4)):
    rng = np.random.default_rng(0)
    attn = rng.random((2, 3, 2, 3, 1 + grid[0] * grid[1])).astype(np.float32)
    attn /= attn.sum(-1, keepdims=True)
    arrays = dict(
        coarse_attn=attn,
        frames=rng.integers(0, 255, (2, 3, size, size, 3), dtype=np.uint8),
        frame_mask=np.array([[True, True, False], [True, True, True]]),
        grid=np.array(grid),
        keys=np.array(["a", "b"]),
        step=7,
    )
    if fine:
        arrays["fine_attn"] = attn[..., ::-1].copy()
    np.savez(path, **arrays)
    return attn


@pytest.mark.parametrize("height,width", [(32, 32), (30, 29), (224, 224)])
def test_heatmap_has_frame_size_and_sums_to_patch_mass(tmp_path, height, width):
    attn = _npz(tmp_path / "a.npz")
    patches = patch_map(attn[0, 0], (4, 4))
    mass = attn[0, 0].mean(axis=(0, 1))[1:].sum()
    heat = upsample_mass(patches, height, width)
    assert heat.shape == (height, width)
    assert heat.sum() == pytest.approx(mass, rel=1e-6)
    assert upsample_mass(
        patch_map(attn[0, 0], (4, 4), layer=1, renormalise=True), height, width
    ).sum() == pytest.approx(1.0)


def test_render_writes_png_and_gif(tmp_path):
    _npz(tmp_path / "a.npz")
    record = load_attention(tmp_path / "a.npz")
    png = render_video(record, 0, tmp_path / "v.png", gif_path=tmp_path / "v.gif")
    assert png.stat().st_size > 0 and (tmp_path / "v.gif").stat().st_size > 0
    _npz(tmp_path / "coarse.npz", fine=False)
    assert render_video(load_attention(tmp_path / "coarse.npz"), 1, tmp_path / "c.png", layer=0).is_file()


def test_malformed_npz_names_the_array(tmp_path):
    np.savez(tmp_path / "bad.npz", coarse_attn=np.zeros((1, 1, 1, 1, 5), np.float32))
    with pytest.raises(UsageError, match="missing array 'frames'"):
        load_attention(tmp_path / "bad.npz")
    _npz(tmp_path / "grid.npz", grid=(3, 3))
    np.savez(
        tmp_path / "g2.npz",
        **{k: v for k, v in np.load(tmp_path / "grid.npz").items() if k != "grid"},
        grid=np.array([5, 5]),
    )
    with pytest.raises(UsageError, match="coarse_attn"):
        load_attention(tmp_path / "g2.npz")
