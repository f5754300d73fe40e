"""An index of every sample in a set of WebDataset shards, built once by scanning tar headers.

Knowing each sample's byte range, source, kind and frame count up front makes three things easy
that a streaming reader gets wrong: a global, seeded shuffle over all samples; a cursor that is
just a position in that order; and splitting samples across ranks and workers exactly once.

The tar reader is our own (about 60 lines) rather than `tarfile`, because it must survive damage:
after a header with a bad checksum it re-synchronises on the next valid header, and a member whose
data runs past the end of the file is reported as truncated instead of ending the scan.
Samples that are broken in a way the headers and JSON already reveal (invalid JSON, missing or
mismatched frames, empty answer, truncated member, JSON nested or sized past the limits of
fvlm.errors, a video or image sample without frames, a JSON without dialogue text) are left out of
the index and recorded as skips; damage that only decoding reveals is caught by the loader.
Frames numbered with gaps (upstream fVLM's writer leaves one where it dropped a bad JPEG) are read
as they are, and each such sample is recorded as a note.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from fvlm.errors import LimitError, parse_json

BLOCK = 512
KINDS = ("video", "image", "text")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VISUAL_KINDS = ("video", "image")
# A sample's JSON is a few hundred bytes of dialogue; one past this size is skipped unread.
MAX_SAMPLE_JSON_BYTES = 1 << 20
_FRAME_EXT = re.compile(r"^(\d+)\.(jpg|jpeg|png|webp)$")


@dataclass(frozen=True)
class Member:
    name: str
    header_offset: int
    data_offset: int
    size: int


@dataclass(frozen=True)
class Skip:
    shard: str
    key: str
    reason: str


def _octal(field_bytes: bytes) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header_ok(block: bytes) -> bool:
    try:
        stored = _octal(block[148:156])
    except ValueError:
        return False
    return stored == sum(block[:148]) + 32 * 8 + sum(block[156:])


def _ustar_name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax header; None when absent or unreadable (the ustar name then stands)."""
    pos = 0
    try:
        while pos < len(data):
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
            if key == b"path":
                return value.decode("utf-8", "replace")
            if length <= 0:
                return None
            pos += length
    except ValueError:
        return None
    return None


def scan_members(read_at, file_size: int, start: int = 0, end: int | None = None):
    """Yields Member for each regular file, and ("corrupt", offset) / ("truncated", Member) events.

    `read_at(offset, n)` returns bytes; the scan covers [start, end).
    """
    end = file_size if end is None else end
    pos, long_name, first_header = start, None, None  # a long name's own header opens its member
    while pos + BLOCK <= end:
        block = read_at(pos, BLOCK)
        if len(block) < BLOCK:
            break
        if block.count(0) == BLOCK:
            break
        if not _header_ok(block):
            yield ("corrupt", pos)
            pos += BLOCK
            while pos + BLOCK <= end and not _header_ok(read_at(pos, BLOCK)):
                pos += BLOCK
            long_name = first_header = None
            continue
        size = _octal(block[124:136])
        kind = block[156:157]
        data_offset = pos + BLOCK
        next_pos = data_offset + (size + BLOCK - 1) // BLOCK * BLOCK
        if kind in (b"L", b"x"):
            first_header = pos if first_header is None else first_header
            data = read_at(data_offset, size)
            long_name = data.rstrip(b"\0").decode("utf-8", "replace") if kind == b"L" else _pax_path(data)
        elif kind in (b"0", b"\0", b"7"):
            name = long_name or _ustar_name(block)
            member = Member(name, pos if first_header is None else first_header, data_offset, size)
            yield ("truncated", member) if data_offset + size > file_size else member
            long_name = first_header = None
        else:
            long_name = first_header = None
        pos = next_pos


def split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def classify(exts: list[str]) -> tuple[str | None, int, str | None]:
    """(kind, visual item count, problem) from a sample's member extensions."""
    frames = sorted(int(m.group(1)) for e in exts if (m := _FRAME_EXT.match(e)))
    if "mp4" in exts:
        return "video", 0, None
    if frames:
        if len(set(frames)) != len(frames):
            return "video", len(frames), "duplicate_frames"  # 003.jpg beside 003.png: which one is frame 3?
        return "video", len(frames), None
    if any(e in IMAGE_EXTS for e in exts):
        return "image", 1, None
    return "text", 0, None


