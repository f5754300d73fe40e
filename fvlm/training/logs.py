"""What a run writes besides checkpoints: the CSVs (columns: fvlm.run_folder), wandb, and the console.

CSV is the record (always written, flushed per row); wandb is a mirror when enabled. On resume each
CSV keeps the rows up to the checkpoint's step and drops the rest, which the resumed run rewrites.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from fvlm import atomic
from fvlm.errors import UsageError, decode_lines
from fvlm.run_folder import csv_cell


def _step(row: list[str], at: int) -> float:
    try:
        return int(row[at])
    except ValueError:
        return math.inf


class CsvLog:
    def __init__(self, path: Path, columns: tuple[str, ...], keep_until_step: int | None):
        self.path = Path(path)
        self.columns = columns
        kept: list[list[str]] = []
        # Lines that are not UTF-8 text (a damaged tail) are dropped like rows cut short; counted here.
        self.damaged_lines = 0
        if keep_until_step is not None and self.path.is_file():
            lines = decode_lines(self.path.read_bytes())
            self.damaged_lines = lines.count(None)
            reader = csv.reader(line for line in lines if line is not None)
            header = next(reader, None) or []
            if "step" in header:
                # Whole rows only (a row cut short by a kill mid-write is dropped); a log written
                # with other columns (an older fvlm) keeps its values under the current ones.
                at = header.index("step")
                kept = [
                    [dict(zip(header, row)).get(c, "") for c in columns]
                    for row in reader
                    if len(row) == len(header) and _step(row, at) <= keep_until_step
                ]
        self.kept_rows = [dict(zip(columns, row)) for row in kept]
        # The kept rows go to a temporary file that replaces the log in one rename: a kill at any
        # moment leaves either the old log or the new one, never an emptied one.
        with atomic.replacing(self.path, newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(kept)
        self._file = self.path.open("a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)

    def write(self, row: dict) -> None:
        self._writer.writerow([csv_cell(row.get(c)) for c in self.columns])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def git_commit() -> str | None:
    """The commit of the fvlm source tree (with `-dirty` when it has local changes), if it is a repo."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


class Wandb:
    """Mirrors the CSV rows to wandb. Imported only when enabled; offline mode needs no network."""

    def __init__(
        self, mode: str, project: str, run_dir: Path, run_id: str, config_hash: str, config: dict, resume: bool
    ):
        try:
            import wandb
        except ImportError:
            raise UsageError(f"train.wandb={mode} needs the wandb package (pip install 'fvlm[wandb]')") from None
        if mode == "offline":
            os.environ["WANDB_MODE"] = "offline"
        self._run = wandb.init(
            project=project,
            name=run_id,
            id=f"{run_id}-{config_hash}",
            dir=str(run_dir),
            config=config,
            mode=mode,
            resume="allow" if resume else None,
        )

    def log(self, row: dict, prefix: str) -> None:
        values = {f"{prefix}/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        self._run.log(values, step=row["step"])

    def close(self) -> None:
        self._run.finish()


class Progress:
    """A tqdm bar on a terminal; otherwise one plain line per logged step (for log files)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled = enabled
        self.total = total
        self.bar = None
        self.started = time.perf_counter()
        self.initial = initial
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, row: dict | None) -> None:
        """Called every step; `row` is the steps.csv row on logged steps."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if row is not None:
                self.bar.set_postfix(
                    loss=f"{row['train_loss']:.4f}", samples_s=f"{row['throughput_samples_sec']:.1f}", refresh=False
                )
            return
        if row is not None:
            done = step - self.initial
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(done, 1) * (self.total - step)
            print(
                f"step {step}/{self.total} | loss {row['train_loss']:.4f} | "
                f"{row['throughput_samples_sec']:.1f} samples/s | eta {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
