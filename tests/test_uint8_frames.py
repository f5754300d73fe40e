"""Frames as uint8 pixels, normalised by the model on its device: the same numbers as the host's
normalisation, in every architecture and mode, compiled as one graph, through the training loader's
collate and through the evaluation readers (grey frames, attention pictures)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_same_grads_then_clear, eager_and_compiled

from fvlm.config import load_config
from fvlm.data.decode import grey_frames, normalise_into, uint8_pixels
from fvlm.data.loader import collate
from fvlm.eval.evaluate import sample_losses
from fvlm.eval.looks import to_uint8
from fvlm.model.backbones import IMAGENET, PixelStats, model_pixel_stats
from fvlm.model.batch_index import build_indices
from fvlm.model.build import build_model
from fvlm.model.encoder import normalise_pixels

S = 64  # tiny image size; DINO patch 8
OTHER = PixelStats((0.5, 0.25, 0.75), (0.2, 0.3, 0.1))  # a DINO folder's own statistics


def tiny(*overrides):
    torch.manual_seed(0)
    model = build_model(load_config(None, list(overrides)).model)
    model.eval()
    return model


def pixels(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Random uint8 RGB [..., 3, S, S], with the extremes 0 and 255 present."""
    x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if x.numel() >= 2:
        x.view(-1)[:2] = torch.tensor([0, 255], dtype=torch.uint8)
    return x


def host_normalised(raw: torch.Tensor, frame_mask: torch.Tensor, stats: PixelStats = IMAGENET) -> torch.Tensor:
    """What the loader's collate made before frames travelled as uint8: valid frames normalised on
    the host, padding frames zero."""
    out = torch.zeros(raw.shape, dtype=torch.float32)
    for b in range(raw.shape[0]):
        t = int(frame_mask[b].sum())
        normalise_into(out[b, :t], raw[b, :t].permute(0, 2, 3, 1).numpy(), stats)
    return out


def batch_pair(b=2, t=4, length=12, valid=(4, 2), seed=0, indices=True):
    """The same batch twice: uint8 frames (padding zero) and host-normalised float frames."""
    g = torch.Generator().manual_seed(seed)
    frame_mask = torch.arange(t)[None, :] < torch.tensor(valid)[:, None]
    raw = pixels(g, b, t, 3, S, S) * frame_mask[:, :, None, None, None]
    attention_mask = torch.ones(b, length, dtype=torch.long)
    attention_mask[-1, length - 3 :] = 0
    batch = {
        "frame_mask": frame_mask,
        "input_ids": torch.randint(4, 260, (b, length), generator=g),
        "attention_mask": attention_mask,
        "loss_mask": attention_mask.bool(),
    }
    if indices:
        batch.update(build_indices(frame_mask, batch["loss_mask"]))
    return {**batch, "frames": raw}, {**batch, "frames": host_normalised(raw, frame_mask)}


@pytest.mark.parametrize("stats", [IMAGENET, OTHER])
def test_device_normalisation_gives_the_hosts_bits(stats):
    raw = pixels(torch.Generator().manual_seed(1), 5, 3, 16, 16)
    host = torch.empty(5, 3, 16, 16)
    normalise_into(host, raw.permute(0, 2, 3, 1).numpy(), stats)
    device = normalise_pixels(raw, stats, torch.float32)
    assert device.dtype == torch.float32 and torch.equal(device, host)
    # In bf16: the host's fp32 values rounded once, as DINO's patch embedding casts them.
    assert torch.equal(normalise_pixels(raw, stats, torch.bfloat16), host.to(torch.bfloat16))
    # Leading dimensions are free: a whole [B, T, 3, H, W] batch at once.
    assert torch.equal(normalise_pixels(raw.view(1, 5, 3, 16, 16), stats, torch.float32)[0], host)


@pytest.mark.parametrize(
    "overrides, modes",
    [
        ([], ("coarse_fine", "coarse_only", "autoregressive")),
        (["model.deep_query=false"], ("coarse_fine",)),
        (["model.arch=multi_token"], ("coarse_only",)),
        (["model.coarse_only=true"], ("coarse_only",)),
    ],
)
def test_uint8_frames_give_the_losses_of_host_normalised_frames(overrides, modes):
    model = tiny(*overrides)
    for indices in (True, False):  # the loader's host-built indices, or none (the model finds them)
        raw, normalised = batch_pair(indices=indices)
        for mode in modes:
            a, b = model(raw, mode=mode), model(normalised, mode=mode)
            assert a.n_tokens == b.n_tokens > 0
            torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=0)
            if b.loss_coarse is not None:
                torch.testing.assert_close(a.loss_coarse, b.loss_coarse, rtol=1e-6, atol=0)


@pytest.mark.parametrize("overrides", [[], ["model.arch=multi_token"]])
def test_text_only_and_mixed_uint8_batches(overrides):
    model = tiny(*overrides)
    for valid in ((0, 0), (3, 0)):
        raw, normalised = batch_pair(valid=valid)
        a, b = model(raw), model(normalised)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=0)
    raw, normalised = batch_pair(t=0, valid=(0, 0))  # no frame slot at all
    torch.testing.assert_close(model(raw).loss, model(normalised).loss, rtol=1e-6, atol=0)


