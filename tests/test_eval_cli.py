"""`fvlm eval` / `fvlm generate` end to end on a tiny saved model, mode losses against the model's own
forward, and the attention pictures."""

import json

import numpy as np
import pytest
import torch

from fvlm.analysis.attention_maps import patch_map, upsample_mass
from fvlm.cli import main
from fvlm.config import load_config
from fvlm.data.loader import build_loader
from fvlm.data.synth import generate_synthetic
from fvlm.eval.evaluate import mode_gaps, mode_losses
from fvlm.eval.looks import attention_record, draw, mover_patches
from fvlm.model.build import build_model, build_tokenizer, save_model

MODES = ("coarse_only", "coarse_fine", "autoregressive")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as training writes it: config.yaml, two complete checkpoints, one incomplete."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    generate_synthetic(data, videos=3, images=2, texts=1, frames=3, size=64, seed=0, val=5, probe=2, bench=4)
    cfg = load_config(
        None,
        {
            "run_id": "r",
            "out_dir": str(root),
            "data.train": str(data / "train"),
            "data.val": str(data / "val"),
            "data.probe": str(data / "probe"),
            "train.stage": 2,
            "data.max_text_tokens": 320,
        },
    )
    run_dir = root / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    torch.manual_seed(0)
    model, tok = build_model(cfg.model).eval(), build_tokenizer(cfg.model)
    for step in (5, 10, 15):
        folder = save_model(model, run_dir / "checkpoints" / f"step_{step:07d}", tok)
        if step != 15:
            (folder / "meta.json").write_text(json.dumps({"step": step, "samples_seen": 8 * step}))
    return {"root": root, "data": data, "run": run_dir, "cfg": cfg, "model": model, "tok": tok}


def test_mode_losses_match_forward_and_run_dino_once(run):
    model, cfg = run["model"], run["cfg"]
    batches = list(build_loader(cfg, "val", run["tok"], train=False, batch_size=4))
    frames = sum(int(b["frame_mask"].sum()) for b in batches)
    model.encoder.frames_encoded = 0
    losses = mode_losses(model, batches, MODES, blank_control=False)
    assert model.encoder.frames_encoded == frames
    assert losses == mode_losses(model, batches, MODES, blank_control=False)  # reproducible
    model.encoder.frames_encoded = 0
    with_blank = mode_losses(model, batches, MODES)
    assert model.encoder.frames_encoded == 2 * frames  # the blank-frame control: one more DINO pass
    with torch.no_grad():
        for mode in MODES:
            assert with_blank[mode]["loss"] == losses[mode]["loss"]
            blank = [model({**b, "frames": torch.zeros_like(b["frames"])}, mode=mode) for b in batches]
            total = sum(float(o.loss_fine if mode != "coarse_only" else o.loss) * o.n_tokens for o in blank)
            assert with_blank[mode]["loss_blank_frames"] == pytest.approx(total / losses[mode]["tokens"], rel=1e-5)
            assert with_blank[mode]["pixel_gain"] == pytest.approx(
                with_blank[mode]["loss_blank_frames"] - with_blank[mode]["loss"]
            )
    with torch.no_grad():
        for mode in MODES:
            outputs = [model(b, mode=mode) for b in batches]
            tokens = sum(o.n_tokens for o in outputs)
            total = sum(float(o.loss_fine if mode != "coarse_only" else o.loss) * o.n_tokens for o in outputs)
            assert losses[mode]["tokens"] == tokens and losses[mode]["n"] == 5
            assert np.isfinite(losses[mode]["loss"]) and losses[mode]["loss"] == pytest.approx(total / tokens, rel=1e-5)
    gaps = mode_gaps(losses)
    assert gaps["coarse_only_minus_coarse_fine"] == pytest.approx(
        losses["coarse_only"]["loss"] - losses["coarse_fine"]["loss"]
    )
    assert set(gaps) == {
        "coarse_only_minus_coarse_fine",
        "coarse_only_minus_autoregressive",
        "coarse_fine_minus_autoregressive",
    }


