"""One tidy table of runs and their eval points, read from run folders, sweep folders and exports.

Every analysis (fits, ablation table, figures, report) reads this table and nothing else, so a
project sweep and the historical export (docs/scaling_data_export.md) go through the same code.
The export writer lives here too, next to its reader, so that the two stay each other's inverse.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fvlm import atomic
from fvlm import run_folder as rf
from fvlm.errors import UsageError, read_json, read_text, read_yaml

if TYPE_CHECKING:  # noise imports this module's Table at run time: only the type is needed here
    from fvlm.analysis.noise import NoiseModel

# The export format (docs/scaling_data_export.md).
EVAL_POINT_COLUMNS = (
    "model_size",
    "run_id",
    "lr_schedule",
    "step",
    "samples_seen",
    "val_loss",
    "train_loss",
    "lr",
    "throughput_sps",
    "attention_entropy",
)
RUN_SUMMARY_COLUMNS = (
    "run_id",
    "model_size",
    "total_params",
    "lr_schedule",
    "total_samples",
    "total_steps",
    "best_val_loss",
    "best_val_step",
    "final_train_loss",
    "wall_time_hours",
)
# The historical export predates the lr_schedule column of its own spec; accept it missing.
RUN_SUMMARY_OPTIONAL = ("lr_schedule",)

# Metrics a run folder's metrics.csv carries under names that differ from the export's.
_METRICS_RENAME = {"lr_connector": "lr", "throughput": "throughput_sps"}

# Tokens per sample the plan uses to turn samples into FLOPs (2 x params x 500) when a run did not
# record its own FLOPs per sample (the export does not).
PLAN_TOKENS_PER_SAMPLE = 500


@dataclass
class Run:
    run_id: str
    model_size: str
    params: float | None
    lr_schedule: str
    status: str
    arch: str  # foveated | shallow | coarse_only | multi_token
    tokens_per_frame: int
    source: str
    points: dict[str, np.ndarray]
    summary: dict[str, Any] | None = None  # export-format summary row, when the source had one
    config: dict[str, Any] | None = None
    flops_per_sample: float | None = None
    flops_estimated: bool = True
    steps: dict[str, np.ndarray] | None = None
    eval_result: dict[str, Any] | None = None
    # Per-sample val loss of the last checkpoint with each sample's kind (fvlm.experiments.milestones).
    sources: dict[str, Any] | None = None
    attention_files: list[Path] = field(default_factory=list)
    has_checkpoint_meta: bool | None = None

    def col(self, name: str) -> np.ndarray:
        values = self.points.get(name)
        if values is None:
            return np.full(len(self.points["step"]), np.nan)
        return values

    @property
    def n_points(self) -> int:
        return len(self.points["step"])

    def flops(self) -> np.ndarray:
        return self.col("samples_seen") * (self.flops_per_sample or np.nan)

    def best_val_loss(self) -> float:
        val = self.col("val_loss")
        return float(np.nanmin(val)) if np.isfinite(val).any() else math.nan


@dataclass
class Table:
    runs: dict[str, Run] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # The training-noise model of these runs' seed replicates (fvlm.analysis.noise.from_table), made
    # on first use.
    noise_model: NoiseModel | None = field(default=None, repr=False, compare=False)

    def add(self, run: Run) -> None:
        if run.run_id in self.runs:
            raise UsageError(f"run '{run.run_id}' appears twice: in {self.runs[run.run_id].source} and in {run.source}")
        self.runs[run.run_id] = run

    def select(self, globs: list[str] | None) -> list[Run]:
        if not globs:
            return list(self.runs.values())
        return [r for r in self.runs.values() if any(fnmatch.fnmatchcase(r.run_id, g) for g in globs)]

    def rows(self) -> list[dict[str, str | float]]:
        """The eval points as one flat list of records (one per run and eval), in export columns."""
        out = []
        for run in self.runs.values():
            for i in range(run.n_points):
                row: dict[str, str | float] = {
                    "model_size": run.model_size,
                    "run_id": run.run_id,
                    "lr_schedule": run.lr_schedule,
                }
                for name in EVAL_POINT_COLUMNS[3:]:
                    row[name] = float(run.col(name)[i])
                out.append(row)
        return out


# ----------------------------------------------------------------------------- parsing helpers

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([mb])(?![a-z])", re.IGNORECASE)


def params_from_label(label: str) -> float | None:
    """'135M' -> 135e6, 'SmolLM2-1.7B-Instruct' -> 1.7e9; None when the text names no size."""
    match = _SIZE_RE.search(label)
    if not match:
        return None
    return float(match.group(1)) * (1e6 if match.group(2).lower() == "m" else 1e9)


def size_label(params: float) -> str:
    if params >= 1e9:
        return f"{params / 1e9:.3g}B"
    return f"{params / 1e6:.3g}M"


def _number(text: str | None, path: Path, column: str, row: int) -> float:
    if text is None or text.strip() == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{path}: column '{column}' row {row}: not a number: {text!r}") from None


def read_csv(path: Path, required: tuple[str, ...], table: Table | None = None) -> list[dict[str, str]]:
    """The rows of a CSV file with the `required` columns. A row with more or fewer fields than the
    header is damage, refused with its line number; except, given the `table` to note it in, a last
    row cut short, which is what a run killed while appending to its log leaves (dropped, noted)."""
    if not path.is_file():
        raise UsageError(f"{path}: file not found")
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header = next(reader, None) or []
    missing = [c for c in required if c not in header]
    if missing:
        raise UsageError(
            f"{path}: missing column '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    rows, damaged = [], []
    for fields in reader:
        if len(fields) == len(header):
            rows.append(dict(zip(header, fields)))
        elif fields:
            damaged.append((reader.line_num, len(fields)))
    if not damaged:
        return rows
    line, count = damaged[0]
    torn_tail = len(damaged) == 1 and line == reader.line_num and count < len(header)
    if torn_tail and table is not None:
        table.notes.append(f"{path}: its last row (line {line}) is cut short; left out")
        return rows
    more = f"; {len(damaged)} damaged rows in all" if len(damaged) > 1 else ""
    raise UsageError(f"{path}: line {line} has {count} fields where the header has {len(header)}{more}")


def _columns(rows: list[dict[str, str]], names: tuple[str, ...] | list[str], path: Path) -> dict[str, np.ndarray]:
    return {
        name: np.array([_number(r.get(name), path, name, i + 2) for i, r in enumerate(rows)], dtype=float)
        for name in names
    }


def _arch_from_config(cfg: dict[str, Any]) -> tuple[str, int]:
    model = cfg.get("model", {})
    if model.get("arch") == "multi_token":
        return "multi_token", int(model.get("tokens_per_frame") or 16)
    if model.get("coarse_only"):
        return "coarse_only", 1
    if model.get("deep_query") is False:
        return "shallow", 1
    return "foveated", 1


def arch_from_name(run_id: str) -> tuple[str, int]:
    """Architecture of an export run, which carries no config: from the plan's naming."""
    name = run_id.lower()
    tokens = re.search(r"(\d+)\s*tok", name)
    if re.match(r"b1([-_]|$)", name) or re.search(r"(^|[-_])b$", name) or "multi" in name:
        return "multi_token", int(tokens.group(1)) if tokens else 16
    if "coarse_only" in name or re.match(r"a6([-_]|$)", name):
        return "coarse_only", 1
    if "shallow" in name or "deep_query_off" in name or re.match(r"a1([-_]|$)", name):
        return "shallow", 1
    return "foveated", 1