@dataclass
class SourceSpec:
    name: str
    shards: list[str]
    weight: float | None = None
    prompt: str | None = None


@dataclass
class DataIndex:
    """All valid samples of a data spec: parallel NumPy arrays, one row per sample."""

    shards: list[str]
    sources: list[str]
    prompts: dict[str, str | None]
    weights: dict[str, float | None]
    shard_id: np.ndarray
    start: np.ndarray
    end: np.ndarray
    source_id: np.ndarray
    kind_id: np.ndarray
    frames: np.ndarray  # visual items declared (0 for text; 0 for .mp4 whose count needs decoding)
    skips: list[Skip] = field(default_factory=list)
    # Samples kept but worth knowing about, e.g. "frame_gap": frames numbered with gaps, read as they are.
    notes: list[Skip] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.start)

    def rows_of_source(self, source: str) -> np.ndarray:
        return np.flatnonzero(self.source_id == self.sources.index(source))

    def kind_of(self, row: int) -> str:
        return KINDS[self.kind_id[row]]

    def source_of(self, row: int) -> str:
        return self.sources[self.source_id[row]]


def _scan_shard(path: str, source: str, sources: list[str], rows: list, skips: list[Skip], notes: list[Skip]) -> None:
    size = os.path.getsize(path)
    with open(path, "rb") as f:

        def read_at(offset: int, n: int) -> bytes:
            f.seek(offset)
            return f.read(n)

        groups: list[tuple[str, list[Member], list[str]]] = []
        for item in scan_members(read_at, size):
            if isinstance(item, tuple):
                event, detail = item
                if event == "corrupt":
                    after = f" after {groups[-1][1][-1].name}" if groups else ""
                    skips.append(Skip(path, f"@{detail}{after}", "corrupt_header"))
                    continue
                key, _ = split_name(detail.name)
                problems = ["truncated"]
                member = detail
            else:
                member, problems = item, []
                key, _ = split_name(member.name)
            if groups and groups[-1][0] == key:
                groups[-1][1].append(member)
                groups[-1][2].extend(problems)
            else:
                groups.append((key, [member], problems))
        if not groups and not any(s.shard == path for s in skips):
            # A 0-byte file or an archive with no members: nothing to skip sample by sample, but the
            # shard is listed, so say why it gave nothing.
            skips.append(Skip(path, "@0", "empty_shard"))
        for key, members, problems in groups:
            row = _validate(read_at, path, key, members, problems, skips, source)
            if row is None:
                continue
            meta_source, kind, count = row
            matches = [_FRAME_EXT.match(split_name(m.name)[1]) for m in members]
            numbers = sorted(int(found.group(1)) for found in matches if found)
            if numbers and numbers != list(range(len(numbers))):
                notes.append(Skip(path, key, "frame_gap"))
            name = source or meta_source
            if name not in sources:
                sources.append(name)
            rows.append(
                (
                    key,
                    meta_source,
                    members[0].header_offset,
                    members[-1].data_offset + members[-1].size,
                    sources.index(name),
                    KINDS.index(kind),
                    count,
                )
            )


