"""The generation protocol, beside log-likelihood scoring: the model reads the question with its
lettered options and lmms-eval's instruction, answers greedily (batched, KV-cached), and the letter
is extracted from what it wrote. This is how published numbers (lmms-eval, the SmolVLM2 report) are
made; log-likelihood scoring never lets a model answer off the list, generation does, and an answer
with no letter in it counts as wrong (`no_letter` says how often).
"""

from __future__ import annotations

import re
import string

import numpy as np
import torch

from fvlm.eval.scoring import Question, accuracy_summary

LETTERS = string.ascii_uppercase
PROTOCOLS = ("loglik", "generate")
_LEADING = re.compile(r"^[(\[]?([A-Z])(?:[)\].:,]|$)")
_ALONE = re.compile(r"^[(\[]?([A-Za-z])[)\].]?$")
# "The answer is D.", "Answer: a", "the correct option is (B)", "Best choice: C": a statement word,
# an optional 'is'/':', then one letter standing alone.
_STATED = re.compile(
    r"\b(?:answer|option|choice)\s*(?:is\s*|:\s*|=\s*)?(?:option\s+|letter\s+)?[(\[]?([A-Za-z])[)\]]?(?=$|[\s.,:;!?)])",
    re.IGNORECASE,
)
_WORDS = re.compile(r"[^a-z0-9]+")


def _normal(text: str) -> str:
    return _WORDS.sub(" ", text.lower()).strip()


def extract_letter(text: str, options: list[str]) -> int | None:
    """The option index a generated answer names, or None. In order: a leading letter ("B",
    "B.", "(C) the dog", "D: ..."), a lone letter in either case ("a"), a stated one ("The answer
    is D.", "Answer: a"; a lower-case letter only when nothing but punctuation follows it, so
    "the answer is a dog" names none), then the text of exactly one option inside the answer.
    Letters past the options ("E" of four) name none."""
    n = len(options)
    t = text.strip()
    for pattern in (_LEADING, _ALONE):
        m = pattern.match(t)
        if m:
            index = LETTERS.find(m.group(1).upper())
            return index if index < n else None
    for m in _STATED.finditer(t):
        letter = m.group(1)
        following = t[m.end() :].lstrip(" )]")
        if letter.islower() and following[:1].isalnum():
            continue
        if letter.isupper() and following[:1].islower() and not following.startswith(("because", "since", "as ")):
            continue  # "The answer is A dog": an article, not a letter
        index = LETTERS.find(letter.upper())
        return index if index < n else None
    said = f" {_normal(t)} "
    hits = [i for i, o in enumerate(options) if _normal(o) and f" {_normal(o)} " in said]
    return hits[0] if len(hits) == 1 else None


def summarise_generated(questions: list[Question], responses: list[str]) -> dict:
    """Accuracy of generated answers (a missing letter is wrong), overall and per category, with
    the same intervals as the log-likelihood scores."""
    picked = [extract_letter(r, q.options) for r, q in zip(responses, questions)]
    correct = [p == q.answer for p, q in zip(picked, questions)]
    options = [len(q.options) for q in questions]
    clusters = [q.cluster for q in questions]
    result = accuracy_summary(correct, options, clusters)
    result["protocol"] = "generate"
    result["no_letter"] = sum(p is None for p in picked)
    result["correct"] = [int(c) for c in correct]
    result["question_ids"] = [q.where for q in questions]
    result["videos"] = clusters
    result["responses"] = list(responses)
    result["per_category"] = per_category(questions, correct)
    return result


def per_category(questions: list[Question], correct: list[bool]) -> dict[str, dict]:
    out = {}
    for category in sorted({q.category for q in questions}):
        rows = [i for i, q in enumerate(questions) if q.category == category]
        out[category] = accuracy_summary(
            [correct[i] for i in rows], [len(questions[i].options) for i in rows], [questions[i].cluster for i in rows]
        )
    return out


def macro_accuracy(result: dict) -> float:
    """The mean of the per-category accuracies (MVBench's and MLVU's average over tasks)."""
    values = [c["accuracy"] for c in result["per_category"].values()]
    return float(np.mean(values)) if values else float("nan")


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    questions: list[Question],
    frames: torch.Tensor,
    frame_mask: torch.Tensor,
    modes: tuple[str, ...],
    max_new_tokens: int,
    system: str | None = None,
) -> dict[str, list[str]]:
    """Greedy answers of an fvlm model to a batch of questions, per mode, through
    `VLMBase.generate` (prompts right-padded; it left-aligns them), after the run's system turn."""
    from fvlm.eval.scoring import _pad, end_of_turn_id, question_messages
    from fvlm.model.tokenizer import chat_ids

    prompts = [
        chat_ids(tokenizer, question_messages(q.generate_prompt or q.prompt, system), add_generation_prompt=True)
        for q in questions
    ]
    ids, mask = _pad(prompts, tokenizer.pad_token_id, frames.device)
    end = end_of_turn_id(tokenizer)
    out: dict[str, list[str]] = {}
    for mode in modes:
        batch = {"frames": frames, "frame_mask": frame_mask, "input_ids": ids, "attention_mask": mask}
        new = model.generate(batch, mode=mode, max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=end)
        texts = []
        for row in new.tolist():
            if end is not None and end in row:
                row = row[: row.index(end)]
            texts.append(str(tokenizer.decode(row, skip_special_tokens=True)).strip())
        out[mode] = texts
    return out
