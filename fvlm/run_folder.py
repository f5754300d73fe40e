"""The run folder: what `fvlm train` writes under `<out_dir>/<run_id>/`, and what sweeps, `fvlm eval`
and `fvlm analyze` read back. Every file name and CSV column of that contract is spelled here, so
that a writer and its readers cannot drift apart.

    <run>/config.yaml                  the resolved config; a re-run compares itself against it
    <run>/steps.csv                    one row per logged training step (STEP_COLUMNS)
    <run>/metrics.csv                  one row per evaluation point (METRIC_COLUMNS)
    <run>/run_summary.json             written when a session ends: status, losses, FLOPs, throughput
    <run>/train.log                    the console of a run that a sweep started in the background
    <run>/attention/step_NNNNNNN.npz   probe attention at each evaluation point
    <run>/checkpoints/step_NNNNNNN/    the saved model (MODEL_FILE, MODEL_CONFIG, tokenizer) and
                                       META; a resume checkpoint also OPTIMIZER, TRAINER, rank_R.pt
    <run>/eval/eval.json, eval.md      `fvlm eval`'s results
A sweep folder holds one run folder per run, plus SWEEP_CSV (one row per run) and SWEEP_STATE.

Writers of JSON files replace them by rename, so a reader never sees half a file; a checkpoint
folder without META is incomplete (META is written last) and is never read.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from fvlm import atomic
from fvlm.config import RunConfig, load_config
from fvlm.errors import UsageError, read_json

CONFIG = "config.yaml"
STEPS = "steps.csv"
METRICS = "metrics.csv"
SUMMARY = "run_summary.json"
TRAIN_LOG = "train.log"
TRAIN_LOCK = ".train.lock"
ATTENTION = "attention"
EVAL = "eval"
EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
# Per-sample answer losses by kind (video, image, text) of the run's latest checkpoint: what the
# ablations that are judged per data source (image questions, video vs image) compare.
SOURCES_JSON = "sources.json"
CHECKPOINTS = "checkpoints"
META = "meta.json"
MODEL_FILE = "model.safetensors"
MODEL_CONFIG = "fvlm_model.json"
OPTIMIZER = "optimizer.pt"
TRAINER = "trainer.pt"
SWEEP_CSV = "sweep.csv"
SWEEP_STATE = "sweep_state.json"
SWEEP_LOCK = ".sweep.lock"

STEP_COLUMNS = (
    "run_id",
    "step",
    "samples_seen",
    "wall_time_sec",
    "train_loss",
    "loss_fine",
    "loss_coarse",
    "loss_ratio",
    "grad_norm",
    "lr_connector",
    "lr_dino",
    "lr_llm",
    "throughput_samples_sec",
    "gpu_mem_allocated_gb",
    "gpu_mem_reserved_gb",
    "tokens_per_sec",
    "visual_tokens_per_sec",
    "text_tokens_per_sec",
    "flops_per_sec",
    "mfu",
    "data_wait_sec",
)
# The throughput columns after gpu_mem_reserved_gb came later: runs written before them still read.
STEP_COLUMNS_REQUIRED = STEP_COLUMNS[: STEP_COLUMNS.index("gpu_mem_reserved_gb") + 1]
METRIC_COLUMNS = (
    "run_id",
    "step",
    "samples_seen",
    "wall_time_sec",
    "train_loss",
    "val_loss",
    "loss_fine",
    "loss_coarse",
    "loss_ratio",
    "grad_norm",
    "attention_entropy",
    "lr_connector",
    "lr_dino",
    "lr_llm",
    "throughput",
    "gpu_mem_gb",
    "val_loss_fine",
    "val_loss_coarse",
    "val_loss_ratio",
)
# What every run_summary.json holds, whatever its status.
SUMMARY_FIELDS = (
    "run_id",
    "status",
    "params",
    "total_samples",
    "total_steps",
    "best_val_loss",
    "best_val_step",
    "final_train_loss",
    "wall_time_hours",
)
SWEEP_COLUMNS = (
    "run_id",
    "sweep",
    "status",
    "description",
    "diff",
    "planned_samples",
    "planned_flops",
    "flops_per_sample",
    "total_samples",
    "total_steps",
    "total_flops",
    "best_val_loss",
    "best_val_step",
    "final_val_loss",
    "final_val_loss_fine",
    "final_val_loss_coarse",
    "final_val_loss_ratio",
    "final_attention_entropy",
    "final_train_loss",
    "wall_time_sec",
    "config_hash",
    "error",
)

# Settings that may change between a run and its resumption: they change how long it runs, what it
# records or how fast a step runs, not what a step computes (compiled and padded steps agree with
# eager unpadded ones to float rounding: tests/test_static_shapes.py).
RESUMABLE_CHANGES = {
    "train.compile",
    "train.static_shapes",
    "train.cuda_graphs",
    "train.max_steps",
    "train.max_samples",
    "train.eval_every",
    "train.save_every",
    "train.log_every",
    "train.keep_last",
    "train.keep_milestones",
    "train.wandb",
    "train.wandb_project",
    "data.num_workers",
    "train.peak_flops",
}


# ----------------------------------------------------------------------------- files


def write_json(path: Path, obj: Any) -> None:
    """Replace-by-rename (fvlm.atomic), so a reader never sees half a file."""
    atomic.write_text(path, json.dumps(obj, indent=1, default=str))


def csv_cell(value: Any, significant: int | None = None) -> str:
    """A CSV cell: empty for a value that was not measured (e.g. loss_fine of a coarse-only model).
    Floats in full precision, because resumed and uninterrupted runs are compared from steps.csv and
    metrics.csv; with `significant`, rounded for a table people read (sweep.csv), where a non-finite
    value is left empty too."""
    if value is None:
        return ""
    if isinstance(value, float):
        if significant is not None:
            return f"{value:.{significant}g}" if math.isfinite(value) else ""
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


def attention_file(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / ATTENTION / f"{step_name(step)}.npz"


def attention_files(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / ATTENTION).glob("step_*.npz"))


def eval_dir(run_dir: Path) -> Path:
    return Path(run_dir) / EVAL


def sources_file(run_dir: Path) -> Path:
    return eval_dir(run_dir) / SOURCES_JSON


# ----------------------------------------------------------------------------- summary


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_json(Path(run_dir) / SUMMARY, summary)


def read_summary(run_dir: Path, strict: bool = False, complete: bool = False) -> dict[str, Any] | None:
    """The run's summary; None when it has none (it never finished a session). An unreadable one is
    None too, or with `strict` a UsageError naming the file; `complete` also requires every field of
    SUMMARY_FIELDS (what analysis reads)."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = read_json(path)
        if not isinstance(summary, dict):
            raise UsageError(f"{path}: expected a JSON object")
        if complete:
            for name in SUMMARY_FIELDS:
                if name not in summary:
                    raise UsageError(f"{path}: missing field '{name}'")
            if not isinstance(summary["params"], dict) or "total" not in summary["params"]:
                raise UsageError(f"{path}: missing field 'params.total'")
    except UsageError:
        if strict or complete:
            raise
        return None
    return summary


