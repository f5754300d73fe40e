"""`fvlm data convert FORMAT SRC OUT`: published datasets -> fvlm shards (docs/data.md).

Formats, each read in its published schema:
- `llava`: LLaVA-style JSON or JSONL (LLaVA-Video-178K, ShareGPT4Video, VISTA): `conversations` of
  {from: human|gpt, value} with `<video>`/`<image>` placeholders, and a `video` or `image` path
  under the media root (records with neither are text samples of source `<source>_text`);
- `cauldron`, `smoltalk`, `rlaif-v`: Hugging Face datasets on disk (a `save_to_disk` folder, or
  the parquet/arrow files of a downloaded dataset repository), read with the `datasets` library;
- `openvid`: OpenVid-1M's CSV (`video`, `caption`); `vript`: Vript's per-video caption JSON files.

Records are cut into shards of `shard_size` consecutive records. The main process reads the
records; worker processes decode the media (PyAV for video: `fps` frames a second, uniformly
thinned to `max_frames`, each resized and centre-cropped to `size` and stored as a JPEG) and write
each shard atomically. `OUT/convert.json` lists the finished shards with their counts, so a rerun
skips them and a killed run loses only the shards in flight. A shard depends only on its records
and the settings, so the same input gives byte-identical shards with any number of workers.
A bad record is skipped and counted by reason; it never stops the run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fvlm import atomic
from fvlm.errors import UsageError, parse_json, read_json

FORMATS = ("llava", "cauldron", "smoltalk", "rlaif-v", "openvid", "vript")
HF_FORMATS = ("cauldron", "smoltalk", "rlaif-v")
DEFAULT_SOURCE = {
    "llava": "llava",
    "cauldron": "cauldron",
    "smoltalk": "smoltalk",
    "rlaif-v": "rlaif-v",
    "openvid": "openvid",
    "vript": "vript",
}
MANIFEST = "convert.json"
JPEG_QUALITY = 90
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PLACEHOLDER = re.compile(r"<(?:video|image)>\s*")
_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant")


class Skipped(Exception):
    """A record that cannot become a sample; `reason` is the report's key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Options:
    """Everything that shapes the shards (recorded in the manifest: a rerun must match it)."""

    format: str
    src: str
    source: str
    media_root: str | None = None
    split: str = "train"
    size: int = 224
    fps: float = 1.0
    max_frames: int = 64
    keep_mp4: bool = False
    prompt: str | None = None
    max_tokens: int = 0
    tokenizer: str = "tiny"
    shard_size: int = 1000


# ----------------------------------------------------------------------------- reading records