# ----------------------------------------------------------------------------- export


def read_export(folder: Path, table: Table) -> None:
    points_path = folder / "all_eval_points.csv"
    summaries_path = folder / "run_summaries.csv"
    rows = read_csv(points_path, EVAL_POINT_COLUMNS)
    summaries: dict[str, dict[str, Any]] = {}
    if summaries_path.is_file():
        required = tuple(c for c in RUN_SUMMARY_COLUMNS if c not in RUN_SUMMARY_OPTIONAL)
        for i, row in enumerate(read_csv(summaries_path, required)):
            record: dict[str, Any] = {"run_id": row["run_id"], "model_size": row["model_size"]}
            for name in RUN_SUMMARY_COLUMNS[2:]:
                if name == "lr_schedule":
                    if name in row:
                        record[name] = row[name]
                else:
                    record[name] = _number(row[name], summaries_path, name, i + 2)
            summaries[row["run_id"]] = record
    else:
        table.notes.append(f"{summaries_path} is absent: run summaries derived from the eval points")

    by_run: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_run.setdefault(row["run_id"], []).append(row)
    # A size's parameter count from any run of that size that has a summary, so runs without a
    # summary row (an interrupted run) get the same N as their siblings rather than the label's.
    params_by_size: dict[str, float] = {}
    for record in summaries.values():
        if math.isfinite(record.get("total_params", math.nan)):
            params_by_size.setdefault(record["model_size"], record["total_params"])
    for run_id, run_rows in by_run.items():
        points = _columns(run_rows, EVAL_POINT_COLUMNS[3:], points_path)
        order = np.argsort(points["step"], kind="stable")
        points = {k: v[order] for k, v in points.items()}
        size = run_rows[0]["model_size"]
        summary = summaries.get(run_id)
        params = summary["total_params"] if summary and math.isfinite(summary["total_params"]) else None
        params = params or params_by_size.get(size) or params_from_label(size)
        arch, tokens = arch_from_name(run_id)
        table.add(
            Run(
                run_id=run_id,
                model_size=size,
                params=params,
                lr_schedule=run_rows[0]["lr_schedule"],
                status="unknown",
                arch=arch,
                tokens_per_frame=tokens,
                source=str(folder),
                points=points,
                summary=summary,
                flops_per_sample=2 * params * PLAN_TOKENS_PER_SAMPLE if params else None,
                flops_estimated=True,
            )
        )
    for run_id in summaries:
        if run_id not in by_run:
            table.notes.append(f"{summaries_path}: run '{run_id}' has a summary but no eval points; left out")


