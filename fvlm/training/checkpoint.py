"""Checkpoints: `<run>/checkpoints/step_NNNNNNN/`, written atomically and pruned to the last k + best.

A checkpoint holds the `save_model` files (so `fvlm.model.build.load_model` opens it directly), the
optimizer state, the trainer state (step, samples seen, wall time, divergence tracker), one
`rank_R.pt` per DDP rank (RNG states and data cursor: both differ by rank) and `meta.json`.
Everything is written into a hidden temporary folder that is renamed into place last, so a crash
mid-write leaves either the previous checkpoint or a complete new one; `meta.json` is written last
inside it, and a folder without it is never read.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from fvlm.errors import UsageError
from fvlm.model.build import CONFIG_FILE, MODEL_FILE, save_model
from fvlm.training.dist import Dist

CHECKPOINTS = "checkpoints"
META = "meta.json"
OPTIMIZER = "optimizer.pt"
TRAINER = "trainer.pt"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    for folder in root.glob("step_*") if root.is_dir() else []:
        if (folder / META).is_file() and folder.name[5:].isdigit():
            found.append((int(folder.name[5:]), folder))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_weights(path: str) -> Path:
    """`train.init_from`: a checkpoint folder, or a run folder (its latest complete checkpoint)."""
    folder = Path(path).expanduser()
    if (folder / MODEL_FILE).is_file() and (folder / CONFIG_FILE).is_file():
        return folder
    if folder.is_dir():
        latest = latest_checkpoint(folder)
        if latest is not None:
            return latest
        raise UsageError(f"train.init_from: {folder} holds no complete checkpoint")
    raise UsageError(f"train.init_from: no such run or checkpoint folder: {folder}")


def rng_state() -> dict:
    """Every RNG's state as tensors and plain Python values only, so that it loads with
    `torch.load(weights_only=True)`: numpy's key array becomes a tensor."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                    int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy()
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_json(path: Path, obj) -> None:
    """Replace-by-rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(json.dumps(obj, indent=1, default=str))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, kill) leaves no temporary file behind
        raise


def _torch_save(obj, path: Path) -> None:
    """torch.save, with a failed write (disk full, file size limit) raised as the OSError it is:
    PyTorch's zip writer reports one as a RuntimeError about stream positions."""
    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        if "unexpected pos" not in str(exc) and "file write failed" not in str(exc):
            raise
        raise OSError(errno.EIO, "write failed (is the disk full, or a file size limit reached?)", str(path)) from exc


def save_checkpoint(run_dir: Path, step: int, dist: Dist, *, model, tokenizer, optimizer,
                    trainer_state: dict, rank_state: dict, meta: dict) -> Path:
    """Collective: every rank calls it (each writes its own rank file); rank 0 writes the rest."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / step_name(step)
    tmp = root / f".tmp_{step_name(step)}"
    if dist.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    _torch_save(rank_state, tmp / f"rank_{dist.rank}.pt")
    if dist.is_main:
        save_model(model, tmp, tokenizer)
        _torch_save(optimizer.state_dict(), tmp / OPTIMIZER)
        _torch_save(trainer_state, tmp / TRAINER)
    dist.barrier()
    if dist.is_main:
        write_json(tmp / META, meta)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    dist.barrier()
    return final


class ProcessCountMismatch(UsageError):
    """A readable checkpoint written by another number of processes: every older one is too."""


def _numpy_array_globals() -> list:
    """What numpy arrays pickle into: checkpoints written before the RNG state went to tensors hold
    numpy's key array. Allowing these rebuilds arrays and dtypes, and nothing that can run code."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_data(path: Path):
    """A checkpoint file's tensors and plain containers, and nothing else: a file that asks to build
    any other object (which is how a pickle runs code) is refused with a one-line error. Run folders
    travel between people and clusters; loading one must never execute what it holds."""
    import pickle

    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        detail = next((line.strip() for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else "")
        raise UsageError(f"{path}: refused to load: it holds more than tensors and plain data ({detail[:160]})") from None


def load_checkpoint(folder: Path, dist: Dist, *, model, optimizer) -> tuple[dict, dict, dict]:
    """Restores weights and optimizer in place; returns (trainer state, this rank's state, meta)."""
    from safetensors.torch import load_model as load_safetensors

    rank_file = folder / f"rank_{dist.rank}.pt"
    if not rank_file.is_file():
        raise ProcessCountMismatch(f"{folder}: written by a run with a different number of processes "
                         f"(no {rank_file.name}); resume with the same number")
    load_safetensors(model, str(folder / MODEL_FILE), device=str(next(model.parameters()).device))
    optimizer.load_state_dict(load_data(folder / OPTIMIZER))
    trainer_state = load_data(folder / TRAINER)
    rank_state = load_data(rank_file)
    meta = json.loads((folder / META).read_text())
    return trainer_state, rank_state, meta


def prune_checkpoints(run_dir: Path, keep_last: int, also_keep: set[int]) -> None:
    """Keeps the newest `keep_last` complete checkpoints and those of `also_keep` (the best, the
    milestones); removes stale temporaries."""
    found = complete_checkpoints(run_dir)
    keep = {step for step, _ in found[-keep_last:]} | also_keep
    for step, folder in found:
        if step not in keep:
            shutil.rmtree(folder)
    for stale in (Path(run_dir) / CHECKPOINTS).glob(".tmp_step_*"):
        shutil.rmtree(stale)
