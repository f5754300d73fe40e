"""A trained fvlm model as a folder that plain transformers loads (`fvlm export RUN OUT`).

The folder holds `config.json` (an `FvlmConfig` with both backbones' transformers configs and
`auto_map`), `model.safetensors`, `configuration_fvlm.py` and `modeling_fvlm.py` (fvlm/export/remote,
copied verbatim: they import torch and transformers only), the tokenizer with its chat template,
`preprocessor_config.json` (DINOv2's image processor at the run's frame size, mean and std),
`generation_config.json` and a model card (`README.md`). It is written into a temporary folder
beside OUT, loaded back and compared with the fvlm model on a probe batch in every mode the model
has, then renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fvlm import run_folder as rf
from fvlm.errors import UsageError
from fvlm.export.remote import configuration_fvlm, modeling_fvlm
from fvlm.model.backbones import IMAGENET, PixelStats, model_pixel_stats
from fvlm.model.vlm import Batch, FoveatedVLM, MultiTokenVLM

# The two architectures fvlm builds (`fvlm.model.build.assemble`).
VLM = FoveatedVLM | MultiTokenVLM

REMOTE_FILES = (Path(configuration_fvlm.__file__), Path(modeling_fvlm.__file__))
AUTO_MAP = {
    "AutoConfig": "configuration_fvlm.FvlmConfig",
    "AutoModelForCausalLM": "modeling_fvlm.FvlmForCausalLM",
}
# What a load of the written folder may differ from fvlm's own logits by (float32; the same operations
# in the same order, so in practice about 1e-6).
CHECK_TOLERANCE = 1e-4


def check_out(out: Path) -> None:
    """OUT must be new or an empty folder."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"{out}: exists and is not a folder (choose a new folder)")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"{out}: exists and is not empty (choose a new folder)")


def tokens_per_frame(model: VLM) -> int:
    return model.k * model.k if isinstance(model, MultiTokenVLM) else 1


def hf_config(model: VLM, tokenizer: Any, provenance: dict[str, Any]) -> configuration_fvlm.FvlmConfig:
    """The exported config: both backbones' transformers configs and fvlm's own settings."""
    cfg = model.cfg
    query_dim = None
    if isinstance(model, FoveatedVLM):
        query_dim = int(model.q_static.shape[0])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    config = configuration_fvlm.FvlmConfig(
        text_config=model.llm.config.to_dict(),
        vision_config=model.encoder.dino.config.to_dict(),
        arch=cfg.arch,
        deep_query=cfg.deep_query,
        coarse_only=cfg.coarse_only,
        tokens_per_frame=tokens_per_frame(model),
        query_dim=query_dim,
        visual_scale=float(cfg.visual_scale),
        image_size=cfg.image_size,
        default_mode=model.default_mode,
        frame_token_id=int(pad),
        fvlm=provenance,
    )
    config.auto_map = dict(AUTO_MAP)
    return config


def hf_state_dict(model: VLM) -> dict[str, torch.Tensor]:
    """fvlm's parameter names in the exported model: DINO moves from `encoder.dino.` to `dino.`."""
    renamed = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("encoder.dino."):
            name = "dino." + name[len("encoder.dino.") :]
        renamed[name] = tensor
    return renamed


def build_hf_model(model: VLM, tokenizer: Any, provenance: dict[str, Any]) -> modeling_fvlm.FvlmForCausalLM:
    config = hf_config(model, tokenizer, provenance)
    hf = modeling_fvlm.FvlmForCausalLM(config)
    hf.load_state_dict(hf_state_dict(model), strict=True)
    dtype = next(model.parameters()).dtype
    nn.Module.to(hf, dtype)
    return hf.eval()


def generation_config(tokenizer: Any, max_new_tokens: int = 64):
    """Greedy, stopping at the end of the assistant's turn (what `fvlm generate` does)."""
    from transformers import GenerationConfig

    from fvlm.eval.scoring import end_of_turn_id

    return GenerationConfig(
        eos_token_id=end_of_turn_id(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=max_new_tokens,
    )


def preprocessor_config(image_size: int, pixel_stats: PixelStats = IMAGENET) -> dict[str, Any]:
    """DINOv2's image processor (BitImageProcessor) set to fvlm's frame preparation: the shorter side
    to `image_size` (bilinear), a centre crop to a square, /255, the model's mean and std (ImageNet's
    unless its DINO folder named others)."""
    from fvlm.data.decode import stats_arrays

    mean, std = stats_arrays(pixel_stats)

    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 2,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [round(float(x), 6) for x in mean],
        "image_std": [round(float(x), 6) for x in std],
    }