def _validate(read_at, path, key, members, problems, skips, source=""):
    def skip(reason):
        skips.append(Skip(path, key, reason))

    if problems:
        return skip(problems[0])
    exts = [split_name(m.name)[1] for m in members]
    if "json" not in exts:
        return skip("missing_json")
    meta_member = members[exts.index("json")]
    if meta_member.size > MAX_SAMPLE_JSON_BYTES:
        return skip("json_too_large")  # not even read: its size comes from the header
    try:
        meta = parse_json(read_at(meta_member.data_offset, meta_member.size))
        if not isinstance(meta, dict):
            raise ValueError
    except LimitError:
        return skip("json_too_deep")
    except ValueError:  # also UnicodeDecodeError
        return skip("invalid_json")
    from fvlm.data.decode import SampleError, dialogue_of  # decode imports this module

    parts = {}
    if "txt" in exts:
        txt = members[exts.index("txt")]
        if txt.size > MAX_SAMPLE_JSON_BYTES:
            return skip("txt_too_large")
        parts["txt"] = read_at(txt.data_offset, txt.size)
    try:
        dialogue_of(meta, parts)
    except SampleError as exc:
        return skip(exc.reason)
    kind, count, problem = classify(exts)
    if problem:
        return skip(problem)
    declared = meta.get("frame_count")
    if kind == "text" and isinstance(declared, int) and declared > 0:
        # It says it has frames and none came with it: trained on, it would teach the answer from text alone.
        return skip("frames_missing")
    named = source or meta.get("source")
    if kind == "text" and named in VISUAL_KINDS:
        # A "video" or "image" with no frame at all (frame_count 0, or none given) is no text sample
        # either: its answer is about pictures it does not have.
        return skip(f"{named}_without_frames")
    if kind == "video" and "mp4" not in exts and declared is not None and declared != count:
        return skip("frame_count_mismatch")
    return str(meta.get("source") or kind), kind, count


def build_index(specs: list[SourceSpec]) -> DataIndex:
    """Scans every shard's headers and JSON once. Sources named by a mix file take precedence over
    the `source` field inside the samples; otherwise that field (or the sample's kind) names it."""
    shards: list[str] = []
    sources: list[str] = [s.name for s in specs if s.name]
    columns: list[tuple] = []
    keys: list[str] = []
    named: list[str] = []  # each sample's own `source` (its kind where it names none)
    skips: list[Skip] = []
    notes: list[Skip] = []
    for spec in specs:
        for path in spec.shards:
            rows: list = []
            _scan_shard(path, spec.name, sources, rows, skips, notes)
            columns.extend((len(shards),) + r[2:] for r in rows)
            keys.extend(r[0] for r in rows)
            named.extend(r[1] for r in rows)
            shards.append(path)
    table = np.array(columns, dtype=np.int64).reshape(-1, 6)
    # A sample without frames whose JSON names a source of videos or images (upstream fVLM's
    # `frame_count: 0` videos) is no text sample: trained as one, it would teach answers about
    # pictures it lacks and escape data.text_ratio. Upstream drops these too.
    visual: dict[str, str] = {}
    for name, kind in zip(named, table[:, 4], strict=True):
        if KINDS[int(kind)] in VISUAL_KINDS:
            visual.setdefault(name, KINDS[int(kind)])
    orphan = np.array(
        [KINDS[int(k)] == "text" and n in visual for n, k in zip(named, table[:, 4], strict=True)], dtype=bool
    )
    for row in np.flatnonzero(orphan):
        skips.append(Skip(shards[int(table[row, 0])], keys[row], f"{visual[named[row]]}_without_frames"))
    table = table[~orphan]
    prompts = {s.name: s.prompt for s in specs if s.name}
    weights = {s.name: s.weight for s in specs if s.name}
    return DataIndex(
        shards=shards,
        sources=sources,
        prompts=prompts,
        weights=weights,
        shard_id=table[:, 0].astype(np.int32),
        start=table[:, 1],
        end=table[:, 2],
        source_id=table[:, 3].astype(np.int16),
        kind_id=table[:, 4].astype(np.int8),
        frames=table[:, 5].astype(np.int32),
        skips=skips,
        notes=notes,
    )


def read_sample(path: str, start: int, end: int, handle=None) -> tuple[str, dict[str, bytes]]:
    """(key, {extension: bytes}) for the sample occupying [start, end) of a shard."""
    if handle is None:
        with open(path, "rb") as f:
            return read_sample(path, start, end, f)
    handle.seek(start)
    blob = handle.read(end - start)
    size = start + len(blob)

    def read_at(offset: int, n: int) -> bytes:
        return blob[offset - start : offset - start + n]

    key, parts = "", {}
    for item in scan_members(read_at, size, start, start + len(blob) + BLOCK):
        if isinstance(item, Member):
            key, ext = split_name(item.name)
            parts[ext] = read_at(item.data_offset, item.size)
    return key, parts
