"""Runs a sweep: one normal run folder per RunSpec, `sweep.csv`, and a state file that makes
re-running the same command skip what is finished and resume what was interrupted.

Execution:
- one process, one run after another (the default; a GPU run uses the one visible GPU);
- `jobs > 1` on a CPU machine: that many worker processes side by side, each single-threaded, each
  importing torch once for all the runs it trains, one after another (the tiny preset's runs are
  seconds to a minute long, so start-up matters); the longest runs start first, and inside
  `keep_workers()` (as `fvlm phase1` runs its sweeps) the workers outlive the sweep for the next one;
- several visible GPUs: each run goes through `torchrun --nproc_per_node <gpus> -m fvlm train`.

A run that diverges or fails is recorded and the sweep goes on. Ctrl-C (or SIGTERM) lets the runs in
flight stop at the end of their step with a checkpoint, records them as interrupted, and stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnContext
from pathlib import Path
from types import FrameType
from typing import IO, Any, Protocol

import yaml

from fvlm import atomic
from fvlm import run_folder as rf
from fvlm.config import RunConfig, config_from_dict, load_config
from fvlm.data.synth import ensure_synthetic
from fvlm.errors import UsageError, read_json
from fvlm.experiments import slurm
from fvlm.experiments.matrix import RunSpec
from fvlm.experiments.slurm import SlurmSettings
from fvlm.model.flops import estimate_flops

FINISHED = ("completed", "diverged", "failed")


class Started(Protocol):
    """Records that a run started (`pid`: the worker process that trains it, when not this one)."""

    def __call__(self, run_id: str, pid: int | None = None) -> None: ...


# Records that a run ended: (run id, status, error or None, seconds it took in this sweep).
Finished = Callable[[str, str, str | None, float], None]


def diff_text(diff: dict[str, Any]) -> str:
    """A run's overrides as `key=value` text, the way a user would type them."""

    def fmt(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) + "}"
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, float):
            return f"{v:g}"
        return str(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in diff.items()) or "(base)"


def data_overrides(data: str | None) -> dict[str, str]:
    """`--data PATH`: a folder with train/ (and val/, probe/) split folders, as `fvlm data synth`
    writes, or a shard folder / mix file for data.train."""
    if not data:
        return {}
    path = Path(data)
    if not path.exists():
        raise UsageError(f"--data {data}: no such file or folder")
    if (path / "train").is_dir():
        out = {"data.train": str(path / "train")}
        for split in ("val", "probe"):
            if (path / split).is_dir():
                out[f"data.{split}"] = str(path / split)
        return out
    return {"data.train": str(path)}


def resolve_synthetic(preset_config: str, base: dict[str, Any], root: Path) -> dict[str, Any]:
    """Generates the synthetic set once under `root` (when the base config asks for it) and points
    every run at it, so that the runs of a sweep share one dataset."""
    cfg = load_config(preset_config, {**base, "run_id": "data", "out_dir": str(root)})
    if "synthetic" not in (cfg.data.train, cfg.data.val, cfg.data.probe):
        return base
    paths = ensure_synthetic(cfg.data, cfg.data_seed, cfg.out_dir)
    return {**base, **{f"data.{split}": paths[split] for split in ("train", "val", "probe")}}


@dataclass
class Planned:
    spec: RunSpec
    cfg: RunConfig
    flops_per_sample: float


