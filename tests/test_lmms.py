"""lmms-eval runs an fvlm checkpoint end to end on a local task (nothing downloaded): under both
protocols its per-question results equal `fvlm eval`'s on the same questions."""

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (scripts/setup.sh installs it, without its deps)")

from lmms_eval.api.instance import Instance, unwrap_generation_output  # noqa: E402
from lmms_eval.api.model import lmms  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.models import MODEL_REGISTRY_V2  # noqa: E402
from lmms_eval.models.registry_v2 import ModelRegistryV2  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from fvlm.cli import main  # noqa: E402
from fvlm.data.synth import generate_synthetic  # noqa: E402
from fvlm.errors import UsageError  # noqa: E402
from fvlm.eval.lmms import FvlmLmms, manifest  # noqa: E402
from fvlm.eval.lmms_tasks import doc_to_choice, process_generated  # noqa: E402
from fvlm.eval.media import load_visual  # noqa: E402
from fvlm.eval.protocol import extract_letter  # noqa: E402
from fvlm.eval.scoring import encode_answers, frames_batch, score_option_alone  # noqa: E402
from fvlm.model.pretrain_tiny import Recipe, shipped_backbones  # noqa: E402

MODE = "coarse_fine"
ROOT = Path(__file__).resolve().parent.parent


def _mp4(path, frames=4, shade=0):
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=2)
        stream.width, stream.height, stream.pix_fmt = 48, 40, "yuv420p"
        for i in range(frames):
            pixels = np.full((40, 48, 3), (40 * i + shade) % 250, np.uint8)
            pixels[:, : 8 * (i + 1)] = 255 - shade
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


# Trained for a few seconds on synthetic multiple-choice samples: enough for greedy answers that
# differ between questions (a random model writes the same newline for every prompt).
TRAIN_SAMPLES = 200


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny trained run and a benchmark JSONL over mp4s, a frame folder and an image."""
    root = tmp_path_factory.mktemp("lmms")
    data = root / "data"
    generate_synthetic(
        data,
        videos=TRAIN_SAMPLES,
        images=0,
        texts=0,
        frames=2,
        size=32,
        seed=1,
        val=4,
        probe=2,
        bench=0,
        mc_fraction=1.0,
    )
    backbones = shipped_backbones(Recipe())
    assert backbones is not None
    settings = {
        "model.llm": backbones / "tiny-llm",
        "model.dino": backbones / "tiny-dino",
        "model.image_size": 32,
        "data.train": data / "train",
        "data.val": data / "val",
        "data.probe": data / "probe",
        "data.text_ratio": 0,
        "data.max_frames": 2,
        "data.max_text_tokens": 200,
        "train.stage": 2,
        "train.max_steps": 0,
        "train.max_samples": TRAIN_SAMPLES,
        "train.batch_size": 8,
        "train.eval_every": TRAIN_SAMPLES,
        "train.save_every": TRAIN_SAMPLES,
        "train.eval_samples": 4,
        "optim.lr_connector": 0.01,
        "optim.lr_llm": 0.003,
    }
    args = ["train", "tiny", f"out_dir={root}", "run_id=r"] + [f"{k}={v}" for k, v in settings.items()]
    assert main(args) == 0
    model_dir = root / "r"
    media = root / "media"
    media.mkdir()
    _mp4(media / "a.mp4", shade=0)
    _mp4(media / "b.mp4", frames=6, shade=90)
    (media / "frames").mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (70 * i, 200 - 50 * i, 30)).save(media / "frames" / f"{i}.png")
    Image.new("RGB", (50, 30), (10, 120, 240)).save(media / "still.png")
    rows = [
        ("media/a.mp4", "What colour is the stripe?", ["red", "white", "blue"], "A", "colour"),
        ("media/a.mp4", "Which colour moves?", ["purple", "orange"], 1, "motion"),
        ("media/b.mp4", "How many frames?", ["A. four", "B. six", "C. eight", "D. ten"], "B", "count"),
        ("media/frames", "Which hue comes last?", ["green", "red", "grey"], "grey", "colour"),
        ("media/still.png", "What is shown?", ["sky", "grass", "sand"], 0, "scene"),
    ]
    lines = [
        json.dumps({"video": v, "question": q, "options": o, "answer": a, "category": c}) for v, q, o, a, c in rows
    ]
    (root / "tiny_mc.jsonl").write_text("\n".join(lines) + "\n")
    return {"root": root, "model": model_dir, "jsonl": root / "tiny_mc.jsonl", "n": len(rows)}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))
    if "fvlm" not in MODEL_REGISTRY_V2.list_model_names():
        # An installed fvlm registers through its entry point; a source checkout on PYTHONPATH does not.
        MODEL_REGISTRY_V2.register_manifest(manifest())


def test_entry_point_registers_the_model(tmp_path, monkeypatch):
    """pyproject.toml's entry point, as an installed fvlm declares it, is how lmms-eval finds `--model fvlm`."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11 reads pyproject.toml")
    groups = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    dist = tmp_path / "fvlm_entry-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fvlm-entry\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        "[lmms_eval.models]\n" + "".join(f"{k} = {v}\n" for k, v in groups["lmms_eval.models"].items())
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    assert registry.get_model_class("fvlm") is FvlmLmms
    assert issubclass(FvlmLmms, lmms) and FvlmLmms.is_simple


