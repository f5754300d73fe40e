"""DINOv2 from a local folder in facebook/dinov2-small's layout: weights checked key by key against
the config, and the pixel statistics read from preprocessor_config.json."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fvlm.errors import UsageError
from fvlm.model.backbones import IMAGENET_MEAN, IMAGENET_STD, image_preprocessing, load_backbone

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


def test_preprocessor_statistics_checked_and_fallback(dino_folder):
    folder, _ = dino_folder
    (folder / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, "image_mean": [0.5, 0.5, 0.5]}))
    with pytest.raises(UsageError, match="'image_mean' \\[0.5, 0.5, 0.5\\] differs"):
        load_backbone(str(folder), "dino")
    (folder / "preprocessor_config.json").unlink()
    assert image_preprocessing(str(folder))["source"] == "ImageNet defaults (preprocessor_config.json absent)"
    load_backbone(str(folder), "dino")  # no file: the ImageNet defaults, as the shipped tiny backbones


def test_shipped_tiny_dino_folder_still_loads():
    from pathlib import Path

    import fvlm

    folder = next((Path(fvlm.__file__).parent / "assets").glob("tiny-backbones-*/tiny-dino"))
    model, pretrained = load_backbone(str(folder), "dino")
    assert pretrained and image_preprocessing(str(folder))["size"] is None
