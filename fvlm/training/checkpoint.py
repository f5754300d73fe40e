"""Checkpoints: `<run>/checkpoints/step_NNNNNNN/`, written atomically and pruned to the last k + best.

A checkpoint holds the `save_model` files (so `fvlm.model.build.load_model` opens it directly) and
`meta.json`. A resume checkpoint also holds the training state: the optimizer state, the trainer
state (step, samples seen, wall time, divergence tracker) and one `rank_R.pt` per DDP rank (RNG
states and data cursor: both differ by rank). The optimizer state is twice the size of the weights,
so only the newest `keep_last` checkpoints keep it: milestones and the best checkpoint, kept for
evaluation, keep their weights only. Milestones fall on evaluation steps (`milestone_steps`), so
every checkpoint kept for the data-scaling curves has its row in metrics.csv. Resuming only ever
picks a checkpoint with its training state.
Everything is written into a hidden temporary folder that is renamed into place last, so a crash
mid-write leaves either the previous checkpoint or a complete new one; `meta.json` is written last
inside it, and a folder without it is never read.
"""

from __future__ import annotations

import errno
import importlib
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fvlm.errors import UsageError, read_json
from fvlm.model.build import save_model
from fvlm.run_folder import (
    META,
    MODEL_FILE,
    OPTIMIZER,
    TRAINER,
    checkpoint_folder,
    complete_checkpoints,
    is_model_folder,
    latest_checkpoint,
    rank_file,
    rank_files,
    resume_checkpoints,
    unfinished_checkpoints,
    write_json,
)
from fvlm.training.dist import Dist

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from fvlm.model.vlm import VLMBase
    from fvlm.training.engine import Engine


def eval_steps(total_steps: int, eval_every: int) -> list[int]:
    """The steps a run evaluates at: every multiple of eval_every, and the last step."""
    return sorted(set(range(eval_every, total_steps + 1, eval_every)) | {total_steps}) if total_steps > 0 else []


def milestone_steps(total_steps: int, eval_every: int, n: int) -> set[int]:
    """The `n` checkpoints kept for the plan's intermediate evaluation (data-scaling curves): for
    each k = 1..n, the evaluation step nearest to total_steps * k / n (the later one on a tie).
    Only evaluation steps qualify, so a kept milestone always has its evaluation; when the run
    evaluates fewer than n times, every evaluation step is a milestone."""
    candidates = eval_steps(total_steps, eval_every)
    if not n or not candidates:
        return set()
    return {min(candidates, key=lambda s: (abs(s - total_steps * k / n), -s)) for k in range(1, n + 1)}


def resolve_weights(path: str) -> Path:
    """`train.init_from`: a checkpoint folder, or a run folder (its latest complete checkpoint)."""
    folder = Path(path).expanduser()
    if is_model_folder(folder):
        return folder
    if folder.is_dir():
        latest = latest_checkpoint(folder)
        if latest is not None:
            return latest
        raise UsageError(f"train.init_from: {folder} holds no complete checkpoint")
    raise UsageError(f"train.init_from: no such run or checkpoint folder: {folder}")


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain Python values only, so that it loads with
    `torch.load(weights_only=True)`: numpy's key array becomes a tensor."""
    # legacy=True is the default; numpy's stubs type the call without it as returning the dict form.
    legacy = np.random.get_state(legacy=True)
    assert isinstance(legacy, tuple)  # the global generator is MT19937, whose legacy state is this tuple
    kind, keys, pos, has_gauss, cached = legacy
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy()
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_save(obj: object, path: Path) -> None:
    """torch.save, with a failed write (disk full, file size limit) raised as the OSError it is:
    PyTorch's zip writer reports one as a RuntimeError about stream positions."""
    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        if "unexpected pos" not in str(exc) and "file write failed" not in str(exc):
            raise
        raise OSError(errno.EIO, "write failed (is the disk full, or a file size limit reached?)", str(path)) from exc


