"""Batches for training and evaluation: `build_loader(cfg, split, tokenizer, ...)`.

The main process decides which samples form each batch (from the index and the seeded schedule),
so the order does not depend on the number of workers; workers only decode, tokenise and collate.
The cursor is the stream position after the last batch handed to the caller, so batches prefetched
but never consumed are simply produced again after a resume.

DDP: a global step takes `world_size * n` consecutive stream positions and rank r takes the r-th
run of n, so each position goes to exactly one rank; each batch goes to exactly one worker.
With `max_batch_frames`, n is the largest size at which *every* rank's run fits the cap, computed
from the index on every rank alike, so ranks never disagree on the number or size of batches.

Samples that fail at load time (undecodable frames, nothing left to learn after truncation) are
counted and logged once; in training they are replaced by the next sample of the same source, so
batch sizes (and DDP) stay in step; in evaluation they are dropped.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from fvlm.data.decode import (
    DEFAULT_PROMPTS,
    SOURCE_PROMPTS,
    SampleError,
    decode_frames,
    dialogue_of,
    encode_dialogue,
    normalise_into,
    read_meta,
    system_prompt_for,
    thinned,
)
from fvlm.data.index import KINDS, DataIndex, build_index, read_sample
from fvlm.data.schedule import TrainSchedule, source_probabilities
from fvlm.data.sources import resolve_sources
from fvlm.data.synth import ensure_synthetic
from fvlm.errors import UsageError
from fvlm.model.backbones import IMAGENET, PixelStats, spec_pixel_stats

if TYPE_CHECKING:
    from fvlm.model.batch_index import StaticShapes  # imports torch, which this module loads lazily

log = logging.getLogger("fvlm.data")
SPLITS = ("train", "val", "probe", "bench")
_MAX_SUBSTITUTES = 64
_index_cache: dict[tuple, DataIndex] = {}
_logged: set[tuple[str, str, str]] = set()  # once per process, however many loaders see the sample
# Decoded samples, kept per process: every evaluation pass reads the same val samples again, and a
# run longer than an epoch reads its train samples again. Decoding (JPEG, chat template) is ~15% of
# a tiny training step. Samples are added until the cap is reached and never evicted: a larger
# dataset is partly cached.
DECODED_CACHE_BYTES = 1 << 30
_decoded: dict[tuple, dict] = {}
_decoded_bytes = 0


def load_index(spec: str, what: str = "data path") -> DataIndex:
    """The index of a path spec, cached per process while its shards are unchanged."""
    sources = resolve_sources(spec, what)
    key = tuple(
        (s.name, s.weight, s.prompt, tuple((p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in s.shards))
        for s in sources
    )
    if key not in _index_cache:
        _index_cache[key] = build_index(sources)
    return _index_cache[key]


def _tokenizer_id(tokenizer) -> str:
    """What the tokenizer is, by content: the tiny LLMs of three widths share one tokenizer, so a sweep
    worker reuses its decoded samples when its next run has another LLM."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return str(getattr(tokenizer, "name_or_path", ""))
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


