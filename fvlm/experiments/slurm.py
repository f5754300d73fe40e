"""Sweeps on a SLURM cluster: each run is one job submitted through submitit.

A job runs `fvlm train <the run's config>` as a child process: directly on one GPU, under torchrun on
several, and across nodes with torchrun's c10d rendezvous on the job's first node. Its output goes to
the run's train.log, as with the local launcher. When SLURM announces preemption or the time limit
(submitit asks for SIGUSR2 90 s ahead), the job's `checkpoint` passes SIGTERM to the training
process, which finishes its step, writes a checkpoint and exits; submitit then requeues the job, and
the requeued job's `fvlm train` resumes from that checkpoint.

The sweep state (`sweep_state.json`) keeps each run's job id. Re-running the sweep command skips
finished runs, re-attaches to jobs that are still queued or running (never submitting a run twice),
and resubmits runs whose job failed, was cancelled or vanished.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvlm import run_folder as rf
from fvlm.errors import UsageError

# SLURM job states in which the job will still run (or runs): such a job is waited for, not resubmitted.
ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SUSPENDED",
    "SIGNALING",
    "STAGE_OUT",
    "UNKNOWN",
}
# How long the training process gets to checkpoint after SIGTERM before it is killed.
STOP_GRACE_SEC = 80


@dataclass
class SlurmSettings:
    partition: str | None = None
    gpus_per_node: int = 1
    nodes: int = 1
    time_min: int = 24 * 60
    account: str | None = None
    qos: str | None = None
    cpus_per_gpu: int = 8
    mem_gb: int | None = None
    # "slurm" on a cluster; "local" runs the jobs on this machine through submitit's local executor
    # (the same code path; what the tests use).
    cluster: str = "slurm"
    poll_sec: float = 30.0

    def validate(self) -> None:
        flags = {"gpus_per_node": "gpus", "time_min": "time", "mem_gb": "mem-gb"}
        for name in ("gpus_per_node", "nodes", "time_min", "cpus_per_gpu", "mem_gb"):
            value = getattr(self, name)
            if value is not None and value < 1:
                flag = flags.get(name, name.replace("_", "-"))
                raise UsageError(f"--slurm-{flag} must be >= 1, got {value}")
        for name in ("partition", "account", "qos"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise UsageError(f"--slurm-{name} must not be empty (leave it out for the cluster's default)")
        if self.cluster not in ("slurm", "local"):
            raise UsageError(f"slurm cluster must be 'slurm' or 'local', got {self.cluster!r}")


class TrainJob:
    """The callable a job runs (pickled by submitit); checkpointable, so preemption requeues it."""

    def __init__(self, config_path: str, log_path: str, gpus_per_node: int, nodes: int):
        self.config_path, self.log_path = config_path, log_path
        self.gpus_per_node, self.nodes = gpus_per_node, nodes
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._proc = None

    def command(self) -> list[str]:
        train = ["-m", "fvlm", "train", self.config_path]
        if self.nodes == 1 and self.gpus_per_node == 1:
            return [sys.executable, *train]
        if self.nodes == 1:
            return [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={self.gpus_per_node}",
                *train,
            ]
        import submitit

        env = submitit.JobEnvironment()
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={self.nodes}",
            f"--nproc_per_node={self.gpus_per_node}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={env.hostnames[0]}:29500",
            f"--rdzv_id=fvlm-{env.job_id}",
            *train,
        ]

    def __call__(self) -> tuple[str, str | None]:
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
            )
            # Polled, not wait()ed: `checkpoint` runs inside a signal handler on this thread, and a
            # wait() in progress would hold the lock its own wait for the process needs.
            while (code := self._proc.poll()) is None:
                time.sleep(0.2)
        summary = rf.read_summary(Path(self.log_path).parent) or {}
        status = summary.get("status") or ("completed" if code == 0 else "failed")
        if code != 0 and status == "completed":
            status = "failed"
        error = summary.get("error") or (None if code == 0 else f"fvlm train exited with {code} (see {self.log_path})")
        return status, error

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Preemption or time limit: the training process checkpoints after its step and exits; the
        same job is requeued and resumes from that checkpoint."""
        import submitit

        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_SEC
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if proc.poll() is None:
                proc.kill()
        return submitit.helpers.DelayedSubmission(
            TrainJob(self.config_path, self.log_path, self.gpus_per_node, self.nodes)
        )


def executor(folder: Path, settings: SlurmSettings):
    """A submitit executor with the settings' resources; job files go to <sweep>/slurm/."""
    import submitit

    ex = submitit.AutoExecutor(folder=str(folder / "slurm" / "%j"), cluster=settings.cluster)
    params: dict[str, Any] = {"timeout_min": settings.time_min, "nodes": settings.nodes, "tasks_per_node": 1}
    if settings.cluster == "slurm":
        params.update(
            slurm_gpus_per_node=settings.gpus_per_node,
            cpus_per_task=settings.cpus_per_gpu * settings.gpus_per_node,
            slurm_signal_delay_s=90,
        )
        if settings.partition:
            params["slurm_partition"] = settings.partition
        if settings.account:
            params["slurm_account"] = settings.account
        if settings.qos:
            params["slurm_qos"] = settings.qos
        if settings.mem_gb:
            params["mem_gb"] = settings.mem_gb
    ex.update_parameters(**params)
    return ex


def attach(folder: Path, job_id: str | None, settings: SlurmSettings):
    """The still-active job of an earlier sweep process, or None (finished, failed, cancelled, gone).
    Local jobs die with the process that started them, so there is nothing to re-attach to."""
    if not job_id or settings.cluster != "slurm":
        return None
    import submitit

    job: Any = submitit.SlurmJob(folder=str(folder / "slurm" / "%j"), job_id=str(job_id))
    try:
        state = job.state
    except Exception:  # sacct unavailable or the job unknown: treat it as gone and resubmit
        return None
    return job if state.split()[0].rstrip("+") in ACTIVE_STATES else None


def wait_for(jobs: dict[str, Any], on_running, on_done, poll_sec: float) -> None:
    """Polls the jobs until each is done; `on_running(run_id)` once when it starts, `on_done(run_id,
    status, error)` when it ends."""
    seen_running: set[str] = set()
    while jobs:
        for run_id, job in list(jobs.items()):
            if run_id not in seen_running and job.state.split()[0] == "RUNNING":
                seen_running.add(run_id)
                on_running(run_id)
            if not job.done():
                continue
            del jobs[run_id]
            try:
                status, error = job.result()
            except Exception as exc:  # the job failed outside fvlm train (node failure, cancelled, ...)
                status, error = "failed", f"job {job.job_id}: {str(exc).strip().splitlines()[-1][:200]}"
            on_done(run_id, status, error)
        if jobs:
            time.sleep(poll_sec)
