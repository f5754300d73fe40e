"""`fvlm backbones import` on a folder transformers loads (the GGUF path, which needs the real
weights, is in test_real_weights.py): the plain folder it writes loads through fvlm with the same
logits and tokens, and bad input is a one-line error before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

from fvlm.cli import main
from fvlm.model.backbones import load_llm, load_tokenizer
from fvlm.model.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Llama chat model in a Hugging Face folder, in bfloat16 as published models often are."""
    folder = tmp_path_factory.mktemp("import") / "source"
    torch.manual_seed(0)
    llm, _ = load_llm("tiny")
    llm.to(torch.bfloat16).save_pretrained(str(folder))
    byte_tokenizer().save_pretrained(str(folder))
    return folder


def _logits(llm, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], tokenize=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        return llm.eval()(input_ids=ids).logits


@pytest.mark.parametrize("dtype, size", [("auto", "bfloat16"), ("float32", "float32")])
def test_a_folder_imports_to_the_same_model(source, tmp_path, capsys, dtype, size):
    out = tmp_path / "llm"
    assert main(["backbones", "import", str(source), str(out), "--dtype", dtype]) == 0
    printed = capsys.readouterr().out
    parameters = sum(p.numel() for p in load_llm(str(source))[0].parameters())
    assert f"LlamaForCausalLM, {parameters:,} parameters, {size}, tokenizer 260 tokens" in printed
    assert json.loads((out / "config.json").read_text())["dtype"] == size
    assert json.loads((out / "fvlm_import.json").read_text())["format"] == "huggingface"
    tokenizer = load_tokenizer(str(out))
    assert tokenizer.chat_template == byte_tokenizer().chat_template
    assert torch.equal(_logits(load_llm(str(out))[0], tokenizer), _logits(load_llm(str(source))[0], tokenizer))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file or folder"),
        ("not a model folder", "no config.json"),
        ("not gguf", "expected a .gguf file"),
        ("out not empty", "exists and is not an empty folder"),
        ("bad dtype", "--dtype must be one of"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(source, tmp_path, capsys, case, message):
    src, out, extra = source, tmp_path / "out", []
    if case == "missing":
        src = tmp_path / "nothing"
    elif case == "not a model folder":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "not gguf":
        src = tmp_path / "weights.bin"
        src.write_bytes(b"\0" * 16)
    elif case == "out not empty":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    else:
        extra = ["--dtype", "float64"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["backbones", "import", str(src), str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before
