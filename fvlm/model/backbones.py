"""Loading the two backbones: a causal LM (SmolLM2 is Llama-shaped) and a DINOv2 vision encoder.

A backbone spec (`model.llm`, `model.dino`) is one of
- a shape name shipped in fvlm/model/shapes (`tiny`, `smollm2-135m`, `dinov2-small`, ...): the real
  architecture with random weights, needing no download (tests, the tiny preset, FLOP counting);
- a local folder in Hugging Face format (config.json + weights): pretrained weights;
- a hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`) already in the local Hugging Face cache.
Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

from fvlm.errors import UsageError, read_json

SHAPES_DIR = Path(__file__).parent / "shapes"
_ALIASES = {("llm", "tiny"): "tiny-llm", ("dino", "tiny"): "tiny-dino"}
_EXPECTED_TYPE = {"llm": None, "dino": "dinov2"}


def shape_names() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def _shape_file(spec: str, kind: str) -> Path | None:
    name = _ALIASES.get((kind, spec), spec.lower())
    path = SHAPES_DIR / f"{name}.json"
    return path if path.is_file() else None


def shape_folder_name(spec: str, kind: str) -> str:
    """The shape file's name for a spec (`tiny` is `tiny-llm` or `tiny-dino`)."""
    return _ALIASES.get((kind, spec), spec.lower())


def is_shape_name(spec: str, kind: str) -> bool:
    return _shape_file(spec, kind) is not None


def _looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists()


def backbone_config(spec: str, kind: str):
    """The transformers config of a backbone spec, without loading weights."""
    from transformers import AutoConfig

    shape = _shape_file(spec, kind)
    if shape is not None:
        data = read_json(shape)
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UsageError(f"model.{kind}: {path} has no config.json (not a Hugging Face model folder)")
            config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        elif _looks_like_hub_id(spec):
            config = AutoConfig.from_pretrained(spec, local_files_only=True, trust_remote_code=False)
        else:
            raise UsageError(
                f"model.{kind}: '{spec}' is neither a folder nor a shape name ({', '.join(shape_names())})"
            )
    except UsageError:
        raise
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"model.{kind}: cannot read a model config from '{spec}' ({str(exc).splitlines()[0]})"
        ) from None
    expected = _EXPECTED_TYPE[kind]
    if expected and config.model_type != expected:
        raise UsageError(f"model.{kind}: '{spec}' is a {config.model_type} model, expected {expected}")
    return config


# What a backbone of each kind is built as: the LLM with its language-model head, DINO without a head
# (AutoModel maps a dinov2 config to Dinov2Model).
_AUTO_CLASS = {"llm": "AutoModelForCausalLM", "dino": "AutoModel"}


def _local_or_hub(spec: str) -> str:
    """A folder spec as an absolute path (so transformers does not read it as a hub id), else as given."""
    path = Path(spec).expanduser()
    return str(path) if path.is_dir() else spec


def load_backbone(spec: str, kind: str, attn_implementation: str = "sdpa"):
    """(model, pretrained?) for a `model.llm` or `model.dino` spec; shape names give random weights."""
    import transformers

    auto_class = getattr(transformers, _AUTO_CLASS[kind])
    config = backbone_config(spec, kind)
    if is_shape_name(spec, kind):
        config._attn_implementation = attn_implementation
        return auto_class.from_config(config, attn_implementation=attn_implementation), False
    import pickle

    try:
        model, info = auto_class.from_pretrained(
            _local_or_hub(spec),
            local_files_only=True,
            trust_remote_code=False,
            attn_implementation=attn_implementation,
            dtype="float32",
            output_loading_info=True,
        )
    except pickle.UnpicklingError:
        # torch (weights_only) refused a pickled weights file that asks to build more than tensors.
        raise UsageError(
            f"model.{kind}: {pickled_weights(spec)}: refused to load: the pickle holds more than tensors "
            "(a pickle can run code); give safetensors weights"
        ) from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"model.{kind}: cannot load weights from '{spec}' ({_first_line(exc)})") from None
    if kind == "dino":
        check_loading_info(spec, kind, info)
        prep = image_preprocessing(spec)
        if prep["file"] is not None:
            # The folder's pixel statistics travel with the model (saved with it, exported with it);
            # a DINO config without them means ImageNet's (`pixel_stats`).
            model.config.image_mean, model.config.image_std = list(prep["mean"]), list(prep["std"])
    return model, True


def check_loading_info(spec: str, kind: str, info: dict) -> None:
    """A DINO folder whose weights leave parameters at their random start (missing keys), hold
    parameters the model does not have (unexpected keys: another architecture, a prefix such as
    `dinov2.` from a classifier) or of the wrong shape is refused, naming the first few."""
    problems = []
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(what) or [])
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {what.replace('_', ' ')} ({shown})")
    if problems:
        raise UsageError(f"model.{kind}: weights in '{spec}' do not match its config: {'; '.join(problems)}")


# ImageNet statistics: what DINOv2 was trained with, and what frames are normalised with for a DINO
# that names no others (shape names, the shipped tiny backbones, folders without a preprocessor file).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSOR_FILE = "preprocessor_config.json"
log = logging.getLogger("fvlm.model")


