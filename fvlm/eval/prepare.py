"""`fvlm bench prepare`: Video-MME, MVBench and MLVU as released, into fvlm's benchmark JSONL.

Each reader takes the folder the benchmark was downloaded to (SRC) and writes `OUT/<name>.jsonl`
(the format `fvlm eval --bench` reads: fvlm.eval.bench) and `OUT/prepare_report.json`. Source
videos are referenced where they lie (absolute paths); clips that the benchmark defines by a start
and end time are cut by fvlm with PyAV into `OUT/clips/`. A record that cannot be used (its video
missing, a field of the wrong type, an answer that is not one of its options) is skipped and
counted by reason, never fatal; a missing annotation file or column is a one-line error.

Layouts read (the public releases):
- Video-MME: `videomme/test-*.parquet` with columns video_id, duration (short/medium/long), domain,
  sub_category, task_type, question, options ("A. ..." strings), answer (a letter), videoID,
  question_id, url; videos `data/<videoID>.mp4`; subtitles `subtitle/<videoID>.srt` (--subtitles).
  Category: the duration class, as the paper's table is split.
- MVBench: `json/<task>.json` (items: video, question, candidates, answer = the right candidate's
  text; some tasks start/end in seconds) and `video/<source dataset>/...` (the task's folder from
  MVBench's task table; one task is folders of frames at 3 frames/s). Category: the task.
- MLVU: `json/<n>_<task>.json` (items: video, question, candidates, answer text, question_type)
  and `video/<n>_<task>/`. The open-ended tasks (items without candidates: sub-scene captions,
  summaries) are not multiple choice: skipped and counted per task. Category: the task.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

from fvlm import atomic
from fvlm.errors import UsageError, json_problem, read_json
from fvlm.eval.media import VIDEO_EXTS

BENCHMARKS = ("video-mme", "mvbench", "mlvu")
REPORT = "prepare_report.json"
# MVBench's task table: json file stem -> (video folder under video/, "video" | "frame"). The tasks
# marked in it as having start/end carry the times in their items, which is what is read here.
MVBENCH_TASKS = {
    "action_sequence": ("star/Charades_v1_480", "video"),
    "action_prediction": ("star/Charades_v1_480", "video"),
    "action_antonym": ("ssv2_video", "video"),
    "fine_grained_action": ("Moments_in_Time_Raw/videos", "video"),
    "unexpected_action": ("FunQA_test/test", "video"),
    "object_existence": ("clevrer/video_validation", "video"),
    "object_interaction": ("star/Charades_v1_480", "video"),
    "object_shuffle": ("perception/videos", "video"),
    "moving_direction": ("clevrer/video_validation", "video"),
    "action_localization": ("sta/sta_video", "video"),
    "scene_transition": ("scene_qa/video", "video"),
    "action_count": ("perception/videos", "video"),
    "moving_count": ("clevrer/video_validation", "video"),
    "moving_attribute": ("clevrer/video_validation", "video"),
    "state_change": ("perception/videos", "video"),
    "fine_grained_pose": ("nturgbd", "video"),
    "character_order": ("perception/videos", "video"),
    "egocentric_navigation": ("vlnqa", "video"),
    "episodic_reasoning": ("tvqa/frames_fps3_hq", "frame"),
    "counterfactual_inference": ("clevrer/video_validation", "video"),
}
MVBENCH_FRAME_FPS = 3.0  # the frame-folder task's frames are sampled at 3 per second
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class Skip(Exception):
    """A record left out; `reason` is its count's key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Report:
    benchmark: str
    written: int = 0
    clips_cut: int = 0
    clips_reused: int = 0
    without_subtitles: int = 0  # questions kept without subtitles (their video has none)
    skipped: Counter = field(default_factory=Counter)
    open_ended_skipped: Counter = field(default_factory=Counter)
    per_category: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "written": self.written,
            "per_category": dict(sorted(self.per_category.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "open_ended_skipped": dict(sorted(self.open_ended_skipped.items())),
            "clips_cut": self.clips_cut,
            "clips_reused": self.clips_reused,
            "without_subtitles": self.without_subtitles,
            "notes": self.notes,
        }


# ----------------------------------------------------------------------------- media


class MediaIndex:
    """Files under a root by name, the fallback when a record's video is not where the release
    puts it (copies are often flattened or re-foldered)."""

    def __init__(self, root: Path):
        self.root = root
        self._by_name: dict[str, list[Path]] | None = None

    def _build(self) -> dict[str, list[Path]]:
        found: dict[str, list[Path]] = {}
        for folder, dirs, files in os.walk(self.root):
            dirs.sort()
            for name in sorted(files + dirs):
                found.setdefault(name, []).append(Path(folder) / name)
        return found

    def find(self, name: str) -> Path | None:
        if self._by_name is None:
            self._by_name = self._build()
        hits = self._by_name.get(Path(name).name) or []
        return hits[0] if len(hits) == 1 else None

    def by_stem(self, stem: str) -> Path | None:
        for ext in VIDEO_EXTS + tuple(e.upper() for e in VIDEO_EXTS):
            hit = self.find(stem + ext)
            if hit is not None:
                return hit
        return None


def _usable(path: Path) -> bool:
    if path.is_dir():
        return any(p.suffix.lower() in _IMAGE_SUFFIXES for p in path.iterdir())
    return path.is_file() and path.stat().st_size > 0


def _open_video_frames(path: Path, start: float, end: float) -> Iterator[tuple[Any, Fraction]]:
    """(PIL image, source frame rate) of the frames with start <= time <= end, decoded lazily."""
    import av

    with av.open(str(path), mode="r") as container:
        stream = container.streams.video[0]
        rate = Fraction(stream.average_rate) if stream.average_rate else Fraction(25)
        if start > 0 and stream.time_base is not None:
            # To the keyframe before `start`; frames before it are decoded and dropped below.
            container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            t = float(frame.time) if frame.time is not None else 0.0
            if t > end + 1e-6:
                break
            if t + 1e-6 >= start:
                yield frame.to_image(), rate


def _frame_folder_frames(folder: Path, start: float, end: float, fps: float) -> Iterator[tuple[Any, Fraction]]:
    from PIL import Image

    from fvlm.eval.media import _natural

    names = sorted((p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES), key=_natural)
    for i, name in enumerate(names):
        if start - 1e-6 <= i / fps <= end + 1e-6:
            with Image.open(name) as img:
                yield img.convert("RGB"), Fraction(fps).limit_denominator(1000)


def cut_clip(source: Path, start: float, end: float, target: Path, frame_fps: float = MVBENCH_FRAME_FPS) -> int:
    """Writes the frames of `source` (a video, or a folder of frames at `frame_fps`) from `start` to
    `end` seconds as an H.264 (or MPEG-4 part 2 where PyAV lacks x264) mp4 at the source's frame
    rate; returns the number of frames. Written atomically; no frame in range is an error."""
    import av
    import numpy as np

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    frames = (
        _frame_folder_frames(source, start, end, frame_fps)
        if source.is_dir()
        else _open_video_frames(source, start, end)
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    tmp = atomic.temporary_name(target)
    try:
        with av.open(str(tmp), mode="w", format="mp4") as out:
            stream: av.VideoStream | None = None
            width = height = 0
            for image, rate in frames:
                if stream is None:
                    added = cast("av.VideoStream", out.add_stream(codec, rate=rate))
                    # yuv420p needs even sides: the last odd row/column is dropped.
                    width, height = image.width // 2 * 2, image.height // 2 * 2
                    added.width, added.height = width, height
                    added.pix_fmt = "yuv420p"
                    stream = added
                pixels = np.asarray(image.convert("RGB"))[:height, :width]
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
                for packet in added.encode(frame):
                    out.mux(packet)
                count += 1
            if stream is not None:
                for packet in stream.encode():
                    out.mux(packet)
        if count == 0:
            raise Skip("no_frames_in_clip")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return count


# ----------------------------------------------------------------------------- records


def _text(record: dict[str, Any], name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise Skip(f"bad_{name}")
    return value.strip()


def _candidates(record: dict[str, Any]) -> list[str]:
    options = record.get("candidates")
    if not isinstance(options, list) or len(options) < 2:
        raise Skip("bad_candidates")
    if not all(isinstance(o, (str, int, float)) and not isinstance(o, bool) and str(o).strip() for o in options):
        raise Skip("bad_candidates")
    return [str(o).strip() for o in options]


def _answer_text(record: dict[str, Any], options: list[str]) -> str:
    answer = record.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise Skip("bad_answer")
    text = str(answer).strip()
    if options.count(text) != 1:
        raise Skip("answer_not_an_option")
    return text


def _letter(record: dict[str, Any], n_options: int) -> str:
    letter = _text(record, "answer").rstrip(".").strip("()")
    if len(letter) != 1 or not "A" <= letter < chr(ord("A") + n_options):
        raise Skip("answer_not_an_option")
    return letter


def _seconds(record: dict[str, Any]) -> tuple[float, float] | None:
    if "start" not in record and "end" not in record:
        return None
    try:
        start, end = float(record["start"]), float(record["end"])
    except (KeyError, TypeError, ValueError):
        raise Skip("bad_start_end") from None
    if not (0 <= start < end):
        raise Skip("bad_start_end")
    return start, end


def _load_json_list(path: Path) -> list[Any]:
    try:
        data = read_json(path)
    except ValueError as exc:
        raise UsageError(f"{path}: {json_problem(exc)}") from None
    if not isinstance(data, list):
        raise UsageError(f"{path}: expected a JSON list of questions")
    return data


class Writer:
    """Collects the JSONL lines and the report, then writes both atomically."""

    def __init__(self, out: Path, name: str, benchmark: str):
        self.out, self.name = out, name
        self.report = Report(benchmark)
        self.lines: list[str] = []

    def add(self, entry: dict[str, Any]) -> None:
        self.lines.append(json.dumps(entry, ensure_ascii=False))
        self.report.written += 1
        self.report.per_category[entry["category"]] += 1

    def clip(self, source: Path, start: float, end: float, name: str) -> Path:
        target = self.out / "clips" / name
        if target.is_file():
            self.report.clips_reused += 1
            return target
        try:
            cut_clip(source, start, end, target)
        except Skip:
            raise
        except Exception as exc:  # a corrupt source must not stop the run: PyAV/PIL raise many kinds
            if isinstance(exc, (KeyboardInterrupt, MemoryError)):
                raise
            raise Skip("undecodable_video") from None
        self.report.clips_cut += 1
        return target

    def finish(self) -> dict[str, Any]:
        if not self.lines:
            raise UsageError(
                f"{self.report.benchmark}: no usable question found (skipped: {dict(self.report.skipped)})"
            )
        jsonl = self.out / f"{self.name}.jsonl"
        atomic.write_text(jsonl, "\n".join(self.lines) + "\n")
        report = self.report.as_dict() | {"jsonl": str(jsonl)}
        atomic.write_json(self.out / REPORT, report, indent=1)
        return report


# ----------------------------------------------------------------------------- Video-MME

VIDEOMME_COLUMNS = ("videoID", "duration", "question", "options", "answer")
_SRT_TIME = re.compile(r"^\s*\d+:\d+:\d+[,.]\d+\s*-->\s*\d+:\d+:\d+[,.]\d+")
_SRT_TAG = re.compile(r"<[^>]+>|\{\\[^}]*\}")


def srt_text(path: Path) -> str:
    """The spoken lines of an .srt file in order, one per cue, markup removed."""
    raw = path.read_bytes().decode("utf-8-sig", errors="replace")
    cues: list[str] = []
    current: list[str] = []
    for line in raw.splitlines() + [""]:
        stripped = line.strip()
        if not stripped:
            if current:
                cues.append(" ".join(current))
            current = []
        elif _SRT_TIME.match(stripped) or (stripped.isdigit() and not current):
            continue
        else:
            text = _SRT_TAG.sub("", stripped).strip()
            if text:
                current.append(text)
    return "\n".join(cues)


def _parquet_rows(src: Path) -> tuple[list[Path], list[dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise UsageError(
            "reading Video-MME's parquet needs pyarrow: pip install 'fvlm[bench]' (or pip install pyarrow)"
        ) from None
    files = [src] if src.is_file() else sorted(src.rglob("*.parquet"))
    if not files:
        raise UsageError(f"{src}: no Video-MME .parquet file (expected videomme/test-*.parquet)")
    rows: list[dict[str, Any]] = []
    for path in files:
        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
        missing = [c for c in VIDEOMME_COLUMNS if c not in table.column_names]
        if missing:
            raise UsageError(f"{path}: missing column(s) {', '.join(missing)} (a Video-MME parquet has them)")
        rows += table.to_pylist()
    return files, rows


def prepare_videomme(src: Path, out: Path, subtitles: bool = False) -> dict[str, Any]:
    files, rows = _parquet_rows(src)
    root = src if src.is_dir() else (src.parent.parent if src.parent.name == "videomme" else src.parent)
    media = MediaIndex(root)
    writer = Writer(out, "videomme", "video-mme")
    for row in rows:
        try:
            video_id = _text(row, "videoID")
            expected = root / "data" / f"{video_id}.mp4"
            path = expected if _usable(expected) else media.by_stem(video_id)
            if path is None or not _usable(path):
                raise Skip("missing_media")
            options = row.get("options")
            if options is not None and hasattr(options, "tolist"):
                options = options.tolist()
            if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
                raise Skip("bad_options")
            entry: dict[str, Any] = {
                "video": str(path.resolve()),
                "question": _text(row, "question"),
                "options": [o.strip() for o in options],
                "answer": _letter(row, len(options)),
                "category": _text(row, "duration"),
            }
            if row.get("question_id") is not None:
                entry["id"] = str(row["question_id"])
            if subtitles:
                srt = media.find(f"{video_id}.srt")
                text = srt_text(srt) if srt is not None else ""
                if text:
                    entry["subtitles"] = text
                else:
                    writer.report.without_subtitles += 1
            writer.add(entry)
        except Skip as skip:
            writer.report.skipped[skip.reason] += 1
    writer.report.notes.append(f"read {', '.join(str(f) for f in files)}")
    return writer.finish()


# ----------------------------------------------------------------------------- MVBench


def _json_files(src: Path, what: str) -> list[Path]:
    folders = [src / "json"] if (src / "json").is_dir() else sorted(p for p in src.rglob("json") if p.is_dir())
    files = sorted(f for folder in folders for f in folder.glob("*.json"))
    if not files:
        raise UsageError(f"{src}: no {what} annotation files (expected json/<task>.json)")
    return files


def _video_root(json_file: Path) -> Path:
    return json_file.parent.parent / "video"


def prepare_mvbench(src: Path, out: Path) -> dict[str, Any]:
    files = _json_files(src, "MVBench")
    media = MediaIndex(src)
    writer = Writer(out, "mvbench", "mvbench")
    for json_file in files:
        task = json_file.stem
        folder, kind = MVBENCH_TASKS.get(task, ("", "video"))
        if task not in MVBENCH_TASKS:
            writer.report.notes.append(f"{task}: not in MVBench's task table; videos found by name")
        for number, record in enumerate(_load_json_list(json_file)):
            try:
                if not isinstance(record, dict):
                    raise Skip("bad_record")
                name = _text(record, "video")
                expected = _video_root(json_file) / folder / name
                path = expected if expected.exists() and _usable(expected) else media.find(name)
                if path is None or not _usable(path):
                    raise Skip("missing_media")
                options = _candidates(record)
                answer = _answer_text(record, options)
                question = _text(record, "question")
                bound = _seconds(record)
                if bound is not None:
                    start, end = bound
                    clip = f"{task}/{number:05d}_{Path(name).stem}_{start:g}_{end:g}.mp4"
                    path = writer.clip(path, start, end, clip)
                elif kind == "frame" and not path.is_dir():
                    raise Skip("missing_media")
                writer.add(
                    {
                        "video": str(path.resolve()),
                        "question": question,
                        "options": options,
                        "answer": answer,
                        "category": task,
                        "id": f"{task}/{number}",
                    }
                )
            except Skip as skip:
                writer.report.skipped[skip.reason] += 1
    return writer.finish()


# ----------------------------------------------------------------------------- MLVU


def prepare_mlvu(src: Path, out: Path) -> dict[str, Any]:
    files = _json_files(src, "MLVU")
    media = MediaIndex(src)
    writer = Writer(out, "mlvu", "mlvu")
    for json_file in files:
        task = json_file.stem
        plain = re.sub(r"^\d+_", "", task)
        for number, record in enumerate(_load_json_list(json_file)):
            try:
                if not isinstance(record, dict):
                    raise Skip("bad_record")
                if "candidates" not in record:
                    writer.report.open_ended_skipped[task] += 1
                    continue
                name = _text(record, "video")
                candidates = [_video_root(json_file) / task / name, _video_root(json_file) / plain / name]
                path = next((p for p in candidates if p.is_file() and _usable(p)), None) or media.find(name)
                if path is None or not _usable(path):
                    raise Skip("missing_media")
                options = _candidates(record)
                category = record.get("question_type")
                writer.add(
                    {
                        "video": str(path.resolve()),
                        "question": _text(record, "question"),
                        "options": options,
                        "answer": _answer_text(record, options),
                        "category": category.strip() if isinstance(category, str) and category.strip() else plain,
                        "id": f"{task}/{number}",
                    }
                )
            except Skip as skip:
                writer.report.skipped[skip.reason] += 1
    open_ended = sum(writer.report.open_ended_skipped.values())
    if open_ended:
        writer.report.notes.append(
            f"{open_ended} open-ended question(s) left out (not multiple choice; scored by a judge model in MLVU)"
        )
    return writer.finish()


def prepare(benchmark: str, src: str | Path, out: str | Path, *, subtitles: bool = False) -> dict[str, Any]:
    """Reads benchmark `benchmark`'s release under `src`, writes OUT/<name>.jsonl and the report."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if benchmark not in BENCHMARKS:
        raise UsageError(f"unknown benchmark '{benchmark}' (expected: {', '.join(BENCHMARKS)})")
    if not src.exists():
        raise UsageError(f"{src}: no such folder")
    if subtitles and benchmark != "video-mme":
        raise UsageError("--subtitles: only Video-MME has subtitles")
    out.mkdir(parents=True, exist_ok=True)
    if benchmark == "video-mme":
        return prepare_videomme(src, out, subtitles)
    if benchmark == "mvbench":
        return prepare_mvbench(src, out)
    return prepare_mlvu(src, out)
