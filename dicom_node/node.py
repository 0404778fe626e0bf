"""`dicom-node serve`: the SCP, the analysis workers, the scheduler and the delivery loop.

Process layout:
- main process: the Storage SCP (pynetdicom threads), a scheduler thread that turns
  stable studies into jobs and supervises workers, a delivery thread (C-STORE SCU) and a
  retention thread (removes delivered studies, dicom_node.ops.retention);
- `workers.count` worker processes (spawned), each holding one loaded model.
All of them share the SQLite job table through dicom_node.queue.

Shutdown (SIGTERM or SIGINT): stop accepting associations, let in-flight associations
finish (bounded), let workers finish the job in hand, stop delivering, exit 0. Whatever
was not finished stays queued and resumes at the next start.
"""

from __future__ import annotations

import multiprocessing
import queue as stdlib_queue
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from dicom_node.config import Config
from dicom_node.errors import ConfigError, QueueUnavailable
from dicom_node.log import describe_error, get_logger, say_to_operator
from dicom_node.queue.outage import Outage
from dicom_node.systemd import sd_notify

log = get_logger("dicom_node.node")

WORKER_START_TIMEOUT_SECONDS = 600
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
            name=name,
            daemon=False,
        )
        process.start()
        self.processes[name] = process
        self.started_at[name] = time.monotonic()

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
            name,
            error=f"worker {name} died ({cause}) while analysing this study",
            backoff_seconds=self.config.workers.retry_backoff_seconds,
            max_attempts=self.config.workers.max_attempts,
        )
        for job_id, state in held:
            (log.error if state == "failed" else log.warning)(
                "job_worker_died", job_id=job_id, worker=name, state=state
            )

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


