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
        model = auto_class.from_pretrained(
            _local_or_hub(spec),
            local_files_only=True,
            trust_remote_code=False,
            attn_implementation=attn_implementation,
            dtype="float32",
        )
    except pickle.UnpicklingError:
        # torch (weights_only) refused a pickled weights file that asks to build more than tensors.
        raise UsageError(
            f"model.{kind}: {pickled_weights(spec)}: refused to load: the pickle holds more than tensors "
            "(a pickle can run code); give safetensors weights"
        ) from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"model.{kind}: cannot load weights from '{spec}' ({_first_line(exc)})") from None
    return model, True


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