def with_default_system(template: str, system: str) -> str:
    """A chat template that puts `system` before a dialogue that opens without a system turn (as the
    run's training put `data.system_prompt` before every dialogue), then renders as `template` does:
    a prompt built through the exported tokenizer starts as fvlm's training samples did."""
    literal = json.dumps(system)  # a Jinja string literal: the same escapes as JSON's
    return (
        "{%- if not messages or messages[0]['role'] != 'system' -%}"
        f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages -%}}"
        "{%- endif %}" + template
    )


# ----------------------------------------------------------------------------- checks


def probe_batch(model: VLM, tokenizer: Any, frames: int = 3, seed: int = 0) -> Batch:
    """Two samples: random frames (the second with its last frame padded) and two prompts of different
    lengths (the shorter padded on the right, as fvlm's batches are)."""
    generator = torch.Generator().manual_seed(seed)
    size = model.cfg.image_size
    prompts = ["Describe what happens in this video.", "What colour is it?"]
    rows = [_chat_ids(tokenizer, p) for p in prompts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    frame_mask = torch.ones(2, frames, dtype=torch.bool)
    frame_mask[1, frames - 1 :] = False
    return {
        "frames": torch.randn(2, frames, 3, size, size, generator=generator),
        "frame_mask": frame_mask,
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
    }


def _chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True
    )
    return list(encoded["input_ids"])


def hf_inputs(batch: Batch, per_frame: int, frame_token_id: int) -> dict[str, torch.Tensor]:
    """An fvlm batch in the exported model's layout: frame slots (one per visual token) before the text."""
    slots = batch["frame_mask"].long().repeat_interleave(per_frame, dim=1)
    return {
        "input_ids": torch.cat([torch.full_like(slots, frame_token_id), batch["input_ids"]], dim=1),
        "attention_mask": torch.cat([slots, batch["attention_mask"].long()], dim=1),
        "pixel_values": batch["frames"],
    }


@torch.no_grad()
def fvlm_logits(model: VLM, batch: Batch, mode: str) -> torch.Tensor:
    """fvlm's own logits over [visual block + text] in a mode: what the exported model must reproduce.
    The last pass goes through an empty cache, so that it attends with transformers' own mask as the
    exported model does (fvlm's uncached passes run packed and unmasked: the same values up to kernel
    rounding, which over a real LLM's 30 layers reaches the check's tolerance)."""
    visual, visual_mask = model.visual_tokens(batch, mode)
    embeds = torch.cat([visual, model.embed_text(batch["input_ids"])], dim=1)
    mask = torch.cat([visual_mask.long(), batch["attention_mask"].long()], dim=1)
    return model.llm.lm_head(model.run_llm(embeds, mask, cache=model._new_cache())).float()


@torch.no_grad()
def max_logit_difference(model: VLM, hf: Any, batch: Batch) -> dict[str, float]:
    """Per mode, the largest |fvlm logit - exported logit| over the attended positions of the batch."""
    config = hf.config
    inputs = hf_inputs(batch, config.tokens_per_frame, config.frame_token_id)
    attended = inputs["attention_mask"].bool()
    found = {}
    for mode in model.supported_modes:
        ours = fvlm_logits(model, batch, mode)
        theirs = hf(**inputs, mode=mode).logits.float()
        found[mode] = float((ours - theirs)[attended].abs().max())
    return found


# ----------------------------------------------------------------------------- the command