def _format_cell(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    # repr is the shortest text that reads back to the same float: export -> read -> export is exact.
    return repr(float(value))


def write_export_csvs(table: Table, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(folder / "all_eval_points.csv", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(EVAL_POINT_COLUMNS)
        for row in table.rows():
            writer.writerow([_format_cell(row[c]) for c in EVAL_POINT_COLUMNS])
    with atomic.replacing(folder / "run_summaries.csv", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(RUN_SUMMARY_COLUMNS)
        for run in table.runs.values():
            if run.summary is None:
                continue
            row = dict(run.summary, lr_schedule=run.summary.get("lr_schedule", run.lr_schedule))
            writer.writerow([_format_cell(row.get(c)) for c in RUN_SUMMARY_COLUMNS])


# ----------------------------------------------------------------------------- run folders


def read_run(folder: Path, table: Table, sweep_status: str | None = None) -> None:
    config_path = folder / rf.CONFIG
    if not config_path.is_file():
        raise UsageError(f"{config_path}: file not found")
    config = read_yaml(config_path) or {}
    metrics_path = folder / rf.METRICS
    rows = read_csv(metrics_path, rf.METRIC_COLUMNS, table)
    numeric = [c for c in rf.METRIC_COLUMNS if c != "run_id"]
    points = _columns(rows, numeric, metrics_path)
    order = np.argsort(points["step"], kind="stable")
    points = {_METRICS_RENAME.get(k, k): v[order] for k, v in points.items()}

    summary_path = folder / rf.SUMMARY
    raw = rf.read_summary(folder, complete=True)
    run_id = (raw or {}).get("run_id") or config.get("run_id") or folder.name
    llm = str(config.get("model", {}).get("llm", ""))
    params = float(raw["params"]["total"]) if raw else None
    named_params = params_from_label(Path(llm).name)
    # A size is the backbones' size: the foveated model and the multi-token baseline built on the same
    # LLM and DINO are the same size even though their connectors differ.
    by_group = (raw or {}).get("params", {}).get("by_group") or {}
    backbone_params = (by_group.get("llm", 0) + by_group.get("dino", 0)) or params
    size_params = named_params or backbone_params
    size = size_label(size_params) if size_params else "unknown"
    status = (raw or {}).get("status") or sweep_status or "unknown"
    if raw is None:
        table.notes.append(f"{summary_path} is absent: run '{run_id}' treated as unfinished ({status})")

    summary = None
    if raw:
        summary = {"run_id": run_id, "model_size": size, "total_params": params}
        for name in RUN_SUMMARY_COLUMNS[3:]:
            if name != "lr_schedule":
                value = raw.get(name)
                summary[name] = float(value) if isinstance(value, (int, float)) else math.nan
        summary["lr_schedule"] = str(config.get("optim", {}).get("schedule", ""))

    steps = None
    steps_path = folder / rf.STEPS
    if steps_path.is_file():
        step_rows = read_csv(steps_path, rf.STEP_COLUMNS_REQUIRED, table)
        steps = _columns(step_rows, [c for c in rf.STEP_COLUMNS_REQUIRED if c != "run_id"], steps_path)

    eval_result = None
    eval_path = rf.eval_dir(folder) / rf.EVAL_JSON
    if eval_path.is_file():
        eval_result = read_json(eval_path)
        if not isinstance(eval_result, dict) or "modes" not in eval_result:
            raise UsageError(f"{eval_path}: missing field 'modes'")

    sources = None
    sources_path = rf.sources_file(folder)
    if sources_path.is_file():
        sources = read_json(sources_path)
        missing = [
            k for k in ("keys", "kinds", "loss_sum", "tokens") if not isinstance(sources, dict) or k not in sources
        ]
        if missing:
            raise UsageError(f"{sources_path}: missing field '{missing[0]}'")

    arch, tokens = _arch_from_config(config)
    fps = (raw or {}).get("flops_per_sample")
    table.add(
        Run(
            run_id=run_id,
            model_size=size,
            params=params,
            lr_schedule=str(config.get("optim", {}).get("schedule", "")),
            status=status,
            arch=arch,
            tokens_per_frame=tokens,
            source=str(folder),
            points=points,
            summary=summary,
            config=config,
            flops_per_sample=float(fps) if fps else None,
            flops_estimated=False,
            steps=steps,
            eval_result=eval_result,
            sources=sources,
            attention_files=rf.attention_files(folder),
            has_checkpoint_meta=bool(rf.complete_checkpoints(folder)),
        )
    )


def read_sweep(folder: Path, table: Table) -> None:
    sweep_path = folder / rf.SWEEP_CSV
    for row in read_csv(sweep_path, ("run_id", "status")):
        run_dir = folder / row["run_id"]
        if not (run_dir / rf.METRICS).is_file():
            table.notes.append(f"{sweep_path}: run '{row['run_id']}' ({row['status']}) has no {rf.METRICS}; left out")
            continue
        read_run(run_dir, table, sweep_status=row["status"])


def _kind(folder: Path) -> str | None:
    if (folder / "all_eval_points.csv").is_file():
        return "export"
    if (folder / rf.SWEEP_CSV).is_file():
        return "sweep"
    if (folder / rf.METRICS).is_file() or (folder / rf.CONFIG).is_file():
        return "run"
    return None


def load(paths: list[str]) -> Table:
    """Reads every PATH (run, sweep or export folder, or a folder of those) into one table."""
    table = Table()
    readers = {"export": read_export, "sweep": read_sweep, "run": read_run}
    for text in paths:
        folder = Path(text)
        if not folder.is_dir():
            raise UsageError(f"{folder}: no such folder")
        kind = _kind(folder)
        if kind:
            readers[kind](folder, table)
            continue
        kinds = [(c, _kind(c)) for c in sorted(folder.iterdir()) if c.is_dir()]
        children = [(c, k) for c, k in kinds if k]
        if not children:
            raise UsageError(
                f"{folder}: not a run, sweep or export folder (no {rf.METRICS}, {rf.SWEEP_CSV} or all_eval_points.csv in it or its sub-folders)"
            )
        for child, child_kind in children:
            readers[child_kind](child, table)
    if not table.runs:
        raise UsageError(f"no runs with eval points found in {', '.join(paths)}")
    return table
