"""Turning a data path into sources of shards: a folder, a glob, a comma-separated list, or a YAML
mix file. Every problem is a UsageError naming the path or source, raised before training starts.

Mix file format (relative paths are relative to the file)::

    sources:
      video: {path: shards/openvid, weight: 0.55}
      image: {path: "shards/cauldron-*.tar", weight: 0.30, prompt: "Describe this image."}
      text:  {path: shards/smoltalk, weight: 0.15}
"""

from __future__ import annotations

import glob
from pathlib import Path

from fvlm.data.index import SourceSpec
from fvlm.data.synth import MANIFEST, unfinished_set_of
from fvlm.errors import UsageError, read_yaml

_GLOB_CHARS = set("*?[")


def _shards_of(item: str, base: Path | None, what: str) -> list[str]:
    path = Path(item).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if _GLOB_CHARS & set(item):
        found = sorted(p for p in glob.glob(str(path), recursive=True) if p.endswith(".tar"))
    elif path.is_dir():
        found = sorted(str(p) for p in path.rglob("*.tar"))
    elif path.is_file():
        found = [str(path)]
    else:
        raise UsageError(f"{what}: no such file or folder: {path}")
    for folder in {path, *(Path(s).parent for s in found)}:
        unfinished = unfinished_set_of(folder)
        if unfinished is not None:
            raise UsageError(
                f"{what}: {unfinished} is a synthetic set that `fvlm data synth` never finished "
                f"(no {MANIFEST}); run `fvlm data synth {unfinished}` again to start it over"
            )
    if not found:
        raise UsageError(f"{what}: no .tar shards in {path}")
    return found


def _read_mix(path: Path, what: str) -> list[SourceSpec]:
    try:
        data = read_yaml(path)
    except UsageError as exc:
        raise UsageError(f"{what}: {exc}") from None
    entries = data.get("sources") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise UsageError(f"{what}: mix file {path} needs a 'sources:' mapping of name -> {{path, weight}}")
    specs = []
    for name, entry in entries.items():
        where = f"{what}: mix file {path}, source '{name}'"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or "path" not in entry:
            raise UsageError(f"{where}: needs a 'path'")
        unknown = set(entry) - {"path", "weight", "prompt"}
        if unknown:
            raise UsageError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        weight = entry.get("weight")
        if weight is not None and (not isinstance(weight, (int, float)) or weight < 0):
            raise UsageError(f"{where}: weight must be a number >= 0, got {weight!r}")
        paths = entry["path"] if isinstance(entry["path"], list) else str(entry["path"]).split(",")
        shards = [s for p in paths for s in _shards_of(str(p).strip(), path.parent, where)]
        specs.append(SourceSpec(str(name), shards, None if weight is None else float(weight), entry.get("prompt")))
    weighted = [s.name for s in specs if s.weight is not None]
    if weighted and len(weighted) != len(specs):
        missing = ", ".join(s.name for s in specs if s.weight is None)
        raise UsageError(f"{what}: mix file {path} gives weights to some sources but not to {missing}")
    return specs


def resolve_sources(spec: str, what: str = "data path") -> list[SourceSpec]:
    """Sources for a path spec. Sources without a mix file are unnamed (""): samples are then
    grouped by the `source` field in their JSON."""
    spec = spec.strip()
    if not spec:
        raise UsageError(f"{what}: empty path")
    if spec.endswith((".yaml", ".yml")) and "," not in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UsageError(f"{what}: mix file not found: {path}")
        return _read_mix(path, what)
    shards = [s for item in spec.split(",") if item.strip() for s in _shards_of(item.strip(), None, what)]
    return [SourceSpec("", shards)]