class SampleReader:
    """Turns an index row into model-ready tensors; lives in each loader worker."""

    def __init__(
        self,
        index: DataIndex,
        tokenizer,
        *,
        image_size: int,
        stage: int,
        max_text_tokens: int,
        max_frames: int,
        fps: float,
        replicate_image_frames: int,
        system_prompt: str = "auto",
    ):
        self.index = index
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.stage = stage
        self.max_text_tokens = max_text_tokens
        self.max_frames = max_frames
        self.fps = fps
        self.replicate_image_frames = replicate_image_frames
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.end_of_turn_id = end if isinstance(end, int) and end != tokenizer.unk_token_id else tokenizer.eos_token_id
        self.system = system_prompt_for(system_prompt, tokenizer)
        self._handles: dict[str, object] = {}
        self._pid = os.getpid()
        # What a decoded sample depends on besides its bytes: the reading settings and the tokenizer.
        template = str(getattr(tokenizer, "chat_template", None))
        self._settings = (
            image_size, stage, max_text_tokens, max_frames, fps, replicate_image_frames,
            _tokenizer_id(tokenizer), len(tokenizer), template, self.end_of_turn_id, self.system,
        )  # fmt: skip
        self._shard_ids: dict[str, tuple] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _handle(self, path: str):
        if self._pid != os.getpid():  # forked: never share a file offset with the parent
            self._handles, self._pid = {}, os.getpid()
        if path not in self._handles:
            self._handles[path] = open(path, "rb")
        return self._handles[path]

    def visual_count(self, row: int) -> int:
        """Frames this row will contribute (an upper bound for .mp4)."""
        kind = KINDS[self.index.kind_id[row]]
        if kind == "text":
            return 0
        if kind == "image":
            return self.replicate_image_frames
        declared = int(self.index.frames[row])
        return min(declared, self.max_frames) if declared else self.max_frames

    def load(self, row: int) -> dict:
        """The sample at `row`, decoded once per process (see DECODED_CACHE_BYTES). Raises SampleError."""
        global _decoded_bytes
        shard = self.index.shards[self.index.shard_id[row]]
        if shard not in self._shard_ids:  # a shard rewritten in place is a different shard
            stat = os.stat(shard)
            self._shard_ids[shard] = (shard, stat.st_mtime_ns, stat.st_size)
        key = (*self._shard_ids[shard], int(self.index.start[row]), int(self.index.end[row]), *self._settings)
        hit = _decoded.get(key)
        if hit is not None:
            return dict(hit)
        sample = self._decode(row)
        size = sample["frames"].nbytes + 16 * len(sample["ids"]) + 1024
        if _decoded_bytes + size <= DECODED_CACHE_BYTES:  # later loads share its frames: collate only reads them
            _decoded[key] = sample
            _decoded_bytes += size
        return dict(sample)

    def dialogue(self, meta: dict, parts: dict[str, bytes] | None, kind: str, source: str) -> tuple[list, str | None]:
        """A sample's turns, its first question filled in when empty (the source's prompt), and its
        system prompt."""
        turns = dialogue_of(meta, parts)
        if not turns[0][0]:  # an empty first question: the source's prompt
            named = meta.get("source")
            upstream = SOURCE_PROMPTS.get(named) if isinstance(named, str) else None
            prompt = self.index.prompts.get(source) or upstream or DEFAULT_PROMPTS[kind]
            turns[0] = (prompt, turns[0][1])
        system = meta.get("system") if isinstance(meta.get("system"), str) else self.system
        return turns, system

    def encode(self, turns: list, system: str | None) -> tuple[list[int], list[bool], int]:
        """`encode_dialogue` with this reader's stage, length limit and end-of-turn token."""
        return encode_dialogue(
            self.tokenizer,
            turns,
            stage=self.stage,
            max_tokens=self.max_text_tokens,
            end_of_turn_id=self.end_of_turn_id,
            system=system,
        )

    def _decode(self, row: int) -> dict:
        index = self.index
        shard = index.shards[index.shard_id[row]]
        key, parts = read_sample(shard, int(index.start[row]), int(index.end[row]), self._handle(shard))
        kind, source = index.kind_of(row), index.source_of(row)
        try:
            meta = read_meta(parts)
            frames = decode_frames(
                parts,
                kind,
                self.image_size,
                max_frames=self.max_frames,
                fps=self.fps,
                replicate_image_frames=self.replicate_image_frames,
            )
            ids, mask, full_length = self.encode(*self.dialogue(meta, parts, kind, source))
        except SampleError as exc:
            exc.where = (shard, key)
            raise
        return {
            "frames": frames,
            "ids": ids,
            "mask": mask,
            "full_length": full_length,
            "key": key,
            "source": source,
            "kind": kind,
            "mover_boxes": _mover_boxes(meta, len(frames), self.max_frames),
        }


def _mover_boxes(meta: dict, frames: int, max_frames: int) -> list[list[float]] | None:
    """The sample's per-frame mover boxes (shares of the frame side), thinned like its frames; None
    when it has none or they do not line up with the frames."""
    boxes = meta.get("mover_boxes")
    if not isinstance(boxes, list) or not boxes:
        return None
    boxes = [boxes[i] for i in thinned(len(boxes), max_frames)]
    ok = len(boxes) == frames and all(isinstance(b, list) and len(b) == 4 for b in boxes)
    return [[float(v) for v in b] for b in boxes] if ok else None


def boxes_array(per_video: list, frames: int) -> np.ndarray | None:
    """Per-video lists of per-frame boxes (or None) -> [videos, frames, 4] with NaN where unknown;
    None when no video has boxes."""
    if not any(per_video):
        return None
    out = np.full((len(per_video), frames, 4), np.nan, dtype=np.float32)
    for v, boxes in enumerate(per_video):
        if boxes:
            out[v, : len(boxes)] = np.asarray(boxes, dtype=np.float32)
    return out


