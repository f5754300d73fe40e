"""Multiple-choice scoring: the batched, prefix-cached path equals scoring each option on its own,
DINO runs once per question for all options and modes, and the statistics are right."""

import numpy as np
import pytest
import torch

from fvlm.config import load_config
from fvlm.eval.scoring import (
    Question,
    encode_question,
    frames_batch,
    score_batch,
    score_option_alone,
    summarise,
    wilson_interval,
)
from fvlm.model.build import build_model, build_tokenizer

MODES = ("coarse_only", "coarse_fine", "autoregressive")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = load_config()
    return build_model(cfg.model).eval(), build_tokenizer(cfg.model)


def _questions():
    rng = np.random.default_rng(0)
    questions = []
    # Different frame counts (padding), option counts and option lengths within one batch.
    for i, (frames, n_options) in enumerate([(8, 4), (3, 4), (1, 2), (2, 3)]):
        pixels = rng.integers(0, 255, (frames, 64, 64, 3), dtype=np.uint8)
        options = [f"{'ABCD'[j]}. thing {'xy' * (j + i)}" for j in range(n_options)]
        prompt = "Which one?\n" + "\n".join(options) + "\nAnswer with the letter."
        questions.append(
            Question(f"q{i}", prompt, options, i % n_options, "video" if frames > 1 else "image", lambda p=pixels: p)
        )
    return questions


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_scores_equal_options_scored_alone(tiny, dtype):
    model, tok = tiny
    model = model.to(dtype)
    try:
        questions = _questions()
        encoded = [encode_question(tok, q) for q in questions]
        frames, frame_mask = frames_batch([q.frames() for q in questions])
        frames = frames.to(dtype)
        model.encoder.frames_encoded = 0
        scores = score_batch(model, encoded, frames, frame_mask, MODES, tok.pad_token_id)
        assert model.encoder.frames_encoded == int(frame_mask.sum())  # once per frame, for all options and modes
        for mode in MODES:
            for q, (question, enc) in enumerate(zip(questions, encoded)):
                t = int(frame_mask[q].sum())
                alone = np.array(
                    [
                        score_option_alone(model, enc, o, frames[q : q + 1, :t], frame_mask[q : q + 1, :t], mode)
                        for o in range(len(question.options))
                    ]
                )
                assert scores[mode][q].shape == (len(question.options), 2)
                # Means agree to 1e-5 in fp32; sums of ~20 log-probs (~100) to fp32 resolution.
                np.testing.assert_allclose(scores[mode][q][:, 1], alone[:, 1], rtol=0, atol=1e-5)
                np.testing.assert_allclose(
                    scores[mode][q][:, 0], alone[:, 0], rtol=1e-6, atol=1e-5 if dtype == torch.float64 else 1e-4
                )
    finally:
        model.float()


def test_answer_tokens_are_the_trained_ones(tiny):
    _, tok = tiny
    q = _questions()[0]
    enc = encode_question(tok, q)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for option, ids in zip(q.options, enc.option_ids):
        assert ids[-1] == end
        assert tok.decode(ids[:-1]) == option


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.27 < hi < 0.31
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_summary_accuracy_chance_and_categories():
    questions = _questions()
    # Rows are (sum, mean); the mean picks the answer for q0 and q2, the sum picks option 0 everywhere.
    scores = []
    for q in questions:
        s = np.zeros((len(q.options), 2))
        s[0, 0] = 1.0
        s[q.answer if q.where in ("q0", "q2") else (q.answer + 1) % len(q.options), 1] = 1.0
        scores.append(s)
    result = summarise(questions, scores)
    assert result["accuracy"] == 0.5 and result["n"] == 4
    assert result["accuracy_sum"] == 0.75  # q0, q2 and q3 have answer 0
    assert result["chance"] == pytest.approx(np.mean([1 / 4, 1 / 4, 1 / 2, 1 / 3]))
    assert set(result["per_category"]) == {"video", "image"}
    assert result["per_category"]["image"]["n"] == 1 and result["per_category"]["image"]["accuracy"] == 1.0
    assert result["ci95"][0] < 0.5 < result["ci95"][1]


def test_grey_frame_control_equals_each_option_scored_alone_on_grey_frames(tiny):
    """run_benchmark's grey-frame control (every frame the normalised mean, frame count kept) picks
    the options that scoring each option alone on all-zero normalised frames picks."""
    from fvlm.eval.evaluate import run_benchmark

    model, tok = tiny
    questions = _questions()
    raw = {}
    result = run_benchmark(model, tok, questions, MODES, batch_size=3, raw=raw)
    for mode in MODES:
        picked = []
        for q in questions:
            enc = encode_question(tok, q)
            frames, frame_mask = frames_batch([q.frames()])
            grey = torch.zeros_like(frames)
            scores = [score_option_alone(model, enc, o, grey, frame_mask, mode)[1] for o in range(len(q.options))]
            picked.append(int(np.argmax(scores)))
        expected = np.mean([p == q.answer for p, q in zip(picked, questions)])
        assert result[mode]["grey_frames"]["accuracy"] == pytest.approx(expected)
        assert [int(np.argmax(s[:, 1])) for s in raw["grey"][mode]] == picked
        assert result[mode]["grey_frames"]["n"] == len(questions)
