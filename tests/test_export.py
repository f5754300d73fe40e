"""`fvlm export`: a trained model as a folder that plain transformers loads, checked from a process that
never imports fvlm: the same logits, losses and greedy tokens as fvlm's own model in every mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fvlm.cli import main
from fvlm.config import load_config
from fvlm.eval.scoring import end_of_turn_id
from fvlm.export import writer
from fvlm.model.build import build_model, build_tokenizer, save_model
from fvlm.model.pretrain_tiny import Recipe, shipped_backbones

SIZE = 32  # frame side: a 4x4 patch grid with the tiny DINO's patch 8
TINY = shipped_backbones(Recipe())
assert TINY is not None, "the repository ships its tiny pretrained backbones"
MODELS = {
    # The foveated model on the shipped tiny pretrained backbones (a chat LLM, so greedy answers vary
    # with the frames and the mode), in a run folder with a config, a summary and an eval result.
    "foveated": {"model.visual_scale": 0.5, "model.llm": str(TINY / "tiny-llm"), "model.dino": str(TINY / "tiny-dino")},
    # The shallow query, trained coarse-only, exported from its checkpoint folder: one mode.
    "shallow": {"model.deep_query": False, "model.coarse_only": True},
    # The multi-token baseline (2x2 tokens per frame), saved on its own outside a run folder.
    "multi_token": {"model.arch": "multi_token", "model.tokens_per_frame": 4},
}
DIALOGUES = [
    ("Describe what happens in this video.", "The red square moves to the left."),
    ("What colour is it?", "Blue."),
]
FRAME_MASK = torch.tensor([[True, True, True], [True, True, False]])
NEW_TOKENS = 8

# Runs in a fresh interpreter (-I: no PYTHONPATH, no script folder on sys.path) from a folder holding
# only the exported models and the inputs. fvlm is installed in this environment, so an import hook
# makes any attempt to import it fail loudly, and the end asserts that nothing imported it.
LOADER = """
import sys


class NoFvlm:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "fvlm":
            raise ImportError("the exported folder imported fvlm: " + name)
        return None


sys.meta_path.insert(0, NoFvlm())

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