def export_model(target: str | Path, out: str | Path) -> dict[str, Any]:
    """Writes the exported folder OUT for a run folder, checkpoint or saved model; returns a report."""
    from fvlm.eval.evaluate import find_checkpoints, run_config, run_system_prompt
    from fvlm.export.card import model_card
    from fvlm.model.build import load_model

    began = time.perf_counter()
    out = Path(out).expanduser()
    check_out(out)
    ckpt = find_checkpoints(target)[-1]
    model, tokenizer = load_model(ckpt.folder)
    if not isinstance(model, (FoveatedVLM, MultiTokenVLM)):
        raise UsageError(f"{ckpt.folder}: a {type(model).__name__}, which fvlm export does not know")
    model.eval()
    if tokenizer is None:
        raise UsageError(f"{ckpt.folder}: no tokenizer saved with the model")
    cfg = run_config(ckpt, model.cfg, [])
    summary = rf.read_summary(ckpt.run_dir) if ckpt.run_dir is not None else None
    evaluation = _read_eval(ckpt.run_dir)
    provenance = {
        "run_id": cfg.run_id if ckpt.run_dir is not None else ckpt.folder.name,
        "step": ckpt.step,
        "samples_seen": ckpt.meta.get("samples_seen"),
        "git_commit": (summary or {}).get("git_commit") or ckpt.meta.get("git_commit"),
        "model": dataclasses.asdict(model.cfg),
        "frames": {
            "max_frames": cfg.data.max_frames,
            "fps": cfg.data.fps,
            "image_frames": cfg.data.replicate_image_frames,
        },
    }
    hf = build_hf_model(model, tokenizer, provenance)
    hf.generation_config = generation_config(tokenizer)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with _quiet_transformers():
            hf.save_pretrained(str(tmp))
        for source in REMOTE_FILES:
            shutil.copyfile(source, tmp / source.name)
        save_tokenizer(tokenizer, tmp, system=run_system_prompt(cfg, tokenizer))
        preprocessor = preprocessor_config(cfg.model.image_size, model_pixel_stats(model))
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
        # The written folder, loaded back (the weights as stored, the config as parsed), against fvlm.
        with _quiet_transformers():
            loaded = modeling_fvlm.FvlmForCausalLM.from_pretrained(
                str(tmp), dtype=next(model.parameters()).dtype, attn_implementation=model.cfg.attn_implementation
            )
        loaded.eval()
        differences = max_logit_difference(model, loaded, probe_batch(model, tokenizer))
        worst = max(differences.values())
        if not worst <= CHECK_TOLERANCE:
            raise RuntimeError(
                f"the exported model's logits differ from fvlm's by {worst:.3g} (tolerance {CHECK_TOLERANCE:g}): "
                + ", ".join(f"{m} {d:.3g}" for m, d in differences.items())
            )
        report = {
            "checkpoint": str(ckpt.folder),
            "run_id": provenance["run_id"],
            "step": ckpt.step,
            "arch": model.cfg.arch,
            "modes": list(model.supported_modes),
            "parameters": sum(p.numel() for p in hf.parameters()),
            "max_logit_difference": differences,
        }
        (tmp / "README.md").write_text(model_card(model, cfg, summary, evaluation, report, folder=out.name))
        _usual_permissions(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked above): replaced by the finished folder
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["seconds"] = time.perf_counter() - began
    return report


def save_tokenizer(tokenizer: Any, folder: Path, system: str | None = None) -> None:
    """The tokenizer and its chat template, without the loading options of this machine that
    transformers writes into tokenizer_config.json (`local_files_only` would follow it to the Hub).
    With `system` (the run's system turn), the saved template opens a dialogue without one with it."""
    template = tokenizer.chat_template
    if system is not None and isinstance(template, str):
        tokenizer.chat_template = with_default_system(template, system)
    try:
        tokenizer.save_pretrained(str(folder))
    finally:
        tokenizer.chat_template = template
    path = folder / "tokenizer_config.json"
    if path.is_file():
        settings = json.loads(path.read_text())
        for key in ("local_files_only", "is_local", "name_or_path"):
            settings.pop(key, None)
        path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def _quiet_transformers():
    """No progress bars from transformers while it writes and reads the folder."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def _usual_permissions(folder: Path) -> None:
    """The permissions any new folder and file get here (mkdtemp makes the folder private, and
    transformers writes the weights through a private temporary file)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _read_eval(run_dir: Path | None) -> dict[str, Any] | None:
    """The run's `fvlm eval` result, if it has a readable one."""
    if run_dir is None:
        return None
    path = rf.eval_dir(run_dir) / rf.EVAL_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def push(folder: Path, repo: str) -> str:
    """Uploads the folder to the Hugging Face Hub as model repository `repo` (created if missing).
    A thin call to huggingface_hub: it needs the network and a login (`hf auth login` or HF_TOKEN)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, repo_type="model", exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    return str(getattr(info, "commit_url", repo))
