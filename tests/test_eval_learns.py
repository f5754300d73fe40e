"""A tiny model trained for a few minutes on synthetic multiple-choice data scores above chance on
questions it never saw (generated from another seed), through `fvlm train` and `fvlm eval`, and
above the same questions asked with every frame replaced by a grey one: it answers from the pixels,
not from the wording of the options (the options are balanced, so text alone is at chance)."""

import io
import json
import tarfile

import pytest
from PIL import Image

from fvlm.cli import main
from fvlm.data.synth import generate_synthetic


def grey_copy(source, target):
    """The same shards with every frame replaced by a flat grey JPEG of the same size."""
    target.mkdir(parents=True)
    for shard in sorted(source.glob("*.tar")):
        with tarfile.open(shard) as src, tarfile.open(target / shard.name, "w", format=tarfile.USTAR_FORMAT) as dst:
            for member in src.getmembers():
                data = src.extractfile(member).read()
                if member.name.endswith(".jpg"):
                    size = Image.open(io.BytesIO(data)).size
                    buf = io.BytesIO()
                    Image.new("RGB", size, (128, 128, 128)).save(buf, "JPEG", quality=90)
                    data = buf.getvalue()
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))


# Known to fail (measured, 600 steps, about 2 min): 0.250 [0.195, 0.314] on the real frames vs 0.245 on
# grey ones (initializer_range 0.02); 0.245 vs 0.240 (0.15); 0.275 vs 0.275 (0.1, lr_dino 3e-3). The tiny
# model's answers do not depend on the pixels yet; the 0.35 it scored before came from the options'
# wording. strict: the day it passes, this marker must go.
# Not the missing multiple-choice training (this test trains on it): with 12k-24k unique samples
# (no repeats), captions + MC mixed (generate_synthetic mc_fraction=0.5), 64 px, visual_scale 0.05/0.2,
# a shallow query, lr_connector up to 3e-2 and lr_dino up to 1e-2, 800-1500 steps, every run scores
# exactly the same on real and grey frames (e.g. 0.28 vs 0.28). Even the caption loss is the same with
# grey frames (0.1486 vs 0.1486): the trained visual tokens hardly vary between samples (across-sample
# std about 0.1-0.5% of their norm), so nothing in the pixels reaches the LLM.
@pytest.mark.xfail(strict=True, reason="the tiny model does not yet answer from the pixels (at chance with balanced options)")
@pytest.mark.slow
def test_trained_tiny_model_beats_chance_and_grey_frames_on_held_out_questions(tmp_path):
    for name, seed, count in (("train", 1, 1024), ("held_out", 2, 200)):
        generate_synthetic(tmp_path / name, videos=0, images=0, texts=0, frames=4, size=32, seed=seed,
                           val=0, probe=0, bench=count)
    train_set, held_out = tmp_path / "train" / "bench", tmp_path / "held_out" / "bench"
    grey = tmp_path / "grey"
    grey_copy(held_out, grey)
    assert main(["train", "tiny", f"out_dir={tmp_path}", "run_id=mc", f"data.train={train_set}",
                 f"data.val={held_out}", f"data.probe={held_out}", "model.image_size=32", "data.max_frames=4",
                 "data.max_text_tokens=320", "train.stage=2", "train.max_steps=600", "train.batch_size=16",
                 "train.eval_every=600", "train.save_every=600", "train.eval_samples=32",
                 "optim.lr_connector=3e-3", "optim.lr_llm=3e-3", "optim.lr_dino=1e-3",
                 "optim.schedule=constant"]) == 0
    assert main(["eval", str(tmp_path / "mc"), "--data", "none", "--modes", "coarse_fine",
                 "--bench", str(held_out), str(grey), "--batch-size", "32"]) == 0
    benches = json.loads((tmp_path / "mc" / "eval" / "eval.json").read_text())["bench"]
    result, control = benches["bench"]["coarse_fine"], benches["grey"]["coarse_fine"]
    assert result["n"] == control["n"] == 200 and result["chance"] == pytest.approx(0.25)
    # Same questions without the pictures: the text alone gives no answer away.
    assert control["ci95"][0] < 0.25 < control["ci95"][1], control
    # The whole 95% interval above chance and above the grey-frame control, not just the point estimate.
    assert result["ci95"][0] > max(result["chance"], control["accuracy"]), (result, control)
