"""The synthetic multiple-choice questions give nothing away without the pictures: the options are
built so that the text alone favours none of them."""

from collections import Counter

import numpy as np
import pytest

from fvlm.data.synth import COLOURS, DIRECTIONS, SHAPES, _Painter, make_image, make_video


def _videos(n=300, seed=0):
    painter = _Painter(32, np.random.default_rng(seed))
    return [make_video(painter, 3, mc=True)[1] for _ in range(n)]


def test_video_options_are_a_two_by_two_of_objects_and_directions():
    for meta in _videos(100):
        options = [o.rsplit(" ", 1) for o in meta["choices"]]
        objects, directions = Counter(o for o, _ in options), Counter(d for _, d in options)
        assert len(set(meta["choices"])) == 4
        # Every object and every direction appears in exactly two options: the right answer is not
        # the one that shares the most with the others.
        assert sorted(objects.values()) == [2, 2] and sorted(directions.values()) == [2, 2]
        assert all(d in DIRECTIONS for d in directions)
        assert meta["assistant"] == meta["choices"][meta["answer_index"]]  # the option's text, no letter


def test_video_answer_is_not_predictable_from_the_text():
    metas = _videos(400)
    letters = Counter(m["answer_index"] for m in metas)
    assert min(letters.values()) > 60, letters  # 100 expected per letter
    # The mover and the distractor are drawn alike: neither colours nor shapes nor directions tell
    # the right option from the wrong one.
    right, wrong = Counter(), Counter()
    for m in metas:
        answer = m["choices"][m["answer_index"]]
        for option in m["choices"]:
            colour, shape, direction = option.split(" ")
            (right if option == answer else wrong).update([colour, shape, direction])
    for word in (*COLOURS, *SHAPES, *DIRECTIONS):
        share_right, share_wrong = right[word] / sum(right.values()), wrong[word] / sum(wrong.values())
        assert abs(share_right - share_wrong) < 0.05, (word, share_right, share_wrong)


def test_image_options_are_balanced():
    painter = _Painter(32, np.random.default_rng(1))
    for _ in range(100):
        _, meta = make_image(painter, mc=True)
        assert len(set(meta["choices"])) == 4
        assert meta["assistant"] == meta["choices"][meta["answer_index"]]  # the option's text, no letter


def test_scene_knobs_flat_background_object_size_and_count():
    """The experiment knobs: a flat background is one colour (up to grain and JPEG), objects have the
    asked size, and a multiple-choice video keeps a distractor even with min_objects=1."""
    import io

    from PIL import Image

    painter = _Painter(
        64, np.random.default_rng(2), background="flat", object_scale=(0.25, 0.25), min_objects=1, max_objects=1
    )
    assert list(painter.sizes) == [16]
    background = painter.background()
    assert background.std(axis=(0, 1)).max() == 0
    frames, meta = make_video(painter, 2, mc=False)
    pixels = np.asarray(Image.open(io.BytesIO(frames[0])), dtype=float)
    colour = meta["assistant"].split()[1]
    painted = (np.abs(pixels - COLOURS[colour]).sum(-1) < 30).sum()
    assert 0.35 * 16 * 16 <= painted <= 16 * 16  # one object (a triangle covers half its box)
    _, mc_meta = make_video(painter, 2, mc=True)
    assert len(set(mc_meta["choices"])) == 4


# ----------------------------------------------------------------------------- the reveal task


def _decoded(jpeg: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(jpeg)), dtype=float)


def _near(pixels: np.ndarray, colour: str, tol: float = 100) -> np.ndarray:
    """Pixels whose nearest palette colour is `colour`, within `tol` (JPEG blurs small shapes)."""
    palette = np.array(list(COLOURS.values()), dtype=float)
    dist = np.abs(pixels[..., None, :] - palette).sum(-1)
    return (dist.argmin(-1) == list(COLOURS).index(colour)) & (dist.min(-1) < tol)