class Sweep:
    def __init__(
        self,
        folder: Path,
        kind: str,
        preset_config: str,
        base: dict[str, Any],
        specs: list[RunSpec],
        sample_shape: tuple[int, int],
        jobs: int = 1,
        log: Callable[[str], None] | None = None,
        slurm: SlurmSettings | None = None,
    ):
        self.folder, self.kind, self.preset_config = Path(folder), kind, preset_config
        self.slurm = slurm  # None: run here (the local launcher)
        self.slurm_jobs: dict[str, Any] = {}  # run id -> the submitit job in flight
        self.sample_shape = sample_shape
        self.base, self.specs, self.jobs = base, specs, max(1, jobs)
        self.log = log or (lambda text: print(text, flush=True))
        self.state_path = self.folder / rf.SWEEP_STATE
        self._lock_file: IO[str] | None = None  # the open rf.SWEEP_LOCK while run() holds it
        self.planned = [self._plan(spec) for spec in specs]  # every config validated before anything runs

    # ------------------------------------------------------------------ planning
    def _plan(self, spec: RunSpec) -> Planned:
        overrides = {**spec.overrides(self.base), "out_dir": str(self.folder)}
        try:
            cfg = load_config(self.preset_config, overrides)
        except UsageError as exc:
            raise UsageError(f"run {spec.run_id}: {exc}") from None
        fps = spec.meta.get("flops_per_sample")
        if fps is None:
            fps = estimate_flops(cfg.model, *self.sample_shape).per_sample
        return Planned(spec, cfg, float(fps))

    def _lock(self) -> None:
        """One sweep process per folder: a second `fvlm sweep`/`phase1` on it is refused."""
        if self._lock_file is not None:
            return
        handle = open(self.folder / rf.SWEEP_LOCK, "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise UsageError(f"{self.folder}: another fvlm sweep is running in this folder") from None
        self._lock_file = handle

    def load_state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {"kind": self.kind, "runs": {}}
        try:
            state = read_json(self.state_path)
        except UsageError as exc:
            raise UsageError(f"{exc}; move it away to start the sweep afresh") from None
        if state.get("kind") != self.kind:
            raise UsageError(
                f"{self.folder} holds a '{state.get('kind')}' sweep, not '{self.kind}'; choose another --out"
            )
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        atomic.write_json(self.state_path, state, indent=1, default=str)

    def check_existing(self) -> None:
        """A run folder that holds different settings is refused before anything runs."""
        for p in self.planned:
            changed = rf.settings_changed(self.folder / p.spec.run_id, p.cfg)
            if changed:
                raise UsageError(
                    f"{self.folder / p.spec.run_id} holds run {p.spec.run_id} with other settings "
                    f"({', '.join(changed)}); use another --out, or move that run away"
                )

    def run_status(self, run_id: str) -> str:
        return rf.run_status(self.folder / run_id)

    # ------------------------------------------------------------------ running
    def run(self, retry_failed: bool = False) -> dict[str, str]:
        """Runs every pending or interrupted run; returns run_id -> status. Stops early (leaving the
        rest pending) when interrupted."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            return self._run(retry_failed)
        finally:
            if self._lock_file is not None:
                self._lock_file.close()  # releases the lock
            self._lock_file = None

    def _run(self, retry_failed: bool) -> dict[str, str]:
        self.check_existing()
        state = self.load_state()
        for p in self.planned:
            record = state["runs"].setdefault(p.spec.run_id, {})
            record.update(
                description=p.spec.description,
                diff=p.spec.diff,
                planned_samples=p.spec.samples,
                flops_per_sample=p.flops_per_sample,
                config_hash=p.cfg.config_hash(),
            )
            record["status"] = self.run_status(p.spec.run_id)
        self._save_state(state)
        todo = [
            p
            for p in self.planned
            if state["runs"][p.spec.run_id]["status"] not in FINISHED
            or (retry_failed and state["runs"][p.spec.run_id]["status"] == "failed")
        ]
        done = len(self.planned) - len(todo)
        if done:
            self.log(f"[{self.kind}] {done} of {len(self.planned)} runs already finished; {len(todo)} to run")
        self.write_csv(state)
        if not todo:
            return {rid: r["status"] for rid, r in state["runs"].items()}

        counter = {"n": done}

        def finished(run_id: str, status: str, error: str | None, seconds: float) -> None:
            counter["n"] += 1
            record = state["runs"][run_id]
            record.update(
                status=status,
                error=error,
                session_wall_sec=round(seconds, 1),
                finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
            )
            self._save_state(state)
            self.write_csv(state)
            self.log(
                f"[{self.kind} {counter['n']}/{len(self.planned)}] {run_id:<12} {status:<11} "
                f"{seconds:6.1f}s  {self._result_text(run_id, error)}"
            )

        def started(run_id: str, pid: int | None = None) -> None:
            """`pid`: the worker process that trains it (the one to signal or inspect), when not this one."""
            record = state["runs"][run_id]
            record.update(started_at=time.strftime("%Y-%m-%dT%H:%M:%S"), status="running", pid=pid or os.getpid())
            self._save_state(state)

        gpus = 0 if self.slurm else _cuda_count()
        if self.slurm:
            interrupted = self._run_slurm(todo, state, finished)
        elif gpus > 1:
            interrupted = self._run_torchrun(todo, gpus, started, finished)
        elif self.jobs > 1 and gpus == 0:
            interrupted = self._run_workers(todo, started, finished)
        else:
            interrupted = self._run_inline(todo, started, finished)
        if interrupted:
            self.log(f"[{self.kind}] interrupted: re-run the same command to resume ({self.state_path})")
            raise KeyboardInterrupt
        return {rid: r["status"] for rid, r in state["runs"].items()}

    def _result_text(self, run_id: str, error: str | None) -> str:
        if error:
            return error.splitlines()[0][:160]
        summary = rf.read_summary(self.folder / run_id)
        final = (summary or {}).get("final") or {}
        if not final.get("val_loss"):
            return ""
        text = f"val_loss {final['val_loss']:.4f}"
        if final.get("val_loss_coarse") is not None and final.get("val_loss_fine") is not None:
            text += f" (fine {final['val_loss_fine']:.4f}, coarse {final['val_loss_coarse']:.4f})"
        return text

    def _run_inline(self, todo: list[Planned], started: Started, finished: Finished) -> bool:
        from fvlm.training.trainer import train  # imports torch, which `fvlm --help` should not wait for

        for p in todo:
            started(p.spec.run_id)
            began = time.perf_counter()
            try:
                summary = train(p.cfg)
                status, error = summary["status"], summary.get("error")
            except KeyboardInterrupt:
                finished(p.spec.run_id, "interrupted", None, time.perf_counter() - began)
                return True
            except UsageError as exc:
                status, error = "failed", str(exc)
            except Exception as exc:  # the trainer has written status `failed`; the sweep goes on
                status, error = "failed", f"{type(exc).__name__}: {exc}"
            finished(p.spec.run_id, status, error, time.perf_counter() - began)
            if status == "interrupted":
                return True
        return False

    def _run_workers(self, todo: list[Planned], started: Started, finished: Finished) -> bool:
        """Up to `jobs` runs side by side in spawned worker processes. A worker trains the runs it is
        handed one after another, so torch, transformers and the decoded samples are loaded once per
        worker and not once per run (7-8 s of every tiny run when each had a process of its own).
        A worker that dies (killed, out of memory) fails its own run only: it is recorded as failed
        with its exit signal, a fresh worker takes its place, and the runs beside it go on.

        The longest runs (by planned FLOPs) start first and the short ones fill in after them, so
        that the sweep does not end with one long run on one core while the others stand idle (the
        tiny main job: 33 s less over its three sweeps, 2 workers, against the plan's order)."""
        stop = {"requested": False}

        def request_stop(signum: int, frame: FrameType | None) -> None:
            if stop["requested"] and signum == signal.SIGINT:
                raise KeyboardInterrupt
            stop["requested"] = True
            self.log(
                f"[{self.kind}] {signal.Signals(signum).name}: the runs in flight stop after their step "
                "with a checkpoint"
            )

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        queue = longest_first(todo)
        idle: list[_Worker] = _take_kept_workers()
        busy: dict[str, tuple[_Worker, float]] = {}  # run id -> (its worker, start time)
        context = multiprocessing.get_context("spawn")
        try:
            while queue or busy:
                while queue and len(busy) < self.jobs and not stop["requested"]:
                    p = queue.pop(0)
                    if not idle:
                        idle.append(_Worker(context))
                    worker = idle.pop()
                    started(p.spec.run_id, worker.proc.pid)
                    worker.conn.send((p.cfg.to_dict(), str(self.folder / p.spec.run_id / rf.TRAIN_LOG)))
                    busy[p.spec.run_id] = (worker, time.perf_counter())
                if not busy:
                    break
                if stop["requested"] and not stop.get("forwarded"):
                    stop["forwarded"] = True
                    for worker, _ in busy.values():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(worker.pid, signal.SIGTERM)
                wait([w.conn for w, _ in busy.values()] + [w.proc.sentinel for w, _ in busy.values()], timeout=1.0)
                for run_id, (worker, began) in list(busy.items()):
                    result = worker.result()
                    if result is None:
                        continue
                    del busy[run_id]
                    if worker.proc.is_alive():
                        idle.append(worker)
                    finished(run_id, *result, time.perf_counter() - began)
        finally:
            for worker in [w for w, _ in busy.values()] + _keep_workers(idle):
                worker.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return stop["requested"]

    def _run_slurm(self, todo: list[Planned], state: dict[str, Any], finished: Finished) -> bool:
        """Submits each run as a SLURM job (re-attaching to one an earlier sweep process left queued or
        running) and waits for all of them. Ctrl-C stops the waiting, not the jobs."""
        settings = self.slurm
        assert settings is not None  # `_run` sends the runs to SLURM only when the sweep has its settings
        ex = slurm.executor(self.folder, settings)
        configs = self.folder / "configs"
        configs.mkdir(parents=True, exist_ok=True)
        began: dict[str, float] = {}
        for p in todo:
            rid, record = p.spec.run_id, state["runs"][p.spec.run_id]
            job = slurm.attach(self.folder, record.get("job_id"), settings)
            if job is not None:
                self.log(
                    f"[{self.kind}] {rid}: job {job.job_id} is still {job.state.split()[0].lower()}; waiting for it"
                )
            else:
                path = configs / f"{rid}.yaml"
                atomic.write_text(path, yaml.safe_dump(p.cfg.to_dict(), sort_keys=False))
                job = ex.submit(
                    slurm.TrainJob(
                        str(path), str(self.folder / rid / rf.TRAIN_LOG), settings.gpus_per_node, settings.nodes
                    )
                )
                record.update(job_id=str(job.job_id), status="queued", submitted_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
                self._save_state(state)
                self.log(f"[{self.kind}] {rid}: submitted as job {job.job_id}")
            self.slurm_jobs[rid] = job
            began[rid] = time.perf_counter()

        def running(run_id: str) -> None:
            state["runs"][run_id].update(status="running", started_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            self._save_state(state)

        def done(run_id: str, status: str, error: str | None) -> None:
            finished(run_id, status, error, time.perf_counter() - began[run_id])

        try:
            slurm.wait_for(self.slurm_jobs, running, done, settings.poll_sec)
        except KeyboardInterrupt:
            self.log(
                f"[{self.kind}] stopped waiting; the jobs go on. Re-run the same command to wait for them "
                "again (nothing is submitted twice)"
            )
            return True
        return False

    def _run_torchrun(self, todo: list[Planned], gpus: int, started: Started, finished: Finished) -> bool:
        configs = self.folder / "configs"
        configs.mkdir(parents=True, exist_ok=True)
        for p in todo:
            path = configs / f"{p.spec.run_id}.yaml"
            atomic.write_text(path, yaml.safe_dump(p.cfg.to_dict(), sort_keys=False))
            started(p.spec.run_id)
            began = time.perf_counter()
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={gpus}",
                "-m",
                "fvlm",
                "train",
                str(path),
            ]
            try:
                code = subprocess.call(command)
            except KeyboardInterrupt:
                finished(p.spec.run_id, "interrupted", None, time.perf_counter() - began)
                return True
            status = self.run_status(p.spec.run_id)
            if code == 2:
                status = "failed"
            finished(
                p.spec.run_id,
                status,
                None if status != "failed" else f"fvlm train exited {code}",
                time.perf_counter() - began,
            )
            if status == "interrupted":
                return True
        return False

    # ------------------------------------------------------------------ sweep.csv
    def write_csv(self, state: dict[str, Any]) -> None:
        rows = []
        for p in self.planned:
            record = state["runs"].get(p.spec.run_id, {})
            rows.append(
                rf.sweep_row(
                    self.folder / p.spec.run_id,
                    sweep=self.kind,
                    status=record.get("status", "pending"),
                    description=p.spec.description,
                    diff=diff_text(p.spec.diff),
                    planned_samples=p.spec.samples,
                    flops_per_sample=p.flops_per_sample,
                    config_hash=p.cfg.config_hash(),
                    error=record.get("error"),
                )
            )
        rf.write_sweep_csv(self.folder, rows)


def longest_first(planned: list[Planned]) -> list[Planned]:
    """The runs by planned FLOPs (samples x FLOPs per sample), largest first; ties keep the plan's order."""
    return sorted(planned, key=lambda p: -p.spec.samples * p.flops_per_sample)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ----------------------------------------------------------------------------- worker processes


def _worker_init() -> None:
    # Between runs a worker ignores Ctrl-C and SIGTERM (the parent decides, and tells an idle worker to
    # exit through its pipe); during a run the trainer's own handler turns either into "stop after
    # this step with a checkpoint". SIGTERM too: on Ctrl-C the parent forwards one to each busy
    # worker, and it can land just after the run stopped on the terminal's SIGINT and the trainer
    # put the handlers back, which killed the worker before it wrote the run's summary (the run was
    # then reported failed).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    global _PARENT_PID
    _PARENT_PID = os.getppid()
    _terminate_with_parent()


_PARENT_PID: int | None = None


def _terminate_with_parent() -> None:
    """Linux: SIGTERM this worker when the sweep process dies (even by SIGKILL), so that no orphan
    keeps writing into a run folder that a re-run is about to resume: a run in flight stops after
    its step, and the worker then exits (`_worker_main`); an idle worker exits when its pipe closes."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


# Idle workers that wait for the next sweep of this process, inside `keep_workers()`; None outside it.
_KEPT: list[_Worker] | None = None


@contextlib.contextmanager
def keep_workers() -> Iterator[None]:
    """Within it, the workers a sweep leaves idle wait for the next sweep in this process instead of
    exiting, and exit when it ends (or fails). `fvlm phase1` runs its three sweeps inside one: each
    new worker costs its import of torch and transformers and a first pass that decodes the train
    set again (~19 s of a core each in the tiny main job)."""
    global _KEPT
    if _KEPT is not None:  # already inside one
        yield
        return
    _KEPT = []
    try:
        yield
    finally:
        kept, _KEPT = _KEPT, None
        for worker in kept:
            worker.close()


def _take_kept_workers() -> list[_Worker]:
    """The kept idle workers still alive (the others are closed), handed over to a sweep."""
    if not _KEPT:
        return []
    alive = [w for w in _KEPT if w.proc.is_alive()]
    for worker in _KEPT:
        if worker not in alive:
            worker.close()
    _KEPT.clear()
    return alive


def _keep_workers(idle: list[_Worker]) -> list[_Worker]:
    """Keeps a sweep's idle workers for the next one when inside `keep_workers()`; returns those to close."""
    if _KEPT is None:
        return idle
    _KEPT.extend(idle)
    return []


class _Worker:
    """A spawned process that trains the runs sent to it, one at a time, until it is sent None."""

    spawned = 0  # numbers the workers' process names

    def __init__(self, context: SpawnContext):
        _Worker.spawned += 1
        self.conn, child = context.Pipe()
        self.proc = context.Process(target=_worker_main, args=(child,), name=f"fvlm-worker-{_Worker.spawned}")
        self.proc.start()
        assert self.proc.pid is not None  # a started process has its id
        self.pid: int = self.proc.pid
        child.close()  # the child holds its end; the parent's copy would keep the pipe open

    def result(self) -> tuple[str, str | None] | None:
        """The (status, error) of the run in flight once it is over (died included); None while it runs."""
        if self.conn.poll():
            try:
                return self.conn.recv()
            except (EOFError, OSError):
                pass  # the pipe closed without a word: the process died
        elif self.proc.is_alive():
            return None
        self.proc.join()
        code = self.proc.exitcode
        assert code is not None  # a joined process has its exit code
        cause = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        hint = " (SIGKILL is what the kernel's out-of-memory killer sends)" if code == -signal.SIGKILL else ""
        return "failed", f"worker process died: {cause}{hint}"

    def close(self) -> None:
        """Lets an idle worker exit; one still training was told to stop and is given time to checkpoint."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()  # it was asked to stop a minute ago (SIGTERM is its stop request, not an exit)
            self.proc.join()
        self.conn.close()


def _worker_main(conn: Connection) -> None:
    """A worker's loop: (config, log path) in, (status, error) out, until None or the sweep is gone."""
    _worker_init()
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return  # the sweep process closed the pipe or is gone
        if task is None:
            return
        result = _train_logged(*task)
        if os.getppid() != _PARENT_PID:
            os._exit(0)  # the sweep process is gone: nobody to report to
        conn.send(result)


def _train_logged(cfg_dict: dict[str, Any], log_path: str) -> tuple[str, str | None]:
    from fvlm.training.trainer import train  # imports torch: only in the worker process that trains

    cfg = config_from_dict(cfg_dict, "sweep")
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            summary = train(cfg)
            return summary["status"], summary.get("error")
        except KeyboardInterrupt:
            return "interrupted", None
        except UsageError as exc:
            return "failed", str(exc)
        except Exception as exc:
            traceback.print_exc(file=log)
            return "failed", f"{type(exc).__name__}: {exc}"