def test_lmms_eval_matches_fvlm_eval(bench, offline, tmp_path, capsys):
    # fvlm's own scoring: `fvlm eval --protocol both` on the JSONL.
    out = tmp_path / "fvlm_eval"
    code = main(
        ["eval", str(bench["model"]), "--data", "none", "--bench", str(bench["jsonl"]), "--modes", MODE]
        + ["--protocol", "both", "--out", str(out), "--max-new-tokens", "6", "--log-samples"]
    )
    assert code == 0
    entry = json.loads((out / "eval.json").read_text())
    loglik = entry["bench"]["tiny_mc"][MODE]
    generated = entry["generate"]["tiny_mc"][MODE]

    tasks = tmp_path / "tasks"
    assert main(["bench", "lmms-task", str(bench["jsonl"]), str(tasks), "--max-new-tokens", "6"]) == 0
    assert "tiny_mc, tiny_mc_generate (5 questions)" in capsys.readouterr().out
    result = simple_evaluate(
        model="fvlm",
        model_args=f"pretrained={bench['model']},mode={MODE}",
        tasks=["tiny_mc", "tiny_mc_generate"],
        task_manager=TaskManager("WARNING", include_path=str(tasks), include_defaults=False),
        batch_size=2,
        log_samples=True,
        verbosity="WARNING",
    )
    samples = {task: sorted(result["samples"][task], key=lambda s: s["doc_id"]) for task in result["samples"]}
    assert [len(samples[t]) for t in ("tiny_mc", "tiny_mc_generate")] == [bench["n"]] * 2

    # Log-likelihood: every option of every question answered, with the loss that is minus fvlm
    # eval's mean answer log-likelihood of that option; so the choice and the accuracy are the same.
    (logged,) = out.glob("samples_step_*.jsonl")
    fvlm_scores = [json.loads(line)["scores_mean"] for line in logged.read_text().splitlines()]
    mc = samples["tiny_mc"]
    for sample, scores in zip(mc, fvlm_scores):
        losses = [r[0][0] for r in sample["resps"]]  # per option: [(loss, greedy)]
        assert losses == pytest.approx([-x for x in scores], rel=1e-4)
    assert [int(s["acc"]) for s in mc] == loglik["correct"]
    assert 0 < sum(loglik["correct"]) < bench["n"]  # the comparison can tell right from wrong
    acc = result["results"]["tiny_mc"]["acc,none"]
    assert 0 <= acc <= 1 and acc == pytest.approx(loglik["accuracy"])

    # Generation: the same greedy answers, and the letter extracted the same way.
    answers = [s["resps"][0][0] for s in samples["tiny_mc_generate"]]
    assert answers == generated["responses"]
    assert [int(s["accuracy"]) for s in samples["tiny_mc_generate"]] == generated["correct"]
    assert len(set(answers)) > 1  # answers that differ between questions
    assert result["results"]["tiny_mc_generate"]["accuracy,none"] == pytest.approx(generated["accuracy"])


def _request(kind, args):
    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1})


