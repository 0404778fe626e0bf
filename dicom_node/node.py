"""`dicom-node serve` and `dicom-node worker`: the processes of a node, composed.

Roles: `serve` runs everything below; with ``workers.count = 0`` it is a receiver (no
model is loaded, not even imported). `dicom-node worker` runs only the analysis workers
(`run_workers`). With a PostgreSQL queue.url any number of both share one data_dir, on
one host or several (dicom_node.ops.runlock; README "Scaling out").

Process layout of `serve`:
- main process: the Storage SCP (pynetdicom threads), a scheduler thread that turns
  stable studies into jobs and supervises workers, a delivery thread (C-STORE SCU), a
  retention thread (removes delivered studies, dicom_node.ops.retention), and the
  optional HTTP endpoints /health and /metrics (the workers' metrics included);
- `workers.count` worker processes (spawned), each holding one loaded model.
All of them share the job table (the SQLite file, or PostgreSQL) through dicom_node.queue.

Shutdown (SIGTERM or SIGINT): stop accepting associations, let in-flight associations
finish (bounded), let workers finish the job in hand, stop delivering, exit 0. Whatever
was not finished stays queued and resumes at the next start.
"""

from __future__ import annotations

import signal
import threading
import time
from datetime import datetime, timezone

from dicom_node.analyse.pool import WorkerPool
from dicom_node.config import Config
from dicom_node.errors import QueueUnavailable
from dicom_node.log import describe_error, get_logger, say_to_operator
from dicom_node.queue.outage import Outage
from dicom_node.systemd import sd_notify

log = get_logger("dicom_node.node")

