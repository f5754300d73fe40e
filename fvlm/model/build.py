"""Building a model from its config, and saving/loading a trained one as a self-contained folder."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from fvlm import atomic
from fvlm.config import ModelConfig
from fvlm.errors import UsageError, read_json
from fvlm.model.backbones import check_crop_size, load_backbone, load_tokenizer, tokenizer_from_folder
from fvlm.model.vlm import FoveatedVLM, MultiTokenVLM, VLMBase
from fvlm.run_folder import MODEL_CONFIG, MODEL_FILE

TOKENIZER_DIR = "tokenizer"


def assemble(cfg: ModelConfig, llm, dino) -> VLMBase:
    patch = dino.config.patch_size
    if cfg.image_size % patch:
        raise UsageError(f"model.image_size ({cfg.image_size}) must be a multiple of DINO's patch size ({patch})")
    cls = MultiTokenVLM if cfg.arch == "multi_token" else FoveatedVLM
    model = cls(cfg, llm, dino)
    model.apply_freeze()
    if cfg.gradient_checkpointing:
        # transformers renamed gradient_checkpointing_enable (deprecated, removed in v6).
        enable = getattr(model.llm, "activation_checkpointing_enable", None) or model.llm.gradient_checkpointing_enable
        enable()
    return model


RECOMPILE_LIMIT = 64


def compile_model(model: VLMBase, backend: str | object = "inductor", cuda_graphs: bool = False) -> VLMBase:
    """Compiles the model's step (`_forward`) into one graph (`fullgraph=True`).

    A batch from the loader carries its frame and target indices, built on the host
    (fvlm.model.batch_index), so the step has no data-dependent shape and nothing in it waits for the
    device. The sizes that change from batch to batch (frames encoded, targets, text length) are
    marked dynamic by `forward`, so one graph serves them all instead of one compile per size. A batch
    made without the indices still compiles: the model then finds them with `nonzero`, traced as
    unbacked sizes. Inductor's channels-last layout choice for DINO's patch convolution over a
    dynamic number of frames failed its own stride check (torch 2.13, CPU), so that choice is off: it
    concerns that one convolution. These settings are process-wide, as dynamo's configuration is.

    `cuda_graphs` (`train.cuda_graphs`, inductor only): compile's "reduce-overhead" mode, which
    captures the compiled forward and backward in a CUDA graph per concrete shape and replays it, so
    a step costs a few launches instead of one per kernel. The one graph above stays one graph; each
    shape of the ladder (`train.static_shapes`) is captured once. `forward` then marks each step's
    start and hands back copies of the outputs, which the next replay would overwrite.
    """
    import torch._dynamo.config
    import torch._inductor.config

    if cuda_graphs and backend != "inductor":
        raise ValueError(f"cuda_graphs needs the inductor backend, not {backend!r}")
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._dynamo.config.capture_scalar_outputs = True
    # One function (`_forward`) serves every variant of the step, each its own graph: training with
    # and without the logged steps' coarse loss, evaluation, the attention probe, each for batches of
    # 3+ frames per sample, 2, 1 and none (text only): about nine. Dynamo's default of 8 graphs per
    # function made a run fail at the ninth variant it met (with fullgraph, the limit raises).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._inductor.config.layout_optimization = False
    mode = "reduce-overhead" if cuda_graphs else None
    model._forward = torch.compile(model._forward, backend=backend, mode=mode, fullgraph=True)  # type: ignore[method-assign,arg-type]
    model.compiled = True
    model.cuda_graphs = cuda_graphs
    return model


def build_model(cfg: ModelConfig) -> VLMBase:
    """Backbones from their specs (pretrained folders or random shapes) plus a fresh connector."""
    llm, _ = load_backbone(cfg.llm, "llm", cfg.attn_implementation)
    dino, _ = load_backbone(cfg.dino, "dino", cfg.attn_implementation)
    check_crop_size(cfg.dino, cfg.image_size)
    return assemble(cfg, llm, dino)


def build_tokenizer(cfg: ModelConfig):
    return load_tokenizer(cfg.llm)


def save_model(
    model: VLMBase, folder: str | Path, tokenizer=None, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Weights (safetensors), the fvlm model config and both backbone configs, and the tokenizer:
    everything needed to rebuild the model without the original backbone folders. `state_dict`
    (the full weights of a model sharded over processes) is written in place of `model`'s own."""
    from safetensors import SafetensorError
    from safetensors.torch import save_model as save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if state_dict is None:
            save_safetensors(model, str(folder / MODEL_FILE))
        else:
            _save_state_dict(model, state_dict, folder / MODEL_FILE)
    except SafetensorError as exc:
        # safetensors reports a failed write (disk full, file too large) as its own error type with
        # "(os error N)" in the text; as an OSError it reaches the user as the environment fault it is.
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(folder / MODEL_FILE)) from exc
    meta = {
        "model": dataclasses.asdict(model.cfg),
        "llm_config": model.llm.config.to_dict(),
        "dino_config": model.encoder.dino.config.to_dict(),
    }
    atomic.write_text(folder / MODEL_CONFIG, json.dumps(meta, indent=1, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    return folder


def _save_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """What safetensors' `save_model` writes for `model`, from a separate state dict: a weight tied
    to others (the LLM's head and embeddings) once, under the first of its names in sorted order."""
    from safetensors.torch import save_file

    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    metadata = {}
    state = dict(state_dict)
    for group in names.values():
        kept, *removed = sorted(group)
        for name in removed:
            metadata[name] = kept
            state.pop(name, None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata or None)


def load_model(folder: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a folder written by `save_model`."""
    from safetensors.torch import load_model as load_safetensors
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        Dinov2Model,
    )

    folder = Path(folder)
    for name in (MODEL_FILE, MODEL_CONFIG):
        if not (folder / name).is_file():
            raise UsageError(f"{folder}: not a saved fvlm model (missing {name})")
    meta = read_json(folder / MODEL_CONFIG)
    try:
        cfg = ModelConfig(**meta["model"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"{folder / MODEL_CONFIG}: unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    llm_cfg = dict(meta["llm_config"])
    dino_cfg = dict(meta["dino_config"])
    llm = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(llm_cfg.pop("model_type"), **llm_cfg), attn_implementation=cfg.attn_implementation
    )
    dino = Dinov2Model._from_config(
        AutoConfig.for_model(dino_cfg.pop("model_type"), **dino_cfg), attn_implementation=cfg.attn_implementation
    )
    model = assemble(cfg, llm, dino)
    from safetensors import SafetensorError

    try:
        load_safetensors(model, str(folder / MODEL_FILE), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as exc:
        # A truncated or foreign weights file: one line naming it, not a traceback.
        raise UsageError(
            f"{folder / MODEL_FILE}: unreadable or not this model's weights "
            f"({(str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]})"
        ) from None
    tokenizer = None
    if (folder / TOKENIZER_DIR).is_dir():
        tokenizer = tokenizer_from_folder(str(folder / TOKENIZER_DIR), str(folder))
    return model.to(device), tokenizer
