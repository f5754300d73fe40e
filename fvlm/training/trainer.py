"""One training run, read top to bottom: setup, the step loop, evaluation points, the summary.

How losses combine. The model returns a token mean per micro-batch. A step's objective is the mean
over every target token of every micro-batch on every rank, so each micro-batch is backpropagated
as a token *sum* (mean x count), the gradients are summed over ranks, and divided once by the
step's all-reduced token count. This is what makes 2 processes x k micro-batches equal 1 process x
2k micro-batches: no micro-batch is over- or under-weighted by how many answer tokens it happens
to hold, and a micro-batch with none contributes nothing (rather than a NaN).

Exactness of resume. Weights, optimizer, the step (the LR schedule is a pure function of it), the
divergence tracker, RNG states and the data cursor are all checkpointed. Data loading and evaluation
run inside `torch.random.fork_rng`, so the global RNG stream the model sees does not depend on when
a loader iterator was (re)created or whether an evaluation happened in this process.
"""

from __future__ import annotations

import fcntl
import json
import math
import pickle
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypedDict

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors

from fvlm import run_folder as rf
from fvlm.config import RunConfig
from fvlm.data.loader import build_loader, split_path
from fvlm.errors import UsageError
from fvlm.model.build import build_model, build_tokenizer, compile_model
from fvlm.model.flops import estimate_flops
from fvlm.model.vlm import Batch
from fvlm.training import checkpoint as ckpt
from fvlm.training import precision as prec
from fvlm.training.dist import Dist, init_distributed, shutdown
from fvlm.training.divergence import DivergenceGuard
from fvlm.training.engine import Engine, target_tokens
from fvlm.training.evaluate import save_probe_attention, to_device, validate
from fvlm.training.logs import CsvLog, Progress, Wandb, git_commit
from fvlm.training.optim import GROUPS, apply_lrs, build_optimizer, group_lrs
from fvlm.training.throughput import Interval, peak_flops

# convergence_step: the first eval point within this relative distance of the best val loss.
CONVERGENCE_TOLERANCE = 0.01
GIB = 2**30
# A signal's handler as `signal.signal` takes and returns it.
SignalHandler = Callable[[int, FrameType | None], Any] | int | None


class ParamCounts(TypedDict):
    total: int
    trainable: int
    by_group: dict[str, int]


def train(cfg: RunConfig) -> dict[str, Any]:
    """Runs (or resumes, or reports the already finished) run of `cfg`; returns its run summary."""
    trainer_class: type[Trainer] = Trainer
    if cfg.train.dpo.enabled:
        from fvlm.training.dpo import DPOTrainer  # imports this module

        trainer_class = DPOTrainer
    dist = init_distributed()
    try:
        with _run_lock(cfg.run_dir, dist.is_main):
            return trainer_class(cfg, dist).run()
    finally:
        shutdown(dist)


@contextmanager
def _run_lock(run_dir: Path, take: bool) -> Iterator[None]:
    """One training process per run folder: a second `fvlm train` on it (which would interleave its
    logs and checkpoints with the first's) is refused at once. The lock is an flock on
    <run>/.train.lock (rf.TRAIN_LOCK), released when the process ends, however it ends."""
    if not take:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / rf.TRAIN_LOCK, "w")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UsageError(f"{run_dir}: another fvlm train is running on this run folder") from None
        yield
    finally:
        handle.close()


