"""Multiple-choice benchmark readers, and running a benchmark in every mode.

Two inputs, one `Question` list:
- the project's shards (e.g. the synthetic `bench` split): the options are the `A. ...` lines of
  `user`, the answer is the letter `assistant` starts with;
- a JSONL file, one question per line (the format local copies of Video-MME, MVBench and MLVU are
  converted to; see docs/benchmarks.md):
  {"video": path, "question": str, "options": [str, ...], "answer": "B" | 1 | "option text",
   "category": str (optional), "id": any (optional), "subtitles": str (optional)}
  `video` is a video file, a folder of frames, or an image, relative to the JSONL file's folder.
Malformed entries are a UsageError naming the file and line (or shard and sample key).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from fvlm.config import RunConfig
from fvlm.errors import UsageError, json_problem, parse_json, read_text
from fvlm.eval.media import check_visual_path, load_visual
from fvlm.eval.scoring import Question

LETTERS = string.ascii_uppercase
JSONL_FIELDS = {"video", "question", "options", "answer", "category", "id", "subtitles"}
# The instruction lmms-eval adds to multiple-choice video questions (the generation protocol).
GENERATE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s+(.*\S)\s*$")
_LETTER_PREFIX = re.compile(r"^\s*\(?([A-Z])[.):]\s*")
_ANSWER_LETTER = re.compile(r"^\s*\(?([A-Z])\b")


@dataclass
class VisualSettings:
    """How frames are decoded: the run's own data settings, so evaluation sees what training saw."""

    size: int
    max_frames: int
    fps: float
    image_frames: int

    @classmethod
    def from_config(cls, cfg: RunConfig) -> VisualSettings:
        d = cfg.data
        return cls(cfg.model.image_size, d.max_frames, d.fps, d.replicate_image_frames)


def mc_prompt(question: str, options: list[str]) -> str:
    """The layout of the synthetic multiple-choice samples, so trained models see a familiar prompt."""
    listed = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{question}\n{listed}\nAnswer with the letter."


def generate_prompt(question: str, options: list[str]) -> str:
    """The generation protocol's prompt: the question, the lettered options, lmms-eval's instruction."""
    listed = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{question}\n{listed}\n{GENERATE_INSTRUCTION}"


def with_subtitles(prompt: str, subtitles: str | None) -> str:
    return f"The video's subtitles:\n{subtitles}\n\n{prompt}" if subtitles else prompt


# ----------------------------------------------------------------------------- shards


def _shard_frames(shard: str, start: int, end: int, kind: str, settings: VisualSettings) -> np.ndarray:
    from fvlm.data.decode import SampleError, decode_frames
    from fvlm.data.index import read_sample

    key, parts = read_sample(shard, start, end)
    try:
        return decode_frames(
            parts,
            kind,
            settings.size,
            max_frames=settings.max_frames,
            fps=settings.fps,
            replicate_image_frames=settings.image_frames,
        )
    except SampleError as exc:
        raise UsageError(f"{shard}: sample {key}: cannot decode ({exc.reason})") from None


def parse_mc_sample(user: str, assistant: str, where: str) -> tuple[list[str], int]:
    """(options as the assistant would write them, answer index) from a shard sample's text."""
    found = [m.groups() for m in map(_OPTION_LINE.match, user.splitlines()) if m]
    letters = [letter for letter, _ in found]
    if len(found) < 2 or letters != list(LETTERS[: len(found)]):
        raise UsageError(f"{where}: 'user' does not list options 'A. ...', 'B. ...' on their own lines")
    reply = assistant.strip()
    texts = [text for _, text in found]
    if reply in texts and len(set(texts)) == len(texts):
        # The answer is an option's text (no letter): each option is scored as that text.
        return texts, texts.index(reply)
    match = _ANSWER_LETTER.match(assistant)
    if not match or match.group(1) not in letters:
        raise UsageError(
            f"{where}: 'assistant' is neither one of the option letters {''.join(letters)} "
            f"nor one of the options' texts"
        )
    if reply.rstrip(".") == match.group(1):
        # Answers that are bare letters ("B", "B.") are scored in that same form.
        options = [letter + reply[1:] for letter in letters]
    else:
        options = [f"{letter}. {text}" for letter, text in found]
    return options, letters.index(match.group(1))


def read_shard_bench(spec: str, settings: VisualSettings) -> list[Question]:
    from fvlm.data.decode import SampleError, read_meta
    from fvlm.data.index import read_sample
    from fvlm.data.loader import load_index

    index = load_index(spec, "--bench")
    questions: list[Question] = []
    for row in range(len(index)):
        shard = index.shards[index.shard_id[row]]
        start, end = int(index.start[row]), int(index.end[row])
        key, parts = read_sample(shard, start, end)
        where = f"{shard}: sample {key}"
        try:
            meta = read_meta(parts)
        except SampleError as exc:
            raise UsageError(f"{where}: cannot read ({exc.reason})") from None
        options, answer = parse_mc_sample(str(meta.get("user") or ""), str(meta.get("assistant") or ""), where)
        kind = index.kind_of(row)
        questions.append(
            Question(
                where=where,
                prompt=meta["user"],
                options=options,
                answer=answer,
                category=str(meta.get("category") or kind),
                frames=partial(_shard_frames, shard, start, end, kind, settings),
            )
        )
    if not questions:
        raise UsageError(f"{spec}: no multiple-choice samples")
    return questions


