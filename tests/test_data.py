"""Data pipeline: determinism across workers, exact resume, DDP coverage, mixing rates, loss masks,
robustness to damaged shards, and path errors. Small synthetic shards in tmp_path, CPU only."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fvlm.cli import main as fvlm_main
from fvlm.config import load_config
from fvlm.data.decode import MEAN, STD
from fvlm.data.index import build_index, read_sample
from fvlm.data.inspect import inspect_path
from fvlm.data.loader import build_loader, load_index
from fvlm.data.schedule import TrainSchedule, source_probabilities
from fvlm.data.sources import resolve_sources
from fvlm.data.synth import ensure_synthetic, generate_synthetic
from fvlm.errors import UsageError
from fvlm.model.tokenizer import byte_tokenizer

TOK = byte_tokenizer()


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_synthetic(out, videos=48, images=16, texts=16, frames=4, size=32, seed=3, val=20, probe=4, bench=8)
    return out


def cfg_for(train=None, val=None, **overrides):
    values = {"model.image_size": 32, "data.max_frames": 4, "train.batch_size": 4, "train.eval_batch_size": 5}
    if train is not None:
        values["data.train"] = str(train)
    if val is not None:
        values["data.val"] = str(val)
    values.update(overrides)
    return load_config(None, values)


def take(loader, n_batches):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n_batches:
            break
    return out


def keys_of(batches):
    return [k for b in batches for k in b["keys"]]


def jpeg(colour=(10, 200, 30), size=32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "JPEG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def meta(assistant="a red square", user="what?", frame_count=None, source=None) -> bytes:
    m = {"user": user, "assistant": assistant}
    if frame_count is not None:
        m["frame_count"] = frame_count
    if source:
        m["source"] = source
    return json.dumps(m).encode()


def video(key, n=3, **kw) -> tuple[str, dict[str, bytes]]:
    parts = {"json": meta(frame_count=n, **kw)}
    parts.update({f"{t:03d}.jpg": jpeg() for t in range(n)})
    return key, parts


# ----------------------------------------------------------------------------- synthetic data


def test_synthetic_is_deterministic_and_counts_match(tmp_path, synth):
    again = tmp_path / "again"
    manifest = generate_synthetic(
        again, videos=48, images=16, texts=16, frames=4, size=32, seed=3, val=20, probe=4, bench=8
    )
    assert manifest["splits"]["train"] == {"video": 48, "image": 16, "text": 16, "multiple_choice": 0}
    assert manifest["splits"]["probe"]["video"] == 4 and manifest["splits"]["bench"]["multiple_choice"] == 8
    for split in ("train", "val", "probe", "bench"):
        for a, b in zip(sorted((synth / split).glob("*.tar")), sorted((again / split).glob("*.tar")), strict=True):
            assert a.read_bytes() == b.read_bytes()
    index = load_index(str(synth / "bench"))
    _, parts = read_sample(index.shards[0], int(index.start[0]), int(index.end[0]))
    m = json.loads(parts["json"])
    # Options listed with letters; the answer is the chosen option's text.
    assert "\nA. " in m["user"] and m["assistant"] == m["choices"][m["answer_index"]]
    assert f"\n{'ABCD'[m['answer_index']]}. {m['assistant']}" in "\n" + m["user"]


def _ensure(cfg, queue):
    queue.put(ensure_synthetic(cfg.data, cfg.data_seed, cfg.out_dir))


def test_ensure_synthetic_is_safe_when_two_processes_race(tmp_path):
    import multiprocessing

    cfg = load_config(
        None,
        {
            "out_dir": str(tmp_path),
            "data.synth_videos": 6,
            "data.synth_images": 2,
            "data.synth_texts": 2,
            "data.synth_val": 4,
            "data.synth_size": 32,
        },
    )
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    racers = [ctx.Process(target=_ensure, args=(cfg, queue)) for _ in range(2)]
    for p in racers:
        p.start()
    results = [queue.get(timeout=120) for _ in racers]
    for p in racers:
        p.join()
    assert results[0] == results[1] == ensure_synthetic(cfg.data, cfg.data_seed, cfg.out_dir)
    assert [p.name for p in (tmp_path / "data").iterdir()] == [Path(results[0]["train"]).parent.name]
    assert len(load_index(results[0]["train"])) == 10


def test_ensure_synthetic_generates_once(tmp_path):
    cfg = load_config(
        None,
        {
            "out_dir": str(tmp_path),
            "data.synth_videos": 4,
            "data.synth_images": 2,
            "data.synth_texts": 2,
            "data.synth_val": 4,
            "data.synth_size": 32,
            "data.val": str(tmp_path),
        },
    )
    first = ensure_synthetic(cfg.data, cfg.data_seed, cfg.out_dir)
    stamp = os.stat(Path(first["train"]).parent / "manifest.json").st_mtime_ns
    second = ensure_synthetic(cfg.data, cfg.data_seed, cfg.out_dir)
    assert first == second and first["val"] == str(tmp_path)
    assert os.stat(Path(first["train"]).parent / "manifest.json").st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [Path(first["train"]).parent.name]


# ----------------------------------------------------------------------------- batches


def test_batch_contract(synth):
    cfg = cfg_for(synth / "train")
    (batch,) = take(build_loader(cfg, "train", TOK), 1)
    b, t = batch["frames"].shape[:2]
    # Training frames travel as uint8 pixels (the model normalises them), padding frames zero.
    assert batch["frames"].shape == (b, t, 3, 32, 32) and batch["frames"].dtype == torch.uint8
    assert not batch["frames"][~batch["frame_mask"]].any() and batch["frames"][batch["frame_mask"]].any()
    assert batch["frame_mask"].dtype == torch.bool and batch["frame_mask"].shape == (b, t)
    for name, dtype in (("input_ids", torch.long), ("attention_mask", torch.long), ("loss_mask", torch.bool)):
        assert batch[name].dtype == dtype and batch[name].shape == batch["input_ids"].shape
    assert len(batch["keys"]) == len(batch["sources"]) == len(batch["kinds"]) == b == 4
    # valid frames left-aligned; padding carries pad ids and no attention
    fm = batch["frame_mask"].int()
    assert torch.all(fm[:, :-1] >= fm[:, 1:])
    assert torch.all(batch["input_ids"][batch["attention_mask"] == 0] == TOK.pad_token_id)
    for i, kind in enumerate(batch["kinds"]):
        assert int(fm[i].sum()) == {"video": 4, "image": 1, "text": 0}[kind]


def test_frames_normalised_as_dino_expects(tmp_path):
    write_shard(tmp_path / "s.tar", [("img", {"json": meta(), "jpg": jpeg((128, 128, 128), 48)})])
    cfg = cfg_for(val=tmp_path, **{"data.replicate_image_frames": 3})
    (batch,) = list(build_loader(cfg, "val", TOK))
    assert batch["frames"].shape == (1, 3, 3, 32, 32)  # resized 48 -> 32 and replicated
    expected = (128 / 255 - MEAN) / STD
    assert np.allclose(batch["frames"][0, 0].mean(dim=(1, 2)).numpy(), expected, atol=0.03)


def test_decoded_samples_are_reused_only_where_nothing_they_depend_on_changed(tmp_path, synth):
    import fvlm.data.loader as loader_module

    def val_batches(**overrides):
        return list(build_loader(cfg_for(val=synth / "val", **overrides), "val", TOK))

    loader_module._decoded.clear()
    first = val_batches()
    reused = val_batches()  # a new loader, as the next run of a sweep worker builds
    assert len(loader_module._decoded) == sum(len(b["keys"]) for b in first)
    for a, b in zip(first, reused):
        assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["input_ids"], b["input_ids"])
    # Other reading settings decode afresh.
    assert val_batches(**{"model.image_size": 16})[0]["frames"].shape[-1] == 16
    assert val_batches(**{"data.max_text_tokens": 40})[0]["input_ids"].shape[1] <= 40
    # A shard rewritten in place is read again, not served from the cache.
    write_shard(tmp_path / "s.tar", [("img", {"json": meta(), "jpg": jpeg((0, 0, 0))})])
    dark = list(build_loader(cfg_for(val=tmp_path), "val", TOK))[0]["frames"].mean()
    time.sleep(0.01)
    write_shard(tmp_path / "s.tar", [("img", {"json": meta(), "jpg": jpeg((250, 250, 250))})])
    assert list(build_loader(cfg_for(val=tmp_path), "val", TOK))[0]["frames"].mean() > dark + 1


def test_loss_masks_stage1_all_text_stage2_answer_only(tmp_path):
    write_shard(tmp_path / "s.tar", [("t", {"json": meta("blue circle up", "what moves?")})])
    for stage in (1, 2):
        (batch,) = list(build_loader(cfg_for(val=tmp_path, **{"train.stage": stage}), "val", TOK))
        ids, lm, am = batch["input_ids"][0], batch["loss_mask"][0], batch["attention_mask"][0]
        if stage == 1:
            assert torch.equal(lm, am.bool())
        else:
            assert TOK.decode(ids[lm]) == "blue circle up<|im_end|>"
            assert TOK.decode(ids[: int(lm.int().argmax())]).endswith("<|im_start|>assistant\n")


def test_default_prompt_and_truncation(tmp_path):
    write_shard(
        tmp_path / "s.tar",
        [
            ("empty", {"json": meta("fine", user="")}),
            ("long", {"json": meta("the answer", user="x" * 200)}),
        ],
    )
    (batch,) = list(build_loader(cfg_for(val=tmp_path, **{"data.max_text_tokens": 64}), "val", TOK))
    assert "Say something." in TOK.decode(batch["input_ids"][0])
    assert batch["attention_mask"][1].sum() == 64
    loader = build_loader(cfg_for(val=tmp_path, **{"data.max_text_tokens": 64, "train.stage": 2}), "val", TOK)
    assert keys_of(list(loader)) == ["empty"] and loader.stats["no_loss_tokens"] == 1


def test_mp4_sampled_at_fps_and_capped(tmp_path):
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(16):  # 4 s at 4 fps
            img = np.full((32, 32, 3), i * 15, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    write_shard(tmp_path / "s.tar", [("clip", {"json": meta(), "mp4": buf.getvalue()})])
    (batch,) = list(build_loader(cfg_for(val=tmp_path, **{"data.fps": 1.0, "data.max_frames": 8}), "val", TOK))
    assert batch["frames"].shape[1] == 4 and batch["kinds"] == ["video"]
    (batch,) = list(build_loader(cfg_for(val=tmp_path, **{"data.fps": 4.0, "data.max_frames": 5}), "val", TOK))
    assert batch["frames"].shape[1] == 5
    brightness = batch["frames"][0].mean(dim=(1, 2, 3))
    assert torch.all(brightness[1:] > brightness[:-1])  # evenly thinned, in temporal order


def test_training_uint8_frames_normalise_on_the_device_to_the_host_normalised_frames(synth, monkeypatch):
    """Through worker processes (shared-memory batches) and pinning as a CUDA run asks for: the
    training loader's uint8 frames, normalised as the model does, are the float frames the same
    loader made on the host before."""
    from fvlm.model.backbones import IMAGENET
    from fvlm.model.encoder import normalise_pixels

    real = torch.utils.data.DataLoader
    asked: list[bool] = []

    def spy(*args, **kwargs):
        asked.append(kwargs["pin_memory"])
        kwargs["pin_memory"] = False  # this machine may have no accelerator to pin for
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", spy)
    cfg = cfg_for(synth / "train", **{"data.num_workers": 2})
    raw = take(build_loader(cfg, "train", TOK, pin_memory=True), 3)
    host_loader = build_loader(cfg, "train", TOK)
    host_loader.raw_frames = False
    host = take(host_loader, 3)
    assert asked == [True, False]
    for a, b in zip(raw, host):
        assert a["keys"] == b["keys"] and torch.equal(a["frame_mask"], b["frame_mask"])
        assert a["frames"].dtype == torch.uint8 and b["frames"].dtype == torch.float32
        valid = a["frame_mask"]
        assert torch.equal(normalise_pixels(a["frames"][valid], IMAGENET, torch.float32), b["frames"][valid])
        assert not a["frames"][~valid].any() and not b["frames"][~valid].any()
    val = list(build_loader(cfg_for(val=synth / "val"), "val", TOK))[0]
    assert val["frames"].dtype == torch.float32  # evaluation batches stay normalised on the host


# ----------------------------------------------------------------------------- order, resume, DDP


@pytest.mark.parametrize("workers", [1, 2])
def test_same_seed_same_order_for_any_worker_count(synth, workers):
    reference = keys_of(take(build_loader(cfg_for(synth / "train"), "train", TOK), 12))
    other = keys_of(take(build_loader(cfg_for(synth / "train", **{"data.num_workers": workers}), "train", TOK), 12))
    assert other == reference
    assert len(set(reference)) > 30  # a shuffled stream, not one sample repeated
    shifted = keys_of(take(build_loader(cfg_for(synth / "train", **{"data.seed": 1}), "train", TOK), 12))
    assert shifted != reference


def test_resume_from_cursor_equals_uninterrupted(synth):
    cfg = cfg_for(synth / "train", **{"data.num_workers": 2, "data.max_batch_frames": 10})
    full = keys_of(take(build_loader(cfg, "train", TOK), 30))  # 30 batches span several source epochs
    first = build_loader(cfg, "train", TOK)
    head = keys_of(take(first, 11))
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint is plain data
    resumed = build_loader(cfg, "train", TOK)
    resumed.load_state_dict(state)
    assert head + keys_of(take(resumed, 19)) == full


def test_two_ranks_two_workers_cover_every_sample_once(synth):
    index = load_index(str(synth / "train"))
    n_video = int((index.kind_id == 0).sum())
    cfg = cfg_for(synth / "train", **{"data.num_workers": 2, "data.mix": {"video": 1.0}, "train.batch_size": 4})
    per_rank = []
    for rank in range(2):
        loader = build_loader(cfg, "train", TOK, rank=rank, world_size=2)
        per_rank.append(keys_of(take(loader, n_video // 8)))  # one epoch of the video source
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(_video_keys(index))
    val = [
        keys_of(
            list(build_loader(cfg_for(val=synth / "val", **{"data.num_workers": 2}), "val", TOK, rank=r, world_size=2))
        )
        for r in range(2)
    ]
    assert len(val[0]) + len(val[1]) == len(set(val[0]) | set(val[1])) == len(load_index(str(synth / "val")))
    capped = [
        keys_of(list(build_loader(cfg_for(val=synth / "val"), "val", TOK, rank=r, world_size=2, max_samples=7)))
        for r in range(2)
    ]
    assert len(set(capped[0]) | set(capped[1])) == len(capped[0]) + len(capped[1]) == 7


def _video_keys(index):
    return [
        read_sample(index.shards[index.shard_id[r]], int(index.start[r]), int(index.end[r]))[0]
        for r in np.flatnonzero(index.kind_id == 0)
    ]


def test_dynamic_batching_identical_on_all_ranks(synth):
    cfg = cfg_for(synth / "train", **{"data.max_batch_frames": 9, "train.batch_size": 6})
    ranks = [take(build_loader(cfg, "train", TOK, rank=r, world_size=2), 15) for r in range(2)]
    for a, b in zip(*ranks, strict=True):
        assert a["frames"].shape[0] == b["frames"].shape[0]
        assert int(a["frame_mask"].sum()) <= 9 and int(b["frame_mask"].sum()) <= 9
    assert {int(b["frames"].shape[0]) for b in ranks[0]} != {6}  # the cap did bite


# ----------------------------------------------------------------------------- mixing


def test_text_only_samples_arrive_at_requested_rate(synth):
    index = load_index(str(synth / "train"))
    draws = 20000
    for ratio in (0.14, 0.5):
        probs = source_probabilities(index, {}, ratio)
        rows = TrainSchedule(index, probs, seed=0).rows_at(0, draws)
        share = float(np.mean(index.kind_id[rows] == 2))
        assert abs(share - ratio) < 4 * np.sqrt(ratio * (1 - ratio) / draws)
    kinds = Counter(k for b in take(build_loader(cfg_for(synth / "train"), "train", TOK), 50) for k in b["kinds"])
    assert 0.05 < kinds["text"] / 200 < 0.25


def test_mix_weights_are_realised(synth):
    index = load_index(str(synth / "train"))
    mix = {"video": 0.55, "image": 0.30, "text": 0.15}
    probs = source_probabilities(index, mix, 0.15)
    rows = TrainSchedule(index, probs, seed=0).rows_at(0, 20000)
    realised = np.bincount(index.kind_id[rows], minlength=3) / 20000
    assert np.allclose(realised, [0.55, 0.30, 0.15], atol=0.015)
    with pytest.raises(UsageError, match="text_ratio"):
        source_probabilities(index, mix, 0.14)
    with pytest.raises(UsageError, match="data.mix.audio"):
        source_probabilities(index, {"audio": 1.0}, 0.14)


def test_mix_file_sources_and_missing_source(tmp_path, synth):
    mix = tmp_path / "mix.yaml"
    mix.write_text(
        f"sources:\n  a: {{path: {synth / 'probe'}, weight: 3, prompt: 'Look.'}}\n"
        f"  b: {{path: '{synth / 'bench'}/*.tar', weight: 1}}\n"
    )
    index = load_index(str(mix))
    assert index.sources == ["a", "b"] and index.prompts["a"] == "Look."
    probs = source_probabilities(index, {}, 0.14)
    assert probs == pytest.approx({"a": 0.75, "b": 0.25})
    mix.write_text(f"sources:\n  a: {{path: {synth / 'probe'}}}\n  b: {{path: {tmp_path / 'nowhere'}}}\n")
    with pytest.raises(UsageError, match="source 'b'"):
        resolve_sources(str(mix))
    mix.write_text(f"sources:\n  a: {{path: {synth / 'probe'}, weight: 1}}\n  b: {{path: {synth / 'bench'}}}\n")
    with pytest.raises(UsageError, match="not to b"):
        resolve_sources(str(mix))


def test_path_forms(tmp_path, synth):
    shards = sorted(str(p) for p in (synth / "train").glob("*.tar"))
    assert resolve_sources(str(synth / "train"))[0].shards == shards
    assert resolve_sources(str(synth / "train" / "*.tar"))[0].shards == shards
    assert resolve_sources(",".join(shards))[0].shards == shards
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing", tmp_path / "empty", tmp_path / "missing.yaml"):
        with pytest.raises(UsageError):
            resolve_sources(str(bad))


def test_missing_path_exits_2(tmp_path, capsys):
    assert fvlm_main(["data", "inspect", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(UsageError, match="data.train"):
        build_loader(cfg_for(tmp_path / "missing"), "train", TOK)


# ----------------------------------------------------------------------------- robustness


def damaged_dataset(folder: Path) -> tuple[Path, dict[str, str]]:
    good = [video(f"good{i}") for i in range(6)] + [("txt", {"json": meta("hello")})]
    bad_frame = video("badframe")
    bad_frame[1]["001.jpg"] = b"\xff\xd8 not a jpeg"
    gap = video("gap")
    gap[1]["003.jpg"] = gap[1].pop("002.jpg")
    samples = good + [
        ("badjson", {"json": b"{not json", "jpg": jpeg()}),
        gap,
        ("count", {"json": meta(frame_count=5), **{f"{t:03d}.jpg": jpeg() for t in range(3)}}),
        ("noframes", {"json": meta(frame_count=3)}),  # a video whose frame files are all gone
        ("empty", {"json": meta("  ")}),
        ("nojson", {"jpg": jpeg()}),
        bad_frame,
        video("tail"),
    ]
    shard = write_shard(folder / "a.tar", samples)
    write_shard(folder / "b.tar", [video("b0"), ("hdr", {"json": meta("header will break")}), video("b2")])
    # the last member of a.tar loses its end; b.tar gets a scrambled header in the middle
    data = shard.read_bytes()
    shard.write_bytes(data[: data.rindex(b"tail.002.jpg") + 700])
    b = (folder / "b.tar").read_bytes()
    at = b.index(b"hdr.json")
    (folder / "b.tar").write_bytes(b[:at] + b"\x00garbage" + b[at + 8 :])
    expected = {
        "badjson": "invalid_json",
        "count": "frame_count_mismatch",
        "noframes": "frames_missing",
        "empty": "empty_answer",
        "nojson": "missing_json",
        "badframe": "undecodable_frame",
        "tail": "truncated",
        "@": "corrupt_header",
    }
    return folder, expected


def test_damaged_inputs_are_skipped_counted_and_listed(tmp_path):
    folder, expected = damaged_dataset(tmp_path / "d")
    report = inspect_path(str(folder), cfg_for())["splits"]["data"]
    listed = {("@" if s["key"].startswith("@") else s["key"]): s["reason"] for s in report["skipped"]}
    assert listed == expected
    # good videos, text, the video whose frames have a gap (read as they are, and noted), b0 and b2
    # around the broken header
    assert report["samples"] == 6 + 1 + 1 + 2
    assert report["notes_by_reason"] == {"frame_gap": 1}
    assert report["skipped_by_reason"]["corrupt_header"] == 1
    # evaluation drops the bad sample; training replaces it and keeps batch sizes
    val = build_loader(cfg_for(val=folder), "val", TOK)
    keys = keys_of(list(val))
    assert "badframe" not in keys and len(keys) == 10 and val.stats["undecodable_frame"] == 1
    assert sum(val.stats.values()) == len(expected)
    assert keys_of(list(val)) == keys  # a second pass repeats the first
    train = build_loader(cfg_for(folder, **{"data.num_workers": 2}), "train", TOK)
    batches = take(train, 12)
    assert all(b["input_ids"].shape[0] == 4 for b in batches)
    assert "badframe" not in keys_of(batches)
    # 12 batches of 4 from 10 samples: the stream met the bad sample more than once; it counts once.
    assert train.stats == val.stats
    resumed = build_loader(cfg_for(folder), "train", TOK)
    resumed.load_state_dict(train.state_dict())
    assert resumed.stats == train.stats


def test_index_survives_pax_and_long_names(tmp_path):
    key = "deep/" + "n" * 120
    path = tmp_path / "long.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for ext, data in (("json", meta("ok")), ("jpg", jpeg())):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    index = build_index(resolve_sources(str(path)))
    assert len(index) == 1 and index.kind_of(0) == "image" and not index.skips
    (batch,) = list(build_loader(cfg_for(val=path), "val", TOK))
    assert batch["keys"] == [key]


def test_cli_synth_then_inspect_json(tmp_path, capsys):
    out = tmp_path / "set"
    args = [
        "data",
        "synth",
        str(out),
        "--videos",
        "6",
        "--images",
        "3",
        "--texts",
        "3",
        "--frames",
        "3",
        "--size",
        "32",
        "--val",
        "4",
        "--probe",
        "2",
        "--bench",
        "4",
    ]
    assert fvlm_main(args) == 0
    assert "samples/s" in capsys.readouterr().out
    assert fvlm_main(args) == 2  # never writes into a folder that holds data
    capsys.readouterr()
    assert fvlm_main(["data", "inspect", str(out), "--json", "model.image_size=32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["splits"]["train"]["by_kind"] == {"video": 6, "image": 3, "text": 3}
    assert report["requested"]["train"]["video"] == 6 and report["splits"]["probe"]["by_kind"]["video"] == 2
    assert report["splits"]["train"]["mix"]["requested_by_kind"]["text"] == pytest.approx(0.14)


def test_mc_fraction_asks_train_and_val_as_multiple_choice_on_request_only(tmp_path, capsys):
    def assistants(split):
        texts = []
        for shard in sorted((tmp_path / "mc" / split).glob("*.tar")) + sorted(
            (tmp_path / "plain" / split).glob("*.tar")
        ):
            with tarfile.open(shard) as tar:
                texts += [
                    (shard.parent.parent.name, json.loads(tar.extractfile(m).read()))
                    for m in tar.getmembers()
                    if m.name.endswith(".json")
                ]
        return texts

    plain = generate_synthetic(
        tmp_path / "plain", videos=20, images=10, texts=6, frames=3, size=32, seed=5, val=12, probe=0, bench=0
    )
    assert plain["splits"]["train"]["multiple_choice"] == plain["splits"]["val"]["multiple_choice"] == 0
    assert plain["params"]["mc_fraction"] == 0.0
    assert (
        fvlm_main(
            [
                "data",
                "synth",
                str(tmp_path / "mc"),
                "--videos",
                "20",
                "--images",
                "10",
                "--texts",
                "6",
                "--frames",
                "3",
                "--size",
                "32",
                "--seed",
                "5",
                "--val",
                "12",
                "--probe",
                "0",
                "--bench",
                "0",
                "--mc-fraction",
                "1",
            ]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "mc" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["multiple_choice"] == 30 and manifest["params"]["mc_fraction"] == 1.0
    for split in ("train", "val"):
        for name, meta in assistants(split):
            is_mc = "choices" in meta
            assert is_mc == (name == "mc" and meta["source"] != "text"), (name, meta)
    capsys.readouterr()
    assert fvlm_main(["data", "synth", str(tmp_path / "bad"), "--mc-fraction", "1.5"]) == 2