def test_eval_all_checkpoints_writes_eval_json(run, tmp_path, capsys):
    bench = tmp_path / "mc.jsonl"
    probe_frames = run["data"] / "frames"
    probe_frames.mkdir(exist_ok=True)
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (64, 64), (80 * i, 10, 10)).save(probe_frames / f"{i}.jpg")
    bench.write_text(
        "\n".join(
            json.dumps(
                {
                    "video": str(probe_frames),
                    "question": f"Q{i}",
                    "options": ["a", "b", "c"],
                    "answer": i % 3,
                    "category": "odd" if i % 2 else "even",
                }
            )
            for i in range(4)
        )
    )
    out = tmp_path / "out"
    code = main(
        [
            "eval",
            str(run["run"]),
            "--all-checkpoints",
            "--bench",
            str(bench),
            str(run["data"] / "bench"),
            "--out",
            str(out),
            "--max-samples",
            "3",
            "--attention",
            "2",
        ]
    )
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["step"] == 10 and result["run_id"] == "r" and result["samples_seen"] == 80
    assert [e["step"] for e in result["steps"]] == [5, 10]  # step 15 has no meta.json: incomplete, skipped
    assert set(result["modes"]) == set(MODES) and all(result["modes"][m]["n"] == 3 for m in MODES)
    assert "coarse_only_minus_coarse_fine" in result["gaps"]
    assert set(result["bench"]) == {"mc", "bench"}
    for mode in MODES:
        mc = result["bench"]["mc"][mode]
        assert mc["n"] == 4 and mc["chance"] == pytest.approx(1 / 3) and set(mc["per_category"]) == {"odd", "even"}
        lo, hi = mc["ci95"]
        assert 0 <= lo <= mc["accuracy"] <= hi <= 1
        assert result["bench"]["bench"][mode]["n"] == 4
    assert "| coarse_fine |" in (out / "eval.md").read_text()
    assert len(list((out / "attention").glob("*.png"))) == 2 and (out / "attention" / "attention.npz").is_file()
    assert "static query" in capsys.readouterr().out


def test_eval_rejects_bad_modes_and_folders(run, tmp_path, capsys):
    assert main(["eval", str(run["run"]), "--modes", "coarse_only,sideways", "--data", "none"]) == 2
    assert "unknown mode 'sideways'" in capsys.readouterr().err
    assert main(["eval", str(run["run"] / "checkpoints" / "step_0000015")]) == 2
    assert "incomplete checkpoint" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    # The model is the checkpoint's: a model override would be accepted and do nothing.
    assert main(["eval", str(run["run"]), "--data", "none", "model.arch=multi_token"]) == 2
    assert "model.arch: the model is the checkpoint's" in capsys.readouterr().err
    # The old spelling says how to write it now.
    assert main(["eval", str(run["run"]), "--set", "data.max_frames=4"]) == 2
    assert "--set is gone" in capsys.readouterr().err


def test_generate_on_an_image_and_a_frame_folder(run, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (80, 64), (200, 30, 30)).save(image)
    assert main(["generate", str(run["run"]), str(image), "--max-new-tokens", "4"]) == 0
    assert (
        main(
            [
                "generate",
                str(run["run"]),
                str(run["data"] / "frames"),
                "--mode",
                "coarse_fine",
                "--temperature",
                "0.7",
                "--max-new-tokens",
                "4",
                "--attention",
                str(tmp_path / "look"),
            ]
        )
        == 0
    )
    assert (tmp_path / "look" / "frames.png").is_file()
    assert main(["generate", str(run["run"]), str(image), "--max-new-tokens", "0"]) == 2


