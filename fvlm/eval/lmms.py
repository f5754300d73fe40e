"""lmms-eval's model "fvlm": an fvlm checkpoint answering lmms-eval's requests.

    python -m lmms_eval --model fvlm --model_args pretrained=runs/my_run,mode=coarse_fine \\
        --tasks my_bench --include_path my_tasks --batch_size 8

Model arguments (`--model_args key=value,...`):
- `pretrained`: a run folder (its latest complete checkpoint), a checkpoint folder or a saved model;
- `mode`: coarse_fine, coarse_only or autoregressive (default: the model's default mode);
- `max_frames`, `fps`: override the run's `data.max_frames` / `data.fps` for decoding videos;
- `max_new_tokens` (when a task's generation_kwargs set none, default 16), `seed` (sampling).
lmms-eval's own `--device` (default: cuda when there is one) and `--batch_size` (documents per
batch) reach the model as `device` and `batch_size`.

Visual inputs are what a task's `doc_to_visual` returns: paths to videos, frame folders or images
(decoded by fvlm's own media reader, as `fvlm eval` decodes them) and PIL images. One image is
repeated `data.replicate_image_frames` times as in training; several visuals are one frame sequence
(each image one frame), thinned uniformly to `max_frames`. No visual: a text-only question.

`loglikelihood` returns, per request, the mean loss (cross-entropy) per answer token and whether
greedy decoding would write the answer (inside a `GenerationResult`: see `loglikelihood`).
lmms-eval 0.7's multiple-choice `acc` picks the option with the lowest value (its models return the
loss, not the log-probability), which is `fvlm eval`'s `--score mean` choice. The context is the
user turn and the continuation (without the space lmms-eval puts before it) the assistant turn of
fvlm's chat template; the answer's tokens and its end-of-turn token are scored, as `fvlm eval`
scores options. `generate_until` decodes through `VLMBase.generate` with a KV cache, greedily
unless the task asks for sampling. `generate_until_multi_round` is not supported.

The model registers through the `lmms_eval.models` entry point (pyproject.toml), which lmms-eval
reads when fvlm is installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from fvlm.errors import UsageError

MODEL_ID = "fvlm"
CLASS_PATH = f"{__name__}.FvlmLmms"


def manifest() -> Any:
    """The entry point's payload: lmms-eval's registration of the "fvlm" model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _int(value: Any, key: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"--model_args {key}={value!r}: expected a whole number") from None
    if number < 1:
        raise UsageError(f"--model_args {key}={value!r}: expected a number >= 1")
    return number


def _skip_filelock3_patch() -> None:
    """lmms-eval 0.7's `simple_evaluate` first patches filelock 3's lock metaclass (`filelock._api`),
    which filelock 4 (fvlm's pinned version) does not have: the import would fail every evaluation.
    With filelock 4 that patch is marked as done, so it is skipped."""
    import importlib.util

    if importlib.util.find_spec("filelock._api") is None:
        from lmms_eval import evaluator

        evaluator._enable_reentrant_filelocks._patched = True


