"""`dicom-node serve`: the SCP, the analysis workers, the scheduler and the delivery loop.

Process layout:
- main process: the Storage SCP (pynetdicom threads), a scheduler thread that turns
  stable studies into jobs and supervises workers, a delivery thread (C-STORE SCU), a
  retention thread (removes delivered studies, dicom_node.ops.retention), and the
  optional HTTP endpoints /health and /metrics (the workers' metrics included);
- `workers.count` worker processes (spawned), each holding one loaded model.
All of them share the SQLite job table through dicom_node.queue.

Shutdown (SIGTERM or SIGINT): stop accepting associations, let in-flight associations
finish (bounded), let workers finish the job in hand, stop delivering, exit 0. Whatever
was not finished stays queued and resumes at the next start.
"""

from __future__ import annotations

import signal
import threading
import time
from datetime import datetime, timezone

from dicom_node.config import Config
from dicom_node.analyse.pool import WorkerPool
from dicom_node.errors import QueueUnavailable
from dicom_node.log import describe_error, get_logger, say_to_operator
from dicom_node.queue.outage import Outage
from dicom_node.systemd import sd_notify

log = get_logger("dicom_node.node")

SHUTDOWN_GRACE_SECONDS = 60


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
        from dicom_node.ops.metrics import prepare_metrics, start_metrics_server
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
        log.info("node_starting", data_dir=str(config.node.data_dir), database=queue.path,
                 orphan_temp_files_removed=reconciled.temp_files_removed,
                 instances_missing=len(reconciled.missing), instances_recorded=len(reconciled.recorded),
                 abandoned_leases_expired=abandoned,
                 architecture=config.detector.architecture, workers=config.workers.count)
        prepare_metrics(config)  # before the workers start: they count into its directory
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
            metrics = start_metrics_server(config, queue=queue, scp=self.server)  # None: off
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
        for endpoint in (health, metrics):
            if endpoint:
                endpoint.stop()
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