@pytest.mark.parametrize("task", ["reveal", "marked", "marked image"])
def test_colour_options_are_the_four_colours_on_screen_and_tell_nothing_without_pixels(task):
    """The colour tasks ask the mover's (or the marked still object's) colour; with the bench's four
    objects the options are the four colours on screen, so which colours are present says nothing
    about the answer."""
    from fvlm.data.synth import VIDEO_TASKS, make_marked_image

    painter = _Painter(32, np.random.default_rng(3))
    if task == "marked image":
        metas = [make_marked_image(painter, mc=True, crowd=4)[1] for _ in range(400)]
    else:
        metas = [VIDEO_TASKS[task](painter, 3, mc=True, crowd=4)[1] for _ in range(400)]
    right, wrong = Counter(), Counter()
    for m in metas:
        scene_colours = {o["colour"] for o in m["scene"]}
        assert (
            sorted(m["choices"]) == sorted(scene_colours) and len(scene_colours) == 4 and "white" not in scene_colours
        )
        assert m["assistant"] == m["choices"][m["answer_index"]] == m["scene"][0]["colour"]
        if task.startswith("marked"):
            assert sorted(o["shape"] for o in m["scene"]) == sorted(SHAPES)  # one object of each shape
            assert [o["marked"] for o in m["scene"]] == [True, False, False, False]
        for option in m["choices"]:
            (right if option == m["assistant"] else wrong)[option] += 1
    assert min(Counter(m["answer_index"] for m in metas).values()) > 70  # 100 expected per letter
    for colour in set(right) | set(wrong):
        share_right, share_wrong = right[colour] / sum(right.values()), wrong[colour] / sum(wrong.values())
        assert abs(share_right - share_wrong) < 0.05, (colour, share_right, share_wrong)


def test_reveal_frames_show_the_white_mover_alone_first_then_its_colour_inside_its_box():
    from fvlm.data.synth import make_reveal_video

    painter = _Painter(64, np.random.default_rng(4), background="flat")
    for i in range(20):
        travel = 0.16 if i % 2 else 0.0  # the shipped clips stay put; a drift is a parameter
        jpegs, meta = make_reveal_video(painter, 4, mc=False, crowd=4, travel=travel)
        colour, shape = meta["scene"][0]["colour"], meta["scene"][0]["shape"]
        assert meta["assistant"] == f"The white {shape} turns {colour}."
        others = [o["colour"] for o in meta["scene"][1:]]
        xs = []
        for t, (jpeg, box) in enumerate(zip(jpegs, meta["mover_boxes"])):
            pixels = _decoded(jpeg)
            x0, y0, x1, y1 = (round(v * 64) for v in box)
            inside = np.zeros(pixels.shape[:2], dtype=bool)
            inside[y0:y1, x0:x1] = True
            mover = _near(pixels, "white" if t == 0 else colour)
            strict = _near(pixels, "white" if t == 0 else colour, tol=40)
            # The mover's pixels are in its box (a triangle or diamond fills half of it), none outside.
            assert mover[inside].sum() >= 0.25 * inside.sum() and strict[~inside].sum() < 5, t
            # The three others are absent from frame 0 and present later.
            present = [_near(pixels, c, tol=40).sum() > 5 for c in others]
            assert not any(present) if t == 0 else all(present), (t, present)
            xs.append((x0, y0))
        assert (xs[0] != xs[-1]) == (travel > 0)  # the mover drifts only when asked to


def test_mover_patches_from_the_boxes_agree_with_the_pixel_rule_on_motion_videos():
    """Two ways to find the mover: its boxes from the generator, and the patches where the frame
    differs from the video's median frame (right for motion videos, where only the mover changes)."""
    from fvlm.data.synth import make_reveal_video
    from fvlm.eval.looks import mover_patches

    painter = _Painter(64, np.random.default_rng(5), background="flat", object_scale=(0.19, 0.19))
    agree = []
    for _ in range(20):
        jpegs, meta = make_video(painter, 4, mc=False)
        frames = np.stack([_decoded(j) for j in jpegs])
        by_box = mover_patches(frames, (8, 8), boxes=np.asarray(meta["mover_boxes"]))
        by_pixels = mover_patches(frames, (8, 8))
        assert by_box.any(axis=(1, 2)).all()
        agree.append((by_box == by_pixels).mean())
    assert np.mean(agree) > 0.97, np.mean(agree)
    # In a reveal video objects appear after frame 0, so the pixel rule marks them; the boxes do not.
    jpegs, meta = make_reveal_video(painter, 4, mc=False)
    frames = np.stack([_decoded(j) for j in jpegs])
    by_box = mover_patches(frames, (8, 8), boxes=np.asarray(meta["mover_boxes"]))
    assert by_box.sum(axis=(1, 2)).max() <= 4 and mover_patches(frames, (8, 8))[0].sum() > by_box[0].sum()