def save_checkpoint(
    run_dir: Path,
    step: int,
    dist: Dist,
    *,
    model: VLMBase,
    tokenizer: PreTrainedTokenizerBase | None,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict[str, Any] | None = None,
    rank_state: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Collective: every rank calls it (each writes its own rank file); rank 0 writes the rest.
    Without an optimizer (or its `optimizer_state`) it writes the weights only (a milestone, for
    evaluation). `weights`, when given, are the model's full state dict (gathered from FSDP2
    shards), written in place of the module's own."""
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()
    final = checkpoint_folder(run_dir, step)
    tmp = final.with_name(f".tmp_{final.name}")
    if dist.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    if optimizer_state is not None:
        _torch_save(rank_state, rank_file(tmp, dist.rank))
    if dist.is_main:
        save_model(model, tmp, tokenizer, state_dict=weights)
        if optimizer_state is not None:
            _torch_save(optimizer_state, tmp / OPTIMIZER)
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


def _numpy_array_globals() -> list[Any]:
    """What numpy arrays pickle into: checkpoints written before the RNG state went to tensors hold
    numpy's key array. Allowing these rebuilds arrays and dtypes, and nothing that can run code."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_data(path: Path) -> Any:
    """A checkpoint file's tensors and plain containers, and nothing else: a file that asks to build
    any other object (which is how a pickle runs code) is refused with a one-line error. Run folders
    travel between people and clusters; loading one must never execute what it holds."""
    import pickle

    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        detail = next(
            (line.strip() for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else ""
        )
        raise UsageError(
            f"{path}: refused to load: it holds more than tensors and plain data ({detail[:160]})"
        ) from None


def load_checkpoint(
    folder: Path, dist: Dist, *, model: VLMBase, optimizer: torch.optim.Optimizer, engine: Engine | None = None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Restores weights and optimizer in place; returns (trainer state, this rank's state, meta).
    With an FSDP2 `engine` the full weights and optimizer state are loaded into its shards."""
    from safetensors.torch import load_file
    from safetensors.torch import load_model as load_safetensors

    own_rank = rank_file(folder, dist.rank)
    if not own_rank.is_file():
        raise ProcessCountMismatch(
            f"{folder}: written by a run with a different number of processes "
            f"(no {own_rank.name}); resume with the same number"
        )
    if engine is not None and engine.sharded:
        engine.load_model_state(load_file(folder / MODEL_FILE))
        engine.load_optimizer_state(optimizer, load_data(folder / OPTIMIZER))
    else:
        load_safetensors(model, str(folder / MODEL_FILE), device=str(next(model.parameters()).device))
        optimizer.load_state_dict(load_data(folder / OPTIMIZER))
    trainer_state = load_data(folder / TRAINER)
    rank_state = load_data(own_rank)
    meta = read_json(folder / META)
    return trainer_state, rank_state, meta


def drop_training_state(folder: Path) -> None:
    """Leaves a checkpoint its weights only. The optimizer state goes first: from then on resuming
    passes the checkpoint by, whether or not the small files after it are gone too."""
    (folder / OPTIMIZER).unlink(missing_ok=True)
    for path in [folder / TRAINER, *rank_files(folder)]:
        path.unlink(missing_ok=True)


def prune_checkpoints(run_dir: Path, keep_last: int, also_keep: set[int]) -> None:
    """Keeps the newest `keep_last` resume checkpoints whole, and the weights of those in `also_keep`
    (the best, the milestones); removes the rest and stale temporaries."""
    resume_points = {step for step, _ in resume_checkpoints(run_dir)[-keep_last:]}
    for step, folder in complete_checkpoints(run_dir):
        if step not in resume_points | also_keep:
            shutil.rmtree(folder)
        elif step not in resume_points:
            drop_training_state(folder)
    for stale in unfinished_checkpoints(run_dir):
        shutil.rmtree(stale)