def _files(src: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if src.is_file():
        return [src]
    if src.is_dir():
        found = sorted(p for p in src.rglob("*") if p.is_file() and p.name.endswith(suffixes))
        if found:
            return found
        raise UsageError(f"{src}: no {' or '.join(suffixes)} files in this folder")
    raise UsageError(f"{src}: no such file or folder")


def _json_records(path: Path) -> Iterator[Any]:
    """The records of a JSON list file or a JSONL file; a JSONL line that does not parse is a bad
    record (`invalid_record`), a JSON file that does not parse is a bad file."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    yield parse_json(line)
                except ValueError:  # also UnicodeDecodeError
                    yield Skipped("invalid_record")
        return
    data = read_json(path)
    if not isinstance(data, list):
        raise UsageError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    yield from data


def _llava_records(src: Path) -> Iterator[Any]:
    for path in _files(src, (".json", ".jsonl")):
        yield from _json_records(path)


def _csv_records(src: Path) -> Iterator[Any]:
    for path in _files(src, (".csv",)):
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"video", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise UsageError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
            try:
                yield from reader
            except (csv.Error, UnicodeDecodeError) as exc:
                raise UsageError(f"{path}: {exc}") from None


def _vript_records(src: Path) -> Iterator[Any]:
    """Each clip of each caption file ({meta, data: {clip_id: {video_id, clip_id, caption, ...}}})."""
    for path in _files(src, (".json", ".jsonl")):
        documents = _json_records(path) if path.suffix == ".jsonl" else iter([_read_vript_file(path)])
        for doc in documents:
            if isinstance(doc, Skipped):
                yield doc
            elif not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
                yield Skipped("invalid_record")
            else:
                yield from doc["data"].values()


def _read_vript_file(path: Path) -> Any:
    try:
        return read_json(path)
    except UsageError:
        return Skipped("invalid_record")  # one caption file of thousands: skip its clips, go on


def _hf_records(src: Path, split: str) -> Iterator[Any]:
    """Rows of a Hugging Face dataset on disk, images left undecoded ({bytes, path})."""
    try:
        import datasets
    except ImportError:
        raise UsageError("reading Hugging Face datasets needs the `datasets` package (pip install datasets)") from None
    if (src / "state.json").is_file() or (src / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(src))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UsageError(f"{src}: no split '{split}' (has {', '.join(map(str, loaded))}); pass --split")
            loaded = loaded[split]
        stream = loaded.to_iterable_dataset()
    else:
        files = _files(src, (".parquet", ".arrow"))
        named = [p for p in files if re.search(rf"(^|[/_-]){re.escape(split)}([._/-]|$)", str(p.relative_to(src)))]
        files = named or files
        kind = "parquet" if files[0].suffix == ".parquet" else "arrow"
        stream = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train", streaming=True)
    yield from stream.decode(False)


def read_records(opts: Options) -> Iterator[Any]:
    src = Path(opts.src)
    if opts.format == "llava":
        return _llava_records(src)
    if opts.format in HF_FORMATS:
        return _hf_records(src, opts.split)
    if opts.format == "openvid":
        return _csv_records(src)
    return _vript_records(src)


# ----------------------------------------------------------------------------- records -> samples


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise Skipped(f"bad_field_{field}")
    return value


def _media_path(opts: Options, relative: Any) -> Path:
    relative = _text(relative, "media_path")
    src = Path(opts.src)
    base = Path(opts.media_root) if opts.media_root else src if src.is_dir() else src.parent
    return base / relative


def _jpeg(frame) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _video(opts: Options, path: Path) -> tuple[dict[str, bytes], int]:
    from fvlm.data.decode import SampleError, decode_mp4

    if not path.is_file():
        raise Skipped("missing_media")
    try:
        frames = decode_mp4(str(path), opts.size, opts.fps, opts.max_frames)
    except SampleError:
        raise Skipped("undecodable_video") from None
    if opts.keep_mp4:
        return {"mp4": path.read_bytes()}, len(frames)
    return {f"{t:03d}.jpg": _jpeg(frame) for t, frame in enumerate(frames)}, len(frames)


def _image(opts: Options, data: bytes | None) -> dict[str, bytes]:
    from fvlm.data.decode import SampleError, decode_image

    if not data:
        raise Skipped("missing_media")
    try:
        return {"jpg": _jpeg(decode_image(data, opts.size))}
    except SampleError:
        raise Skipped("undecodable_image") from None


def _image_file(opts: Options, path: Path) -> dict[str, bytes]:
    if not path.is_file():
        raise Skipped("missing_media")
    return _image(opts, path.read_bytes())


def _hf_image(opts: Options, image: Any) -> dict[str, bytes]:
    """An undecoded `datasets` Image value: {bytes, path}, the path relative to the media root."""
    if not isinstance(image, dict):
        raise Skipped("bad_field_image")
    if image.get("bytes"):
        return _image(opts, image["bytes"])
    if image.get("path"):
        return _image_file(opts, _media_path(opts, image["path"]))
    raise Skipped("missing_media")


def _clean(text: str) -> str:
    return _PLACEHOLDER.sub("", text).strip()


def _turns_of_messages(messages: Any, role_key: str, content: str) -> tuple[str | None, list[list[str]]]:
    """(system, [[user, assistant], ...]) from a list of {role_key: role, content: text}."""
    if not isinstance(messages, list) or not messages:
        raise Skipped("bad_conversation")
    system = None
    turns: list[list[str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get(content), str):
            raise Skipped("bad_conversation")
        role, text = message.get(role_key), _clean(message[content])
        if role == "system" and i == 0:
            system = text
        elif role in _USER_ROLES and (not turns or len(turns[-1]) == 2):
            turns.append([text])
        elif role in _ASSISTANT_ROLES and turns and len(turns[-1]) == 1:
            turns[-1].append(text)
        else:
            raise Skipped("bad_conversation")
    if not turns or len(turns[-1]) != 2:
        raise Skipped("bad_conversation")
    return system, turns


def _dialogue_meta(turns: list[list[str]], source: str, frames: int, system: str | None = None) -> dict[str, Any]:
    if any(not answer.strip() for _, answer in turns):
        raise Skipped("empty_answer")
    meta: dict[str, Any] = {"user": turns[0][0], "assistant": turns[0][1], "source": source, "frame_count": frames}
    if len(turns) > 1:
        meta["messages"] = [
            {"role": role, "content": text}
            for user, answer in turns
            for role, text in (("user", user), ("assistant", answer))
        ]
    if system:
        meta["system"] = system
    return meta


def _with_id(meta: dict[str, Any], record: dict, *fields: str) -> dict[str, Any]:
    for field in fields:
        if isinstance(record.get(field), (str, int)) and not isinstance(record.get(field), bool):
            meta["id"] = str(record[field])
            break
    return meta


def _build(opts: Options, record: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(JSON, other members by extension) of one record; Skipped for a record that cannot be used."""
    if isinstance(record, Skipped):
        raise record
    if not isinstance(record, dict):
        raise Skipped("invalid_record")
    fmt = opts.format
    files: dict[str, bytes] = {}
    if fmt == "llava":
        system, turns = _turns_of_messages(record.get("conversations"), "from", "value")
        if record.get("video") is not None:
            files, frames = _video(opts, _media_path(opts, record["video"]))
            source = opts.source
        elif record.get("image") is not None:
            image = record["image"]
            if isinstance(image, list):
                if len(image) != 1:
                    raise Skipped("multiple_images")
                image = image[0]
            files, frames, source = _image_file(opts, _media_path(opts, image)), 1, opts.source
        else:
            frames, source = 0, f"{opts.source}_text"
        meta = _with_id(_dialogue_meta(turns, source, frames, system), record, "id")
    elif fmt == "cauldron":
        images, texts = record.get("images"), record.get("texts")
        if not isinstance(images, list) or not isinstance(texts, list) or not texts:
            raise Skipped("bad_conversation" if isinstance(images, list) else "bad_field_images")
        if len(images) != 1:
            raise Skipped("missing_media" if not images else "multiple_images")
        turns = []
        for entry in texts:
            if not isinstance(entry, dict):
                raise Skipped("bad_conversation")
            turns.append([_clean(_text(entry.get("user"), "user")), _clean(_text(entry.get("assistant"), "assistant"))])
        files = _hf_image(opts, images[0])
        meta = _dialogue_meta(turns, opts.source, 1)
        if isinstance(texts[0].get("source"), str):
            meta["origin"] = texts[0]["source"]
    elif fmt == "smoltalk":
        system, turns = _turns_of_messages(record.get("messages"), "role", "content")
        meta = _dialogue_meta(turns, opts.source, 0, system)
        if isinstance(record.get("source"), str):
            meta["origin"] = record["source"]
    elif fmt == "rlaif-v":
        question = _clean(_text(record.get("question"), "question"))
        chosen, rejected = (_text(record.get(f), f).strip() for f in ("chosen", "rejected"))
        if not chosen or not rejected:
            raise Skipped("empty_answer")
        files = _hf_image(opts, record.get("image"))
        # The DPO layout (docs/design.md §5): the chosen answer is the sample's answer, so a supervised
        # stage reading the pair trains on it; DPO also reads `rejected`.
        meta = _with_id({"user": question, "assistant": chosen, "rejected": rejected}, record, "idx")
        meta.update(source=opts.source, frame_count=1)
        if isinstance(record.get("ds_name"), str):
            meta["origin"] = record["ds_name"]
    else:  # openvid, vript: caption tables
        if fmt == "openvid":
            caption, video_id = _text(record.get("caption"), "caption"), record.get("video")
            paths = [_media_path(opts, video_id)]
        else:
            caption_block = record.get("caption")
            if not isinstance(caption_block, dict):
                raise Skipped("bad_field_caption")
            caption = _text(caption_block.get("content"), "caption")
            clip, video = _text(record.get("clip_id"), "clip_id"), _text(record.get("video_id"), "video_id")
            paths = [_media_path(opts, f"{video}/{clip}.mp4"), _media_path(opts, f"{clip}.mp4")]
            video_id = clip
        if not caption.strip():
            raise Skipped("empty_answer")
        path = next((p for p in paths if p.is_file()), paths[0])
        files, frames = _video(opts, path)
        meta = {"user": opts.prompt or "", "assistant": caption.strip(), "source": opts.source, "frame_count": frames}
        meta = _with_id(meta, {"id": video_id}, "id")
    if fmt != "rlaif-v" and opts.prompt and not meta["user"]:
        meta["user"] = opts.prompt
    if opts.max_tokens and _token_count(opts, meta) > opts.max_tokens:
        raise Skipped("over_length")
    return meta, files


_tokenizers: dict[str, Any] = {}


def _token_count(opts: Options, meta: dict[str, Any]) -> int:
    """Chat-template tokens of the sample's longest dialogue (both answers of a preference pair)."""
    from fvlm.data.decode import DEFAULT_PROMPTS, dialogue_of
    from fvlm.model.tokenizer import chat_ids

    if opts.tokenizer not in _tokenizers:
        from fvlm.model.backbones import load_tokenizer

        _tokenizers[opts.tokenizer] = load_tokenizer(opts.tokenizer)
    tok = _tokenizers[opts.tokenizer]
    if "rejected" in meta:
        dialogues = [[(meta["user"], meta[answer])] for answer in ("assistant", "rejected")]
    else:
        dialogues = [dialogue_of(meta)]
    longest = 0
    for turns in dialogues:
        messages = []
        for user, answer in turns:
            messages += [{"role": "user", "content": user or DEFAULT_PROMPTS["video"]}]
            messages += [{"role": "assistant", "content": answer}]
        longest = max(longest, len(chat_ids(tok, messages)))
    return longest


# ----------------------------------------------------------------------------- shards


def shard_name(source: str, number: int) -> str:
    return f"{source}-{number:05d}.tar"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # no clock, owner or umask in the bytes
    tar.addfile(info, io.BytesIO(data))


def convert_shard(opts: Options, out: str, number: int, records: list[Any]) -> dict[str, Any]:
    """Writes shard `number` from its records (atomically); returns its manifest entry."""
    skipped: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    examples: list[list[Any]] = []
    samples = []
    first = number * opts.shard_size
    for i, record in enumerate(records):
        try:
            meta, files = _build(opts, record)
        except Skipped as exc:
            skipped[exc.reason] += 1
            if len(examples) < 20:
                examples.append([first + i, exc.reason])
            continue
        video = "mp4" in files or "000.jpg" in files
        kinds["preference" if "rejected" in meta else "video" if video else "image" if "jpg" in files else "text"] += 1
        samples.append((f"{first + i:09d}", meta, files))
    entry: dict[str, Any] = {
        "files": {},
        "records": len(records),
        "converted": len(samples),
        "by_kind": dict(sorted(kinds.items())),
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": examples,
        "bytes": 0,
    }
    # One file per source: a LLaVA set's text-only records (source `<source>_text`) go beside its
    # videos, so that a mix file can weigh them as text.
    for source in sorted({meta["source"] for _, meta, _ in samples}):
        path = Path(out) / shard_name(source, number)
        with atomic.replacing(path, "wb") as handle:
            with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, meta, files in samples:
                    if meta["source"] != source:
                        continue
                    _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())
                    for ext, data in files.items():
                        _add(tar, f"{key}.{ext}", data)
        entry["files"][path.name] = path.stat().st_size
    entry["bytes"] = sum(entry["files"].values())
    return entry


