"""DINOv2 from a local folder in facebook/dinov2-small's layout: weights checked key by key against
the config, and the pixel statistics read from preprocessor_config.json and used wherever frames are
normalised (training batches, evaluation, export)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fvlm.errors import UsageError
from fvlm.model.backbones import (
    IMAGENET,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PixelStats,
    image_preprocessing,
    load_backbone,
    pixel_stats,
)

# facebook/dinov2-small's config.json keys, with tiny sizes.
CONFIG = {
    "architectures": ["Dinov2Model"],
    "attention_probs_dropout_prob": 0.0,
    "drop_path_rate": 0.0,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "hidden_size": 32,
    "image_size": 518,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-06,
    "layerscale_value": 1.0,
    "mlp_ratio": 4,
    "model_type": "dinov2",
    "num_attention_heads": 2,
    "num_channels": 3,
    "num_hidden_layers": 2,
    "patch_size": 14,
    "qkv_bias": True,
    "torch_dtype": "float32",
    "use_swiglu_ffn": False,
}
# facebook/dinov2-small's preprocessor_config.json.
PREPROCESSOR = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}


# transformers 5 names the attention projections q/k/v/o_proj; the released files keep the names
# they were published with, which loading renames.
RELEASED_NAMES = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
}


def _released(name):
    for new, old in RELEASED_NAMES.items():
        name = name.replace(new, old)
    return name


@pytest.fixture()
def dino_folder(tmp_path):
    """Random weights under the released checkpoint's key names (Dinov2Model's, no prefix)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**{k: v for k, v in CONFIG.items() if k != "architectures"}))
    folder = tmp_path / "dinov2-small"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    weights = {_released(k): v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, weights


def test_released_layout_loads_every_weight(dino_folder):
    folder, weights = dino_folder
    assert {
        "embeddings.cls_token",
        "embeddings.mask_token",
        "encoder.layer.0.attention.attention.query.weight",
        "encoder.layer.1.layer_scale2.lambda1",
        "layernorm.weight",
    } <= set(weights)
    model, pretrained = load_backbone(str(folder), "dino")
    assert pretrained
    loaded = {_released(k): v for k, v in model.state_dict().items()}
    assert set(loaded) == set(weights)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    prep = image_preprocessing(str(folder))
    assert prep["mean"] == IMAGENET_MEAN and prep["std"] == IMAGENET_STD and prep["size"] == 224
    assert prep["source"].endswith("preprocessor_config.json")


def _rewrite(folder, change):
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_unexpected_keys_are_one_line_errors(dino_folder):
    folder, _ = dino_folder
    _rewrite(folder, lambda w: w.pop("layernorm.weight"))
    with pytest.raises(UsageError, match=r"1 missing keys \(layernorm.weight\)") as exc:
        load_backbone(str(folder), "dino")
    assert "\n" not in str(exc.value)
    _rewrite(folder, lambda w: w.update({"layernorm.weight": torch.ones(32), "classifier.weight": torch.zeros(3, 64)}))
    with pytest.raises(UsageError, match=r"1 unexpected keys \(classifier.weight\)"):
        load_backbone(str(folder), "dino")


def test_preprocessor_statistics_read_checked_and_fallback(dino_folder):
    folder, _ = dino_folder
    other = {**PREPROCESSOR, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
    (folder / "preprocessor_config.json").write_text(json.dumps(other))
    model, _ = load_backbone(str(folder), "dino")  # another mean and std are honoured, not refused
    assert pixel_stats(model.config) == PixelStats((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    for bad in ({"image_std": [0.2, 0.0, 0.3]}, {"image_mean": [0.5, 0.5]}, {"image_mean": "0.5"}):
        (folder / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, **bad}))
        key = next(iter(bad))
        with pytest.raises(UsageError, match=f"preprocessor_config.json: '{key}' must be a list of 3") as exc:
            load_backbone(str(folder), "dino")
        assert "\n" not in str(exc.value)
    (folder / "preprocessor_config.json").unlink()
    assert image_preprocessing(str(folder))["source"] == "ImageNet defaults (preprocessor_config.json absent)"
    model, _ = load_backbone(str(folder), "dino")  # no file: the ImageNet defaults, as the shipped tiny backbones
    assert pixel_stats(model.config) == IMAGENET and not hasattr(model.config, "image_mean")


def test_a_cached_hub_ids_preprocessor_is_read(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--facebook--dinov2-small" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    (snapshot / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, "image_std": [0.5, 0.5, 0.5]}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    prep = image_preprocessing("facebook/dinov2-small")
    assert prep["std"] == (0.5, 0.5, 0.5) and prep["file"] == snapshot / "preprocessor_config.json"
    assert image_preprocessing("facebook/dinov2-base")["file"] is None  # not cached: ImageNet's


# ----------------------------------------------------------------------------- frames in training and eval

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
COLOUR = (200, 30, 90)


def _png(path, colour=COLOUR, size=(40, 30)):
    from PIL import Image

    Image.new("RGB", size, colour).save(path)
    return path


def _image_shard(folder, image):
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    parts = {"json": json.dumps({"user": "What colour?", "assistant": "red"}).encode(), "png": image.read_bytes()}
    with tarfile.open(folder / "s.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for ext, data in parts.items():
            info = tarfile.TarInfo(f"red.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return folder


def test_a_folders_mean_and_std_normalise_training_batches_and_evaluation_alike(dino_folder, tmp_path, monkeypatch):
    """The folder's statistics reach the training batch and, through the saved model, every frame
    `fvlm eval` reads (its validation loader and its benchmark questions): the same tensor."""
    from fvlm.config import load_config
    from fvlm.data.loader import build_loader
    from fvlm.eval.evaluate import evaluate_checkpoint, find_checkpoints
    from fvlm.model.backbones import model_pixel_stats
    from fvlm.model.build import build_model, load_model, save_model
    from fvlm.model.tokenizer import byte_tokenizer

    folder, _ = dino_folder
    (folder / "preprocessor_config.json").write_text(
        json.dumps({**PREPROCESSOR, "image_mean": MEAN, "image_std": STD, "crop_size": {"height": 28, "width": 28}})
    )
    image = _png(tmp_path / "red.png")
    shards = _image_shard(tmp_path / "data", image)
    cfg = load_config(
        None,
        {"model.dino": str(folder), "model.image_size": 28, "data.train": str(shards), "data.val": str(shards),
         "train.batch_size": 1},
    )  # fmt: skip
    tok = byte_tokenizer()
    raw = next(iter(build_loader(cfg, "train", tok)))["frames"][0, 0]  # uint8: the model normalises it
    assert torch.equal(raw, torch.tensor(COLOUR, dtype=torch.uint8)[:, None, None].expand(3, 28, 28))
    model = build_model(cfg.model)
    train_frames = model.encoder.normalise(raw[None])[0]
    expected = (torch.tensor(COLOUR) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(train_frames, expected[:, None, None].expand(3, 28, 28), atol=1e-5)
    imagenet = (torch.tensor(COLOUR) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert not torch.allclose(train_frames[:, 0, 0], imagenet, atol=0.1)

    save_model(model, tmp_path / "model", tok)
    loaded, _ = load_model(tmp_path / "model")  # the statistics travel with the saved model, not the folder
    assert model_pixel_stats(loaded) == PixelStats(tuple(MEAN), tuple(STD))
    (tmp_path / "bench.jsonl").write_text(
        json.dumps({"video": str(image), "question": "What colour?", "options": ["red", "blue"], "answer": "A"})
    )
    seen = []
    original = type(loaded).visual_blocks

    def spy(self, batch, modes):
        seen.append(batch["frames"].clone())
        return original(self, batch, modes)

    monkeypatch.setattr(type(loaded), "visual_blocks", spy)
    folder.rename(tmp_path / "gone")  # evaluation needs no DINO folder: the model carries its statistics
    evaluate_checkpoint(
        find_checkpoints(tmp_path / "model")[0], modes=["coarse_only"], data=str(shards),
        benches=[str(tmp_path / "bench.jsonl")], overrides=[], max_samples=0, batch_size=2, device="cpu",
        score="mean", log=lambda _: None,
    )  # fmt: skip
    real = [frames for frames in seen if frames.abs().sum() > 0]  # the grey controls are all zeros
    assert len(real) == 2  # the validation loss's batch and the benchmark question's
    for frames in real:
        assert torch.equal(frames[0, 0], train_frames)


def test_crop_size_other_than_image_size_is_one_warning_line(dino_folder, caplog):
    from fvlm.config import ModelConfig
    from fvlm.model.build import build_model

    folder, _ = dino_folder  # crops to 224, as facebook/dinov2-small
    with caplog.at_level("WARNING", logger="fvlm.model"):
        build_model(ModelConfig(dino=str(folder), image_size=28))
    (record,) = [r for r in caplog.records if r.name == "fvlm.model"]
    message = record.getMessage()
    assert "crops to 224 px but model.image_size is 28" in message and "\n" not in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="fvlm.model"):
        build_model(ModelConfig(dino=str(folder), image_size=224))
    assert not [r for r in caplog.records if r.name == "fvlm.model"]


def test_shipped_tiny_backbones_normalise_with_the_imagenet_constants_bit_for_bit():
    import numpy as np

    from fvlm.data.decode import normalise
    from fvlm.export.writer import preprocessor_config

    model, _ = load_backbone("tiny", "dino")
    assert pixel_stats(model.config) == IMAGENET
    frames = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    # the formula before the statistics became a setting, with its float32 constants
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    before = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2))).float()
    before = before.mul_(torch.from_numpy(1.0 / (255.0 * std)).view(3, 1, 1)).sub_(
        torch.from_numpy(mean / std).view(3, 1, 1)
    )
    assert torch.equal(normalise(frames, pixel_stats(model.config)), before)
    prep = preprocessor_config(64)
    assert prep["image_mean"] == [0.485, 0.456, 0.406] and prep["image_std"] == [0.229, 0.224, 0.225]


def test_shipped_tiny_dino_folder_still_loads():
    from pathlib import Path

    import fvlm

    folder = next((Path(fvlm.__file__).parent / "assets").glob("tiny-backbones-*/tiny-dino"))
    model, pretrained = load_backbone(str(folder), "dino")
    assert pretrained and image_preprocessing(str(folder))["size"] is None
    assert pixel_stats(model.config) == IMAGENET and "image_mean" not in model.config.to_dict()
