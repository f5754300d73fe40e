"""The synthetic dataset: what makes fvlm run anywhere, designed so that foveation matters.

Each video shows a few small coloured shapes (~8-12 px at 64 px, about one DINO patch) on a
textured background; exactly one of them moves, and the answer names its colour, shape and
direction. A static query per frame has to summarise a whole cluttered frame in one token and
loses which object moved; a query chosen after seeing earlier frames can fix on the mover.
Images ask about one object among several; text-only samples are short dialogues; multiple-choice
variants (`A. ...` options, answer `B. blue square up`) make up the `bench` split for the eval
harness. By default they stay out of train/val because a whole multiple-choice dialogue takes 140-175
byte-level tokens for a video (85-125 for an image), more than the tiny preset's max_text_tokens, and
would only be truncated away; `mc_fraction` (`fvlm data synth --mc-fraction`) asks that share of the
train/val videos and images as multiple choice instead (then data.max_text_tokens >= 192). The options
are balanced (see make_video): without the pixels every option is equally likely. Everything is a
function of the seed.

Knobs for experiments (`fvlm data synth --background flat --object-scale 0.22 0.3 --min-objects 1
--max-objects 4`; the defaults reproduce the set described above): `background` "flat" paints one
colour per video (plus the JPEG grain) instead of the texture, `object_scale` is the object side as
a share of the frame side, `min_objects`/`max_objects` bound the objects per scene (a multiple-choice
video keeps at least two, images at most four).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict, cast

import numpy as np
from PIL import Image

from fvlm import atomic
from fvlm.cache import build_once
from fvlm.config import DataConfig

# 3: samples carry their scene (objects, mover) in the JSON; multiple-choice answers are the option text
# 4: videos carry the mover's box per frame; the "reveal" video task
# 5: the reveal task's mover stays put
GENERATOR_VERSION = 5
SAMPLES_PER_SHARD = 256
SPLITS = ("train", "val", "probe", "bench")
# Preference pairs for DPO, written only when asked for (`pairs` > 0): train and held-out.
PAIR_SPLITS = ("pairs", "pairs_val")
# A finished set holds MANIFEST, written last. `fvlm data synth OUT` first writes UNFINISHED into
# OUT, so that a set it never finished (killed, a full disk) is known as its own: a rerun starts it
# over, and readers refuse it rather than train on part of it. A folder without either file is
# someone's own data and is read as it is.
MANIFEST = "manifest.json"
UNFINISHED = ".fvlm-synth-unfinished"
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "cyan": (40, 200, 210),
}
SHAPES = ("square", "circle", "triangle", "diamond")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_PROMPTS = ("Which object moves, and which way?", "What is moving in this clip?", "Describe the motion.", "")
LETTERS = "ABCD"
WORDS = ("cat", "house", "river", "green", "light", "stone", "paper", "cloud", "train", "apple")
SMALL_TALK = (
    ("Hi! How are you?", "I am well, thank you."),
    ("Can you help me?", "Of course. What do you need?"),
    ("Thanks a lot!", "You are welcome."),
    ("What do you see in videos?", "Shapes that move."),
    ("Good night.", "Good night, sleep well."),
)
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


# The white mark of the marked task reaches this many pixels past its object on every side.
MARK_BORDER = 2

# An object placed in a scene: (colour, shape, side in pixels, x, y of its top-left corner).
Placed = tuple[str, str, int, int, int]
# A box an object covers over a clip, (x0, y0, x1, y1) in pixels.
Box = tuple[int, int, int, int]


class SceneObject(TypedDict, total=False):
    """One object of a sample's scene, as its JSON records it (the keys depend on the task)."""

    colour: str
    shape: str
    moves: str | None
    marked: bool
    at: str


class SampleMeta(TypedDict, total=False):
    """A sample's JSON: the dialogue, the kind and frame count, and for videos and images the scene
    (and a video's mover's box per frame); multiple-choice samples add their options and answer."""

    source: str
    frame_count: int
    task: str
    mover_boxes: list[list[float]]
    scene: list[SceneObject]
    user: str
    assistant: str
    choices: list[str]
    answer_index: int
    rejected: str


class PainterStyle(TypedDict, total=False):
    """The keyword arguments of `_Painter` that shape a scene."""

    background: str
    object_scale: tuple[float, float]
    max_objects: int
    min_objects: int


def mark_box(x: int, y: int, d: int) -> tuple[slice, slice]:
    """(rows, columns) of the white mark under an object of side d whose top-left corner is (x, y)."""
    return (
        slice(max(0, y - MARK_BORDER), y + d + MARK_BORDER),
        slice(max(0, x - MARK_BORDER), x + d + MARK_BORDER),
    )


def _shape_mask(shape: str, d: int) -> np.ndarray:
    yy, xx = np.mgrid[0:d, 0:d] + 0.5
    c = d / 2
    if shape == "square":
        return np.ones((d, d), dtype=bool)
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= c * c
    if shape == "diamond":
        return np.abs(yy - c) + np.abs(xx - c) <= c
    return (yy >= 0) & (np.abs(xx - c) <= yy / 2)  # triangle, apex up


