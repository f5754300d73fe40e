"""Evaluations the decision framework needs beyond the training curves, called as Python functions:

- `evaluate_sources(run_dir)`: the validation loss of a run's last checkpoint, sample by sample,
  in the model's default mode, with each sample's kind (video, image, text). A8 is judged on the
  image samples and D1 on the video and image samples separately, paired on the same samples
  (<run>/eval/sources.json).
- `evaluate_phase1b(scaling_dir)`: the plan's item 12 and Fig 7: the best Phase 1b run (lowest
  best val loss among the foveated grid cells), its best checkpoint and every kept milestone, in all
  three inference modes, with the benchmark when there is one (<run>/eval/eval.json, with the
  paired differences between modes and between checkpoints).

Both skip what is already done and report a failure instead of raising it: the report then names
the evaluation as missing.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from fvlm import atomic
from fvlm import run_folder as rf
from fvlm.errors import parse_json


def _readable_json(path: Path) -> dict[str, Any] | None:
    """An earlier result of this module, or None when it cannot be read (then it is made again)."""
    try:
        data = parse_json(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_sources(
    run_dir: Path,
    *,
    max_samples: int = 0,
    batch_size: int = 8,
    device: str | None = None,
    log: Callable[[str], None] = print,
) -> Path | None:
    """<run>/eval/sources.json: {step, mode, keys, kinds, loss_sum, tokens} of the run's latest
    checkpoint on its validation split; None when the run has no complete checkpoint."""
    import torch

    from fvlm.data.loader import build_loader
    from fvlm.errors import UsageError
    from fvlm.eval.evaluate import find_checkpoints, run_config, sample_losses
    from fvlm.model.backbones import model_pixel_stats
    from fvlm.model.build import load_model

    out = rf.sources_file(run_dir)
    try:
        ckpt = find_checkpoints(run_dir)[-1]
    except UsageError:
        return None
    if out.is_file() and (_readable_json(out) or {}).get("step") == ckpt.step:
        return out
    device = device or _device()
    model, tokenizer = load_model(ckpt.folder, device=device)
    model.eval()
    cfg = run_config(ckpt, model.cfg, [])
    mode = model.supported_modes[-1] if "coarse_fine" not in model.supported_modes else "coarse_fine"
    loader = build_loader(
        cfg,
        "val",
        tokenizer,
        train=False,
        batch_size=batch_size,
        max_samples=max_samples or None,
        pixel_stats=model_pixel_stats(model),
    )
    with torch.no_grad():
        per_sample = sample_losses(model, loader, (mode,), device, blank_control=False)
    arrays = per_sample["modes"][mode]
    record = {
        "run_id": cfg.run_id,
        "step": ckpt.step,
        "mode": mode,
        "keys": per_sample["keys"],
        "kinds": per_sample["kinds"],
        "loss_sum": arrays["loss_sum"].tolist(),
        "tokens": arrays["tokens"].tolist(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, record)
    log(f"[sources] {cfg.run_id} step {ckpt.step}: per-sample val loss ({mode}) -> {out}")
    return out


def evaluate_sources_of(
    folder: Path, run_ids: tuple[str, ...], log: Callable[[str], None] = print, **kwargs: Any
) -> dict[str, str]:
    """`evaluate_sources` for the named runs of a sweep folder that exist; {run: why} for failures."""
    failed = {}
    for run_id in run_ids:
        run_dir = Path(folder) / run_id
        if not run_dir.is_dir():
            continue
        try:
            evaluate_sources(run_dir, log=log, **kwargs)
        except Exception as exc:  # noqa: BLE001  (reported; the decision then names the input as missing)
            failed[run_id] = f"{type(exc).__name__}: {exc}"
            log(f"[sources] {run_id}: evaluation failed ({failed[run_id]})")
    return failed


def best_phase1b_run(scaling_dir: Path) -> tuple[Path, int] | None:
    """(run folder, its best step) of the foveated grid cell with the lowest best val loss."""
    best = None
    for summary_path in sorted(Path(scaling_dir).glob("*-C*-F/run_summary.json")):
        try:
            summary = parse_json(summary_path.read_bytes())
        except (OSError, ValueError):
            continue
        if not isinstance(summary, dict):
            continue
        loss, step = summary.get("best_val_loss"), summary.get("best_val_step")
        if summary.get("status") != "completed" or not isinstance(loss, (int, float)) or not isinstance(step, int):
            continue
        if best is None or loss < best[0]:
            best = (loss, summary_path.parent, step)
    return (best[1], best[2]) if best else None


def evaluate_phase1b(
    scaling_dir: Path,
    bench: Path | None = None,
    *,
    max_samples: int = 0,
    batch_size: int = 8,
    device: str | None = None,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> Path | None:
    """The best Phase 1b run's best checkpoint and every kept milestone in all three modes
    (milestones are evaluation steps, so the best one is among them when it was kept). On the CPU
    `jobs` checkpoints are evaluated side by side, each in a spawned one-thread process."""
    from fvlm.eval.evaluate import find_checkpoints, write_results

    found = best_phase1b_run(scaling_dir)
    if found is None:
        log("[phase1b eval] no completed foveated grid cell: the three-mode evaluation is skipped")
        return None
    run_dir, best_step = found
    out = rf.eval_dir(run_dir)
    checkpoints = find_checkpoints(run_dir, all_checkpoints=True)
    steps = [c.step for c in checkpoints]
    done = _readable_json(out / rf.EVAL_JSON) if (out / rf.EVAL_JSON).is_file() else None
    if done is not None:
        if [e.get("step") if isinstance(e, dict) else None for e in done.get("steps", [done])] == steps:
            return out / rf.EVAL_JSON
    device = device or _device()
    evaluate = partial(_milestone_entry, bench=bench, max_samples=max_samples, batch_size=batch_size, device=device)
    if jobs > 1 and device == "cpu" and len(checkpoints) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from fvlm.experiments.evidence import one_thread

        # The checkpoints are independent: one spawned one-thread process per core (a tiny model's
        # evaluation gains nothing from a second thread; 6 milestones took ~48 s on one core).
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(jobs, len(checkpoints)), mp_context=context, initializer=one_thread) as pool:
            entries = list(pool.map(evaluate, checkpoints))
    else:
        entries = [evaluate(ckpt) for ckpt in checkpoints]
    for ckpt, entry in zip(checkpoints, entries, strict=True):
        entry["milestone"] = True
        entry["best"] = ckpt.step == best_step
    path = write_results(entries, out)
    log(
        f"[phase1b eval] {run_dir.name}: steps {', '.join(map(str, steps))} (best {best_step}) in "
        f"{', '.join(entries[-1]['modes']) or 'no'} modes -> {path}"
    )
    return path


def _milestone_entry(ckpt, *, bench: Path | None, max_samples: int, batch_size: int, device: str) -> dict[str, Any]:
    """One checkpoint of `evaluate_phase1b` in every mode (a module-level function: it runs in worker processes)."""
    from fvlm.eval.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(
        ckpt,
        modes=None,
        data=None,
        benches=[str(bench)] if bench else [],
        overrides=[],
        max_samples=max_samples,
        batch_size=batch_size,
        device=device,
        score="mean",
        log=lambda _text: None,
    )


def phase1b_step(
    preset, scaling_dir: Path, base: dict[str, Any], log: Callable[[str], None] = print, jobs: int = 1
) -> None:
    """`evaluate_phase1b` as `fvlm phase1` runs it after the grid: the synthetic benchmark beside the
    validation split when there is one, the preset's eval sample count on the tiny preset; a
    failure is logged and the report goes on without the evaluation."""
    val = base.get("data.val")
    bench = Path(str(val)).parent / "bench" if val else None
    samples = int(preset.overrides.get("train.eval_samples", 64)) if preset.name == "tiny" else 0
    try:
        evaluate_phase1b(
            scaling_dir,
            bench if bench is not None and bench.is_dir() else None,
            max_samples=samples,
            jobs=jobs,
            log=log,
        )
    except Exception as exc:  # noqa: BLE001  (reported; the report names the evaluation as missing)
        log(f"[phase1b eval] failed ({type(exc).__name__}: {exc}); the report goes on without it")