class Node:
    """The running node; `run()` blocks until `request_stop()` (or a signal)."""

    def __init__(self, config: Config):
        self.config = config
        self._stop = threading.Event()
        self._signalled: int | None = None
        self.server = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def request_stop(self) -> None:
        self._stop.set()

    def _on_signal(self, signum, _frame) -> None:
        # Only a flag: the handler runs in the main thread between two bytecodes, maybe
        # while that thread holds the Event's own (non-reentrant) lock inside wait(), and
        # calling set() there would deadlock. The main loop below turns it into the Event.
        self._signalled = signum

    def handle_signals(self) -> None:
        """SIGTERM (systemd's stop) and SIGINT stop the node; call from the main thread."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _wait_for_stop(self) -> None:
        # A timeout, never a bare wait(): a process-directed signal may be taken by another
        # thread, which does not interrupt a main thread blocked on a lock; Python runs the
        # handler only once the main thread runs bytecode again. Seen: SIGTERM ignored for
        # good after READY=1.
        while not self._stop.wait(0.2):
            if self._signalled is not None:
                log.info("signal_received", signal=signal.Signals(self._signalled).name)
                self._stop.set()

    def _scheduler(self, queue, pool: WorkerPool) -> None:
        watchdog_every = 10.0
        last_watchdog = 0.0
        outage, retry_at = Outage("scheduler"), 0.0
        # The SCP started listening just before this thread: quiet time counts from now.
        listening_since = datetime.now(timezone.utc)
        while not self._stop.wait(0.5):
            try:
                if time.monotonic() >= retry_at:
                    for job_id in queue.enqueue_ready_studies(
                        stable_seconds=self.config.study.stable_seconds, listening_since=listening_since
                    ):
                        log.info("job_enqueued", job_id=job_id)
                    outage.ok()
                pool.replace_dead(queue)
            except QueueUnavailable as error:  # logged once per outage; tried again after a pause
                retry_at = time.monotonic() + outage.failed(error)
            except Exception as error:  # keep scheduling; the database may be busy for a moment
                log.error("scheduler_error", error=describe_error(error))
            if time.monotonic() - last_watchdog > watchdog_every:
                sd_notify("WATCHDOG=1")
                last_watchdog = time.monotonic()

    def run(self) -> int:
        from dicom_node.deliver.runner import run_deliveries
        from dicom_node.ops.health import liveness, start_health_server
        from dicom_node.ops.preflight import check_data_dir
        from dicom_node.ops.retention import run_retention
        from dicom_node.ops.runlock import RunLock
        from dicom_node.ops.state import StateWriter
        from dicom_node.ops.status import start_line
        from dicom_node.queue.ops import Queue, busy_timeout_for_peer
        from dicom_node.receive import start_scp
        from dicom_node.receive.access import check_access_config
        from dicom_node.store import InstanceStore, reconcile
        from dicom_node.tls import check_tls

        config = self.config
        check_data_dir(config.node.data_dir)  # created and writable, or a config error naming it
        run_lock = RunLock(config.node.data_dir).acquire()  # one node per data_dir; read by `status`
        check_tls(config)  # a missing or bad TLS file stops the node before any worker starts
        check_access_config(config)
        store = InstanceStore(config.node.data_dir, fsync=config.node.fsync)
        queue = Queue(config.database_url)
        queue.migrate()
        # Before the SCP listens: temp files, rows without files, files without rows.
        reconciled = reconcile(store, queue, destinations=[d.name for d in config.destinations])
        # We hold the run lock, so whatever is still running was a crashed node's.
        abandoned = queue.expire_leases()
        log.info("node_starting", data_dir=str(config.node.data_dir),
                 orphan_temp_files_removed=reconciled.temp_files_removed,
                 instances_missing=len(reconciled.missing), instances_recorded=len(reconciled.recorded),
                 abandoned_leases_expired=abandoned,
                 architecture=config.detector.architecture, workers=config.workers.count)
        pool = WorkerPool(config)
        pool.start()
        try:
            # The SCP's own queue waits for the write lock a short while only: its sender
            # must get 0xA700 (retry later) before giving up on the association.
            scp_queue = Queue(
                config.database_url,
                busy_timeout_seconds=busy_timeout_for_peer(config.node.network_timeout_seconds),
            )
            self.server = start_scp(config, queue=scp_queue, store=store)
            health = start_health_server(config, queue=queue, scp=self.server, pool=pool)  # None: off
        except BaseException:
            # e.g. the port is taken: the workers are not daemons, stop them or we hang.
            if self.server is not None:
                self.server.shutdown()
            pool.stop()
            run_lock.release()
            raise
        threads = [
            threading.Thread(target=self._scheduler, args=(queue, pool), name="scheduler", daemon=True),
            threading.Thread(target=run_deliveries, args=(queue, config, self._stop), name="deliver", daemon=True),
            threading.Thread(target=run_retention, args=(queue, config, self._stop), name="retention", daemon=True),
        ]
        for thread in threads:
            thread.start()
        # What `dicom-node status` (another process) cannot see: SCP, workers, recent refusals.
        state = StateWriter(
            config.node.data_dir, lambda: liveness(config, scp=self.server, pool=pool),
            listening={"ae_title": config.node.ae_title, "host": config.node.host, "port": self.port},
        ).start()
        log.info("node_ready", ae_title=config.node.ae_title, host=config.node.host, port=self.port)
        say_to_operator(start_line(config, self.port))  # for the person who started it (stdout)
        sd_notify("READY=1")
        self._wait_for_stop()

        sd_notify("STOPPING=1")
        log.info("node_stopping")
        self._stop_scp()
        for thread in threads:
            thread.join(30)
        pool.stop()
        if health:
            health.stop()
        state.stop()
        run_lock.release()
        log.info("node_stopped")
        return 0

    def _stop_scp(self) -> None:
        """Stop listening, give in-flight associations time to finish, then abort the rest."""
        server = self.server
        server.shutdown()
        deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.1)
        for association in server.active_associations:
            association.abort()  # unacknowledged instances: the sender will send them again


def serve(config: Config) -> int:
    from dicom_node.log import capture_stray_output

    capture_stray_output()  # every line on stderr is a log event: see dicom_node.log
    node = Node(config)
    node.handle_signals()
    return node.run()
