"""lmms-eval tasks made from fvlm's benchmark JSONL (`fvlm bench lmms-task`), and the document
functions their YAML names. Importing this module does not need lmms-eval.

`write_task` checks every line as `fvlm eval --bench` does and writes, into one folder that
lmms-eval reads with `--include_path`:
- `<name>.jsonl`: the questions with absolute media paths, options without letters, the answer as
  an index (lmms-eval's `json` dataset loader reads it; nothing is downloaded);
- `<name>.yaml`: a `multiple_choice` task, the log-likelihood protocol. The prompt and the options
  ("B. a phone") are the ones `fvlm eval` scores; lmms-eval's `acc` picks the option with the lowest
  mean loss per answer token, which is `fvlm eval`'s default `--score mean`;
- `<name>_generate.yaml`: a `generate_until` task, the generation protocol (lettered options and
  lmms-eval's instruction); the letter is extracted as `fvlm eval --protocol generate` extracts it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fvlm import atomic
from fvlm.errors import UsageError, json_problem, parse_json, read_text
from fvlm.eval.bench import LETTERS, generate_prompt, mc_prompt, parse_jsonl_entry, with_subtitles

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
MODULE = __name__


def doc_to_visual(doc: dict[str, Any]) -> list[str]:
    return [doc["video"]]


def doc_to_text(doc: dict[str, Any]) -> str:
    return with_subtitles(mc_prompt(doc["question"], doc["options"]), doc.get("subtitles") or None)


def doc_to_text_generate(doc: dict[str, Any]) -> str:
    return with_subtitles(generate_prompt(doc["question"], doc["options"]), doc.get("subtitles") or None)


def doc_to_choice(doc: dict[str, Any]) -> list[str]:
    return [f"{LETTERS[i]}. {o}" for i, o in enumerate(doc["options"])]


def doc_to_target(doc: dict[str, Any]) -> int:
    return int(doc["answer"])


def process_generated(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """One generated answer -> {"accuracy": 1.0 when the letter extracted from it is the answer}."""
    from fvlm.eval.protocol import extract_letter

    # The lettered options, as `fvlm eval --protocol generate` gives them to the extractor.
    return {"accuracy": float(extract_letter(results[0], doc_to_choice(doc)) == int(doc["answer"]))}


def _yaml(name: str, data_file: Path, generate: bool, max_new_tokens: int) -> str:
    def fn(function: str) -> str:
        return f"!function {MODULE}.{function}"

    lines = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file))}",
        "test_split: test",
        f"doc_to_visual: {fn('doc_to_visual')}",
        f"doc_to_target: {fn('doc_to_target')}",
    ]
    if generate:
        lines += [
            "output_type: generate_until",
            f"doc_to_text: {fn('doc_to_text_generate')}",
            "generation_kwargs:",
            f"  max_new_tokens: {max_new_tokens}",
            "  temperature: 0",
            "  do_sample: false",
            f"process_results: {fn('process_generated')}",
            "metric_list:",
            "  - metric: accuracy",
        ]
    else:
        lines += [
            "output_type: multiple_choice",
            f"doc_to_text: {fn('doc_to_text')}",
            f"doc_to_choice: {fn('doc_to_choice')}",
            "metric_list:",
            "  - metric: acc",
        ]
    lines += ["    aggregation: mean", "    higher_is_better: true", ""]
    return "\n".join(lines)


def write_task(bench: str | Path, out: str | Path, name: str | None = None, max_new_tokens: int = 16) -> dict[str, Any]:
    """Writes OUT/<name>.jsonl, OUT/<name>.yaml and OUT/<name>_generate.yaml from a benchmark JSONL
    (fvlm's format: docs/benchmarks.md). Returns {"tasks": [...], "questions": n, "folder": OUT}."""
    bench, out = Path(bench).expanduser(), Path(out).expanduser()
    if not bench.is_file():
        raise UsageError(f"{bench}: no such benchmark file")
    name = name or re.sub(r"\W", "_", bench.stem)
    if not _NAME.match(name):
        raise UsageError(f"--name: {name!r} is not a task name (a letter, then letters, digits or _)")
    records = []
    for number, line in enumerate(read_text(bench).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{bench}:{number}"
        try:
            entry = parse_json(line)
        except ValueError as exc:
            raise UsageError(f"{where}: {json_problem(exc)}") from None
        video, question, options, answer, category, subtitles = parse_jsonl_entry(entry, where, bench.parent)
        records.append(
            {
                "where": where,
                "video": str(video.resolve()),
                "question": question,
                "options": options,
                "answer": answer,
                "category": category,
                "subtitles": subtitles or "",
            }
        )
    if not records:
        raise UsageError(f"{bench}: no questions")
    out.mkdir(parents=True, exist_ok=True)
    data_file = (out / f"{name}.jsonl").resolve()
    atomic.write_text(data_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tasks = [name, f"{name}_generate"]
    for task, generate in zip(tasks, (False, True)):
        atomic.write_text(out / f"{task}.yaml", _yaml(task, data_file, generate, max_new_tokens))
    return {"tasks": tasks, "questions": len(records), "folder": str(out)}