results = {}
for name, case in torch.load("cases.pt").items():
    model = AutoModelForCausalLM.from_pretrained(case["folder"], trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(case["folder"], trust_remote_code=True)
    prompts = model.build_inputs(tokenizer, case["prompts"], case["inputs"]["pixel_values"], case["frame_mask"])
    found = {"class": type(model).__name__, "modes": list(model.config.supported_modes), "per_mode": {}}
    with torch.no_grad():
        found["default_logits"] = model(**case["inputs"]).logits
        for mode in found["modes"]:
            out = model(**case["inputs"], labels=case["labels"], mode=mode)
            generated = model.generate(**prompts, mode=mode, max_new_tokens=case["new_tokens"])
            found["per_mode"][mode] = {
                "logits": out.logits,
                "loss": out.loss,
                "generated": generated[:, prompts["input_ids"].shape[1] :],
            }
    results[name] = found
torch.save(results, "results.pt")
assert not [m for m in sys.modules if m.split(".")[0] == "fvlm"], "fvlm was imported"
print("loaded without fvlm")
"""


def _chat(tokenizer, user: str, assistant: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return list(
        tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=assistant is None)["input_ids"]
    )


def _batch(tokenizer, rows: list[list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """An fvlm batch: random frames, the second sample with a padded frame; text padded on the right."""
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {
        "frames": torch.randn(2, FRAME_MASK.shape[1], 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)),
        "frame_mask": FRAME_MASK.clone(),
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": mask,
        "loss_mask": mask.bool(),
    }


def _summary(run_id: str) -> dict:
    return {
        "run_id": run_id,
        "status": "completed",
        "git_commit": "0123abc",
        "config_hash": "cafe01",
        "final_train_loss": 4.5,
        "best_val_loss": 4.25,
        "best_val_step": 5,
        "total_steps": 5,
        "total_samples": 40,
        "wall_time_hours": 0.01,
        "total_flops": 1.5e9,
        "params": {"total": 200000, "trainable": 200000, "by_group": {}},
    }


def _eval_result() -> dict:
    """The parts of `fvlm eval`'s eval.json the model card reads."""
    modes = ("coarse_only", "coarse_fine", "autoregressive")
    losses = {"coarse_only": 4.4, "coarse_fine": 4.3, "autoregressive": 4.35}
    return {
        "run_id": "fov",
        "step": 5,
        "samples_seen": 40,
        "modes": {
            m: {"loss": losses[m], "n": 16, "tokens": 200, "loss_blank_frames": 4.6, "pixel_gain": 4.6 - losses[m]}
            for m in modes
        },
        "gaps": {"coarse_only_minus_coarse_fine": 0.1},
        "gap_intervals": {"coarse_only_minus_coarse_fine": {"ci95_bootstrap": [0.0625, 0.1375]}},
        "bench": {
            "synthetic_mc": {
                m: {
                    "accuracy": 0.5,
                    "ci95": [0.3125, 0.6875],
                    "chance": 0.25,
                    "n": 24,
                    "grey_frames": {"accuracy": 0.25},
                }
                for m in modes
            }
        },
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Three tiny models from fvlm's builder (random weights, with the LLM's query map made to matter),
    each exported with `fvlm export`, and the fresh process's results on the same inputs."""
    root = tmp_path_factory.mktemp("export")
    made = {}
    for name, overrides in MODELS.items():
        cfg = load_config(None, {"run_id": name, "out_dir": str(root), "model.image_size": SIZE, **overrides})
        torch.manual_seed(0)
        model, tokenizer = build_model(cfg.model).eval(), build_tokenizer(cfg.model)
        with torch.no_grad():
            if hasattr(model, "llm_to_query"):
                # query_init=cls starts it at zero weight: the fine queries would not depend on the LLM.
                model.llm_to_query.weight.normal_(0.0, 0.5)
            model.dino_to_llm.weight.mul_(4.0)
        if name == "foveated":
            run = root / name
            (run / "eval").mkdir(parents=True)
            (run / "config.yaml").write_text(cfg.to_yaml())
            (run / "run_summary.json").write_text(json.dumps(_summary(name)))
            (run / "eval" / "eval.json").write_text(json.dumps(_eval_result()))
            target = save_model(model, run / "checkpoints" / "step_0000005", tokenizer)
            (target / "meta.json").write_text(json.dumps({"step": 5, "samples_seen": 40}))
            target = run
        elif name == "shallow":
            target = save_model(model, root / name / "checkpoints" / "step_0000003", tokenizer)
            (target / "meta.json").write_text(json.dumps({"step": 3, "samples_seen": 12, "config": cfg.to_dict()}))
        else:
            target = save_model(model, root / name / "saved", tokenizer)
        out = root / "isolated" / f"export-{name}"
        assert main(["export", str(target), str(out)]) == 0
        made[name] = {"model": model, "tokenizer": tokenizer, "out": out, "target": target}

    cases = {}
    for name, item in made.items():
        model, tokenizer = item["model"], item["tokenizer"]
        batch = _batch(tokenizer, [_chat(tokenizer, u, a) for u, a in DIALOGUES])
        per_frame = writer.tokens_per_frame(model)
        inputs = writer.hf_inputs(batch, per_frame, tokenizer.pad_token_id)
        labels = torch.where(batch["loss_mask"], batch["input_ids"], -100)
        slots = torch.full((2, inputs["input_ids"].shape[1] - labels.shape[1]), -100)
        item.update(batch=batch, inputs=inputs)
        cases[name] = {
            "folder": item["out"].name,
            "inputs": inputs,
            "labels": torch.cat([slots, labels], dim=1),
            "prompts": [u for u, _ in DIALOGUES],
            "frame_mask": FRAME_MASK,
            "new_tokens": NEW_TOKENS,
        }
    isolated = root / "isolated"
    torch.save(cases, isolated / "cases.pt")
    (isolated / "load.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HOME=str(root / "hf-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-I", "load.py"], cwd=isolated, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded without fvlm" in done.stdout
    return made, torch.load(isolated / "results.pt")


def _until_end(ids: list[int], end: int) -> list[int]:
    return ids[: ids.index(end) + 1] if end in ids else ids


def test_transformers_alone_reproduces_logits_losses_and_greedy_tokens_in_every_mode(exported):
    made, results = exported
    expected_modes = {
        "foveated": ["coarse_fine", "coarse_only", "autoregressive"],
        "shallow": ["coarse_only"],
        "multi_token": ["coarse_only"],
    }
    worst = 0.0
    for name, item in made.items():
        model, tokenizer, batch = item["model"], item["tokenizer"], item["batch"]
        found = results[name]
        assert found["class"] == "FvlmForCausalLM"
        assert found["modes"] == expected_modes[name]
        attended = item["inputs"]["attention_mask"].bool()
        end = end_of_turn_id(tokenizer)
        prompts = _batch(tokenizer, [_chat(tokenizer, u) for u, _ in DIALOGUES])
        for mode, theirs in found["per_mode"].items():
            ours = writer.fvlm_logits(model, batch, mode)
            difference = float((ours - theirs["logits"])[attended].abs().max())
            worst = max(worst, difference)
            assert difference <= 1e-5, (name, mode, difference)
            with torch.no_grad():
                loss = model(batch, mode=mode).loss
            assert abs(float(loss) - float(theirs["loss"])) <= 1e-5, (name, mode)
            generated = model.generate(prompts, mode=mode, max_new_tokens=NEW_TOKENS, eos_token_id=end)
            for row in range(2):
                expected = _until_end(generated[row].tolist(), end)
                assert _until_end(theirs["generated"][row].tolist(), end) == expected, (name, mode, row)
        default = found["per_mode"][model.default_mode]["logits"]
        assert torch.equal(found["default_logits"], default)
    # The modes really differ, so equality in each is not one mode checked three times.
    fov = results["foveated"]["per_mode"]
    assert float((fov["coarse_only"]["logits"] - fov["coarse_fine"]["logits"]).abs().max()) > 1e-3
    assert float((fov["coarse_fine"]["logits"] - fov["autoregressive"]["logits"]).abs().max()) > 1e-3
    print(f"largest logit difference from fvlm: {worst:.3g}")


def test_the_folder_holds_weights_code_tokenizer_preprocessing_generation_and_card(exported):
    made, _ = exported
    out = made["foveated"]["out"]
    names = {p.name for p in out.iterdir()}
    for name in (
        "config.json",
        "model.safetensors",
        "configuration_fvlm.py",
        "modeling_fvlm.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "generation_config.json",
        "README.md",
    ):
        assert name in names, name
    assert not [n for n in os.listdir(out.parent) if n.startswith(".")]  # no temporary folder left
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_fvlm.FvlmForCausalLM"
    assert config["model_type"] == "fvlm" and config["text_config"]["model_type"] == "llama"
    assert config["vision_config"]["model_type"] == "dinov2" and config["visual_scale"] == 0.5
    for code in ("configuration_fvlm.py", "modeling_fvlm.py"):
        imports = [line for line in (out / code).read_text().splitlines() if line.startswith(("import ", "from "))]
        assert not [line for line in imports if "fvlm" in line.split()[1].split(".")[0]], imports
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == end_of_turn_id(made["foveated"]["tokenizer"])
    assert generation["do_sample"] is False
    assert "local_files_only" not in json.loads((out / "tokenizer_config.json").read_text())
    card = (out / "README.md").read_text()
    for text in (
        "library_name: transformers",
        "trust_remote_code=True",
        "| stage | 1 (every text token) |",
        "| samples seen | 40 |",
        "| coarse_fine | 4.3000 | 4.6000 | 0.3000 | 16 | 200 |",
        "coarse_only − coarse_fine: 0.1000 [0.0625, 0.1375]",
        "| autoregressive | 0.500 | [0.312, 0.688] | 0.250 | 24 | 0.250 |",
        "## Intended use",
        "## Limits",
        "## Licences",
        "SmolLM2 and DINOv2 are both Apache-2.0",
        "fvlm's tiny pretrained backbone `tiny-llm`",
    ):
        assert text in card, text
    # Without a run folder the card says what it does not know.
    assert "No `fvlm eval` result" in (made["multi_token"]["out"] / "README.md").read_text()


def test_the_image_processor_prepares_frames_as_fvlm_does(exported):
    from PIL import Image
    from transformers import AutoImageProcessor

    from fvlm.data.decode import _fit, normalise

    made, _ = exported
    processor = AutoImageProcessor.from_pretrained(str(made["foveated"]["out"]))
    rng = np.random.default_rng(0)
    for width, height in ((SIZE, SIZE), (48, 32), (40, 64)):  # sizes whose resize rounds the same way
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        ours = normalise(_fit(image, SIZE)[None])
        theirs = processor(images=[image], return_tensors="pt").pixel_values
        assert float((ours - theirs).abs().max()) < 1e-5


def test_bad_input_is_one_line_naming_the_path_and_exit_2(exported, tmp_path, capsys):
    made, _ = exported
    run = str(made["foveated"]["target"])
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    cases = [
        ([str(tmp_path / "missing"), str(tmp_path / "out1")], str(tmp_path / "missing")),
        ([str(empty_run), str(tmp_path / "out2")], str(empty_run)),
        ([run, str(full)], str(full)),
        ([run, str(a_file)], str(a_file)),
    ]
    for args, named in cases:
        capsys.readouterr()
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err
    assert (full / "keep.txt").read_text() == "mine" and a_file.read_text() == "mine"
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_a_failed_check_leaves_no_folder_behind(exported, tmp_path, monkeypatch):
    made, _ = exported
    monkeypatch.setattr(writer, "CHECK_TOLERANCE", -1.0)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="differ from fvlm's"):
        writer.export_model(made["shallow"]["target"], out)
    assert os.listdir(tmp_path) == []


def test_export_is_listed_with_its_push_option(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    assert "--push REPO" in text and "upload_folder" in text and "cannot exercise" in text
    assert Path(writer.REMOTE_FILES[0]).name == "configuration_fvlm.py"
