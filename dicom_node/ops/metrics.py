"""``GET /metrics`` for Prometheus: every process's counters, and gauges read at scrape time.

With ``[metrics] enabled`` (off by default, loopback by default), `serve` calls
`prepare_metrics` before its workers start: the multiprocess directory
``data_dir/metrics`` is wiped (values of a previous run are not this run's; Prometheus
sees a counter reset) and every process counts into it (dicom_node.metrics says how).
`start_metrics_server` then serves, in the main process:

- the sum over processes of every counter and histogram (``MultiProcessCollector``);
- `NodeCollector`: gauges computed when scraped, in this process, from what it holds:
  the associations open (the SCP's connection table) and the queue depth by state and
  the oldest pending job's age (``Queue.depth``, the SQL stays in dicom_node.queue).

The metric names, their labels and why they hold no patient data: dicom_node.metrics.
"""

from __future__ import annotations

import shutil
from http import HTTPStatus
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from dicom_node.config import Config
from dicom_node.errors import QueueUnavailable
from dicom_node.metrics import (
    FAILURE_OUTCOMES,
    get,
    multiprocess_directory,
    use_directory,
)
from dicom_node.ops.http import Answer, EndpointServer, listen
from dicom_node.queue.outage import Outage
from dicom_node.receive.access import AssociateDiagnostic
from dicom_node.receive.handlers import StoreStatus

METRICS_PATH = "/metrics"
METRICS_DIR = "metrics"  # under node.data_dir: the processes' value files


def prepare_metrics(config: Config, directory: Path | None = None) -> None:
    """Where this process and the workers it spawns from now on count: `directory`
    (default data_dir/metrics), emptied, when metrics are enabled; memory otherwise. Call
    before the workers start. Processes sharing data_dir (PostgreSQL) each pass their own,
    under their spool area (store.SpoolArea), so each /metrics serves that process's values."""
    if not config.metrics.enabled:
        use_directory(None)
        return
    directory = directory or config.node.data_dir / METRICS_DIR
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    use_directory(directory)
    _start_at_zero(config)


def _start_at_zero(config: Config) -> None:
    """Every label value the node can count, shown at 0 from the start: a series that
    appears only with its first increment hides that increment from rate() and increase(),
    and a dashboard shows no data rather than none refused."""
    counted = get()
    for status in StoreStatus:
        if status != StoreStatus.SUCCESS:
            counted.c_store_refusals.labels(status=status.name)
    for diagnostic in AssociateDiagnostic:
        counted.associations_refused.labels(reason=diagnostic.name)
    for outcome in FAILURE_OUTCOMES:
        counted.job_failures.labels(outcome=outcome)
        for destination in config.destinations:
            counted.delivery_failures.labels(destination=destination.name, outcome=outcome)
    for destination in config.destinations:
        counted.job_done_to_delivered.labels(destination=destination.name)


class NodeCollector:
    """Gauges computed at every scrape from the queue and, when given, the SCP."""

    def __init__(self, queue, scp=None):
        self.queue = queue
        self.scp = scp  # the association server (its ConnectionTable), or None
        self._outage = Outage("metrics")

    def collect(self):
        if self.scp is not None:
            yield GaugeMetricFamily(
                "dicom_node_associations_open", "Associations accepted and not ended yet.",
                value=self.scp.connections.associated_count(),
            )
        try:
            depth = self.queue.depth()
        except QueueUnavailable as error:  # logged once per outage; the queue gauges are left out
            self._outage.failed(error)
            return
        self._outage.ok()
        for table in ("jobs", "deliveries"):
            family = GaugeMetricFamily(
                f"dicom_node_queue_{table}", f"{table.capitalize()} in the job table, by state.", labels=["state"]
            )
            for state, count in depth[table].items():
                family.add_metric([state], count)
            yield family
        yield GaugeMetricFamily(
            "dicom_node_oldest_pending_job_age_seconds",
            "Age of the oldest pending job (0 when none is pending).",
            value=depth["oldest_pending_job_age_seconds"] or 0.0,
        )


def metrics_registry(queue, scp=None) -> CollectorRegistry:
    """What ``GET /metrics`` shows: every process's values and the `NodeCollector` gauges."""
    registry = CollectorRegistry()
    directory = multiprocess_directory()
    if directory is None:
        raise RuntimeError("prepare_metrics must run first: no multiprocess directory is set")
    MultiProcessCollector(registry, path=str(directory))
    registry.register(NodeCollector(queue, scp))
    return registry


def _text(status: int, message: str) -> Answer:
    return int(status), "text/plain; charset=utf-8", f"{message}\n".encode()


class MetricsServer(EndpointServer):
    """``GET /metrics`` in the Prometheus text format (or OpenMetrics, when asked for)."""

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry):
        def answer(headers) -> Answer:
            encode, content_type = choose_encoder(headers.get("Accept"))
            return int(HTTPStatus.OK), content_type, encode(registry)

        super().__init__(address, name="metrics", path=METRICS_PATH, answer=answer, failure=_text)


def start_metrics_server(config: Config, *, queue, scp) -> MetricsServer | None:
    """Serve ``GET /metrics`` when ``[metrics] enabled`` (after `prepare_metrics`); None when off."""
    if not config.metrics.enabled:
        return None
    return listen(MetricsServer, "metrics", config.metrics.host, config.metrics.port, metrics_registry(queue, scp))