# ----------------------------------------------------------------------------- JSONL


def _answer_index(answer: object, options: list[str], where: str) -> int:
    if isinstance(answer, bool):
        raise UsageError(f"{where}: 'answer' must be a letter, an option index or an option's text")
    if isinstance(answer, int):
        if 0 <= answer < len(options):
            return answer
        raise UsageError(f"{where}: 'answer' index {answer} is out of range for {len(options)} options")
    if isinstance(answer, str):
        text = answer.strip()
        letter = text.rstrip(".)").lstrip("(")
        if len(letter) == 1 and letter in LETTERS[: len(options)]:
            return LETTERS.index(letter)
        stripped = _LETTER_PREFIX.sub("", text)
        matches = [i for i, o in enumerate(options) if o == text or o == stripped]
        if len(matches) == 1:
            return matches[0]
    raise UsageError(f"{where}: 'answer' {answer!r} is neither an option letter, an index nor one option's text")


def _strip_letters(options: list[str]) -> list[str]:
    """Video-MME style options carry their own letters ("A. ..."); the prompt adds them again."""
    prefixes = [_LETTER_PREFIX.match(o) for o in options]
    lettered = [m for i, m in enumerate(prefixes) if m and m.group(1) == LETTERS[i]]
    if len(lettered) == len(options):
        return [o[m.end() :].strip() for o, m in zip(options, lettered)]
    return options


def parse_jsonl_entry(entry: object, where: str, base: Path) -> tuple[Path, str, list[str], int, str, str | None]:
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: expected a JSON object")
    unknown = sorted(set(entry) - JSONL_FIELDS)
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(JSONL_FIELDS))})")
    for name in ("video", "question", "options", "answer"):
        if name not in entry:
            raise UsageError(f"{where}: missing field '{name}'")
    if not isinstance(entry["video"], str) or not entry["video"]:
        raise UsageError(f"{where}: 'video' must be a path")
    if not isinstance(entry["question"], str) or not entry["question"].strip():
        raise UsageError(f"{where}: 'question' must be a non-empty string")
    options = entry["options"]
    if (
        not isinstance(options, list)
        or not 2 <= len(options) <= len(LETTERS)
        or not all(isinstance(o, str) and o.strip() for o in options)
    ):
        raise UsageError(f"{where}: 'options' must be a list of 2 to {len(LETTERS)} non-empty strings")
    options = _strip_letters([o.strip() for o in options])
    answer = _answer_index(entry["answer"], options, where)
    category = entry.get("category", "all")
    if not isinstance(category, str) or not category:
        raise UsageError(f"{where}: 'category' must be a non-empty string")
    subtitles = entry.get("subtitles")
    if subtitles is not None and not isinstance(subtitles, str):
        raise UsageError(f"{where}: 'subtitles' must be a string")
    video = Path(entry["video"]).expanduser()
    video = video if video.is_absolute() else base / video
    try:
        check_visual_path(video)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    return video, entry["question"].strip(), options, answer, category, (subtitles or "").strip() or None


def read_jsonl_bench(path: str | Path, settings: VisualSettings) -> list[Question]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such benchmark file")
    questions: list[Question] = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = parse_json(line)
        except ValueError as exc:
            raise UsageError(f"{where}: {json_problem(exc)}") from None
        video, question, options, answer, category, subtitles = parse_jsonl_entry(entry, where, path.parent)
        questions.append(
            Question(
                where=where,
                prompt=with_subtitles(mc_prompt(question, options), subtitles),
                generate_prompt=with_subtitles(generate_prompt(question, options), subtitles),
                options=[f"{LETTERS[i]}. {o}" for i, o in enumerate(options)],
                answer=answer,
                category=category,
                frames=partial(
                    load_visual,
                    video,
                    size=settings.size,
                    max_frames=settings.max_frames,
                    fps=settings.fps,
                    image_frames=settings.image_frames,
                ),
                video=str(video),
            )
        )
    if not questions:
        raise UsageError(f"{path}: no questions")
    return questions


def read_bench(spec: str, settings: VisualSettings) -> list[Question]:
    """A .jsonl file, or anything the data pipeline accepts as shards (folder, glob, .tar list)."""
    if spec.endswith((".jsonl", ".json")):
        return read_jsonl_bench(spec, settings)
    return read_shard_bench(spec, settings)


def bench_name(spec: str) -> str:
    path = Path(spec.rstrip("/"))
    return path.stem if path.suffix in (".jsonl", ".json", ".tar") else path.name