class FvlmLmms(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        mode: str | None = None,
        device: str | None = None,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,  # lmms-eval passes it to every model; batches are fixed here
        max_frames: int | None = None,
        fps: float | None = None,
        max_new_tokens: int = 16,
        seed: int = 0,
        **unknown: Any,
    ) -> None:
        super().__init__()
        _skip_filelock3_patch()
        if unknown:
            raise UsageError(
                f"--model_args: unknown key(s) {', '.join(sorted(unknown))} for the fvlm model (known: pretrained, "
                "mode, device, batch_size, max_frames, fps, max_new_tokens, seed)"
            )
        from fvlm.eval.bench import VisualSettings
        from fvlm.eval.evaluate import find_checkpoints, resolve_modes, run_config, run_system_prompt
        from fvlm.model.build import load_model

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = _int(batch_size, "batch_size")
        self.max_new_tokens = _int(max_new_tokens, "max_new_tokens")
        try:
            self.seed = int(seed)
        except (TypeError, ValueError):
            raise UsageError(f"--model_args seed={seed!r}: expected a whole number") from None
        ckpt = find_checkpoints(str(pretrained))[-1]
        model, tokenizer = load_model(ckpt.folder, device=self.device)
        if tokenizer is None:
            raise UsageError(f"{ckpt.folder}: no tokenizer saved with the model")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.mode = resolve_modes([mode], model)[0] if mode else model.default_mode
        overrides = []
        if max_frames is not None:
            overrides.append(f"data.max_frames={_int(max_frames, 'max_frames')}")
        if fps is not None:
            try:
                overrides.append(f"data.fps={float(fps)}")
            except (TypeError, ValueError):
                raise UsageError(f"--model_args fps={fps!r}: expected a number") from None
        cfg = run_config(ckpt, model.cfg, overrides)
        self.settings = VisualSettings.from_config(cfg)
        # The system turn the run trained with, before every prompt (as `fvlm eval` does).
        self.system = run_system_prompt(cfg, tokenizer)
        self.checkpoint = ckpt

    # ------------------------------------------------------------------ visual input
    def _visual_frames(self, item: Any, alone: bool, where: str) -> np.ndarray:
        from PIL import Image

        from fvlm.data.decode import _fit
        from fvlm.eval.media import load_visual

        s = self.settings
        # One image stands for a video of `image_frames` frames, as in training; among several
        # visuals it is one frame.
        image_frames = s.image_frames if alone else 1
        if isinstance(item, Image.Image):
            frame = _fit(item.copy(), s.size)  # a copy: the task's document keeps its image as it was
            return np.repeat(frame[None], image_frames, axis=0)
        if isinstance(item, (str, bytes)) or hasattr(item, "__fspath__"):
            path = item.decode() if isinstance(item, bytes) else item
            return load_visual(path, size=s.size, max_frames=s.max_frames, fps=s.fps, image_frames=image_frames)
        raise UsageError(
            f"{where}: a visual of type {type(item).__name__} (fvlm reads video, frame-folder or image paths "
            "and PIL images)"
        )

    def _frames(self, visuals: Any, where: str) -> np.ndarray:
        """uint8 [T, S, S, 3] for one document's visuals; T = 0 without any."""
        items = _flatten(visuals)
        s = self.settings
        if not items:
            return np.zeros((0, s.size, s.size, 3), dtype=np.uint8)
        parts = [self._visual_frames(item, len(items) == 1, where) for item in items]
        frames = np.concatenate(parts)
        if frames.shape[0] > s.max_frames:
            frames = frames[np.linspace(0, frames.shape[0] - 1, s.max_frames).round().astype(int)]
        return frames

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _request_frames(self, args: tuple, doc_to_visual: Callable | None) -> np.ndarray:
        if doc_to_visual is None:
            return self._frames(None, "")
        doc_id, task, split = args[-3:]
        return self._frames(doc_to_visual(self._doc(task, split, doc_id)), f"{task}/{split} doc {doc_id}")

    def _visual_batch(self, frames_list: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        from fvlm.eval.scoring import frames_batch

        frames, mask = frames_batch(frames_list)
        return frames.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ log-likelihood
    def _grouped(self, requests: list[Instance]) -> list[tuple[tuple, Callable | None, list[int]]]:
        """Requests by document, in first-seen order: (document key, doc_to_visual, request indices).
        A document's options share its frames, decoded and encoded once."""
        groups: dict[tuple, tuple[Callable | None, list[int]]] = {}
        for i, request in enumerate(requests):
            args = request.args
            # Unconditional requests (acc_mutual_info) come as (context, continuation) alone.
            key = tuple(args[-3:]) if len(args) >= 6 else ("no visual", i)
            visual = args[2] if len(args) >= 6 else None
            groups.setdefault(key, (visual, []))[1].append(i)
        return [(key, visual, rows) for key, (visual, rows) in groups.items()]

    def _continuation(self, args: tuple) -> str:
        continuation = args[1]
        if not isinstance(continuation, str):  # a task's doc_to_target function (output_type loglikelihood)
            doc_id, task, split = args[-3:]
            continuation = continuation(self._doc(task, split, doc_id))
        return str(continuation)

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(mean loss per answer token, greedy) per request, each inside a `GenerationResult`: lmms-eval
        0.7.3's evaluator turns any other model output that is not text into its `str()`, which its
        multiple-choice scoring cannot read; it hands a GenerationResult's content on unchanged."""
        return [GenerationResult(text=pair) for pair in self.scores(requests)]

    @torch.no_grad()
    def scores(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(mean loss per answer token, whether greedy decoding writes the answer) per request."""
        from fvlm.eval.scoring import _pad, encode_answers

        results: list[tuple[float, bool]] = [(float("nan"), False)] * len(requests)
        pad_id = self.tokenizer.pad_token_id
        groups = self._grouped(requests)
        for chunk in tqdm(list(_chunks(groups, self.batch_size)), desc="fvlm loglikelihood", unit="batch"):
            frames, frame_mask = self._visual_batch(
                [self._request_frames(requests[rows[0]].args, visual) for _, visual, rows in chunk]
            )
            visual, visual_mask = self.model.visual_tokens({"frames": frames, "frame_mask": frame_mask}, self.mode)
            owner, texts, answer_lengths, order = [], [], [], []
            for doc, (key, _, rows) in enumerate(chunk):
                for i in rows:
                    args = requests[i].args
                    encoded = encode_answers(
                        self.tokenizer, args[0], [self._continuation(args).strip()], f"{key}", self.system
                    )
                    answer = encoded.option_ids[0]
                    owner.append(doc)
                    texts.append(encoded.prompt_ids + answer)
                    answer_lengths.append(len(answer))
                    order.append(i)
            ids, attention = _pad(texts, pad_id, self.device)
            loss_mask = torch.zeros_like(attention)
            for row, (text, n) in enumerate(zip(texts, answer_lengths)):
                loss_mask[row, len(text) - n : len(text)] = 1
            rows_of = torch.tensor(owner, device=self.device)
            v, vm = visual[rows_of], visual_mask[rows_of]
            # VLMBase.loss_over's pieces, so that one LLM pass gives both the loss and the greedy check.
            embeds = torch.cat([v, self.model.embed_text(ids)], dim=1)
            mask = torch.cat([vm.long(), attention], dim=1)
            hidden = self.model.run_llm(embeds, mask)
            summed, counts = self.model.text_loss(hidden, mask, ids, loss_mask, per_sample=True)
            text_start = mask.shape[1] - ids.shape[1]
            target_rows, target_cols = loss_mask.nonzero(as_tuple=True)
            # An answer token's predictor is the text token before it (the prompt precedes every answer).
            predicted = self.model.llm.lm_head(hidden[target_rows, text_start + target_cols - 1]).argmax(-1)
            wrong = (predicted != ids[target_rows, target_cols]).long()
            misses = torch.zeros(len(texts), dtype=torch.long, device=self.device).index_add_(0, target_rows, wrong)
            for row, i in enumerate(order):
                results[i] = (float(summed[row] / counts[row]), bool(misses[row] == 0))
        return results

    # ------------------------------------------------------------------ generation
    def _generation_settings(self, kwargs: dict[str, Any]) -> tuple[int, float, list[str]]:
        kwargs = dict(kwargs or {})
        if int(kwargs.get("num_beams", 1) or 1) > 1:
            raise UsageError("generation_kwargs num_beams > 1: fvlm decodes greedily or by sampling, not by beams")
        max_new = _int(kwargs.get("max_new_tokens") or self.max_new_tokens, "max_new_tokens")
        temperature = float(kwargs.get("temperature") or 0.0)
        if not kwargs.get("do_sample", temperature > 0):
            temperature = 0.0
        until = kwargs.get("until") or []
        return max_new, temperature, [until] if isinstance(until, str) else list(until)

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        from fvlm.eval.scoring import _pad, end_of_turn_id, question_messages
        from fvlm.model.tokenizer import chat_ids

        end = end_of_turn_id(self.tokenizer)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        out: list[str] = [""] * len(requests)
        # Requests with the same generation settings are batched together, in order.
        runs: dict[tuple, list[int]] = {}
        settings = [self._generation_settings(r.args[1]) for r in requests]
        for i, (max_new, temperature, until) in enumerate(settings):
            runs.setdefault((max_new, temperature, tuple(until)), []).append(i)
        for (max_new, temperature, until), indices in runs.items():
            for chunk in tqdm(list(_chunks(indices, self.batch_size)), desc="fvlm generate", unit="batch"):
                frames, frame_mask = self._visual_batch(
                    [self._request_frames(requests[i].args, requests[i].args[2]) for i in chunk]
                )
                prompts = [
                    chat_ids(
                        self.tokenizer, question_messages(requests[i].args[0], self.system), add_generation_prompt=True
                    )
                    for i in chunk
                ]
                ids, attention = _pad(prompts, self.tokenizer.pad_token_id, self.device)
                new = self.model.generate(
                    {"frames": frames, "frame_mask": frame_mask, "input_ids": ids, "attention_mask": attention},
                    mode=self.mode,
                    max_new_tokens=max_new,
                    temperature=temperature,
                    eos_token_id=end,
                    generator=generator,
                )
                for i, row in zip(chunk, new.tolist()):
                    if end is not None and end in row:
                        row = row[: row.index(end)]
                    text = str(self.tokenizer.decode(row, skip_special_tokens=True))
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    out[i] = text.strip()
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the fvlm model answers one turn per request; multi-round tasks are not supported")
