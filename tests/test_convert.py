"""`fvlm data convert`: each published format in its exact schema -> shards the loader reads; bad
records skipped and counted; resumable and deterministic; multi-turn loss masks token by token;
upstream fVLM's shard layouts read by the parity rules; a tiny train on a mix of converted sets."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fvlm.cli import main
from fvlm.config import load_config
from fvlm.data import convert as convert_module
from fvlm.data.convert import Options, convert
from fvlm.data.decode import UPSTREAM_SYSTEM_PROMPT, SampleError, encode_dialogue, system_prompt_for
from fvlm.data.inspect import inspect_path
from fvlm.data.loader import build_loader
from fvlm.model.tokenizer import byte_tokenizer

TOK = byte_tokenizer()


# ----------------------------------------------------------------------------- media made here


def mp4(path: Path, seconds: int = 3, rate: int = 4, side: int = 48) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for i in range(seconds * rate):
            img = np.full((side, side, 3), (i * 13) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def picture(fmt: str = "PNG", colour=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def run_cli(capsys, *args) -> dict:
    code = main(["data", "convert", *map(str, args), "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def samples_of(folder: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} over every shard of a folder."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member)
                assert data is not None
                out.setdefault(key, {})[ext] = data.read()
    return out


def metas(folder: Path) -> list[dict]:
    return [json.loads(parts["json"]) for _, parts in sorted(samples_of(folder).items())]


def small_cfg(**values):
    base = {"model.image_size": 32, "data.max_frames": 4, "train.batch_size": 2, "train.eval_batch_size": 4}
    base.update(values)
    return load_config(None, base)


# ----------------------------------------------------------------------------- LLaVA-style


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llava")
    media = root / "media"
    mp4(media / "videos" / "a.mp4")
    mp4(media / "videos" / "b.mp4", seconds=2)
    (media / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    (media / "images").mkdir()
    (media / "images" / "c.jpg").write_bytes(picture("JPEG"))
    human, gpt = "human", "gpt"

    def conv(*pairs):
        return [{"from": who, "value": text} for pair in pairs for who, text in zip((human, gpt), pair, strict=True)]

    records = [
        {
            "id": "v_multi",
            "video": "videos/a.mp4",
            "data_source": "0_30_s_academic_v0_1",
            "conversations": conv(("<video>\nWhat rolls?", "A red ball."), ("Where to?", "To the left.")),
        },
        {"id": "v_one", "video": "videos/b.mp4", "conversations": conv(("<video>\nDescribe it.", "Grey frames."))},
        {"id": "img", "image": "images/c.jpg", "conversations": conv(("<image>\nWhat colour?", "Red."))},
        {"id": "txt", "conversations": conv(("Say hi.", "Hi."))},
        {"id": "gone", "video": "videos/missing.mp4", "conversations": conv(("<video>\nQ?", "A."))},
        {"id": "bad", "video": "videos/broken.mp4", "conversations": conv(("<video>\nQ?", "A."))},
        {"id": "empty", "video": "videos/a.mp4", "conversations": conv(("<video>\nQ?", "  "))},
        {"id": "types", "video": "videos/a.mp4", "conversations": "not a list"},
        {"id": "order", "video": "videos/a.mp4", "conversations": [{"from": "gpt", "value": "first?"}]},
    ]
    src = root / "llava_video_178k.json"
    src.write_text(json.dumps(records))
    return src, media


def test_llava_converts_multi_turn_and_counts_every_bad_record(tmp_path, capsys, llava):
    src, media = llava
    out = tmp_path / "out"
    report = run_cli(capsys, "llava", src, out, "--media-root", media, "--size", "32", "--shard-size", "4")
    assert report["records"] == 9 and report["converted"] == 4
    assert report["by_kind"] == {"image": 1, "text": 1, "video": 2}
    assert report["skipped"] == {
        "missing_media": 1,
        "undecodable_video": 1,
        "empty_answer": 1,
        "bad_conversation": 2,
    }
    # records 0-3 give one file per source (llava, llava_text); records 4-7 and 8 were all skipped
    assert sorted(p.name for p in out.glob("*.tar")) == ["llava-00000.tar", "llava_text-00000.tar"]
    assert report["shards"] == 2 and report["bytes"] == sum(p.stat().st_size for p in out.glob("*.tar"))
    samples = samples_of(out)
    first = json.loads(samples["000000000"]["json"])
    assert first["messages"] == [
        {"role": "user", "content": "What rolls?"},
        {"role": "assistant", "content": "A red ball."},
        {"role": "user", "content": "Where to?"},
        {"role": "assistant", "content": "To the left."},
    ]
    assert (first["user"], first["assistant"], first["frame_count"], first["id"]) == (
        "What rolls?",
        "A red ball.",
        3,  # 3 s at 1 fps
        "v_multi",
    )
    assert sorted(samples["000000000"]) == ["000.jpg", "001.jpg", "002.jpg", "json"]
    assert Image.open(io.BytesIO(samples["000000000"]["000.jpg"])).size == (32, 32)
    assert json.loads(samples["000000003"]["json"])["source"] == "llava_text"  # text records: their own source
    # inspect reads every converted sample, and the loader sees two turns in the multi-turn one
    assert main(["data", "inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["data"]["samples"] == 4
    split = inspect_path(str(out), small_cfg())["splits"]["data"]
    assert split["samples"] == 4 and split["skipped"] == []
    assert split["by_kind"] == {"video": 2, "image": 1, "text": 1}
    (batch,) = list(build_loader(small_cfg(**{"data.val": str(out), "train.stage": 2}), "val", TOK))
    row = batch["keys"].index("000000000")
    ids, mask = batch["input_ids"][row], batch["loss_mask"][row]
    assert TOK.decode(ids[mask]) == "A red ball.<|im_end|>To the left.<|im_end|>"


def test_killed_conversion_resumes_to_the_same_bytes(tmp_path, capsys, llava, monkeypatch):
    src, media = llava
    whole = tmp_path / "whole"
    opts = Options("llava", str(src), "llava", str(media), size=32, shard_size=2)
    convert(opts, whole, workers=2, progress=False)

    cut = tmp_path / "cut"
    real = convert_module.convert_shard
    calls = []

    def dies_on_the_second(*args):
        calls.append(args[2])
        if len(calls) == 2:
            # the second shard is half-written when the process dies
            (cut / ".llava-00001.tar.999.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(convert_module, "convert_shard", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        convert(opts, cut, workers=1, progress=False)
    manifest = json.loads((cut / "convert.json").read_text())
    assert list(manifest["shards"]) == ["00000"] and manifest["complete"] is False
    monkeypatch.setattr(convert_module, "convert_shard", real)
    report = convert(opts, cut, workers=1, progress=False)
    assert report["resumed_shards"] == 1
    files = sorted(p.name for p in whole.iterdir())
    assert files == sorted(p.name for p in cut.iterdir())  # the stale temporary file is gone too
    for name in files:
        assert (whole / name).read_bytes() == (cut / name).read_bytes(), name
    # a rerun of a finished conversion writes nothing and reports the same totals
    again = convert(opts, cut, workers=1, progress=False)
    assert again["resumed_shards"] == 5  # 9 records in shards of 2, three of them all skipped (no file)
    assert again["shards"] == 3  # llava-00000, llava-00001 and llava_text-00001
    assert {k: again[k] for k in ("converted", "skipped", "bytes")} == {
        k: report[k] for k in ("converted", "skipped", "bytes")
    }
    # other settings into the same folder: refused, naming what changed
    code = main(["data", "convert", "llava", str(src), str(cut), "--media-root", str(media), "--size", "48"])
    assert code == 2 and "size" in capsys.readouterr().err


def test_over_length_counted_with_the_tokenizer_s_chat_template(tmp_path, llava):
    src, media = llava
    # byte tokenizer: the two-turn dialogue is about 90 tokens, the single-turn ones under 50
    report = convert(Options("llava", str(src), "llava", str(media), size=32, max_tokens=60), tmp_path, progress=False)
    assert report["skipped"]["over_length"] == 1 and report["converted"] == 3
    assert "v_multi" not in {m.get("id") for m in metas(tmp_path)}


def test_bad_inputs_exit_2(tmp_path, capsys):
    (tmp_path / "list.json").write_text('{"not": "a list"}')
    (tmp_path / "bad.csv").write_text("path,text\nx.mp4,hello\n")
    for args, message in [
        (["llava", tmp_path / "nothing.json", tmp_path / "o"], "no such file"),
        (["llava", tmp_path / "list.json", tmp_path / "o"], "expected a JSON list"),
        (["openvid", tmp_path / "bad.csv", tmp_path / "o"], "missing column(s) caption, video"),
        (["llava", tmp_path / "list.json", tmp_path / "o", "--source", "a/b"], "--source"),
        (["llava", tmp_path / "list.json", tmp_path / "o", "--fps", "0"], "--fps"),
    ]:
        assert main(["data", "convert", *map(str, args)]) == 2
        assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- Hugging Face datasets


@pytest.fixture(scope="module")
def hf_sets(tmp_path_factory) -> Path:
    datasets = pytest.importorskip("datasets")  # a dependency; only these fixtures need it
    root = tmp_path_factory.mktemp("hf")
    image = datasets.Image()
    cauldron = datasets.Dataset.from_dict(
        {
            "images": [
                [{"bytes": picture(), "path": None}],
                [{"bytes": picture("JPEG", (0, 0, 255)), "path": None}],
                [{"bytes": b"not an image", "path": None}],
                [{"bytes": picture(), "path": None}, {"bytes": picture(), "path": None}],
                [{"bytes": picture(), "path": None}],
            ],
            "texts": [
                [{"user": "What is red?\nAnswer briefly.", "assistant": "The square.", "source": "AI2D"}],
                [
                    {"user": "Colour?", "assistant": "Blue.", "source": "VQAv2"},
                    {"user": "Sure?", "assistant": "Yes.", "source": "VQAv2"},
                ],
                [{"user": "Q", "assistant": "A", "source": "AI2D"}],
                [{"user": "Same?", "assistant": "Yes.", "source": "NLVR2"}],
                [{"user": "Q", "assistant": "", "source": "AI2D"}],
            ],
        },
        features=datasets.Features(
            {
                "images": datasets.List(image),
                "texts": datasets.List(
                    {
                        "user": datasets.Value("string"),
                        "assistant": datasets.Value("string"),
                        "source": datasets.Value("string"),
                    }
                ),
            }
        ),
    )
    cauldron.save_to_disk(str(root / "the_cauldron_ai2d"))
    message = {"content": datasets.Value("string"), "role": datasets.Value("string")}
    smoltalk = datasets.Dataset.from_dict(
        {
            "messages": [
                [
                    {"role": "system", "content": "You answer in French."},
                    {"role": "user", "content": "Hello?"},
                    {"role": "assistant", "content": "Bonjour."},
                    {"role": "user", "content": "Thanks?"},
                    {"role": "assistant", "content": "Merci."},
                ],
                [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                [{"role": "assistant", "content": "I speak first."}],
                [{"role": "user", "content": "Empty?"}, {"role": "assistant", "content": ""}],
            ],
            "source": ["smol-magpie-ultra", "smol-constraints", "x", "y"],
        },
        features=datasets.Features({"messages": datasets.List(message), "source": datasets.Value("string")}),
    )
    smoltalk.to_parquet(str(root / "smoltalk" / "data" / "all" / "train-00000-of-00001.parquet"))
    smoltalk.select([1]).to_parquet(str(root / "smoltalk" / "data" / "all" / "test-00000-of-00001.parquet"))
    rlaif = datasets.Dataset.from_dict(
        {
            "ds_name": ["RLAIF-V", "RLAIF-V", "RLAIF-V"],
            "image": [{"bytes": picture("JPEG"), "path": None}] * 3,
            "question": ["What is shown?", "Colour?", "Q"],
            "chosen": ["A red card.", "Red.", "Fine."],
            "rejected": ["A dog.", "Blue.", " "],
            "origin_dataset": ["OK-VQA", "VQAv2", "VQAv2"],
            "origin_split": ['{"model": "x"}'] * 3,
            "idx": ["1", "2", "3"],
            "image_path": ["a.jpg", "b.jpg", "c.jpg"],
        },
        features=datasets.Features(
            {
                "ds_name": datasets.Value("string"),
                "image": image,
                "question": datasets.Value("string"),
                "chosen": datasets.Value("string"),
                "rejected": datasets.Value("string"),
                "origin_dataset": datasets.Value("string"),
                "origin_split": datasets.Value("string"),
                "idx": datasets.Value("string"),
                "image_path": datasets.Value("string"),
            }
        ),
    )
    rlaif.to_parquet(str(root / "RLAIF-V-Dataset" / "RLAIF-V-Dataset_000.parquet"))
    return root


def test_cauldron_smoltalk_and_rlaif_v(tmp_path, capsys, hf_sets):
    cauldron = run_cli(
        capsys, "cauldron", hf_sets / "the_cauldron_ai2d", tmp_path / "c", "--size", "32", "--workers", "2"
    )
    assert (cauldron["converted"], cauldron["by_kind"]) == (2, {"image": 2})
    assert cauldron["skipped"] == {"undecodable_image": 1, "multiple_images": 1, "empty_answer": 1}
    first, second = metas(tmp_path / "c")
    assert (first["user"], first["assistant"], first["origin"]) == (
        "What is red?\nAnswer briefly.",
        "The square.",
        "AI2D",
    )
    assert [m["content"] for m in second["messages"]] == ["Colour?", "Blue.", "Sure?", "Yes."]

    smol = run_cli(capsys, "smoltalk", hf_sets / "smoltalk", tmp_path / "s")
    assert (smol["converted"], smol["by_kind"], smol["skipped"]) == (
        2,
        {"text": 2},
        {"bad_conversation": 1, "empty_answer": 1},
    )  # the train files only: the test file's record is not read
    chat, short = metas(tmp_path / "s")
    assert chat["system"] == "You answer in French." and len(chat["messages"]) == 4
    assert (short["user"], short["assistant"], short["frame_count"]) == ("2+2?", "4", 0)

    pref = run_cli(capsys, "rlaif-v", hf_sets / "RLAIF-V-Dataset", tmp_path / "p", "--size", "32")
    assert (pref["converted"], pref["by_kind"], pref["skipped"]) == (2, {"preference": 2}, {"empty_answer": 1})
    samples = samples_of(tmp_path / "p")
    assert sorted(samples["000000000"]) == ["jpg", "json"]
    assert json.loads(samples["000000000"]["json"]) == {
        "user": "What is shown?",
        "assistant": "A red card.",
        "rejected": "A dog.",
        "source": "rlaif-v",
        "frame_count": 1,
        "id": "1",
        "origin": "RLAIF-V",
    }
    # inspect reads all three; a supervised stage reads a preference pair as its chosen answer
    for folder, usable in (("c", 2), ("s", 2), ("p", 2)):
        split = inspect_path(str(tmp_path / folder), small_cfg())["splits"]["data"]
        assert split["samples"] == usable, folder


# ----------------------------------------------------------------------------- caption tables


def test_openvid_csv_and_vript_captions(tmp_path, capsys):
    media = tmp_path / "media"
    mp4(media / "clip_a.mp4", seconds=5)
    mp4(media / "clip_b.mp4", seconds=2)
    (media / "clip_bad.mp4").write_bytes(b"garbage" * 50)
    table = tmp_path / "OpenVid-1M.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        header = ["video", "caption", "aesthetic score", "motion score", "temporal consistency score"]
        writer.writerow(header + ["camera motion", "frame", "fps", "seconds"])
        writer.writerow(["clip_a.mp4", "A grey fade.", 5.1, 2.0, 0.99, "static", 20, 4, 5.0])
        writer.writerow(["clip_b.mp4", "Short one.", 4.9, 1.0, 0.98, "static", 8, 4, 2.0])
        writer.writerow(["clip_gone.mp4", "Missing.", 4.9, 1.0, 0.98, "static", 8, 4, 2.0])
        writer.writerow(["clip_bad.mp4", "Corrupt.", 4.9, 1.0, 0.98, "static", 8, 4, 2.0])
        writer.writerow(["clip_a.mp4", "", 4.9, 1.0, 0.98, "static", 8, 4, 2.0])
    report = run_cli(
        capsys, "openvid", table, tmp_path / "o", "--media-root", media, "--size", "32", "--max-frames", "4"
    )
    assert report["converted"] == 2
    assert report["skipped"] == {"missing_media": 1, "undecodable_video": 1, "empty_answer": 1}
    a, b = metas(tmp_path / "o")
    assert (a["user"], a["assistant"], a["source"], a["frame_count"], b["frame_count"]) == (
        "",
        "A grey fade.",
        "openvid",
        4,  # 5 s at 1 fps, thinned to 4
        2,
    )
    # the empty question is filled with upstream fVLM's prompt for the source
    (batch,) = list(build_loader(small_cfg(**{"data.val": str(tmp_path / "o")}), "val", TOK))
    assert "Write a brief caption for this video." in TOK.decode(batch["input_ids"][0])

    clips = tmp_path / "vript_clips"
    mp4(clips / "339dXVNQXac" / "339dXVNQXac-Scene-001.mp4", seconds=2)
    captions = tmp_path / "vript_captions"
    captions.mkdir()

    def clip(number, content):
        clip_id = f"339dXVNQXac-Scene-{number:03d}"
        caption = {"shot_type": "Close-up", "camera_movement": "Static", "content": content, "scene_title": "Fade"}
        return clip_id, {
            "video_id": "339dXVNQXac",
            "clip_id": clip_id,
            "video_title": "A fade",
            "caption": caption,
            "voiceover": ["..."],
        }

    document = {
        "meta": {"video_id": "339dXVNQXac", "video_title": "A fade", "num_clips": 2, "integrity": True},
        "data": dict([clip(1, "The screen turns grey."), clip(2, "No clip file for this one.")]),
    }
    (captions / "339dXVNQXac_caption.json").write_text(json.dumps(document))
    (captions / "broken_caption.json").write_text("{not json")
    report = run_cli(capsys, "vript", captions, tmp_path / "v", "--media-root", clips, "--size", "32")
    assert (report["converted"], report["skipped"]) == (1, {"missing_media": 1, "invalid_record": 1})
    (meta,) = metas(tmp_path / "v")
    assert (meta["assistant"], meta["source"], meta["id"]) == (
        "The screen turns grey.",
        "vript",
        "339dXVNQXac-Scene-001",
    )


# ----------------------------------------------------------------------------- loss masks, token by token


def expected_masks(turns, system, stage):
    """Ids and mask built piece by piece from the ChatML turn format, independently of encode_dialogue."""
    messages = ([("system", system)] if system is not None else []) + [
        (role, text) for user, answer in turns for role, text in (("user", user), ("assistant", answer))
    ]
    ids, mask = [], []
    for role, text in messages:
        for piece, target in (
            (f"<|im_start|>{role}\n", False),
            (text, role == "assistant"),
            ("<|im_end|>", role == "assistant"),
            ("\n", False),
        ):
            piece_ids = TOK.encode(piece, add_special_tokens=False)
            ids += piece_ids
            mask += [stage == 1 or target] * len(piece_ids)
    return ids, mask


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_multi_turn_masks_match_the_chat_template_token_by_token(stage, system):
    turns = [("What moves?", "The red ball."), ("Which way?", "Left."), ("Sure?", "Yes.")]
    end = TOK.convert_tokens_to_ids("<|im_end|>")
    ids, mask, full = encode_dialogue(TOK, turns, stage=stage, max_tokens=1000, end_of_turn_id=end, system=system)
    want_ids, want_mask = expected_masks(turns, system, stage)
    assert ids == want_ids and full == len(want_ids)
    assert mask == want_mask
    # truncation inside the first answer keeps its first targets
    cut = want_mask.index(True) + 5
    short, short_mask, _ = encode_dialogue(TOK, turns, stage=stage, max_tokens=cut, end_of_turn_id=end, system=system)
    assert short == want_ids[:cut] and short_mask == want_mask[:cut]


def test_system_prompt_auto_replaces_a_template_default_only():
    assert system_prompt_for("auto", TOK) is None  # the byte tokenizer's template adds no system turn
    assert system_prompt_for("", TOK) is None and system_prompt_for("Hi.", TOK) == "Hi."
    from transformers import PreTrainedTokenizerFast

    # SmolLM2's template inserts its own system turn when a dialogue has none
    template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
        "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    smol = PreTrainedTokenizerFast(
        tokenizer_object=TOK.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|pad|>", chat_template=template
    )
    assert system_prompt_for("auto", smol) == UPSTREAM_SYSTEM_PROMPT
    end = smol.convert_tokens_to_ids("<|im_end|>")
    ids, mask, _ = encode_dialogue(
        smol, [("Q?", "A.")], stage=2, max_tokens=500, end_of_turn_id=end, system=UPSTREAM_SYSTEM_PROMPT
    )
    text = smol.decode(ids)
    assert UPSTREAM_SYSTEM_PROMPT in text and "SmolLM" not in text
    assert smol.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "A.<|im_end|>"
    with pytest.raises(SampleError, match="no_loss_tokens"):
        encode_dialogue(smol, [("Q?", "A.")], stage=2, max_tokens=10, end_of_turn_id=end)


# ----------------------------------------------------------------------------- upstream fVLM's shards


def write_shard(path: Path, samples) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def upstream(user, assistant, source, frame_count):
    return json.dumps({"user": user, "assistant": assistant, "frame_count": frame_count, "source": source}).encode()


def test_upstream_shards_read_by_the_parity_rules(tmp_path):
    jpg = picture("JPEG", size=(32, 32))
    frames = {f"{t:03d}.jpg": jpg for t in (0, 1, 3, 4)}  # frame 2 was a bad JPEG upstream's writer dropped
    write_shard(
        tmp_path / "00000.tar",
        [
            ("gap", {"json": upstream("", "A fade.", "openvid", 4), **frames}),
            ("whole", {"json": upstream("", "Two frames.", "openvid", 2), "000.jpg": jpg, "001.jpg": jpg}),
            ("noframes", {"json": upstream("", "Never downloaded.", "openvid", 0)}),
            (
                "legacy",
                {"json": json.dumps({"token_ids": [1, 2, 3], "loss_mask": [0, 1, 1], "source": "smoltalk"}).encode()},
            ),
            (
                "webvid",
                {
                    "json": json.dumps(
                        {
                            "token_ids": [1],
                            "loss_mask": [1],
                            "caption": "Old caption.",
                            "source": "webvid",
                            "frame_count": 1,
                        }
                    ).encode(),
                    "000.jpg": jpg,
                },
            ),
            ("txtcap", {"txt": b"Caption from a txt file.", "json": b'{"source": "vript"}', "000.jpg": jpg}),
            ("nothing", {"json": b'{"source": "vript"}', "000.jpg": jpg}),
            (
                "typed",
                {"json": json.dumps({"user": 3, "assistant": "x", "source": "openvid"}).encode(), "000.jpg": jpg},
            ),
            (
                "dpo",
                {
                    "json": json.dumps({"user": "Q", "chosen_assistant": "a", "rejected_assistant": "b"}).encode(),
                    "jpg": jpg,
                },
            ),
            ("talk", {"json": upstream("Hi?", "Hello.", "smoltalk", 0)}),
        ],
    )
    split = inspect_path(str(tmp_path), small_cfg(**{"data.max_frames": 8}))["splits"]["data"]
    reasons = {s["key"]: s["reason"] for s in split["skipped"]}
    assert reasons == {
        "noframes": "video_without_frames",
        "legacy": "pretokenised_without_text",
        "nothing": "missing_assistant",
        "typed": "bad_field_user",
        "dpo": "preference_pair",
    }
    assert split["samples"] == 5 and split["notes_by_reason"] == {"frame_gap": 1}
    cfg = small_cfg(**{"data.val": str(tmp_path), "data.max_frames": 8, "data.max_text_tokens": 256})
    batches = list(build_loader(cfg, "val", TOK))
    by_key = {k: (b, i) for b in batches for i, k in enumerate(b["keys"])}
    batch, row = by_key["gap"]
    assert int(batch["frame_mask"][row].sum()) == 4  # the four frames present
    text = {k: TOK.decode(b["input_ids"][i][b["attention_mask"][i].bool()]) for k, (b, i) in by_key.items()}
    assert "Write a brief caption for this video." in text["gap"]  # upstream's prompt for openvid
    assert "What would be the WebVid caption for this video?" in text["webvid"] and "Old caption." in text["webvid"]
    assert "Provide a detailed narration" in text["txtcap"] and "Caption from a txt file." in text["txtcap"]
    assert "Hello." in text["talk"]


# ----------------------------------------------------------------------------- a tiny train on a mix


def test_tiny_train_on_a_mix_of_converted_sets_stage_1_then_2(tmp_path, capsys, llava, hf_sets):
    src, media = llava
    data = tmp_path / "data"
    for fmt, source, extra in (
        ("llava", src, ["--media-root", media]),
        ("cauldron", hf_sets / "the_cauldron_ai2d", []),
        ("smoltalk", hf_sets / "smoltalk", []),
    ):
        run_cli(capsys, fmt, source, data / fmt, "--size", "32", *extra)
    mix = tmp_path / "mix.yaml"
    mix.write_text(
        "sources:\n"
        "  video: {path: 'data/llava/llava-*.tar', weight: 0.55}\n"
        "  image: {path: data/cauldron, weight: 0.30}\n"
        "  text: {path: [data/smoltalk, 'data/llava/llava_text-*.tar'], weight: 0.15}\n"
    )
    for stage in (1, 2):
        code = main(
            [
                "train",
                "tiny",
                f"out_dir={tmp_path / 'runs'}",
                f"run_id=stage{stage}",
                f"train.stage={stage}",
                f"data.train={mix}",
                f"data.val={mix}",
                f"data.probe={data / 'llava'}",
                "train.max_steps=2",
                "train.eval_every=2",
                "train.save_every=2",
                "train.batch_size=2",
                "train.eval_batch_size=4",
                "train.eval_samples=4",
                "train.probe_videos=1",
                "model.image_size=32",
                "data.max_frames=4",
                "data.text_ratio=0.15",
            ]
        )
        assert code == 0, capsys.readouterr().err
        summary = json.loads((tmp_path / "runs" / f"stage{stage}" / "run_summary.json").read_text())
        assert summary["status"] == "completed" and summary["total_steps"] == 2
        assert np.isfinite(summary["final_train_loss"])
