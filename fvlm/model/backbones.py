"""Loading the two backbones: a causal LM (SmolLM2 is Llama-shaped) and a DINOv2 vision encoder.

A backbone spec (`model.llm`, `model.dino`) is one of
- a shape name shipped in fvlm/model/shapes (`tiny`, `smollm2-135m`, `dinov2-small`, ...): the real
  architecture with random weights, needing no download (tests, the tiny preset, FLOP counting);
- a local folder in Hugging Face format (config.json + weights): pretrained weights;
- a hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`) already in the local Hugging Face cache.
Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

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
        image_preprocessing(spec)  # a folder asking for other pixel statistics is refused here
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


# ImageNet statistics: what DINOv2 was trained with and what fvlm normalises frames with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_preprocessing(spec: str) -> dict:
    """{"mean", "std", "size", "source"} of a DINO spec, read from its folder's
    `preprocessor_config.json` (`image_mean`, `image_std`, `crop_size`, as facebook/dinov2-* ship
    it). Shape names and folders without the file (the shipped tiny backbones) fall back to the
    ImageNet mean and std and no size, with `source` saying so. fvlm's frames are normalised with
    the ImageNet statistics, so a folder asking for others is a one-line error rather than a model
    fed pixels scaled differently from its training; the crop size is reported (frames are sized
    by `model.image_size`, any multiple of the patch size)."""
    fallback = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "size": None, "source": "ImageNet defaults"}
    if is_shape_name(spec, "dino"):
        return fallback
    path = Path(spec).expanduser() / "preprocessor_config.json"
    if not path.is_file():
        return {**fallback, "source": f"ImageNet defaults ({path.name} absent)"}
    data = read_json(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object")
    out: dict = {"source": str(path)}
    for key, name, default in (("image_mean", "mean", IMAGENET_MEAN), ("image_std", "std", IMAGENET_STD)):
        value = data.get(key, default)
        if not (isinstance(value, list | tuple) and len(value) == 3 and all(isinstance(v, int | float) for v in value)):
            raise UsageError(f"{path}: '{key}' must be a list of 3 numbers")
        if any(abs(float(a) - b) > 1e-3 for a, b in zip(value, default)):
            raise UsageError(
                f"{path}: '{key}' {list(value)} differs from the ImageNet values fvlm normalises frames with ({list(default)})"
            )
        out[name] = tuple(float(v) for v in value)
    crop = data.get("crop_size")
    size = crop.get("height") if isinstance(crop, dict) else crop
    out["size"] = int(size) if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None
    return out


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