class PixelStats(NamedTuple):
    """The per-channel mean and std (of RGB in [0, 1]) a DINO's frames are normalised with."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


IMAGENET = PixelStats(IMAGENET_MEAN, IMAGENET_STD)


def pixel_affine(stats: PixelStats) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per channel (scale, shift) such that a normalised value is `uint8 value * scale - shift`, both
    float32 values (computed in float32, as frames always were). The one formula both the host
    (`fvlm.data.decode.normalise_into`) and the model (`fvlm.model.encoder.normalise_pixels`) apply,
    so that the two give the same bits in fp32."""
    import numpy as np

    mean, std = np.array(stats.mean, dtype=np.float32), np.array(stats.std, dtype=np.float32)
    scale = np.float32(1.0) / (np.float32(255.0) * std)
    return tuple(float(v) for v in scale), tuple(float(v) for v in mean / std)


def _preprocessor_path(spec: str) -> Path:
    """Where a folder or cached hub id keeps its preprocessor_config.json (it may not exist)."""
    path = Path(spec).expanduser()
    if not path.is_dir() and _looks_like_hub_id(spec):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, PREPROCESSOR_FILE)
        if isinstance(cached, str):
            return Path(cached)
    return path / PREPROCESSOR_FILE


def _three_numbers(data: dict, key: str, default: tuple[float, ...], path: Path, positive: bool) -> tuple[float, ...]:
    value = data.get(key, default)
    ok = isinstance(value, list | tuple) and len(value) == 3
    ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    if not ok or (positive and any(v <= 0 for v in value)):
        raise UsageError(f"{path}: '{key}' must be a list of 3 {'positive ' if positive else ''}numbers")
    return tuple(float(v) for v in value)


def image_preprocessing(spec: str) -> dict[str, Any]:
    """{"mean", "std", "size", "source", "file"} of a DINO spec, read from its folder's (or cached hub
    id's) `preprocessor_config.json` (`image_mean`, `image_std`, `crop_size`, as facebook/dinov2-*
    ship it). Shape names and folders without the file (the shipped tiny backbones) fall back to the
    ImageNet mean and std and no size, `file` None and `source` saying so. Frames are normalised with
    this mean and std in training and evaluation alike (`load_backbone` keeps them on the DINO's
    config, so a saved model carries them); the crop size is compared with `model.image_size` by
    `check_crop_size`."""
    fallback = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "size": None, "source": "ImageNet defaults", "file": None}
    if is_shape_name(spec, "dino"):
        return fallback
    path = _preprocessor_path(spec)
    if not path.is_file():
        return {**fallback, "source": f"ImageNet defaults ({path.name} absent)"}
    data = read_json(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    crop = data.get("crop_size")
    size = crop.get("height") if isinstance(crop, dict) else crop
    return {
        "mean": _three_numbers(data, "image_mean", IMAGENET_MEAN, path, positive=False),
        "std": _three_numbers(data, "image_std", IMAGENET_STD, path, positive=True),
        "size": int(size) if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None,
        "source": str(path),
        "file": path,
    }


def spec_pixel_stats(spec: str) -> PixelStats:
    """The mean and std frames are normalised with for a `model.dino` spec (ImageNet's by default)."""
    prep = image_preprocessing(spec)
    return PixelStats(prep["mean"], prep["std"])


def pixel_stats(dino_config: Any) -> PixelStats:
    """The mean and std a built DINO's frames are normalised with: those `load_backbone` copied onto
    its config from the folder's preprocessor_config.json (saved with the model), else ImageNet's."""
    mean, std = getattr(dino_config, "image_mean", None), getattr(dino_config, "image_std", None)
    if mean is None or std is None:
        return IMAGENET
    return PixelStats(tuple(float(v) for v in mean), tuple(float(v) for v in std))


def model_pixel_stats(model: Any) -> PixelStats:
    """`pixel_stats` of an fvlm model's DINO."""
    return pixel_stats(model.encoder.dino.config)


def check_crop_size(spec: str, image_size: int) -> None:
    """A DINO folder whose preprocessor crops to another size than `model.image_size` is trained and
    evaluated at `model.image_size` (DINOv2 interpolates its position embeddings to any grid): one
    warning line says so."""
    prep = image_preprocessing(spec)
    size = prep["size"]
    if size is not None and size != image_size:
        log.warning(
            "fvlm: warning: model.dino: %s crops to %d px but model.image_size is %d: frames are resized "
            "and centre-cropped to %d px and DINO's position embeddings interpolated to that grid",
            prep["source"],
            size,
            image_size,
            image_size,
        )


def pickled_weights(folder: str | Path) -> str:
    """The pickled weights file of a model folder (what torch's weights-only loading refuses), for a
    message; the folder itself when it holds none by the usual names."""
    found = sorted(Path(folder).expanduser().glob("*.bin")) + sorted(Path(folder).expanduser().glob("*.pt"))
    return str(found[0]) if found else str(folder)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def tokenizer_from_folder(folder: str, what: str):
    """transformers' tokenizer of a local folder; one that it cannot load, or that asks to run code of
    its own (`auto_map`: never run), is a one-line error naming `what`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"{what}: cannot load a tokenizer from '{folder}' ({_first_line(exc)})") from None


def load_llm(spec: str, attn_implementation: str = "sdpa"):
    """(causal LM, pretrained?) for a `model.llm` spec."""
    return load_backbone(spec, "llm", attn_implementation)


def load_tokenizer(spec: str):
    """The LLM folder's tokenizer; the project's byte-level tokenizer for shape names."""
    from fvlm.model.tokenizer import byte_tokenizer

    if is_shape_name(spec, "llm"):
        return byte_tokenizer()
    tok = tokenizer_from_folder(_local_or_hub(spec), "model.llm")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise UsageError(f"model.llm: the tokenizer in '{spec}' has no chat template")
    return tok