def test_generate_answers_from_text_alone_as_the_llm_itself_would(run, capsys):
    """Without a video or image the prompt is answered by the LLM alone: the same greedy tokens as
    transformers' own generate on the chat-template prompt."""
    prompt = "What is 2 plus 3?"
    assert main(["generate", str(run["run"]), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    tok = run["tok"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        new = (
            run["model"]
            .llm.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=end,
                pad_token_id=tok.pad_token_id,
            )[0, ids.shape[1] :]
            .tolist()
        )
    new = new[: new.index(end)] if end in new else new
    assert len(new) == 8 and printed == tok.decode(new, skip_special_tokens=True) + "\n"
    assert main(["generate", str(run["run"])]) == 2  # neither a picture nor a question
    assert "--prompt" in capsys.readouterr().err


def test_heatmaps_have_frame_size_and_sum_to_attention_mass(run):
    model, cfg = run["model"], run["cfg"]
    batch = next(iter(build_loader(cfg, "probe", run["tok"], train=False, batch_size=2)))
    record = attention_record(model, batch, batch["keys"], 0, run["root"] / "a.npz")
    assert record.fine is not None and record.frames.dtype == np.uint8
    for attn in (record.coarse, record.fine):
        for video in range(2):
            for t in np.flatnonzero(record.frame_mask[video]):
                heat = upsample_mass(patch_map(attn[video, t], record.grid), 64, 64)
                assert heat.shape == record.frames.shape[2:4]
                assert heat.sum() == pytest.approx(1 - attn[video, t, :, :, 0].mean(), abs=1e-5)
    summary = draw(record, run["root"] / "pictures")
    for values in summary.values():
        assert 0 <= values["coarse_on_mover"] <= 1 and 0 <= values["fine_on_mover"] <= 1


def test_mover_patches_find_the_moving_square():
    frames = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    for t in range(4):
        frames[t, 8:16, 8 * t : 8 * t + 8] = 255  # an 8-pixel square moving one patch right per frame
    movers = mover_patches(frames, (8, 8))
    for t in range(4):
        assert movers[t].sum() == 1 and movers[t][1, t]


def test_log_samples_paired_intervals_and_checkpoint_differences(run, tmp_path):
    """--log-samples: one JSON line per question and mode, whose chosen options give back the
    accuracy of eval.json (real and grey frames); the mode gaps and accuracy differences carry paired
    intervals that equal the plain differences; two checkpoints with the same weights differ by
    exactly 0. Three questions share one video, one has its own: the interval resamples videos."""
    from PIL import Image

    frames = {}
    for name, shade in (("shared", 40), ("own", 200)):
        frames[name] = tmp_path / name
        frames[name].mkdir()
        for i in range(3):
            Image.new("RGB", (64, 64), (shade, 20 * i, 10)).save(frames[name] / f"{i}.jpg")
    bench = tmp_path / "mc.jsonl"
    bench.write_text(
        "\n".join(
            json.dumps(
                {
                    "video": str(frames["shared" if i < 3 else "own"]),
                    "question": f"Q{i}",
                    "options": ["a", "bb", "ccc"],
                    "answer": i % 3,
                }
            )
            for i in range(4)
        )
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "eval",
                str(run["run"]),
                "--all-checkpoints",
                "--bench",
                str(bench),
                "--out",
                str(out),
                "--max-samples",
                "3",
                "--log-samples",
            ]
        )
        == 0
    )
    result = json.loads((out / "eval.json").read_text())
    for key, gap in result["gaps"].items():
        assert result["gap_intervals"][key]["diff"] == pytest.approx(gap, abs=1e-9)
        lo, hi = result["gap_intervals"][key]["ci95_bootstrap"]
        assert lo <= hi
    by_mode = result["bench"]["mc"]
    assert by_mode["coarse_fine"]["ci95_method"] == "bootstrap over 2 videos"
    for key, d in result["bench_differences"]["mc"].items():
        a, b = key.split("_minus_")
        assert d["diff"] == pytest.approx(by_mode[a]["accuracy"] - by_mode[b]["accuracy"]) and d["n_clusters"] == 2
    (differences,) = result["checkpoint_differences"]
    assert differences["later_step"] == 10 and differences["earlier_step"] == 5
    for mode in MODES:
        d = differences["bench"]["mc"][mode]
        assert d["n"] == 4 and d["diff"] == 0 and d["ci95_bootstrap"] == [0, 0]

    assert sorted(p.name for p in out.glob("samples_*.jsonl")) == [
        "samples_step_0000005.jsonl",
        "samples_step_0000010.jsonl",
    ]
    records = [json.loads(line) for line in (out / "samples_step_0000010.jsonl").read_text().splitlines()]
    assert len(records) == 4 * len(MODES)
    for mode in MODES:
        rows = [r for r in records if r["mode"] == mode]
        assert [r["question_id"] for r in rows] == by_mode[mode]["question_ids"]
        for r in rows:
            assert len(r["scores_mean"]) == len(r["scores_sum"]) == len(r["options"]) == 3
            assert r["chosen"] == int(np.argmax(r["scores_mean"])) and r["correct"] == (r["chosen"] == r["answer"])
            assert r["grey_chosen"] == int(np.argmax(r["grey_scores_mean"]))
        assert np.mean([r["correct"] for r in rows]) == pytest.approx(by_mode[mode]["accuracy"])
        grey_correct = np.mean([r["grey_chosen"] == r["answer"] for r in rows])
        assert grey_correct == pytest.approx(by_mode[mode]["grey_frames"]["accuracy"])
        assert [r["correct"] for r in rows] == [bool(c) for c in by_mode[mode]["correct"]]