def planned_steps(cfg: RunConfig, world_size: int) -> int:
    t = cfg.train
    if not t.max_steps and not t.max_samples:
        raise UsageError("set train.max_steps or train.max_samples (both are 0)")
    per_step = t.batch_size * t.grad_accum * world_size
    from_samples = -(-t.max_samples // per_step) if t.max_samples else None
    return min(s for s in (t.max_steps or None, from_samples) if s)


def load_init_weights(model: torch.nn.Module, folder: Path) -> None:
    """train.init_from's weights (a checkpoint or model folder) into `model`."""
    try:
        load_safetensors(model, str(folder / rf.MODEL_FILE))
    except (RuntimeError, OSError, SafetensorError) as exc:
        raise UsageError(f"train.init_from: {folder} does not fit this model ({str(exc).splitlines()[0]})") from None


@dataclass
class StepTally:
    """One step's totals on one rank, summed over ranks (`Dist.sum_tally`) before they are used.
    Losses are token sums (mean x tokens): divided by the summed token count they give the mean over
    every target token of the step. The loss sums are device tensors in the base trainer (summed on
    the device, read only when a step is logged or saved: `Trainer._settle`), numbers otherwise."""

    tokens: float = 0.0
    loss_sum: float | torch.Tensor = 0.0
    fine_sum: float | torch.Tensor = 0.0  # loss_fine x tokens, over the micro-batches that measured it
    fine_tokens: float = 0.0
    coarse_sum: float | torch.Tensor = 0.0
    coarse_tokens: float = 0.0
    samples: float = 0.0
    frames: float = 0.0
    text_tokens: float = 0.0
    out_of_memory: float = 0.0  # 1 on a rank where a micro-batch ran out of memory
    stop: float = 0.0  # 1 on a rank asked to stop (SIGTERM, Ctrl-C)


@dataclass
class Pending:
    """A step taken whose numbers have not been read yet (see `Trainer._settle`)."""

    step: int
    tally: StepTally
    grad_norm: torch.Tensor


@dataclass
class Settled:
    """The numbers of the newest settled step."""

    train_loss: float
    grad_norm: float
    loss_fine: float | None
    loss_coarse: float | None


def own_gradients(params: list[torch.nn.Parameter]) -> None:
    """Moves gradients out of a CUDA graph's memory: a parameter's first gradient of a step is the
    captured backward's output, which the next replay would overwrite before the optimizer reads it
    (one multi-tensor copy; later micro-batches add into the copy)."""
    holders, grads = [], []
    for param in params:
        if param.grad is not None:
            holders.append(param)
            grads.append(param.grad)
    if grads:
        for param, copy in zip(holders, torch._foreach_mul(grads, 1.0)):
            param.grad = copy


def _parse_row(row: dict[str, str]) -> dict[str, Any]:
    """A CSV row back to numbers (empty cells are unmeasured values)."""
    parsed: dict[str, float | None] = {k: (float(v) if v else None) for k, v in row.items() if k != "run_id"}
    step = parsed["step"]
    assert step is not None  # every row has its step
    parsed["step"] = int(step)
    return {"run_id": row["run_id"], **parsed}


class Trainer:
    # Columns a subclass adds to steps.csv after rf.STEP_COLUMNS (filled by `_step_extras`).
    extra_step_columns: tuple[str, ...] = ()

    def __init__(self, cfg: RunConfig, dist: Dist):
        self.cfg = cfg
        self.dist = dist
        self.run_dir = cfg.run_dir
        self.total_steps = planned_steps(cfg, dist.world_size)
        # The plan's intermediate checkpoints (data-scaling curves): evaluation steps, never pruned.
        self.milestones = ckpt.milestone_steps(self.total_steps, cfg.train.eval_every, cfg.train.keep_milestones)
        self.precision = self._precision()  # fp32, bf16 (bf16 weights, fp32 masters) or bf16-autocast
        self.bf16 = self.precision != "fp32"
        self.masters: prec.MasterWeights | None = None
        self.resume_from, self.finished = self._inspect_run_dir()
        self.step = 0
        self.samples_seen = 0
        # Totals over the run for the FLOP estimate: frames, text tokens and target tokens seen.
        self.seen = {"frames": 0, "text_tokens": 0, "loss_tokens": 0}
        self.seen_at_start, self.samples_at_start = dict(self.seen), 0  # where this session began
        self.wall_time_before = 0.0
        self.divergence = DivergenceGuard(cfg.train.divergence_factor)
        self.skipped_steps = 0
        self._pending: list[Pending] = []  # steps taken, their losses not read yet
        self.best: dict[str, Any] = {}  # the metrics row of the best evaluation so far
        self.history: list[dict[str, Any]] = []  # the metrics rows of this run
        self.last_row: dict[str, Any] | None = None  # the latest steps.csv row
        self.saved_meta: dict[str, Any] = {}
        self.last_saved_step = -1
        self.last_eval_step = -1
        self.stop_requested = False
        # "train" includes "data_wait", the time steps spent waiting for their batches.
        self.timing = {"train": 0.0, "data_wait": 0.0, "eval": 0.0, "checkpoint": 0.0, "log": 0.0}
        cuda = self.dist.device.type == "cuda"
        self.device_name = torch.cuda.get_device_name(self.dist.device) if cuda else "cpu"
        self.peak_flops, self.peak_source = peak_flops(
            cfg.train.peak_flops, self.device_name if cuda else None, self.bf16
        )
        if self.finished is not None:
            return
        self._setup()

    # ------------------------------------------------------------------ setup
    def _precision(self) -> str:
        cuda = self.dist.device.type == "cuda"
        if not cuda and self.cfg.train.cpu_threads:
            torch.set_num_threads(self.cfg.train.cpu_threads)
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return prec.resolve(self.cfg.train.precision, self.dist.device)

    def autocast(self) -> AbstractContextManager[Any]:
        return prec.autocast(self.precision, self.dist.device)

    def _fp32_view(self) -> AbstractContextManager[Any]:
        """The model with fp32 weights, for saving and loading them (the masters under bf16)."""
        return self.masters.fp32_view() if self.masters is not None else nullcontext()

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters is not None:
            self.masters.zero_grad()

    def _inspect_run_dir(self) -> tuple[Path | None, dict[str, Any] | None]:
        """(checkpoint to resume from, summary of a run that already finished)."""
        changed = rf.settings_changed(self.run_dir, self.cfg)
        if changed is None:
            return None, None
        if changed:
            raise UsageError(
                f"{self.run_dir} holds a run with different settings ({', '.join(changed)}); "
                "choose another run_id or out_dir"
            )
        # A run killed before its first resume checkpoint (after a milestone) starts over.
        resumable = rf.resume_checkpoints(self.run_dir)
        latest = resumable[-1][1] if resumable else None
        if latest is not None:
            try:
                summary = rf.read_summary(self.run_dir, strict=True)
            except UsageError as exc:
                # Rewritten at the end of this session: an unreadable one only means "not finished".
                if self.dist.is_main:
                    print(f"fvlm: {exc}; resuming as an unfinished run", flush=True)
                return latest, None
            if summary is None:
                return latest, None
            done = summary.get("status") == "diverged" or (
                summary.get("status") == "completed" and summary.get("total_steps", 0) >= self.total_steps
            )
            if done:
                return latest, summary
        return latest, None

    def _setup(self) -> None:
        cfg, dist = self.cfg, self.dist
        init_weights = None
        if cfg.train.init_from and self.resume_from is None:
            init_weights = ckpt.resolve_weights(cfg.train.init_from)  # before any slow work: a typo fails fast
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if dist.is_main:
            for split in ("train", "val", "probe"):
                split_path(cfg, split)  # generates the synthetic set once, before other ranks look
        dist.barrier()
        self.tokenizer = build_tokenizer(cfg.model)
        # Data paths are checked (and indexed) before the model is built: a bad path fails in seconds.
        self.train_loader = self._train_loader()
        build_loader(cfg, "val", self.tokenizer, train=False)
        if cfg.train.probe_videos:
            build_loader(cfg, "probe", self.tokenizer, train=False)
        self.model = build_model(cfg.model)
        if init_weights is not None:
            self._load_init_weights(init_weights)
        self.model.to(dist.device)
        # DDP or FSDP2 over several processes. FSDP2 replaces the parameters by shards, so the
        # parameter lists and the optimizer are taken after it.
        self.engine = Engine(self.model, dist, cfg.train.distributed)
        groups = self.model.param_groups()
        self.trainable = [p for params in groups.values() for p in params]
        self.trainable_groups = {name for name, params in groups.items() if params}
        if self.precision == "bf16":
            if self.engine.sharded:
                # FSDP2 shards the parameters as DTensors; masters of them are not built (its own
                # MixedPrecisionPolicy would be the way there).
                raise UsageError(
                    "train.precision=bf16 (bf16 weights, fp32 masters) does not combine with"
                    " train.distributed=fsdp yet; use train.precision=bf16-autocast or fp32"
                )
            self.masters = prec.MasterWeights(self.model, self.trainable)
        # What the optimizer updates, and where its gradients are: the parameters, or their masters.
        self.optimized = self.masters.masters if self.masters is not None else list(self.trainable)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.masters)
        self._build_loader = build_loader
        if self.resume_from is not None:
            self._restore_newest_readable()
        if cfg.train.compile:
            if dist.device.type == "cuda":
                compile_model(self.model, cuda_graphs=cfg.train.cuda_graphs)
            elif dist.is_main:
                print(
                    f"fvlm: train.compile{' and train.cuda_graphs are' if cfg.train.cuda_graphs else ' is'} ignored on CPU",
                    flush=True,
                )
        self.model.train()
        self._open_outputs()

    def _train_loader(self) -> Any:
        return build_loader(
            self.cfg,
            "train",
            self.tokenizer,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            pin_memory=self.dist.device.type == "cuda",  # with to_device's non_blocking copy
        )

    def _load_init_weights(self, folder: Path) -> None:
        load_init_weights(self.model, folder)

    def _restore_newest_readable(self) -> None:
        """Resumes from the newest complete checkpoint that reads back whole, saying which newer ones
        were passed over and why: a damaged latest checkpoint (truncated weights, a garbage state
        file, a refused pickle) costs the steps since the one before it, not the run."""
        readable_errors = (
            UsageError,
            OSError,
            RuntimeError,
            ValueError,
            KeyError,
            EOFError,
            TypeError,
            pickle.UnpicklingError,
            json.JSONDecodeError,
            SafetensorError,
        )
        skipped = []
        for _, folder in reversed(rf.resume_checkpoints(self.run_dir)):
            try:
                self._restore(folder)
            except ckpt.ProcessCountMismatch:
                raise
            except readable_errors as exc:
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                skipped.append(f"{folder.name} ({reason})")
                if self.dist.is_main:
                    print(f"fvlm: checkpoint {folder} is unreadable, trying the one before it: {reason}", flush=True)
                continue
            self.resume_from = folder
            return
        raise UsageError(
            f"{self.run_dir}: no readable checkpoint to resume from ({'; '.join(skipped)}); "
            "move the run folder aside to start over"
        )

    def _restore(self, folder: Path) -> None:
        with self._fp32_view():
            trainer_state, rank_state, meta = ckpt.load_checkpoint(
                folder, self.dist, model=self.model, optimizer=self.optimizer, engine=self.engine
            )
        if meta.get("world_size", 1) != self.dist.world_size:
            raise ckpt.ProcessCountMismatch(
                f"{folder} was written by {meta.get('world_size')} processes; resume with as many"
            )
        self.step = trainer_state["step"]
        self.samples_seen = trainer_state["samples_seen"]
        self.seen = trainer_state["seen"]
        self.wall_time_before = trainer_state["wall_time_sec"]
        self.divergence.load_state_dict(trainer_state.get("divergence", trainer_state))
        self.skipped_steps = trainer_state["skipped_steps"]
        self.best = meta.get("best") or {}
        self.saved_meta = meta
        self.last_saved_step = self.step
        if meta.get("evaluated_step") == self.step:
            self.last_eval_step = self.step  # its evaluation finished too: resuming must not repeat it
        self.train_loader.load_state_dict(rank_state["data"])
        ckpt.set_rng_state(rank_state["rng"])

    def _open_outputs(self) -> None:
        cfg = self.cfg
        self.steps_log: CsvLog | None = None
        self.metrics_log: CsvLog | None = None
        self.wandb: Wandb | None = None
        self.progress = Progress(self.total_steps, self.step, enabled=self.dist.is_main)
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.train.wandb != "off":
            self.wandb = Wandb(
                cfg.train.wandb,
                cfg.train.wandb_project,
                self.run_dir,
                cfg.run_id,
                cfg.config_hash(),
                cfg.to_dict(),
                resume=self.resume_from is not None,
            )
        rf.write_config(self.run_dir, cfg)
        keep = self.step if self.resume_from is not None else None
        self.steps_log = CsvLog(self.run_dir / rf.STEPS, rf.STEP_COLUMNS + self.extra_step_columns, keep)
        # A checkpoint whose evaluation never finished is evaluated again before training goes on; a
        # row of that step already in metrics.csv (whole or cut off by the kill) is dropped first.
        self.metrics_log = CsvLog(
            self.run_dir / rf.METRICS,
            rf.METRIC_COLUMNS,
            keep - 1 if keep is not None and self._eval_pending() else keep,
        )
        for log in (self.steps_log, self.metrics_log):
            if log.damaged_lines:
                print(f"fvlm: {log.path}: dropped {log.damaged_lines} line(s) that are not UTF-8 text", flush=True)
        self.history = [_parse_row(row) for row in self.metrics_log.kept_rows]
        if self.steps_log.kept_rows:
            self.last_row = _parse_row(self.steps_log.kept_rows[-1])
        self._print_plan()

    def _print_plan(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        params = self._param_counts()
        lines = [
            f"fvlm train: {self.run_dir} ({'resuming at step ' + str(self.step) if self.step else 'new run'})",
            f"  device {self.dist.device} x{self.dist.world_size}, {self._precision_name()}",
            f"  params {params['total']:,} total, {params['trainable']:,} trainable; "
            + ", ".join(f"{g} {n:,}" for g, n in params["by_group"].items()),
            f"  {self.total_steps} steps x {t.batch_size} x {t.grad_accum} accum x {self.dist.world_size} ranks"
            f" = {self.total_steps * t.batch_size * t.grad_accum * self.dist.world_size:,} samples",
            f"  lr connector {cfg.optim.lr_connector:g} dino {cfg.optim.lr_dino:g} llm {cfg.optim.lr_llm:g}, "
            f"{cfg.optim.schedule}; trainable groups: {', '.join(sorted(self.trainable_groups))}",
        ]
        self.progress.message("\n".join(lines))

    def _precision_name(self) -> str:
        return "bf16 (fp32 master weights)" if self.precision == "bf16" else self.precision

    def _param_counts(self) -> ParamCounts:
        by_group = {
            group: sum(p.numel() for p in params)
            for group, params in self.model.param_groups(trainable_only=False).items()
        }
        return {
            "total": sum(by_group.values()),
            "trainable": sum(p.numel() for p in self.trainable),
            "by_group": by_group,
        }

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        if self.finished is not None:
            if self.dist.is_main:
                print(
                    f"fvlm train: {self.run_dir} already finished ({self.finished['status']}); nothing to do",
                    flush=True,
                )
            return self.finished
        self.session_began = time.perf_counter()
        handlers = self._install_signal_handlers()
        try:
            status = self._loop()
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            message = None if interrupted else f"{type(exc).__name__}: {exc}"
            self._finish("interrupted" if interrupted else "failed", message)
            raise
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return self._finish(status, None)

    def _install_signal_handlers(self) -> dict[signal.Signals, SignalHandler]:
        """SIGTERM and the first Ctrl-C ask the loop to stop at the end of the current step (with a
        checkpoint); a second Ctrl-C interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum: int, frame: FrameType | None) -> None:
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_requested = True
            self.progress.message(
                f"fvlm train: {signal.Signals(signum).name} received; stopping after this step with a checkpoint"
            )

        return {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def wall_time(self) -> float:
        return self.wall_time_before + time.perf_counter() - self.session_began

    def _finished(self) -> bool:
        t = self.cfg.train
        return self.step >= self.total_steps or bool(t.max_samples and self.samples_seen >= t.max_samples)

    def _eval_pending(self) -> bool:
        """Resumed from a checkpoint of an evaluation step whose evaluation did not finish (killed
        between the checkpoint and its metrics row): that evaluation is owed before training goes on."""
        return (
            self.resume_from is not None
            and self.step > 0
            and self.last_eval_step != self.step
            and (self.step % self.cfg.train.eval_every == 0 or self._finished())
        )

    def _loop(self) -> str:
        t = self.cfg.train
        self.seen_at_start, self.samples_at_start = dict(self.seen), self.samples_seen
        if self._eval_pending():
            self._evaluate()
        batches = iter(self.train_loader)
        interval = Interval()
        while self.step < self.total_steps and not (t.max_samples and self.samples_seen >= t.max_samples):
            began = time.perf_counter()
            next_step = self.step + 1
            logged = next_step % t.log_every == 0 or next_step % t.eval_every == 0 or next_step in (1, self.total_steps)
            lrs = group_lrs(self.step, self.total_steps, self.cfg.optim, self.trainable_groups)
            apply_lrs(self.optimizer, lrs)
            with torch.random.fork_rng(devices=[]):
                micro = [next(batches) for _ in range(t.grad_accum)]
            data_wait = time.perf_counter() - began  # what the step waited for its batches
            local = self._forward_backward(micro, compute_coarse=logged or self.cfg.model.lambda_coarse > 0)
            local.stop = float(self.stop_requested)
            tally = self.dist.sum_tally(local)
            tokens, oom = tally.tokens, tally.out_of_memory
            if oom or tokens == 0:
                self._zero_grad()
                self.skipped_steps += 1
                self.progress.message(
                    f"fvlm train: skipped a step ({'out of memory' if oom else 'no target tokens'})"
                    f" on {'some rank' if self.dist.enabled else 'this process'}"
                )
                continue
            # Nothing here reads the device: the step's losses and gradient norm are read (and the
            # divergence guard fed) only where a step is logged or saved, for every step since.
            self._pending.append(Pending(next_step, tally, self._optimizer_step(tokens)))
            self.step = next_step
            self.samples_seen += int(tally.samples)
            for key, value in (("frames", tally.frames), ("text_tokens", tally.text_tokens), ("loss_tokens", tokens)):
                self.seen[key] += int(value)
            elapsed = time.perf_counter() - began
            self.timing["train"] += elapsed
            self.timing["data_wait"] += data_wait
            interval.add(
                samples=int(tally.samples),
                frames=int(tally.frames),
                text_tokens=int(tally.text_tokens),
                loss_tokens=int(tokens),
                seconds=elapsed,
                data_wait=data_wait,
            )
            finished = self._finished()
            evaluate = self.step % t.eval_every == 0 or finished
            save = evaluate or self.step % t.save_every == 0 or bool(tally.stop)
            row = None
            settled = self._settle() if logged or save else None
            if (logged or save) and settled is None:
                return "diverged"
            if logged and settled is not None:
                log_began = time.perf_counter()
                loss_fine, loss_coarse = settled.loss_fine, settled.loss_coarse
                row = {
                    "run_id": self.cfg.run_id,
                    "step": self.step,
                    "samples_seen": self.samples_seen,
                    "wall_time_sec": round(self.wall_time(), 3),
                    "train_loss": settled.train_loss,
                    "loss_fine": loss_fine,
                    "loss_coarse": loss_coarse,
                    "loss_ratio": loss_fine / loss_coarse if loss_fine is not None and loss_coarse else None,
                    "grad_norm": settled.grad_norm,
                    **{f"lr_{g}": lrs[g] for g in GROUPS},
                    **interval.row(self.cfg.model, self.peak_flops, self.dist.world_size),
                    **self._gpu_memory(),
                    **self._step_extras(tally),
                }
                interval = Interval()
                self.last_row = row
                if self.steps_log is not None:
                    self.steps_log.write(row)
                if self.wandb is not None:
                    self.wandb.log(row, "train")
                self.timing["log"] += time.perf_counter() - log_began
            self.progress.update(self.step, row)
            if save:
                self._save()
            if evaluate:
                self._evaluate()
            if tally.stop:
                return "interrupted"
        return "completed"

    def _forward_backward(self, micro: list[Batch], compute_coarse: bool) -> StepTally:
        """Backpropagates each micro-batch's token-sum loss; returns this rank's tally of the step.
        Gradients meet across ranks in the last micro-batch's backward; before it the ranks agree
        whether the step is skipped (no target tokens anywhere, or a rank out of memory), and if it
        is no rank runs it (fvlm/training/engine.py)."""
        zero = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        # The loss sums live on the device from the start, on every rank alike (sum_tally all-reduces
        # device fields as such, so a rank that ran no micro-batch must hold them too).
        tally = StepTally(loss_sum=zero, fine_sum=zero.clone(), coarse_sum=zero.clone())
        for batch in micro:
            tally.samples += batch["input_ids"].shape[0]
            tally.frames += int(batch["frame_mask"].sum())
            tally.text_tokens += int(batch["attention_mask"].sum())
            tally.tokens += target_tokens(batch)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            if last:
                tokens, out_of_memory = self.dist.all_sum([tally.tokens, tally.out_of_memory])
                if out_of_memory or not tokens:
                    break  # skipped by every rank; the gradients so far never left this rank
            if tally.out_of_memory:
                continue  # an earlier micro-batch ran out of memory: the step is skipped
            try:
                batch = to_device(batch, self.dist.device)
                # Under bf16 with fp32 masters each micro-batch's gradients move to the masters, so
                # they must be summed over ranks by then: every micro-batch's backward syncs.
                sync = last or self.masters is not None
                with nullcontext() if sync else self.engine.no_sync():
                    with self.autocast():
                        out = self.engine(batch, compute_coarse=compute_coarse)
                    n = out.n_tokens
                    (out.loss * n).backward()
                if self.masters is not None:
                    self.masters.accumulate_grads()  # summed over micro-batches in fp32
                elif self.model.cuda_graphs:
                    own_gradients(self.trainable)
            except torch.cuda.OutOfMemoryError:
                if self.dist.enabled and (last or self.engine.sharded or self.masters is not None):
                    raise  # the other ranks are inside a collective this rank can no longer join
                self._zero_grad()
                torch.cuda.empty_cache()
                tally.out_of_memory = 1.0
                continue
            # Summed on the device: reading a loss here would make the host wait for the step.
            tally.loss_sum = tally.loss_sum + out.loss.detach().double() * n
            if out.loss_fine is not None:
                tally.fine_sum = tally.fine_sum + out.loss_fine.double() * n
                tally.fine_tokens += n
            if out.loss_coarse is not None:
                tally.coarse_sum = tally.coarse_sum + out.loss_coarse.double() * n
                tally.coarse_tokens += n
        return tally

    def _step_extras(self, tally: StepTally) -> dict[str, float | None]:
        """A subclass's `extra_step_columns` of a logged step, from its (rank-summed) tally."""
        return {}

    def _optimizer_step(self, tokens: float) -> torch.Tensor:
        """On the fp32 gradients (the masters' under bf16), already summed over ranks by the engine:
        divide by the step's token count (a host number), clip, update; under bf16 the updated
        masters are then rounded into the model. Returns the gradient norm as a device tensor.

        A non-finite norm leaves the weights and the optimizer's state as they were. The fused AdamW
        is told so on the device (its `found_inf`, as a gradient scaler tells it), so the host never
        waits for the norm; the run is then stopped as diverged when the step is settled."""
        grads = [p.grad for p in self.optimized if p.grad is not None]
        torch._foreach_div_(grads, tokens)
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        grad_norm = self.engine.clip_grad_norm(self.optimized, max_norm)
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = (~torch.isfinite(grad_norm)).float()  # type: ignore[attr-defined]
            self.optimizer.step()
        elif bool(torch.isfinite(grad_norm)):  # the unfused optimizers have no found_inf: a sync
            self.optimizer.step()
        if self.masters is not None:
            self.masters.publish()  # unchanged masters after a skipped update: the same weights
        self._zero_grad()
        return grad_norm

    def _settle(self) -> Settled | None:
        """Reads the losses and gradient norms of the steps since the last read (one wait for the
        device) and folds each step's loss into the divergence guard, in order. Returns the newest
        step's numbers, or None when a step diverged (said on the console)."""
        pending, self._pending = self._pending, []
        if not pending:
            return None
        device = pending[0].grad_norm.device

        def value(x: float | torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(x, dtype=torch.float64, device=device).reshape(())

        rows = [
            torch.stack(
                [value(p.tally.loss_sum), value(p.tally.fine_sum), value(p.tally.coarse_sum), value(p.grad_norm)]
            )
            for p in pending
        ]
        settled = None
        for p, (loss_sum, fine_sum, coarse_sum, grad_norm) in zip(pending, torch.stack(rows).tolist()):
            t = p.tally
            train_loss = loss_sum / t.tokens
            if not math.isfinite(grad_norm):
                self.progress.message(f"fvlm train: diverged at step {p.step} (gradient norm {grad_norm})")
                return None
            if self.divergence.diverged(train_loss):
                self.progress.message(
                    f"fvlm train: diverged at step {p.step} (loss {train_loss:.4g}; {self.divergence.describe()})"
                )
                return None
            settled = Settled(
                train_loss=train_loss,
                grad_norm=grad_norm,
                loss_fine=fine_sum / t.fine_tokens if t.fine_tokens else None,
                loss_coarse=coarse_sum / t.coarse_tokens if t.coarse_tokens else None,
            )
        return settled

    def _gpu_memory(self) -> dict[str, float]:
        if self.dist.device.type != "cuda":
            return {"gpu_mem_allocated_gb": 0.0, "gpu_mem_reserved_gb": 0.0}
        return {
            "gpu_mem_allocated_gb": torch.cuda.memory_allocated() / GIB,
            "gpu_mem_reserved_gb": torch.cuda.memory_reserved() / GIB,
        }

    # ------------------------------------------------------------------ checkpoints and evaluation
    def _save(self) -> None:
        """A resume checkpoint (pruning later leaves the milestones and the best their weights only)."""
        if self.last_saved_step == self.step:
            return
        began = time.perf_counter()
        trainer_state = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "seen": dict(self.seen),
            "wall_time_sec": self.wall_time(),
            "divergence": self.divergence.state_dict(),
            "skipped_steps": self.skipped_steps,
        }
        rank_state = {"rng": ckpt.rng_state(), "data": self.train_loader.state_dict()}
        self.saved_meta = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "wall_time_sec": trainer_state["wall_time_sec"],
            "git_commit": git_commit(),
            "config_hash": self.cfg.config_hash(),
            "world_size": self.dist.world_size,
            "best": self.best,
            "config": self.cfg.to_dict(),
        }
        with self._fp32_view():
            # Collectives under FSDP2 (the shards gathered whole); the module and optimizer themselves otherwise.
            weights = self.engine.full_model_state()
            optimizer_state = self.engine.optimizer_state(self.optimizer)
            ckpt.save_checkpoint(
                self.run_dir,
                self.step,
                self.dist,
                model=self.model,
                tokenizer=self.tokenizer,
                meta=self.saved_meta,
                optimizer_state=optimizer_state,
                weights=weights,
                trainer_state=trainer_state,
                rank_state=rank_state,
            )
        self.last_saved_step = self.step
        if self.dist.is_main:
            ckpt.prune_checkpoints(self.run_dir, self.cfg.train.keep_last, self._always_kept())
        self.timing["checkpoint"] += time.perf_counter() - began

    def _always_kept(self) -> set[int]:
        return self.milestones | ({self.best["step"]} if self.best else set())

    def _evaluate(self) -> None:
        """Validation and probe attention at the current step, which was just checkpointed."""
        began = time.perf_counter()
        cfg, t = self.cfg, self.cfg.train
        with torch.random.fork_rng(devices=[]):
            val_loader = self._build_loader(
                cfg,
                "val",
                self.tokenizer,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                max_samples=t.eval_samples,
            )
            metrics = validate(self.model, val_loader, self.dist, self.autocast, lockstep=self.engine.sharded)
            # Under FSDP2 every rank runs the probe's forwards (they gather the weights); rank 0 writes.
            if (self.dist.is_main or self.engine.sharded) and t.probe_videos:
                probe_loader = self._build_loader(cfg, "probe", self.tokenizer, train=False, max_samples=t.probe_videos)
                save_probe_attention(
                    self.model,
                    probe_loader,
                    t.probe_videos,
                    self.step,
                    self.run_dir,
                    self.dist.device,
                    self.autocast,
                    write=self.dist.is_main,
                )
        self.dist.barrier()
        self.last_eval_step = self.step
        self.timing["eval"] += time.perf_counter() - began
        if not self.dist.is_main:
            return
        # The training row of this step (on a resume that redoes the evaluation, read back from steps.csv).
        train_row = self.last_row if self.last_row and self.last_row.get("step") == self.step else {}
        row = rf.metric_row(
            train_row,
            run_id=self.cfg.run_id,
            step=self.step,
            samples_seen=self.samples_seen,
            gpu_mem_gb=torch.cuda.max_memory_allocated() / GIB if self.dist.device.type == "cuda" else 0.0,
            **metrics,
        )
        self.history.append(row)
        if metrics["val_loss"] is not None and (not self.best or metrics["val_loss"] < self.best["val_loss"]):
            self.best = dict(row)
        if self.metrics_log is not None:  # opened on the main process, which alone gets here
            self.metrics_log.write(row)
        if self.wandb is not None:
            self.wandb.log(row, "eval")
        # The checkpoint of this step was written before its evaluation; its meta now learns the result.
        self.saved_meta["best"] = self.best
        self.saved_meta["evaluated_step"] = self.step
        rf.write_json(rf.checkpoint_folder(self.run_dir, self.step) / rf.META, self.saved_meta)
        ckpt.prune_checkpoints(self.run_dir, t.keep_last, self._always_kept())
        self.progress.message(
            f"eval step {self.step}: val_loss {_fmt(metrics['val_loss'])} (fine {_fmt(metrics['val_loss_fine'])},"
            f" coarse {_fmt(metrics['val_loss_coarse'])}), attention entropy {_fmt(metrics['attention_entropy'])}"
        )

    # ------------------------------------------------------------------ the end
    def _finish(self, status: str, error: str | None) -> dict[str, Any]:
        summary = self._summary(status, error)
        if self.dist.is_main:
            rf.write_summary(self.run_dir, summary)
            for sink in (self.steps_log, self.metrics_log, self.wandb):
                if sink is not None:
                    sink.close()
            self.progress.close()
            print(
                f"fvlm train: {status} at step {self.step} ({self.samples_seen:,} samples, "
                f"{summary['wall_time_sec']:.1f}s); best val_loss {_fmt(summary['best_val_loss'])}"
                + (f"; {error}" if error else ""),
                flush=True,
            )
        return summary

    def _flops_per_sample(self) -> float | None:
        """The exact training FLOPs (fvlm.model.flops) of this run's average sample: mean frames,
        text tokens and target tokens over everything it trained on."""
        if not self.samples_seen:
            return None
        mean = {k: v / self.samples_seen for k, v in self.seen.items()}
        return estimate_flops(
            self.cfg.model, frames=mean["frames"], text_tokens=mean["text_tokens"], loss_tokens=mean["loss_tokens"]
        ).per_sample

    def _throughput(self, flops_per_sample: float | None) -> dict[str, str | float | None]:
        """Over this session's training time (a resumed run counts its own steps only)."""
        seconds = self.timing["train"]
        session = {k: self.seen[k] - self.seen_at_start[k] for k in self.seen}
        samples = self.samples_seen - self.samples_at_start
        if seconds <= 0 or not samples:
            return {"device": self.device_name, "peak_flops": self.peak_flops, "peak_source": self.peak_source}
        visual = session["frames"] * (self.cfg.model.tokens_per_frame or 1)
        flops = flops_per_sample * samples / seconds if flops_per_sample else None
        return {
            "samples_per_sec": samples / seconds,
            "tokens_per_sec": (visual + session["text_tokens"]) / seconds,
            "visual_tokens_per_sec": visual / seconds,
            "text_tokens_per_sec": session["text_tokens"] / seconds,
            "flops_per_sec": flops,
            "mfu": flops / (self.peak_flops * self.dist.world_size) if flops and self.peak_flops else None,
            "device": self.device_name,
            "world_size": self.dist.world_size,
            "precision": self.precision,
            "peak_flops": self.peak_flops,
            "peak_source": self.peak_source,
            "data_wait_fraction": self.timing["data_wait"] / seconds,
        }

    def _summary(self, status: str, error: str | None) -> dict[str, Any]:
        best_val = self.best.get("val_loss")
        convergence_step = None
        if best_val is not None:
            convergence_step = next(
                int(r["step"])
                for r in self.history
                if r["val_loss"] is not None and r["val_loss"] <= best_val * (1 + CONVERGENCE_TOLERANCE)
            )
        params = self._param_counts()
        flops_per_sample = self._flops_per_sample()
        wall = self.wall_time()
        summary: dict[str, Any] = {
            "run_id": self.cfg.run_id,
            "status": status,
            "git_commit": git_commit(),
            "config_hash": self.cfg.config_hash(),
            "final_train_loss": self.last_row["train_loss"] if self.last_row else None,
            "best_val_loss": best_val,
            "best_val_step": self.best.get("step"),
            "convergence_step": convergence_step,
            "total_steps": self.step,
            "total_samples": self.samples_seen,
            "wall_time_sec": wall,
            "wall_time_hours": wall / 3600,
            "params": params,
            "flops_per_sample": flops_per_sample,
            "total_flops": flops_per_sample * self.samples_seen if flops_per_sample else None,
            "final": self.history[-1] if self.history else {},
            "best": self.best,
            "skipped_steps": self.skipped_steps,
            "data_skips": dict(self.train_loader.stats),
            "time_sec": {k: round(v, 3) for k, v in self.timing.items()},
            "throughput": self._throughput(flops_per_sample),
        }
        if error:
            summary["error"] = error
        return summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
