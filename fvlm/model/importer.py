"""`fvlm backbones import`: a language model in another form -> a plain local Hugging Face folder.

The source is a GGUF file (llama.cpp's format, which also carries the tokenizer and the chat
template) or any folder transformers can load. The result holds safetensors weights, config.json,
the generation config, the tokenizer and its chat template: exactly what `model.llm=FOLDER` loads.

transformers reads GGUF by turning the quantised tensors back into floats, but it will not save a
model loaded that way (its GGUF quantiser is not serialisable). The model is therefore rebuilt as a
plain one of the same class from its config and state dict, which holds the same numbers. Before the
folder is moved into place it is loaded back through fvlm's own loader and its logits are compared
with the source model's on a short chat: an import that changed the model fails instead of landing.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from fvlm import atomic
from fvlm.errors import UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")
PROVENANCE_FILE = "fvlm_import.json"
# A chat that every ChatML model must get right; its logits are compared before the folder lands.
CHECK_CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]
# Float32 logits of the same weights computed by two loads agree to rounding; anything larger means
# the weights, the config or the tokenizer did not survive the round trip.
MAX_LOGIT_DIFFERENCE = 1e-3
# A GGUF header: magic, version, tensor count, metadata entry count. Each tensor's description takes
# at least 24 bytes (name length, dimension count, type, offset) and each metadata entry 13 (key
# length, value type, a one-byte value).
GGUF_HEADER = struct.Struct("<4sIQQ")
GGUF_MIN_TENSOR_INFO = 24
GGUF_MIN_ENTRY = 13


@dataclass
class Source:
    folder: Path
    gguf_file: str | None  # the file name inside `folder` when the source is GGUF

    @property
    def label(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)


def resolve_source(src: str) -> Source:
    path = Path(src).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        for package in ("gguf", "accelerate"):
            if importlib.util.find_spec(package) is None:
                raise UsageError(f"{path}: reading GGUF needs the '{package}' package (pip install -e '.[real]')")
        return Source(path.parent, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{path}: not a Hugging Face model folder (no config.json); give a folder or a .gguf file")
        return Source(path, None)
    if path.exists():
        raise UsageError(f"{path}: expected a .gguf file or a Hugging Face model folder")
    raise UsageError(f"{path}: no such file or folder")


def check_gguf_header(path: Path) -> None:
    """Refuses a GGUF file whose header counts more tensors or metadata entries than its size can
    hold, before a reader believes the counts (and loops, or allocates, for 10**12 of them)."""
    with path.open("rb") as handle:
        head = handle.read(GGUF_HEADER.size)
    if len(head) < GGUF_HEADER.size or head[:4] != b"GGUF":
        raise UsageError(f"{path}: not a GGUF file (no GGUF header)")
    _, version, tensors, entries = GGUF_HEADER.unpack(head)
    size = path.stat().st_size
    if version < 2 or tensors * GGUF_MIN_TENSOR_INFO + entries * GGUF_MIN_ENTRY > size:
        raise UsageError(
            f"{path}: damaged GGUF header (version {version}, {tensors} tensors and {entries} metadata "
            f"entries claimed in a file of {size} bytes)"
        )


def _load(source: Source, dtype: str):
    """(model, tokenizer) as transformers loads them; a source it cannot read is a one-line error."""
    import pickle

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fvlm.model.backbones import pickled_weights

    if source.gguf_file:
        check_gguf_header(source.folder / source.gguf_file)
    extra = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    # GGUF tensors are dequantised to float32 unless told otherwise; a folder keeps its own dtype.
    load_dtype = "float32" if dtype == "auto" and source.gguf_file else dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(source.folder), local_files_only=True, trust_remote_code=False, **extra
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(source.folder), local_files_only=True, trust_remote_code=False, dtype=load_dtype, **extra
        )
    except pickle.UnpicklingError:
        # torch (weights_only) refused a pickled weights file that asks to build more than tensors.
        raise UsageError(
            f"{pickled_weights(source.folder)}: refused to load: the pickle holds more than tensors "
            "(a pickle can run code)"
        ) from None
    except (OSError, ValueError, KeyError, RuntimeError, struct.error) as exc:
        # struct.error: a GGUF file cut short.
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(f"{source.label}: transformers cannot load it as a causal language model ({reason})") from None
    if not tokenizer.chat_template:
        raise UsageError(f"{source.label}: its tokenizer has no chat template (fvlm renders every sample with one)")
    return model, tokenizer


def _plain_copy(model):
    """The same model without the GGUF quantiser attached, so that save_pretrained accepts it."""
    import torch
    from transformers import AutoModelForCausalLM

    if getattr(model, "hf_quantizer", None) is None:
        return model
    config = copy.deepcopy(model.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    with torch.no_grad():
        plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.eval()


def _check_logits(source_model, folder: Path, tokenizer) -> float:
    """Max |logit difference| between the source model and the folder loaded through fvlm."""
    import torch

    from fvlm.model.backbones import load_llm, load_tokenizer

    loaded, _ = load_llm(str(folder))
    loaded_tokenizer = load_tokenizer(str(folder))
    ids = tokenizer.apply_chat_template(CHECK_CHAT, tokenize=True, return_tensors="pt")["input_ids"]
    again = loaded_tokenizer.apply_chat_template(CHECK_CHAT, tokenize=True, return_tensors="pt")["input_ids"]
    if not torch.equal(ids, again):
        raise UsageError(f"{folder}: the saved tokenizer renders the check chat differently from the source's")
    with torch.no_grad():
        want = source_model(input_ids=ids).logits.float()
        got = loaded.eval()(input_ids=ids).logits.float()
    return float((want - got).abs().max())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_llm(src: str, out: str, dtype: str = "auto") -> dict:
    """Writes the plain folder `out` (which must not exist, or be empty); returns what it wrote."""
    out_path = Path(out).expanduser()
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise UsageError(f"{out_path}: exists and is not an empty folder (choose a new one)")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    source = resolve_source(src)
    began = time.perf_counter()
    model, tokenizer = _load(source, dtype)
    plain = _plain_copy(model.eval())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".tmp-{out_path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "source": Path(source.label).name,
        "format": "gguf" if source.gguf_file else "huggingface",
        "source_sha256": _sha256(source.folder / source.gguf_file) if source.gguf_file else None,
        "architecture": type(plain).__name__,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "dtype": str(plain.dtype).removeprefix("torch."),
        "tokenizer_size": len(tokenizer),
    }
    try:
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        # fvlm loads weights as float32, so a narrower source is compared cast alike (in place: the
        # model is not needed after this).
        difference = _check_logits(plain.float(), tmp, tokenizer)
        if not difference <= MAX_LOGIT_DIFFERENCE:
            raise UsageError(
                f"{source.label}: the written folder's logits differ from the source's by {difference:.3g}"
            )
        report["max_logit_difference"] = difference
        atomic.write_json(tmp / PROVENANCE_FILE, report, indent=1)
        if out_path.exists():
            out_path.rmdir()
        tmp.rename(out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["seconds"] = time.perf_counter() - began
    return report