def test_phase1b_three_mode_eval_of_the_best_run_and_its_milestones_and_sources(run, tmp_path):
    """evaluate_phase1b picks the foveated grid cell with the lowest best val loss and evaluates its
    every kept checkpoint in all three modes; evaluate_sources writes per-sample losses by kind whose
    token-weighted mean is the eval's own val loss for that mode."""
    import shutil

    from fvlm.experiments.milestones import evaluate_phase1b, evaluate_sources

    scaling = tmp_path / "scaling"
    for rid, loss in (("S-C1-F", 2.5), ("S-C2-F", 2.0), ("S-C2-B", 1.0)):
        shutil.copytree(run["run"], scaling / rid)
        (scaling / rid / "run_summary.json").write_text(
            json.dumps({"status": "completed", "best_val_loss": loss, "best_val_step": 5})
        )
    path = evaluate_phase1b(scaling, run["data"] / "bench", max_samples=4, log=lambda _t: None)
    assert path == scaling / "S-C2-F" / "eval" / "eval.json"
    result = json.loads(path.read_text())
    assert [e["step"] for e in result["steps"]] == [5, 10] and [e["best"] for e in result["steps"]] == [True, False]
    for entry in result["steps"]:
        assert set(entry["modes"]) == set(MODES) and set(entry["gap_intervals"]) == set(entry["gaps"])
        assert set(entry["bench"]["bench"]) == set(MODES)
    assert result["checkpoint_differences"][0]["bench"]["bench"]["coarse_fine"]["diff"] == 0  # same weights
    assert not (scaling / "S-C1-F" / "eval").exists()

    # The checkpoints evaluated side by side in two processes: the same results, in step order.
    shutil.copytree(scaling, tmp_path / "two", ignore=shutil.ignore_patterns("eval"))
    two = json.loads(evaluate_phase1b(tmp_path / "two", run["data"] / "bench", max_samples=4, jobs=2).read_text())
    assert [(e["step"], e["best"]) for e in two["steps"]] == [(e["step"], e["best"]) for e in result["steps"]]
    for one_entry, two_entry in zip(result["steps"], two["steps"], strict=True):
        for mode in MODES:
            assert two_entry["modes"][mode]["loss"] == pytest.approx(one_entry["modes"][mode]["loss"], rel=1e-5)
            assert two_entry["bench"]["bench"][mode]["correct"] == one_entry["bench"]["bench"][mode]["correct"]

    sources = json.loads(evaluate_sources(scaling / "S-C2-F", max_samples=4, log=lambda _t: None).read_text())
    assert sources["step"] == 10 and sources["mode"] == "coarse_fine" and len(sources["keys"]) == 4
    assert set(sources["kinds"]) <= {"video", "image", "text"}
    mean = sum(sources["loss_sum"]) / sum(sources["tokens"])
    assert mean == pytest.approx(result["modes"]["coarse_fine"]["loss"], rel=1e-6)
    by_kind = result["modes"]["coarse_fine"]["by_kind"]
    for kind, r in by_kind.items():
        rows = [i for i, k in enumerate(sources["kinds"]) if k == kind]
        assert r["loss"] == pytest.approx(
            sum(sources["loss_sum"][i] for i in rows) / sum(sources["tokens"][i] for i in rows), rel=1e-6
        )
