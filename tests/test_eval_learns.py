"""A tiny model trained for a few minutes on synthetic multiple-choice data scores above chance on
questions it never saw (generated from another seed), through `fvlm train` and `fvlm eval`."""

import json

import pytest

from fvlm.cli import main
from fvlm.data.synth import generate_synthetic


@pytest.mark.slow
def test_trained_tiny_model_beats_chance_on_held_out_questions(tmp_path):
    for name, seed, count in (("train", 1, 1024), ("held_out", 2, 200)):
        generate_synthetic(tmp_path / name, videos=0, images=0, texts=0, frames=4, size=32, seed=seed,
                           val=0, probe=0, bench=count)
    train_set, held_out = tmp_path / "train" / "bench", tmp_path / "held_out" / "bench"
    assert main(["train", "tiny", f"out_dir={tmp_path}", "run_id=mc", f"data.train={train_set}",
                 f"data.val={held_out}", f"data.probe={held_out}", "model.image_size=32", "data.max_frames=4",
                 "data.max_text_tokens=320", "train.stage=2", "train.max_steps=600", "train.batch_size=16",
                 "train.eval_every=600", "train.save_every=600", "train.eval_samples=32",
                 "optim.lr_connector=3e-3", "optim.lr_llm=3e-3", "optim.lr_dino=1e-3",
                 "optim.schedule=constant"]) == 0
    assert main(["eval", str(tmp_path / "mc"), "--data", "none", "--modes", "coarse_fine",
                 "--bench", str(held_out), "--batch-size", "32"]) == 0
    result = json.loads((tmp_path / "mc" / "eval" / "eval.json").read_text())["bench"]["bench"]["coarse_fine"]
    assert result["n"] == 200 and result["chance"] == pytest.approx(0.25)
    # The whole 95% interval above chance, not just the point estimate.
    assert result["ci95"][0] > result["chance"], result
