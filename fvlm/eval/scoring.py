"""Multiple-choice scoring by answer log-likelihood, in every inference mode, from one DINO pass.

Per batch of questions the expensive parts run once: DINO over the frames (all modes share it),
each mode's visual block, and the LLM over [visual block + prompt] (kept as a KV cache). Every
option of every question is then one row of a single batched continuation over that cache.

An option's score is the log-likelihood of its answer tokens: the assistant turn's content and its
end-of-turn token, exactly the tokens a stage 2-3 run is trained on, tokenised through the chat
template as in training. Both the sum and the mean over tokens are returned; `mean` is the default
choice because options differ in length and a sum penalises the longer ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fvlm.errors import UsageError
from fvlm.model.backbones import IMAGENET, PixelStats

SCORE_KINDS = ("mean", "sum")


@dataclass
class Question:
    """One multiple-choice item. `options` are the full answers as the assistant would write them
    (e.g. "B. blue square"); `frames()` decodes its visual input, uint8 [T, S, S, 3], on demand.
    `video` names the visual input: questions with the same one are resampled together in the
    accuracy's interval (None: a video of its own). `generate_prompt` is the generation protocol's
    prompt (lettered options and lmms-eval's instruction; None: `prompt` itself)."""

    where: str
    prompt: str
    options: list[str]
    answer: int
    category: str
    frames: Callable[[], np.ndarray]
    video: str | None = None
    generate_prompt: str | None = None

    @property
    def cluster(self) -> str:
        return self.video if self.video is not None else self.where


@dataclass
class Encoded:
    prompt_ids: list[int]
    option_ids: list[list[int]]


def end_of_turn_id(tokenizer) -> int | None:
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return end if isinstance(end, int) and end != tokenizer.unk_token_id else tokenizer.eos_token_id


def question_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """A question as the chat messages training's dialogues open with: the run's system turn (what
    `data.system_prompt` gave its samples, `fvlm.data.decode.system_prompt_for`), then the user turn."""
    system_turn = [{"role": "system", "content": system}] if system is not None else []
    return system_turn + [{"role": "user", "content": prompt}]


def encode_question(tokenizer, question: Question, system: str | None = None) -> Encoded:
    """Prompt ids (through the assistant header) and each option's answer ids, cut from the full
    chat-template dialogue so that the tokens are the ones training saw (`system`: the run's system
    turn, as training put it before every dialogue)."""
    return encode_answers(tokenizer, question.prompt, question.options, question.where, system)


def encode_answers(tokenizer, prompt_text: str, answers: list[str], where: str, system: str | None = None) -> Encoded:
    """`encode_question` for a prompt and its candidate answers given as text (`where` names them in
    errors)."""
    from fvlm.model.tokenizer import chat_ids

    user = question_messages(prompt_text, system)
    prompt = chat_ids(tokenizer, user, add_generation_prompt=True)
    end = end_of_turn_id(tokenizer)
    options = []
    for option in answers:
        dialogue = user + [{"role": "assistant", "content": option}]
        ids = chat_ids(tokenizer, dialogue)
        if ids[: len(prompt)] != prompt:
            raise UsageError(f"{where}: the tokenizer's chat template does not extend the prompt with the answer")
        answer = ids[len(prompt) :]
        if end is not None and end in answer:
            answer = answer[: answer.index(end) + 1]
        if not answer:
            raise UsageError(f"{where}: option {option!r} has no answer tokens")
        options.append(answer)
    return Encoded(prompt, options)


def frames_batch(
    frames_list: list[np.ndarray], pixel_stats: PixelStats = IMAGENET
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [T_i, S, S, 3] per question -> frames [Q, T, 3, S, S] normalised with the DINO's mean and
    std (`pixel_stats`: the model's, `fvlm.model.backbones.model_pixel_stats`) and frame_mask [Q, T]."""
    from fvlm.data.decode import normalise

    t_max = max(f.shape[0] for f in frames_list)
    size = frames_list[0].shape[1]
    frames = torch.zeros(len(frames_list), t_max, 3, size, size)
    mask = torch.zeros(len(frames_list), t_max, dtype=torch.bool)
    for q, f in enumerate(frames_list):
        frames[q, : f.shape[0]] = normalise(f, pixel_stats)
        mask[q, : f.shape[0]] = True
    return frames, mask


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _token_logprobs(model, predictors: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model.llm.lm_head(predictors)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def score_batch(
    model, encoded: list[Encoded], frames: torch.Tensor, frame_mask: torch.Tensor, modes: tuple[str, ...], pad_id: int
) -> dict[str, list[np.ndarray]]:
    """{mode: per question, an array [n_options, 2] of (sum, mean) answer log-likelihoods}."""
    device = frames.device
    blocks = model.visual_blocks({"frames": frames, "frame_mask": frame_mask}, modes)
    prompt_ids, prompt_mask = _pad([e.prompt_ids for e in encoded], pad_id, device)
    owner = torch.tensor([q for q, e in enumerate(encoded) for _ in e.option_ids], device=device)
    option_ids, option_mask = _pad([o for e in encoded for o in e.option_ids], pad_id, device)
    lengths = option_mask.sum(1)
    prompt_embeds = model.embed_text(prompt_ids)
    option_embeds = model.embed_text(option_ids)
    scores = {}
    for mode in modes:
        visual, visual_mask, _ = blocks[mode]
        embeds = torch.cat([visual, prompt_embeds], dim=1)
        mask = torch.cat([visual_mask.long(), prompt_mask], dim=1)
        cache = model._new_cache()
        hidden = model.run_llm(embeds, mask, cache=cache)
        last_real = mask.shape[1] - 1 - mask.flip(1).argmax(1)
        last_hidden = hidden[torch.arange(len(encoded), device=device), last_real]
        # Each option row continues its own question's prefix: the cache rows are repeated to match.
        cache.batch_select_indices(owner)
        full_mask = torch.cat([mask[owner], option_mask], dim=1)
        option_hidden = model.run_llm(option_embeds, full_mask, cache=cache)
        predictors = torch.cat([last_hidden[owner, None], option_hidden[:, :-1]], dim=1)
        logp = _token_logprobs(model, predictors, option_ids) * option_mask
        total = logp.sum(1)
        per_row = torch.stack([total, total / lengths], dim=1).cpu().numpy()
        split = np.cumsum([len(e.option_ids) for e in encoded])[:-1]
        scores[mode] = np.split(per_row, split)
    return scores


@torch.no_grad()
def score_option_alone(
    model, encoded: Encoded, option: int, frames: torch.Tensor, frame_mask: torch.Tensor, mode: str
) -> tuple[float, float]:
    """The plain way, kept as the reference the batched path is checked and benchmarked against:
    DINO, the visual block and the whole [visual + prompt + answer] sequence for this one option."""
    visual, visual_mask = model.visual_tokens({"frames": frames, "frame_mask": frame_mask}, mode)
    answer = encoded.option_ids[option]
    ids = torch.tensor([encoded.prompt_ids + answer], device=frames.device)
    embeds = torch.cat([visual, model.embed_text(ids)], dim=1)
    mask = torch.cat([visual_mask.long(), torch.ones_like(ids)], dim=1)
    hidden = model.run_llm(embeds, mask)
    n = len(answer)
    predictors = hidden[:, -n - 1 : -1]
    total = float(_token_logprobs(model, predictors, ids[:, -n:]).sum())
    return total, total / n


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval: honest near 0 and 1 and for small n, unlike p +- z*se."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def accuracy_summary(correct: list[bool], n_options: list[int], clusters: list[str] | None = None) -> dict:
    """Accuracy, chance and a 95% interval: Wilson when every question has a video of its own; when
    questions share videos (`clusters`, one per question), the percentile interval of a bootstrap
    over whole videos, since a Wilson interval would count correlated questions as independent.
    The Wilson interval is reported beside it either way."""
    from fvlm.eval.stats import clustered_accuracy_interval, shares_clusters

    n = len(correct)
    hits = int(sum(correct))
    wilson = list(wilson_interval(hits, n))
    clustered = bool(n and clusters is not None and shares_clusters(clusters))
    return {
        "accuracy": hits / n if n else float("nan"),
        "ci95": clustered_accuracy_interval(correct, clusters) if clustered else wilson,
        "ci95_method": f"bootstrap over {len(set(clusters or []))} videos" if clustered else "wilson",
        "ci95_wilson": wilson,
        "chance": float(np.mean([1.0 / k for k in n_options])) if n else float("nan"),
        "n": n,
    }


def chosen_options(scores: list[np.ndarray], score: str = "mean") -> list[int]:
    """The option each question's score picks (the highest log-likelihood; the first on a tie)."""
    column = {"sum": 0, "mean": 1}[score]
    return [int(np.argmax(s[:, column])) for s in scores]


def summarise(questions: list[Question], scores: list[np.ndarray], score: str = "mean") -> dict:
    """Overall and per-category accuracy for one mode; the other score kind is reported beside it."""
    picked = {kind: chosen_options(scores, kind) for kind in SCORE_KINDS}
    correct = [p == q.answer for p, q in zip(picked[score], questions)]
    options = [len(q.options) for q in questions]
    clusters = [q.cluster for q in questions]
    result = accuracy_summary(correct, options, clusters)
    result["score"] = score
    # Per question, in order: what paired comparisons (two modes, two runs) are computed from, and
    # the video each question belongs to (questions of one video are resampled together).
    result["correct"] = [int(c) for c in correct]
    result["question_ids"] = [q.where for q in questions]
    result["videos"] = clusters
    other = "sum" if score == "mean" else "mean"
    result[f"accuracy_{other}"] = float(np.mean([p == q.answer for p, q in zip(picked[other], questions)]))
    per_category = {}
    for category in sorted({q.category for q in questions}):
        rows = [i for i, q in enumerate(questions) if q.category == category]
        per_category[category] = accuracy_summary(
            [correct[i] for i in rows], [options[i] for i in rows], [clusters[i] for i in rows]
        )
    result["per_category"] = per_category
    return result