def _chunks(records: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _load_manifest(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    path = out / MANIFEST
    if not path.is_file():
        return {"settings": settings, "complete": False, "shards": {}}
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
        raise UsageError(f"{path}: not a conversion manifest (missing field 'shards')")
    old = manifest.get("settings", {})
    changed = sorted(k for k in settings if old.get(k) != settings[k])
    if changed:
        raise UsageError(
            f"{out}: converted before with other settings ({', '.join(changed)}); "
            "rerun with the same options to resume, or convert into a new OUT"
        )
    return manifest


def _finished(out: Path, entry: dict[str, Any] | None) -> bool:
    if entry is None:
        return False
    return all((out / name).is_file() and (out / name).stat().st_size == size for name, size in entry["files"].items())


def totals(manifest: dict[str, Any]) -> dict[str, Any]:
    shards = manifest["shards"].values()
    skipped: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for entry in shards:
        skipped.update(entry["skipped"])
        kinds.update(entry["by_kind"])
    return {
        "records": sum(e["records"] for e in shards),
        "converted": sum(e["converted"] for e in shards),
        "by_kind": dict(sorted(kinds.items())),
        "skipped": dict(sorted(skipped.items())),
        "bytes": sum(e["bytes"] for e in shards),
        "shards": sum(len(e["files"]) for e in shards),
    }


def convert(opts: Options, out: Path, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Converts (or finishes converting) `opts.src` into `out`; returns the report."""
    from tqdm import tqdm

    if opts.format not in FORMATS:
        raise UsageError(f"unknown format {opts.format!r}; expected one of {', '.join(FORMATS)}")
    if not _SOURCE_NAME.match(opts.source):
        raise UsageError(f"--source must be letters, digits, '_', '.' or '-', got {opts.source!r}")
    if opts.media_root and not Path(opts.media_root).is_dir():
        raise UsageError(f"--media-root: no such folder: {opts.media_root}")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # what a killed run was writing; its shard is redone below
        stale.unlink(missing_ok=True)
    settings = asdict(opts)
    manifest = _load_manifest(out, settings)
    started = time.time()
    done_before = sum(_finished(out, e) for e in manifest["shards"].values())
    bar = tqdm(desc=f"convert {opts.format}", unit=" records", disable=None if progress else True)

    def finish(number: int, entry: dict[str, Any]) -> None:
        manifest["shards"][f"{number:05d}"] = entry
        manifest["complete"] = False
        atomic.write_json(out / MANIFEST, manifest, indent=1, sort_keys=True)
        bar.update(entry["records"])

    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    pending: dict[Future, int] = {}
    try:
        for number, chunk in enumerate(_chunks(read_records(opts), opts.shard_size)):
            if _finished(out, manifest["shards"].get(f"{number:05d}")):
                bar.update(len(chunk))
                continue
            if pool is None:
                finish(number, convert_shard(opts, str(out), number, chunk))
                continue
            pending[pool.submit(convert_shard, opts, str(out), number, chunk)] = number
            while len(pending) >= 2 * workers:
                ready, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in ready:
                    finish(pending.pop(future), future.result())
        for future in list(pending):
            finish(pending.pop(future), future.result())
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    manifest["complete"] = True
    manifest["totals"] = totals(manifest)
    atomic.write_json(out / MANIFEST, manifest, indent=1, sort_keys=True)
    report = dict(manifest["totals"])
    report.update(out=str(out), resumed_shards=done_before, seconds=round(time.time() - started, 1))
    return report


def format_report(report: dict[str, Any]) -> str:
    kinds = ", ".join(f"{k} {n}" for k, n in report["by_kind"].items()) or "none"
    skipped = sum(report["skipped"].values())
    reasons = ", ".join(f"{k} {n}" for k, n in report["skipped"].items())
    lines = [
        f"converted {report['converted']} of {report['records']} records ({kinds})",
        f"skipped   {skipped}" + (f" ({reasons})" if reasons else ""),
        f"wrote     {report['shards']} shards, {report['bytes']} bytes, to {report['out']} "
        f"({report['resumed_shards']} finished by an earlier run; {report['seconds']}s)",
    ]
    return "\n".join(lines)


def worker_count(value: int | None) -> int:
    return value if value else max(1, min(8, os.cpu_count() or 1))
