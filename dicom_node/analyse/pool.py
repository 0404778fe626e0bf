"""The analysis worker pool: `workers.count` spawned processes, each holding one loaded model.

Started by `serve` (dicom_node.node), which waits until every worker has loaded its model;
supervised by the scheduler (`replace_dead`), which replaces a worker that dies and fails
the job it held; stopped with `stop`, which lets each worker finish the job in hand.
"""

from __future__ import annotations

import multiprocessing
import queue as stdlib_queue
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node import metrics
from dicom_node.config import Config
from dicom_node.errors import ConfigError
from dicom_node.log import get_logger

log = get_logger("dicom_node.analyse.pool")

# How long serve waits for the workers to load the detector (systemd's TimeoutStartSec
# must cover it: systemd/dicom-node.service).
WORKER_START_TIMEOUT_SECONDS = 600
# How long a stopping pool lets each worker finish the job in hand.
SHUTDOWN_GRACE_SECONDS = 60
# A worker that dies sooner than this after its start (it cannot load the model, or
# something kills it at once) is restarted after a growing pause, up to the maximum.
WORKER_STABLE_SECONDS = 60
WORKER_RESTART_MAX_DELAY_SECONDS = 60


class StopFlag:
    """The pool's stop signal to its workers, safe when a worker is SIGKILLed.

    multiprocessing.Event is a Condition whose set() waits until every process sleeping
    in wait() has woken up; a worker killed there (OOM killer, kill -9) never does, and
    set() blocks the node's shutdown forever. A shared byte, written and read without a
    lock, cannot be left locked by a dead process; waiting is polling it.
    """

    POLL_SECONDS = 0.05

    def __init__(self, context: multiprocessing.context.BaseContext):
        self._flag = context.RawValue("b", 0)

    def set(self) -> None:
        self._flag.value = 1

    def is_set(self) -> bool:
        return bool(self._flag.value)

    def wait(self, timeout: float) -> bool:
        """Return True once set, False after `timeout` seconds (like Event.wait)."""
        deadline = time.monotonic() + timeout
        while not self.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(self.POLL_SECONDS, remaining))
        return True


@dataclass
class WorkerPool:
    """Worker processes, replaced when one dies unexpectedly."""

    config: Config
    # The owning process's name (store.process_owner): worker ids in the job table are
    # "<owner>/worker-N", unique across the hosts sharing it, and tell which process a
    # lease belongs to. None: the bare process names (tests).
    owner: str | None = None
    tmp_dir: Path | None = None  # the owner's spool area, where the workers' temp files go
    context: multiprocessing.context.SpawnContext = field(
        default_factory=lambda: multiprocessing.get_context("spawn")
    )
    processes: dict[str, multiprocessing.Process] = field(default_factory=dict)
    started_at: dict[str, float] = field(default_factory=dict)
    quick_deaths: dict[str, int] = field(default_factory=dict)
    restart_at: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.stop_event = StopFlag(self.context)
        self.ready_queue = self.context.Queue()

    def _spawn(self, name: str) -> None:
        from dicom_node.analyse.worker import worker_main

        process = self.context.Process(
            target=worker_main,
            args=(self.config, name, self.stop_event, self.ready_queue),
            kwargs={"worker_id": self.worker_id(name), "tmp_dir": self.tmp_dir},
            name=name,
            daemon=False,
        )
        process.start()
        self.processes[name] = process
        self.started_at[name] = time.monotonic()

    def worker_id(self, name: str) -> str:
        """The worker's id in the job table (see `owner`)."""
        return f"{self.owner}/{name}" if self.owner else name

    def start(self) -> None:
        """Start every worker and wait until each has loaded its model (or failed to)."""
        for index in range(self.config.workers.count):
            self._spawn(f"worker-{index + 1}")
        pending = set(self.processes)
        deadline = time.monotonic() + WORKER_START_TIMEOUT_SECONDS
        while pending:
            try:
                name, state, detail = self.ready_queue.get(timeout=1)
            except stdlib_queue.Empty:
                dead = [n for n in pending if not self.processes[n].is_alive()]
                if dead:
                    self.stop()
                    raise ConfigError(f"worker {dead[0]} exited while loading the detector")
                if time.monotonic() > deadline:
                    self.stop()
                    raise ConfigError("workers did not load the detector in time")
                continue
            if state == "error":
                self.stop()
                raise ConfigError(f"detector: {detail}")
            pending.discard(name)

    def replace_dead(self, queue=None) -> None:
        """Replace workers that died (OOM kill, CUDA error...); call periodically.

        With `queue`, the job a dead worker held fails at once (its attempt counts; it is
        retried after the backoff, up to workers.max_attempts) instead of waiting for its
        lease to expire. The replacement starts before the next call, or after a pause
        when the worker keeps dying soon after starting.
        """
        if self.stop_event.is_set():
            return
        self._log_start_failures()
        now = time.monotonic()
        for name, process in list(self.processes.items()):
            if process.is_alive():
                continue
            if name not in self.restart_at:
                self._on_death(name, process, queue, now)
            if now >= self.restart_at[name]:
                del self.restart_at[name]
                self._spawn(name)

    def _on_death(self, name: str, process, queue, now: float) -> None:
        code = process.exitcode
        cause = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exit status {code}"
        lived = now - self.started_at.get(name, now)
        quick = self.quick_deaths.get(name, 0) + 1 if lived < WORKER_STABLE_SECONDS else 0
        self.quick_deaths[name] = quick
        delay = 0.0 if quick <= 1 else min(2.0 ** (quick - 1), WORKER_RESTART_MAX_DELAY_SECONDS)
        self.restart_at[name] = now + delay
        log.error("worker_died", worker=name, exitcode=code, cause=cause, restart_in_seconds=delay)
        if queue is None:
            return  # its job is reclaimed when the lease expires
        # Before the replacement (same name) starts: only the dead process's jobs match.
        held = queue.fail_running_jobs_of(
            self.worker_id(name),
            error=f"worker {name} died ({cause}) while analysing this study",
            backoff_seconds=self.config.workers.retry_backoff_seconds,
            max_attempts=self.config.workers.max_attempts,
        )
        for job_id, state in held:
            (log.error if state == "failed" else log.warning)(
                "job_worker_died", job_id=job_id, worker=name, state=state
            )
            metrics.get().job_failures.labels(outcome=metrics.failure_outcome(state)).inc()

    def _log_start_failures(self) -> None:
        """Report replacements that could not load the detector (they exit; see replace_dead)."""
        while True:
            try:
                name, state, detail = self.ready_queue.get_nowait()
            except stdlib_queue.Empty:
                return
            if state == "error":
                log.error("worker_start_failed", worker=name, error=detail)

    def stop(self, timeout: float = SHUTDOWN_GRACE_SECONDS) -> None:
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
        for name, process in self.processes.items():
            if process.is_alive():
                # Its job stays leased and is claimed again after the lease expires.
                log.warning("worker_terminated", worker=name)
                process.terminate()
                process.join(5)