SHUTDOWN_GRACE_SECONDS = 60
# How often a process of a shared deployment looks for dead processes' spool areas (and
# so their leases): a flock attempt per process, cheap even on NFS.
SWEEP_EVERY_SECONDS = 15.0


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

    def _wait_for_stop(self, timeout: float | None = None) -> None:
        """Until stopped (or `timeout` seconds have passed)."""
        # A timeout, never a bare wait(): a process-directed signal may be taken by another
        # thread, which does not interrupt a main thread blocked on a lock; Python runs the
        # handler only once the main thread runs bytecode again. Seen: SIGTERM ignored for
        # good after READY=1.
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop.wait(0.2):
            if self._signalled is not None:
                log.info("signal_received", signal=signal.Signals(self._signalled).name)
                self._stop.set()
            if deadline is not None and time.monotonic() >= deadline:
                return

    def _scheduler(self, queue, pool: WorkerPool, area) -> None:
        watchdog_every = 10.0
        last_watchdog = last_sweep = 0.0
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
                if self.config.shared_queue and time.monotonic() - last_sweep > SWEEP_EVERY_SECONDS:
                    last_sweep = time.monotonic()
                    _reclaim(self.config, queue, area)
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
        from dicom_node.ops.retention import run_retention
        from dicom_node.ops.state import StateWriter
        from dicom_node.ops.status import start_line
        from dicom_node.queue.ops import Queue, busy_timeout_for_peer
        from dicom_node.receive import start_scp
        from dicom_node.receive.access import check_access_config
        from dicom_node.store import reconcile
        from dicom_node.tls import check_tls

        config = self.config
        run_lock, area, store = _claim_data_dir(config)
        check_tls(config)  # a missing or bad TLS file stops the node before any worker starts
        check_access_config(config)
        queue = Queue(config.database_url)
        queue.migrate()
        # Dead processes' spool areas and leases first (shared), then, before the SCP
        # listens: temp files, rows without files, files without rows.
        dead, abandoned = _reclaim(config, queue, area)
        reconciled = reconcile(store, queue, destinations=config.outputs_by_destination)
        if not config.shared_queue:
            # We hold the run lock alone, so whatever is still running was a crashed node's.
            abandoned = queue.expire_leases()
        log.info("node_starting", data_dir=str(config.node.data_dir), database=queue.path,
                 owner=area.owner, orphan_temp_files_removed=reconciled.temp_files_removed + len(dead),
                 instances_missing=len(reconciled.missing), instances_recorded=len(reconciled.recorded),
                 abandoned_leases_expired=abandoned,
                 architecture=config.detector.architecture, workers=config.workers.count)
        # Before the workers start: they count into its directory.
        prepare_metrics(config, area.path / "metrics" if config.shared_queue else None)
        pool = WorkerPool(config, owner=area.owner, tmp_dir=area.path)
        try:
            pool.start()
        except BaseException:
            area.release()
            run_lock.release()
            raise
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
            area.release()
            run_lock.release()
            raise
        threads = [
            threading.Thread(target=self._scheduler, args=(queue, pool, area), name="scheduler", daemon=True),
            threading.Thread(target=run_deliveries, args=(queue, config, self._stop), name="deliver", daemon=True,
                             kwargs={"worker": f"{area.owner}/deliver", "store": store}),
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
        area.release()
        run_lock.release()
        log.info("node_stopped")
        return 0

    def run_workers(self) -> int:
        """`dicom-node worker`: workers.count analysis processes and nothing else.

        No SCP, scheduler or delivery: it claims jobs from the shared PostgreSQL job
        table that receivers fill, reads their instances from and writes results to the
        shared data_dir. Stops like serve: SIGTERM lets each worker finish the job in hand.
        """
        from dicom_node.ops.metrics import prepare_metrics, start_metrics_server
        from dicom_node.queue.ops import Queue

        config = self.config
        run_lock, area, _store = _claim_data_dir(config)
        queue = Queue(config.database_url)
        queue.migrate()
        dead, abandoned = _reclaim(config, queue, area)
        log.info("workers_starting", data_dir=str(config.node.data_dir), database=queue.path, owner=area.owner,
                 orphan_spool_areas_removed=len(dead), abandoned_leases_expired=abandoned,
                 architecture=config.detector.architecture, workers=config.workers.count)
        prepare_metrics(config, area.path / "metrics")
        pool = WorkerPool(config, owner=area.owner, tmp_dir=area.path)
        try:
            pool.start()
            metrics = start_metrics_server(config, queue=queue, scp=None)  # None: off
        except BaseException:
            pool.stop()
            area.release()
            run_lock.release()
            raise
        log.info("workers_ready", workers=config.workers.count)
        sd_notify("READY=1")
        last_watchdog, last_sweep = 0.0, time.monotonic()  # the first WATCHDOG=1 right after READY=1
        while not self._stop.is_set():
            self._wait_for_stop(timeout=0.5)
            try:
                pool.replace_dead(queue)
                if time.monotonic() - last_sweep > SWEEP_EVERY_SECONDS:
                    last_sweep = time.monotonic()
                    _reclaim(config, queue, area)
            except QueueUnavailable:
                pass  # the workers report the outage; their jobs are reclaimed after their leases
            except Exception as error:
                log.error("supervisor_error", error=describe_error(error))
            if time.monotonic() - last_watchdog > 10.0:
                sd_notify("WATCHDOG=1")
                last_watchdog = time.monotonic()
        sd_notify("STOPPING=1")
        log.info("workers_stopping")
        pool.stop()  # each worker finishes the job in hand
        if metrics:
            metrics.stop()
        area.release()
        run_lock.release()
        log.info("workers_stopped")
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


def _claim_data_dir(config: Config):
    """(run lock, spool area, store) of this process on node.data_dir, or a ConfigError.

    SQLite: this node alone on data_dir (an exclusive run lock). PostgreSQL: shared with
    every other receiver and worker using it; each process writes temp files only in its
    own spool area, so a starting process never removes a live one's.
    """
    from dicom_node.ops.preflight import check_data_dir
    from dicom_node.ops.runlock import RunLock
    from dicom_node.store import InstanceStore, SpoolArea

    check_data_dir(config.node.data_dir)  # created and writable, or a config error naming it
    run_lock = RunLock(config.node.data_dir, shared=config.shared_queue).acquire()  # read by `status`
    try:
        area = SpoolArea(config.node.data_dir).acquire()
    except BaseException:
        run_lock.release()
        raise
    return run_lock, area, InstanceStore(config.node.data_dir, fsync=config.node.fsync, tmp_dir=area.path)


def _reclaim(config: Config, queue, area) -> tuple[list[str], int]:
    """Dead processes' spool areas removed and, on a shared job table, their leases ended."""
    from dicom_node.ops.runlock import reclaim_dead_processes
    from dicom_node.store import sweep_spool_areas

    if not config.shared_queue:  # alone on data_dir: reconcile empties tmp/, all leases end
        return sweep_spool_areas(config.node.data_dir, keep=area.path), 0
    dead, ended = reclaim_dead_processes(config.node.data_dir, queue, keep=area.path)
    if ended:
        log.warning("dead_process_leases_expired", owners=dead, leases=ended)
    return dead, ended


def serve(config: Config) -> int:
    from dicom_node.log import capture_stray_output

    capture_stray_output()  # every line on stderr is a log event: see dicom_node.log
    node = Node(config)
    node.handle_signals()
    return node.run()


def work(config: Config) -> int:
    """`dicom-node worker`: the analysis workers only (see Node.run_workers)."""
    from dicom_node.errors import ConfigError
    from dicom_node.log import capture_stray_output

    if config.workers.count == 0:
        raise ConfigError("workers.count: 0 workers to run; `dicom-node worker` needs 1 or more")
    if not config.shared_queue:
        raise ConfigError(
            "queue.url: `dicom-node worker` needs a PostgreSQL job table that the receivers share; "
            "with the SQLite default the workers run inside `dicom-node serve` (workers.count)"
        )
    capture_stray_output()
    node = Node(config)
    node.handle_signals()
    return node.run_workers()