def run_status(run_dir: Path) -> str:
    """pending (never started), interrupted (started, no readable summary) or the summary's status."""
    if not (Path(run_dir) / SUMMARY).is_file():
        return "interrupted" if (Path(run_dir) / CONFIG).is_file() else "pending"
    summary = read_summary(run_dir)
    return "interrupted" if summary is None else summary.get("status", "unknown")


def sweep_row(
    run_dir: Path,
    *,
    sweep: str,
    status: str,
    description: str,
    diff: str,
    planned_samples: int,
    flops_per_sample: float,
    config_hash: str,
    error: str | None,
) -> dict[str, Any]:
    """One sweep.csv row: the plan's side of a run, and the results its summary holds, if any."""
    summary = read_summary(run_dir) or {}
    final = summary.get("final") or {}
    return {
        "run_id": Path(run_dir).name,
        "sweep": sweep,
        "status": status,
        "description": description,
        "diff": diff,
        "planned_samples": planned_samples,
        "planned_flops": planned_samples * flops_per_sample,
        "flops_per_sample": summary.get("flops_per_sample") or flops_per_sample,
        "total_samples": summary.get("total_samples"),
        "total_steps": summary.get("total_steps"),
        "total_flops": summary.get("total_flops"),
        "best_val_loss": summary.get("best_val_loss"),
        "best_val_step": summary.get("best_val_step"),
        "final_val_loss": final.get("val_loss"),
        "final_val_loss_fine": final.get("val_loss_fine"),
        "final_val_loss_coarse": final.get("val_loss_coarse"),
        "final_val_loss_ratio": final.get("val_loss_ratio"),
        "final_attention_entropy": final.get("attention_entropy"),
        "final_train_loss": summary.get("final_train_loss"),
        "wall_time_sec": summary.get("wall_time_sec"),
        "config_hash": config_hash,
        "error": error or summary.get("error") or "",
    }


