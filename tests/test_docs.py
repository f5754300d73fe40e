"""The documentation against the repo: no diary text, commands that the CLI accepts, links that resolve.

Fast (a few hundred milliseconds): it reads text files and builds the `fvlm` argument parser, which
imports no torch.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from fvlm.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent

# What reads as a work diary rather than as documentation: a numbered session or round of work
# ("sessions" with a range included), and a heading that starts with a date.
DIARY_PATTERNS = (
    re.compile(r"\bsessions?\s+\d+", re.IGNORECASE),
    re.compile(r"\brounds?\s+\d+", re.IGNORECASE),
    re.compile(r"^\s*#{1,6}\s*\[?\d{4}-\d{2}-\d{2}"),
)
# Folders that hold no files of the repo (environments, caches, run outputs), for a checkout without git.
NOT_THE_REPO = {".git", ".venv", "venv", "runs", "out", ".fvlm_cache", "build", "dist", "wandb", "__pycache__"}

# The markdown files whose commands are checked, and those whose links are (the generated reports too).
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
COMMAND = re.compile(r"^\s*(?:\$\s+)?(?:\.venv/bin/)?fvlm\s")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|(?:src|href)=\"([^\"]+)\"")


def _repo_files() -> list[str]:
    """The repo's files, relative to its root: tracked and untracked-but-not-ignored ones when git is
    at hand, otherwise every file outside the environment, cache and output folders."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        return sorted({name for name in listed.decode().split("\0") if name and (ROOT / name).is_file()})
    except (OSError, subprocess.CalledProcessError):
        return sorted(
            str(path.relative_to(ROOT))
            for path in ROOT.rglob("*")
            if path.is_file()
            and not NOT_THE_REPO.intersection(path.relative_to(ROOT).parts)
            and not any(part.endswith((".egg-info", "_cache")) for part in path.relative_to(ROOT).parts)
        )


def _text(path: Path) -> str | None:
    """The file's text, or None for a binary file (images, weights)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def diary_hits(name: str, text: str) -> list[str]:
    return [
        f"{name}:{number}: {line.strip()[:160]}"
        for number, line in enumerate(text.splitlines(), start=1)
        if any(pattern.search(line) for pattern in DIARY_PATTERNS)
    ]


def test_no_file_reads_as_a_work_diary():
    hits = []
    for name in _repo_files():
        text = _text(ROOT / name)
        if text is not None:
            hits += diary_hits(name, text)
    assert not hits, "text that names a numbered session or round of work, or a dated heading:\n" + "\n".join(hits)


def test_the_diary_check_finds_what_it_is_meant_to():
    text = "\n".join(
        [
            "Measured in " + "session " + "12 on the Xeon.",
            "(" + "sessions " + "16–18)",
            "after " + "round " + "3",
            "## " + "2026-11-30" + " the main job",
            "## [0.1.0]",
            "Rounded to 4 digits; a session of training; 2026-11-30 in running text.",
        ]
    )
    assert [hit.split(":")[1] for hit in diary_hits("x.md", text)] == ["1", "2", "3", "4"]


# ----------------------------------------------------------------------------- commands


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of the shell code blocks of a markdown file, a command continued with a
    trailing backslash joined into its first line."""
    out: list[tuple[int, str]] = []
    fence: str | None = None  # the open block's fence
    shell = False  # whether the open block is shell code
    pending: tuple[int, str] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = FENCE.match(line)
        if match and fence is None:
            fence, shell = match.group(1), match.group(2).lower() in SHELL_FENCES
            continue
        if match and fence is not None and match.group(1).startswith(fence) and not match.group(2):
            fence, pending = None, None
            continue
        if fence is None or not shell:
            continue
        if pending is not None:
            pending = (pending[0], pending[1] + " " + line.strip())
        else:
            pending = (number, line)
        if pending[1].rstrip().endswith("\\"):
            pending = (pending[0], pending[1].rstrip()[:-1])
            continue
        out.append(pending)
        pending = None
    return out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def command_problems(line: str, parser: argparse.ArgumentParser) -> list[str]:
    """What of an `fvlm ...` line the parser does not know: the sub-command (at every level) and
    each --flag. Synopsis notation is understood: [optional parts], a|b alternatives, --flag=value."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as exc:
        return [f"cannot be split into words ({exc})"]
    words = [token.strip("[]") for token in tokens[1:]]
    path = ["fvlm"]
    problems = []
    while (choices := _subparsers(parser)) and words and not words[0].startswith("-"):
        word = words.pop(0)
        if word not in choices:
            return [f"`{' '.join(path)}` has no sub-command {word!r} (it has: {', '.join(sorted(choices))})"]
        parser = choices[word]
        path.append(word)
    if _subparsers(parser):
        return [f"`{' '.join(path)}` needs a sub-command ({', '.join(sorted(_subparsers(parser)))})"]
    known = _options(parser)
    for word in words:
        for flag in word.split("|"):
            flag = flag.strip("[]").split("=", 1)[0]
            if flag.startswith("--") and flag not in known:
                problems.append(f"`{' '.join(path)}` has no option {flag}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_documented_command_parses(doc):
    parser = build_parser()
    problems = [
        f"{doc.relative_to(ROOT)}:{number}: {problem}\n    {line.strip()}"
        for number, line in _code_lines(doc)
        if COMMAND.match(line)
        for problem in command_problems(line.strip().removeprefix("$").strip(), parser)
    ]
    assert not problems, "commands the fvlm CLI does not accept:\n" + "\n".join(problems)


def test_the_command_check_names_unknown_commands_and_flags():
    parser = build_parser()
    assert command_problems("fvlm sweep scaling [--preset tiny|paper] [--dry-run [--json]]", parser) == []
    assert command_problems(".venv/bin/fvlm eval runs/x --modes=coarse_only  # a comment --nope", parser) == []
    assert command_problems("fvlm sweep scaling --no-such-flag", parser) == [
        "`fvlm sweep scaling` has no option --no-such-flag"
    ]
    assert "has no sub-command 'trian'" in command_problems("fvlm trian x", parser)[0]
    assert "needs a sub-command" in command_problems("fvlm backbones", parser)[0]


# ----------------------------------------------------------------------------- links


def _links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of the relative links and image sources outside code blocks."""
    out = []
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        for match in LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            target = match.group(1) or match.group(2)
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                continue  # http(s), mailto and the like; an anchor on the same page
            out.append((number, target))
    return out


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    missing = [
        f"{doc.relative_to(ROOT)}:{number}: {target}"
        for number, target in _links(doc)
        if not (doc.parent / target.split("#", 1)[0]).exists()
    ]
    assert not missing, "links to files that do not exist:\n" + "\n".join(missing)