class _Items:
    """Map-style dataset over (row, substitute?) items; returns (sample | None, skip events)."""

    def __init__(self, reader: SampleReader, substitute: bool):
        self.reader = reader
        self.substitute = substitute
        self._source_rows: dict[int, np.ndarray] = {}

    def _next_of_source(self, row: int) -> int:
        sid = int(self.reader.index.source_id[row])
        if sid not in self._source_rows:
            self._source_rows[sid] = np.flatnonzero(self.reader.index.source_id == sid)
        rows = self._source_rows[sid]
        return int(rows[(np.searchsorted(rows, row) + 1) % len(rows)])

    def __getitem__(self, row: int):
        events: list[tuple[str, str, str]] = []
        for _ in range(_MAX_SUBSTITUTES if self.substitute else 1):
            try:
                return self.reader.load(row), events
            except SampleError as exc:
                events.append((exc.where[0], exc.where[1], exc.reason))
                row = self._next_of_source(row)
        if self.substitute:
            shard, key, _ = events[-1]
            raise RuntimeError(f"{_MAX_SUBSTITUTES} consecutive unusable samples in a row near {shard}:{key}")
        return None, events


def _empty(*shape, dtype):
    """A tensor that a loader worker can hand to the main process without copying it."""
    import torch

    if torch.utils.data.get_worker_info() is None:
        return torch.empty(*shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    return torch.tensor([], dtype=dtype).set_(storage).view(*shape)


def collate(
    samples: list[dict],
    pad_id: int,
    pixel_stats: PixelStats = IMAGENET,
    raw_frames: bool = False,
    static: StaticShapes | None = None,
) -> dict:
    """Pads and stacks. Frames: with `raw_frames`, the samples' uint8 pixels as they are, channels
    first (a quarter of float32's bytes; the model normalises them on its device, `encode_frames`);
    otherwise normalised straight into a float32 batch with the DINO's mean and std. Padding frames
    are zero either way. `static`: every size padded to the shape ladder (fvlm.model.batch_index)."""
    import torch

    from fvlm.model.batch_index import bucket, build_indices

    batch_size = len(samples)
    t_max = max((s["frames"].shape[0] for s in samples), default=0)
    l_max = max((len(s["ids"]) for s in samples), default=0)
    if static is not None:
        t_max = bucket(t_max, static.max_frames) if t_max else 0
        l_max = bucket(l_max, static.max_text)
    size = samples[0]["frames"].shape[1] if samples else 0
    frames = _empty(batch_size, t_max, 3, size, size, dtype=torch.uint8 if raw_frames else torch.float32)
    frame_mask = torch.zeros(batch_size, t_max, dtype=torch.bool)
    input_ids = torch.full((batch_size, l_max), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, l_max, dtype=torch.long)
    loss_mask = torch.zeros(batch_size, l_max, dtype=torch.bool)
    for b, s in enumerate(samples):
        t, n = s["frames"].shape[0], len(s["ids"])
        if raw_frames:
            frames[b, :t] = torch.from_numpy(s["frames"]).permute(0, 3, 1, 2)
        else:
            normalise_into(frames[b, :t], s["frames"], pixel_stats)
        frames[b, t:] = 0
        frame_mask[b, :t] = True
        input_ids[b, :n] = torch.tensor(s["ids"], dtype=torch.long)
        attention_mask[b, :n] = 1
        loss_mask[b, :n] = torch.tensor(s["mask"], dtype=torch.bool)
    return {
        "frames": frames,
        "frame_mask": frame_mask,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        # Which frames DINO reads and which tokens are targets, found here on the host so that the
        # model's step never waits for the device to find them (fvlm.model.batch_index).
        **build_indices(frame_mask, loss_mask, static=static is not None),
        "keys": [s["key"] for s in samples],
        "sources": [s["source"] for s in samples],
        "kinds": [s["kind"] for s in samples],
        "mover_boxes": [s.get("mover_boxes") for s in samples],
    }


class BatchCollate:
    def __init__(
        self,
        pad_id: int,
        pixel_stats: PixelStats = IMAGENET,
        raw_frames: bool = False,
        static: StaticShapes | None = None,
    ):
        self.pad_id = pad_id
        self.pixel_stats = pixel_stats
        self.raw_frames = raw_frames
        self.static = static

    def __call__(self, items):
        samples = [s for s, _ in items if s is not None]
        events = [e for _, ev in items for e in ev]
        return collate(samples, self.pad_id, self.pixel_stats, self.raw_frames, self.static), events


def _worker_init(_):
    import torch

    torch.set_num_threads(1)


class Loader:
    """Iterable over batches with a checkpointable cursor (`state_dict`) and skip counts (`stats`)."""

    # What turns a batch's items into the batch (a subclass may add fields: fvlm.training.dpo).
    collate_type: type = BatchCollate

    def __init__(
        self,
        reader: SampleReader,
        *,
        train: bool,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        max_batch_frames: int,
        schedule: TrainSchedule | None,
        max_samples: int | None,
        pad_id: int,
        pixel_stats: PixelStats = IMAGENET,
        raw_frames: bool | None = None,
        pin_memory: bool = False,
        static: StaticShapes | None = None,
    ):
        self.reader = reader
        self.train = train
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.max_batch_frames = max_batch_frames
        self.schedule = schedule
        self.pad_id = pad_id
        self.pixel_stats = pixel_stats
        # Training batches carry uint8 frames that the model normalises (see `collate`); evaluation
        # batches keep normalised float frames, which their readers (pictures, grey frames) expect.
        self.raw_frames = train if raw_frames is None else raw_frames
        # Page-locked batches (a CUDA device's): the host->device copy can then overlap the step.
        self.pin_memory = pin_memory
        self.static = static  # pad every size to the shape ladder (train.static_shapes)
        self.position = 0  # train: next stream position; eval: samples of this rank yielded in this pass
        # Skips found while indexing, plus the distinct samples that decoding turned out to be bad (a
        # bad sample met again in a later epoch or pass is not counted again).
        self._index_skips: Counter = Counter(s.reason for s in reader.index.skips)
        self.bad: set[tuple[str, str, str]] = set()
        for skip in reader.index.skips:
            self._log(skip.shard, skip.key, skip.reason)
        n = min(len(reader.index), max_samples) if max_samples else len(reader.index)
        self._eval_rows = np.arange(rank, n, world_size)  # the first max_samples, split over ranks

    @property
    def stats(self) -> Counter:
        """Skipped samples by reason: each bad sample once, however often the stream meets it."""
        return self._index_skips + Counter(reason for _, _, reason in self.bad)

    def _log(self, shard: str, key: str, reason: str) -> None:
        if (shard, key, reason) not in _logged:
            _logged.add((shard, key, reason))
            log.warning("skipped sample %s in %s: %s", key, shard, reason)

    def _fit(self, counts: np.ndarray) -> int:
        """Largest n <= batch_size with every rank's n consecutive samples within the frame cap."""
        if not self.max_batch_frames:
            return self.batch_size
        for n in range(self.batch_size, 0, -1):
            runs = counts[: n * self.world_size].reshape(self.world_size, n)
            if runs.sum(axis=1).max() <= self.max_batch_frames:
                return n
        return 1

    def _train_batches(self):
        position = self.position
        need = self.batch_size * self.world_size
        while True:
            rows = self.schedule.rows_at(position, position + need)
            counts = np.array([self.reader.visual_count(int(r)) for r in rows])
            n = self._fit(counts)
            mine = rows[self.rank * n : (self.rank + 1) * n]
            position += n * self.world_size
            yield [int(r) for r in mine], position

    def _eval_batches(self):
        position = self.position
        rows = self._eval_rows
        while position < len(rows):
            chunk = rows[position : position + self.batch_size]
            counts = np.array([self.reader.visual_count(int(r)) for r in chunk])
            n = self.batch_size
            if self.max_batch_frames:
                n = max(1, int(np.searchsorted(np.cumsum(counts), self.max_batch_frames, side="right")))
            position += min(n, len(chunk))
            yield [int(r) for r in chunk[:n]], position

    def __iter__(self):
        import torch

        plan = self._train_batches() if self.train else self._eval_batches()
        positions: list[int] = []

        def batches():
            for rows, end in plan:
                positions.append(end)
                yield rows

        loader = torch.utils.data.DataLoader(
            _Items(self.reader, substitute=self.train),
            batch_sampler=batches(),
            num_workers=self.num_workers,
            collate_fn=self.collate_type(self.pad_id, self.pixel_stats, self.raw_frames, self.static),
            worker_init_fn=_worker_init if self.num_workers else None,
            pin_memory=self.pin_memory,
        )
        for batch, events in loader:
            self.position = positions.pop(0)
            for shard, key, reason in events:
                self.bad.add((shard, key, reason))
                self._log(shard, key, reason)
            if batch["input_ids"].shape[0]:
                yield batch
        self.position = 0  # an evaluation pass is complete: the next one starts from the beginning

    def __len__(self) -> int:
        """Batches per pass for evaluation loaders (an upper bound with max_batch_frames)."""
        if self.train:
            raise TypeError("a training loader is endless")
        return -(-len(self._eval_rows) // self.batch_size)

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "stats": dict(self.stats),
            "bad": sorted(self.bad),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data cursor was saved with seed {state['seed']}, this loader uses {self.seed}")
        if self.train and state["world_size"] != self.world_size:
            raise ValueError(f"data cursor was saved with world_size {state['world_size']}, now {self.world_size}")
        self.position = int(state["position"])
        self.bad = {tuple(item) for item in state.get("bad", [])}


def split_path(cfg, split: str) -> str:
    """The shard spec for a split, generating the synthetic set when the config asks for it."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    spec = getattr(cfg.data, split, "synthetic")
    if spec == "synthetic":
        return ensure_synthetic(cfg.data, cfg.data_seed, cfg.out_dir)[split]
    return spec


def sample_reader(cfg, index: DataIndex, tokenizer) -> SampleReader:
    """Reads samples of `index` the way a run of `cfg` trains on them (also what `fvlm data inspect`
    measures)."""
    d = cfg.data
    return SampleReader(
        index,
        tokenizer,
        image_size=cfg.model.image_size,
        stage=cfg.train.stage,
        max_text_tokens=d.max_text_tokens,
        max_frames=d.max_frames,
        fps=d.fps,
        replicate_image_frames=d.replicate_image_frames,
        system_prompt=d.system_prompt,
    )


def build_loader(
    cfg,
    split: str,
    tokenizer,
    *,
    rank: int = 0,
    world_size: int = 1,
    train: bool | None = None,
    batch_size: int | None = None,
    max_samples: int | None = None,
    pixel_stats: PixelStats | None = None,
    pin_memory: bool = False,
) -> Loader:
    """A Loader for `split` (train|val|probe|bench). `train` (default: split == "train") makes it an
    endless seeded mixture stream; otherwise each sample of this rank comes once, in index order
    (the first `max_samples` of the split, when given, dealt round-robin over ranks). A training
    loader's frames are uint8, normalised by the model; an evaluation loader's are normalised here
    with `pixel_stats`: a loaded model's own (`model_pixel_stats`, what evaluation passes), by
    default those of the `model.dino` folder the model is built from. `pin_memory`: batches in
    page-locked memory (for a CUDA device). With `train.static_shapes` every training batch is padded
    to the shape ladder (`static_shapes`).
    Raises UsageError for a missing path, a path without shards, or a mix naming a missing source."""
    train = split == "train" if train is None else train
    d = cfg.data
    index = load_index(split_path(cfg, split), f"data.{split}")
    seed = cfg.data_seed
    schedule = None
    if train:
        schedule = TrainSchedule(index, source_probabilities(index, d.mix, d.text_ratio), seed)
    elif not len(index):
        raise UsageError(f"data.{split}: no usable samples (run `fvlm data inspect` on it)")
    reader = sample_reader(cfg, index, tokenizer)
    if batch_size is None:
        batch_size = cfg.train.batch_size if train else cfg.train.eval_batch_size
    return Loader(
        reader,
        train=train,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=d.num_workers,
        max_batch_frames=d.max_batch_frames,
        schedule=schedule,
        max_samples=max_samples,
        pad_id=tokenizer.pad_token_id,
        pixel_stats=pixel_stats if pixel_stats is not None else spec_pixel_stats(cfg.model.dino),
        pin_memory=pin_memory,
        static=static_shapes(cfg) if train else None,
    )


def static_shapes(cfg) -> StaticShapes | None:
    """The shape ladder's caps when `train.static_shapes` is on (None: batches padded to their own
    longest sample). Only training batches are padded: evaluation's shapes repeat from one pass to
    the next anyway."""
    from fvlm.model.batch_index import StaticShapes

    if not cfg.train.static_shapes:
        return None
    return StaticShapes(max_frames=cfg.data.max_frames, max_text=cfg.data.max_text_tokens)