def write_sweep_csv(folder: Path, rows: list[dict[str, Any]]) -> None:
    """sweep.csv, replaced by rename; numbers to 6 significant digits (people read this table)."""
    with atomic.replacing(Path(folder) / SWEEP_CSV, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SWEEP_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: csv_cell(v, significant=6) for k, v in row.items()})


def metric_row(step_row: dict[str, Any], **values: Any) -> dict[str, Any]:
    """A metrics.csv row: what it shares with the same step's steps.csv row, then `values` (the
    evaluation's own, which win). metrics.csv calls throughput_samples_sec `throughput`."""
    shared = {k: step_row.get(k) for k in METRIC_COLUMNS if k in STEP_COLUMNS}
    return {**shared, "throughput": step_row.get("throughput_samples_sec"), **values}


# ----------------------------------------------------------------------------- saved config


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "mix":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_settings(old: RunConfig, new: RunConfig) -> list[str]:
    """Fields that differ between a run folder's saved config and a new one, other than those a run
    may change on resume (RESUMABLE_CHANGES) and where it is written."""
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    return sorted(k for k in b if a.get(k) != b[k] and k not in RESUMABLE_CHANGES | {"out_dir"})


def settings_changed(run_dir: Path, cfg: RunConfig) -> list[str] | None:
    """What `cfg` changes against the config saved in `run_dir`; None when it holds none yet."""
    saved = Path(run_dir) / CONFIG
    if not saved.is_file():
        return None
    return changed_settings(load_config(str(saved)), cfg)


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    atomic.write_text(Path(run_dir) / CONFIG, cfg.to_yaml())


# ----------------------------------------------------------------------------- checkpoints


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def step_of(folder: Path) -> int | None:
    """The step a `step_NNNNNNN` folder is named for; None for any other name."""
    name = Path(folder).name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / step_name(step)


def in_run_folder(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint folder sits in; None for a model folder elsewhere."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else None


def rank_file(checkpoint: Path, rank: int) -> Path:
    """A resume checkpoint's state of one DDP rank (its RNG states and data cursor)."""
    return Path(checkpoint) / f"rank_{rank}.pt"


def rank_files(checkpoint: Path) -> list[Path]:
    return sorted(Path(checkpoint).glob("rank_*.pt"))


def unfinished_checkpoints(run_dir: Path) -> list[Path]:
    """Temporary folders of checkpoints whose writing never finished (`save_checkpoint` renames a
    hidden `.tmp_step_NNNNNNN` folder into place once it is whole)."""
    return sorted((Path(run_dir) / CHECKPOINTS).glob(".tmp_step_*"))


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    for folder in root.glob("step_*") if root.is_dir() else []:
        step = step_of(folder)
        if step is not None and (folder / META).is_file():
            found.append((step, folder))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def has_training_state(folder: Path) -> bool:
    """Whether a training run can resume from this checkpoint (rather than only evaluate it)."""
    return (Path(folder) / OPTIMIZER).is_file() and (Path(folder) / TRAINER).is_file()


def resume_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint that holds its training state, oldest first."""
    return [(step, folder) for step, folder in complete_checkpoints(run_dir) if has_training_state(folder)]


def is_model_folder(folder: Path) -> bool:
    """A folder `fvlm.model.build.save_model` wrote (a checkpoint, or a model saved on its own)."""
    return (Path(folder) / MODEL_FILE).is_file() and (Path(folder) / MODEL_CONFIG).is_file()
