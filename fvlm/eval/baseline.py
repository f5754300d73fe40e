"""Baselines in fvlm's harness: any transformers image-text-to-text model (SmolVLM2, Idefics3, ...)
in a local folder, loaded with AutoProcessor and AutoModelForImageTextToText, answers the same
benchmark questions under both protocols.

The video is given to it as its frames, one image each, sampled as fvlm samples them (the run's
`data.fps` and `data.max_frames`) but decoded at the processor's own image size
(`max_image_size`, else `size`, longest edge). Log-likelihood: each option, as the assistant's
answer in the model's chat template, is scored by the log-likelihood of its tokens through the
first end-of-turn token, as fvlm's own options are. Generation: greedy, batched, left-padded.
SmolVLM2's processor needs torchvision (its video processor) and num2words installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fvlm.errors import UsageError
from fvlm.eval.scoring import Question

END_OF_TURN_TOKENS = ("<end_of_utterance>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


class TransformersBaseline:
    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = Path(folder).expanduser()
        if not (path / "config.json").is_file():
            raise UsageError(f"--baseline {path}: not a transformers model folder (no config.json)")
        try:
            self.processor = AutoProcessor.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
            model: Any = AutoModelForImageTextToText.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False, dtype="float32"
            )
        except (OSError, ValueError, ImportError, KeyError) as exc:
            raise UsageError(
                f"--baseline {path}: cannot load an image-text-to-text model ({_first_line(exc)})"
            ) from None
        model.to(torch.device(device))
        model.eval()
        self.model = model
        self.device = device
        self.label = f"{self.model.config.model_type}:{path.name}"
        tokenizer = self.processor.tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        found = [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
        self.end: int | None = found[0] if found else tokenizer.eos_token_id
        image = self.processor.image_processor
        edge = (getattr(image, "max_image_size", None) or {}).get("longest_edge") or (
            getattr(image, "size", None) or {}
        ).get("longest_edge")
        self.image_size: int | None = int(edge) if edge else None

    # ------------------------------------------------------------------ inputs

    def frames(self, question: Question, settings) -> np.ndarray:
        """The question's frames at the processor's size (fvlm's sampling); shard questions as fvlm decodes them."""
        from fvlm.eval.media import load_visual

        if question.video is None or self.image_size is None:
            return question.frames()
        return load_visual(
            question.video,
            size=self.image_size,
            max_frames=settings.max_frames,
            fps=settings.fps,
            image_frames=settings.image_frames,
        )

    def _text(self, prompt: str, n_images: int, answer: str | None = None) -> str:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return str(self.processor.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=False))

    def _inputs(self, texts: list[str], images: list[list], side: str) -> dict:
        from PIL import Image

        self.tokenizer.padding_side = side
        pil = [[Image.fromarray(f) for f in frames] for frames in images]
        inputs = self.processor(text=texts, images=pil if any(pil) else None, return_tensors="pt", padding=True)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    # ------------------------------------------------------------------ protocols

    @torch.no_grad()
    def option_scores(self, question: Question, frames: np.ndarray) -> np.ndarray:
        """[n_options, 2]: (sum, mean) log-likelihood of each option's answer tokens."""
        images = list(frames)
        prompt = self._text(question.prompt, len(images))
        fulls = [self._text(question.prompt, len(images), option) for option in question.options]
        if not all(f.startswith(prompt) for f in fulls):
            raise UsageError(f"--baseline {self.label}: its chat template does not extend the prompt with the answer")
        prompt_ids = self._inputs([prompt], [images], "right")["input_ids"][0]
        n_prompt = len(prompt_ids)
        inputs = self._inputs(fulls, [images] * len(fulls), "right")
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        logp = self.model(**inputs).logits.float().log_softmax(-1)
        rows = []
        for i in range(len(fulls)):
            length = int(mask[i].sum())
            if not torch.equal(ids[i, :n_prompt], prompt_ids):
                raise UsageError(f"{question.where}: the baseline's tokens of the prompt change when an answer follows")
            answer = ids[i, n_prompt:length].tolist()
            if self.end is not None and self.end in answer:
                answer = answer[: answer.index(self.end) + 1]
            if not answer:
                raise UsageError(f"{question.where}: option {question.options[i]!r} has no answer tokens")
            positions = torch.arange(n_prompt - 1, n_prompt - 1 + len(answer), device=ids.device)
            total = float(logp[i, positions, torch.tensor(answer, device=ids.device)].sum())
            rows.append((total, total / len(answer)))
        return np.array(rows, dtype=np.float64)

    @torch.no_grad()
    def generate(self, questions: list[Question], frames: list[np.ndarray], max_new_tokens: int) -> list[str]:
        texts = [self._text(q.generate_prompt or q.prompt, len(f)) for q, f in zip(questions, frames)]
        inputs = self._inputs(texts, [list(f) for f in frames], "left")
        out = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.end,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        answers = []
        for row in out[:, inputs["input_ids"].shape[1] :].tolist():
            if self.end is not None and self.end in row:
                row = row[: row.index(self.end)]
            answers.append(str(self.tokenizer.decode(row, skip_special_tokens=True)).strip())
        return answers


def run_baseline(
    baseline: TransformersBaseline,
    questions: list[Question],
    settings,
    *,
    protocols: tuple[str, ...],
    batch_size: int,
    score: str,
    max_new_tokens: int,
) -> tuple[dict | None, dict | None]:
    """(log-likelihood summary, generation summary) of one benchmark, None for a protocol not asked."""
    from fvlm.eval.protocol import summarise_generated
    from fvlm.eval.scoring import summarise

    scores: list[np.ndarray] = []
    responses: list[str] = []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        frames = [baseline.frames(q, settings) for q in chunk]
        if "loglik" in protocols:
            scores += [baseline.option_scores(q, f) for q, f in zip(chunk, frames)]
        if "generate" in protocols:
            responses += baseline.generate(chunk, frames, max_new_tokens)
    loglik = summarise(questions, scores, score) if "loglik" in protocols else None
    generated = summarise_generated(questions, responses) if "generate" in protocols else None
    return loglik, generated
