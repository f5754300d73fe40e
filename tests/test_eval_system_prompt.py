"""The system turn at evaluation: `fvlm eval` (both protocols), `fvlm generate` and `fvlm export` ask
their questions after the system turn the checkpoint's run trained with (its saved
`data.system_prompt`), with a chat template that inserts a default of its own as SmolLM2's does."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from fvlm.cli import main
from fvlm.config import load_config
from fvlm.data.decode import UPSTREAM_SYSTEM_PROMPT
from fvlm.data.loader import load_index, sample_reader
from fvlm.eval import evaluate as evaluate_module
from fvlm.eval.evaluate import evaluate_checkpoint, find_checkpoints
from fvlm.model.build import build_model, save_model
from fvlm.model.tokenizer import byte_tokenizer, chat_ids

SMOL_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# SmolLM2-Instruct's chat template: its own system turn when a dialogue opens without one.
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOL_DEFAULT + "<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QUESTION = "What colour?"


def smol_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=byte_tokenizer().backend_tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        chat_template=SMOL_TEMPLATE,
    )


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def checkpoint(folder, setting: str, picture):
    """A saved tiny model with the SmolLM2-style tokenizer, its run's config in meta.json (as a
    checkpoint carries it) saying `data.system_prompt=setting`, and one training shard."""
    data = folder / "data"
    data.mkdir(parents=True)
    parts = {"json": json.dumps({"user": QUESTION, "assistant": "red"}).encode(), "png": picture.read_bytes()}
    with tarfile.open(data / "s.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for ext, payload in parts.items():
            info = tarfile.TarInfo(f"red.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    cfg = load_config(
        None,
        {
            "model.image_size": 32,
            "data.system_prompt": setting,
            "data.train": str(data),
            "data.max_text_tokens": 400,
            "train.stage": 2,
        },
    )
    tok = smol_tokenizer()
    save_model(build_model(cfg.model), folder / "model", tok)
    (folder / "model" / "meta.json").write_text(json.dumps({"step": 3, "config": cfg.to_dict()}))
    return cfg, tok


def system_turn(tok, ids: list[int]) -> list[int]:
    """The tokens before the first user turn (the system turn, whoever wrote it)."""
    start = tok.convert_tokens_to_ids("<|im_start|>")
    second = [i for i, t in enumerate(ids) if t == start][1]
    assert tok.decode(ids[second:]).startswith("<|im_start|>user")
    return ids[:second]


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("auto", UPSTREAM_SYSTEM_PROMPT), ("Answer in one word.", "Answer in one word."), ("", SMOL_DEFAULT)],
)
def test_eval_and_generate_prompts_open_with_the_training_samples_system_turn(
    tmp_path, picture, monkeypatch, capsys, setting, expected
):
    cfg, tok = checkpoint(tmp_path, setting, picture)
    # The training sample, read as the run's loader reads it.
    sample = sample_reader(cfg, load_index(cfg.data.train), tok).load(0)
    trained = system_turn(tok, sample["ids"])
    assert tok.decode(trained) == f"<|im_start|>system\n{expected}<|im_end|>\n"

    scored, generated = [], []
    original_score, original_generate = evaluate_module.score_batch, None

    def score_spy(model, encoded, *args):
        scored.extend(e.prompt_ids for e in encoded)
        return original_score(model, encoded, *args)

    monkeypatch.setattr(evaluate_module, "score_batch", score_spy)
    ckpt = find_checkpoints(tmp_path / "model")[0]
    from fvlm.model.build import load_model

    model_type = type(load_model(ckpt.folder)[0])
    original_generate = model_type.generate

    def generate_spy(self, batch, **kwargs):
        generated.append(batch["input_ids"][0].tolist())
        return original_generate(self, batch, **kwargs)

    monkeypatch.setattr(model_type, "generate", generate_spy)
    (tmp_path / "bench.jsonl").write_text(
        json.dumps({"video": str(picture), "question": QUESTION, "options": ["red", "blue"], "answer": "A"})
    )
    evaluate_checkpoint(
        ckpt, modes=["coarse_only"], data="none", benches=[str(tmp_path / "bench.jsonl")], overrides=[],
        max_samples=0, batch_size=2, device="cpu", score="mean", log=lambda _: None,
        protocols=("loglik", "generate"), max_new_tokens=2,
    )  # fmt: skip
    assert main(["generate", str(tmp_path / "model"), "--prompt", QUESTION, "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    # the benchmark scored (real and grey frames) and answered, then `fvlm generate`
    assert len(scored) == 2 and len(generated) == 2
    for prompt in [*scored, *generated]:
        assert system_turn(tok, prompt) == trained
        assert (SMOL_DEFAULT in tok.decode(prompt)) == (setting == "")


def test_export_template_opens_dialogues_with_the_runs_system_turn(tmp_path, picture):
    from transformers import AutoTokenizer

    from fvlm.data.decode import encode_dialogue
    from fvlm.export.writer import export_model

    cfg, tok = checkpoint(tmp_path, "auto", picture)
    export_model(tmp_path / "model", tmp_path / "hf")
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    user = [{"role": "user", "content": QUESTION}]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids, mask, _ = encode_dialogue(
        tok, [(QUESTION, "red")], stage=2, max_tokens=500, end_of_turn_id=end, system=UPSTREAM_SYSTEM_PROMPT
    )
    prompt = chat_ids(exported, user, add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt and mask.index(True) == len(prompt)  # training's sample, up to its answer
    # A dialogue that brings its own system turn renders exactly as under the original template.
    own = [{"role": "system", "content": 'Say "hi" \\ then stop.'}, *user]
    assert chat_ids(exported, own, add_generation_prompt=True) == chat_ids(tok, own, add_generation_prompt=True)
    assert json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())["image_mean"] == [0.485, 0.456, 0.406]
