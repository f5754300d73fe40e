"""Benchmark readers: the project's shards and the JSONL format; malformed entries name file and line."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from fvlm.data.synth import generate_synthetic
from fvlm.errors import UsageError
from fvlm.eval.bench import VisualSettings, parse_mc_sample, read_bench, read_jsonl_bench, read_shard_bench

SETTINGS = VisualSettings(size=32, max_frames=4, fps=1.0, image_frames=2)


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 48), colour).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture()
def media(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    for i in range(12):  # frame_2 must come before frame_10
        (folder / f"frame_{i}.jpg").write_bytes(_jpeg((20 * i, 0, 0)))
    (tmp_path / "still.png").write_bytes(_jpeg((0, 200, 0)))
    return tmp_path


def _write(path, entries):
    path.write_text("\n".join(e if isinstance(e, str) else json.dumps(e) for e in entries) + "\n")
    return path


def test_jsonl_reads_every_answer_form(media):
    path = _write(
        media / "b.jsonl",
        [
            {
                "video": "clip",
                "question": "What is red?",
                "options": ["a ball", "a box"],
                "answer": "B",
                "category": "x",
            },
            {"video": "still.png", "question": "Colour?", "options": ["A. red", "B. green", "C. blue"], "answer": "B"},
            "",
            {"video": str(media / "clip"), "question": "Q", "options": ["one", "two", "three"], "answer": 2, "id": 7},
            {"video": "clip", "question": "Q", "options": ["one", "two"], "answer": "two"},
        ],
    )
    questions = read_bench(str(path), SETTINGS)
    assert [q.answer for q in questions] == [1, 1, 2, 1]
    assert [q.where for q in questions] == [f"{path}:1", f"{path}:2", f"{path}:4", f"{path}:5"]
    # Video-MME style lettered options lose their own letters; the prompt and answers add them back once.
    assert questions[1].options == ["A. red", "B. green", "C. blue"]
    assert questions[1].prompt == "Colour?\nA. red\nB. green\nC. blue\nAnswer with the letter."
    assert questions[0].category == "x" and questions[1].category == "all"
    clip = questions[0].frames()
    assert clip.shape == (4, 32, 32, 3) and clip.dtype == np.uint8
    # Thinned uniformly over the naturally sorted frames 0..11: 0, 4, 7, 11 (red channel 20 * i).
    assert np.allclose(clip[:, 16, 16, 0], [0, 80, 140, 220], atol=6)
    assert questions[1].frames().shape == (2, 32, 32, 3)  # an image is repeated image_frames times


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ({"question": "Q", "options": ["a", "b"], "answer": "A"}, "missing field 'video'"),
        (
            {"video": "clip", "question": "Q", "options": ["a", "b"], "answer": "A", "extra": 1},
            "unknown field(s) extra",
        ),
        ({"video": "clip", "question": "Q", "options": ["a"], "answer": "A"}, "'options' must be a list"),
        ({"video": "clip", "question": "Q", "options": ["a", "b"], "answer": "C"}, "'answer'"),
        ({"video": "clip", "question": "Q", "options": ["a", "b"], "answer": 5}, "out of range"),
        ({"video": "clip", "question": "", "options": ["a", "b"], "answer": "A"}, "'question'"),
        ({"video": "missing.mp4", "question": "Q", "options": ["a", "b"], "answer": "A"}, "no such video"),
        ({"video": "b.jsonl", "question": "Q", "options": ["a", "b"], "answer": "A"}, "not a video"),
    ],
)
def test_jsonl_rejects_malformed_entries_naming_file_and_line(media, line, message):
    good = {"video": "clip", "question": "Q", "options": ["a", "b"], "answer": "A"}
    path = _write(media / "b.jsonl", [good, good, line])
    with pytest.raises(UsageError) as err:
        read_jsonl_bench(path, SETTINGS)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)


def test_empty_benchmark_is_an_error(media):
    with pytest.raises(UsageError, match="no questions"):
        read_jsonl_bench(_write(media / "e.jsonl", [""]), SETTINGS)


def test_shard_reader_matches_the_generator(tmp_path):
    generate_synthetic(tmp_path, videos=0, images=0, texts=0, frames=3, size=32, seed=3, val=0, probe=0, bench=8)
    questions = read_shard_bench(str(tmp_path / "bench"), SETTINGS)
    assert len(questions) == 8
    assert {q.category for q in questions} == {"video", "image"}
    for q in questions:
        meta = json.loads(q.where and _meta_of(tmp_path / "bench", q.where.rsplit("sample ", 1)[1]))
        assert q.options == meta["choices"]  # option-text answers are scored as the texts
        assert q.answer == meta["answer_index"]
        assert q.options[q.answer] == meta["assistant"]
        frames = q.frames()
        assert frames.shape[1:] == (32, 32, 3) and frames.shape[0] in (2, 3)  # images repeated image_frames times


def _meta_of(folder, key):
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name == f"{key}.json":
                    return tar.extractfile(member).read().decode()
    raise KeyError(key)


def test_shard_reader_names_shard_and_key_of_a_bad_sample(tmp_path):
    shard = tmp_path / "bad-00000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, user in (("ok", "Q\nA. x\nB. y"), ("broken", "Q without options")):
            data = json.dumps({"user": user, "assistant": "A. x", "source": "image", "frame_count": 1}).encode()
            for name, blob in ((f"{key}.json", data), (f"{key}.jpg", _jpeg((1, 2, 3)))):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(UsageError, match=rf"{shard}: sample broken: 'user' does not list options"):
        read_shard_bench(str(shard), SETTINGS)


def test_bare_letter_answers_are_scored_as_letters():
    options, answer = parse_mc_sample("Pick\nA. cat\nB. dog\nC. cow", "C.", "here")
    assert options == ["A.", "B.", "C."] and answer == 2
    options, answer = parse_mc_sample("Pick\n(A) cat\nB) dog", "B", "here")
    assert answer == 1 and options == ["A", "B"]
    with pytest.raises(UsageError, match="here: 'assistant'"):
        parse_mc_sample("Pick\nA. cat\nB. dog", "D. bird", "here")


def test_shard_answers_by_letter_or_by_option_text():
    user = "Which moves?\nA. red square up\nB. blue circle up"
    assert parse_mc_sample(user, "B. blue circle up", "x") == (["A. red square up", "B. blue circle up"], 1)
    assert parse_mc_sample(user, "B", "x") == (["A", "B"], 1)
    assert parse_mc_sample(user, "blue circle up", "x") == (["red square up", "blue circle up"], 1)
    with pytest.raises(UsageError, match="nor one of the options' texts"):
        parse_mc_sample(user, "green diamond", "x")
