"""`dicom-node serve`: the SCP, the analysis workers, the scheduler and the delivery loop.

Process layout:
- main process: the Storage SCP (pynetdicom threads), a scheduler thread that turns
  stable studies into jobs and supervises workers, and a delivery thread (C-STORE SCU);
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
from pathlib import Path

from dicom_node.config import Config
from dicom_node.errors import ConfigError, PermanentError, RetryableError
from dicom_node.log import get_logger
from dicom_node.systemd import sd_notify

log = get_logger("dicom_node.node")

WORKER_START_TIMEOUT_SECONDS = 600
SHUTDOWN_GRACE_SECONDS = 60


@dataclass
class WorkerPool:
    """Worker processes, replaced when one dies unexpectedly."""

    config: Config
    context: multiprocessing.context.SpawnContext = field(
        default_factory=lambda: multiprocessing.get_context("spawn")
    )
    processes: dict[str, multiprocessing.Process] = field(default_factory=dict)

    def __post_init__(self):
        self.stop_event = self.context.Event()
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

    def replace_dead(self) -> None:
        if self.stop_event.is_set():
            return
        for name, process in list(self.processes.items()):
            if not process.is_alive():
                log.error("worker_died", worker=name, exitcode=process.exitcode)
                self._spawn(name)

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


def deliver_once(queue, config: Config, *, worker: str = "deliver") -> bool:
    """Claim and send one pending delivery; return False when there was none."""
    from dicom_node.deliver.scu import send_file

    delivery = queue.claim_next_delivery(
        worker=worker, lease_seconds=config.delivery.lease_seconds, max_attempts=config.delivery.max_attempts
    )
    if delivery is None:
        return False
    delivery_log = log.bind(
        delivery_id=delivery.id, job_id=delivery.job_id, destination=delivery.destination,
        sop_instance_uid=delivery.sop_instance_uid,
    )
    policy = config.delivery
    try:
        destination = config.destination(delivery.destination)
        send_file(Path(delivery.path), destination, calling_ae_title=config.node.ae_title)
    except (RetryableError, PermanentError, ConfigError) as error:
        state = queue.fail_delivery(
            delivery.id, worker=worker, error=str(error), retryable=isinstance(error, RetryableError),
            backoff_seconds=policy.retry_backoff_seconds,
            max_backoff_seconds=policy.max_backoff_seconds, max_attempts=policy.max_attempts,
        )
        (delivery_log.error if state == "failed" else delivery_log.warning)(
            "delivery_failed" if state == "failed" else "delivery_retry", error=str(error), state=state
        )
        return True
    queue.complete_delivery(delivery.id, worker=worker)
    delivery_log.info("delivery_done")
    return True


class Node:
    """The running node; `run()` blocks until `request_stop()` (or a signal)."""

    def __init__(self, config: Config):
        self.config = config
        self._stop = threading.Event()
        self.server = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def request_stop(self, *_signal_args) -> None:
        self._stop.set()

    def _scheduler(self, queue, pool: WorkerPool) -> None:
        watchdog_every = 10.0
        last_watchdog = 0.0
        while not self._stop.wait(0.5):
            try:
                for job_id in queue.enqueue_ready_studies(stable_seconds=self.config.study.stable_seconds):
                    log.info("job_enqueued", job_id=job_id)
                pool.replace_dead()
            except Exception as error:  # keep scheduling; the database may be busy for a moment
                log.error("scheduler_error", error=f"{type(error).__name__}: {error}")
            if time.monotonic() - last_watchdog > watchdog_every:
                sd_notify("WATCHDOG=1")
                last_watchdog = time.monotonic()

    def _deliverer(self, queue) -> None:
        while not self._stop.is_set():
            try:
                if not deliver_once(queue, self.config):
                    self._stop.wait(0.5)
            except Exception as error:
                log.error("delivery_loop_error", error=f"{type(error).__name__}: {error}")
                self._stop.wait(1)

    def run(self) -> int:
        from dicom_node.queue.ops import Queue
        from dicom_node.receive.scp import start_scp
        from dicom_node.store import InstanceStore

        config = self.config
        config.node.data_dir.mkdir(parents=True, exist_ok=True)
        store = InstanceStore(config.node.data_dir, fsync=config.node.fsync)
        removed = store.remove_orphan_temp_files()
        queue = Queue(config.database_url)
        queue.migrate()
        log.info("node_starting", data_dir=str(config.node.data_dir), orphan_temp_files_removed=removed,
                 architecture=config.detector.architecture, workers=config.workers.count)
        pool = WorkerPool(config)
        pool.start()
        self.server = start_scp(config, queue=queue, store=store)
        threads = [
            threading.Thread(target=self._scheduler, args=(queue, pool), name="scheduler", daemon=True),
            threading.Thread(target=self._deliverer, args=(queue,), name="deliver", daemon=True),
        ]
        for thread in threads:
            thread.start()
        log.info("node_ready", ae_title=config.node.ae_title, host=config.node.host, port=self.port)
        sd_notify("READY=1")
        self._stop.wait()

        sd_notify("STOPPING=1")
        log.info("node_stopping")
        self._stop_scp()
        for thread in threads:
            thread.join(30)
        pool.stop()
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
    node = Node(config)
    signal.signal(signal.SIGTERM, node.request_stop)
    signal.signal(signal.SIGINT, node.request_stop)
    return node.run()
