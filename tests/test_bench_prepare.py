"""`fvlm bench prepare` on fixtures in each benchmark's released layout, the generation protocol's
letter extraction, and `fvlm eval` under both protocols with a transformers baseline beside fvlm."""

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import fvlm
from fvlm.cli import main
from fvlm.eval.bench import GENERATE_INSTRUCTION, VisualSettings, read_bench
from fvlm.eval.prepare import cut_clip, prepare, srt_text
from fvlm.eval.protocol import extract_letter

SETTINGS = VisualSettings(size=32, max_frames=4, fps=1.0, image_frames=2)


def _mp4(path, seconds=4.0, fps=4, size=(48, 40), shade=0):
    """A tiny mp4: frame i is uniformly grey at 10 * i + shade, so a frame's time can be read back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(int(seconds * fps)):
            pixels = np.full((size[1], size[0], 3), min(250, 10 * i + shade), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _frames_of(path):
    with av.open(str(path)) as container:
        return [(float(f.time), float(f.to_ndarray(format="rgb24").mean())) for f in container.decode(video=0)]


# ----------------------------------------------------------------------------- letters

# Hand-labelled generations: (text, options, the option it names or None).
LABELLED = [
    ("B", 4, 1),
    ("B.", 4, 1),
    ("(C) the dog", 4, 2),
    ("C) the dog", 4, 2),
    ("The answer is D.", 4, 3),
    ("Answer: a", 4, 0),
    ("answer: (b)", 4, 1),
    ("The correct option is C because it moves.", 4, 2),
    ("Best option: (A)", 4, 0),
    ("a", 4, 0),
    ("d.", 4, 3),
    ("none", 4, None),
    ("", 4, None),
    ("I cannot tell.", 4, None),
    ("E", 4, None),  # past the options
    ("The answer is E.", 4, None),
    ("the answer is a dog", 4, 1),  # no letter: the option text names "a dog"
    ("A dog is running", 4, 1),  # an article, then the option's text
    ("a red square and a blue circle", 4, None),  # two options' texts: ambiguous
    (" D: a cat ", 4, 3),
]
OPTIONS = ["a cat", "a dog", "a bird", "a fish"]


@pytest.mark.parametrize(("text", "n", "expected"), LABELLED)
def test_letter_extraction_matches_hand_labels(text, n, expected):
    options = OPTIONS[:n] if "square" not in text else ["a red square", "a blue circle", "x", "y"]
    assert extract_letter(text, options) == expected


# ----------------------------------------------------------------------------- prepare


def _videomme(src, pyarrow):
    rows = []
    for n, (vid, duration) in enumerate([("abc", "short"), ("abc", "short"), ("def", "long"), ("gone", "medium")]):
        rows.append(
            {
                "video_id": f"{n // 3 + 1:03d}",
                "duration": duration,
                "domain": "Knowledge",
                "sub_category": "Humanity & History",
                "url": f"https://www.youtube.com/watch?v={vid}",
                "videoID": vid,
                "question_id": f"{n // 3 + 1:03d}-{n % 3 + 1}",
                "task_type": "Counting Problem",
                "question": f"Question {n}?",
                "options": ["A. red", "B. green", "C. blue", "D. grey"],
                "answer": "ABCD"[n],
            }
        )
    rows.append(dict(rows[0], question_id="bad", answer="Z"))  # an answer that is no option
    (src / "videomme").mkdir(parents=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), src / "videomme" / "test-00000-of-00001.parquet")
    _mp4(src / "data" / "abc.mp4")
    _mp4(src / "data" / "def.mp4", shade=5)
    (src / "subtitle").mkdir()
    (src / "subtitle" / "abc.srt").write_text(
        "1\n00:00:00,000 --> 00:00:01,500\n<i>Hello</i> there\n\n2\n00:00:01,500 --> 00:00:03,000\nGeneral Kenobi\n"
    )


def test_videomme_parquet_prepares_with_subtitles(tmp_path, capsys):
    pyarrow = pytest.importorskip("pyarrow")
    pytest.importorskip("pyarrow.parquet")
    src, out = tmp_path / "Video-MME", tmp_path / "out"
    _videomme(src, pyarrow)
    assert main(["bench", "prepare", "video-mme", str(src), str(out), "--subtitles"]) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["written"] == 3 and report["skipped"] == {"answer_not_an_option": 1, "missing_media": 1}
    assert report["per_category"] == {"long": 1, "short": 2} and report["without_subtitles"] == 1
    lines = [json.loads(x) for x in (out / "videomme.jsonl").read_text().splitlines()]
    assert [x["answer"] for x in lines] == ["A", "B", "C"] and lines[0]["id"] == "001-1"
    assert lines[0]["subtitles"] == "Hello there\nGeneral Kenobi" and "subtitles" not in lines[2]
    questions = read_bench(str(out / "videomme.jsonl"), SETTINGS)
    assert questions[0].options == ["A. red", "B. green", "C. blue", "D. grey"]
    assert "General Kenobi" in questions[0].prompt and questions[0].prompt.endswith("Answer with the letter.")
    assert questions[0].generate_prompt.endswith("D. grey\n" + GENERATE_INSTRUCTION)
    assert questions[0].frames().shape == (4, 32, 32, 3)
    # A parquet without one of the released columns is a one-line error naming file and column.
    pyarrow.parquet.write_table(
        pyarrow.Table.from_pylist([{"videoID": "abc", "question": "q"}]),
        src / "videomme" / "test-00000-of-00001.parquet",
    )
    assert main(["bench", "prepare", "video-mme", str(src), str(tmp_path / "o2")]) == 2
    assert "missing column(s) duration, options, answer" in capsys.readouterr().err


def test_srt_text_keeps_cue_text_only(tmp_path):
    path = tmp_path / "s.srt"
    path.write_bytes(
        "\ufeff1\r\n00:00:01,000 --> 00:00:02,000\r\nline one\r\nline two\r\n\r\n2\r\n00:00:03.000 --> 00:00:04.000\r\n{\\an8}3 apples\r\n".encode()
    )
    assert srt_text(path) == "line one line two\n3 apples"


def test_cut_clip_keeps_only_the_span(tmp_path):
    src = _mp4(tmp_path / "v.mp4", seconds=4, fps=4)
    assert cut_clip(src, 1.0, 2.0, tmp_path / "c.mp4") == 5  # frames at 1.0, 1.25, ..., 2.0
    cut = _frames_of(tmp_path / "c.mp4")
    original = dict(_frames_of(src))
    assert len(cut) == 5
    # The clip's frames are the source's frames 4..8 (grey levels 40..80), in order.
    assert [round(m / 10) for _, m in cut] == [round(original[t] / 10) for t in (1.0, 1.25, 1.5, 1.75, 2.0)]


def _mvbench(src):
    (src / "json").mkdir(parents=True)
    star = src / "video" / "star" / "Charades_v1_480"
    _mp4(star / "A1.mp4", seconds=4)
    _mp4(src / "video" / "clevrer" / "video_validation" / "video_10000.mp4")
    frames = src / "video" / "tvqa" / "frames_fps3_hq" / "show_s01e01_seg02_clip_00"
    frames.mkdir(parents=True)
    from PIL import Image

    for i in range(1, 13):  # 4 s at 3 frames per second, numbered from 1
        Image.new("RGB", (40, 32), (20 * i, 0, 0)).save(frames / f"{i:05d}.jpg")
    seq = [
        {
            "video": "A1.mp4",
            "question": "What did the person do first?",
            "candidates": ["Sat.", "Ran.", "Ate."],
            "answer": "Ran.",
            "start": 1.0,
            "end": 2.5,
        },
        {"video": "missing.mp4", "question": "Q?", "candidates": ["x", "y"], "answer": "x", "start": 0, "end": 1},
        {"video": "A1.mp4", "question": "Q?", "candidates": ["x", "y"], "answer": "z", "start": 0, "end": 1},
    ]
    (src / "json" / "action_sequence.json").write_text(json.dumps(seq))
    exist = [{"video": "video_10000.mp4", "question": "Are there cubes?", "candidates": ["yes", "no"], "answer": "no"}]
    (src / "json" / "object_existence.json").write_text(json.dumps(exist))
    episodic = [
        {
            "video": "show_s01e01_seg02_clip_00",
            "question": "Why?",
            "candidates": ["a", "b", "c", "d", "e"],
            "answer": "e",
            "start": 1.0,
            "end": 3.0,
        }
    ]
    (src / "json" / "episodic_reasoning.json").write_text(json.dumps(episodic))


def test_mvbench_tasks_prepare_and_clips_are_cut(tmp_path):
    src, out = tmp_path / "MVBench", tmp_path / "out"
    _mvbench(src)
    report = prepare("mvbench", src, out)
    assert report["written"] == 3 and report["clips_cut"] == 2
    assert report["skipped"] == {"answer_not_an_option": 1, "missing_media": 1}
    assert report["per_category"] == {"action_sequence": 1, "episodic_reasoning": 1, "object_existence": 1}
    lines = [json.loads(x) for x in (out / "mvbench.jsonl").read_text().splitlines()]
    by_task = {x["category"]: x for x in lines}
    clip = by_task["action_sequence"]["video"]
    assert clip.startswith(str((out / "clips").resolve())) and len(_frames_of(clip)) == 7  # 1.0 .. 2.5 at 4/s
    assert by_task["object_existence"]["video"].endswith("video_validation/video_10000.mp4")
    assert len(_frames_of(by_task["episodic_reasoning"]["video"])) == 7  # frames 3..9 of 12 at 3/s: 1 s .. 3 s
    questions = read_bench(str(out / "mvbench.jsonl"), SETTINGS)
    assert [q.answer for q in questions] == [1, 4, 1]  # tasks in file-name order
    assert questions[0].frames().shape[0] == 2  # a 1.5 s clip at 1 frame/s
    again = prepare("mvbench", src, out)  # a rerun keeps the clips it has
    assert again["clips_cut"] == 0 and again["clips_reused"] == 2


def test_mlvu_multiple_choice_tasks_prepare_open_ended_counted(tmp_path):
    src, out = tmp_path / "MLVU", tmp_path / "out"
    (src / "json").mkdir(parents=True)
    _mp4(src / "video" / "1_plotQA" / "movie101_66.mp4")
    _mp4(src / "video" / "4_count" / "count_1.mp4", shade=7)
    plot = [
        {
            "video": "movie101_66.mp4",
            "duration": 4,
            "question": "Who?",
            "candidates": ["he", "she", "it", "they"],
            "answer": "it",
            "question_type": "plotQA",
        }
    ]
    count = [
        {
            "video": "count_1.mp4",
            "duration": 4,
            "question": "How many?",
            "candidates": ["1", "2", "3", "4"],
            "answer": "2",
            "question_type": "count",
        },
        {
            "video": "count_1.mp4",
            "duration": 4,
            "question": "How many?",
            "candidates": "1 2",
            "answer": "2",
            "question_type": "count",
        },
    ]
    summary = [
        {
            "video": "movie101_66.mp4",
            "duration": 4,
            "question": "Summarise.",
            "answer": "A story.",
            "question_type": "summary",
        }
    ] * 2
    (src / "json" / "1_plotQA.json").write_text(json.dumps(plot))
    (src / "json" / "4_count.json").write_text(json.dumps(count))
    (src / "json" / "9_summary.json").write_text(json.dumps(summary))
    report = prepare("mlvu", src, out)
    assert report["written"] == 2 and report["per_category"] == {"count": 1, "plotQA": 1}
    assert report["open_ended_skipped"] == {"9_summary": 2} and report["skipped"] == {"bad_candidates": 1}
    questions = read_bench(str(out / "mlvu.jsonl"), SETTINGS)
    assert sorted((q.category, q.answer) for q in questions) == [("count", 1), ("plotQA", 2)]


# ----------------------------------------------------------------------------- eval: both protocols, a baseline


TINY_LLM = next((Path(fvlm.__file__).parent / "assets").glob("tiny-backbones-*/tiny-llm"))


def _tiny_smolvlm(folder):
    """A randomly initialised SmolVLM2-config model saved as a hub folder, from the shipped tiny
    tokenizer with the image tokens added. Its processor is Idefics3's (SmolVLM's image layout),
    since SmolVLM2's own processor needs torchvision for its video half."""
    from transformers import AutoTokenizer, Idefics3Processor, SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = AutoTokenizer.from_pretrained(TINY_LLM)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]}
    )
    image = Idefics3ImageProcessorPil(
        do_image_splitting=False, max_image_size={"longest_edge": 32}, size={"longest_edge": 32}
    )
    processor = Idefics3Processor(image_processor=image, tokenizer=tok, image_seq_len=4)
    processor.chat_template = (
        "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
        "{% if c['type'] == 'text' %}{{ ' ' + c['text'] }}{% else %}{{ '<image>' }}{% endif %}{% endfor %}"
        "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )
    config = SmolVLMConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    SmolVLMForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from fvlm.config import load_config
    from fvlm.model.build import build_model, build_tokenizer, save_model

    root = tmp_path_factory.mktemp("benchrun")
    cfg = load_config(None, {"run_id": "r", "out_dir": str(root), "data.max_frames": 4, "model.image_size": 32})
    run_dir = root / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    torch.manual_seed(0)
    model, tok = build_model(cfg.model).eval(), build_tokenizer(cfg.model)
    folder = save_model(model, run_dir / "checkpoints" / "step_0000010", tok)
    (folder / "meta.json").write_text(json.dumps({"step": 10}))
    src = root / "MVBench"
    _mvbench(src)
    prepare("mvbench", src, root / "mvbench")
    return {"run": run_dir, "model": model, "tok": tok, "bench": root / "mvbench" / "mvbench.jsonl", "root": root}


def test_eval_both_protocols_with_a_smolvlm_baseline(tiny_run):
    from fvlm.eval.baseline import TransformersBaseline
    from fvlm.eval.generate import generate_text

    baseline_dir = _tiny_smolvlm(tiny_run["root"] / "smolvlm2-tiny")
    out = tiny_run["root"] / "eval"
    args = ["eval", str(tiny_run["run"]), "--data", "none", "--bench", str(tiny_run["bench"]), "--modes", "coarse_only"]
    args += ["--protocol", "both", "--baseline", str(baseline_dir), "--out", str(out), "--batch-size", "2"]
    assert main(args + ["--max-new-tokens", "4", "--device", "cpu"]) == 0
    result = json.loads((out / "eval.json").read_text())
    loglik = result["bench"]["mvbench"]["coarse_only"]
    generated = result["generate"]["mvbench"]["coarse_only"]
    assert loglik["n"] == generated["n"] == 3
    assert set(generated["per_category"]) == {"action_sequence", "episodic_reasoning", "object_existence"}
    questions = read_bench(str(tiny_run["bench"]), VisualSettings(32, 4, 1.0, 1))
    # Batched generation (right-padded, left-aligned by the model) answers as one question at a time does.
    alone = [
        generate_text(
            tiny_run["model"],
            tiny_run["tok"],
            q.frames(),
            q.generate_prompt,
            mode="coarse_only",
            max_new_tokens=4,
            temperature=0.0,
            seed=0,
            device="cpu",
        ).strip()
        for q in questions
    ]
    assert generated["responses"] == alone
    assert generated["correct"] == [int(extract_letter(r, q.options) == q.answer) for r, q in zip(alone, questions)]
    label = "smolvlm:smolvlm2-tiny"
    base = result["baselines"][label]
    assert base["bench"]["mvbench"]["n"] == base["generate"]["mvbench"]["n"] == 3
    # The baseline's option scores against a plain forward pass of each whole dialogue.
    model = TransformersBaseline(baseline_dir)
    q = questions[0]
    frames = model.frames(q, VisualSettings(32, 4, 1.0, 1))
    scores = model.option_scores(q, frames)
    for i, option in enumerate(q.options):
        prompt = model._text(q.prompt, len(frames))
        full = model._text(q.prompt, len(frames), option)
        inputs = model._inputs([full], [list(frames)], "right")
        n_prompt = len(model._inputs([prompt], [list(frames)], "right")["input_ids"][0])
        ids = inputs["input_ids"][0]
        with torch.no_grad():
            logp = model.model(**inputs).logits[0].log_softmax(-1)
        end = ids.tolist().index(model.end, n_prompt) + 1
        expected = sum(float(logp[t - 1, ids[t]]) for t in range(n_prompt, end))
        assert scores[i, 0] == pytest.approx(expected, abs=1e-4)
        assert scores[i, 1] == pytest.approx(expected / (end - n_prompt), abs=1e-5)
    assert base["bench"]["mvbench"]["correct"][0] == int(int(np.argmax(scores[:, 1])) == q.answer)
    table = (out / "eval.md").read_text()
    assert "**mvbench: both protocols**" in table and f"| {label} |" in table and "| fvlm coarse_only |" in table