class _Painter:
    def __init__(
        self,
        size: int,
        rng: np.random.Generator,
        *,
        background: str = "texture",
        object_scale: tuple[float, float] = (0.125, 0.19),
        max_objects: int = 5,
        min_objects: int = 3,
    ):
        self.size = size
        self.rng = rng
        self.style = background
        self.max_objects = max_objects
        self.min_objects = min_objects
        lo, hi = max(4, round(size * object_scale[0])), max(5, round(size * object_scale[1]))
        self.sizes = range(lo, hi + 1)
        self.masks = {(s, d): _shape_mask(s, d) for s in SHAPES for d in self.sizes}

    def background(self) -> np.ndarray:
        """Muted low-frequency colour blobs plus fine stripes and grain: texture the query must ignore."""
        rng, size = self.rng, self.size
        if self.style == "flat":
            shade = rng.integers(70, 160, size=3)
            return np.broadcast_to(shade.astype(np.int16), (size, size, 3)).copy()
        coarse = rng.integers(60, 170, size=(4, 4, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR), dtype=np.int16)
        period = rng.integers(3, 7)
        stripes = ((np.arange(size)[:, None] + np.arange(size)[None, :] * rng.integers(0, 2)) // period % 2) * 16 - 8
        return base + stripes[..., None] + rng.integers(-10, 11, size=(size, size, 3), dtype=np.int16)

    def layout(self, n: int, distinct_shapes: bool) -> list[tuple[str, str, int]]:
        shapes = self.rng.permutation(SHAPES)[:n] if distinct_shapes else self.rng.choice(SHAPES, size=n)
        colours = self.rng.permutation(list(COLOURS))[:n]
        return [(str(c), str(s), int(self.rng.choice(self.sizes))) for c, s in zip(colours, shapes)]

    def place(self, d: int, taken: list[Box], span: tuple[int, int] = (0, 0)) -> tuple[int, int]:
        """Top-left corner for a d-sized object (moving by `span` in total) clear of `taken` boxes."""
        dx, dy = span
        for _ in range(50):
            x = int(self.rng.integers(max(0, -dx), self.size - d - max(0, dx) + 1))
            y = int(self.rng.integers(max(0, -dy), self.size - d - max(0, dy) + 1))
            box = (min(x, x + dx), min(y, y + dy), max(x, x + dx) + d, max(y, y + dy) + d)
            if all(box[2] + 1 < b[0] or b[2] + 1 < box[0] or box[3] + 1 < b[1] or b[3] + 1 < box[1] for b in taken):
                taken.append(box)
                return x, y
        taken.append(box)
        return x, y

    def paint(self, canvas: np.ndarray, colour: str, shape: str, d: int, x: int, y: int) -> None:
        region = canvas[y : y + d, x : x + d]
        region[self.masks[(shape, d)]] = COLOURS[colour]

    def finish(self, canvas: np.ndarray) -> bytes:
        grain = self.rng.integers(-4, 5, size=canvas.shape, dtype=np.int16)
        img = Image.fromarray(np.clip(canvas + grain, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        return buf.getvalue()


def labelled_scene(p: _Painter, marked: bool = False) -> tuple[bytes, np.ndarray, np.ndarray]:
    """One frame as a video's frame looks (the painter's object count, sizes and background), its
    per-pixel object map (`COLOURS` index * len(SHAPES) + `SHAPES` index, -1 for background) and, with
    `marked`, the first object on a white mark as the marked task paints it: the third return value
    is the mark's square (the object on it included) as a per-pixel bool map, all False without one.
    For pretraining the tiny vision encoder, which learns to tell colour and shape patch by patch."""
    objects = p.layout(int(p.rng.integers(max(1, p.min_objects), max(1, p.max_objects) + 1)), distinct_shapes=False)
    canvas = p.background()
    labels = np.full((p.size, p.size), -1, dtype=np.int16)
    mark = np.zeros((p.size, p.size), dtype=bool)
    taken: list[Box] = []
    colour_ids = {c: i for i, c in enumerate(COLOURS)}
    for i, (colour, shape, d) in enumerate(objects):
        x, y = p.place(d, taken)
        if marked and i == 0:
            box = mark_box(x, y, d)
            canvas[box] = COLOURS["white"]
            mark[box] = True
        p.paint(canvas, colour, shape, d, x, y)
        region = labels[y : y + d, x : x + d]
        region[p.masks[(shape, d)]] = colour_ids[colour] * len(SHAPES) + SHAPES.index(shape)
    return p.finish(canvas), labels, mark


def _choices(rng: np.random.Generator, right: str, wrong: list[str]) -> tuple[list[str], int]:
    options = [right] + [str(w) for w in rng.permutation(sorted(set(wrong) - {right}))[:3]]
    order = rng.permutation(len(options))
    options = [options[i] for i in order]
    return options, options.index(right)


def _mc(question: str, options: list[str], answer: int) -> tuple[str, str]:
    """The options listed with letters; the answer is the chosen option's text ("red square up"), not
    its letter. A letter answer asks a second step of the model (find the option that matches what it
    saw, then name its letter) that a tiny language model does not learn in minutes; the option text
    asks only what the pixels show. Scoring compares the options' answer texts either way."""
    listed = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{question}\n{listed}", options[answer]


def make_video(p: _Painter, frames: int, mc: bool) -> tuple[list[bytes], SampleMeta]:
    rng, size = p.rng, p.size
    low = max(p.min_objects, 2 if mc else 1)  # a multiple-choice video needs a static object for its options
    objects = p.layout(int(rng.integers(low, max(low, p.max_objects) + 1)), distinct_shapes=False)
    direction = str(rng.choice(list(DIRECTIONS)))
    travel = round(size * 0.35)
    span = (DIRECTIONS[direction][0] * travel, DIRECTIONS[direction][1] * travel)
    taken: list[Box] = []
    mover_colour, mover_shape, mover_d = objects[0]
    mx, my = p.place(mover_d, taken, span)
    static = [(c, s, d, *p.place(d, taken)) for c, s, d in objects[1:]]
    background = p.background()
    jpegs: list[bytes] = []
    boxes: list[list[float]] = []
    for t in range(frames):
        canvas = background.copy()
        for c, s, d, x, y in static:
            p.paint(canvas, c, s, d, x, y)
        f = t / max(1, frames - 1)
        x, y = mx + round(span[0] * f), my + round(span[1] * f)
        p.paint(canvas, mover_colour, mover_shape, mover_d, x, y)
        boxes.append([round(v / size, 4) for v in (x, y, x + mover_d, y + mover_d)])
        jpegs.append(p.finish(canvas))
    answer = f"{mover_colour} {mover_shape} {direction}"
    # mover_boxes: the mover's box per frame as shares of the frame side [x0, y0, x1, y1], so that
    # "does the query look at the mover" is measured against where it is, not guessed from pixels.
    meta: SampleMeta = {
        "source": "video",
        "frame_count": frames,
        "task": "motion",
        "mover_boxes": boxes,
        "scene": [
            {"colour": c, "shape": s, "moves": direction if i == 0 else None} for i, (c, s, _) in enumerate(objects)
        ],
    }
    if mc:
        # A 2x2 of {the mover, a static object of the same scene} x {its direction, another one}: every
        # object and every direction is in exactly two options, so the text alone favours none of them.
        colour, shape, _ = objects[1 + int(rng.integers(len(objects) - 1))]
        other = str(rng.choice([d for d in DIRECTIONS if d != direction]))
        options = [
            f"{c} {s} {d}" for c, s in ((mover_colour, mover_shape), (colour, shape)) for d in (direction, other)
        ]
        options = [options[i] for i in rng.permutation(len(options))]
        right = options.index(answer)
        meta["user"], meta["assistant"] = _mc("Which object moves, and where?", options, right)
        meta["choices"], meta["answer_index"] = options, right
    else:
        meta["user"] = str(rng.choice(VIDEO_PROMPTS))
        meta["assistant"] = f"The {mover_colour} {mover_shape} moves {direction}."
    return jpegs, meta


REVEAL_PROMPTS = (
    "What colour does the white object turn?",
    "What happens to the white shape?",
    "Describe the clip.",
    "",
)
REVEAL_OBJECTS = 4  # the mover and three others: the four options are the four colours on screen
# The mover's travel over a reveal clip, as a share of the frame side. It stays put: a query can only
# know where the mover is from frame 0, and a drift of 0.16 (about 1.3 patches at 64 px) already slows
# learning to look there a lot (benchmarks/RESULTS.md: with the place of frame 0 handed to the
# language model, video MC 0.27 with the drift and 0.71 without, after 6,000 samples).
REVEAL_TRAVEL = 0.0


def _crowd(
    p: _Painter, crowd: int, travel: float, distinct_shapes: bool
) -> tuple[list[str], list[str], list[int], str, tuple[int, int], tuple[int, int], list[Placed]]:
    """The scene of the reveal and marked tasks: `crowd` objects of distinct colours (white is kept
    for marking), the first of which (the mover) drifts `travel` of the frame side along one
    direction. Returns (palette, shapes, sizes, direction, span, the mover's first corner (x, y), the
    others as (colour, shape, size, x, y)); object i has colour palette[i], and the colours after
    the first `crowd` are those no object has."""
    rng = p.rng
    palette = [str(c) for c in rng.permutation([c for c in COLOURS if c != "white"])]
    if distinct_shapes:
        shapes = [str(s) for s in rng.permutation(SHAPES)[:crowd]]
    else:
        shapes = [str(s) for s in rng.choice(SHAPES, size=crowd)]
    sizes = [int(d) for d in rng.choice(p.sizes, size=crowd)]
    direction = str(rng.choice(list(DIRECTIONS)))
    step = round(p.size * travel)
    span = (DIRECTIONS[direction][0] * step, DIRECTIONS[direction][1] * step)
    taken: list[Box] = []
    mover = p.place(sizes[0], taken, span)
    others: list[Placed] = [(palette[i], shapes[i], sizes[i], *p.place(sizes[i], taken)) for i in range(1, crowd)]
    return palette, shapes, sizes, direction, span, mover, others


def _colour_question(
    meta: SampleMeta, p: _Painter, mc: bool, palette: list[str], prompts: tuple[str, ...], sentence: str
) -> None:
    """Adds the question of the reveal and marked tasks, the mover's colour (palette[0]), to `meta`.
    As multiple choice it asks prompts[0], and the options are the palette's first four colours in
    random order: the colours on screen, and colours that are not when fewer than four objects are.
    Otherwise it asks one of `prompts` and the answer is `sentence`."""
    if mc:
        options = [palette[i] for i in p.rng.permutation(4)]
        meta["user"], meta["assistant"] = _mc(prompts[0], options, options.index(palette[0]))
        meta["choices"], meta["answer_index"] = options, options.index(palette[0])
    else:
        meta["user"] = str(p.rng.choice(prompts))
        meta["assistant"] = sentence


def make_reveal_video(
    p: _Painter, frames: int, mc: bool, crowd: int | None = None, travel: float = REVEAL_TRAVEL
) -> tuple[list[bytes], SampleMeta]:
    """A video where the first frame says where to look and the later frames say what is there.

    Frame 0 shows the mover alone, painted white. From frame 1 on it has its real colour and `crowd`
    - 1 other objects of other colours stand around it; with `travel` > 0 it also drifts that share
    of the frame side along one direction over the clip. The question asks the colour the white
    object turned into.
    With the full crowd of four (the bench's), the four options are the four colours on screen, so
    knowing which colours are present is worth nothing: the answer needs the colour AT the mover's
    place. Smaller crowds (drawn from the painter's object counts when `crowd` is None) are the easy
    end of the training data: with the mover alone, any token of the frame describes it, and the
    language model learns to read a colour before the query has learned where to look. A static query
    has to describe four objects and their places in one token per frame and lose the binding of
    colour to place; a query chosen by the language model after frame 0 can read the mover alone.
    The colour is asked, not the direction: a tiny language model given perfect per-frame codes of
    the mover's place does not learn to compare places across frames within these budgets
    (benchmarks/RESULTS.md), while reading a property at a place needs no comparison."""
    rng, size = p.rng, p.size
    if crowd is None:
        crowd = int(rng.integers(min(p.min_objects, REVEAL_OBJECTS), min(p.max_objects, REVEAL_OBJECTS) + 1))
    palette, shapes, sizes, direction, span, (mx, my), others = _crowd(p, crowd, travel, distinct_shapes=False)
    colours = palette[:crowd]
    background = p.background()
    jpegs: list[bytes] = []
    boxes: list[list[float]] = []
    for t in range(frames):
        canvas = background.copy()
        f = t / max(1, frames - 1)
        x, y = mx + round(span[0] * f), my + round(span[1] * f)
        if t > 0:
            for c, s, d, ox, oy in others:
                p.paint(canvas, c, s, d, ox, oy)
        p.paint(canvas, "white" if t == 0 else colours[0], shapes[0], sizes[0], x, y)
        boxes.append([round(v / size, 4) for v in (x, y, x + sizes[0], y + sizes[0])])
        jpegs.append(p.finish(canvas))
    meta: SampleMeta = {
        "source": "video",
        "frame_count": frames,
        "task": "reveal",
        "mover_boxes": boxes,
        "scene": [
            {"colour": c, "shape": s, "moves": direction if i == 0 else None}
            for i, (c, s) in enumerate(zip(colours, shapes))
        ],
    }
    _colour_question(meta, p, mc, palette, REVEAL_PROMPTS, f"The white {shapes[0]} turns {colours[0]}.")
    return jpegs, meta


MARKED_PROMPTS = ("What colour is the marked object?", "Describe the marked object.", "Describe the clip.", "")
MARKED_OBJECTS = 4  # one object of each shape: the four options are the four colours on screen
# The marked object's travel over a clip, as a share of the frame side (the motion task's).
MARKED_TRAVEL = 0.35


def _marked_crowd(p: _Painter) -> int:
    """How many objects a marked scene shows when the caller does not say: uniform over the painter's
    counts, capped at MARKED_OBJECTS."""
    return int(p.rng.integers(min(max(p.min_objects, 1), MARKED_OBJECTS), min(p.max_objects, MARKED_OBJECTS) + 1))


def _paint_marked(
    p: _Painter, canvas: np.ndarray, others: list[Placed], colour: str, shape: str, d: int, x: int, y: int
) -> None:
    """Paints a marked scene onto `canvas`: the white mark (a little larger than the object), the
    other objects, then the marked object of side d at (x, y) on the mark."""
    canvas[mark_box(x, y, d)] = COLOURS["white"]
    for obj in others:
        p.paint(canvas, *obj)
    p.paint(canvas, colour, shape, d, x, y)


def make_marked_video(
    p: _Painter, frames: int, mc: bool, crowd: int | None = None, travel: float = MARKED_TRAVEL
) -> tuple[list[bytes], SampleMeta]:
    """A video where the answer is one object's colour, and a white mark says which object.

    `crowd` objects of distinct shapes and distinct colours (white excluded); the first, the mover,
    sits on a white square a little larger than itself and drifts `travel` of the frame side along
    one direction over the clip, the others stand still. The question asks the mover's colour.
    With the full crowd of four (the bench's), the options are the four colours on screen, so
    knowing which colours are present is worth nothing: the answer needs the colour of the one
    object under the mark, whose place changes from frame to frame. One token per frame that
    describes all four objects loses which colour sits on the mark; a query that looks at the mark
    reads it alone. Unlike the reveal task, what marks the object is in every frame, so a query
    that knows *what* to look for finds it, with no place carried over from an earlier frame
    (benchmarks/RESULTS.md: tiny models did not learn that link). The same holds for a fixed
    query: this task asks whether a model looks at the right object and reads it, not whether a
    query chosen by the language model beats a static one. Smaller crowds (drawn from the
    painter's object counts when `crowd` is None) are the easy end of the training data: with the
    mover alone any token describes it, and the language model learns to read a colour from a
    visual token before the query has learned where to look."""
    size = p.size
    if crowd is None:
        crowd = _marked_crowd(p)
    palette, shapes, sizes, direction, span, (mx, my), others = _crowd(p, crowd, travel, distinct_shapes=True)
    colours = palette[:crowd]
    background = p.background()
    jpegs: list[bytes] = []
    boxes: list[list[float]] = []
    d = sizes[0]
    for t in range(frames):
        canvas = background.copy()
        f = t / max(1, frames - 1)
        x, y = mx + round(span[0] * f), my + round(span[1] * f)
        _paint_marked(p, canvas, others, colours[0], shapes[0], d, x, y)
        boxes.append([round(v / size, 4) for v in (x, y, x + d, y + d)])
        jpegs.append(p.finish(canvas))
    meta: SampleMeta = {
        "source": "video",
        "frame_count": frames,
        "task": "marked",
        "mover_boxes": boxes,
        "scene": [
            {"colour": c, "shape": s, "moves": direction if i == 0 else None, "marked": i == 0}
            for i, (c, s) in enumerate(zip(colours, shapes))
        ],
    }
    _colour_question(meta, p, mc, palette, MARKED_PROMPTS, f"The marked {shapes[0]} is {colours[0]}.")
    return jpegs, meta


# The makers share (painter, frames, mc); the reveal and marked tasks also take `crowd` and `travel`.
VIDEO_TASKS: dict[str, Callable[..., tuple[list[bytes], SampleMeta]]] = {
    "motion": make_video,
    "reveal": make_reveal_video,
    "marked": make_marked_video,
}


def make_image(p: _Painter, mc: bool) -> tuple[bytes, SampleMeta]:
    rng, size = p.rng, p.size
    low = min(p.min_objects, 4)  # four distinct shapes at most
    objects = p.layout(int(rng.integers(low, max(low, min(p.max_objects, 4)) + 1)), distinct_shapes=True)
    canvas = p.background()
    taken: list[Box] = []
    placed = [(c, s, d, *p.place(d, taken)) for c, s, d in objects]
    for obj in placed:
        p.paint(canvas, *obj)
    colour, shape, d, x, y = placed[0]
    where = f"{'top' if y + d / 2 < size / 2 else 'bottom'} {'left' if x + d / 2 < size / 2 else 'right'}"
    question = int(rng.integers(3))
    if question == 0:
        user, short, answer = f"What colour is the {shape}?", colour, f"The {shape} is {colour}."
        wrong = list(COLOURS)
    elif question == 1:
        user, short, answer = f"What shape is the {colour} object?", shape, f"The {colour} object is a {shape}."
        wrong = list(SHAPES)
    else:
        user, short, answer = f"Where is the {colour} {shape}?", where, f"At the {where}."
        wrong = [f"{v} {h}" for v in ("top", "bottom") for h in ("left", "right")]
    meta: SampleMeta = {
        "source": "image",
        "frame_count": 1,
        "scene": [
            {
                "colour": c,
                "shape": s,
                "at": f"{'top' if y + d / 2 < size / 2 else 'bottom'} {'left' if x + d / 2 < size / 2 else 'right'}",
            }
            for c, s, d, x, y in placed
        ],
    }
    if mc:
        options, right = _choices(rng, short, wrong)
        meta["user"], meta["assistant"] = _mc(user, options, right)
        meta["choices"], meta["answer_index"] = options, right
    else:
        meta["user"], meta["assistant"] = user, answer
    return p.finish(canvas), meta


MARKED_IMAGE_PROMPTS = ("What colour is the marked object?", "Describe the marked object.", "Describe the picture.", "")


def make_marked_image(p: _Painter, mc: bool, crowd: int | None = None) -> tuple[bytes, SampleMeta]:
    """A still of the marked task: `crowd` objects of distinct shapes and colours (drawn from the
    painter's counts, at most four, when None), the first on a white mark, and the question asks its
    colour; as multiple choice the options are the colours on screen (plus colours that are not,
    below four objects).

    The image task of `make_image` names the object in the question ("What colour is the square?"),
    which a model that reads its one token per frame before the question cannot answer past one
    object: its images stay at chance, and in training they are answers the pixels cannot predict,
    which kept the wider tiny LLMs from reading the videos too (benchmarks/RESULTS.md). Here the mark
    says which object, so a query can find it before the question comes."""
    if crowd is None:
        crowd = _marked_crowd(p)
    palette, shapes, sizes, _, _, (x, y), others = _crowd(p, crowd, 0.0, distinct_shapes=True)
    d = sizes[0]
    canvas = p.background()
    _paint_marked(p, canvas, others, palette[0], shapes[0], d, x, y)
    meta: SampleMeta = {
        "source": "image",
        "frame_count": 1,
        "task": "marked",
        "scene": [{"colour": c, "shape": s, "marked": i == 0} for i, (c, s) in enumerate(zip(palette[:crowd], shapes))],
    }
    _colour_question(meta, p, mc, palette, MARKED_IMAGE_PROMPTS, f"The marked {shapes[0]} is {palette[0]}.")
    return p.finish(canvas), meta


# The makers share (painter, mc); the marked task also takes `crowd`.
IMAGE_TASKS: dict[str, Callable[..., tuple[bytes, SampleMeta]]] = {"named": make_image, "marked": make_marked_image}


def make_text(rng: np.random.Generator) -> SampleMeta:
    kind = int(rng.integers(5))
    if kind == 0:
        a, b = (int(v) for v in rng.integers(0, 50, size=2))
        user, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    elif kind == 1:
        d = str(rng.choice(list(OPPOSITE)))
        user, answer = f"What is the opposite of {d}?", f"The opposite of {d} is {OPPOSITE[d]}."
    elif kind == 2:
        w = str(rng.choice(WORDS))
        user, answer = f"Spell '{w}' backwards.", w[::-1]
    elif kind == 3:
        a, b = (int(v) for v in rng.choice(100, size=2, replace=False))
        user, answer = f"Which is bigger, {a} or {b}?", f"{max(a, b)} is bigger."
    else:
        user, answer = SMALL_TALK[int(rng.integers(len(SMALL_TALK)))]
    return {"user": user, "assistant": answer, "source": "text", "frame_count": 0}


def make_pair(p: _Painter, kind: str, frames: int, video_task: str, image_task: str) -> tuple[list[bytes], SampleMeta]:
    """A preference pair: a caption question about a video or an image (frames, one for an image),
    "chosen" (the JSON's `assistant`) the answer the pixels support, `rejected` the same sentence
    with the asked object's colour swapped for another colour on screen (or, alone on screen, any
    other colour). Only questions whose prompt does not name that colour are asked, so the text
    alone cannot tell the two apart."""
    for _ in range(64):
        if kind == "video":
            jpegs, meta = VIDEO_TASKS[video_task](p, frames, False)
        else:
            jpeg, meta = IMAGE_TASKS[image_task](p, False)
            jpegs = [jpeg]
        colour = meta["scene"][0]["colour"]
        word = re.compile(rf"\b{colour}\b")
        if word.search(meta["user"]) or not word.search(meta["assistant"]):
            continue  # the prompt names the colour (or the answer is not about it): ask another
        on_screen = [o["colour"] for o in meta["scene"][1:] if o["colour"] != colour]
        others = on_screen or [c for c in COLOURS if c not in (colour, "white")]
        meta["rejected"] = word.sub(str(p.rng.choice(others)), meta["assistant"])
        meta["source"] = f"{kind}_pair"
        return jpegs, meta
    raise ValueError(f"the {kind} task asks no question about a colour that its prompt leaves unnamed")


def _write_pairs(folder: Path, split: str, seed: int, count: int, settings: _SplitSettings) -> dict[str, int]:
    """`count` preference pairs (half videos, half images) in shards under `folder`."""
    rng = np.random.default_rng([seed, sum(map(ord, split))])
    painter = _Painter(settings["size"], rng, **settings["painter"])
    writer = _ShardWriter(folder, split)
    counts = {"video": 0, "image": 0}
    for i in range(count):
        kind = "video" if i % 2 == 0 else "image"
        jpegs, meta = make_pair(painter, kind, settings["frames"], settings["video_task"], settings["image_task"])
        key = f"{split}-{kind}-{i:06d}"
        if kind == "video":
            writer.write(key, meta, images=jpegs)
        else:
            writer.write(key, meta, image=jpegs[0])
        counts[kind] += 1
    writer.close()
    return counts


def held_out_pairs(pairs: int) -> int:
    """Held-out preference pairs beside `pairs` train pairs: a tenth, at least 16."""
    return max(16, pairs // 10) if pairs else 0


class _ShardWriter:
    def __init__(self, folder: Path, prefix: str):
        self.folder, self.prefix = folder, prefix
        self.count, self.shard = 0, 0
        self.tar: tarfile.TarFile | None = None
        self.path = folder
        folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, meta: SampleMeta, images: list[bytes] | None = None, image: bytes | None = None) -> None:
        try:
            if self.tar is None or self.count % SAMPLES_PER_SHARD == 0:
                self.close()
                self.path = self.folder / f"{self.prefix}-{self.shard:05d}.tar"
                self.tar = tarfile.open(self.path, "w", format=tarfile.USTAR_FORMAT)
                self.shard += 1
            tar = self.tar
            self._add(tar, f"{key}.json", json.dumps(meta).encode())
            for t, frame in enumerate(images or []):
                self._add(tar, f"{key}.{t:03d}.jpg", frame)
            if image is not None:
                self._add(tar, f"{key}.jpg", image)
        except OSError as exc:
            if exc.filename is None:  # tarfile's write() names no file; the shard it was writing is the one
                raise atomic.naming(exc, self.path) from exc
            raise
        self.count += 1

    def close(self) -> None:
        if self.tar is not None:
            tar, self.tar = self.tar, None
            try:
                tar.close()
            except OSError as exc:
                if exc.filename is None:
                    raise atomic.naming(exc, self.path) from exc
                raise


def _write_split(
    folder: Path,
    split: str,
    seed: int,
    *,
    videos: int,
    images: int,
    texts: int,
    frames: int,
    size: int,
    mc_fraction: float,
    painter: PainterStyle | None = None,
    video_task: str = "motion",
    image_task: str = "named",
) -> dict[str, int]:
    rng = np.random.default_rng([seed, sum(map(ord, split))])
    order = [("video", i) for i in range(videos)] + [("image", i) for i in range(images)]
    order += [("text", i) for i in range(texts)]
    order = [order[i] for i in rng.permutation(len(order))]
    scene_painter = _Painter(size, rng, **(painter or {}))
    writer = _ShardWriter(folder, split)
    counts = {"video": 0, "image": 0, "text": 0, "multiple_choice": 0}
    for kind, i in order:
        key = f"{split}-{kind}-{i:06d}"
        mc = kind != "text" and rng.random() < mc_fraction
        if kind == "video":
            # The bench asks every reveal and marked question with the full crowd (see their makers).
            crowds = {"reveal": REVEAL_OBJECTS, "marked": MARKED_OBJECTS}
            full = {"crowd": crowds[video_task]} if video_task in crowds and split == "bench" else {}
            jpegs, meta = VIDEO_TASKS[video_task](scene_painter, frames, mc, **full)
            writer.write(key, meta, images=jpegs)
        elif kind == "image":
            full = {"crowd": MARKED_OBJECTS} if image_task == "marked" and split == "bench" else {}
            jpeg, meta = IMAGE_TASKS[image_task](scene_painter, mc, **full)
            writer.write(key, meta, image=jpeg)
        else:
            writer.write(key, make_text(rng))
        counts[kind] += 1
        counts["multiple_choice"] += mc
    writer.close()
    return counts


class SceneKnobs(TypedDict, total=False):
    """The scene knobs of `generate_synthetic` (`synth_params` leaves out those at their defaults)."""

    mc_fraction: float
    min_objects: int
    max_objects: int
    object_scale: tuple[float, float]
    background: str
    video_task: str
    image_task: str
    pairs: int


class SetSizes(TypedDict):
    """How many samples of each kind and split, their frames, size and seed."""

    videos: int
    images: int
    texts: int
    frames: int
    size: int
    seed: int
    val: int
    probe: int
    bench: int


class SynthParams(SceneKnobs, SetSizes):
    """The keyword arguments of `generate_synthetic` that a data config asks for."""


class ManifestParams(SetSizes):
    """manifest.json's parameters: the sizes and every scene knob, defaults included."""

    mc_fraction: float
    background: str
    object_scale: list[float]
    max_objects: int
    min_objects: int
    video_task: str
    image_task: str
    pairs: int


class Manifest(TypedDict):
    """manifest.json: the parameters, the samples written per split and kind, and the time taken."""

    generator_version: int
    params: ManifestParams
    splits: dict[str, dict[str, int]]
    samples: int
    seconds: float
    samples_per_sec: float


class _SplitSettings(TypedDict):
    """What every split of one set shares (`_write_split`'s keyword arguments)."""

    frames: int
    size: int
    painter: PainterStyle
    video_task: str
    image_task: str


def generate_synthetic(
    out_dir: str | Path,
    *,
    videos: int,
    images: int,
    texts: int,
    frames: int,
    size: int,
    seed: int,
    val: int = 200,
    probe: int = 10,
    bench: int = 200,
    mc_fraction: float = 0.0,
    background: str = "texture",
    object_scale: tuple[float, float] = (0.125, 0.19),
    max_objects: int = 5,
    min_objects: int = 3,
    video_task: str = "motion",
    image_task: str = "named",
    pairs: int = 0,
) -> Manifest:
    """Writes train/, val/, probe/ and bench/ shard folders plus manifest.json under `out_dir`.

    val keeps the train mix of kinds; probe holds `probe` plain videos for attention heatmaps;
    bench holds `bench` multiple-choice questions (videos and images, half each). `mc_fraction` of the
    train/val videos and images are asked as multiple choice too (default 0: captions only).
    `pairs` > 0 also writes preference pairs (`make_pair`) to pairs/ and held-out ones to pairs_val/.
    Returns the manifest: parameters, counts per split and kind, seconds and samples/s.
    """
    out = Path(out_dir)
    began = time.perf_counter()
    total = max(1, videos + images + texts)
    val_counts = [round(val * n / total) for n in (videos, images)]
    style: PainterStyle = {
        "background": background,
        # The painter reads the two numbers only, whatever the sequence they come in.
        "object_scale": object_scale,
        "max_objects": max_objects,
        "min_objects": min_objects,
    }
    if video_task not in VIDEO_TASKS:
        raise ValueError(f"video_task must be one of {sorted(VIDEO_TASKS)}, got {video_task!r}")
    if image_task not in IMAGE_TASKS:
        raise ValueError(f"image_task must be one of {sorted(IMAGE_TASKS)}, got {image_task!r}")
    common: _SplitSettings = {
        "frames": frames,
        "size": size,
        "painter": style,
        "video_task": video_task,
        "image_task": image_task,
    }
    splits = {
        "train": _write_split(
            out / "train", "train", seed, videos=videos, images=images, texts=texts, mc_fraction=mc_fraction, **common
        ),
        "val": _write_split(
            out / "val",
            "val",
            seed,
            videos=val_counts[0],
            images=val_counts[1],
            texts=max(0, val - sum(val_counts)),
            mc_fraction=mc_fraction,
            **common,
        ),
        "probe": _write_split(out / "probe", "probe", seed, videos=probe, images=0, texts=0, mc_fraction=0.0, **common),
        "bench": _write_split(
            out / "bench",
            "bench",
            seed,
            videos=bench - bench // 2,
            images=bench // 2,
            texts=0,
            mc_fraction=1.0,
            **common,
        ),
    }
    if pairs:
        splits["pairs"] = _write_pairs(out / "pairs", "pairs", seed, pairs, common)
        splits["pairs_val"] = _write_pairs(out / "pairs_val", "pairs_val", seed, held_out_pairs(pairs), common)
    seconds = time.perf_counter() - began
    samples = sum(c.get(k, 0) for c in splits.values() for k in ("video", "image", "text"))
    manifest: Manifest = {
        "generator_version": GENERATOR_VERSION,
        "params": {
            "videos": videos,
            "images": images,
            "texts": texts,
            "frames": frames,
            "size": size,
            "seed": seed,
            "val": val,
            "probe": probe,
            "bench": bench,
            "mc_fraction": mc_fraction,
            "background": background,
            "object_scale": list(object_scale),
            "max_objects": max_objects,
            "min_objects": min_objects,
            "video_task": video_task,
            "image_task": image_task,
            "pairs": pairs,
        },
        "splits": splits,
        "samples": samples,
        "seconds": round(seconds, 3),
        "samples_per_sec": round(samples / max(seconds, 1e-9), 1),
    }
    atomic.write_json(out / MANIFEST, manifest, indent=2)
    return manifest


def synth_params(d: DataConfig, seed: int) -> SynthParams:
    params: SynthParams = {
        "videos": d.synth_videos,
        "images": d.synth_images,
        "texts": d.synth_texts,
        "frames": d.synth_frames,
        "size": d.synth_size,
        "seed": seed,
        "val": d.synth_val,
        "probe": 10,
        "bench": 200,
    }
    scale = d.synth_object_scale  # [min, max] (`validate` checks that it holds two numbers)
    scene: SceneKnobs = {
        "mc_fraction": d.synth_mc_fraction,
        "min_objects": d.synth_min_objects,
        "max_objects": d.synth_max_objects,
        "object_scale": (scale[0], scale[1]),
        "background": d.synth_background,
        "video_task": d.synth_video_task,
        "image_task": d.synth_image_task,
        "pairs": d.synth_pairs,
    }
    defaults: SceneKnobs = {
        "mc_fraction": 0.0,
        "min_objects": 3,
        "max_objects": 5,
        "object_scale": (0.125, 0.19),
        "background": "texture",
        "video_task": "motion",
        "image_task": "named",
        "pairs": 0,
    }
    # Knobs at their defaults stay out, so that sets generated before the knobs existed keep their folder.
    changed = {k: v for k, v in scene.items() if v != defaults.get(k)}
    # The comprehension over the knobs loses their per-key types; it keeps SceneKnobs' keys and values.
    return cast(SynthParams, {**params, **changed})


def ensure_synthetic(data: DataConfig, seed: int, out_dir: str | Path) -> dict[str, str]:
    """Split -> shard folder. Splits whose path is "synthetic" point into a set generated once under
    <out_dir>/data/synth-<hash>/; two processes racing both generate, and the first rename wins."""
    params = synth_params(data, seed)
    digest = hashlib.sha256(json.dumps([GENERATOR_VERSION, params], sort_keys=True).encode()).hexdigest()[:10]
    root = build_once(
        Path(out_dir) / "data" / f"synth-{digest}", MANIFEST, lambda tmp: generate_synthetic(tmp, **params)
    )
    paths = {split: str(root / split) for split in ("train", "val", "probe", "bench")}
    if data.synth_pairs:
        paths.update({split: str(root / split) for split in PAIR_SPLITS})
    for split in ("train", "val", "probe"):
        configured = getattr(data, split)
        if configured != "synthetic":
            paths[split] = configured
    return paths


# ----------------------------------------------------------------------------- `fvlm data synth OUT`


def is_unfinished(folder: Path) -> bool:
    """A set `fvlm data synth` started in `folder` and never finished."""
    return (folder / UNFINISHED).is_file() and not (folder / MANIFEST).is_file()


def unfinished_set_of(path: Path) -> Path | None:
    """The unfinished set that `path` (the set's folder, a split folder or a shard in one) belongs to."""
    path = Path(path)
    for folder in (path, path.parent, path.parent.parent):
        if is_unfinished(folder):
            return folder
    return None


def looks_like_old_unfinished_set(folder: Path) -> bool:
    """Split folders of shards named as this module names them, and no manifest: what a set that an
    fvlm older than UNFINISHED was stopped in looks like (only used to word a refusal)."""
    entries = list(folder.iterdir())
    return (
        not (folder / MANIFEST).exists()
        and bool(entries)
        and all(e.is_dir() and e.name in SPLITS + PAIR_SPLITS for e in entries)
        and all(s.name.startswith(f"{e.name}-") and s.suffix == ".tar" for e in entries for s in e.iterdir())
    )


def prepare_output(out: Path) -> bool:
    """Makes `out` ready for a new set and marks it as unfinished; True when it starts over a set an
    earlier `fvlm data synth` left unfinished. A finished set, a file, or a folder holding anything
    else is refused: its contents are not ours to replace."""
    from fvlm.errors import UsageError, check_folder_path

    check_folder_path(out, "OUT")
    restart = out.is_dir() and is_unfinished(out)
    if restart:
        # Only what this module writes: the split folders and the manifest's temporary file.
        for split in SPLITS + PAIR_SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
        for tmp in out.glob(f".{MANIFEST}.*.tmp"):
            tmp.unlink()
    elif out.is_dir() and any(out.iterdir()):
        if (out / MANIFEST).is_file():
            raise UsageError(f"{out} already holds a finished synthetic set ({MANIFEST}); choose a new folder")
        if looks_like_old_unfinished_set(out):
            raise UsageError(
                f"{out} looks like a synthetic set an older fvlm never finished (no {MANIFEST}); "
                "remove it or choose a new folder"
            )
        raise UsageError(f"{out} is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(
        out / UNFINISHED, "fvlm data synth is writing this set; it is finished once manifest.json exists\n"
    )
    return restart


def finish_output(out: Path) -> None:
    """After the manifest is written: the set is finished, its marker goes."""
    (out / UNFINISHED).unlink(missing_ok=True)