# ----------------------------------------------------------------------------- the marked task


def test_marked_frames_show_the_mover_on_its_white_mark_inside_its_box_as_it_moves():
    from fvlm.data.synth import make_marked_video

    painter = _Painter(64, np.random.default_rng(7), background="flat")
    for _ in range(20):
        jpegs, meta = make_marked_video(painter, 4, mc=False, crowd=4)
        colour, shape = meta["scene"][0]["colour"], meta["scene"][0]["shape"]
        assert meta["assistant"] == f"The marked {shape} is {colour}."
        corners = []
        for jpeg, box in zip(jpegs, meta["mover_boxes"]):
            pixels = _decoded(jpeg)
            x0, y0, x1, y1 = (round(v * 64) for v in box)
            near = np.zeros(pixels.shape[:2], dtype=bool)  # the box and the mark's 2-pixel rim
            near[max(0, y0 - 2) : y1 + 2, max(0, x0 - 2) : x1 + 2] = True
            white = _near(pixels, "white", tol=60)
            # The mark is under the mover, and nowhere else; the mover's colour is inside its box.
            assert white[near].sum() >= 0.3 * near.sum() and white[~near].sum() < 5
            assert _near(pixels, colour)[y0:y1, x0:x1].sum() >= 0.25 * (y1 - y0) * (x1 - x0)
            # Every other object is on screen in every frame.
            assert all(_near(pixels, o["colour"], tol=40).sum() > 5 for o in meta["scene"][1:])
            corners.append((x0, y0))
        assert corners[0] != corners[-1] and meta["scene"][0]["moves"] in DIRECTIONS


def test_a_marked_image_shows_the_named_colour_on_the_white_mark_and_the_others_off_it():
    from fvlm.data.synth import make_marked_image

    painter = _Painter(64, np.random.default_rng(11), background="flat", min_objects=1, max_objects=4)
    crowds = set()
    for _ in range(30):
        jpeg, meta = make_marked_image(painter, mc=False)
        crowds.add(len(meta["scene"]))
        marked = meta["scene"][0]
        assert meta["source"] == "image" and meta["frame_count"] == 1 and marked["marked"]
        assert meta["assistant"] == f"The marked {marked['shape']} is {marked['colour']}."
        pixels = _decoded(jpeg)
        rows, cols = np.nonzero(_near(pixels, "white", tol=60))
        on_mark = np.zeros(pixels.shape[:2], dtype=bool)  # the mark's box: the object and its rim
        on_mark[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        assert (rows.max() - rows.min()) < 20 and (cols.max() - cols.min()) < 20  # one mark, one object wide
        colour = _near(pixels, marked["colour"])
        assert colour.sum() > 10 and colour[~on_mark].sum() < 5  # the marked object is on the mark
        for other in meta["scene"][1:]:
            seen = _near(pixels, other["colour"], tol=40)
            assert seen.sum() > 5 and seen[on_mark].sum() < 5  # the others are on screen, off the mark
    assert crowds == {1, 2, 3, 4}


def test_the_bench_asks_every_marked_question_with_four_objects_and_training_starts_from_one(tmp_path):
    """Training scenes span the painter's counts (one object alone is the easy end); the bench's are
    always the full crowd, so its options are always the four colours on screen."""
    import json

    from fvlm.data.synth import generate_synthetic

    generate_synthetic(
        tmp_path, videos=60, images=2, texts=2, frames=2, size=32, seed=0, val=4, probe=2, bench=30,
        mc_fraction=0.5, min_objects=1, max_objects=4, video_task="marked", image_task="marked",
    )  # fmt: skip

    def crowds(split):
        import tarfile

        out = []
        for shard in sorted((tmp_path / split).glob("*.tar")):
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".json"):
                        meta = json.load(tar.extractfile(member))
                        if meta.get("task") == "marked":
                            out.append(len(meta["scene"]))
        return out

    assert set(crowds("bench")) == {4}
    assert set(crowds("train")) == {1, 2, 3, 4}