def test_uint8_frames_in_a_bf16_model_equal_host_frames_cast_by_dino():
    model = tiny().to(torch.bfloat16)
    raw, normalised = batch_pair()
    for mode in ("coarse_fine", "coarse_only"):
        assert torch.equal(model(raw, mode=mode).loss, model(normalised, mode=mode).loss)


def test_a_folders_statistics_normalise_uint8_frames_on_the_device(tmp_path):
    """A model whose DINO carries other statistics than ImageNet's uses them for uint8 frames."""
    model = tiny()
    model.encoder.pixel_stats = OTHER  # what a DINO folder's preprocessor_config.json sets at build
    raw, _ = batch_pair()
    normalised = {**raw, "frames": host_normalised(raw["frames"], raw["frame_mask"], OTHER)}
    torch.testing.assert_close(model(raw).loss, model(normalised).loss, rtol=1e-6, atol=0)
    imagenet = {**raw, "frames": host_normalised(raw["frames"], raw["frame_mask"], IMAGENET)}
    assert not torch.allclose(model(raw).loss, model(imagenet).loss, rtol=1e-4)


def test_a_compiled_step_on_uint8_frames_is_one_graph_and_equals_eager():
    """The normalisation adds nothing data-dependent: one graph for every step (as with float frames),
    and the losses and gradients of eager float frames."""
    eager, compiled, graphs = eager_and_compiled(tiny().train())
    per_step = []
    for step in range(3):
        raw, normalised = batch_pair(seed=step, valid=((4, 2), (3, 3), (4, 1))[step])
        outs = [eager(normalised), compiled(raw)]
        for out in outs:
            out.loss.backward()
        per_step.append(len(graphs))
        torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-6, atol=0)
        assert_same_grads_then_clear(eager, compiled)
    torch._dynamo.reset()
    assert per_step == [1, 1, 1], per_step


def sample(g: np.random.Generator, frames: int, text: int, key: str) -> dict:
    return {
        "frames": g.integers(0, 256, (frames, S, S, 3), dtype=np.uint8),
        "ids": [int(v) for v in g.integers(4, 260, text)],
        "mask": [i >= 2 for i in range(text)],
        "key": key,
        "source": "s",
        "kind": "video" if frames > 1 else "image" if frames else "text",
    }


def test_the_training_collate_sends_uint8_that_the_model_reads_as_the_float_collate():
    g = np.random.default_rng(0)
    samples = [sample(g, 3, 9, "a"), sample(g, 1, 12, "b"), sample(g, 0, 6, "c")]
    raw = collate(samples, pad_id=0, raw_frames=True)
    host = collate(samples, pad_id=0)
    assert raw["frames"].dtype == torch.uint8 and host["frames"].dtype == torch.float32
    assert raw["frames"].shape == host["frames"].shape == (3, 3, 3, S, S)
    assert torch.equal(raw["frames"][0], torch.from_numpy(samples[0]["frames"]).permute(0, 3, 1, 2))
    assert not raw["frames"][~raw["frame_mask"]].any()  # padding frames are zero
    assert raw["frames"].nbytes * 4 == host["frames"].nbytes
    for key in ("frame_mask", "input_ids", "attention_mask", "loss_mask", "frame_rows", "target_rows"):
        assert torch.equal(raw[key], host[key]), key
    model = tiny()
    for mode in ("coarse_fine", "coarse_only"):
        torch.testing.assert_close(model(raw, mode=mode).loss, model(host, mode=mode).loss, rtol=1e-6, atol=0)


def test_grey_frames_and_pictures_of_a_uint8_batch_are_those_of_its_float_batch():
    """Evaluation readers given a uint8 batch: the grey-frame control is still flat grey in the model's
    input (the normalised mean, not black), and the pictures show the same pixels."""
    model = tiny()
    raw, normalised = batch_pair()
    grey = grey_frames(raw["frames"])
    assert grey.dtype == torch.float32 and torch.equal(grey, torch.zeros_like(normalised["frames"]))
    a = sample_losses(model, [raw], ("coarse_fine", "coarse_only"))
    b = sample_losses(model, [normalised], ("coarse_fine", "coarse_only"))
    for mode in ("coarse_fine", "coarse_only"):
        assert np.array_equal(a["modes"][mode]["tokens"], b["modes"][mode]["tokens"])
        for name in ("loss_sum", "loss_sum_blank"):
            np.testing.assert_allclose(a["modes"][mode][name], b["modes"][mode][name], rtol=1e-6)
    stats = model_pixel_stats(model)
    valid = raw["frame_mask"].numpy()  # padding frames are black in one and grey in the other: never drawn
    drawn = to_uint8(raw["frames"], stats)
    assert drawn.dtype == np.uint8 and np.array_equal(drawn[valid], to_uint8(normalised["frames"], stats)[valid])
    channels_last = normalised["frames"].movedim(-3, -1).numpy()
    assert np.array_equal(uint8_pixels(channels_last, stats)[valid], drawn[valid])
    assert uint8_pixels(drawn, stats) is drawn
