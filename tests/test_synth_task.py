"""The synthetic multiple-choice questions give nothing away without the pictures: the options are
built so that the text alone favours none of them."""

from collections import Counter

import numpy as np

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

    painter = _Painter(64, np.random.default_rng(2), background="flat", object_scale=(0.25, 0.25),
                       min_objects=1, max_objects=1)
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