def test_requests_without_a_task(bench):
    """The request shapes lmms-eval sends, answered directly: a PIL image and a text-only context."""
    model = FvlmLmms(pretrained=str(bench["model"]), mode=MODE, batch_size="2")
    still = Image.open(bench["root"] / "media" / "still.png")
    model.task_dict = {"t": {"test": [{"image": still}, {"image": None}]}}

    def visual(doc):
        return [doc["image"]] if doc["image"] is not None else []

    requests = [
        _request("loglikelihood", ("Colour?", " blue", visual, 0, "t", "test")),
        _request("loglikelihood", ("Colour?", " red", visual, 0, "t", "test")),
        _request("loglikelihood", ("Say hi.", "hi", visual, 1, "t", "test")),
        _request("loglikelihood", ("", "blue")),  # acc_mutual_info's unconditional request
    ]
    scored = model.scores(requests)
    # What lmms-eval's evaluator reads from `loglikelihood` is the same pairs.
    assert [unwrap_generation_output(r)[0] for r in model.loglikelihood(requests)] == scored
    assert len(scored) == 4 and all(np.isfinite(s) and s > 0 and isinstance(g, bool) for s, g in scored)
    # One request alone gives what it gives in a batch with others.
    assert model.scores(requests[1:2])[0][0] == pytest.approx(scored[1][0], rel=1e-4)
    # The loss is the mean over answer tokens that fvlm's plain reference scorer gives, from the
    # image file decoded by fvlm's media reader; greedy means KV-cached greedy decoding writes the
    # answer's tokens (its end-of-turn token included).
    s = model.settings
    frames, mask = frames_batch(
        [
            load_visual(
                bench["root"] / "media" / "still.png",
                size=s.size,
                max_frames=s.max_frames,
                fps=s.fps,
                image_frames=s.image_frames,
            )
        ]
    )
    for request, (loss, greedy) in zip(requests[:3], scored):
        context, continuation, _, doc_id = request.args[:4]
        encoded = encode_answers(model.tokenizer, context, [continuation.strip()], "t")
        doc_frames = (frames, mask) if doc_id == 0 else (frames[:, :0], mask[:, :0])
        _, mean = score_option_alone(model.model, encoded, 0, *doc_frames, MODE)
        assert loss == pytest.approx(-mean, rel=1e-4)
        answer = encoded.option_ids[0]
        batch = {
            "frames": doc_frames[0],
            "frame_mask": doc_frames[1],
            "input_ids": torch.tensor([encoded.prompt_ids]),
            "attention_mask": torch.ones(1, len(encoded.prompt_ids), dtype=torch.long),
        }
        written = model.model.generate(batch, mode=MODE, max_new_tokens=len(answer))[0].tolist()
        assert greedy == (written == answer)
    texts = model.generate_until(
        [
            _request("generate_until", ("Colour?", {"max_new_tokens": 4, "until": ["\n"]}, visual, 0, "t", "test")),
            _request("generate_until", ("Say hi.", {"max_new_tokens": 2}, visual, 1, "t", "test")),
        ]
    )
    assert len(texts) == 2 and all(isinstance(t, str) and "\n" not in t for t in texts)
    with pytest.raises(NotImplementedError, match="multi-round"):
        model.generate_until_multi_round([])
    model.task_dict["t"]["test"].append({"image": 3})
    with pytest.raises(UsageError, match="t/test doc 2: a visual of type int"):
        model.scores([_request("loglikelihood", ("Q", "A", visual, 2, "t", "test"))])


def test_bad_model_args_and_tasks(bench, tmp_path, capsys):
    with pytest.raises(UsageError, match="unknown key"):
        FvlmLmms(pretrained=str(bench["model"]), modes="coarse_fine")
    with pytest.raises(UsageError, match="no 'sideways' mode|unknown mode 'sideways'"):
        FvlmLmms(pretrained=str(bench["model"]), mode="sideways")
    with pytest.raises(UsageError, match="batch_size='auto'"):
        FvlmLmms(pretrained=str(bench["model"]), batch_size="auto")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"video": "nowhere.mp4", "question": "Q", "options": ["a", "b"], "answer": "A"}) + "\n")
    assert main(["bench", "lmms-task", str(bad), str(tmp_path / "out")]) == 2
    assert f"{bad}:1" in capsys.readouterr().err
    assert not (tmp_path / "out" / "bad.yaml").exists()


def test_generated_letters_are_scored_as_fvlm_eval_scores_them():
    doc = {"options": ["a cup", "a phone", "a book"], "answer": 1}
    said = ["B", "(b)", "The answer is B.", "B. a phone", "a phone", "A", "The answer is a phone", "E", ""]
    assert [process_generated(doc, [text])["accuracy"] for text in said] == [1, 1, 1, 1, 0, 0, 0, 0, 0]
    options = doc_to_choice(doc)
    assert options == ["A. a cup", "B. a phone", "C. a book"]
    assert [process_generated(doc, [t])["accuracy"] for t in said] == [
        float(extract_letter(t, options) == 1) for t in said
    ]
