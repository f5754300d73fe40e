"""`fvlm generate`: text about a video, a frame folder or an image, from a trained checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from fvlm.errors import UsageError
from fvlm.eval.media import check_visual_path, load_visual
from fvlm.model.backbones import model_pixel_stats
from fvlm.model.tokenizer import chat_ids
from fvlm.model.vlm import Batch, VLMBase

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def generate_text(
    model: VLMBase,
    tokenizer: PreTrainedTokenizerBase,
    frames_uint8: np.ndarray | None,
    prompt: str,
    *,
    mode: str,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    device: str | torch.device,
    system: str | None = None,
) -> str:
    """Greedy (temperature 0) or sampled continuation of the prompt after the visual block (none when
    `frames_uint8` is None: a text-only question); the LLM runs with a KV cache. Stops at the
    end-of-turn token. `system`: the run's system turn (`run_system_prompt`), before the prompt as
    training put it before every dialogue; frames are normalised with the model's own mean and std."""
    from fvlm.data.decode import normalise
    from fvlm.eval.scoring import end_of_turn_id, question_messages

    ids = chat_ids(tokenizer, question_messages(prompt, system), add_generation_prompt=True)
    if frames_uint8 is None:
        size = model.cfg.image_size
        frames = torch.zeros(1, 0, 3, size, size, device=device)
    else:
        frames = normalise(frames_uint8, model_pixel_stats(model))[None].to(device)
    batch: Batch = {
        "frames": frames,
        "frame_mask": torch.ones(1, frames.shape[1], dtype=torch.bool, device=device),
        "input_ids": torch.tensor([ids], device=device),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
    }
    generator = torch.Generator(device=device).manual_seed(seed)
    end = end_of_turn_id(tokenizer)
    new: list[int] = model.generate(
        batch,
        mode=mode,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_id=end,
        use_cache=True,
        generator=generator,
    )[0].tolist()
    if end in new:
        new = new[: new.index(end)]
    # One sequence of ids decodes to one string (transformers types the result as str | list[str]).
    return cast(str, tokenizer.decode(new, skip_special_tokens=True))


def default_prompt(path: Path) -> str:
    from fvlm.data.decode import DEFAULT_PROMPTS

    return DEFAULT_PROMPTS["image" if check_visual_path(path) == "image" else "video"]


def cmd_generate(args: argparse.Namespace) -> int:
    from fvlm.eval.evaluate import find_checkpoints, run_config, run_system_prompt
    from fvlm.model.build import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = find_checkpoints(args.target)[-1]
    model, tokenizer = load_model(ckpt.folder, device=device)
    model.eval()
    if tokenizer is None:
        raise UsageError(f"{ckpt.folder}: no tokenizer saved with the model")
    mode: str = args.mode or ("autoregressive" if "autoregressive" in model.supported_modes else model.default_mode)
    if mode not in model.supported_modes:
        raise UsageError(f"--mode: this model has no '{mode}' mode (available: {', '.join(model.supported_modes)})")
    frames: np.ndarray | None = None
    prompt: str = args.prompt
    media: Path | None = None
    cfg = run_config(ckpt, model.cfg, [])
    if args.media is not None:
        media = Path(args.media).expanduser()
        frames = load_visual(
            media,
            size=cfg.model.image_size,
            max_frames=args.frames or cfg.data.max_frames,
            fps=cfg.data.fps,
            image_frames=args.frames or cfg.data.replicate_image_frames,
        )
        prompt = args.prompt if args.prompt is not None else default_prompt(media)
    text = generate_text(
        model,
        tokenizer,
        frames,
        prompt,
        mode=mode,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        device=device,
        system=run_system_prompt(cfg, tokenizer),
    )
    print(text)
    if args.attention and frames is not None and media is not None:
        from fvlm.data.decode import normalise
        from fvlm.eval.looks import attention_record, draw

        batch: Batch = {
            "frames": normalise(frames, model_pixel_stats(model))[None].to(device),
            "frame_mask": torch.ones(1, frames.shape[0], dtype=torch.bool, device=device),
        }
        out = Path(args.attention)
        record = attention_record(model, batch, [media.stem], ckpt.step, out)
        looked = draw(record, out, gif=args.gif)[media.stem]
        print(f"attention picture: {looked['png']}")
    return 0
